"""The contract every training task passes (river's ``checks``): call ``check_task`` from a test.

A task registered in ``ml.jobs.TASKS`` gets it for free: ``tests/ml/test_task_contract.py`` runs
``check_task`` over every registered task with a small example frame, and fails for a registered
task it has no example for. One run goes through the whole life of a model:

1. ``fit`` on the example frame: a ``TrainResult`` of that task whose ``metrics`` and
   ``baseline_metrics`` hold the same figures (finite numbers), ``primary_metric`` among them;
2. logged to a real MLflow registry (``Registry.log_training``), registered, the first version champion;
3. loaded back (the task's own model and the MLflow pyfunc): both predict what the fitted model does;
4. batch scoring (``jobs.score``) of the example rows: a table of the ``predictions`` schema, one
   row per answer, every prediction a number;
5. the same rows asked as online records (``answer``: by default the model's own
   ``predict_records``; a test passes the serving layer's predictor, which ``ml`` may not import):
   the ``predictions`` columns of those answers (``jobs.prediction_columns``) equal the batch ones
   to ``TOLERANCE``. Training, batch scoring and serving thus share one feature path.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import orjson
import pandas as pd

from ..core.tables import PREDICTIONS_SCHEMA
from .base import TrainResult
from .jobs import entity_column, make_task, prediction_columns, score, trained_until

__all__ = ["TOLERANCE", "Answer", "TaskExample", "check_result", "check_same_answers", "check_task"]

TOLERANCE = 1e-9
"""Largest difference between two channels' predictions, scores or probabilities."""

Answer = Callable[[Any, str, list[dict[str, Any]]], list[dict[str, Any]]]
"""``answer(model, task, records)``: one answer per record from an online channel (e.g. a serving predictor)."""


@dataclass
class TaskExample:
    """What the contract runs a task on: its options, a frame to fit, rows to score and the same
    rows as online records (``records[i]`` asks for row ``i`` of ``score(rows)``; a forecast record
    asks for one series, answered by ``horizon`` rows)."""

    options: dict[str, Any]
    frame: pd.DataFrame
    rows: pd.DataFrame
    records: list[dict[str, Any]]


