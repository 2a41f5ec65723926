"""The MLflow pyfunc wrapper around a task's fitted model (imports MLflow: load lazily)."""

from __future__ import annotations

from typing import Any

import mlflow.pyfunc


class TaskModel(mlflow.pyfunc.PythonModel):
    """Serves ``model.predict(frame)``; the task name travels with it."""

    def __init__(self, model: Any, task: str) -> None:
        self.model = model
        self.task = task

    def predict(self, context: Any, model_input: Any, params: dict[str, Any] | None = None) -> Any:  # noqa: ARG002
        return self.model.predict(model_input)
