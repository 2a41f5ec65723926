"""Serving test kit: real wine models in a real MLflow registry, the serving app on a real port.

A module of its own (not conftest.py) so that tests import it by a name no other directory uses."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from ports import free_port  # below the ephemeral range: tests/ports.py

from iot2ml.auth.store import Keys
from iot2ml.core.catalog import Catalog
from iot2ml.ml.jobs import TrainJob
from iot2ml.ml.workbench import Workbench
from iot2ml.serve.deployments import Deployments, build_spec

TS = pa.timestamp("us", tz="UTC")
FEATURES = ("alcohol", "volatile_acidity", "ph")


def wine_frame(n: int, seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    alcohol = rng.normal(10.5, 1.2, n)
    acidity = rng.normal(0.5, 0.15, n)
    score = alcohol - 4 * acidity + rng.normal(0, 0.3, n)
    return pd.DataFrame({
        "device_id": [f"station-{i % 5}" for i in range(n)],
        "ts": pd.date_range("2026-11-01", periods=n, freq="min", tz="UTC"),
        "alcohol": alcohol, "volatile_acidity": acidity, "ph": rng.normal(3.3, 0.1, n),
        "quality": np.where(score > 10.2, "best", np.where(score > 8.6, "better", "good")),
    })


def write(lake: Any, table: str, frame: pd.DataFrame, version: int) -> None:
    frame = frame.copy()
    frame["received_at"] = frame["ts"]
    frame["_seq"] = 0  # not from the broker's stream (its sequences start at 1)
    t = pa.Table.from_pandas(frame, preserve_index=False)
    for col in ("ts", "received_at"):
        t = t.set_column(t.schema.get_field_index(col), col, t[col].cast(TS))
    lake.append(table, t, app_id="test", version=version)


def instance(i: int = 0) -> dict[str, Any]:
    rng = np.random.default_rng(i)
    return {"alcohol": float(rng.normal(10.5, 1.2)), "volatile_acidity": float(rng.normal(0.5, 0.15)),
            "ph": float(rng.normal(3.3, 0.1))}


def register_faulty(bench: Workbench, name: str, mode: str) -> int:
    """A new version of ``name`` whose model raises or is slow (see faulty.py); never champion."""
    from faulty import Faulty

    from iot2ml.ml.classify import ClassifyTask

    frame = bench.read("SELECT * FROM wine")
    result = ClassifyTask(label="quality", features=list(FEATURES), folds=3).fit(frame)
    result.model = dataclasses.replace(result.model, estimator=Faulty(result.model.estimator, mode))
    result.metrics = {k: -1.0 for k in result.metrics}  # worse than any champion
    result.input_example = None
    described = bench.registry.log_training(name, result, data_versions={"wine": 0})
    return int(described["version"])


@dataclasses.dataclass
class Served:
    settings: Any
    bench: Workbench
    catalog: Catalog
    deployments: Deployments
    url: str
    key: str
    app: Any

    def deploy(self, name: str = "wine", **options: Any) -> Any:
        spec = build_spec(self.deployments.get(name), name, **options)
        return self.deployments.put(spec, who="test", action="deploy")

    def wait_serving(self, name: str, check: Any, timeout: float = 20.0) -> dict[str, Any]:
        """Wait until the runtime's view of ``name`` satisfies ``check(describe_item)``."""
        deadline = time.monotonic() + timeout
        seen = None
        while time.monotonic() < deadline:
            for item in self.app.state.runtime.describe():
                if item["name"] == name:
                    seen = item
                    if check(item):
                        return item
            time.sleep(0.1)
        raise AssertionError(f"serving state of {name} never matched; last seen {seen}")

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}




class ServerThread:
    """uvicorn serving ``app`` on a real port in a thread of the test process."""

    def __init__(self, app: Any, port: int) -> None:
        import uvicorn

        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                                    lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the serving app did not start")
            time.sleep(0.05)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(15)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Any, Workbench]]:
    """A data dir with a wine table and two real versions of model 'wine' (v1 champion)."""
    from iot2ml.core.config import load_settings

    data_dir = tmp_path_factory.mktemp("serve") / "data"
    settings = load_settings(data_dir=data_dir, nats_port=0, mqtt_port=0, http_port=0, serve_port=0,
                             serve_poll=0.2, flush_interval=0.2)
    bench = Workbench(settings)
    write(bench.lake, "wine", wine_frame(400, seed=1), 1)
    job = TrainJob(task="classify", table="wine", name="wine", options={"label": "quality", "features": list(FEATURES),
                                                                        "folds": 3})
    bench.train(job)
    bench.train(job)
    yield settings, bench


@pytest.fixture
def served(trained: tuple[Any, Workbench], monkeypatch: pytest.MonkeyPatch) -> Iterator[Served]:
    """The serving app (no broker) on a free port, over the module's registry; a fresh catalog state."""
    from iot2ml.api import create_serve_app
    from iot2ml.components import serving_runtime

    settings, bench = trained
    for key in ("IOT2ML_CONFIG",):
        monkeypatch.setenv(key, "/dev/null")
    catalog = Catalog(settings.catalog)
    deployments = Deployments(catalog)
    for d in deployments.list():
        deployments.remove(d.name, who="test reset")
    bench.registry.client.set_registered_model_alias("wine", "champion", "1")
    key = Keys(catalog).add_key(f"k{time.monotonic_ns()}", "reader")
    app = create_serve_app(settings, catalog=catalog, runtime=serving_runtime(settings, catalog))
    port = free_port()
    server = ServerThread(app, port)
    try:
        yield Served(settings, bench, catalog, deployments, f"http://127.0.0.1:{port}", key, app)
    finally:
        server.stop()
        catalog.close()


def run(coro: Any) -> Any:
    return asyncio.run(coro)
