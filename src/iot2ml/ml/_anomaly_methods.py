"""The anomaly task's candidate methods, each over one device's standardised readings in time order.

A method turns a device's readings ``z`` (rows in time order, one column per feature, already
standardised per device) into model-matrix rows (``rows``), and those rows into scores (``score``,
higher = more anomalous). ``rows(key, z, start)`` gives the rows of ``z[start:]``; ``z[:start]``
is the context the window reads (the device's earlier readings). ``context`` is how many earlier
readings a row reads, so a serving process that keeps that many per device scores a single new
reading as the batch does.

- ``point``: IsolationForest over the readings themselves (context 0): level anomalies only.
- ``window``: IsolationForest over rolling features of the last ``window`` readings per feature:
  the reading, rolling level (mean), spread (std), its departure from the previous readings' mean,
  slope over the window and first difference: drifts, noise bursts, jumps; and, when the training
  readings span at least two days (two weeks), the reading's departure from its device's median
  reading at that hour of the day (of the week) in training (``cycles``): a level normal at noon but
  not at midnight, found from the clock rather than from a lag, so irregular readings keep it.
- ``residual``: residuals of a seasonal forecast, ``z[t-P] + mean(z[t-k] - z[t-k-P], k=1..window)``
  (seasonal naive plus the recent level change; without a period ``P`` the mean of the last
  ``window`` readings), in units of the residuals' robust spread on the training readings, largest
  over the features: a reading normal in level but wrong for its time in the cycle.
- ``discord``: the left matrix profile: the distance of the subsequence of ``window`` readings
  ending at each reading to its nearest neighbour among the device's subsequences of the previous
  ``REFERENCE`` readings (z-normalised Euclidean distance / sqrt(window), mean over features;
  trivial matches within stumpy's exclusion zone ``ceil(window / 4)`` left out): shape anomalies
  (Yeh et al., "Matrix Profile I", 2016; the left profile is stumpy's ``stumpi`` streaming one). Computed
  blockwise with numpy matrix products (the same distances as stumpy's, checked in the tests)
  because stumpy's numba compilation alone takes 25-40 s per process on this 2-core machine.

A score reads only the reading and its past (causal), so batch and streaming agree. ``ts`` (int64 ns
since the epoch, UTC, aligned with ``z``) is read only by a window method with ``cycles``.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view
from sklearn.ensemble import IsolationForest

N_TREES = 200
REFERENCE = 1440
"""History (readings: a day of 1-minute ones) in which the discord method looks for a subsequence's
nearest neighbour."""
CALIBRATION = 4096
"""Last training readings per device whose discord scores calibrate the threshold."""
BLOCK = 1024
"""Subsequences per matrix product in the discord search (bounds memory: BLOCK x REFERENCE floats)."""
PERIOD_MIN_ACF = 0.3
"""Autocorrelation a period must reach to be used by the residual method."""
MAX_PERIOD = 1440
"""Longest period looked for (a day of 1-minute readings)."""


def _forest(matrix: np.ndarray, seed: int) -> IsolationForest:
    forest = IsolationForest(n_estimators=N_TREES, max_samples=min(256, len(matrix)), random_state=seed, n_jobs=1)
    return forest.fit(matrix)


class PointForest:
    """IsolationForest over each reading's standardised values."""

    name = "point"

    def __init__(self, window: int = 1) -> None:
        self.window, self.context = 1, 0
        self.forest: IsolationForest | None = None

    def rows(self, key: Any, z: np.ndarray, start: int, ts: np.ndarray | None = None) -> np.ndarray:
        return z[start:]

    def fit(self, per_device: dict[Any, np.ndarray], seed: int, times: dict[Any, np.ndarray] | None = None
            ) -> np.ndarray:
        """Fit on each device's readings (``times``: their timestamps); the training matrix (devices in
        the order given)."""
        matrix = np.vstack([self.rows(k, z, 0, (times or {}).get(k)) for k, z in per_device.items()])
        self.forest = _forest(matrix, seed)
        return matrix

    def covers(self, n: int) -> int:
        """How many of a device's last ``n`` training readings ``fit`` returns rows for."""
        return n

    def score(self, matrix: np.ndarray) -> np.ndarray:
        assert self.forest is not None
        return -self.forest.score_samples(matrix) if len(matrix) else np.empty(0)


