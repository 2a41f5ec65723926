"""MLflow tracking and registry under a temp data dir: runs, versions, champion/challenger."""

from __future__ import annotations

import pandas as pd
import pytest

from iot2ml.core.errors import NotFound
from iot2ml.ml.base import TrainResult
from iot2ml.ml.registry import CHALLENGER, CHAMPION, Registry, tracking_uri_for


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


T1 = pd.Timestamp("2026-11-01T12:00:00Z")


def duel(champion_mae: dict[float, float], new_mae: float, units: int = 30):
    """A comparison as a task's ``compare`` reports it: the champion's score depends on its factor."""
    def compare(model, since):
        assert since == T1  # the champion's trained_until, read back from its run
        return {"new": new_mae, "champion": champion_mae[model.factor], "units": units,
                "holdout": f"{units} labelled readings after 2026-11-01T12:00:00Z"}
    return compare


def test_versions_aliases_and_promotion(registry):
    first = registry.log_training("scale", result(2.0, 1.0), data_versions={"pump": 3}, trained_until=T1)
    assert first["version"] == 1 and set(first["aliases"]) == {CHAMPION, CHALLENGER}
    assert first["metrics"]["mae"] == 1.0 and first["baseline_metrics"]["mae"] == 5.0
    assert first["data_versions"] == {"pump": 3} and first["task"] == "regress"
    assert first["trained_until"] == "2026-11-01T12:00:00+00:00" and first["promotion"] == "first version: champion"

    # Strictly better on the same holdout, or the champion stays; the logged CV score plays no part.
    tie = registry.log_training("scale", result(3.0, 0.1), data_versions={"pump": 4},
                                compare=duel({2.0: 0.9}, new_mae=0.9))
    assert tie["aliases"] == [CHALLENGER] and "does not beat champion v1 mae=0.9" in tie["promotion"]
    assert tie["compared_by"] == "same holdout: 30 units newer than champion's data (2026-11-01T12:00:00Z)"

    def broken(model, since):
        raise RuntimeError("disk full")

    failed = registry.log_training("scale", result(3.0, 0.1), data_versions={"pump": 4}, compare=broken)
    assert failed["version"] == 3 and failed["aliases"] == [CHALLENGER]
    assert failed["promotion"].startswith("comparison with the champion failed (RuntimeError: disk full)")

    better = registry.log_training("scale", result(1.5, 0.5), data_versions={"pump": 5},
                                   compare=duel({2.0: 0.9}, new_mae=0.4))
    assert set(better["aliases"]) == {CHAMPION, CHALLENGER}
    assert better["promotion"] == ("version 4 mae=0.4 beats champion v1 mae=0.9 "
                                   "on 30 labelled readings after 2026-11-01T12:00:00Z")
    tags = registry.client.get_run(better["run_id"]).data.tags
    assert {k: tags[f"iot2ml.promotion.{k}"] for k in ("metric", "new_score", "champion_score", "holdout_units")} == {
        "metric": "mae", "new_score": "0.4", "champion_score": "0.9", "holdout_units": "30"}

    # v4 was logged without trained_until: nothing can be compared with it.
    after = registry.log_training("scale", result(1.0, 0.1), data_versions={"pump": 6}, trained_until=T1,
                                  compare=duel({1.5: 0.9}, new_mae=0.1))
    assert after["aliases"] == [CHALLENGER] and after["promotion"].startswith(
        "the champion did not record the newest reading it was trained on")

    model = registry.load("scale", CHAMPION)
    assert model.predict(pd.DataFrame({"x": [2.0]}))["prediction"].tolist() == [3.0]
    listed = registry.list_models()
    assert [(m["name"], m["version"]) for m in listed] == [("scale", v) for v in range(1, 6)]
    assert listed[0]["aliases"] == []


def test_resolve_turns_versions_and_aliases_into_numbers_and_names_what_exists(tmp_path):
    registry = Registry(tracking_uri_for(tmp_path), artifact_root=str(tmp_path / "artifacts"))
    registry.log_training("gain", result(2.0, 1.0), data_versions={})
    registry.log_training("gain", result(3.0, 0.5), data_versions={})  # no duel: v1 stays champion
    assert registry.resolve("gain", "champion") == 1
    assert registry.resolve("gain", CHALLENGER) == 2
    assert registry.resolve("gain", "2") == 2 and registry.resolve("gain", 1) == 1
    with pytest.raises(NotFound) as missing:
        registry.resolve("gain", "9")
    assert str(missing.value) == ("model 'gain' has no version 9 (it has 1, 2; aliases challenger -> 2, "
                                  "champion -> 1): see 'iot2ml models list'")
    with pytest.raises(NotFound, match=r"has no version with alias 'gold' \(it has 1, 2; aliases"):
        registry.resolve("gain", "gold")
    with pytest.raises(NotFound, match="model 'nope' is not registered: train it first"):
        registry.resolve("nope", "champion")


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
