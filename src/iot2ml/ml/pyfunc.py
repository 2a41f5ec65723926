"""The MLflow pyfunc wrapper around a task's fitted model (imports MLflow: load lazily)."""

from __future__ import annotations

from typing import Any

import mlflow.pyfunc


class TaskModel(mlflow.pyfunc.PythonModel):
    """Serves ``model.predict(frame)``; the task name travels with it."""

    def __init__(self, model: Any, task: str) -> None:
        self.model = model
        self.task = task

    def predict(self, context, model_input, params=None):  # noqa: ANN001, ANN201, ARG002 - no hints: MLflow reads them
        return self.model.predict(utc_aware(model_input))


def utc_aware(frame: Any) -> Any:
    """MLflow signatures carry naive datetimes; our models read them as UTC."""
    import pandas as pd

    if not isinstance(frame, pd.DataFrame):
        return frame
    naive = [c for c in frame.columns if pd.api.types.is_datetime64_dtype(frame[c]) and
             getattr(frame[c].dt, "tz", None) is None]
    if not naive:
        return frame
    frame = frame.copy()
    for c in naive:
        frame[c] = frame[c].dt.tz_localize("UTC")
    return frame


def utc_naive(frame: Any) -> Any:
    """Drop the (UTC) time zone of datetime columns, as MLflow signatures want them."""
    import pandas as pd

    if not isinstance(frame, pd.DataFrame):
        return frame
    aware = [c for c in frame.columns if isinstance(frame[c].dtype, pd.DatetimeTZDtype)]
    if not aware:
        return frame
    frame = frame.copy()
    for c in aware:
        frame[c] = frame[c].dt.tz_convert("UTC").dt.tz_localize(None)
    return frame
