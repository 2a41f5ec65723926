"""``iot2ml deploy / deployments / rollback / undeploy`` and ``/api/v1/deployments`` on a real SQLite
catalog and a real MLflow registry: both check requests against the registry and the catalog the
same way, store every change as an audited event and see each other's changes."""

from __future__ import annotations

import json

import pandas as pd
import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from iot2ml.api import create_app
from iot2ml.cli import app as cli
from iot2ml.auth.store import Devices, Keys
from iot2ml.core.catalog import Catalog
from iot2ml.ml.base import TrainResult
from iot2ml.ml.registry import Registry, tracking_uri_for

MODEL = "wine-quality"


class Scale:
    """A tiny real model: prediction = factor * x."""

    def __init__(self, factor: float) -> None:
        self.factor = factor

    def predict(self, frame: pd.DataFrame) -> pd.DataFrame:
        return pd.DataFrame({"prediction": frame["x"] * self.factor})


@pytest.fixture(scope="module")
def mlflow_store(tmp_path_factory) -> dict[str, str]:
    """One registry for the module: MODEL versions 1 (champion), 2 and 3 (the same artifacts registered again)."""
    root = tmp_path_factory.mktemp("mlflow")
    uri, artifacts = tracking_uri_for(root), str(root / "artifacts")
    registry = Registry(uri, artifact_root=artifacts)
    registry.log_training(MODEL, TrainResult(
        model=Scale(2.0), task="regress", metrics={"mae": 1.0}, baseline_metrics={"mae": 5.0}, primary_metric="mae",
        greater_is_better=False, features=["x"], input_example=pd.DataFrame({"x": [1.0, 2.0]})), data_versions={})
    first = registry.client.get_model_version(MODEL, "1")
    for _ in range(2):
        registry.client.create_model_version(MODEL, first.source, run_id=first.run_id)
    return {"mlflow_tracking_uri": uri, "mlflow_artifact_root": artifacts}


@pytest.fixture
def env(settings, mlflow_store, monkeypatch):
    """Settings on a fresh data dir using the module's registry; the CLI reads the same through the environment."""
    for key, value in mlflow_store.items():
        monkeypatch.setenv(f"IOT2ML_{key.upper()}", value)
    settings = settings.model_copy(update=mlflow_store)
    Devices(Catalog(settings.catalog)).add_type("wine")
    return settings


def run(settings, *args: str, ok: bool = True):
    result = CliRunner().invoke(cli, [*args, "--data-dir", str(settings.data_dir)])
    assert (result.exit_code == 0) is ok, (result.exit_code, result.stdout, result.stderr, result.exception)
    return result


def run_json(settings, *args: str):
    return json.loads(run(settings, *args, "--json").stdout)


def said(result) -> str:
    """What the CLI said on stderr, with rich's line wrapping undone."""
    return " ".join(result.stderr.split())


def variants(info: dict) -> list[tuple]:
    return [(v["variant"], v["version"], v["share"], v.get("model_version")) for v in info["variants"]]


# ---- CLI ---------------------------------------------------------------------------------------
def test_deploy_serves_the_champion_and_says_where(env):
    out = run(env, "deploy", MODEL).stdout
    assert "champion (v1)" in out and "100%" in out and f"POST /api/v1/models/{MODEL}/predict" in out
    info = run_json(env, "deployments", "list")
    assert [(d["name"], d["generation"]) for d in info] == [(MODEL, 1)]
    assert variants(info[0]) == [("primary", "champion", 100.0, None)]


def test_canary_with_bake_and_thresholds(env):
    run(env, "deploy", MODEL)
    info = run_json(env, "deploy", MODEL, "--version", "2", "--canary", "10", "--bake", "5m",
                    "--rollback-on", "error_rate>0.01,p99_ms>50")
    assert info["action"] == "canary" and info["generation"] == 2
    assert variants(info) == [("primary", "champion", 90.0, 1), ("canary", "2", 10.0, 2)]
    assert info["bake_seconds"] == 300.0 and info["rollback_on"] == {"error_rate": 0.01, "p99_ms": 50.0}
    assert info["canary_since"] and info["predict"] == f"/api/v1/models/{MODEL}/predict"
    out = run(env, "deploy", MODEL, "--version", "3", "--canary", "25", "--bake", "90s").stdout
    assert "canary bakes 90 s, rolled back on error_rate>0.01" in out