def _own_answers(model: Any, task: str, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return model.predict_records(records)


def check_task(task_name: str, example: TaskExample, *, registry: Any, answer: Answer | None = None,
               model_name: str | None = None) -> dict[str, Any]:
    """Run task ``task_name`` (from ``TASKS``) through the contract (module docstring); raise
    ``AssertionError`` saying what broke it. Returns what it saw: ``result``, ``described``,
    ``model``, ``table`` and ``answers``."""
    name = model_name or f"contract-{task_name}"
    task = make_task(task_name, dict(example.options))
    assert task.name == task_name, f"make_task({task_name!r}) made a task named {task.name!r}"
    result = task.fit(example.frame)
    check_result(result, task_name)

    described = registry.log_training(
        name, result, data_versions={"example": 0}, trained_until=trained_until(example.frame),
        compare=lambda champion, since: task.compare(champion, example.frame, result, since))
    assert described["task"] == task_name, f"the registry says task {described['task']!r}, not {task_name!r}"
    assert result.primary_metric in described["metrics"], f"{result.primary_metric} was not logged"
    assert result.primary_metric in described["baseline_metrics"], f"baseline {result.primary_metric} was not logged"
    assert "champion" in described["aliases"], f"the first version is not champion: {described['aliases']}"
    version = int(described["version"])

    model = registry.load(name, str(version), unwrap=True)
    assert type(model) is type(result.model), f"loaded a {type(model).__name__}, fitted a {type(result.model).__name__}"
    fitted_out = result.model.predict(example.rows)
    _same_frames(model.predict(example.rows), fitted_out, "the loaded model")
    from .pyfunc import utc_naive  # MLflow: imported only when the check runs

    pyfunc = registry.load(name, str(version))  # MLflow signatures take naive (UTC) datetimes
    _same_frames(pyfunc.predict(utc_naive(example.rows)), fitted_out, "the MLflow pyfunc")

    table = score(name, model=model, version=version, task=task_name, frame=example.rows,
                  entity=entity_column(model))
    assert table.schema.equals(PREDICTIONS_SCHEMA), f"score() gave schema\n{table.schema}\nnot\n{PREDICTIONS_SCHEMA}"
    assert table.num_rows > 0, "score() gave no rows for the example rows"
    assert set(table.column("task").to_pylist()) == {task_name}
    assert set(table.column("model").to_pylist()) == {name}
    assert set(table.column("version").to_pylist()) == {version}
    assert all(isinstance(v, float) and math.isfinite(v) for v in table.column("prediction").to_pylist()), \
        "score() wrote a missing or non-finite prediction"

    answers = (answer or _own_answers)(model, task_name, list(example.records))
    assert len(answers) == len(example.records), f"{len(answers)} answers to {len(example.records)} records"
    batch = {k: table.column(k).to_pylist() for k in ("prediction", "label", "scores")}
    check_same_answers(task_name, answers, batch)
    return {"result": result, "described": described, "model": model, "table": table, "answers": answers}


def check_result(result: TrainResult, task_name: str) -> None:
    """``result`` is a ``TrainResult`` of ``task_name`` whose model and baseline were scored by the
    same figures, finite numbers, ``primary_metric`` among them."""
    assert isinstance(result, TrainResult), f"fit returned a {type(result).__name__}, not a TrainResult"
    assert result.task == task_name, f"TrainResult.task is {result.task!r}, not {task_name!r}"
    assert callable(getattr(result.model, "predict", None)), "the fitted model has no predict(frame)"
    assert result.primary_metric in result.metrics, f"{result.primary_metric!r} not in metrics {sorted(result.metrics)}"
    assert set(result.metrics) == set(result.baseline_metrics), (
        f"model and baseline scored by different figures: {sorted(result.metrics)} vs {sorted(result.baseline_metrics)}")
    for which, figures in (("metrics", result.metrics), ("baseline_metrics", result.baseline_metrics)):
        bad = {k: v for k, v in figures.items() if not isinstance(v, (int, float)) or not math.isfinite(v)}
        assert not bad, f"{which} has values that are not finite numbers: {bad}"
    assert isinstance(result.greater_is_better, bool)
    assert isinstance(result.beats_baseline(), bool)


def check_same_answers(task_name: str, answers: Sequence[dict[str, Any]], batch: dict[str, list[Any]]) -> None:
    """The ``predictions`` columns of online ``answers`` equal ``batch``'s (``prediction``, ``label``,
    ``scores`` as ``score`` wrote them) to ``TOLERANCE``."""
    online = prediction_columns(task_name, list(answers))
    assert len(online["prediction"]) == len(batch["prediction"]), (
        f"{len(online['prediction'])} online rows, {len(batch['prediction'])} batch rows")
    for i, (a, b) in enumerate(zip(online["prediction"], batch["prediction"])):
        assert _close(a, b), f"row {i}: online prediction {a!r}, batch {b!r}"
    assert list(online["label"]) == list(batch["label"]), f"labels differ: {online['label']} vs {batch['label']}"
    for i, (a, b) in enumerate(zip(online["scores"], batch["scores"])):
        if a is None or b is None:
            assert a is None and b is None, f"row {i}: online scores {a!r}, batch {b!r}"
            continue
        mine, theirs = orjson.loads(a), orjson.loads(b)
        assert mine.keys() == theirs.keys() and all(_close(mine[k], theirs[k]) for k in mine), (
            f"row {i}: online scores {a}, batch {b}")


def _close(a: Any, b: Any) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return abs(float(a) - float(b)) <= TOLERANCE


def _same_frames(got: Any, want: pd.DataFrame, what: str) -> None:
    assert isinstance(got, pd.DataFrame), f"{what} predicted a {type(got).__name__}, not a DataFrame"
    assert list(got.columns) == list(want.columns), f"{what} predicted columns {list(got.columns)}, not {list(want.columns)}"
    for col in want.columns:
        a, b = got[col].reset_index(drop=True), want[col].reset_index(drop=True)
        if pd.api.types.is_float_dtype(b):
            assert ((a - b).abs().fillna(0) <= TOLERANCE).all() and (a.isna() == b.isna()).all(), (
                f"{what} predicted other {col!r}: {a.head(3).tolist()} vs {b.head(3).tolist()}")
        else:
            assert a.astype(str).tolist() == b.astype(str).tolist(), (
                f"{what} predicted other {col!r}: {a.head(3).tolist()} vs {b.head(3).tolist()}")
