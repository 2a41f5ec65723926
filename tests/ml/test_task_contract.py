"""Every registered task passes the task contract (``iot2ml.ml.checks``): fit against its baseline,
log to a real MLflow registry, load back, batch-score into the ``predictions`` schema, and answer
the same rows through the serving predictor with the batch predictions.

Tasks are discovered from ``iot2ml.ml.jobs.TASKS``; a registered task without an example below
fails here, so a new task cannot skip the contract."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pandas as pd
import pytest

from iot2ml.core.errors import InvalidInput
from iot2ml.ml.checks import TaskExample, check_task
from iot2ml.ml.jobs import TASKS, TrainJob, make_task, task_class
from iot2ml.ml.registry import Registry
from iot2ml.serve.predictors import predictor_for

WINE = ["alcohol", "volatile_acidity", "ph"]
PUMP = ["pressure", "flow"]


def wine(n: int, seed: int, *, start: str = "2026-11-01") -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    alcohol, acidity = rng.normal(10.5, 1.2, n), rng.normal(0.5, 0.15, n)
    score = alcohol - 4 * acidity + rng.normal(0, 0.3, n)
    return pd.DataFrame({
        "device_id": [f"station-{i % 3}" for i in range(n)],
        "ts": pd.date_range(start, periods=n, freq="min", tz="UTC"),
        "alcohol": alcohol, "volatile_acidity": acidity, "ph": rng.normal(3.3, 0.1, n),
        "colour": np.where(rng.random(n) < 0.5, "red", "white"),
        "quality": np.where(score > 9.6, "better", "good"), "score": score,
    })


def classify() -> TaskExample:
    frame = wine(160, 1)
    rows = wine(12, 2, start="2026-12-01")
    return TaskExample({"label": "quality", "features": [*WINE, "colour"], "folds": 3}, frame, rows,
                       rows[[*WINE, "colour"]].to_dict("records"))


def classify_per_entity() -> TaskExample:
    """Training batches have three readings each; the scored batches one (a record is one reading)."""
    frame = wine(180, 3)
    frame["batch_id"] = [f"b{i // 3:03d}" for i in range(len(frame))]
    frame["quality"] = frame.groupby("batch_id")["quality"].transform("first")
    rows = wine(10, 4, start="2026-12-01")
    rows["batch_id"] = [f"new-{i:02d}" for i in range(len(rows))]  # sorted: batch scoring orders by entity
    return TaskExample({"label": "quality", "entity": "batch_id", "features": WINE, "folds": 3}, frame, rows,
                       rows[["batch_id", *WINE]].to_dict("records"))


def regress() -> TaskExample:
    frame = wine(160, 5)
    rows = wine(12, 6, start="2026-12-01")
    return TaskExample({"label": "score", "features": [*WINE, "colour"], "folds": 3}, frame, rows,
                       rows[[*WINE, "colour"]].to_dict("records"))


def anomaly() -> TaskExample:
    rng = np.random.default_rng(7)
    parts = []
    for d in range(3):
        n = 240
        spike = np.zeros(n)
        spike[150 + 10 * d:165 + 10 * d] = 1.0
        parts.append(pd.DataFrame({
            "device_id": f"pump-{d}", "ts": pd.date_range("2026-01-01", periods=n, freq="min", tz="UTC"),
            "pressure": (4 + d) * (1 + 0.3 * spike + rng.normal(0, 0.02, n)),
            "flow": (50 + 10 * d) * (1 - 0.4 * spike + rng.normal(0, 0.02, n)), "blocked": spike > 0}))
    frame = pd.concat(parts, ignore_index=True)
    rows = frame.sample(20, random_state=1)
    return TaskExample({"features": PUMP, "label": "blocked"}, frame, rows,
                       rows[["device_id", *PUMP]].to_dict("records"))


def forecast() -> TaskExample:
    hours = 24 * 7
    rng = np.random.default_rng(8)
    t = np.arange(hours)
    frame = pd.concat([pd.DataFrame({
        "device_id": f"s{k}", "ts": pd.date_range("2026-10-01", periods=hours, freq="h", tz="UTC"),
        "ozone": 40 + 5 * k + 10 * np.sin(2 * np.pi * (t + 3 * k) / 24) + rng.normal(0, 0.5, hours)})
        for k in range(3)], ignore_index=True)
    s1 = frame[frame["device_id"] == "s1"]
    records = [{"device_id": "s0"},  # a known series: from its stored history
               {"device_id": "s1", "start": s1["ts"].iloc[0].isoformat(), "target": s1["ozone"].tolist()},
               {"device_id": "s2"}]
    return TaskExample({"target": "ozone", "horizon": 12, "folds": 2, "n_jobs": 1,
                        "candidates": "seasonal_naive,lightgbm"}, frame, frame, records)


EXAMPLES: dict[str, list[Callable[[], TaskExample]]] = {
    "forecast": [forecast],
    "classify": [classify, classify_per_entity],
    "regress": [regress],
    "anomaly": [anomaly],
}
CASES = [pytest.param(name, make, id=f"{name}-{make.__name__ if make else 'NO-EXAMPLE'}")
         for name in TASKS for make in EXAMPLES.get(name) or [None]]


def serving_answers(model: Any, task: str, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The records answered as the serving runtime does (validation, micro-batch, the model's feature API)."""
    predictor = predictor_for(model, task)
    return predictor.predict_many([predictor.prepare(records)])[0]


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Registry:
    root = tmp_path_factory.mktemp("contract")
    return Registry(f"sqlite:///{root / 'mlflow.db'}", artifact_root=str(root / "artifacts"))


@pytest.mark.parametrize(("task", "make"), CASES)
def test_every_registered_task_passes_the_contract(task: str, make: Callable[[], TaskExample] | None,
                                                   registry: Registry) -> None:
    assert make is not None, f"task {task!r} is in TASKS but has no example in EXAMPLES: add one"
    seen = check_task(task, make(), registry=registry, answer=serving_answers, model_name=f"c-{make.__name__}")
    assert seen["table"].num_rows == len(seen["answers"]) * (12 if task == "forecast" else 1)


def test_a_task_registered_in_tasks_is_made_by_name(monkeypatch: pytest.MonkeyPatch) -> None:
    class Echo:
        name = "echo"

        def __init__(self, *, label: str) -> None:
            self.label = label

    monkeypatch.setitem(TASKS, "echo", Echo)
    assert TrainJob(task="echo", table="t", name="m").task == "echo"
    assert make_task("echo", {"label": "y"}).label == "y"
    assert task_class("classify").__name__ == "ClassifyTask"  # "module:Class" entries load on first use
    with pytest.raises(InvalidInput, match="does not take"):
        make_task("echo", {"nope": 1})
    with pytest.raises(InvalidInput, match="use one of forecast, classify, regress, anomaly, echo"):
        TrainJob(task="ecco", table="t", name="m")
