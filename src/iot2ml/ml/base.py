"""What every training task shares: the verbs ``fit``, ``evaluate``, ``predict`` and the result of a fit.

A task turns a pandas DataFrame read from the lake into a fitted model plus honest figures: its
metrics and its baseline's, both on the same held-out data. The registry (``ml/registry.py``) logs
those to MLflow and decides promotion; tasks never import MLflow.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import pandas as pd


def require_columns(frame: pd.DataFrame, columns: list[str], what: str) -> None:
    """Raise ``InvalidInput`` naming the ``what`` columns missing from ``frame`` and those it has."""
    from ..core.errors import InvalidInput

    absent = [c for c in columns if c not in frame.columns]
    if absent:
        have = ", ".join(map(str, frame.columns[:20])) + (", ..." if len(frame.columns) > 20 else "")
        raise InvalidInput(f"{what} column(s) {', '.join(map(repr, absent))} missing from the frame "
                           f"(it has {have}): add them or choose other columns")


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
    artifacts: dict[str, Any] = field(default_factory=dict)  # JSON-able extras: confusion matrix, backtest table

    def beats_baseline(self) -> bool:
        mine, base = self.metrics[self.primary_metric], self.baseline_metrics[self.primary_metric]
        return mine > base if self.greater_is_better else mine < base


class Task(Protocol):
    """A training task. Options are set in the constructor (keyword-only)."""

    name: str

    def fit(self, frame: pd.DataFrame) -> TrainResult:
        """Train on ``frame`` (holding out what evaluation needs) and report metrics vs the baseline."""
        ...
