"""Rollouts under load on the real serving runtime: canary rolled back when it raises or is slow,
promoted when it bakes clean; A/B sticky per device with figures per variant; shadow never answers."""

from __future__ import annotations

import time

import httpx
from servekit import instance, register_faulty
from test_rest import under_load


def _wait_action(served, action: str, timeout: float = 30.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for event in served.deployments.events("wine"):
            if event["action"] == action:
                return event
        time.sleep(0.1)
    raise AssertionError(f"no {action} event; events: {served.deployments.events('wine')[:5]}")


def test_a_canary_that_raises_is_rolled_back_and_no_request_fails(served):
    bad = register_faulty(served.bench, "wine", "raise")
    served.deploy("wine", version="1")
    served.wait_serving("wine", lambda d: True)

    def start_canary() -> None:
        served.deploy("wine", version=str(bad), canary=30, bake_seconds=60, rollback_on={"error_rate": 0.01})

    seen, failures = under_load(served, start_canary, seconds=4.0)
    assert failures == []  # the primary answered every request the canary failed
    event = _wait_action(served, "auto-rollback")
    assert f"canary v{bad} error_rate" in event["reason"] and event["who"] == "serve (canary judge)"
    spec = served.deployments.get("wine")
    assert spec.canary is None and spec.primary.ref == "1"
    assert set(seen) <= {(1, "primary")}


def test_a_slow_canary_is_rolled_back_on_latency(served):
    slow = register_faulty(served.bench, "wine", "slow:0.06")
    served.deploy("wine", version="1")
    served.wait_serving("wine", lambda d: True)

    def start_canary() -> None:
        served.deploy("wine", version=str(slow), canary=50, bake_seconds=60, rollback_on={"p99_ms": 40})

    seen, failures = under_load(served, start_canary, seconds=5.0)
    assert failures == []
    event = _wait_action(served, "auto-rollback")
    assert "p99_ms" in event["reason"]
    assert seen.get((slow, "canary"), 0) > 0  # it answered (slowly) until it was rolled back
    assert served.deployments.get("wine").canary is None


def test_a_healthy_canary_is_promoted_after_its_bake(served):
    served.deploy("wine", version="1")
    served.wait_serving("wine", lambda d: True)

    def start_canary() -> None:
        served.deploy("wine", version="2", canary=40, bake_seconds=2, rollback_on={"error_rate": 0.01})

    seen, failures = under_load(served, start_canary, seconds=4.0)
    assert failures == []
    event = _wait_action(served, "promote")
    assert "canary v2 baked 2 s" in event["reason"]
    spec = served.deployments.get("wine")
    assert spec.primary.ref == "2" and spec.canary is None
    assert seen.get((2, "canary"), 0) > 0 and seen.get((2, "primary"), 0) > 0


def test_ab_split_is_sticky_per_device_with_figures_per_variant(served):
    served.deploy("wine", ab="1:50,2:50")
    served.wait_serving("wine", lambda d: all(v["resolved_version"] for v in d["variants"]))
    url = f"{served.url}/api/v1/models/wine/predict"
    by_device: dict[str, set] = {}
    for device in range(40):
        for k in range(3):
            body = {"instances": [{**instance(device * 10 + k), "device_id": f"d{device}"}]}
            out = httpx.post(url, json=body, headers=served.headers).json()
            by_device.setdefault(f"d{device}", set()).add((out["version"], out["variant"]))
    assert all(len(v) == 1 for v in by_device.values()), by_device  # sticky
    counts = {}
    for (answer,) in by_device.values():
        counts[answer] = counts.get(answer, 0) + 1
    assert set(counts) == {(1, "ab-1"), (2, "ab-2")} and min(counts.values()) >= 8, counts
    status = httpx.get(f"{served.url}/api/v1/serving", headers=served.headers).json()
    stats = {(s["variant"], s["version"]): s for d in status["deployments"] for s in d["stats"]}
    assert stats[("ab-1", 1)]["requests_total"] + stats[("ab-2", 2)]["requests_total"] == 120
    assert stats[("ab-1", 1)]["last_2min"]["p99_ms"] is not None


def test_shadow_gets_every_request_but_never_answers(served):
    served.deploy("wine", version="1", shadow="2")
    served.wait_serving("wine", lambda d: len(d["variants"]) == 2)
    url = f"{served.url}/api/v1/models/wine/predict"
    answers = {(r["version"], r["variant"]) for r in (
        httpx.post(url, json={"instances": [instance(i)]}, headers=served.headers).json() for i in range(30))}
    assert answers == {(1, "primary")}
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        stats = {s["variant"]: s for s in served.app.state.runtime.stats.describe("wine")}
        if stats.get("shadow", {}).get("requests_total", 0) >= 30:
            break
        time.sleep(0.1)
    assert stats["shadow"]["version"] == 2 and stats["shadow"]["requests_total"] >= 30


def test_streamed_rows_routed_to_a_failing_canary_are_answered_by_the_primary(served):
    """The columnar path of streaming deployments: per-device routing, fallback, figures per variant."""
    import asyncio

    import pyarrow as pa

    from iot2ml.components import serving_runtime

    bad = register_faulty(served.bench, "wine", "raise")
    served.deploy("wine", version="1")
    served.deploy("wine", version=str(bad), canary=50, bake_seconds=600, rollback_on={"error_rate": 0.5})
    rows = [{**instance(i), "device_id": f"st-{i % 20}", "_seq": i} for i in range(200)]
    table = pa.Table.from_pylist(rows)

    async def main():
        runtime = serving_runtime(served.settings, served.catalog)
        await runtime.refresh()
        out = await runtime.predict_table("wine", table)
        return out, runtime.stats.describe("wine")

    out, stats = asyncio.run(main())
    assert set(out["variant"]) == {"primary"} and set(out["version"]) == {1}
    assert all(label in ("good", "better", "best") for label in out["label"])
    assert all(0.3 <= p <= 1.0 for p in out["prediction"])
    canary = [s for s in stats if s["variant"] == "canary"]
    assert canary and canary[0]["errors_total"] >= 1 and canary[0]["version"] == bad


def test_streamed_predictions_carry_the_models_entity(served):
    """A model trained per entity (a wine batch) writes that entity into the streamed predictions."""
    import asyncio

    import pyarrow as pa

    from iot2ml.components import serving_runtime
    from iot2ml.ml.classify import ClassifyTask
    from iot2ml.serve.mqtt import StreamScorer

    frame = served.bench.read("SELECT * FROM wine")
    frame["batch_id"] = [f"b{i}" for i in range(len(frame))]
    result = ClassifyTask(label="quality", entity="batch_id", features=["alcohol", "volatile_acidity", "ph"],
                          folds=3).fit(frame)
    version = served.bench.registry.log_training("wine-batch", result, data_versions={"wine": 0})["version"]
    served.deploy("wine-batch", version=str(version))
    rows = pa.Table.from_pylist([{**instance(i), "device_id": "st-1", "batch_id": f"new-{i}", "_seq": i}
                                 for i in range(5)])

    async def main():
        runtime = serving_runtime(served.settings, served.catalog)
        await runtime.refresh()
        out = await runtime.predict_table("wine-batch", rows)
        scorer = StreamScorer(runtime, None, "wine-batch", "wine")
        return out, scorer._entity(rows, out["version"]).to_pylist()

    out, entities = asyncio.run(main())
    assert entities == [f"new-{i}" for i in range(5)]
    assert all(label in ("good", "better", "best") for label in out["label"])
