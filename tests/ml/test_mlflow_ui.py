"""`mlflow ui` pointed at the data dir's tracking store shows our runs and registered models."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pandas as pd
from ports import free_port  # below the ephemeral range: tests/ports.py

from iot2ml.ml.base import TrainResult
from iot2ml.ml.registry import Registry, tracking_uri_for


class Half:
    def predict(self, frame: pd.DataFrame) -> pd.DataFrame:
        return pd.DataFrame({"prediction": frame["x"] / 2})


def test_mlflow_ui_lists_our_runs(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    registry = Registry(tracking_uri_for(data), artifact_root=str(data / "mlartifacts"))
    result = TrainResult(model=Half(), task="regress", metrics={"mae": 0.1}, baseline_metrics={"mae": 1.0},
                         primary_metric="mae", greater_is_better=False, features=["x"],
                         input_example=pd.DataFrame({"x": [1.0]}))
    registry.log_training("half", result, data_versions={"t": 1})

    port = free_port()
    mlflow = str(Path(sys.executable).parent / "mlflow")
    if not os.path.exists(mlflow):
        mlflow = shutil.which("mlflow")
    proc = subprocess.Popen(
        [mlflow, "ui", "--backend-store-uri", tracking_uri_for(data), "--host", "127.0.0.1", "--port", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=tmp_path,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120  # gunicorn and MLflow's imports take long on a busy machine
        while True:
            try:
                if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "mlflow ui did not start"
            time.sleep(0.5)
        exps = httpx.post(f"{base}/api/2.0/mlflow/experiments/search", json={"max_results": 50}).json()
        names = {e["name"]: e["experiment_id"] for e in exps["experiments"]}
        assert "iot2ml/half" in names
        runs = httpx.post(f"{base}/api/2.0/mlflow/runs/search",
                          json={"experiment_ids": [names["iot2ml/half"]]}).json()["runs"]
        metrics = {m["key"]: m["value"] for m in runs[0]["data"]["metrics"]}
        assert metrics == {"mae": 0.1, "baseline_mae": 1.0}
        models = httpx.get(f"{base}/api/2.0/mlflow/registered-models/search").json()["registered_models"]
        assert [m["name"] for m in models] == ["half"]
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:  # still importing when asked to stop
            proc.kill()
            proc.wait(10)
