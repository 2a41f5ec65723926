"""REST predictions from the serving runtime on a real port: answers, bad input, the prediction log,
a new champion picked up without restart, blue/green switch and rollback under load."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest
from servekit import instance, run

from iot2ml.auth.store import Devices
from iot2ml.query import run_query


def test_predict_answers_with_the_champion_and_logs_it(served):
    served.deploy("wine")
    served.wait_serving("wine", lambda d: d["variants"][0]["resolved_version"] == 1)
    body = {"instances": [instance(1), {**instance(2), "device_id": "station-1"}], "request_id": "r-1"}
    r = httpx.post(f"{served.url}/api/v1/models/wine/predict", json=body, headers=served.headers)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["model"] == "wine" and out["version"] == 1 and out["variant"] == "primary"
    assert out["request_id"] == "r-1" and len(out["predictions"]) == 2
    first = out["predictions"][0]
    assert first["prediction"] in ("good", "better", "best")
    assert set(first["probabilities"]) == {"good", "better", "best"}
    assert abs(sum(first["probabilities"].values()) - 1.0) < 1e-3
    # The answer is the registered model's own: the same as the MLflow pyfunc on the same row.
    import pandas as pd

    model = served.bench.registry.load("wine", "1", unwrap=True)
    expected = model.predict(pd.DataFrame([instance(1)]))["prediction"].iloc[0]
    assert first["prediction"] == expected

    deadline = time.monotonic() + 10
    rows = []
    while time.monotonic() < deadline and len(rows) < 2:
        try:
            rows = run_query(served.bench.lake, "SELECT request_id, model, version, variant, latency_ms, "
                             "inputs_hash, prediction, ok, device_id FROM prediction_log "
                             "WHERE request_id LIKE 'r-1%' ORDER BY request_id").rows
        except Exception:  # noqa: BLE001 - the table appears with the first flush
            rows = []
        time.sleep(0.2)
    assert [r[0] for r in rows] == ["r-1/0", "r-1/1"]
    assert all(r[1] == "wine" and r[2] == 1 and r[3] == "primary" and r[4] > 0 and r[7] for r in rows)
    assert rows[0][5] != rows[1][5] and len(rows[0][5]) == 24  # a hash per instance
    assert rows[1][8] == "station-1" and '"prediction"' in rows[0][6]


@pytest.mark.parametrize(("body", "status", "needle"), [
    ({"instances": [{"alcohol": 10.0, "ph": 3.3}]}, 422, "volatile_acidity"),
    ({"instances": [{**instance(), "colour": "red"}]}, 422, "colour"),
    ({"instances": [{**instance(), "ph": "acid"}]}, 422, "instances[0].ph"),
    ({"instances": [{**instance(), "ph": True}]}, 422, "instances[0].ph"),
    ({"instances": []}, 422, "empty"),
    ({"instances": [1, 2]}, 422, "instances[0]"),
    ({"instances": {"alcohol": 1}}, 422, "list"),
    ({"rows": [instance()]}, 422, "rows"),
    ([instance()], 400, "object"),
])
def test_bad_input_is_a_4xx_naming_the_field(served, body, status, needle):
    served.deploy("wine")
    served.wait_serving("wine", lambda d: True)
    r = httpx.post(f"{served.url}/api/v1/models/wine/predict", json=body, headers=served.headers)
    assert r.status_code == status, r.text
    assert needle in r.json()["detail"]


def test_auth_size_and_unknown_model(served):
    served.deploy("wine")
    served.wait_serving("wine", lambda d: True)
    url = f"{served.url}/api/v1/models/wine/predict"
    assert httpx.post(url, json={"instances": [instance()]}).status_code == 401
    assert httpx.post(url, json={"instances": [instance()]},
                      headers={"Authorization": "Bearer nope"}).status_code == 401
    big = {"instances": [instance()] * 5000}
    r = httpx.post(url, json=big, headers=served.headers)
    assert r.status_code == 413 and "max_payload_bytes" in r.json()["detail"]
    r = httpx.post(url, content=b"{not json", headers=served.headers)
    assert r.status_code == 400 and "JSON" in r.json()["detail"]
    r = httpx.post(f"{served.url}/api/v1/models/nope/predict", json={"instances": [instance()]}, headers=served.headers)
    assert r.status_code == 404 and "iot2ml deploy nope" in r.json()["detail"]


def test_a_new_champion_answers_without_restart(served):
    served.deploy("wine")
    served.wait_serving("wine", lambda d: d["variants"][0]["resolved_version"] == 1)
    served.bench.registry.client.set_registered_model_alias("wine", "champion", "2")
    served.wait_serving("wine", lambda d: d["variants"][0]["resolved_version"] == 2)
    r = httpx.post(f"{served.url}/api/v1/models/wine/predict", json={"instances": [instance()]},
                   headers=served.headers)
    assert r.json()["version"] == 2


async def _load(url: str, headers: dict, stop: asyncio.Event, seen: dict, failures: list, clients: int = 8) -> None:
    async with httpx.AsyncClient(timeout=30) as client:
        async def one(k: int) -> None:
            i = 0
            while not stop.is_set():
                i += 1
                try:
                    r = await client.post(url, json={"instances": [instance(k * 100_000 + i)]}, headers=headers)
                except httpx.HTTPError as err:
                    failures.append(repr(err))
                    continue
                if r.status_code != 200:
                    failures.append(f"{r.status_code} {r.text[:200]}")
                    continue
                out = r.json()
                seen[(out["version"], out["variant"])] = seen.get((out["version"], out["variant"]), 0) + 1

        await asyncio.gather(*(one(k) for k in range(clients)))


def under_load(served, action, seconds: float = 6.0) -> tuple[dict, list]:
    """Run ``action()`` (in a thread) while 8 clients send requests; returns answers seen and failures."""
    seen: dict = {}
    failures: list = []

    async def main() -> None:
        stop = asyncio.Event()
        load = asyncio.create_task(_load(f"{served.url}/api/v1/models/wine/predict", served.headers, stop, seen,
                                         failures))
        await asyncio.sleep(0.5)
        await asyncio.to_thread(action)
        await asyncio.sleep(seconds)
        stop.set()
        await load

    run(main())
    return seen, failures


def test_blue_green_switch_and_rollback_under_load_fail_no_request(served):
    served.deploy("wine", version="1")
    served.wait_serving("wine", lambda d: d["variants"][0]["resolved_version"] == 1)

    def switch_and_back() -> None:
        served.deploy("wine", version="2")
        served.wait_serving("wine", lambda d: d["variants"][0]["resolved_version"] == 2)
        time.sleep(1.0)
        served.deployments.rollback("wine", who="test")
        served.wait_serving("wine", lambda d: d["variants"][0]["resolved_version"] == 1)

    seen, failures = under_load(served, switch_and_back, seconds=1.5)
    assert failures == []
    assert seen.get((1, "primary"), 0) > 20 and seen.get((2, "primary"), 0) > 20, seen
    actions = [e["action"] for e in served.deployments.events("wine")]
    assert actions[:3] == ["rollback", "deploy", "deploy"]


@pytest.mark.parametrize(("max_models", "max_mb"), [(1, 10_000.0), (8, 1.0)])
def test_loaded_models_are_bounded_by_count_and_memory(trained, max_models, max_mb):
    from concurrent.futures import ThreadPoolExecutor

    from iot2ml.serve.runtime import ModelCache

    _settings, bench = trained
    cache = ModelCache(bench.registry, max_models=max_models, max_mb=max_mb, executor=ThreadPoolExecutor(2),
                       max_batch=64)

    async def main() -> list:
        answers = []
        for version in (1, 2, 1):
            loaded = await cache.get("wine", version)
            prepared = loaded.predictor.prepare([instance(5)])
            answers.append((version, (await loaded.batcher.submit(prepared))[0]["prediction"]))
        return answers

    answers = run(main())
    assert cache.evictions == 2 and len(cache.describe()) == 1  # each load pushed the other out
    assert cache.describe()[0]["version"] == 1 and cache.describe()[0]["size_mb"] >= 1
    assert answers[0][1] == answers[2][1]  # v1 reloaded answers as before


def test_devices_use_only_models_deployed_for_their_type(served):
    Devices(served.catalog).add_type("wine", exist_ok=True)
    Devices(served.catalog).add_type("pump", exist_ok=True)
    wine_token = Devices(served.catalog).add_device(f"cellar-{time.monotonic_ns()}", "wine")
    pump_token = Devices(served.catalog).add_device(f"pump-{time.monotonic_ns()}", "pump")
    served.deploy("wine", devices="wine")
    served.wait_serving("wine", lambda d: d["devices"] == "wine")
    url = f"{served.url}/api/v1/models/wine/predict"
    ok = httpx.post(url, json={"instances": [instance()]}, headers={"Authorization": f"Bearer {wine_token}"})
    assert ok.status_code == 200, ok.text
    denied = httpx.post(url, json={"instances": [instance()]}, headers={"Authorization": f"Bearer {pump_token}"})
    assert denied.status_code == 403 and "--devices pump" in denied.json()["detail"]
    assert httpx.post(url, json={"instances": [instance()]}, headers=served.headers).status_code == 200  # API key


def test_the_api_port_answers_predictions_itself_like_the_serving_port(served):
    """The API mounts the same predict route over a runtime of its own: the same answers and statuses,
    its models loaded on the first request, its figures recorded but no canary judge."""
    from servekit import ServerThread, free_port

    from iot2ml.api import create_app

    served.deploy("wine", version="2")
    served.wait_serving("wine", lambda d: d["variants"][0]["resolved_version"] == 2)
    port = free_port()
    api = ServerThread(create_app(served.settings, catalog=served.catalog), port)
    try:
        base = f"http://127.0.0.1:{port}"
        state = httpx.get(f"{base}/api/v1/serving", headers=served.headers).json()
        assert state["process"] == {"component": "api", "pid": state["process"]["pid"], "lazy": True, "judge": False}
        assert [v["loaded"] for v in state["deployments"][0]["variants"]] == [False]  # not before a request
        body = {"instances": [instance(3)], "request_id": "same"}
        here = httpx.post(f"{base}/api/v1/models/wine/predict", json=body, headers=served.headers)
        there = httpx.post(f"{served.url}/api/v1/models/wine/predict", json=body, headers=served.headers)
        assert here.status_code == there.status_code == 200 and here.json() == there.json()
        state = httpx.get(f"{base}/api/v1/serving", headers=served.headers).json()
        assert [v["loaded"] for v in state["deployments"][0]["variants"]] == [True]
        assert state["deployments"][0]["stats"][0]["requests_total"] == 1
        for bad in ({"instances": [{"alcohol": 1}]}, {"rows": []}, [1], {"instances": [instance()] * 5000}):
            a = httpx.post(f"{base}/api/v1/models/wine/predict", json=bad, headers=served.headers)
            b = httpx.post(f"{served.url}/api/v1/models/wine/predict", json=bad, headers=served.headers)
            assert a.status_code == b.status_code and a.status_code in (400, 413, 422) and a.json() == b.json()
        r = httpx.post(f"{base}/api/v1/models/nope/predict", json=body, headers=served.headers)
        assert r.status_code == 404 and "iot2ml deploy nope" in r.json()["detail"]
    finally:
        api.stop()
