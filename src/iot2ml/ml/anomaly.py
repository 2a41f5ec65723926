"""Anomaly detection on device readings: candidate methods chosen per training, river for streams.

How ``AnomalyTask.fit`` works:

- Each device's readings are standardised with that device's median and robust spread (IQR / 1.349),
  because pumps differ in their normal pressure and flow; a device unseen at fit time is standardised
  with its own readings in the frame to score (at least ``MIN_OWN_ROWS``), else with the fleet's.
- Candidates (``methods``, all of ``METHODS`` by default; see ``_anomaly_methods``): ``point``
  (IsolationForest over each reading: level anomalies), ``window`` (IsolationForest over rolling
  level, spread, departure, slope and difference of the last ``window`` readings: drifts, bursts),
  ``residual`` (residuals of a seasonal naive forecast with the recent level: a reading wrong for its
  time in the cycle) and ``discord`` (left matrix profile of the subsequence ending at the reading:
  shape anomalies). The ``window`` is the period the training readings show (autocorrelation peak,
  clipped to ``MIN_WINDOW``..``MAX_WINDOW``), else ``DEFAULT_WINDOW``. A method is a candidate only
  with the training history it needs (``_min_history``: ``window`` and ``discord`` need
  ``max(MIN_HISTORY, 5 * window)`` readings per device, ``residual`` five windows and two periods). Every
  score reads the reading and its past only; higher is more anomalous.
- Thresholds: each method's is calibrated on its training scores: with ``contamination`` their
  ``1 - contamination`` quantile (about that share is flagged); without it and with labels, the
  quantile (between the median and the 99.9th percentile) whose flags have the best event F1 against
  the training labels; with neither, the ``1 - DEFAULT_CONTAMINATION`` quantile. (The quantile at the
  label rate is a poor default: labelled episodes include their faint beginnings, which score like
  normal noise, so that threshold cuts into the noise and raises many short false alarms.)
- Choice (on up to ``SELECTION_DEVICES`` devices drawn with ``seed``): each candidate is fitted on
  the first part of each device's readings and scored on the last ``HOLDOUT`` (in time, after its
  device's earlier readings). With labels and a labelled event in that holdout: the best event F1
  there (``holdout_event_f1``); with labels only in the first part: their event F1
  (``training_event_f1``); without labels: anomalies of several kinds (spike, level shift, stuck
  sensor, noise burst, reversed stretch, wrong phase) are injected into copies of the held-out
  readings and each candidate gets the mean over the injected stretches of the share of the other
  held-out readings scoring below the stretch's top score (``injected_event_rank``: threshold-free,
  1 = every injected anomaly outranks every other reading). Injection rather than agreement between
  methods because agreement rewards the methods that see the same (level) anomalies and says
  nothing about shape or context ones; the real readings' own anomalies only lower every
  candidate's figure alike. A tie goes to the simpler method (``METHODS`` order). The chosen method,
  its window, the period, the criterion and each candidate's figure are ``TrainResult.params``.
- Evaluation: the chosen method fitted on the first part of every device and scored on the holdout,
  against the baseline, which flags a reading whose value is more than ``ZSCORE_LIMIT`` rolling
  standard deviations from the rolling mean of the previous ``ZSCORE_WINDOW`` readings of that
  device, on any feature (its score: the largest ``|z|``).
- With labels (boolean or 0/1; empty counts as normal): point precision/recall/F1 and event-level
  figures. An event is a contiguous run of true anomalies of one device, detected when any reading in
  it is flagged; event precision is the share of flagged runs that overlap a true event. The primary
  metric is ``event_f1``. An empty denominator gives 0. Without labels the only figure is the
  holdout's ``flagged_rate`` (lower is better). ``ucr_hit`` is the UCR archive's rule for a series
  with one anomaly (the top score within 100 readings of it).
- The returned model is the chosen method refit on all rows, its threshold calibrated by the same
  rule; it keeps each device's last ``context`` standardised readings (and their times) so that
  serving scores a single new reading in its context; a serving process adds what the devices sent
  since training before it answers, and each reading once however many channels see it
  (``AnomalyModel``).
- ``compare`` (for promotion) scores the holdout flags above and the champion's flags on the
  holdout readings newer than the champion's training data (at least ``min_holdout``, default 50).

``OnlineAnomalyScorer`` scores a stream one reading at a time (river's HalfSpaceTrees after MinMax
scaling, one model per device).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from iot2ml.core.errors import InvalidInput

from . import _anomaly_methods as _methods
from .base import (
    HOLDOUT_PREDICTIONS,
    NoFairHoldout,
    Records,
    TrainResult,
    arrow_floats,
    check_record,
    iso,
    newer_than,
    record_number,
    require_arrow_columns,
    too_few,
    utc,
)
from .base import require_columns as _missing

__all__ = ["AnomalyModel", "AnomalyTask", "OnlineAnomalyScorer", "ucr_hit"]

DEFAULT_CONTAMINATION = 0.01
"""Share of readings flagged when there are no labels to take the rate from."""
HOLDOUT = 0.3
"""Last share of each device's readings (in time) held out for evaluation."""
ZSCORE_WINDOW = 60
"""Readings in the baseline's rolling window."""
ZSCORE_LIMIT = 3.0
"""The baseline flags ``|z|`` above this on any feature."""
MIN_OWN_ROWS = 30
"""An unseen device needs this many readings in the scored frame to be standardised on its own."""
N_TREES = _methods.N_TREES
THRESHOLD_CANDIDATES = 200
"""Score quantiles tried when the threshold is tuned on labels."""
METHODS = ("point", "window", "residual", "discord")
"""Candidate methods, simplest first (a tie goes to the simpler)."""
DEFAULT_WINDOW = 30
"""Window (readings) when the training readings show no period."""
MIN_WINDOW, MAX_WINDOW = 8, 64
"""A detected period is clipped to this range to make the window (at most 64: a causal score peaks
within a window after a short event, and the UCR rule allows 100 readings)."""
INJECTION_ROUNDS, MIN_INJECTED = 5, 20
"""Without labels, copies of the held-out readings get injected anomalies until this many stretches
(at most that many copies, each starting the kinds at the next one)."""
MIN_HISTORY = 500
"""Training readings (median per device; and 5 windows) the window forest and the discord need to be
candidates: with fewer they have too few normal windows to learn from (``_min_history``)."""
RAMP_WINDOWS = 4
"""An injected ramp rises over this many windows (slower than the window sees at once)."""
SELECTION_DEVICES = 16
"""Devices (drawn with ``seed``) on which the candidates are compared."""


