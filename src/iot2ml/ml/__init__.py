"""Training tasks (forecast, classify/regress, anomaly), evaluation against baselines, MLflow registry.

Names load on first use: importing ``iot2ml.ml`` does not pull in LightGBM, statsforecast or MLflow.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_WHERE = {
    "TrainResult": ".base",
    "ForecastTask": ".forecast",
    "ClassifyTask": ".classify",
    "RegressTask": ".classify",
    "AnomalyTask": ".anomaly",
    "OnlineAnomalyScorer": ".anomaly",
    "Registry": ".registry",
    "TrainJob": ".jobs",
}
__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(name)
    return getattr(import_module(_WHERE[name], __name__), name)