class WindowForest(PointForest):
    """IsolationForest over rolling window features (see the module docstring)."""

    name = "window"

    def __init__(self, window: int, cycles: tuple[int, ...] = ()) -> None:
        super().__init__()
        self.window, self.context = int(window), int(window)
        self.cycles = tuple(cycles)
        self.profiles: dict[Any, np.ndarray] = {}  # per device: median reading per hour of the cycle
        self.fleet_profile: np.ndarray | None = None

    def fit(self, per_device: dict[Any, np.ndarray], seed: int, times: dict[Any, np.ndarray] | None = None
            ) -> np.ndarray:
        if self.cycles:
            buckets = {k: hour_of_cycle((times or {})[k], self.cycles) for k in per_device}
            self.profiles = {k: _profile(z, buckets[k], self.cycles) for k, z in per_device.items()}
            self.fleet_profile = _profile(np.vstack(list(per_device.values())),
                                          np.concatenate(list(buckets.values())), self.cycles)
        return super().fit(per_device, seed, times)

    def rows(self, key: Any, z: np.ndarray, start: int, ts: np.ndarray | None = None) -> np.ndarray:
        return self.rows_many([(key, z, start, ts)])

    def rows_many(self, segments: list[tuple[Any, np.ndarray, int, np.ndarray | None]]) -> np.ndarray:
        """The rows of several devices' readings at once (``rows`` of each, stacked): every segment is
        preceded by ``window`` empty (NaN) readings and all are stacked, so that one pass of windowed
        sums over the stack reads only each reading's own device. A window's figures depend only on
        the readings in it (not on where a segment starts), so batch and online scoring agree."""
        w = self.window
        if not segments:
            return np.empty((0, 0))
        n_features = segments[0][1].shape[1]
        padded, where = _stack(segments, w)
        first = np.vstack([np.repeat(z[:1], len(z) - start, axis=0) for _, z, start, _ in segments if len(z) > start]
                          or [np.empty((0, n_features))])
        mean, std = _window_stats(padded, w, where)
        past = _shifted_means(padded, w, where, mean)
        z = padded[where]
        dev = np.nan_to_num(z - past)
        lagged = padded[where - w]
        lagged = np.where(np.isnan(lagged), first, lagged)
        slope = (z - lagged) / w
        diff = np.nan_to_num(z - padded[where - 1])
        parts = [z, mean, np.nan_to_num(std), dev, slope, diff]
        cycles = getattr(self, "cycles", ())  # pickled before cycles: none
        if cycles:
            departures = []
            for key, seg, start, ts in segments:
                profile = self.profiles.get(key)
                profile = self.fleet_profile if profile is None else profile
                if ts is None or len(ts) != len(seg):
                    raise ValueError("this window method compares readings with their hour of the day: "
                                     "it needs their times")
                departures.append(seg[start:] - profile[hour_of_cycle(ts[start:], cycles)])
            parts.append(np.vstack(departures))
        return np.hstack(parts)


def _stack(segments: list[tuple[Any, np.ndarray, int, np.ndarray | None]], pad: int
           ) -> tuple[np.ndarray, np.ndarray]:
    """The segments' readings stacked, each behind ``pad`` empty (NaN) rows, and the positions of the
    readings to score (each segment's from its ``start``)."""
    n_features = segments[0][1].shape[1]
    blank = np.full((pad, n_features), np.nan)
    padded = np.vstack([part for _, z, _, _ in segments for part in (blank, z)])
    offsets = np.cumsum([0] + [pad + len(z) for _, z, _, _ in segments[:-1]])
    where = np.concatenate([np.arange(start, len(z)) + pad + off for (_, z, start, _), off in zip(segments, offsets)])
    return padded, where


SEASONS = 3
"""Earlier periods whose readings at the same phase the residual method's forecast takes the median of."""


def _seasonal(padded: np.ndarray, p: int) -> np.ndarray:
    """Per row, the median of the readings ``p``, ``2p`` .. ``SEASONS * p`` rows earlier (NaN-aware)."""
    import warnings

    lagged = np.full((SEASONS, *padded.shape), np.nan)
    for k in range(1, SEASONS + 1):
        lagged[k - 1, k * p:] = padded[:-k * p]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # no earlier period yet
        return np.nanmedian(lagged, axis=0)


