"""MLflow tracking and registry under a temp data dir: runs, versions, champion/challenger."""

from __future__ import annotations

import pandas as pd
import pytest

from iot2ml.ml.base import TrainResult
from iot2ml.ml.registry import CHAMPION, CHALLENGER, Registry, tracking_uri_for


class Scale:
    """A tiny real model: prediction = factor * x."""

    def __init__(self, factor: float) -> None:
        self.factor = factor

    def predict(self, frame: pd.DataFrame) -> pd.DataFrame:
        return pd.DataFrame({"prediction": frame["x"] * self.factor})


def result(factor: float, mae: float) -> TrainResult:
    return TrainResult(model=Scale(factor), task="regress", metrics={"mae": mae, "rmse": mae * 1.2},
                       baseline_metrics={"mae": 5.0, "rmse": 6.0}, primary_metric="mae", greater_is_better=False,
                       features=["x"], input_example=pd.DataFrame({"x": [1.0, 2.0]}))


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    data = tmp_path_factory.mktemp("mlflow")
    return Registry(tracking_uri_for(data), artifact_root=str(data / "artifacts"))


def test_versions_aliases_and_promotion(registry):
    first = registry.log_training("scale", result(2.0, 1.0), data_versions={"pump": 3})
    assert first["version"] == 1 and set(first["aliases"]) == {CHAMPION, CHALLENGER}
    assert first["metrics"]["mae"] == 1.0 and first["baseline_metrics"]["mae"] == 5.0
    assert first["data_versions"] == {"pump": 3} and first["task"] == "regress"

    worse = registry.log_training("scale", result(3.0, 2.0), data_versions={"pump": 4})
    assert worse["version"] == 2 and worse["aliases"] == [CHALLENGER]
    assert "does not beat" in worse["promotion"]

    # Rescored on the new holdout, the champion loses to a better version.
    better = registry.log_training("scale", result(1.5, 0.5), data_versions={"pump": 5},
                                   rescore=lambda model: {"mae": 0.9 if model.factor == 2.0 else 9.9})
    assert set(better["aliases"]) == {CHAMPION, CHALLENGER}
    assert "beats champion v1 mae=0.9" in better["promotion"]

    model = registry.load("scale", CHAMPION)
    assert model.predict(pd.DataFrame({"x": [2.0]}))["prediction"].tolist() == [3.0]
    listed = registry.list_models()
    assert [(m["name"], m["version"]) for m in listed] == [("scale", 1), ("scale", 2), ("scale", 3)]
    assert listed[0]["aliases"] == []


def test_mlflow_is_not_imported_by_the_ingest_path():
    import subprocess
    import sys

    code = ("import sys; import iot2ml.ingest.service, iot2ml.api, iot2ml.cli, iot2ml.components; "
            "print('mlflow' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_tracking_and_registry_on_postgresql(postgres_url, tmp_path):
    pg = Registry(tracking_uri_for(tmp_path, postgres_url), artifact_root=str(tmp_path / "artifacts"))
    described = pg.log_training("pg-scale", result(2.0, 1.0), data_versions={"pump": 1})
    assert described["version"] == 1 and "champion" in described["aliases"]
    assert [m["name"] for m in pg.list_models()] == ["pg-scale"]
    assert pg.load("pg-scale").predict(pd.DataFrame({"x": [1.5]}))["prediction"].tolist() == [3.0]
