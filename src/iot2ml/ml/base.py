"""What every training task shares: the verbs ``fit`` and ``compare`` (models: ``predict``) and the result of a fit.

A task turns a pandas DataFrame read from the lake into a fitted model plus honest figures: its
metrics and its baseline's, both on the same held-out data. The registry (``ml/registry.py``) logs
those to MLflow and decides promotion; tasks never import MLflow.

Promotion needs a fair duel: each task's ``compare(champion, frame, result, since)`` scores the new
model and the champion on the same units of ``frame`` that are newer than ``since`` (the newest
reading the champion was trained on), or raises ``NoFairHoldout`` saying why it cannot.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import pandas as pd

from ..core.errors import Terminal


def require_columns(frame: pd.DataFrame, columns: list[str], what: str) -> None:
    """Raise ``InvalidInput`` naming the ``what`` columns missing from ``frame`` and those it has."""
    from ..core.errors import InvalidInput

    absent = [c for c in columns if c not in frame.columns]
    if absent:
        have = ", ".join(map(str, frame.columns[:20])) + (", ..." if len(frame.columns) > 20 else "")
        raise InvalidInput(f"{what} column(s) {', '.join(map(repr, absent))} missing from the frame "
                           f"(it has {have}): add them or choose other columns")


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