def _window_median(padded: np.ndarray, w: int, ends: np.ndarray) -> np.ndarray:
    """Median of the non-NaN values among the ``w`` rows of ``padded`` ending at each of ``ends``."""
    import warnings

    windows = sliding_window_view(padded, w, axis=0)
    out = np.empty((len(ends), padded.shape[1]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN windows
        for lo in range(0, len(ends), CHUNK):
            out[lo:lo + CHUNK] = np.nanmedian(windows[ends[lo:lo + CHUNK] - w + 1], axis=-1)
    return out


CHUNK = 65_536
"""Readings per pass of the windowed statistics (bounds the temporary window x features copies)."""


def _window_stats(padded: np.ndarray, w: int, ends: np.ndarray, *, spread: bool = True
                  ) -> tuple[np.ndarray, np.ndarray | None]:
    """Mean and standard deviation (ddof 1, NaN with fewer than two; None without ``spread``) of the
    non-NaN readings among the ``w`` rows of ``padded`` ending at each of ``ends`` (pandas'
    ``rolling(w, min_periods=1)``). The arithmetic of ``np.nanmean`` and ``np.nanstd`` step by step
    (the same figures to the bit), sharing one copy of each window, its NaN mask and its sum."""
    windows = sliding_window_view(padded, w, axis=0)  # row j: padded[j:j + w], shape (rows, features, w)
    mean = np.empty((len(ends), padded.shape[1]))
    std = np.empty_like(mean) if spread else None
    with np.errstate(all="ignore"):  # all-NaN windows and single readings
        for lo in range(0, len(ends), CHUNK):
            block = windows[ends[lo:lo + CHUNK] - w + 1]  # a copy: NaNs are zeroed in place
            mask = np.isnan(block)
            gaps = bool(mask.any())
            if gaps:
                np.copyto(block, 0.0, where=mask)
                count = np.sum(~mask, axis=-1, dtype=np.intp, keepdims=True)
            else:
                count = np.full((*block.shape[:-1], 1), w, dtype=np.intp)
            avg = np.sum(block, axis=-1, keepdims=True)
            np.divide(avg, count, out=avg, casting="unsafe")
            mean[lo:lo + CHUNK] = avg[..., 0]
            if std is not None:
                np.subtract(block, avg, out=block)
                if gaps:
                    np.copyto(block, 0.0, where=mask)
                np.multiply(block, block, out=block)
                var = np.sum(block, axis=-1)
                dof = count[..., 0] - 1
                np.divide(var, dof, out=var, casting="unsafe")
                var[dof <= 0] = np.nan
                std[lo:lo + CHUNK] = np.sqrt(var)
    return mean, std


def _shifted_means(padded: np.ndarray, w: int, where: np.ndarray, mean: np.ndarray) -> np.ndarray:
    """``_window_stats``' mean of the windows ending one row before each of ``where``, given ``mean``
    of those ending at ``where``: a reading's previous window is the previous reading's window
    wherever that was scored too (all but each segment's first), so only the others are computed."""
    before = where - 1
    known = np.r_[False, before[1:] == where[:-1]]
    past = np.empty_like(mean)
    past[known] = mean[np.flatnonzero(known) - 1]
    if not known.all():
        past[~known], _ = _window_stats(padded, w, before[~known], spread=False)
    return past


def hour_of_cycle(ts: np.ndarray, cycles: tuple[int, ...]) -> np.ndarray:
    """Each reading's hour in the longest of ``cycles`` (0-23 for a day, 0-167 for a week; ``ts`` int64
    ns since the epoch, UTC)."""
    hours = np.asarray(ts, dtype=np.int64) // 3_600_000_000_000
    return (hours % (max(cycles) // 3600)).astype(np.intp)


def _profile(z: np.ndarray, buckets: np.ndarray, cycles: tuple[int, ...]) -> np.ndarray:
    """Median standardised reading per hour of the cycle and feature; an hour without readings gets
    the median of all (0 departure from the device's level)."""
    n = max(cycles) // 3600
    out = np.tile(np.median(z, axis=0) if len(z) else np.zeros(z.shape[1]), (n, 1))
    order = np.argsort(buckets, kind="stable")
    bounds = np.searchsorted(buckets[order], np.arange(n + 1))
    for b in range(n):
        if bounds[b + 1] > bounds[b]:
            out[b] = np.median(z[order[bounds[b]:bounds[b + 1]]], axis=0)
    return out


class SeasonalResidual:
    """Residuals of a seasonal naive forecast corrected by the recent level (module docstring)."""

    name = "residual"

    def __init__(self, window: int, period: int | None) -> None:
        self.window, self.period = int(window), period
        self.context = self.window + SEASONS * (period or 0)
        self.spread: np.ndarray | None = None
        self.robust = True

    def rows(self, key: Any, z: np.ndarray, start: int, ts: np.ndarray | None = None) -> np.ndarray:
        return self.rows_many([(key, z, start, ts)])

    def rows_many(self, segments: list[tuple[Any, np.ndarray, int, np.ndarray | None]]) -> np.ndarray:
        """The residuals of several devices' readings at once, stacked as ``WindowForest.rows_many``
        does (each segment behind ``context`` empty readings)."""
        w, p = self.window, self.period or 0
        if not getattr(self, "robust", False):  # pickled before the robust forecast
            return self._rows_mean(segments)
        padded, where = _stack(segments, self.context + 1)
        if p:
            seasonal = _seasonal(padded, p)
            level = _window_median(padded - seasonal, w, where - 1)
            forecast = seasonal[where] + level
        else:
            forecast = _window_median(padded, w, where - 1)
        return np.nan_to_num(padded[where] - forecast)  # too little context: residual 0

    def _rows_mean(self, segments: list[tuple[Any, np.ndarray, int, np.ndarray | None]]) -> np.ndarray:
        w, p = self.window, self.period or 0
        padded, where = _stack(segments, w + p + 1)
        if p:
            step = np.full_like(padded, np.nan)
            step[p:] = padded[p:] - padded[:-p]
            level, _ = _window_stats(step, w, where - 1, spread=False)
            forecast = padded[where - p] + level
        else:
            forecast, _ = _window_stats(padded, w, where - 1, spread=False)
        return np.nan_to_num(padded[where] - forecast)

    def fit(self, per_device: dict[Any, np.ndarray], seed: int, times: dict[Any, np.ndarray] | None = None
            ) -> np.ndarray:
        matrix = np.vstack([self.rows(k, z, 0) for k, z in per_device.items()])
        spread = robust_spread(matrix)
        self.spread = spread
        return matrix

    def covers(self, n: int) -> int:
        return n

    def score(self, matrix: np.ndarray) -> np.ndarray:
        assert self.spread is not None
        return np.abs(matrix / self.spread).max(axis=1) if len(matrix) else np.empty(0)


class Discord:
    """Left matrix-profile distance of the subsequence ending at each reading (module docstring)."""

    name = "discord"

    def __init__(self, window: int) -> None:
        self.window = int(window)
        self.context = REFERENCE + self.window - 1

    def rows(self, key: Any, z: np.ndarray, start: int, ts: np.ndarray | None = None) -> np.ndarray:
        m, n = self.window, len(z)
        out = np.zeros((n - start, z.shape[1]))
        first = max(start, m - 1)  # the first reading with a whole subsequence behind it
        if n - first <= 0:
            return out
        lo = max(0, first - m + 1 - REFERENCE)  # the history the first subsequence may match
        for j in range(z.shape[1]):
            profile = left_profile(z[lo:, j], m, first - m + 1 - lo)
            out[first - start:, j] = profile
        return out / math.sqrt(m)

    def fit(self, per_device: dict[Any, np.ndarray], seed: int, times: dict[Any, np.ndarray] | None = None
            ) -> np.ndarray:
        """Nothing to learn; the training rows are those of each device's last ``covers(n)`` readings
        (at most ``CALIBRATION``, each with at least ``min(REFERENCE, n // 2)`` readings before it:
        a subsequence with little history has few neighbours and looks unusual)."""
        return np.vstack([self.rows(k, z, len(z) - self.covers(len(z))) for k, z in per_device.items()])

    def covers(self, n: int) -> int:
        return max(0, min(CALIBRATION, n - min(REFERENCE, n // 2)))

    def score(self, matrix: np.ndarray) -> np.ndarray:
        return matrix.mean(axis=1) if len(matrix) else np.empty(0)


def left_profile(x: np.ndarray, m: int, first: int) -> np.ndarray:
    """For each length-``m`` subsequence of ``x`` starting at ``first`` or later: the z-normalised
    Euclidean distance to its nearest subsequence starting at most ``REFERENCE`` and more than
    ``ceil(m / 4)`` positions earlier (the left matrix profile over a bounded history); 0 when there
    is none (no history: nothing to call unusual). Flat subsequences follow stumpy's convention."""
    q, flat = _znormed(np.nan_to_num(np.asarray(x, dtype=float)), m)
    count = len(q)
    out = np.zeros(max(0, count - first))
    any_flat = bool(flat.any())
    for lo in range(first, count, BLOCK):
        hi = min(count, lo + BLOCK)
        c0 = max(0, lo - REFERENCE)
        allowed = _band(hi - lo, lo - c0, m)
        corr = q[lo:hi] @ q[c0:hi].T  # correlation x m: the nearest neighbour has the largest
        if any_flat:
            qf, rf = flat[lo:hi, None], flat[None, c0:hi]
            corr = np.where(qf & rf, float(m), np.where(qf | rf, m / 2.0, corr))  # distances 0, sqrt(m)
        best = np.max(corr, axis=1, where=allowed, initial=-np.inf)
        found = np.isfinite(best)
        out[lo - first:hi - first][found] = 2.0 * m * (1.0 - best[found] / m)
    return np.sqrt(np.clip(out, 0.0, None))


@functools.lru_cache(maxsize=8)
def _band(rows: int, before: int, m: int) -> np.ndarray:
    """Which candidates (``before`` earlier subsequences, then the block's own) each of ``rows``
    subsequences may match: more than ``ceil(m / 4)`` and at most ``REFERENCE`` positions earlier."""
    gap = np.arange(before, before + rows)[:, None] - np.arange(before + rows)[None, :]
    allowed = (gap > int(np.ceil(m / 4))) & (gap <= REFERENCE)
    allowed.setflags(write=False)
    return allowed


def _znormed(x: np.ndarray, m: int) -> tuple[np.ndarray, np.ndarray]:
    """Each length-``m`` subsequence z-normalised (a flat one all zeros), and which are flat."""
    windows = sliding_window_view(x, m)
    mean, std = windows.mean(axis=1, keepdims=True), windows.std(axis=1, keepdims=True)
    flat = std[:, 0] < 1e-8
    return np.where(flat[:, None], 0.0, (windows - mean) / np.where(flat[:, None], 1.0, std)), flat


def robust_spread(matrix: np.ndarray) -> np.ndarray:
    """IQR / 1.349 per column; the std (or 1) where that is 0."""
    if not len(matrix):
        return np.ones(matrix.shape[1])
    q75, q25 = np.percentile(matrix, [75, 25], axis=0)
    spread, std = (q75 - q25) / 1.349, matrix.std(axis=0)
    return np.where(spread > 1e-12, spread, np.where(std > 1e-12, std, 1.0))


def detect_period(per_device: dict[Any, np.ndarray], *, max_devices: int = 8) -> int | None:
    """The most common dominant period (in readings) of the first ``max_devices`` devices' first
    feature: the autocorrelation's highest peak after its first drop below zero, if it reaches
    ``PERIOD_MIN_ACF``; None when no device has one."""
    found = []
    for z in list(per_device.values())[:max_devices]:
        for j in range(z.shape[1]):
            x = z[:, j] - z[:, j].mean()
            n = len(x)
            if n < 12 or not np.any(x):
                continue
            spectrum = np.fft.rfft(x, 2 * n)
            acf = np.fft.irfft(spectrum * np.conj(spectrum))[:n]
            acf = acf / acf[0]
            below = np.flatnonzero(acf < 0)
            limit = min(n // 3, MAX_PERIOD)
            if not below.size or below[0] >= limit:
                continue
            lag = int(below[0] + np.argmax(acf[below[0]:limit]))
            if acf[lag] >= PERIOD_MIN_ACF:
                found.append(lag)
    if not found:
        return None
    values, counts = np.unique(found, return_counts=True)
    return int(values[np.argmax(counts)])


DAY, WEEK = 86_400, 7 * 86_400
"""The cycles (seconds) a window method may place a reading in."""


def cycles_for(span_seconds: float) -> tuple[int, ...]:
    """The cycles readings spanning ``span_seconds`` show at least twice: (), (DAY,) or (DAY, WEEK)."""
    return tuple(c for c in (DAY, WEEK) if span_seconds >= 2 * c)


def rows_many(method: Any, segments: list[tuple[Any, np.ndarray, int, np.ndarray | None]]) -> np.ndarray:
    """``method.rows`` of each ``(key, z, start, ts)`` segment, stacked (at once where the method can)."""
    if hasattr(method, "rows_many"):
        return method.rows_many(segments)
    return np.vstack([method.rows(*segment) for segment in segments])


def make(name: str, window: int, period: int | None, cycles: tuple[int, ...] = ()) -> Any:
    """A fresh method by name."""
    if name == "point":
        return PointForest()
    if name == "window":
        return WindowForest(window, cycles)
    if name == "residual":
        return SeasonalResidual(window, period)
    if name == "discord":
        return Discord(window)
    raise ValueError(name)