def _values(frame: pd.DataFrame, features: list[str]) -> np.ndarray:
    out = np.empty((len(frame), len(features)))
    for i, col in enumerate(features):
        series = frame[col]
        if not (pd.api.types.is_numeric_dtype(series)):
            raise InvalidInput(f"feature {col!r} is not numeric (dtype {series.dtype}): choose numeric features")
        out[:, i] = series.astype("Float64").to_numpy(dtype=float, na_value=np.nan)
    return out


def _robust(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Median and robust spread per column; a flat or empty column gets spread 1."""
    with np.errstate(all="ignore"):
        if np.isnan(values).all(axis=0).any():  # nanmedian warns on all-NaN columns
            values = np.where(np.isnan(values).all(axis=0), 0.0, values)
        center = np.nanmedian(values, axis=0)
        q75, q25 = np.nanpercentile(values, [75, 25], axis=0)
        scale = (q75 - q25) / 1.349
        std = np.nanstd(values, axis=0)
    scale = np.where(np.isfinite(scale) & (scale > 1e-12), scale, np.where(std > 1e-12, std, 1.0))
    return np.nan_to_num(center), scale


@dataclass
class _DeviceScaler:
    """Per-device robust standardisation, fitted on training readings."""

    stats: dict[Any, tuple[np.ndarray, np.ndarray]]
    fleet: tuple[np.ndarray, np.ndarray]

    @classmethod
    def fit(cls, keys: np.ndarray, values: np.ndarray) -> _DeviceScaler:
        stats = {key: _robust(values[idx]) for key, idx in _groups(keys).items()}
        return cls(stats=stats, fleet=_robust(values))

    def transform(self, keys: np.ndarray, values: np.ndarray) -> np.ndarray:
        out = np.empty_like(values)
        for key, idx in _groups(keys).items():
            if key in self.stats:
                center, scale = self.stats[key]
            elif len(idx) >= MIN_OWN_ROWS:
                center, scale = _robust(values[idx])
            else:
                center, scale = self.fleet
            out[idx] = (values[idx] - center) / scale
        return np.nan_to_num(out, nan=0.0, posinf=0.0, neginf=0.0)


def _groups(keys: np.ndarray) -> dict[Any, np.ndarray]:
    """Row positions per key, in order; missing keys (None, NaN) are one group (scaled like an unseen device)."""
    codes, uniques = pd.factorize(pd.Series(keys, dtype=object), use_na_sentinel=False)
    order = np.argsort(codes, kind="stable")
    bounds = np.searchsorted(codes[order], np.arange(len(uniques) + 1))
    return {uniques[k]: order[bounds[k]:bounds[k + 1]] for k in range(len(uniques))}


SEEN_AGAIN = 256
"""Newer readings after which a reading seen again on another channel still gets its whole context."""
NO_TS = np.iinfo(np.int64).min
"""A reading without a timestamp (always taken as new)."""


def _arrow_ts(table: Any) -> np.ndarray:
    """The ``ts`` column of an Arrow table as int64 ns since the epoch (``NO_TS`` for nulls)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    column = table.column("ts")
    if pa.types.is_timestamp(column.type):
        column = pc.cast(column, pa.timestamp("ns", tz=column.type.tz))
        return pc.fill_null(pc.cast(column, pa.int64()), NO_TS).to_numpy(zero_copy_only=False)
    if pa.types.is_integer(column.type) or pa.types.is_floating(column.type):  # epoch seconds
        seconds = pc.cast(column, pa.float64()).to_numpy(zero_copy_only=False)
        return np.where(np.isfinite(seconds), seconds * 1e9, NO_TS).astype(np.int64)
    return _record_ts([{"ts": v} for v in column.to_pylist()], field_name="ts")


def _frame_ts(frame: pd.DataFrame) -> np.ndarray:
    """A frame's ``ts`` column as int64 ns since the epoch (``NO_TS`` where missing)."""
    stamps = pd.to_datetime(frame["ts"], utc=True)
    return stamps.dt.as_unit("ns").astype("int64").where(stamps.notna(), NO_TS).to_numpy(dtype=np.int64)


def _record_ts(records: Records, *, field_name: str = "ts") -> np.ndarray:
    """Each record's ``ts`` (ISO 8601 text or epoch seconds) as int64 ns; ``NO_TS`` where absent.
    A value that is neither raises ``InvalidInput`` naming ``instances[i].ts``."""
    out = np.full(len(records), NO_TS, dtype=np.int64)
    for i, record in enumerate(records):
        value = record.get(field_name)
        if value is None:
            continue
        try:
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                out[i] = int(float(value) * 1e9)
            else:
                out[i] = utc(value).as_unit("ns").value
        except (TypeError, ValueError, OverflowError):
            raise InvalidInput(f"instances[{i}].{field_name} is {value!r}: send ISO 8601 text such as "
                               "2026-11-22T03:00:00Z or epoch seconds") from None
    return out


@dataclass
class AnomalyModel:
    """A fitted detector: ``predict`` gives ``<entity>``, ``ts``, ``score`` and ``is_anomaly`` per reading.

    ``method`` (``point``, ``window``, ``residual`` or ``discord``, see ``_anomaly_methods``) scores a
    reading from it and the ``context`` readings of its device before it. Every channel builds the
    matrix here: ``predict(frame)`` (batch: each device's rows in time order, after the device's last
    training readings), ``matrix_from_records`` (REST, MQTT: records in arrival order) and
    ``matrix_from_arrow`` (streaming: the rows of one commit), then ``predict_matrix`` and ``answers``.
    The online two keep, per device, the readings they scored (starting from the training tail, or
    from ``warm``: what the device type's lake table got since training, which a serving process
    reads when it loads the model), so a single new reading is scored in its context; a reading seen
    again (same ``ts``, e.g. asked over REST then streamed from the lake) gets the score it got the
    first time and is kept once (``_matrix``). A point model keeps nothing.
    Readings are standardised per device (a device unseen in training with its own readings in the
    same request when it has ``MIN_OWN_ROWS``, else with the fleet's).
    """

    entity: str
    features: list[str]
    scaler: _DeviceScaler
    method: Any
    threshold: float
    flagged_rate: float  # share of the training readings above the threshold
    tail: dict[Any, np.ndarray] = field(default_factory=dict, repr=False)
    """Each device's last ``context`` standardised training readings: batch scoring's context."""
    tail_ts: dict[Any, np.ndarray] = field(default_factory=dict, repr=False)
    """Their timestamps (int64 ns since the epoch)."""
    _recent: dict[Any, np.ndarray] = field(default_factory=dict, repr=False)
    _recent_ts: dict[Any, np.ndarray] = field(default_factory=dict, repr=False)
    _lock: Any = field(default_factory=threading.Lock, repr=False)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.pop("_lock", None)
        state["_recent"], state["_recent_ts"] = {}, {}  # a loaded model starts from the training tail
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        if "method" not in state:  # pickled before the window methods: a point-wise forest
            method = _methods.PointForest()
            method.forest = state.pop("forest")
            state = {**state, "method": method, "tail": {}}
        state = {"tail_ts": {}, **state, "_recent": {}, "_recent_ts": {}}
        self.__dict__.update(state)
        self._lock = threading.Lock()

    @property
    def name(self) -> str:
        """The method's name: ``point``, ``window``, ``residual`` or ``discord``."""
        return str(self.method.name)

    @property
    def kept(self) -> int:
        """Readings kept per device: the context and up to ``SEEN_AGAIN`` more (``_matrix``)."""
        return self.context + min(self.context, SEEN_AGAIN)

    @property
    def context(self) -> int:
        """Earlier readings of the device that one reading's score reads."""
        return int(self.method.context)

    def _takes(self) -> str:
        return f"{', '.join(self.features)} and {self.entity!r}"

    def describe_inputs(self) -> dict[str, Any]:
        """``task``, ``fields`` a record holds (the features and the entity), ``features``, ``entity``,
        ``method`` and ``context`` (readings per device the model keeps to score the next one)."""
        return {"task": "anomaly", "fields": [*self.features, self.entity], "features": list(self.features),
                "entity": self.entity, "method": self.name, "context": self.context}

    def _before(self, key: Any, n_features: int, *, remember: bool) -> tuple[np.ndarray, np.ndarray]:
        """A device's context: its kept recent readings (``remember``) or its training tail, with their
        timestamps (``NO_TS`` where unknown)."""
        z = self._recent.get(key) if remember else None
        ts = self._recent_ts.get(key) if remember else None
        if z is None:
            z, ts = self.tail.get(key), self.tail_ts.get(key)
        if z is None:
            return np.empty((0, n_features)), np.empty(0, dtype=np.int64)
        if ts is None or len(ts) != len(z):
            ts = np.full(len(z), NO_TS, dtype=np.int64)
        return z, ts

    def _matrix(self, keys: np.ndarray, z: np.ndarray, *, remember: bool, ts: np.ndarray | None = None
                ) -> np.ndarray:
        """Matrix rows of standardised readings ``z`` (each device's in time order), each after its
        device's context: the kept recent readings (``remember``: and keep the new ones) or the tail.

        ``ts`` (int64 ns, ``NO_TS`` where a reading has none): with ``remember``, a reading not newer
        than its device's newest kept one (the same reading seen again on another channel, or a late
        one) is scored after the kept readings older than it and not kept again, so a reading gets the
        same score on every channel and the context holds each reading once. Each device keeps
        ``kept`` readings (``context`` and up to ``SEEN_AGAIN`` more), so a reading seen again after
        that many newer ones still finds its whole context."""
        method, context = self.method, self.context
        if context == 0 or not len(z):
            return method.rows(None, z, 0)
        keep = self.kept
        now = time.time_ns()  # the time of a reading without one (a window method placing it in the day)
        segments, targets = [], []
        with self._lock:
            for key, idx in _groups(keys).items():
                before, before_ts = self._before(key, z.shape[1], remember=remember)
                if ts is None or not remember:
                    fresh = np.ones(len(idx), dtype=bool)
                    stamps = np.full(len(idx), NO_TS, dtype=np.int64) if ts is None else ts[idx]
                else:
                    stamps = ts[idx]
                    last = before_ts[-1] if len(before_ts) else NO_TS
                    newest = np.maximum.accumulate(np.r_[last, stamps])[:-1]
                    fresh = (stamps > newest) | (stamps == NO_TS)
                if fresh.any():
                    whole_ts = np.r_[before_ts[-context:], stamps[fresh]]
                    segments.append((key, np.vstack([before[-context:], z[idx[fresh]]]), len(before[-context:]),
                                     np.where(whole_ts == NO_TS, now, whole_ts)))
                    targets.append(idx[fresh])
                    if remember:
                        before = np.vstack([before, z[idx[fresh]]])[-keep:]
                        before_ts = np.r_[before_ts, stamps[fresh]][-keep:]
                        self._recent[key], self._recent_ts[key] = before, before_ts
                for i in np.flatnonzero(~fresh):  # seen before: scored in the context it had
                    at = int(np.searchsorted(before_ts, stamps[i], side="left"))
                    lo = max(0, at - context)
                    whole_ts = np.r_[before_ts[lo:at], stamps[i]]
                    segments.append((key, np.vstack([before[lo:at], z[idx[i]][None, :]]), at - lo,
                                     np.where(whole_ts == NO_TS, now, whole_ts)))
                    targets.append(idx[i:i + 1])
        rows = _methods.rows_many(method, segments)
        out = np.empty((len(z), rows.shape[1]))
        out[np.concatenate(targets)] = rows
        return out

    def warm(self, table: Any) -> int:
        """Take an Arrow table of recent readings (the entity, ``ts`` and the features; e.g. the newest
        of the device type's lake table) as each device's context, without scoring them: a serving
        process loading the model starts from what its devices sent since training, not from the
        training tail. Readings not newer than a device's kept ones are skipped. Returns how many
        readings were kept; 0 for a model without context."""
        if self.context == 0 or table.num_rows == 0:
            return 0
        require_arrow_columns(table, [*self.features, self.entity, "ts"], self._takes())
        keys = np.array(table.column(self.entity).to_pylist(), dtype=object)
        values = np.column_stack([arrow_floats(table, f) for f in self.features])
        stamps = _arrow_ts(table)
        order = np.lexsort((stamps, pd.factorize(keys)[0]))
        keys, values, stamps = keys[order], values[order], stamps[order]
        z = self.scaler.transform(keys, values)
        kept, keep = 0, self.kept
        with self._lock:
            for key, idx in _groups(keys).items():
                before, before_ts = self._before(key, z.shape[1], remember=True)
                last = before_ts[-1] if len(before_ts) else NO_TS
                new = idx[stamps[idx] > last]
                kept += min(len(new), keep)
                self._recent[key] = np.vstack([before, z[new]])[-keep:]
                self._recent_ts[key] = np.r_[before_ts, stamps[new]][-keep:]
        return kept

    def matrix_from_records(self, records: Records, *, ignore: Collection[str] = ()) -> np.ndarray:
        """The model rows of JSON records (in arrival order, each after its device's recent readings,
        which it then joins; a record's ``ts``, ISO 8601 or epoch seconds, tells a reading seen before,
        see ``_matrix``); ``ignore``: fields a record may carry that the model does not read.
        Errors name ``instances[i].field``."""
        accepted = {*self.features, self.entity, "ts"}
        required = [*self.features, self.entity]
        keys = np.empty(len(records), dtype=object)
        values = np.empty((len(records), len(self.features)))
        for i, record in enumerate(records):
            check_record(i, record, accepted, ignore, required, self._takes())
            keys[i] = record[self.entity]
            values[i] = [record_number(record[f], i, f) for f in self.features]
        stamps = _record_ts(records) if self.context else None
        return self._matrix(keys, self.scaler.transform(keys, values), remember=True, ts=stamps)

    def matrix_from_arrow(self, table: Any) -> np.ndarray:
        """The model rows of an Arrow table's rows (in order, as ``matrix_from_records``; columns it
        does not read are ignored)."""
        require_arrow_columns(table, [*self.features, self.entity], self._takes())
        keys = np.array(table.column(self.entity).to_pylist(), dtype=object)
        values = np.column_stack([arrow_floats(table, f) for f in self.features]) if table.num_rows \
            else np.empty((0, len(self.features)))
        stamps = _arrow_ts(table) if self.context and "ts" in table.column_names else None
        return self._matrix(keys, self.scaler.transform(keys, values), remember=True, ts=stamps)

    def matrix_from_frame(self, frame: pd.DataFrame) -> np.ndarray:
        """The model rows of a frame's rows (each device's in ``ts`` order after its training tail;
        nothing is kept)."""
        _missing(frame, [self.entity, *self.features], "anomaly input")
        keys = frame[self.entity].to_numpy()
        z = self.scaler.transform(keys, _values(frame, self.features))
        if self.context == 0 or "ts" not in frame.columns:
            return self._matrix(keys, z, remember=False)
        stamps = _frame_ts(frame)
        order = np.lexsort((stamps, pd.factorize(keys)[0]))
        out = self._matrix(keys[order], z[order], remember=False, ts=stamps[order])
        unsorted = np.empty_like(out)
        unsorted[order] = out
        return unsorted

    def reference_sample(self, frame: pd.DataFrame, max_rows: int) -> tuple[pd.DataFrame, list[dict[str, Any]]]:
        """Up to ``max_rows`` of the training ``frame``'s readings (each device's newest) and their
        answers, each scored after the device's readings before it as serving scores it: what drift
        checks compare served scores with. (A random sample scored alone would have no context.)"""
        data = frame[frame[self.entity].notna()].sort_values([self.entity, "ts"], kind="stable")
        keys = data[self.entity].to_numpy()
        groups = _groups(keys)
        per_device = max(1, -(-max_rows // max(1, len(groups))))
        z = self.scaler.transform(keys, _values(data, self.features))
        stamps = _frame_ts(data)
        segments, picked = [], []
        for key, idx in groups.items():
            take = min(per_device, len(idx))
            lo = max(0, len(idx) - take - self.context)
            segments.append((key, z[idx[lo:]], len(idx) - take - lo, stamps[idx[lo:]]))
            picked.append(idx[len(idx) - take:])
        rows = _methods.rows_many(self.method, segments)
        return data.iloc[np.concatenate(picked)], self.answers(self.predict_matrix(rows))

    def predict_matrix(self, matrix: np.ndarray) -> np.ndarray:
        """Anomaly score per row (higher = more anomalous)."""
        return self.method.score(matrix) if len(matrix) else np.empty(0)

    def answers(self, raw: np.ndarray) -> list[dict[str, Any]]:
        """``{"prediction": flagged, "score": score}`` per score."""
        raw = np.asarray(raw, dtype=float)
        return [{"prediction": flag, "score": score}
                for flag, score in zip((raw > self.threshold).tolist(), raw.tolist())]

    def predict_records(self, records: Records, *, ignore: Collection[str] = ()) -> list[dict[str, Any]]:
        """One answer per record: ``answers(predict_matrix(matrix_from_records(records)))``."""
        return self.answers(self.predict_matrix(self.matrix_from_records(records, ignore=ignore)))

    def score(self, frame: pd.DataFrame) -> np.ndarray:
        """Anomaly score per row (higher = more anomalous)."""
        return self.predict_matrix(self.matrix_from_frame(frame))

    def predict(self, frame: pd.DataFrame) -> pd.DataFrame:
        """One row per input row, same index and order."""
        _missing(frame, [self.entity, "ts", *self.features], "anomaly input")
        scores = self.score(frame)
        return pd.DataFrame({self.entity: frame[self.entity].to_numpy(), "ts": frame["ts"].to_numpy(),
                             "score": scores, "is_anomaly": scores > self.threshold}, index=frame.index)


@dataclass
class _Series:
    """Standardised readings sorted by device then time, with what selection needs."""

    keys: np.ndarray
    z: np.ndarray
    truth: np.ndarray | None
    groups: dict[Any, np.ndarray]  # row positions per device, in time order
    ts: np.ndarray  # int64 ns since the epoch

    def per_device(self, devices: list[Any], mask: np.ndarray | None = None) -> dict[Any, np.ndarray]:
        return {k: self.z[self._pick(k, mask)] for k in devices}

    def times(self, devices: list[Any], mask: np.ndarray | None = None) -> dict[Any, np.ndarray]:
        return {k: self.ts[self._pick(k, mask)] for k in devices}

    def _pick(self, key: Any, mask: np.ndarray | None) -> np.ndarray:
        idx = self.groups[key]
        return idx if mask is None else idx[mask[idx]]


@dataclass
class _Fitted:
    """One candidate fitted on some devices' readings: the method, its threshold and rule."""

    method: Any
    threshold: float
    rule: str
    flagged_rate: float


def _calibrate(scores: np.ndarray, truth: np.ndarray | None, keys: np.ndarray,
               contamination: float | None) -> tuple[float, str]:
    """The threshold (module docstring) and the rule that chose it."""
    if contamination is None and truth is not None and truth.any():
        return _best_threshold(scores, truth, keys), "best_event_f1"
    return float(np.quantile(scores, 1.0 - (contamination or DEFAULT_CONTAMINATION))), "quantile"


def _fit_method(name: str, series: _Series, devices: list[Any], mask: np.ndarray | None, *, window: int,
                period: int | None, contamination: float | None, seed: int, cycles: tuple[int, ...] = ()
                ) -> _Fitted:
    """Fit method ``name`` on ``devices``' readings (``mask``: only those rows) and calibrate its threshold
    on the training rows it scores (the discord method: each device's reference)."""
    method = _methods.make(name, window, period, cycles)
    per_device = series.per_device(devices, mask)
    scores = method.score(method.fit(per_device, seed, series.times(devices, mask)))
    covered = [series._pick(k, mask)[-method.covers(len(z)):] if len(z) else np.empty(0, int)
               for k, z in per_device.items()]
    rows = np.concatenate(covered) if covered else np.empty(0, int)
    truth = series.truth[rows] if series.truth is not None else None
    threshold, rule = _calibrate(scores, truth, series.keys[rows], contamination)
    return _Fitted(method, threshold, rule, float((scores > threshold).mean()) if len(scores) else 0.0)


def _score_after(fitted: _Fitted, series: _Series, devices: list[Any], train: np.ndarray,
                 z: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Scores of ``devices``' rows outside ``train`` (each after its device's training readings), and
    their positions. ``z``: readings to use instead of ``series.z`` (injected anomalies)."""
    z = series.z if z is None else z
    scores, where = [], []
    for key in devices:
        idx = series.groups[key]
        start = int(train[idx].sum())
        scores.append(fitted.method.score(fitted.method.rows(key, z[idx], start, series.ts[idx])))
        where.append(idx[start:])
    return np.concatenate(scores), np.concatenate(where)


def _inject(series: _Series, devices: list[Any], train: np.ndarray, *, window: int, period: int | None,
            seed: int, first_kind: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A copy of the standardised readings with anomalies injected into each device's held-out
    readings (one feature at a time, at least two stretches apart), and their labels. The kinds
    cycle: a spike (+6 robust sd, one reading), a level shift (+3 over ``window``), a ramp (a drift
    rising to +4 over ``RAMP_WINDOWS`` windows: a slow fault such as a blockage building), a stuck sensor
    (the value frozen over ``window``), a noise burst (deviations from the local mean x3 plus 1 sd
    of noise), a reversed stretch (the same values in reverse order: a change of shape within the
    normal range) and, with a period, a wrong-phase segment (the readings of half a period earlier).
    Stretches are ``window`` long, or a quarter of the held-out readings when that is shorter."""
    rng = np.random.default_rng(seed)
    z, labels = series.z.copy(), np.zeros(len(series.z), dtype=bool)
    kinds = ["spike", "shift", "ramp", "stuck", "noise", "reverse"] + (["phase"] if period else [])
    k = first_kind
    for key in devices:
        idx = series.groups[key]
        start, n = int(train[idx].sum()), len(idx)
        span = max(1, min(window, (n - start) // 4))
        gap = 2 * span
        position = start + span // 2 + int(rng.integers(0, max(1, span // 2)))
        while position + span < n:
            kind = kinds[k % len(kinds)]
            k += 1
            feature = int(rng.integers(0, z.shape[1]))
            length = 1 if kind == "spike" else RAMP_WINDOWS * span if kind == "ramp" else span
            rows = idx[position:position + length]
            col = z[rows, feature]
            if kind == "spike":
                z[rows, feature] = col + 6.0
            elif kind == "shift":
                z[rows, feature] = col + 3.0
            elif kind == "ramp":  # a slow drift up to +4 over several windows, as a blockage builds
                z[rows, feature] = col + np.linspace(4.0 / len(col), 4.0, len(col))
            elif kind == "stuck":
                z[rows, feature] = col[0]
            elif kind == "reverse":
                z[rows, feature] = col[::-1]
            elif kind == "noise":
                z[rows, feature] = col.mean() + 3.0 * (col - col.mean()) + rng.normal(0, 1.0, len(col))
            elif period and position - period // 2 >= 0:
                source = idx[position - period // 2:position - period // 2 + len(rows)]
                z[rows, feature] = z[source, feature]
            else:  # a phase too early in the device's readings to take half a period back: reversed
                z[rows, feature] = col[::-1]
            labels[rows] = True
            position += length + gap + int(rng.integers(0, gap))
    return z, labels


def _event_rank(scores: np.ndarray, labels: np.ndarray, keys: np.ndarray) -> float:
    """Mean over the labelled events of the share of unlabelled readings scoring below the event's
    highest score (1: every event outscores every other reading; threshold-free)."""
    runs = _runs(labels, keys)
    if runs.max(initial=-1) < 0 or labels.all():
        return 0.0
    tops = np.full(int(runs.max()) + 1, -np.inf)
    np.maximum.at(tops, runs[runs >= 0], scores[runs >= 0])
    clean = np.sort(scores[~labels])
    return float((np.searchsorted(clean, tops, side="left") / len(clean)).mean())


def _min_history(name: str, window: int, period: int | None) -> int:
    """Training readings per device (median) method ``name`` needs to be a candidate: the window
    forest and the discord ``max(MIN_HISTORY, 5 * window)`` (with fewer they have too few normal
    windows to learn from or to compare with), the seasonal residual five windows and two periods
    (its forecast reads one period back and its spread needs residuals), the point-wise model 10."""
    if name in ("window", "discord"):
        return max(MIN_HISTORY, 5 * window)
    if name == "residual":
        return max(5 * window, window + 2 * (period or 0))
    return 10


def _default_window(period: int | None) -> int:
    return int(np.clip(period, MIN_WINDOW, MAX_WINDOW)) if period else DEFAULT_WINDOW


def _select(series: _Series, holdout: np.ndarray, *, candidates: list[str], contamination: float | None,
            seed: int, cycles: tuple[int, ...] = ()) -> tuple[str, int, int | None, str, dict[str, float]]:
    """The chosen method, its window, the period, the criterion and every candidate's figure
    (module docstring), judged on up to ``SELECTION_DEVICES`` devices."""
    devices = list(series.groups)
    if len(devices) > SELECTION_DEVICES:
        pick = np.random.default_rng(seed).choice(len(devices), SELECTION_DEVICES, replace=False)
        devices = [devices[i] for i in sorted(pick)]
    train = ~holdout
    period = _methods.detect_period(series.per_device(devices, train))
    window = _default_window(period)
    history = float(np.median([int(train[series.groups[k]].sum()) for k in devices]))
    enough = [n for n in candidates if history >= _min_history(n, window, period)]
    candidates = enough or candidates[:1]
    rows = np.concatenate([series.groups[k] for k in devices])
    truth = series.truth
    if truth is not None and truth[rows][holdout[rows]].any():
        criterion, z, labels = "holdout_event_f1", None, truth
    elif truth is not None and truth[rows].any():
        criterion = "training_event_f1"
    else:
        criterion = "injected_event_rank"
        injected = []
        while len(injected) < INJECTION_ROUNDS and sum(int(_runs(lab, series.keys).max(initial=-1)) + 1
                                                       for _, lab in injected) < MIN_INJECTED:
            injected.append(_inject(series, devices, train, window=window, period=period,
                                    seed=seed + len(injected), first_kind=len(injected)))
    figures: dict[str, float] = {}
    for name in candidates:
        fitted = _fit_method(name, series, devices, train, window=window, period=period,
                             contamination=contamination, seed=seed, cycles=cycles)
        if criterion == "injected_event_rank":
            ranks = []
            for z, labels in injected:
                scores, where = _score_after(fitted, series, devices, train, z)
                ranks.append(_event_rank(scores, labels[where], series.keys[where]))
            figures[name] = float(np.mean(ranks))
            continue
        if criterion == "training_event_f1":
            scores, where = _score_after(fitted, series, devices, np.zeros_like(train))
        else:
            scores, where = _score_after(fitted, series, devices, train, z)
        truth_here = (labels if criterion != "training_event_f1" else truth)[where]
        figures[name] = evaluate_flags(scores > fitted.threshold, truth_here, series.keys[where])["event_f1"]
    best = max(candidates, key=lambda n: (figures[n], -candidates.index(n)))  # ties: the simpler
    return best, window, period, criterion, figures


def _best_threshold(scores: np.ndarray, truth: np.ndarray, keys: np.ndarray) -> float:
    """The score quantile (between the median and the 99.9th percentile) with the best event F1 on
    the labelled training readings; ties go to the higher threshold (fewer alarms)."""
    candidates = np.unique(np.quantile(scores, np.linspace(0.5, 0.999, THRESHOLD_CANDIDATES)))
    event_f1 = [evaluate_flags(scores > t, truth, keys)["event_f1"] for t in candidates]
    best = len(event_f1) - 1 - int(np.argmax(event_f1[::-1]))
    return float(candidates[best])


def zscore_scores(frame: pd.DataFrame, *, entity: str, features: list[str], window: int = ZSCORE_WINDOW
                  ) -> np.ndarray:
    """The baseline's score: the largest ``|z|`` over the features, ``z`` against the rolling mean and
    standard deviation of the previous ``window`` readings of the device (0 where undefined).
    ``frame`` must be sorted by device, then time."""
    keys = frame[entity].astype(object)
    values = pd.DataFrame(_values(frame, features), columns=features, index=frame.index)
    past = values.groupby(keys, sort=False).shift(1)
    rolling = past.groupby(keys, sort=False).rolling(window, min_periods=max(2, window // 2))
    mean = rolling.mean().reset_index(level=0, drop=True).reindex(frame.index)
    std = rolling.std().reset_index(level=0, drop=True).reindex(frame.index)
    with np.errstate(all="ignore"):
        z = ((values - mean) / std.where(std > 1e-12)).abs()
    return z.max(axis=1).fillna(0.0).to_numpy()


def zscore_flags(frame: pd.DataFrame, *, entity: str, features: list[str], window: int = ZSCORE_WINDOW,
                 limit: float = ZSCORE_LIMIT) -> np.ndarray:
    """The baseline: flag readings beyond ``limit`` rolling standard deviations of the previous
    ``window`` readings of their device, on any feature. ``frame`` must be sorted by device, then time."""
    return zscore_scores(frame, entity=entity, features=features, window=window) > limit


def ucr_hit(scores: np.ndarray, truth: np.ndarray, *, slack: int = 100) -> bool:
    """The UCR anomaly archive's rule for a series with one labelled anomaly: the top-scored reading
    lies within ``slack`` readings of the labelled stretch."""
    where = np.flatnonzero(np.asarray(truth, dtype=bool))
    if not where.size:
        raise InvalidInput("truth has no labelled anomaly: the UCR rule needs one")
    top = int(np.nanargmax(np.where(np.isfinite(scores), scores, -np.inf)))
    return bool(where[0] - slack <= top <= where[-1] + slack)


def _runs(mask: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """Run id per reading for contiguous True stretches within a device; -1 where ``mask`` is False."""
    new_device = np.r_[True, keys[1:] != keys[:-1]]
    starts = mask & (new_device | ~np.r_[False, mask[:-1]])
    ids = np.cumsum(starts) - 1
    return np.where(mask, ids, -1)


def _hit_share(runs: np.ndarray, other: np.ndarray) -> tuple[float, int]:
    """Share of the runs containing at least one ``other`` reading, and how many runs there are."""
    n = int(runs.max()) + 1 if runs.size and runs.max() >= 0 else 0
    if n == 0:
        return 0.0, 0
    hits = np.bincount(runs[runs >= 0], weights=other[runs >= 0].astype(float), minlength=n)
    return float((hits > 0).mean()), n


def _f1(precision: float, recall: float) -> float:
    return float(2 * precision * recall / (precision + recall)) if precision + recall > 0 else 0.0


def evaluate_flags(flags: np.ndarray, truth: np.ndarray | None, keys: np.ndarray) -> dict[str, float]:
    """Point and event figures of ``flags`` against ``truth`` (rows sorted by device, then time)."""
    flags = np.asarray(flags, dtype=bool)
    metrics = {"flagged_rate": float(flags.mean()) if flags.size else 0.0}
    if truth is None:
        return metrics
    truth = np.asarray(truth, dtype=bool)
    tp = int((flags & truth).sum())
    precision = tp / flags.sum() if flags.sum() else 0.0
    recall = tp / truth.sum() if truth.sum() else 0.0
    event_recall, events = _hit_share(_runs(truth, keys), flags)
    event_precision, flagged_runs = _hit_share(_runs(flags, keys), truth)
    return {**metrics, "precision": float(precision), "recall": float(recall), "f1": _f1(precision, recall),
            "event_precision": event_precision, "event_recall": event_recall,
            "event_f1": _f1(event_precision, event_recall), "events": float(events),
            "flagged_runs": float(flagged_runs)}


def _truth(series: pd.Series, label: str) -> np.ndarray:
    values = series.dropna()
    if pd.api.types.is_bool_dtype(values):
        return series.astype("boolean").fillna(False).to_numpy(dtype=bool)
    bad = values[~values.isin([0, 1])]
    if len(bad):
        raise InvalidInput(f"label {label!r} has the value {bad.iloc[0]!r}: use true/false or 1/0")
    return series.fillna(0).astype(float).to_numpy() > 0.5


class AnomalyTask:
    """Anomaly detection per reading in its device's context (see the module docstring for every choice)."""

    name = "anomaly"

    def __init__(self, *, features: list[str], label: str | None = None, contamination: float | None = None,
                 entity: str = "device_id", seed: int = 0, min_holdout: int = 50,
                 methods: Collection[str] = METHODS) -> None:
        if not features:
            raise InvalidInput("features is empty: name the numeric columns to watch, e.g. pressure,flow")
        if contamination is not None and not 0.0 < contamination < 0.5:
            raise InvalidInput(f"contamination={contamination}: use a share between 0 and 0.5, e.g. 0.01")
        if min_holdout < 1:
            raise InvalidInput(f"min_holdout={min_holdout}: the comparison with the champion needs 1 or more readings")
        self.features, self.label, self.contamination = list(features), label, contamination
        self.entity, self.seed, self.min_holdout = entity, seed, int(min_holdout)
        if isinstance(methods, str):
            methods = [m.strip() for m in methods.split(",") if m.strip()]
        unknown = [m for m in methods if m not in METHODS]
        if unknown or not methods:
            raise InvalidInput(f"methods={list(methods)!r}: choose among {', '.join(METHODS)}")
        self.methods = [m for m in METHODS if m in methods]

    def _holdout(self, frame: pd.DataFrame) -> tuple[pd.DataFrame, np.ndarray]:
        """Rows sorted by device and time, and the mask of each device's last ``HOLDOUT`` share."""
        data = frame[frame[self.entity].notna()].sort_values([self.entity, "ts"], kind="stable")
        position = data.groupby(self.entity, sort=False).cumcount().to_numpy()
        size = data.groupby(self.entity, sort=False)[self.entity].transform("size").to_numpy()
        return data, position >= np.ceil((1.0 - HOLDOUT) * size)

    def compare(self, champion: Any, frame: pd.DataFrame, result: TrainResult, since: pd.Timestamp | None
                ) -> dict[str, Any]:
        """``event_f1`` (with a label) or ``flagged_rate`` of the holdout model's flags and of
        ``champion``'s, on the holdout readings (each device's newest ``HOLDOUT``) newer than
        ``since``. Raises ``NoFairHoldout`` with fewer than ``min_holdout`` such readings or when the
        champion cannot score them."""
        since = newer_than(since)
        table = result.artifacts.get(HOLDOUT_PREDICTIONS)
        if not isinstance(table, pd.DataFrame):
            raise NoFairHoldout("this training kept no holdout flags to compare with")
        data, holdout = self._holdout(frame)
        test = data[holdout]
        if len(test) != len(table):
            raise NoFairHoldout(f"the holdout has {len(test)} readings, the training flagged {len(table)}: "
                                "compare on the frame the version was trained on")
        fresh = (pd.to_datetime(test["ts"], utc=True) > since).to_numpy()
        problem = too_few(int(fresh.sum()), "holdout readings", since, self.min_holdout)
        if problem is not None:
            raise problem
        if not isinstance(champion, AnomalyModel):
            raise NoFairHoldout(f"the champion is a {type(champion).__name__}, not an anomaly model: "
                                "compare them by hand")
        test = test[fresh]
        try:
            theirs = champion.predict(test)["is_anomaly"].to_numpy()
        except InvalidInput as err:
            raise NoFairHoldout(f"the champion cannot score the holdout: {err}") from None
        truth = _truth(test[self.label], self.label) if self.label else None
        keys = test[self.entity].to_numpy()
        metric = result.primary_metric
        mine = evaluate_flags(table["is_anomaly"].to_numpy()[fresh], truth, keys)[metric]
        return {"new": mine, "champion": evaluate_flags(theirs, truth, keys)[metric], "units": int(fresh.sum()),
                "holdout": f"{int(fresh.sum())} holdout readings (each device's newest {HOLDOUT:.0%}) "
                           f"after {iso(since)}"}

    def fit(self, frame: pd.DataFrame) -> TrainResult:
        needed = [self.entity, "ts", *self.features] + ([self.label] if self.label else [])
        _missing(frame, needed, "anomaly input")
        data, holdout = self._holdout(frame)
        if len(data) < 10:
            raise InvalidInput(f"{len(data)} readings with a {self.entity!r}: need at least 10 to fit")
        values = _values(data, self.features)  # rejects non-numeric features early
        keys = data[self.entity].to_numpy()
        if not holdout.any() or holdout.all():
            raise InvalidInput(f"cannot hold out the last {HOLDOUT:.0%} of each device: need more readings")
        truth = _truth(data[self.label], self.label) if self.label else None
        train = ~holdout
        groups = _groups(keys)

        stamps = _frame_ts(data)
        scaler = _DeviceScaler.fit(keys[train], values[train])
        series = _Series(keys, scaler.transform(keys, values), truth, groups, stamps)
        cycles = _methods.cycles_for(float(np.median([
            (stamps[idx][train[idx]].max() - stamps[idx][train[idx]].min()) / 1e9 for idx in groups.values()])))
        chosen, window, period, criterion, figures = _select(
            series, holdout, candidates=list(self.methods), contamination=self.contamination, seed=self.seed,
            cycles=cycles)
        cycles = cycles if chosen == "window" else ()
        devices = list(groups)
        trial = _fit_method(chosen, series, devices, train, window=window, period=period,
                            contamination=self.contamination, seed=self.seed, cycles=cycles)
        scores, where = _score_after(trial, series, devices, train)
        flags = np.zeros(len(data), dtype=bool)
        flags[where] = scores > trial.threshold
        flags = flags[holdout]
        test = data[holdout]
        base = zscore_flags(data, entity=self.entity, features=self.features)[holdout]
        test_truth = truth[holdout] if truth is not None else None
        metrics = evaluate_flags(flags, test_truth, keys[holdout])
        baseline = evaluate_flags(base, test_truth, keys[holdout])

        model = self._final(data, keys, values, truth, chosen, window, period, cycles)
        return TrainResult(
            model=model,
            task=self.name,
            metrics=metrics,
            baseline_metrics=baseline,
            primary_metric="event_f1" if truth is not None else "flagged_rate",
            greater_is_better=truth is not None,
            params={"method": chosen, "window": model.method.window, "period": period,
                    "cycles": ",".join({_methods.DAY: "day", _methods.WEEK: "week"}[c] for c in cycles) or None,
                    "selection": criterion,
                    **{f"selection_{name}": round(float(v), 4) for name, v in figures.items()},
                    "threshold_rule": model_rule(self.contamination, truth), "contamination": self.contamination,
                    "threshold": model.threshold, "training_flagged_rate": model.flagged_rate,
                    "holdout_threshold": trial.threshold, "n_estimators": N_TREES, "holdout": HOLDOUT,
                    "zscore_window": ZSCORE_WINDOW, "zscore_limit": ZSCORE_LIMIT, "entity": self.entity,
                    "label": self.label, "seed": self.seed, "rows": len(data), "devices": len(groups)},
            features=list(self.features),
            input_example=data[[self.entity, "ts", *self.features]].head(10).reset_index(drop=True),
            artifacts={"holdout_rows": int(holdout.sum()),
                       "holdout_label_rate": float(test_truth.mean()) if test_truth is not None else None,
                       HOLDOUT_PREDICTIONS: pd.DataFrame({self.entity: keys[holdout], "ts": test["ts"].to_numpy(),
                                                          "is_anomaly": flags})},
        )

    def _final(self, data: pd.DataFrame, keys: np.ndarray, values: np.ndarray, truth: np.ndarray | None,
               chosen: str, window: int, period: int | None, cycles: tuple[int, ...]) -> AnomalyModel:
        """The chosen method refit on every reading, its threshold calibrated by the same rule."""
        scaler = _DeviceScaler.fit(keys, values)
        groups = _groups(keys)
        stamps = _frame_ts(data)
        series = _Series(keys, scaler.transform(keys, values), truth, groups, stamps)
        fitted = _fit_method(chosen, series, list(groups), None, window=window, period=period,
                             contamination=self.contamination, seed=self.seed, cycles=cycles)
        context = fitted.method.context
        tail = {k: series.z[idx[-context:]].copy() for k, idx in groups.items()} if context else {}
        tail_ts = {k: stamps[idx[-context:]].copy() for k, idx in groups.items()} if context else {}
        return AnomalyModel(entity=self.entity, features=list(self.features), scaler=scaler, method=fitted.method,
                            threshold=fitted.threshold, flagged_rate=fitted.flagged_rate, tail=tail,
                            tail_ts=tail_ts)


def model_rule(contamination: float | None, truth: np.ndarray | None) -> str:
    """``quantile`` or ``best_event_f1``: how the final model's threshold is calibrated."""
    return "best_event_f1" if contamination is None and truth is not None and truth.any() else "quantile"


@dataclass
class OnlineAnomalyScorer:
    """Streaming scores, one reading at a time: river MinMax scaling then HalfSpaceTrees, one model
    per device (``x[entity]``; readings without it share one model). Scores lie in [0, 1], higher is
    more anomalous; they mean little until a device has sent ``window_size`` readings.

    >>> import random
    >>> rng = random.Random(0)
    >>> scorer = OnlineAnomalyScorer(["pressure", "flow"])
    >>> for _ in range(500):
    ...     scorer.learn_one({"device_id": "p1", "pressure": rng.gauss(5, 0.1), "flow": rng.gauss(50, 1)})
    >>> normal = scorer.score_one({"device_id": "p1", "pressure": 5.0, "flow": 50.0})
    >>> blocked = scorer.score_one({"device_id": "p1", "pressure": 6.5, "flow": 30.0})
    >>> blocked > normal
    True
    """

    features: list[str]
    entity: str = "device_id"
    n_trees: int = 25
    height: int = 8
    window_size: int = 250
    seed: int = 0
    _models: dict[Any, Any] = field(default_factory=dict, repr=False)

    def _model(self, x: dict[str, Any]) -> Any:
        key = x.get(self.entity)
        if key not in self._models:
            from river import anomaly, preprocessing

            self._models[key] = preprocessing.MinMaxScaler() | anomaly.HalfSpaceTrees(
                n_trees=self.n_trees, height=self.height, window_size=self.window_size, seed=self.seed)
        return self._models[key]

    def _x(self, x: dict[str, Any]) -> dict[str, float]:
        try:
            return {f: float(x[f]) for f in self.features}
        except KeyError as err:
            raise InvalidInput(f"reading has no feature {err.args[0]!r}: send every one of {self.features}") from None
        except (TypeError, ValueError) as err:
            raise InvalidInput(f"reading has a non-numeric feature value ({err}): send numbers") from None

    def learn_one(self, x: dict[str, Any]) -> None:
        self._model(x).learn_one(self._x(x))

    def score_one(self, x: dict[str, Any]) -> float:
        return float(self._model(x).score_one(self._x(x)))
