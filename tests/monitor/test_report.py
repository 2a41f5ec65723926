"""Drift reports on a real model: training logs its reference profile to MLflow, captured inputs in the
lake are compared with it, reports land in ``monitor_reports``, ``/metrics`` and the ``drift`` rule kind."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import orjson
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from iot2ml.core.catalog import Catalog
from iot2ml.core.errors import InvalidInput, NotFound
from iot2ml.core.tables import MODEL_INPUTS, MODEL_INPUTS_SCHEMA, MONITOR_REPORTS
from iot2ml.ml.jobs import TrainJob
from iot2ml.ml.workbench import Workbench
from iot2ml.monitor.kinds import Context
from iot2ml.monitor.report import build_report, define_drift, drift_evaluator
from iot2ml.monitor.rules import NO_DATA, EvalError, Sample
from iot2ml.monitor.service import define_rule
from iot2ml.wiring import monitor_context

TS = pa.timestamp("us", tz="UTC")
FEATURES = ["alcohol", "volatile_acidity", "ph"]
T0 = 1_800_000_000.0  # the shifted rows are captured in (T0, T0 + 100]
T1 = T0 + 10_000.0  # the unshifted rows in (T1, T1 + 100]


def wine_frame(n: int, seed: int, *, shift: float = 0.0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    alcohol = rng.normal(10.5 + 2.5 * shift, 1.2, n)
    acidity = rng.normal(0.5 + 0.3 * shift, 0.15, n)
    score = alcohol - 4 * acidity + rng.normal(0, 0.3, n)
    return pd.DataFrame({
        "device_id": [f"station-{i % 5}" for i in range(n)],
        "ts": pd.date_range("2026-11-01", periods=n, freq="min", tz="UTC"),
        "alcohol": alcohol, "volatile_acidity": acidity, "ph": rng.normal(3.3, 0.1, n),
        "quality": np.where(score > 10.2, "best", np.where(score > 8.6, "better", "good")),
    })


def write_table(lake: Any, table: str, frame: pd.DataFrame, version: int) -> None:
    frame = frame.copy()
    frame["received_at"] = frame["ts"]
    frame["_seq"] = 0
    t = pa.Table.from_pandas(frame, preserve_index=False)
    for col in ("ts", "received_at"):
        t = t.set_column(t.schema.get_field_index(col), col, t[col].cast(TS))
    lake.append(table, t, app_id="test", version=version)


def capture(lake: Any, model: Any, frame: pd.DataFrame, *, start: float, version: int, app: str, seq: int) -> None:
    """``model_inputs`` rows as serving writes them: the instance's fields and the model's own answers."""
    records = frame[FEATURES].to_dict("records")
    answers = model.answers(model.predict_matrix(model.matrix_from_records(records)))
    n = len(records)
    table = pa.table({
        "ts": pa.array([int((start + 1 + i * 99 / n) * 1e6) for i in range(n)], pa.int64()).cast(TS),
        "model": ["wine"] * n, "version": pa.array([version] * n, pa.int64()), "variant": ["primary"] * n,
        "source": ["rest"] * n, "device_id": frame["device_id"].tolist(), "entity": pa.nulls(n, pa.string()),
        "request_id": [f"r{i}" for i in range(n)],
        "inputs": [orjson.dumps(r).decode() for r in records],
        "prediction": [orjson.dumps(a).decode() for a in answers],
    }, schema=MODEL_INPUTS_SCHEMA)
    lake.append(MODEL_INPUTS, table, app_id=app, version=seq)


@pytest.fixture(scope="module")
def wine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Any, Workbench, Catalog]]:
    """A real wine classifier (v1) in a real MLflow store, and captured inputs: shifted at T0, not at T1."""
    from iot2ml.core.config import load_settings

    settings = load_settings(data_dir=tmp_path_factory.mktemp("report") / "data", nats_port=0, mqtt_port=0,
                             http_port=0, serve_port=0)
    bench = Workbench(settings)
    write_table(bench.lake, "wine", wine_frame(600, seed=1), 1)
    bench.train(TrainJob(task="classify", table="wine", name="wine",
                         options={"label": "quality", "features": FEATURES, "folds": 3}))
    model = bench.registry.load("wine", "1", unwrap=True)
    capture(bench.lake, model, wine_frame(400, seed=2, shift=1.0), start=T0, version=1, app="cap", seq=1)
    capture(bench.lake, model, wine_frame(400, seed=3), start=T1, version=1, app="cap", seq=2)
    catalog = Catalog(settings.catalog)
    try:
        yield settings, bench, catalog
    finally:
        catalog.close()


@pytest.fixture
def ctx(wine: tuple[Any, Workbench, Catalog]) -> Context:
    settings, bench, catalog = wine
    return monitor_context(settings, catalog, bench.lake)


def test_training_logs_a_reference_profile_of_the_raw_inputs_and_the_answers(ctx: Context) -> None:
    profile = ctx.models.reference_profile("wine", 1)
    assert profile is not None, "reference_profile.json was not logged with the run"
    assert sorted(profile.columns) == sorted([*FEATURES, "prediction"])
    assert profile.n_rows == 600
    assert profile.columns["alcohol"].kind == "numeric"
    assert abs(profile.columns["alcohol"].mean - 10.5) < 0.3
    answers = profile.columns["prediction"]
    assert answers.kind == "categorical" and set(answers.frequencies) <= {"good", "better", "best"}
    assert sum(answers.frequencies.values()) == 600


def test_shifted_inputs_drift_and_unshifted_do_not(ctx: Context) -> None:
    drifted = build_report(ctx, "wine", window=200, now=T0 + 150)
    assert [v["version"] for v in drifted["versions"]] == [1]
    v = drifted["versions"][0]
    assert v["n_current"] == 400 and v["variant"] == "primary"
    assert v["dataset_drift"] is True and v["share_drifted"] >= 2 / 3
    by_name = {f["feature"]: f for f in v["features"]}
    assert by_name["alcohol"]["drifted"] and by_name["alcohol"]["test"] == "ks"
    assert by_name["alcohol"]["p_value"] < 0.05 and by_name["alcohol"]["psi"] > 0.1
    assert v["prediction"]["feature"] == "prediction" and v["prediction"]["drifted"]
    json.dumps(drifted, allow_nan=False)  # JSON-able as it is

    steady = build_report(ctx, "wine", window=200, now=T1 + 150)
    v = steady["versions"][0]
    assert v["n_current"] == 400
    assert v["dataset_drift"] is False and v["share_drifted"] <= 1 / 3
    assert not v["prediction"]["drifted"]


def test_report_rows_land_in_monitor_reports_and_gauges_in_metrics(ctx: Context) -> None:
    from prometheus_client import REGISTRY

    now = T0 + 160
    build_report(ctx, "wine", window=200, now=now)
    rows = ctx.lake.dataset(MONITOR_REPORTS).to_table(
        filter=(pc.field("model") == "wine") & (pc.field("at") == pa.scalar(int(now * 1e6), TS))).to_pylist()
    assert {"dataset", "feature", "prediction"} <= {r["scope"] for r in rows}  # and live quality's, if any
    dataset = next(r for r in rows if r["scope"] == "dataset")
    assert dataset["drifted"] is True and dataset["version"] == 1 and dataset["window_seconds"] == 200.0
    assert sorted(r["feature"] for r in rows if r["scope"] == "feature") == sorted(FEATURES)
    assert REGISTRY.get_sample_value("iot2ml_model_dataset_drift", {"model": "wine", "version": "1"}) == 1.0
    assert REGISTRY.get_sample_value("iot2ml_model_drift_share", {"model": "wine", "version": "1"}) >= 2 / 3
    p = REGISTRY.get_sample_value("iot2ml_model_feature_drift", {"model": "wine", "version": "1", "feature": "alcohol"})
    assert p is not None and p < 0.05


def test_only_the_window_is_read_and_nothing_captured_is_an_empty_report(ctx: Context) -> None:
    empty = build_report(ctx, "wine", window=100, now=T0 - 5_000, write=False)
    assert empty["versions"] == [] and empty["model"] == "wine"
    both = build_report(ctx, "wine", window=T1 + 200 - T0, now=T1 + 150, write=False)
    assert both["versions"][0]["n_current"] == 800


def test_rows_of_a_version_without_a_profile_are_reported_as_such(ctx: Context) -> None:
    frame = wine_frame(20, seed=5)
    table = pa.table({
        "ts": pa.array([int((T0 + 20_000 + i) * 1e6) for i in range(20)], pa.int64()).cast(TS),
        "model": ["wine"] * 20, "version": pa.array([7] * 20, pa.int64()), "variant": ["canary"] * 20,
        "source": ["mqtt"] * 20, "device_id": ["d"] * 20, "entity": pa.nulls(20, pa.string()),
        "request_id": [str(i) for i in range(20)],
        "inputs": [orjson.dumps(r).decode() for r in frame[FEATURES].to_dict("records")],
        "prediction": ['{"prediction": "good"}'] * 20,
    }, schema=MODEL_INPUTS_SCHEMA)
    ctx.lake.append(MODEL_INPUTS, table, app_id="cap-v7", version=1)
    report = build_report(ctx, "wine", window=100, now=T0 + 20_050, write=False)
    assert report["versions"] == [{"version": 7, "variant": "canary", "n_current": 20, "status": "no_reference",
                                   "dataset_drift": None, "share_drifted": None, "features": [], "prediction": None}]


def test_an_unknown_model_is_not_found(ctx: Context) -> None:
    with pytest.raises(NotFound, match="not registered"):
        build_report(ctx, "no-such-model", window=60)
    with pytest.raises(NotFound):
        build_report(ctx, "bad/name", window=60)
    with pytest.raises(InvalidInput):
        build_report(ctx, "wine", window=-1)


def test_drift_rules_refuse_unknown_models_and_need_the_registry(ctx: Context) -> None:
    with pytest.raises(InvalidInput, match="no-such-model.*not registered"):
        define_drift({"drift": "no-such-model"}, ctx, 60)
    with pytest.raises(InvalidInput, match="registry is not reachable"):
        define_drift({"drift": "wine"}, Context(ctx.lake), 60)
    with pytest.raises(InvalidInput, match="--by"):
        define_drift({"drift": "wine", "by": ["x"]}, ctx, 60)
    definition = define_drift({"drift": "wine"}, ctx, 60)
    assert definition.table == "wine" and definition.by == ("model", "version")


def test_the_drift_evaluator_gives_one_sample_per_version_and_throttles_itself(ctx: Context) -> None:
    record = define_rule(ctx, "wine-drift", kind="drift", spec={"drift": "wine"}, window=200, every=1)
    evaluator = drift_evaluator(record, ctx)
    first = evaluator.evaluate(T0 + 150)
    assert isinstance(first, list) and len(first) == 1
    sample = first[0]
    assert isinstance(sample, Sample) and dict(sample.labels) == {"model": "wine", "version": "1"}
    assert sample.breached is True and sample.value >= 2 / 3
    assert evaluator.evaluate(T0 + 150.5) is first and evaluator.builds == 1  # within min_interval: no rebuild
    steady = evaluator.evaluate(T1 + 150)
    assert evaluator.builds == 2 and steady[0].breached is False and steady[0].value <= 1 / 3
    assert evaluator.evaluate(T0 - 5_000) is NO_DATA
    gone = drift_evaluator(record, Context(ctx.lake)).evaluate(T0 + 150)
    assert isinstance(gone, EvalError) and "registry" in gone.message
    missing = drift_evaluator(record, ctx).evaluate(T0 + 20_050)  # only v7 (no profile) in that window
    assert isinstance(missing, EvalError) and "no reference profile" in missing.message


def test_the_report_over_http_and_the_cli(wine: tuple[Any, Workbench, Catalog], monkeypatch: pytest.MonkeyPatch
                                          ) -> None:
    import socket
    import threading

    import uvicorn
    from typer.testing import CliRunner

    from iot2ml.api.app import create_app
    from iot2ml.auth.store import Keys
    from iot2ml.cli import app as cli

    settings, bench, catalog = wine
    monkeypatch.setenv("IOT2ML_CONFIG", "/dev/null")
    # The captured rows are in the past (T0, T1): capture some now, so that the default window sees them.
    capture(bench.lake, bench.registry.load("wine", "1", unwrap=True), wine_frame(200, seed=4, shift=1.0),
            start=time.time() - 120, version=1, app="cap-now", seq=1)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(settings, catalog=catalog, lake=bench.lake), host="127.0.0.1",
                                           port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 60
        while not server.started:
            assert time.monotonic() < deadline and thread.is_alive(), "the API did not start"
            time.sleep(0.05)
        url = f"http://127.0.0.1:{port}/api/v1/monitor"
        headers = {"Authorization": f"Bearer {Keys(catalog).add_key('report-reader', 'reader')}"}
        r = httpx.get(f"{url}/wine", params={"window": "1h"}, headers=headers, timeout=60)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["model"] == "wine" and body["window_seconds"] == 3600.0
        assert body["versions"][0]["n_current"] == 200 and body["versions"][0]["dataset_drift"] is True
        assert httpx.get(f"{url}/nope", headers=headers, timeout=60).status_code == 404
        for bad in ("abc", "-1h", "nan", "0", "99999d"):
            assert httpx.get(f"{url}/wine", params={"window": bad}, headers=headers, timeout=60).status_code == 422
        assert httpx.get(f"{url}/wine", params={"windw": "1h"}, headers=headers, timeout=60).status_code == 422
        assert httpx.get(f"{url}/wine", timeout=60).status_code == 401
        metrics = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=60).text
        assert 'iot2ml_model_dataset_drift{model="wine",version="1"} 1.0' in metrics
    finally:
        server.should_exit = True
        thread.join(15)

    out = CliRunner().invoke(cli, ["monitor", "report", "wine", "--window", "1h", "--json",
                                   "--data-dir", str(settings.data_dir)])
    assert out.exit_code == 0, out.output
    assert json.loads(out.output)["versions"][0]["dataset_drift"] is True
    out = CliRunner().invoke(cli, ["monitor", "report", "wine", "--data-dir", str(settings.data_dir)],
                             env={"COLUMNS": "200"})
    assert out.exit_code == 0, out.output
    assert "dataset drift" in out.output and "alcohol" in out.output and "ks" in out.output


def test_captured_values_of_the_wrong_type_count_as_missing_not_as_a_failure(ctx: Context) -> None:
    from iot2ml.monitor.report import decode

    part = pa.table({"inputs": ['{"alcohol": 11.0, "volatile_acidity": 0.4, "ph": 3.3}',
                                '{"alcohol": "n/a", "volatile_acidity": 0.5}', None],
                     "prediction": ['{"prediction": "good"}', '{"prediction": 7}', None]})
    current = decode(part, ctx.models.reference_profile("wine", 1))
    assert current.column("alcohol").to_pylist() == [11.0, None]
    assert current.column("ph").to_pylist() == [3.3, None]
    assert current.column("prediction").to_pylist() == ["good", "7"]
