"""Serving keeps a bounded sample of what each model received and answered in ``model_inputs``, for drift:
REST requests of a real server and streamed Arrow rows alike, with the entity of per-entity models."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx
import orjson
import pyarrow as pa
import pyarrow.compute as pc
from servekit import FEATURES, Served, instance, wine_frame, write

from iot2ml.core.tables import MODEL_INPUTS
from iot2ml.ml.jobs import TrainJob


def captured(lake: Any, model: str, source: str, *, expect: int | None = None, timeout: float = 20.0) -> list[dict]:
    """The ``model_inputs`` rows of ``model`` from ``source`` (waiting for ``expect`` of them: flushed every second)."""
    deadline = time.monotonic() + timeout
    while True:
        rows = []
        if lake.schema(MODEL_INPUTS) is not None:
            lake.forget(MODEL_INPUTS)
            rows = lake.dataset(MODEL_INPUTS).to_table(
                filter=(pc.field("model") == model) & (pc.field("source") == source)).to_pylist()
        if expect is None or len(rows) >= expect or time.monotonic() > deadline:
            return rows
        time.sleep(0.2)


def test_rest_answers_leave_their_inputs_and_answers_bounded_per_second(served: Served) -> None:
    served.deploy("wine")
    served.wait_serving("wine", lambda item: item["variants"][0]["resolved_version"] == 1)
    body = {"instances": [{**instance(i), "device_id": f"station-{i}"} for i in range(3)]}
    r = httpx.post(f"{served.url}/api/v1/models/wine/predict", json=body, headers=served.headers, timeout=60)
    assert r.status_code == 200, r.text
    answers = r.json()["predictions"]
    rows = captured(served.bench.lake, "wine", "rest", expect=3)
    assert len(rows) == 3
    rows.sort(key=lambda row: row["request_id"])
    for i, row in enumerate(rows):
        assert row["version"] == 1 and row["variant"] == "primary" and row["entity"] is None
        assert row["device_id"] == f"station-{i}" and row["request_id"].endswith(f"/{i}")
        assert orjson.loads(row["inputs"]) == instance(i)  # the model's fields; device_id has its own column
        assert orjson.loads(row["prediction"]) == answers[i]

    # One request of 1,500 instances in one second: capture_max_per_second (1,000) of them are kept.
    # (In a later wall-clock second than the 3 above, which would otherwise share the 1,000.)
    time.sleep(1.02 - time.time() % 1)
    big = {"instances": [instance(i) for i in range(1500)]}
    r = httpx.post(f"{served.url}/api/v1/models/wine/predict", json=big, headers=served.headers, timeout=60)
    assert r.status_code == 200 and len(r.json()["predictions"]) == 1500
    runtime = served.app.state.runtime
    assert runtime.capture.capped >= 500
    time.sleep(2.5)  # two flushes
    rows = captured(served.bench.lake, "wine", "rest")
    assert len(rows) == 3 + 1000


def test_the_entity_of_a_per_entity_model_is_captured(served: Served) -> None:
    frame = wine_frame(300, seed=4)
    frame["batch_id"] = [f"b{i // 5}" for i in range(len(frame))]  # 60 batches, 20 of each quality
    frame["quality"] = [("good", "better", "best")[(i // 5) % 3] for i in range(len(frame))]
    write(served.bench.lake, "wine_batches", frame, 1)
    served.bench.train(TrainJob(task="classify", table="wine_batches", name="wine-batch",
                                options={"label": "quality", "entity": "batch_id", "features": list(FEATURES),
                                         "folds": 3}))
    served.deploy("wine-batch")
    served.wait_serving("wine-batch", lambda item: item["variants"][0]["resolved_version"] == 1)
    body = {"instances": [{**instance(1), "batch_id": "b7"}]}
    r = httpx.post(f"{served.url}/api/v1/models/wine-batch/predict", json=body, headers=served.headers, timeout=60)
    assert r.status_code == 200, r.text
    (row,) = captured(served.bench.lake, "wine-batch", "rest", expect=1)
    assert row["entity"] == "b7" and orjson.loads(row["inputs"]) == {**instance(1), "batch_id": "b7"}
    # Training logged the profile of the raw reading fields, not of the aggregated matrix.
    from iot2ml.wiring import ModelOps

    profile = ModelOps(served.settings, served.catalog).reference_profile("wine-batch", 1)
    assert profile is not None and sorted(profile.columns) == sorted([*FEATURES, "prediction"])


def streamed(n: int) -> pa.Table:
    frame = wine_frame(n, seed=6).drop(columns=["quality"])
    frame["_seq"] = range(1, n + 1)
    return pa.Table.from_pandas(frame, preserve_index=False)


def test_streamed_rows_are_captured_capped_and_sampled(served: Served) -> None:
    from iot2ml.components import serving_runtime

    served.deploy("wine")
    table = streamed(2500)

    async def score(settings: Any, source: str, rows: pa.Table) -> tuple[dict[str, Any], Any]:
        runtime = serving_runtime(settings, served.catalog)
        await runtime.start()
        try:
            return await runtime.predict_table("wine", rows, source=source), runtime.capture
        finally:
            await runtime.stop()  # flushes

    out, capture = asyncio.run(score(served.settings, "stream-all", table))
    rows = captured(served.bench.lake, "wine", "stream-all")
    assert len(rows) == 1000 and capture.capped == 1500 and capture.written == 1000
    by_seq = {int(r["request_id"].rsplit(":", 1)[1]): r for r in rows}
    frame = table.to_pandas()
    for seq, row in list(by_seq.items())[:50]:
        k = seq - 1
        assert orjson.loads(row["inputs"]) == pytest_approx_dict(frame.loc[k, list(FEATURES)].to_dict())
        assert orjson.loads(row["prediction"]) == out["answers"][k]
        assert row["device_id"] == frame.loc[k, "device_id"] and row["version"] == 1

    half = served.settings.model_copy(update={"capture_sample": 0.5})
    _, capture = asyncio.run(score(half, "stream-half", table.slice(0, 800)))
    n = len(captured(served.bench.lake, "wine", "stream-half"))
    assert 300 <= n <= 500 and capture.capped == 0


def pytest_approx_dict(values: dict[str, Any]) -> Any:
    import pytest

    return pytest.approx({k: float(v) for k, v in values.items()})


def test_capture_off_keeps_nothing(served: Served) -> None:
    from iot2ml.components import serving_runtime

    served.deploy("wine")
    off = served.settings.model_copy(update={"capture_sample": 0.0})

    async def score() -> Any:
        runtime = serving_runtime(off, served.catalog)
        await runtime.start()
        try:
            await runtime.predict("wine", [instance(3)], source="rest-off")
            await runtime.predict_table("wine", streamed(10), source="stream-off")
        finally:
            await runtime.stop()
        return runtime.capture

    capture = asyncio.run(score())
    assert capture.written == 0
    assert captured(served.bench.lake, "wine", "rest-off") == [] == captured(served.bench.lake, "wine", "stream-off")
