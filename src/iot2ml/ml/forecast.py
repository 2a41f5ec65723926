"""Forecast task: per-device series, rolling-origin backtest of several candidates, keep the best by MASE.

How ``ForecastTask.fit`` works:

- **Resampling.** Each series (one value of ``series_column``) is resampled to ``freq`` by the mean
  of its readings in each bin; the grid runs from its first to its last non-empty bin (UTC).
- **Gaps.** A run of empty bins of at most ``max_gap`` steps (default: one season) is filled by
  seasonal interpolation: the value one season earlier plus a linear level correction that joins
  both edges (plain linear interpolation when less than a season precedes the gap). At a longer gap
  the series *restarts*: everything before it is dropped. Filled bins are used for training but are
  never scored. A series left with fewer than ``context + folds * horizon`` points is skipped; its
  reason is in ``artifacts["skipped_series"]``. No usable series at all raises ``InvalidInput``.
- **Backtest.** Rolling origin per series: ``folds`` cutoffs ``horizon`` steps apart, the last one
  ``horizon`` steps before the series' end, each forecasting ``horizon`` steps from the data before
  it (so the first cutoff has at least ``context`` points). Every candidate is refit at every cutoff.
  Figures per series and fold, then averaged: MASE (MAE over the in-sample MAE of the seasonal
  naive forecast on the training part), MAE, RMSE, and ``coverage`` of the interval between the
  lowest and highest quantile (nominal ``q_high - q_low``; ``coverage_<nominal>`` for every
  symmetric pair of quantiles, e.g. ``coverage_0.8`` for 0.1 and 0.9).
- **Candidates.** ``seasonal_naive`` (also the baseline, always run); ``auto_ets``,
  ``auto_arima``, ``auto_theta`` and ``mstl`` from statsforecast, one model per series, parallel
  over series in ``n_jobs`` processes (AutoARIMA searches a reduced space, p, q <= 2 and P, Q <= 1
  with the approximate stepwise search: the full search takes ~20 s per hourly series, this one
  ~0.5 s; MSTL decomposes a day and a week below daily steps, a week and a year at daily steps,
  keeping the seasons that fit twice into the shortest training part, and forecasts the rest with
  a non-seasonal AutoETS; with no season left it is listed as skipped); ``lightgbm``:
  ONE global model over all series, our own recursive implementation, trained with the L1 loss on
  scaled first differences ``(y[t] - y[t-1]) / s`` (``s`` = the series' MASE scale) with features
  ``lag<k> = (y[t-k] - y[t-1]) / s`` for k = 2..season+1 and 2*season (as far as ``context``
  reaches) and UTC calendar features (``hour``; ``dayofweek`` once the data span
  ``WEEKS_FOR_WEEKDAY`` weeks: with fewer, it memorises one-off events). The best backtest
  MASE wins (ties go to the earlier candidate); a candidate that fails is listed with its error.
- **Quantiles** are conformal (split conformal on rolling origins), the same way for every
  candidate. The winner is backtested again for calibration (selection stays on the ``folds``):
  on more folds for a few series, as many as give ``CALIBRATION_ORIGINS`` series x horizons and
  the shortest series allows (each still training on ``context`` points, and on each MSTL season
  twice), and from a dense grid of origins: each fold's model forecasts from its cutoff and from
  every ``stride`` steps up to the next cutoff (statsforecast: ``cross_validation`` refitting at the
  cutoffs and ``forward`` in between), ``stride`` the largest divisor of the horizon that still
  gives ``CALIBRATION_ORIGINS`` series x origins (every step for a few series; for a thousand, the
  ``folds`` cutoffs only, at no extra cost); it is described in ``artifacts["calibration"]``. Its
  residuals, divided by the series' MASE scale, give per horizon step the conformal quantiles with
  the finite-sample rank ``ceil((n + 1) q)`` (``floor`` below the median; neighbouring steps are
  pooled until there are ``MIN_RESIDUALS``); a forecast adds them, times the series' scale, to the
  point forecast. The reported coverage is held out: each fold's origins get intervals from the
  other folds' residuals whose target points are not among this fold's (in-sample only when
  there is one fold).
- The returned model is the winner refit on all points, with the quantiles of all calibration folds.
- ``compare`` (for promotion) scores the winner's last backtest fold, kept in
  ``artifacts["holdout_predictions"]``, and the champion's forecast from the same history, on the
  series whose last fold starts after the champion's newest training reading (at least
  ``min_holdout`` series, default 1), over the shorter of both horizons, by MASE with the same scale.

``ForecastModel.predict(frame)`` takes recent history in the training input's shape (series, ts,
target; raw readings, resampled and gap-filled as above) and returns, per series, the next
``horizon`` steps after its last bin. The model keeps each training series' points (the last
``context`` of them; all for the statsforecast models, whose fitted parameters are applied to the whole
history by statsforecast's ``forward``) and puts them before the frame's first reading, so a frame
may hold just the newest readings. A series unseen in training needs ``context`` resampled points
(the statsforecast models are then fitted on them afresh, MSTL on the seasons that fit twice, or
its trend model alone); shorter ones are left out and listed in
``out.attrs["skipped_series"]``. Seasonal naive and LightGBM use the last ``context`` points.
"""

from __future__ import annotations

import math
import os
import time
import warnings
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from iot2ml.core.errors import ConfigError, InvalidInput

from .base import (
    HOLDOUT_PREDICTIONS,
    NoFairHoldout,
    Records,
    TrainResult,
    check_record,
    iso,
    newer_than,
    record_number,
    too_few,
    utc,
)

__all__ = ["CANDIDATES", "ForecastModel", "ForecastTask", "infer_season_length"]

CANDIDATES = ("seasonal_naive", "auto_ets", "auto_arima", "auto_theta", "mstl", "lightgbm")
BASELINE = "seasonal_naive"
STATS_CANDIDATES = ("auto_ets", "auto_arima", "auto_theta", "mstl")
"""The candidates fitted per series by statsforecast (they keep a series' whole history)."""
MIN_RESIDUALS = 50
"""Scaled residuals wanted per horizon step for a conformal quantile; neighbouring steps are pooled."""
CALIBRATION_ORIGINS = 500
"""Forecast origins (series x origins) wanted for the conformal calibration of the winner: more folds
than ``folds`` for a few series (as the series' length allows), and forecasts from every ``stride``
steps inside each fold, the largest divisor of the horizon that still gives this many (every step
for a few series, only the fold cutoffs, at no extra cost, for a thousand)."""
WEEKS_FOR_WEEKDAY = 8
"""LightGBM gets a ``dayofweek`` feature only when the longest series spans this many weeks."""
RECORD_FIELDS = ("start", "target", "dynamic_feat", "cat")
"""Fields of a DeepAR-style request instance (besides the series column); the last two are not read."""
MAX_LGB_ROWS = 2_000_000
"""Training rows for the global LightGBM model; beyond it each series keeps its most recent rows."""