def test_ab_then_shadow_then_stream_and_devices(env):
    info = run_json(env, "deploy", MODEL, "--ab", "2:50,3:50")
    assert info["action"] == "ab" and variants(info) == [("ab-2", "2", 50.0, 2), ("ab-3", "3", 50.0, 3)]
    info = run_json(env, "deploy", MODEL, "--shadow", "1")
    assert info["action"] == "shadow" and variants(info)[-1] == ("shadow", "1", 0.0, 1)
    out = run(env, "deploy", MODEL, "--shadow", "1").stdout
    assert "copy of every request, never answers" in out
    info = run_json(env, "deploy", MODEL, "--stream", "wine", "--devices", "wine")
    assert (info["action"], info["stream"], info["devices"]) == ("stream", "wine", "wine")
    assert [v[0] for v in variants(info)] == ["ab-2", "ab-3", "shadow"]  # binding a stream changes no variant
    unbound = run_json(env, "deploy", MODEL, "--stream", "")
    assert (unbound["stream"], unbound["devices"]) == (None, "wine")


def test_list_history_rollback_and_undeploy(env):
    run(env, "deploy", MODEL, "--version", "1", "--reason", "first")
    run(env, "deploy", MODEL, "--version", "2", "--canary", "10")
    history = run_json(env, "deployments", "history", MODEL)
    assert [(e["generation"], e["action"], e["reason"]) for e in history] == [(2, "canary", None), (1, "deploy", "first")]
    assert all(e["who"] and e["at"] for e in history)
    restored = run_json(env, "rollback", MODEL)
    assert restored["generation"] == 3 and [v[:2] for v in variants(restored)] == [("primary", "1")]
    assert run_json(env, "deployments", "history", MODEL)[0]["action"] == "rollback"
    table = run(env, "deployments", "list").stdout
    assert MODEL in table and "primary=1" in table
    assert "rollback" in run(env, "deployments", "history", MODEL).stdout

    run(env, "undeploy", MODEL)
    assert run_json(env, "deployments", "list") == []
    assert "not deployed" in said(run(env, "rollback", MODEL, ok=False))
    assert "was never deployed" in said(run(env, "deployments", "history", "no-such", ok=False))


def test_unknown_versions_models_types_and_bad_options_are_refused_and_nothing_is_stored(env):
    run(env, "deploy", MODEL)
    refused = {
        ("--version", "9"): f"model '{MODEL}' has no version 9 (it has 1, 2, 3; "
                             "aliases challenger -> 1, champion -> 1): see 'iot2ml models list'",
        ("--version", "gold"): "has no version with alias 'gold'",
        ("--ab", "2:50,9:50"): "has no version 9",
        ("--version", "2", "--canary", "10", "--rollback-on", "p98>3"): "rollback condition 'p98>3' is not understood",
        ("--version", "2", "--canary", "10", "--bake", "soon"): "duration 'soon' is not valid",
        ("--version", "2", "--canary", "150"): "must be a share between 0 and 100",
        ("--canary", "10"): "--canary needs --version",
        ("--ab", "2:50,3:40"): "A/B weights add up to 90, not 100",
        ("--rollback-on", "error_rate>0.1"): "judge a canary",
        ("--stream", "beer"): "stream 'beer' is not a device type (known: wine)",
        ("--devices", "beer"): "devices 'beer' is not a device type",
    }
    for options, message in refused.items():
        result = run(env, "deploy", MODEL, *options, ok=False)
        assert result.exit_code == 2 and message in said(result), (options, said(result))
    assert "model 'nope' is not registered" in said(run(env, "deploy", "nope", ok=False))
    assert [e["action"] for e in run_json(env, "deployments", "history", MODEL)] == ["deploy"]


def test_a_device_type_is_answered_by_one_deployment(env, mlflow_store):
    registry = Registry(mlflow_store["mlflow_tracking_uri"])
    if not registry.client.search_registered_models(f"name='{MODEL}-b'"):
        registry.client.create_registered_model(f"{MODEL}-b")
        first = registry.client.get_model_version(MODEL, "1")
        registry.client.create_model_version(f"{MODEL}-b", first.source, run_id=first.run_id)
    run(env, "deploy", MODEL, "--devices", "wine")
    taken = said(run(env, "deploy", f"{MODEL}-b", "--version", "1", "--devices", "wine", ok=False))
    assert f"answered by deployment '{MODEL}' already" in taken
    run(env, "deploy", MODEL, "--devices", "")
    assert run_json(env, "deploy", f"{MODEL}-b", "--version", "1", "--devices", "wine")["devices"] == "wine"


