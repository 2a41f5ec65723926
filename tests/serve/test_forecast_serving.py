"""A forecast model served with the DeepAR request format of seed 002: ``instances`` with ``start``
and ``target``, ``configuration`` with ``quantiles`` and ``output_types``; answers ``mean`` and
``quantiles`` per instance."""

from __future__ import annotations

import httpx
import numpy as np
import pandas as pd
import pytest
from servekit import ServerThread, free_port, write

from iot2ml.auth.store import Keys
from iot2ml.core.catalog import Catalog
from iot2ml.ml.jobs import TrainJob
from iot2ml.ml.workbench import Workbench
from iot2ml.serve.deployments import Deployments, build_spec

HOURS = 24 * 12


def daily(n: int, phase: float, level: float, seed: int = 1) -> np.ndarray:
    t = np.arange(n)
    noise = np.random.default_rng(seed).normal(0, 0.5, n)
    return level + 10 * np.sin(2 * np.pi * (t + phase) / 24) + noise


@pytest.fixture(scope="module")
def forecast_served(tmp_path_factory):
    from iot2ml.api import create_serve_app
    from iot2ml.components import serving_runtime
    from iot2ml.core.config import load_settings

    settings = load_settings(data_dir=tmp_path_factory.mktemp("fc") / "data", serve_port=0, serve_poll=0.2)
    bench = Workbench(settings)
    rng = np.random.default_rng(0)
    frames = [pd.DataFrame({"device_id": f"s{k}", "ts": pd.date_range("2026-10-01", periods=HOURS, freq="h", tz="UTC"),
                            "ozone": daily(HOURS, 3 * k, 40 + 5 * k) + rng.normal(0, 0.5, HOURS)}) for k in range(3)]
    write(bench.lake, "pollution", pd.concat(frames, ignore_index=True), 1)
    bench.train(TrainJob(task="forecast", table="pollution", name="ozone-24h",
                         options={"target": "ozone", "freq": "1h", "horizon": 24,
                                  "candidates": "seasonal_naive,lightgbm", "n_jobs": 1}))
    catalog = Catalog(settings.catalog)
    Deployments(catalog).put(build_spec(None, "ozone-24h"), who="test", action="deploy")
    key = Keys(catalog).add_key("fc", "reader")
    app = create_serve_app(settings, catalog=catalog, runtime=serving_runtime(settings, catalog))
    port = free_port()
    server = ServerThread(app, port)
    yield f"http://127.0.0.1:{port}/api/v1/models/ozone-24h/predict", {"Authorization": f"Bearer {key}"}
    server.stop()
    catalog.close()


def test_deepar_request_gets_mean_and_quantiles(forecast_served):
    url, headers = forecast_served
    history = daily(72, 0, 50)
    body = {"instances": [{"start": "2026-11-01 00:00:00", "target": history.round(3).tolist()},
                          {"start": "2026-11-02 00:00:00", "target": daily(60, 6, 30).tolist()}],
            "configuration": {"num_samples": 50, "output_types": ["mean", "quantiles"], "quantiles": ["0.1", "0.9"]}}
    r = httpx.post(url, json=body, headers=headers, timeout=30)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["model"] == "ozone-24h" and len(out["predictions"]) == 2
    first = out["predictions"][0]
    assert set(first) == {"start", "mean", "quantiles"} and len(first["mean"]) == 24
    assert set(first["quantiles"]) == {"0.1", "0.9"}
    assert first["start"].startswith("2026-11-04T00:00")  # right after the 72 given hours
    mean, lo, hi = (np.array(v) for v in (first["mean"], first["quantiles"]["0.1"], first["quantiles"]["0.9"]))
    assert np.all(lo <= mean + 1e-9) and np.all(mean <= hi + 1e-9)
    truth = daily(96, 0, 50)[72:] - np.random.default_rng(1).normal(0, 0.5, 96)[72:]
    assert np.mean(np.abs(mean - truth)) < 3.0  # it continues the daily cycle (amplitude 10)
    second = out["predictions"][1]
    assert second["start"].startswith("2026-11-04T12:00") and abs(np.mean(second["mean"]) - 30) < 3 and np.std(second["mean"]) > 4


def test_known_series_forecast_from_its_history_and_bad_requests(forecast_served):
    url, headers = forecast_served
    r = httpx.post(url, json={"instances": [{"device_id": "s1"}], "configuration": {"output_types": ["mean"]}},
                   headers=headers, timeout=30)
    assert r.status_code == 200, r.text
    assert set(r.json()["predictions"][0]) == {"start", "mean"}
    for body, needle in [
        ({"instances": [{"start": "2026-11-01", "target": [1.0, 2.0]}]}, "context"),
        ({"instances": [{"start": "yesterday", "target": [1.0] * 60}]}, "start"),
        ({"instances": [{"start": "2026-11-01", "target": [1.0] * 59 + ["x"]}]}, "target[59]"),
        ({"instances": [{"device_id": "unknown"}]}, "target"),
        ({"instances": [{"start": "2026-11-01", "target": [1.0] * 60}], "configuration": {"quantiles": ["0.3"]}},
         "0.3"),
    ]:
        r = httpx.post(url, json=body, headers=headers, timeout=30)
        assert r.status_code == 422, (body, r.text)
        assert needle in r.json()["detail"], (needle, r.text)