def infer_season_length(freq: str) -> int:
    """Steps per season: a day for hourly-ish data, a week for daily, a year for monthly, else 1.

    >>> infer_season_length("1h"), infer_season_length("2h"), infer_season_length("D"), infer_season_length("MS")
    (24, 12, 7, 12)
    """
    offset = pd.tseries.frequencies.to_offset(freq)
    if isinstance(offset, pd.offsets.Tick):
        step, day = pd.Timedelta(offset), pd.Timedelta(days=1)
        if step == day:
            return 7
        if pd.Timedelta(hours=1) <= step < day and day % step == pd.Timedelta(0):
            return int(day // step)
        return 1
    if isinstance(offset, pd.offsets.MonthBegin | pd.offsets.MonthEnd) and offset.n == 1:
        return 12
    return 1


# --------------------------------------------------------------------------- regular series


@dataclass
class _Series:
    key: Any
    index: pd.DatetimeIndex  # regular, UTC
    values: np.ndarray  # float, no NaN
    observed: np.ndarray  # False where a gap was filled


@dataclass
class _Prepared:
    series: list[_Series]
    skipped: list[dict[str, str]]
    filled_points: int = 0
    restarted_series: int = 0


def _check_frame(frame: pd.DataFrame, columns: Sequence[str]) -> None:
    absent = [c for c in columns if c not in frame.columns]
    if absent:
        have = ", ".join(map(str, frame.columns[:20])) + (", ..." if len(frame.columns) > 20 else "")
        raise InvalidInput(f"column(s) {', '.join(map(repr, absent))} missing from the frame (it has {have}): "
                           "pass series_column/time_column/target naming columns it has")
    ts = frame[columns[1]]
    if not isinstance(ts.dtype, pd.DatetimeTZDtype):
        raise InvalidInput(f"column {columns[1]!r} must hold timezone-aware timestamps (UTC), not {ts.dtype}: "
                           "read it from the lake or convert with pd.to_datetime(..., utc=True)")
    if not (pd.api.types.is_numeric_dtype(frame[columns[2]]) or frame[columns[2]].dtype == object):
        raise InvalidInput(f"target {columns[2]!r} is not numeric (dtype {frame[columns[2]].dtype}): "
                           "choose a numeric column")


def _fill(values: np.ndarray, season: int, max_gap: int) -> tuple[np.ndarray, np.ndarray, int, int]:
    """Fill short NaN runs, restart after the last long one: (values, observed, start, filled)."""
    observed = ~np.isnan(values)
    missing = np.flatnonzero(~observed)
    if not len(missing):
        return values, observed, 0, 0
    breaks = np.flatnonzero(np.diff(missing) > 1)
    starts = np.r_[missing[0], missing[breaks + 1]]
    ends = np.r_[missing[breaks], missing[-1]] + 1  # exclusive; the series ends on an observed bin
    long = np.flatnonzero(ends - starts > max_gap)
    start = int(ends[long[-1]]) if len(long) else 0
    y = values[start:].copy()
    filled = 0
    for s, e in zip(starts - start, ends - start):
        if s < 1:
            continue
        if s - 1 - season >= 0 and season > 1:
            for t in range(s, e):  # in order: a gap longer than a season reuses what it just filled
                y[t] = y[t - season]
            e0, e1 = y[s - 1] - y[s - 1 - season], y[e] - y[e - season]
            w = (np.arange(s, e) - (s - 1)) / (e - (s - 1))
            y[s:e] += e0 * (1 - w) + e1 * w
        else:
            y[s:e] = np.interp(np.arange(s, e), [s - 1, e], [y[s - 1], y[e]])
        filled += int(e - s)
    return y, observed[start:], start, filled


def _prepare(frame: pd.DataFrame, *, series_column: str, time_column: str, target: str, freq: str,
             season: int, max_gap: int, min_length: int, need: str) -> _Prepared:
    """Resample every series to ``freq`` and fill its gaps; series shorter than ``min_length`` are skipped."""
    _check_frame(frame, [series_column, time_column, target])
    data = pd.DataFrame({
        "key": frame[series_column].reset_index(drop=True),
        "ts": frame[time_column].dt.tz_convert("UTC").reset_index(drop=True),
        "y": pd.to_numeric(frame[target], errors="coerce").astype(float).reset_index(drop=True),
    })
    present = data.dropna(subset=["ts", "y"])
    out = _Prepared(series=[], skipped=[])
    empty = set(data["key"].dropna().unique()) - set(present["key"].unique())
    for key in sorted(empty, key=str):
        out.skipped.append({"series": str(key), "reason": f"no numeric {target!r} value"})
    if present.empty:
        return out
    binned = present.set_index("ts").groupby("key", sort=True)["y"].resample(freq).mean()
    for key, sub in binned.groupby(level=0, sort=False):
        index = pd.DatetimeIndex(sub.index.get_level_values(1))
        values, observed, start, filled = _fill(sub.to_numpy(dtype=float), season, max_gap)
        if start:
            out.restarted_series += 1
        out.filled_points += filled
        if len(values) < min_length:
            why = f"{len(values)} points at {freq}"
            if start:
                why += (f" after a gap longer than {max_gap} steps (ending {index[start]:%Y-%m-%dT%H:%MZ}; "
                        "earlier points dropped)")
            out.skipped.append({"series": str(key), "reason": f"{why}; {need}"})
            continue
        out.series.append(_Series(key, index[start:], values, observed))
    return out


def _mase_scale(y: np.ndarray, season: int) -> float:
    """In-sample MAE of the seasonal naive forecast (lag 1 when too short or flat; 1.0 if all is flat)."""
    # "Flat" is relative to the level: a clean seasonal series has seasonal differences of ~1e-15,
    # and dividing by that would blow every scaled feature up.
    floor = 1e-9 * max(1.0, float(np.nanmean(np.abs(y)))) if len(y) else 1e-9
    for lag in (season, 1):
        if len(y) > lag:
            scale = float(np.mean(np.abs(y[lag:] - y[:-lag])))
            if scale > floor and math.isfinite(scale):
                return scale
    return 1.0


def _future_index(index: pd.DatetimeIndex, freq: str, h: int) -> pd.DatetimeIndex:
    return pd.date_range(index[-1], periods=h + 1, freq=freq)[1:]


# --------------------------------------------------------------------------- candidates


@dataclass
class _Batch:
    """Histories to forecast from, and the timestamps to forecast."""

    keys: list[Any]
    ys: list[np.ndarray]
    index: list[pd.DatetimeIndex]
    future: list[pd.DatetimeIndex]


@dataclass(frozen=True)
class _Origins:
    """The backtest's forecast origins, the same offsets from every series' end.

    Fold ``k`` is fitted on the points before ``L - (folds - k) * h`` (``L``: the series' length) and
    forecasts from that cutoff and every ``stride`` steps after it, up to the next fold's cutoff (the
    last fold: its cutoff only, so every forecast has ``h`` actual values). Origin ``i`` forecasts
    points ``L - folds * h + i * stride + j`` for steps ``j < h``.
    """

    folds: int
    h: int
    stride: int

    @property
    def count(self) -> int:
        return (self.folds - 1) * self.h // self.stride + 1

    @property
    def offsets(self) -> np.ndarray:
        """Each origin's position after the first cutoff."""
        return np.arange(self.count) * self.stride

    @property
    def fold(self) -> np.ndarray:
        """The fold (fitted model) each origin belongs to."""
        return np.minimum(self.offsets // self.h, self.folds - 1)

    @property
    def cutoffs(self) -> np.ndarray:
        """Index of each fold's cutoff origin."""
        return np.arange(self.folds) * (self.h // self.stride)


def _stride(h: int, folds: int, n_series: int) -> int:
    """The largest divisor of ``h`` that still gives ``CALIBRATION_ORIGINS`` series x origins (else 1)."""
    for s in sorted((d for d in range(1, h + 1) if h % d == 0), reverse=True):
        if n_series * ((folds - 1) * h // s + 1) >= CALIBRATION_ORIGINS:
            return s
    return 1


def _rolling(engine: Any, series: Sequence[_Series], grid: _Origins) -> np.ndarray:
    """(series, origins, h) forecasts: ``engine`` refit at each fold's cutoff, forecasting from its origins."""
    h, fold = grid.h, grid.fold
    out = np.empty((len(series), grid.count, h))
    for k in range(grid.folds):
        cuts = [len(s.values) - (grid.folds - k) * h for s in series]
        engine.fit(_Batch(keys=[s.key for s in series], ys=[s.values[:c] for s, c in zip(series, cuts)],
                          index=[s.index[:c] for s, c in zip(series, cuts)], future=[]))
        block = np.flatnonzero(fold == k)
        starts = [(i, c + grid.offsets[b] - k * h) for i, c in enumerate(cuts) for b in block]
        rows = _Batch(keys=[series[i].key for i, _ in starts], ys=[series[i].values[:o] for i, o in starts],
                      index=[series[i].index[:o] for i, o in starts],
                      future=[series[i].index[o:o + h] for i, o in starts])
        out[:, block] = engine.forecast(rows, h).reshape(len(series), len(block), h)
    return out


class _SeasonalNaive:
    name = "seasonal_naive"

    def __init__(self, season: int) -> None:
        self.season = season

    def fit(self, batch: _Batch) -> None:
        pass

    def forecast(self, batch: _Batch, h: int) -> np.ndarray:
        m = self.season
        steps = np.arange(h) % m
        return np.stack([y[len(y) - m + steps] for y in batch.ys])

    def backtest(self, series: Sequence[_Series], grid: _Origins) -> np.ndarray:
        return _rolling(self, series, grid)


def _seasonalities(freq: str, season: int) -> list[int]:
    """MSTL's seasons: a day and a week below daily steps (e.g. 24 and 168 hourly), a week and a year
    for daily steps, else the one season."""
    offset = pd.tseries.frequencies.to_offset(freq)
    if isinstance(offset, pd.offsets.Tick) and pd.Timedelta(offset) < pd.Timedelta(days=1) and season > 1:
        return [season, 7 * season]
    if season == 7:
        return [7, 365]
    return [season] if season > 1 else []


class _StatsModel:
    """AutoETS, AutoARIMA, AutoTheta or MSTL per series through statsforecast (processes over series).

    MSTL takes the ``seasons`` that fit twice into the shortest series it is given (``fit_seasons``);
    with none it cannot run and the task lists it as skipped."""

    def __init__(self, name: str, season: int, n_jobs: int, seasons: Sequence[int] = ()) -> None:
        self.name, self.season, self.n_jobs = name, season, n_jobs
        self.seasons = list(seasons)
        self.fitted: dict[Any, Any] = {}

    def fit_seasons(self, shortest: int) -> list[int]:
        """The seasons MSTL can decompose a series of ``shortest`` points into (each fits twice)."""
        return [m for m in self.seasons if 2 * m < shortest]

    def _model(self, length: int | None = None) -> Any:
        from statsforecast.models import MSTL, AutoARIMA, AutoETS, AutoTheta

        if self.name == "auto_ets":
            return AutoETS(season_length=self.season)
        if self.name == "auto_theta":
            return AutoTheta(season_length=self.season)
        if self.name == "mstl":
            seasons = self.seasons if length is None else self.fit_seasons(length)
            if not seasons:  # an unseen series too short to decompose: its trend model alone
                return AutoETS(model="ZZN")
            return MSTL(season_length=seasons, trend_forecaster=AutoETS(model="ZZN"))
        return AutoARIMA(season_length=self.season, approximation=True, max_p=2, max_q=2, max_P=1, max_Q=1)

    def _frame(self, ys: list[np.ndarray]) -> pd.DataFrame:
        lengths = [len(y) for y in ys]
        return pd.DataFrame({
            "unique_id": np.repeat(np.arange(len(ys)), lengths),
            "ds": np.concatenate([np.arange(n) for n in lengths]),
            "y": np.concatenate(ys),
        })

    def _engine(self) -> Any:
        from statsforecast import StatsForecast

        return StatsForecast(models=[self._model()], freq=1, n_jobs=self.n_jobs)

    def backtest(self, series: Sequence[_Series], grid: _Origins) -> np.ndarray:
        """statsforecast's cross-validation on the same origins: refit at each fold's cutoff (every
        ``h / stride`` windows), ``forward`` (fitted parameters, newer data) from the origins between."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = self._engine().cross_validation(
                df=self._frame([s.values for s in series]), h=grid.h, step_size=grid.stride,
                test_size=grid.folds * grid.h, refit=grid.h // grid.stride)
        out = out.sort_values(["unique_id", "cutoff", "ds"])
        return out.iloc[:, -1].to_numpy(dtype=float).reshape(len(series), grid.count, grid.h)

    def fit(self, batch: _Batch) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            engine = self._engine().fit(df=self._frame(batch.ys))
        # statsforecast orders series by unique_id, which is our position
        self.fitted = {key: engine.fitted_[i, 0] for i, key in enumerate(batch.keys)}

    def forecast(self, batch: _Batch, h: int) -> np.ndarray:
        out = np.empty((len(batch.ys), h))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for i, (key, y) in enumerate(zip(batch.keys, batch.ys)):
                model = self.fitted.get(key)
                if model is not None:
                    out[i] = model.forward(y=y.astype(float), h=h)["mean"]
                else:
                    out[i] = self._model(len(y)).forecast(y=y.astype(float), h=h)["mean"]
        return out


def _lgb_lags(season: int, context: int) -> list[int]:
    """Lags 2..season+1 and 2*season (2..5 without a season), as far back as ``context`` reaches."""
    base = set(range(2, season + 2)) if season > 1 else {2, 3, 4, 5}
    base.add(2 * season)
    return sorted(k for k in base if k <= context)


def _calendar_names(freq: str, span: pd.Timedelta) -> list[str]:
    """``hour`` below daily steps; ``dayofweek`` at daily steps or below once ``WEEKS_FOR_WEEKDAY`` are seen."""
    offset = pd.tseries.frequencies.to_offset(freq)
    if not isinstance(offset, pd.offsets.Tick) or pd.Timedelta(offset) > pd.Timedelta(days=1):
        return ["month"] if isinstance(offset, pd.offsets.MonthBegin | pd.offsets.MonthEnd | pd.offsets.Week) else []
    names = ["hour"] if pd.Timedelta(offset) < pd.Timedelta(days=1) else []
    if span >= pd.Timedelta(weeks=WEEKS_FOR_WEEKDAY):
        names.append("dayofweek")
    return names


def _calendar(index: pd.DatetimeIndex, names: list[str]) -> np.ndarray:
    if not names:
        return np.empty((len(index), 0))
    return np.column_stack([np.asarray(getattr(index, n), dtype=float) for n in names])


class _LightGBM:
    """One global LightGBM model over all series on scaled first differences; recursive forecasts.

    Target ``(y[t] - y[t-1]) / s`` and features ``lag<k> = (y[t-k] - y[t-1]) / s`` with ``s`` the
    series' MASE scale, so series of any level and spread share one model. The L1 objective
    (the median step) keeps a few maintenance dips or spikes in the history from being learnt as
    a pattern that the recursion would then amplify.
    """

    name = "lightgbm"

    def __init__(self, season: int, context: int, calendar: list[str], n_threads: int) -> None:
        self.season = season
        self.lags = _lgb_lags(season, context)
        self.calendar = calendar
        self.n_threads = n_threads
        self.scales: dict[Any, float] = {}
        self.booster: Any = None

    @property
    def feature_names(self) -> list[str]:
        return [f"lag{k}" for k in self.lags] + self.calendar

    def _features(self, hist: np.ndarray, scale: np.ndarray) -> np.ndarray:
        """``hist``: (rows, width) values before the target step -> scaled lag features."""
        width = hist.shape[1]
        return (hist[:, [width - k for k in self.lags]] - hist[:, -1:]) / scale[:, None]

    def fit(self, batch: _Batch) -> None:
        from lightgbm import LGBMRegressor

        width = max(self.lags)
        per_series = max(4 * width, MAX_LGB_ROWS // max(1, len(batch.ys)))
        xs, ts = [], []
        self.scales = {}
        for key, y, index in zip(batch.keys, batch.ys, batch.index):
            s = self.scales[key] = _mase_scale(y, self.season)
            if len(y) <= width:
                continue
            windows = np.lib.stride_tricks.sliding_window_view(y, width + 1)[-per_series:]
            lags = self._features(windows[:, :-1], np.full(len(windows), s))
            xs.append(np.hstack([lags, _calendar(index[-len(windows):], self.calendar)]))
            ts.append((windows[:, -1] - windows[:, -2]) / s)
        if not xs:
            raise InvalidInput(f"no series is longer than {width} points: lightgbm has nothing to learn from")
        self.booster = LGBMRegressor(
            objective="l1", n_estimators=300, learning_rate=0.05, num_leaves=15, min_child_samples=20,
            subsample=0.8, subsample_freq=1, colsample_bytree=0.8, random_state=0, n_jobs=self.n_threads, verbose=-1,
        ).fit(np.vstack(xs), np.concatenate(ts)).booster_

    def forecast(self, batch: _Batch, h: int) -> np.ndarray:
        width = max(self.lags)
        scale = np.array([self.scales.get(k) or _mase_scale(y, self.season) for k, y in zip(batch.keys, batch.ys)])
        cal = np.stack([_calendar(f[:h], self.calendar) for f in batch.future])  # (series, h, features)
        buf = np.empty((len(batch.ys), width + h))
        buf[:, :width] = np.stack([y[-width:] for y in batch.ys])
        for j in range(h):
            lags = self._features(buf[:, j:width + j], scale)
            buf[:, width + j] = buf[:, width + j - 1] + self.booster.predict(np.hstack([lags, cal[:, j, :]])) * scale
        return buf[:, width:]

    def backtest(self, series: Sequence[_Series], grid: _Origins) -> np.ndarray:
        return _rolling(self, series, grid)


# --------------------------------------------------------------------------- scoring


def _order_quantile(pool: np.ndarray, q: float) -> float:
    """The conformal quantile of ``n`` residuals: the ``ceil((n + 1) q)``-th smallest above the median,
    the ``floor((n + 1) q)``-th below it (the finite-sample correction), clipped to the sample."""
    n = len(pool)
    if q == 0.5:
        return float(np.median(pool))
    rank = math.ceil((n + 1) * q) if q > 0.5 else math.floor((n + 1) * q)
    return float(np.partition(pool, min(max(rank, 1), n) - 1)[min(max(rank, 1), n) - 1])


def _conformal(resid: np.ndarray, quantiles: Sequence[float]) -> np.ndarray:
    """(..., h) scaled residuals with NaN (left out) -> (h, len(quantiles)) conformal residual quantiles."""
    h = resid.shape[-1]
    per_step = resid.reshape(-1, h)
    counts = np.sum(~np.isnan(per_step), axis=0)
    table = np.zeros((h, len(quantiles)))
    for j in range(h):
        w = 0
        while w < h and np.sum(counts[max(0, j - w): j + w + 1]) < MIN_RESIDUALS:
            w += 1
        pool = per_step[:, max(0, j - w): j + w + 1]
        pool = pool[~np.isnan(pool)]
        if len(pool):
            table[j] = [_order_quantile(pool, q) for q in quantiles]
    return table


def _levels(quantiles: Sequence[float]) -> dict[float, tuple[int, int]]:
    """Nominal coverage -> (lower, upper) quantile positions: every symmetric pair (q, 1 - q), and the
    outermost pair ``max - min`` even when it is not symmetric."""
    qs = list(quantiles)
    out = {round(1 - 2 * q, 6): (i, qs.index(next(p for p in qs if abs(p - (1 - q)) < 1e-9)))
           for i, q in enumerate(qs) if q < 0.5 and any(abs(p - (1 - q)) < 1e-9 for p in qs)}
    out.setdefault(round(max(qs) - min(qs), 6), (qs.index(min(qs)), qs.index(max(qs))))
    return out


def _score(pred: np.ndarray, actual: np.ndarray, scale: np.ndarray, grid: _Origins,
           quantiles: Sequence[float]) -> tuple[dict[str, float], np.ndarray]:
    """Backtest figures and the scaled residuals of every origin, from (series, origins, h) forecasts
    and actual values (NaN: not observed) and the (series, folds) MASE scales.

    MASE, MAE and RMSE are averaged over series and the folds' cutoff origins. Coverage is held out:
    the origins of each fold get intervals calibrated on the residuals of the other folds' origins
    whose target points are not among this fold's targets (in-sample with one fold); ``coverage`` is
    the outermost interval's, ``coverage_<nominal>`` each symmetric one's.
    """
    o_scale = scale[:, grid.fold]
    resid = (actual - pred) / o_scale[:, :, None]
    at = grid.cutoffs
    err = actual[:, at] - pred[:, at]
    levels = _levels(quantiles)
    covered = {nominal: np.full(pred.shape, np.nan) for nominal in levels}
    target = grid.offsets[:, None] + np.arange(grid.h)[None, :]  # (origins, h) position after the first cutoff
    for k in range(grid.folds):
        mine = grid.fold == k
        span = target[mine]
        calib = np.where((~mine[:, None] & ((target < span.min()) | (target > span.max())))[None], resid, np.nan)
        if grid.folds == 1:
            calib = resid
        table = _conformal(calib, quantiles)
        for nominal, (lo, hi) in levels.items():
            lower = pred[:, mine] + table[None, None, :, lo] * o_scale[:, mine, None]
            upper = pred[:, mine] + table[None, None, :, hi] * o_scale[:, mine, None]
            inside = (actual[:, mine] >= lower) & (actual[:, mine] <= upper)
            covered[nominal][:, mine] = np.where(np.isnan(actual[:, mine]), np.nan, inside)
    outer = round(max(quantiles) - min(quantiles), 6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a fold with no observed point is NaN, left out
        mae = np.nanmean(np.abs(err), axis=2)
        metrics = {
            "mase": float(np.nanmean(mae / scale)),
            "mae": float(np.nanmean(mae)),
            "rmse": float(np.nanmean(np.sqrt(np.nanmean(err**2, axis=2)))),
            "coverage": float(np.nanmean(covered[outer])),
        }
        for nominal in sorted(levels, reverse=True):
            metrics[f"coverage_{nominal:g}"] = float(np.nanmean(covered[nominal]))
    return metrics, resid


# --------------------------------------------------------------------------- model and task


@dataclass
class ForecastModel:
    """The refit winner. ``predict(frame)`` forecasts the next ``horizon`` steps of each series in it."""

    candidate: str
    target: str
    freq: str
    horizon: int
    context: int
    season_length: int
    max_gap: int
    quantiles: tuple[float, ...]
    series_column: str
    time_column: str
    engine: Any  # one of the candidate classes above, fitted
    residual_quantiles: np.ndarray  # (horizon, len(quantiles)), in units of the series' MASE scale
    scales: dict[Any, float] = field(default_factory=dict)
    history: dict[Any, pd.Series] = field(default_factory=dict)  # training points per series, see _with_history

    @property
    def quantile_columns(self) -> list[str]:
        return [f"q{q:g}" for q in self.quantiles]

    def predict(self, frame: pd.DataFrame) -> pd.DataFrame:
        """Columns ``[series_column, "ts", "mean", "q0.1", "q0.5", "q0.9"]``, ``horizon`` rows per series."""
        return self._predict(frame, self.horizon)

    def predict_series(self, history: Mapping[Any, pd.Series] | pd.DataFrame,
                       horizon: int | None = None) -> pd.DataFrame:
        """Like ``predict``, from ``{series id: Series indexed by UTC timestamps}`` or a frame, ``horizon`` steps."""
        h = self.horizon if horizon is None else int(horizon)
        if not 1 <= h <= self.horizon:
            raise InvalidInput(f"horizon {horizon} is outside 1..{self.horizon}: "
                               f"the model was trained for {self.horizon} steps")
        if isinstance(history, pd.DataFrame):
            return self._predict(history, h)
        parts = []
        for key, series in history.items():
            if not isinstance(series.index, pd.DatetimeIndex):
                raise InvalidInput(f"history of series {key!r} must be indexed by timestamps, "
                                   f"not {type(series.index).__name__}")
            parts.append(self._rows(key, series))
        if not parts:
            raise InvalidInput("history is empty: pass at least one series with its last points")
        return self._predict(pd.concat(parts, ignore_index=True), h)

    # ---- records (REST, MQTT request/reply): the same resampling, history and forecast as predict ----
    def describe_inputs(self) -> dict[str, Any]:
        """``task``, ``fields`` a record may hold (DeepAR's ``start``, ``target``, ``dynamic_feat``,
        ``cat`` and the series column), ``horizon``, ``freq``, ``context``, ``quantiles``, ``series_column``."""
        return {"task": "forecast", "fields": [*RECORD_FIELDS, self.series_column], "horizon": self.horizon,
                "freq": self.freq, "context": self.context, "quantiles": list(self.quantiles),
                "series_column": self.series_column}

    def series_from_records(self, records: Records, *, ignore: Collection[str] = ()) -> list[tuple[Any, pd.Series]]:
        """``(series id, points)`` per record, in order: ``target`` (numbers, one per ``freq`` step
        from ``start``) under the record's ``series_column`` (``instance-<i>`` without it), or, without
        ``target``, the stored points of a series the model was trained on. ``dynamic_feat`` and
        ``cat`` (DeepAR) are accepted and not read; ``ignore``: other fields the model does not read.
        Errors name ``instances[i].field``."""
        accepted = {*RECORD_FIELDS, self.series_column}
        takes = f"'start' and 'target' (and optionally {self.series_column!r})"
        out: list[tuple[Any, pd.Series]] = []
        for i, record in enumerate(records):
            check_record(i, record, accepted, ignore, (), takes)
            key = record.get(self.series_column, f"instance-{i}")
            if isinstance(key, bool) or not isinstance(key, (str, int, float)):
                raise InvalidInput(f"instances[{i}].{self.series_column} must be a series id (a string), "
                                   f"not {type(key).__name__}")
            if "target" not in record:
                if key not in self.history:
                    raise InvalidInput(f"instances[{i}] lacks 'target' and series {key!r} is not one the model "
                                       "was trained on: send 'start' and 'target' (the last points)")
                out.append((key, self.history[key]))
                continue
            target = record["target"]
            if not isinstance(target, list) or not target:
                raise InvalidInput(f"instances[{i}].target must be a non-empty list of numbers")
            values = [record_number(v, i, f"target[{j}]") for j, v in enumerate(target)]
            if not isinstance(record.get("start"), str):
                raise InvalidInput(f"instances[{i}].start must be a timestamp string such as '2026-01-01 00:00:00'")
            try:
                start = utc(record["start"])
            except (ValueError, TypeError):
                raise InvalidInput(f"instances[{i}].start {record['start']!r} is not a timestamp") from None
            index = pd.date_range(start, periods=len(values), freq=self.freq)
            out.append((key, pd.Series(values, index=index, dtype=float)))
        return out

    def forecast(self, series: Sequence[tuple[Any, pd.Series]], horizon: int | None = None) -> list[pd.DataFrame]:
        """One forecast (columns as ``predict``'s) per ``(series id, points)``, in order, each from its
        own points and, for a known series, the stored ones before them (as ``predict``). An id may
        repeat. A series too short to forecast raises ``InvalidInput`` naming ``instances[i]``."""
        h = self.horizon if horizon is None else int(horizon)
        out: list[pd.DataFrame | None] = [None] * len(series)
        pending = list(range(len(series)))
        while pending:  # one model call per run of distinct ids (usually all of them)
            chunk, later, ids = [], [], set()
            for i in pending:
                (later if series[i][0] in ids else chunk).append(i)
                ids.add(series[i][0])
            frame = pd.concat([self._rows(*series[i]) for i in chunk], ignore_index=True)
            forecasts, skipped = self._forecast(frame, h)
            reasons = {s["series"]: s["reason"] for s in skipped}
            by_id = dict(tuple(forecasts.groupby(self.series_column, sort=False)))
            for i in chunk:
                key = series[i][0]
                if key not in by_id:
                    raise InvalidInput(f"instances[{i}] (series {key!r}) cannot be forecast: "
                                       f"{reasons.get(str(key), 'no points')}")
                out[i] = by_id[key].reset_index(drop=True)
            pending = later
        return out  # type: ignore[return-value]

    def answers(self, forecasts: Sequence[pd.DataFrame], *, quantiles: Sequence[float] | None = None,
                output_types: Sequence[str] = ("mean", "quantiles")) -> list[dict[str, Any]]:
        """Per forecast (DeepAR's answer): ``start`` (its first step, ISO 8601), ``mean`` and
        ``quantiles`` (``{"0.1": [...]}``; all the model gives, or ``quantiles``) as ``output_types`` ask."""
        columns = {}
        for q in self.quantiles if quantiles is None else quantiles:
            match = [m for m in self.quantiles if abs(float(q) - m) < 1e-9]
            if not match:
                raise InvalidInput(f"quantile {float(q):g} is not one the model gives: "
                                   f"{', '.join(f'{m:g}' for m in self.quantiles)}")
            columns[f"{float(q):g}"] = f"q{match[0]:g}"
        out = []
        for frame in forecasts:
            answer: dict[str, Any] = {"start": frame["ts"].iloc[0].isoformat()}
            if "mean" in output_types:
                answer["mean"] = frame["mean"].astype(float).tolist()
            if "quantiles" in output_types:
                answer["quantiles"] = {name: frame[col].astype(float).tolist() for name, col in columns.items()}
            out.append(answer)
        return out

    def predict_records(self, records: Records, *, ignore: Collection[str] = (),
                        quantiles: Sequence[float] | None = None,
                        output_types: Sequence[str] = ("mean", "quantiles")) -> list[dict[str, Any]]:
        """One answer per record: ``answers(forecast(series_from_records(records)))``."""
        return self.answers(self.forecast(self.series_from_records(records, ignore=ignore)),
                            quantiles=quantiles, output_types=output_types)

    def _rows(self, key: Any, series: pd.Series) -> pd.DataFrame:
        return pd.DataFrame({self.series_column: key, self.time_column: series.index, self.target: series.to_numpy()})

    def _with_history(self, frame: pd.DataFrame) -> pd.DataFrame:
        """Prepend the stored training points of known series that end before the frame's first reading."""
        _check_frame(frame, [self.series_column, self.time_column, self.target])
        if not self.history or frame.empty:
            return frame
        step = pd.tseries.frequencies.to_offset(self.freq)
        parts = [frame[[self.series_column, self.time_column, self.target]]]
        for key, first in frame.groupby(self.series_column, sort=False)[self.time_column].min().items():
            past = self.history.get(key)
            if past is not None and not pd.isna(first):
                past = past[past.index + step <= first]
                parts.append(self._rows(key, past))
        return pd.concat(parts, ignore_index=True) if len(parts) > 1 else frame

    def _predict(self, frame: pd.DataFrame, h: int) -> pd.DataFrame:
        out, skipped = self._forecast(frame, h)
        if out.empty:
            reasons = "; ".join(f"{s['series']}: {s['reason']}" for s in skipped[:5]) or "the frame is empty"
            raise InvalidInput(f"no series to forecast (forecasting needs at least context={self.context} "
                               f"points at {self.freq}): {reasons}")
        return out

    def _forecast(self, frame: pd.DataFrame, h: int) -> tuple[pd.DataFrame, list[dict[str, str]]]:
        """The forecast of every series of ``frame`` long enough, and the skipped ones with the reason."""
        need = f"forecasting needs at least context={self.context} points"
        frame = self._with_history(frame)
        prepared = _prepare(frame, series_column=self.series_column, time_column=self.time_column,
                            target=self.target, freq=self.freq, season=self.season_length,
                            max_gap=self.max_gap, min_length=self.context, need=need)
        series = prepared.series
        if not series:
            return pd.DataFrame(columns=[self.series_column, "ts", "mean", *self.quantile_columns]), prepared.skipped
        keep = None if self.candidate in STATS_CANDIDATES else self.context
        batch = _Batch(
            keys=[s.key for s in series],
            ys=[s.values if keep is None else s.values[-keep:] for s in series],
            index=[s.index if keep is None else s.index[-keep:] for s in series],
            future=[_future_index(s.index, self.freq, h) for s in series],
        )
        mean = self.engine.forecast(batch, h)
        scale = np.array([self.scales.get(s.key) or _mase_scale(s.values, self.season_length) for s in series])
        bands = mean[:, :, None] + self.residual_quantiles[None, :h, :] * scale[:, None, None]
        out = pd.DataFrame({
            self.series_column: np.repeat(np.array(batch.keys, dtype=object), h),
            "ts": batch.future[0].append(batch.future[1:]),
            "mean": mean.reshape(-1),
        })
        for j, col in enumerate(self.quantile_columns):
            out[col] = bands[:, :, j].reshape(-1)
        out.attrs["skipped_series"] = prepared.skipped
        return out, prepared.skipped


class ForecastTask:
    """Forecast ``target`` per series ``horizon`` steps ahead at ``freq``; see the module docstring.

    ``context`` (default ``max(2 * horizon, 2 * season_length)``, at least the horizon and a season)
    is both the shortest training part of the backtest and the history ``predict`` needs for a series
    it has not seen. ``max_gap`` (default one season) is the longest run of empty bins that is
    filled; a longer gap restarts the series after it. ``n_jobs`` is the process count for
    statsforecast and the thread count for the one LightGBM model (-1: all CPUs), which is what
    keeps thousands of series feasible. ``progress`` shows a rich progress bar over candidates and
    folds. ``candidates`` and ``quantiles`` also take comma-separated strings.
    """

    name = "forecast"

    def __init__(
        self,
        *,
        target: str,
        freq: str = "1h",
        horizon: int = 24,
        context: int | None = None,
        quantiles: Sequence[float] = (0.1, 0.5, 0.9),
        series_column: str = "device_id",
        time_column: str = "ts",
        folds: int = 3,
        candidates: Sequence[str] = CANDIDATES,
        season_length: int | None = None,
        max_gap: int | None = None,
        n_jobs: int = -1,
        progress: bool = False,
        min_holdout: int = 1,
    ) -> None:
        try:
            pd.tseries.frequencies.to_offset(freq)
        except ValueError:
            raise ConfigError(f"freq {freq!r} is not a pandas frequency: use e.g. '1h', '15min', '1D'") from None
        if int(horizon) < 1:
            raise ConfigError(f"horizon {horizon} must be at least 1 step")
        if int(folds) < 1:
            raise ConfigError(f"folds {folds} must be at least 1")
        if int(min_holdout) < 1:
            raise ConfigError(f"min_holdout {min_holdout} must be at least 1 series")
        self.min_holdout = int(min_holdout)
        self.season_length = int(season_length) if season_length else infer_season_length(freq)
        if self.season_length < 1:
            raise ConfigError(f"season_length {season_length} must be at least 1")
        self.target, self.freq, self.horizon, self.folds = target, freq, int(horizon), int(folds)
        self.context = int(context) if context is not None else max(2 * self.horizon, 2 * self.season_length)
        if self.context < max(self.horizon, self.season_length, 2):
            raise ConfigError(f"context {context} is shorter than the horizon ({self.horizon}) or a season "
                              f"({self.season_length}): pass context >= {max(self.horizon, self.season_length, 2)}")
        if isinstance(quantiles, str):  # from the CLI or a job file: "0.1,0.5,0.9"
            quantiles = [q for q in quantiles.split(",") if q.strip()]
        if isinstance(candidates, str):
            candidates = [c.strip() for c in candidates.split(",") if c.strip()]
        try:
            qs = tuple(float(q) for q in quantiles)
        except ValueError:
            raise ConfigError(f"quantiles {quantiles!r} must be numbers, e.g. 0.1,0.5,0.9") from None
        if len(qs) < 2 or not all(0 < q < 1 for q in qs) or len(set(qs)) != len(qs):
            raise ConfigError(f"quantiles {list(quantiles)} must be at least two distinct values in (0, 1), "
                              "e.g. 0.1,0.5,0.9")
        self.quantiles = tuple(sorted(qs))
        unknown = [c for c in candidates if c not in CANDIDATES]
        if unknown or not candidates:
            raise ConfigError(f"candidates {list(candidates)} must be taken from {', '.join(CANDIDATES)}")
        self.candidates = tuple(dict.fromkeys(candidates))
        self.max_gap = int(max_gap) if max_gap is not None else self.season_length
        self.series_column, self.time_column = series_column, time_column
        self.n_jobs = int(n_jobs)
        self.progress = progress

    def _engine(self, name: str, calendar: list[str]) -> Any:
        if name == "seasonal_naive":
            return _SeasonalNaive(self.season_length)
        if name == "lightgbm":
            threads = self.n_jobs if self.n_jobs > 0 else (os.cpu_count() or 1)
            return _LightGBM(self.season_length, self.context, calendar, threads)
        return _StatsModel(name, self.season_length, self.n_jobs,
                           _seasonalities(self.freq, self.season_length) if name == "mstl" else ())

    def _series(self, frame: pd.DataFrame) -> _Prepared:
        length = self.context + self.folds * self.horizon
        need = f"training needs {length} = context {self.context} + folds {self.folds} x horizon {self.horizon}"
        return _prepare(frame, series_column=self.series_column, time_column=self.time_column,
                        target=self.target, freq=self.freq, season=self.season_length,
                        max_gap=self.max_gap, min_length=length, need=need)

    def _targets(self, series: Sequence[_Series], grid: _Origins) -> tuple[np.ndarray, np.ndarray]:
        """(series, origins, h) actual values at ``grid``'s origins (NaN where filled) and (series, folds)
        MASE scales of each fold's training part."""
        actual = np.full((len(series), grid.count, grid.h), np.nan)
        scale = np.empty((len(series), grid.folds))
        for i, s in enumerate(series):
            first = len(s.values) - grid.folds * grid.h
            for b, o in enumerate(first + grid.offsets):
                actual[i, b] = np.where(s.observed[o:o + grid.h], s.values[o:o + grid.h], np.nan)
            for k in range(grid.folds):
                scale[i, k] = _mase_scale(s.values[:first + k * grid.h], self.season_length)
        return actual, scale

    def _calibration_grid(self, series: Sequence[_Series], engine: Any) -> _Origins:
        """The origins the winner is calibrated on: ``folds`` or, for few series, as many more folds as
        give ``CALIBRATION_ORIGINS`` series x horizons (each fold still trains on ``context`` points,
        and on each MSTL season twice), forecasting from every ``stride`` steps."""
        h, n = self.horizon, len(series)
        seasons = getattr(engine, "seasons", []) or [0]
        room = min(len(s.values) for s in series) - max(self.context + 1, 2 * max(seasons) + 1)
        deep = max(self.folds, min(room // h, math.ceil(CALIBRATION_ORIGINS / (n * h))))
        return _Origins(deep, h, _stride(h, deep, n))

    def compare(self, champion: Any, frame: pd.DataFrame, result: TrainResult, since: pd.Timestamp | None
                ) -> dict[str, Any]:
        """MASE of this training's last backtest fold and of ``champion``'s forecast from the same
        history (each series cut before that fold), on the series whose last fold starts after
        ``since``, over the first ``min(champion horizon, horizon)`` steps with the same scale.
        Raises ``NoFairHoldout`` with fewer than ``min_holdout`` such series or when the champion
        forecasts another target or frequency, or none of them."""
        since = newer_than(since)
        table = result.artifacts.get(HOLDOUT_PREDICTIONS)
        if not isinstance(table, pd.DataFrame):
            raise NoFairHoldout("this training kept no backtest predictions to compare with")
        starts = table.groupby("series", sort=False)["fold_start"].first()
        fresh = set(starts[starts > since].index)
        problem = too_few(len(fresh), "series with a last backtest fold", since, self.min_holdout)
        if problem is not None:
            raise problem
        if not isinstance(champion, ForecastModel):
            raise NoFairHoldout(f"the champion is a {type(champion).__name__}, not a forecast model: "
                                "compare them by hand")
        if (champion.target, champion.freq) != (self.target, self.freq):
            raise NoFairHoldout(f"the champion forecasts {champion.target!r} at {champion.freq}, this version "
                                f"{self.target!r} at {self.freq}: compare them by hand")
        steps = min(champion.horizon, self.horizon)
        history = {s.key: pd.Series(s.values[:-self.horizon], index=s.index[:-self.horizon])
                   for s in self._series(frame).series if s.key in fresh}
        try:
            theirs = champion.predict_series(history, steps)
        except InvalidInput as err:
            raise NoFairHoldout(f"the champion cannot forecast the holdout: {err}") from None
        theirs = theirs.rename(columns={champion.series_column: "series", "mean": "champion"})
        both = table[table["series"].isin(fresh) & (table["step"] < steps)].merge(
            theirs[["series", "ts", "champion"]], on=["series", "ts"], how="inner")
        both = both[both["actual"].notna()]
        if both.empty:
            raise NoFairHoldout(f"the champion forecast none of the {len(fresh)} series newer than its data "
                                f"({iso(since)}): {champion.context} points of history needed")
        per_series = both.assign(mine=(both["actual"] - both["prediction"]).abs() / both["scale"],
                                 theirs=(both["actual"] - both["champion"]).abs() / both["scale"]
                                 ).groupby("series", sort=False)[["mine", "theirs"]].mean()
        n = len(per_series)
        problem = too_few(n, "series the champion could forecast", since, self.min_holdout)
        if problem is not None:
            raise problem
        return {"new": float(per_series["mine"].mean()), "champion": float(per_series["theirs"].mean()),
                "units": n, "holdout": f"last backtest fold ({steps} steps) of {n} series, starting after {iso(since)}"}

    def fit(self, frame: pd.DataFrame) -> TrainResult:
        from rich.progress import Progress

        h, folds = self.horizon, self.folds
        length = self.context + folds * h
        prepared = self._series(frame)
        series = prepared.series
        if not series:
            reasons = "; ".join(f"{s['series']}: {s['reason']}" for s in prepared.skipped[:5]) or "the frame is empty"
            raise InvalidInput(f"no series in {self.series_column!r} has {length} regular points at {self.freq} "
                               f"(context {self.context} + folds {folds} x horizon {h}): {reasons}. "
                               "Collect more history or lower horizon, folds or context")

        n = len(series)
        calendar = _calendar_names(self.freq, max(s.index[-1] - s.index[0] for s in series))
        cuts = _Origins(folds, h, h)
        actual, scale = self._targets(series, cuts)
        shortest = min(len(s.values) for s in series) - folds * h

        names = [BASELINE] + [c for c in self.candidates if c != BASELINE]
        report: list[dict[str, Any]] = []
        engines: dict[str, Any] = {}
        scored: dict[str, tuple[dict[str, float], np.ndarray, np.ndarray]] = {}
        with Progress(disable=not self.progress, transient=False) as bar:
            task = bar.add_task("forecast", total=len(names) + 1)
            for name in names:
                started = time.monotonic()
                bar.update(task, description=f"{name}: {folds} folds ({n} series)")
                engine = engines[name] = self._engine(name, calendar)
                if name == "mstl":
                    engine.seasons = engine.fit_seasons(shortest)
                    if not engine.seasons:
                        report.append({"name": name, "skipped": f"the shortest training part ({shortest} points) "
                                       f"holds no season of {_seasonalities(self.freq, self.season_length)} twice"})
                        bar.advance(task)
                        continue
                try:
                    pred = engine.backtest(series, cuts)
                    bad = np.flatnonzero(~np.isfinite(pred).all(axis=(1, 2)))
                    if len(bad):
                        raise ValueError(f"non-finite forecasts for {len(bad)} series, e.g. {series[bad[0]].key!r}")
                except Exception as err:  # noqa: BLE001 - a third-party model failing must not end the run: it is reported
                    report.append({"name": name, "error": f"{type(err).__name__}: {err}"})
                    bar.advance(task)
                    continue
                bar.advance(task)
                metrics, resid = _score(pred, actual, scale, cuts, self.quantiles)
                scored[name] = (metrics, resid, pred)
                report.append({"name": name, **metrics, "seconds": round(time.monotonic() - started, 3)})

            choices = [c for c in self.candidates if c in scored]
            if not choices:
                errors = "; ".join(f"{r['name']}: {r['error']}" for r in report if "error" in r)
                raise InvalidInput(f"every forecast candidate failed: {errors}")
            best = min(choices, key=lambda c: (scored[c][0]["mase"], choices.index(c)))
            grid = self._calibration_grid(series, engines[best])
            if grid.count > cuts.count:  # the winner again from the dense grid: the calibration residuals
                bar.update(task, description=f"calibrate {best}: {grid.folds} folds, {grid.count} origins ({n} series)")
                started = time.monotonic()
                try:
                    pred = engines[best].backtest(series, grid)
                except Exception:  # noqa: BLE001 - a model failing on a shorter fold: keep the folds' calibration
                    pred = np.full(1, np.nan)
                if np.isfinite(pred).all():
                    dense, resid = _score(pred, *self._targets(series, grid), grid, self.quantiles)
                    coverage = {k: v for k, v in dense.items() if k.startswith("coverage")}
                    scored[best] = ({**scored[best][0], **coverage}, resid, scored[best][2])
                    entry = next(r for r in report if r["name"] == best)
                    entry.update(coverage, calibration_seconds=round(time.monotonic() - started, 3))
                else:
                    grid = cuts
            bar.update(task, description=f"refit {best} on {n} series")
            engine = engines[best]
            engine.fit(_Batch(keys=[s.key for s in series], ys=[s.values for s in series],
                              index=[s.index for s in series], future=[]))
            bar.advance(task)

        keep = max(len(s.values) for s in series) if best in STATS_CANDIDATES else self.context
        model = ForecastModel(
            candidate=best, target=self.target, freq=self.freq, horizon=h, context=self.context,
            season_length=self.season_length, max_gap=self.max_gap, quantiles=self.quantiles,
            series_column=self.series_column, time_column=self.time_column, engine=engine,
            residual_quantiles=_conformal(scored[best][1], self.quantiles),
            scales={s.key: _mase_scale(s.values, self.season_length) for s in series},
            history={s.key: pd.Series(s.values[-keep:], index=s.index[-keep:]) for s in series},
        )
        lo, hi = min(self.quantiles), max(self.quantiles)
        last = [s.index[-h:] for s in series]  # the last fold's targets
        return TrainResult(
            model=model,
            task=self.name,
            metrics=scored[best][0],
            baseline_metrics=scored[BASELINE][0],
            primary_metric="mase",
            greater_is_better=False,
            params={
                "candidate": best, "target": self.target, "freq": self.freq, "horizon": h,
                "context": self.context, "folds": folds, "calibration_folds": grid.folds,
                "origin_stride": grid.stride,
                "season_length": self.season_length,
                "max_gap": self.max_gap, "quantiles": list(self.quantiles), "candidates": list(self.candidates),
                "series_column": self.series_column, "n_series": n,
            },
            features=engine.feature_names if best == "lightgbm" else [self.target],
            input_example=frame[[self.series_column, self.time_column, self.target]].head(5).reset_index(drop=True),
            artifacts={
                "chosen": best,
                "candidates": report,
                "skipped_series": prepared.skipped,
                "coverage_nominal": round(hi - lo, 6),
                "intervals": f"conformal: residuals of forecasts from every {grid.stride} step(s) of {grid.folds} "
                             f"backtest folds ({grid.count} origins per series), scaled by the series' MASE scale, "
                             f"per horizon step with the finite-sample rank ceil((n+1)q); coverage of "
                             f"[q{lo:g}, q{hi:g}] measured on each fold's origins calibrated on the other folds'",
                "gaps": {"filled_points": int(prepared.filled_points), "restarted_series": prepared.restarted_series,
                         "max_gap": self.max_gap},
                "backtest": {"folds": folds, "horizon": h, "series": n,
                             "scored_points": int(np.sum(~np.isnan(actual)))},
                "calibration": {"folds": grid.folds, "origins": grid.count, "origin_stride": grid.stride},
                HOLDOUT_PREDICTIONS: pd.DataFrame({
                    "series": np.repeat(np.array([s.key for s in series], dtype=object), h),
                    "fold_start": pd.DatetimeIndex([f[0] for f in last]).repeat(h),
                    "step": np.tile(np.arange(h), n),
                    "ts": last[0].append(last[1:]),
                    "actual": actual[:, -1, :].reshape(-1),
                    "prediction": scored[best][2][:, -1, :].reshape(-1),
                    "scale": np.repeat(scale[:, -1], h),
                }),
            },
        )