# ---- API ---------------------------------------------------------------------------------------
@pytest.fixture
def api(env):
    catalog = Catalog(env.catalog)
    with TestClient(create_app(env, catalog=catalog)) as client:
        client.admin = {"Authorization": f"Bearer {Keys(catalog).add_key('ops', 'admin')}"}
        client.reader = {"Authorization": f"Bearer {Keys(catalog).add_key('dash', 'reader')}"}
        yield client


def test_api_deploys_lists_rolls_back_and_undeploys(api, env):
    url = f"/api/v1/deployments/{MODEL}"
    r = api.put(url, headers=api.admin)  # no body: serve the champion
    assert r.status_code == 200 and variants(r.json()) == [("primary", "champion", 100.0, 1)]
    r = api.put(url, headers=api.admin, json={"version": 2, "canary": 10, "bake": "5m",
                                              "rollback_on": "error_rate>0.01,p99_ms>50", "reason": "try v2"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["action"] == "canary" and body["bake_seconds"] == 300.0 and body["rollback_on"]["p99_ms"] == 50.0
    assert variants(body) == [("primary", "champion", 90.0, 1), ("canary", "2", 10.0, 2)]

    r = api.get("/api/v1/deployments", headers=api.reader)
    assert r.status_code == 200 and [d["name"] for d in r.json()] == [MODEL]
    one = api.get(url, headers=api.reader).json()
    assert one["generation"] == 2 and [(e["action"], e["who"], e["reason"]) for e in one["events"]] == [
        ("canary", "api:ops", "try v2"), ("deploy", "api:ops", None)]
    # The CLI sees what the API stored, and the other way round.
    assert run_json(env, "deployments", "list")[0]["generation"] == 2
    run(env, "deploy", MODEL, "--ab", "2:50,3:50")
    assert api.get(url, headers=api.reader).json()["events"][0]["action"] == "ab"

    r = api.post(f"{url}/rollback", headers=api.admin, json={"reason": "A/B too early"})
    assert r.status_code == 200 and r.json()["canary_since"] and [v["variant"] for v in r.json()["variants"]] == [
        "primary", "canary"]
    r = api.put(url, headers=api.admin, json={"ab": {"2": 30, "3": 70}, "stream": "wine"})
    assert variants(r.json()) == [("ab-2", "2", 30.0, 2), ("ab-3", "3", 70.0, 3)] and r.json()["stream"] == "wine"
    assert api.delete(url, headers=api.admin).status_code == 204
    assert api.get(url, headers=api.reader).status_code == 404
    assert api.get("/api/v1/deployments", headers=api.reader).json() == []


def test_api_refuses_with_the_reason(api):
    url = f"/api/v1/deployments/{MODEL}"
    assert api.put(url, json={}).status_code == 401
    r = api.put(url, headers=api.reader, json={})
    assert r.status_code == 403 and "deployments:write needs role operator or admin" in r.json()["detail"]
    cases = [
        ({"version": "9"}, 404, "has no version 9"),
        ({"stream": "beer"}, 404, "not a device type"),
        ({"version": "2", "canary": 10, "rollback_on": "p98>3"}, 422, "is not understood"),
        ({"version": "2", "canary": 10, "rollback_on": {"p95_ms": 3}}, 422, "'p95_ms' is not known"),
        ({"ab": "2:50,3:50", "version": "2"}, 422, "do not combine"),
        ({"version": "2", "canary": 10, "bake": "soon"}, 422, "duration 'soon' is not valid"),
        ({"version": "2", "canry": 10}, 422, "canry"),
    ]
    for body, status, reason in cases:
        r = api.put(url, headers=api.admin, json=body)
        assert r.status_code == status and reason in r.text, (body, r.status_code, r.text)
    assert api.put("/api/v1/deployments/nope", headers=api.admin, json={}).status_code == 404
    assert api.get(url, headers=api.reader).status_code == 404  # nothing was stored
    assert api.post(f"{url}/rollback", headers=api.admin).status_code == 404
    assert api.delete(url, headers=api.admin).status_code == 404
    api.put(url, headers=api.admin, json={})
    r = api.post(f"{url}/rollback", headers=api.admin)
    assert r.status_code == 404 and "no earlier state" in r.json()["detail"]
