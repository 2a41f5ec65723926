"""What every training task shares: the verbs ``fit`` and ``compare`` (models: ``predict``) and the result of a fit.

A task turns a pandas DataFrame read from the lake into a fitted model plus honest figures: its
metrics and its baseline's, both on the same held-out data. The registry (``ml/registry.py``) logs
those to MLflow and decides promotion; tasks never import MLflow.

One feature path: a fitted model owns the code that turns input into its model matrix, and every
channel calls it. ``predict(frame)`` (training evaluation, batch scoring) and the online channels
(REST, MQTT request/reply, streaming deployments) go through the same methods: a ``RowModel``
(classify, regress, anomaly) builds its matrix from records (``matrix_from_records``), Arrow tables
(``matrix_from_arrow``) or frames, predicts it (``predict_matrix``) and words the answers
(``answers``); a ``SeriesModel`` (forecast) does the same with series. Serving validates the request
envelope and batches; it never rebuilds features. ``ml/checks.py`` holds the contract every task passes.

Promotion needs a fair duel: each task's ``compare(champion, frame, result, since)`` scores the new
model and the champion on the same units of ``frame`` that are newer than ``since`` (the newest
reading the champion was trained on), or raises ``NoFairHoldout`` saying why it cannot.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import pandas as pd

from ..core.errors import InvalidInput, Terminal

Records = Sequence[Mapping[str, Any]]
"""Input rows as JSON objects (a REST request's ``instances``, an MQTT request body)."""


def require_columns(frame: pd.DataFrame, columns: list[str], what: str) -> None:
    """Raise ``InvalidInput`` naming the ``what`` columns missing from ``frame`` and those it has."""
    absent = [c for c in columns if c not in frame.columns]
    if absent:
        have = ", ".join(map(str, frame.columns[:20])) + (", ..." if len(frame.columns) > 20 else "")
        raise InvalidInput(f"{what} column(s) {', '.join(map(repr, absent))} missing from the frame "
                           f"(it has {have}): add them or choose other columns")


def record_number(value: Any, i: int, name: str) -> float:
    """Field ``name`` of record ``i`` as a float (None is missing: NaN); else ``InvalidInput`` naming
    ``instances[i].name``."""
    if value is None:
        return math.nan
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidInput(f"instances[{i}].{name} must be a number, not {type(value).__name__} {str(value)[:40]!r}")
    return float(value)


def check_record(i: int, record: Mapping[str, Any], accepted: Collection[str], ignore: Collection[str],
                 required: Sequence[str], takes: str) -> None:
    """``InvalidInput`` naming ``instances[i]`` and the field when ``record`` has a field neither
    ``accepted`` nor ``ignore``d, or lacks one of ``required``; ``takes`` says what the model takes."""
    for key in record:
        if key not in accepted and key not in ignore:
            raise InvalidInput(f"instances[{i}] has unknown field {key!r}: the model takes {takes}")
    for key in required:
        if key not in record:
            raise InvalidInput(f"instances[{i}] lacks field {key!r}: the model takes {takes}")


def arrow_floats(table: Any, name: str) -> np.ndarray:
    """Column ``name`` of an Arrow table as float64 (nulls are NaN); ``InvalidInput`` if it is not numeric."""
    import pyarrow as pa
    import pyarrow.compute as pc

    column = table.column(name)
    if not (pa.types.is_floating(column.type) or pa.types.is_integer(column.type) or pa.types.is_null(column.type)):
        raise InvalidInput(f"column {name!r} is {column.type}, not numeric: the model reads it as a number")
    return pc.cast(column, pa.float64()).to_numpy(zero_copy_only=False).astype(float, copy=False)


def require_arrow_columns(table: Any, columns: Sequence[str], takes: str) -> None:
    """``InvalidInput`` naming the first of ``columns`` an Arrow table lacks."""
    names = set(table.column_names)
    for name in columns:
        if name not in names:
            raise InvalidInput(f"table lacks column {name!r}: the model takes {takes}")


class NoFairHoldout(Terminal):
    """The new version and the champion cannot be scored on data neither was trained on; says why."""


def utc(value: Any) -> pd.Timestamp:
    """``value`` (a timestamp or ISO 8601 text) as a UTC timestamp; naive values are taken as UTC."""
    stamp = pd.Timestamp(value)
    return stamp.tz_localize("UTC") if stamp.tzinfo is None else stamp.tz_convert("UTC")


def newer_than(since: Any) -> pd.Timestamp:
    """The champion's cutoff ``since`` in UTC; ``NoFairHoldout`` when the champion did not record it."""
    if since is None or pd.isna(since):
        raise NoFairHoldout("the champion did not record the newest reading it was trained on "
                            "(tag iot2ml.trained_until; versions trained before it existed lack it)")
    return utc(since)


def too_few(units: int, what: str, since: pd.Timestamp, min_holdout: int) -> NoFairHoldout | None:
    """The ``NoFairHoldout`` for a holdout of ``units`` (``what``: e.g. "labelled entities"), or None if enough."""
    if units == 0:
        return NoFairHoldout(f"no data newer than the champion's ({iso(since)}): no {what} after it")
    if units < min_holdout:
        return NoFairHoldout(f"only {units} {what} are newer than the champion's data ({iso(since)}), "
                             f"min_holdout is {min_holdout}: wait for more data or lower min_holdout")
    return None


def iso(ts: pd.Timestamp) -> str:
    """ISO 8601 in UTC, seconds precision: ``2026-11-01T04:59:00Z``."""
    return utc(ts).strftime("%Y-%m-%dT%H:%M:%SZ")


class FittedModel(Protocol):
    """A trained model. It must pickle (cloudpickle) and predict from a DataFrame of raw columns."""

    def predict(self, frame: pd.DataFrame) -> pd.DataFrame:
        """One output row per input row (or per series and future step for forecasts)."""
        ...


class RowModel(FittedModel, Protocol):
    """A model that answers one input row at a time (classify, regress, anomaly): the feature API that
    ``predict``, REST, MQTT and streaming share. ``predict_matrix`` runs stacked matrices of several
    requests in one call (micro-batching); row ``i`` of a matrix is answered by ``answers(...)[i]``."""

    def describe_inputs(self) -> dict[str, Any]:
        """What a record holds: ``task``, ``fields`` (every field the model reads), ``features`` and
        task-specific keys (``classes``, ``entity``, ...). JSON-able."""
        ...

    def matrix_from_records(self, records: Records, *, ignore: Collection[str] = ()) -> np.ndarray:
        """The model matrix of ``records``, one row each. A field neither read nor in ``ignore``, a
        missing one or a wrong type raises ``InvalidInput`` naming ``instances[i].field``."""
        ...

    def matrix_from_arrow(self, table: Any) -> np.ndarray:
        """The model matrix of an Arrow table's rows (each row one record; other columns ignored)."""
        ...

    def predict_matrix(self, matrix: np.ndarray) -> np.ndarray:
        """The model's raw output per matrix row (probabilities, values or scores)."""
        ...

    def answers(self, raw: np.ndarray) -> list[dict[str, Any]]:
        """One JSON-able answer per row of ``predict_matrix``'s output: ``{"prediction": ..., ...}``."""
        ...


class SeriesModel(FittedModel, Protocol):
    """A model that answers series (forecast): each record is one series' recent points or its id."""

    def describe_inputs(self) -> dict[str, Any]:
        ...

    def series_from_records(self, records: Records, *, ignore: Collection[str] = ()) -> list[tuple[Any, pd.Series]]:
        """``(series id, points)`` per record, in order; ``InvalidInput`` naming ``instances[i].field``."""
        ...

    def forecast(self, series: list[tuple[Any, pd.Series]]) -> list[pd.DataFrame]:
        """One forecast frame per ``(series id, points)``, in order (an id may repeat)."""
        ...

    def answers(self, forecasts: list[pd.DataFrame], *, quantiles: Sequence[float] | None = None,
                output_types: Sequence[str] = ("mean", "quantiles")) -> list[dict[str, Any]]:
        """One JSON-able answer per forecast frame."""
        ...


HOLDOUT_PREDICTIONS = "holdout_predictions"
"""``TrainResult.artifacts`` key of the held-out predictions (a DataFrame, not logged) by which the
task's ``compare`` scores the new model against the champion."""


@dataclass
class TrainResult:
    """Outcome of ``Task.fit``: the model, what it scored, what its baseline scored on the same holdout."""

    model: FittedModel
    task: str  # "forecast", "classify", "regress", "anomaly"
    metrics: dict[str, float]
    baseline_metrics: dict[str, float]
    primary_metric: str  # e.g. "mase", "macro_f1", "f1"
    greater_is_better: bool
    params: dict[str, Any] = field(default_factory=dict)
    features: list[str] = field(default_factory=list)
    input_example: pd.DataFrame | None = None
    artifacts: dict[str, Any] = field(default_factory=dict)  # JSON-able extras; DataFrames stay unlogged

    def beats_baseline(self) -> bool:
        mine, base = self.metrics[self.primary_metric], self.baseline_metrics[self.primary_metric]
        return mine > base if self.greater_is_better else mine < base


class Task(Protocol):
    """A training task. Options are set in the constructor (keyword-only)."""

    name: str

    def fit(self, frame: pd.DataFrame) -> TrainResult:
        """Train on ``frame`` (holding out what evaluation needs) and report metrics vs the baseline."""
        ...

    def compare(self, champion: Any, frame: pd.DataFrame, result: TrainResult, since: pd.Timestamp | None
                ) -> dict[str, Any]:
        """``{"new", "champion", "units", "holdout"}``: both models' primary metric on the units of
        ``frame`` newer than ``since``, the new one from predictions of a model that did not train on
        them. Raises ``NoFairHoldout`` when that holdout is too small or the champion cannot score it."""
        ...
