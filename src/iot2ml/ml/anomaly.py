"""Anomaly detection on device readings: IsolationForest with a calibrated threshold, river for streams.

How ``AnomalyTask.fit`` works:

- Each device's readings are standardised with that device's median and robust spread (IQR / 1.349),
  because pumps differ in their normal pressure and flow; a device unseen at fit time is standardised
  with its own readings in the frame to score (at least ``MIN_OWN_ROWS``), else with the fleet's.
- An IsolationForest scores every reading (``score`` = minus sklearn's ``score_samples``: higher is
  more anomalous). The threshold is calibrated on the training readings: with ``contamination`` it
  is their ``1 - contamination`` score quantile (about that share is flagged); without it and with
  labels, the quantile (between the median and the 99.9th percentile) whose flags have the best
  event F1 against the training labels; with neither, the ``1 - DEFAULT_CONTAMINATION`` quantile.
  (The quantile at the label rate is a poor default: labelled episodes include their faint
  beginnings, which score like normal noise, so that threshold cuts into the noise and raises many
  short false alarms.)
- Evaluation holds out the last ``HOLDOUT`` of each device's readings in time; scaling, forest and
  threshold are fitted on the first part only. The baseline flags a reading whose value is more than
  ``ZSCORE_LIMIT`` rolling standard deviations from the rolling mean of the previous
  ``ZSCORE_WINDOW`` readings of that device, on any feature.
- With labels (boolean or 0/1; empty counts as normal): point precision/recall/F1 and event-level
  figures. An event is a contiguous run of true anomalies of one device, detected when any reading in
  it is flagged; event precision is the share of flagged runs that overlap a true event. The primary
  metric is ``event_f1``. An empty denominator gives 0. Without labels the only figure is the
  holdout's ``flagged_rate`` (lower is better).
- The returned model is refit on all rows, its threshold calibrated by the same rule.
- ``compare`` (for promotion) scores the holdout flags above and the champion's flags on the
  holdout readings newer than the champion's training data (at least ``min_holdout``, default 50).

``OnlineAnomalyScorer`` scores a stream one reading at a time (river's HalfSpaceTrees after MinMax
scaling, one model per device).
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from sklearn.ensemble import IsolationForest

from iot2ml.core.errors import InvalidInput

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
)
from .base import require_columns as _missing

__all__ = ["AnomalyModel", "AnomalyTask", "OnlineAnomalyScorer"]

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
N_TREES = 200
THRESHOLD_CANDIDATES = 200
"""Score quantiles tried when the threshold is tuned on labels."""




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


@dataclass
class AnomalyModel:
    """A fitted detector: ``predict`` gives ``<entity>``, ``ts``, ``score`` and ``is_anomaly`` per reading.

    Every channel builds the matrix here (the readings standardised per device, see the module
    docstring): ``predict(frame)``, ``matrix_from_records`` (REST, MQTT; a device unseen in training
    is standardised with its own readings in the same request when it has ``MIN_OWN_ROWS``, else
    with the fleet's) and ``matrix_from_arrow`` (streaming: the rows of one commit), then
    ``predict_matrix`` (the scores) and ``answers``.
    """

    entity: str
    features: list[str]
    scaler: _DeviceScaler
    forest: IsolationForest
    threshold: float
    flagged_rate: float  # share of the training readings above the threshold

    def _takes(self) -> str:
        return f"{', '.join(self.features)} and {self.entity!r}"

    def describe_inputs(self) -> dict[str, Any]:
        """``task``, ``fields`` a record holds (the features and the entity), ``features``, ``entity``."""
        return {"task": "anomaly", "fields": [*self.features, self.entity], "features": list(self.features),
                "entity": self.entity}

    def matrix_from_records(self, records: Records, *, ignore: Collection[str] = ()) -> np.ndarray:
        """The standardised readings of JSON records, one row each; ``ignore``: fields a record may
        carry that the model does not read. Errors name ``instances[i].field``."""
        accepted = {*self.features, self.entity}
        required = [*self.features, self.entity]
        keys = np.empty(len(records), dtype=object)
        values = np.empty((len(records), len(self.features)))
        for i, record in enumerate(records):
            check_record(i, record, accepted, ignore, required, self._takes())
            keys[i] = record[self.entity]
            values[i] = [record_number(record[f], i, f) for f in self.features]
        return self.scaler.transform(keys, values)

    def matrix_from_arrow(self, table: Any) -> np.ndarray:
        """The standardised readings of an Arrow table's rows (columns it does not read are ignored)."""
        require_arrow_columns(table, [*self.features, self.entity], self._takes())
        keys = np.array(table.column(self.entity).to_pylist(), dtype=object)
        values = np.column_stack([arrow_floats(table, f) for f in self.features]) if table.num_rows \
            else np.empty((0, len(self.features)))
        return self.scaler.transform(keys, values)

    def matrix_from_frame(self, frame: pd.DataFrame) -> np.ndarray:
        """The standardised readings of a frame's rows."""
        _missing(frame, [self.entity, *self.features], "anomaly input")
        return self.scaler.transform(frame[self.entity].to_numpy(), _values(frame, self.features))

    def predict_matrix(self, matrix: np.ndarray) -> np.ndarray:
        """Anomaly score per row (higher = more anomalous)."""
        return -self.forest.score_samples(matrix) if len(matrix) else np.empty(0)

    def answers(self, raw: np.ndarray) -> list[dict[str, Any]]:
        """``{"prediction": flagged, "score": score}`` per score."""
        threshold = self.threshold
        return [{"prediction": bool(s > threshold), "score": float(s)} for s in raw]

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


def _fit_model(frame: pd.DataFrame, entity: str, features: list[str], *, contamination: float | None,
               truth: np.ndarray | None, seed: int) -> AnomalyModel:
    """Fit scaling, forest and threshold on ``frame`` (sorted by device, then time)."""
    keys, values = frame[entity].to_numpy(), _values(frame, features)
    scaler = _DeviceScaler.fit(keys, values)
    forest = IsolationForest(n_estimators=N_TREES, max_samples=min(256, len(frame)), random_state=seed, n_jobs=1)
    z = scaler.transform(keys, values)
    forest.fit(z)
    scores = -forest.score_samples(z)
    if contamination is None and truth is not None and truth.any():
        threshold = _best_threshold(scores, truth, keys)
    else:
        threshold = float(np.quantile(scores, 1.0 - (contamination or DEFAULT_CONTAMINATION)))
    return AnomalyModel(entity=entity, features=features, scaler=scaler, forest=forest, threshold=threshold,
                        flagged_rate=float((scores > threshold).mean()))


def _best_threshold(scores: np.ndarray, truth: np.ndarray, keys: np.ndarray) -> float:
    """The score quantile (between the median and the 99.9th percentile) with the best event F1 on
    the labelled training readings; ties go to the higher threshold (fewer alarms)."""
    candidates = np.unique(np.quantile(scores, np.linspace(0.5, 0.999, THRESHOLD_CANDIDATES)))
    event_f1 = [evaluate_flags(scores > t, truth, keys)["event_f1"] for t in candidates]
    best = len(event_f1) - 1 - int(np.argmax(event_f1[::-1]))
    return float(candidates[best])


def zscore_flags(frame: pd.DataFrame, *, entity: str, features: list[str], window: int = ZSCORE_WINDOW,
                 limit: float = ZSCORE_LIMIT) -> np.ndarray:
    """The baseline: flag readings beyond ``limit`` rolling standard deviations of the previous
    ``window`` readings of their device, on any feature. ``frame`` must be sorted by device, then time."""
    keys = frame[entity].astype(object)
    values = pd.DataFrame(_values(frame, features), columns=features, index=frame.index)
    past = values.groupby(keys, sort=False).shift(1)
    rolling = past.groupby(keys, sort=False).rolling(window, min_periods=max(2, window // 2))
    mean = rolling.mean().reset_index(level=0, drop=True).reindex(frame.index)
    std = rolling.std().reset_index(level=0, drop=True).reindex(frame.index)
    with np.errstate(all="ignore"):
        z = ((values - mean) / std.where(std > 1e-12)).abs()
    return (z > limit).any(axis=1).to_numpy()


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
    """Unsupervised anomaly detection per reading (see the module docstring for every choice)."""

    name = "anomaly"

    def __init__(self, *, features: list[str], label: str | None = None, contamination: float | None = None,
                 entity: str = "device_id", seed: int = 0, min_holdout: int = 50) -> None:
        if not features:
            raise InvalidInput("features is empty: name the numeric columns to watch, e.g. pressure,flow")
        if contamination is not None and not 0.0 < contamination < 0.5:
            raise InvalidInput(f"contamination={contamination}: use a share between 0 and 0.5, e.g. 0.01")
        if min_holdout < 1:
            raise InvalidInput(f"min_holdout={min_holdout}: the comparison with the champion needs 1 or more readings")
        self.features, self.label, self.contamination = list(features), label, contamination
        self.entity, self.seed, self.min_holdout = entity, seed, int(min_holdout)

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
        _values(data, self.features)  # rejects non-numeric features early
        keys = data[self.entity].to_numpy()
        if not holdout.any() or holdout.all():
            raise InvalidInput(f"cannot hold out the last {HOLDOUT:.0%} of each device: need more readings")
        truth = _truth(data[self.label], self.label) if self.label else None

        rule = ("quantile" if self.contamination is not None or truth is None or not truth[~holdout].any()
                else "best_event_f1")
        trial = _fit_model(data[~holdout], self.entity, self.features, contamination=self.contamination,
                           truth=truth[~holdout] if truth is not None else None, seed=self.seed)
        test = data[holdout]
        flags = trial.predict(test)["is_anomaly"].to_numpy()
        base = zscore_flags(data, entity=self.entity, features=self.features)[holdout]
        test_truth = truth[holdout] if truth is not None else None
        metrics = evaluate_flags(flags, test_truth, keys[holdout])
        baseline = evaluate_flags(base, test_truth, keys[holdout])

        model = _fit_model(data, self.entity, self.features, contamination=self.contamination, truth=truth,
                           seed=self.seed)
        return TrainResult(
            model=model,
            task=self.name,
            metrics=metrics,
            baseline_metrics=baseline,
            primary_metric="event_f1" if truth is not None else "flagged_rate",
            greater_is_better=truth is not None,
            params={"threshold_rule": rule, "contamination": self.contamination, "threshold": model.threshold,
                    "training_flagged_rate": model.flagged_rate,
                    "holdout_threshold": trial.threshold, "n_estimators": N_TREES, "holdout": HOLDOUT,
                    "zscore_window": ZSCORE_WINDOW, "zscore_limit": ZSCORE_LIMIT, "entity": self.entity,
                    "label": self.label, "seed": self.seed, "rows": len(data),
                    "devices": int(pd.Series(keys).nunique())},
            features=list(self.features),
            input_example=data[[self.entity, "ts", *self.features]].head(10).reset_index(drop=True),
            artifacts={"holdout_rows": int(holdout.sum()),
                       "holdout_label_rate": float(test_truth.mean()) if test_truth is not None else None,
                       HOLDOUT_PREDICTIONS: pd.DataFrame({self.entity: keys[holdout], "ts": test["ts"].to_numpy(),
                                                          "is_anomaly": flags})},
        )


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
