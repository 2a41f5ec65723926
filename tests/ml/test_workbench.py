"""The workbench end to end on real Delta tables and a real MLflow store: train, register, list,
label joins, batch scoring into `predictions`, scheduled retraining and its history."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from iot2ml.core.catalog import Catalog
from iot2ml.ml.jobs import TrainJob
from iot2ml.ml.schedules import Schedules
from iot2ml.ml.scheduler import Scheduler
from iot2ml.ml.workbench import Workbench

TS = pa.timestamp("us", tz="UTC")


def write(lake, table: str, frame: pd.DataFrame, version: int) -> None:
    frame = frame.copy()
    frame["received_at"] = frame["ts"]
    frame["_seq"] = np.arange(len(frame)) + version * 1_000_000
    t = pa.Table.from_pandas(frame, preserve_index=False)
    t = t.set_column(t.schema.get_field_index("ts"), "ts", t["ts"].cast(TS))
    t = t.set_column(t.schema.get_field_index("received_at"), "received_at", t["received_at"].cast(TS))
    lake.append(table, t, app_id="test", version=version)


def wine(n: int, seed: int, start: str = "2026-11-01") -> tuple[pd.DataFrame, list[dict]]:
    rng = np.random.default_rng(seed)
    alcohol = rng.normal(10.5, 1.2, n)
    acidity = rng.normal(0.5, 0.15, n)
    score = alcohol - 4 * acidity + rng.normal(0, 0.3, n)
    quality = np.where(score > 10.2, "best", np.where(score > 8.6, "better", "good"))
    batches = [f"b{seed}-{i}" for i in range(n)]
    frame = pd.DataFrame({
        "device_id": "station-1", "ts": pd.date_range(start, periods=n, freq="min", tz="UTC"),
        "batch_id": batches, "alcohol": alcohol, "volatile_acidity": acidity, "ph": rng.normal(3.3, 0.1, n),
    })
    labels = [{"batch_id": b, "quality": q} for b, q in zip(batches, quality)]
    return frame, labels


@pytest.fixture
def bench(settings):
    return Workbench(settings)


def test_classify_with_labels_table_then_predict(bench):
    frame, labels = wine(300, seed=1)
    write(bench.lake, "wine", frame, 1)
    assert bench.import_labels(labels, entity_column="batch_id", label_column="quality", table="wine",
                               source="taster", who="ann") == 300
    described = bench.train(TrainJob(task="classify", table="wine", name="wine-quality",
                                     options={"label": "quality", "entity": "batch_id"}))
    assert described["version"] == 1 and "champion" in described["aliases"]
    assert described["metrics"]["macro_f1"] > described["baseline_metrics"]["macro_f1"] + 0.2
    assert described["data_versions"]["wine"] == 0 and "labels" in described["data_versions"]

    out = bench.predict("wine-quality", table="wine", where="batch_id IN ('b1-0', 'b1-1', 'b1-2')")
    assert out["rows"] == 3
    from iot2ml.query import run_query

    rows = run_query(bench.lake, "SELECT entity, label, model, version FROM predictions ORDER BY entity").rows
    assert [r[0] for r in rows] == ["b1-0", "b1-1", "b1-2"]
    assert all(r[1] in {"good", "better", "best"} and r[2] == "wine-quality" and r[3] == 1 for r in rows)
    listed = bench.models()
    assert listed[0]["name"] == "wine-quality" and listed[0]["task"] == "classify"


def test_scheduler_retrains_and_records_failures(bench, settings):
    frame, labels = wine(200, seed=2)
    write(bench.lake, "wine", frame, 1)
    bench.import_labels(labels, entity_column="batch_id", label_column="quality", table=None, source="t", who="x")
    schedules = Schedules(Catalog(settings.catalog))
    schedules.add("retrain-wine", {"task": "classify", "table": "wine", "name": "wine-q", "where": None,
                                   "options": {"label": "quality", "entity": "batch_id"}}, min_new_rows=100)
    schedules.add("broken", {"task": "classify", "table": "no_such_table", "name": "nope", "where": None,
                             "options": {"label": "quality"}}, every_seconds=3600)
    scheduler = Scheduler(settings)
    first = {r["schedule"]: r for r in scheduler.tick()}
    assert first["retrain-wine"]["status"] == "ok" and first["retrain-wine"]["version"] == 1
    assert first["broken"]["status"] == "failed" and "no_such_table" in first["broken"]["error"]
    assert scheduler.tick() == []  # nothing new

    more, more_labels = wine(150, seed=3)
    write(bench.lake, "wine", more, 2)
    bench.import_labels(more_labels, entity_column="batch_id", label_column="quality", table=None, source="t", who="x")
    again = scheduler.tick()
    assert [(r["schedule"], r["trigger"], r["status"]) for r in again] == [("retrain-wine", "150 new rows", "ok")]
    history = schedules.runs("retrain-wine")
    assert [h["status"] for h in history] == ["ok", "ok"] and history[0]["model_version"] == 2
    assert any(m["name"] == "wine-q" and "champion" in m["aliases"] for m in bench.models())
    failed = schedules.runs("broken")
    assert failed[0]["status"] == "failed" and failed[0]["duration_s"] is not None


def test_forecast_train_and_predict_future_steps(bench):
    rng = np.random.default_rng(5)
    hours = pd.date_range("2026-11-01", periods=24 * 12, freq="h", tz="UTC")
    frames = []
    for d in range(3):
        t = np.arange(len(hours))
        ozone = 40 + 15 * np.sin(2 * np.pi * (t % 24) / 24) + 0.05 * t + rng.normal(0, 2, len(t))
        frames.append(pd.DataFrame({"device_id": f"station-{d}", "ts": hours + pd.Timedelta(minutes=7 * d),
                                    "ozone": ozone}))
    write(bench.lake, "pollution", pd.concat(frames, ignore_index=True), 1)
    described = bench.train(TrainJob(task="forecast", table="pollution", name="ozone-24h",
                                     options={"target": "ozone", "freq": "1h", "horizon": 24, "n_jobs": 1,
                                              "candidates": "seasonal_naive,lightgbm"}))
    assert described["task"] == "forecast"
    assert described["metrics"]["mase"] < described["baseline_metrics"]["mase"]
    out = bench.predict("ozone-24h", table="pollution")
    assert out["rows"] == 3 * 24
    from iot2ml.query import run_query

    rows = run_query(bench.lake, "SELECT device_id, min(ts), max(ts), count(*), min(prediction) "
                                 "FROM predictions GROUP BY 1 ORDER BY 1").rows
    assert [r[0] for r in rows] == ["station-0", "station-1", "station-2"]
    assert all(r[3] == 24 and r[1] > "2026-11-12T23" for r in rows)  # the next 24 hours, in the future
    scores = run_query(bench.lake, "SELECT scores FROM predictions LIMIT 1").rows[0][0]
    assert set(__import__("json").loads(scores)) == {"q0.1", "q0.5", "q0.9"}


def test_a_new_version_needs_enough_newer_entities_to_be_compared(bench):
    frame, labels = wine(240, seed=7)
    write(bench.lake, "wine", frame, 1)
    bench.import_labels(labels, entity_column="batch_id", label_column="quality", table=None, source="t", who="x")
    job = TrainJob(task="classify", table="wine", name="wq",
                   options={"label": "quality", "entity": "batch_id", "folds": 3})
    first = bench.train(job)
    assert "champion" in first["aliases"] and first["trained_until"] == "2026-11-01T03:59:00+00:00"
    more, more_labels = wine(12, seed=8, start="2026-11-02")
    write(bench.lake, "wine", more, 2)
    bench.import_labels(more_labels, entity_column="batch_id", label_column="quality", table=None, source="t",
                        who="x")
    second = bench.train(job)
    assert second["aliases"] == ["challenger"] and second["compared_by"] == "not compared"
    assert second["promotion"] == ("only 12 labelled entities are newer than the champion's data "
                                   "(2026-11-01T03:59:00Z), min_holdout is 20: wait for more data or lower "
                                   "min_holdout: champion v1 kept; deploy version 2 explicitly to override")


def pumps(n: int, seed: int, start: str = "2026-11-01") -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    frames = []
    for d in range(3):
        blocked = np.zeros(n, dtype=bool)
        for start_at in rng.choice(np.arange(50, n - 40), 4, replace=False):
            blocked[start_at:start_at + 15] = True
        frames.append(pd.DataFrame({
            "device_id": f"p{d}", "ts": pd.date_range(start, periods=n, freq="min", tz="UTC"),
            "pressure": 3 + rng.normal(0, 0.1, n) + blocked * 1.5, "flow": 12 + rng.normal(0, 0.3, n) - blocked * 5,
            "temperature": rng.normal(20, 1, n), "blocked": blocked.astype(int),
        }))
    return pd.concat(frames, ignore_index=True)


def test_a_champion_that_cannot_score_the_new_data_is_kept(bench):
    write(bench.lake, "pump", pumps(400, seed=3), 1)
    bench.train(TrainJob(task="anomaly", table="pump", name="pb",
                         options={"features": ["pressure", "flow", "temperature"], "label": "blocked"}))
    # Newer readings from pumps without a temperature sensor, in another table, for the same model.
    write(bench.lake, "pump_v2", pumps(400, seed=4, start="2026-11-02").drop(columns="temperature"), 1)
    second = bench.train(TrainJob(task="anomaly", table="pump_v2", name="pb",
                                  options={"features": ["pressure", "flow"], "label": "blocked"}))
    assert second["aliases"] == ["challenger"] and second["compared_by"] == "not compared"
    assert second["promotion"].startswith("the champion cannot score the holdout: anomaly input column(s) "
                                          "'temperature' missing from the frame")
    assert second["promotion"].endswith("champion v1 kept; deploy version 2 explicitly to override")


def test_labels_join_by_time_window(bench):
    """Blockage events labelled on devices apply to the readings within the window after the label."""
    n = 400
    rng = np.random.default_rng(11)
    ts = pd.date_range("2026-11-01", periods=n, freq="min", tz="UTC")
    frames, labels = [], []
    for d in range(3):
        blocked = np.zeros(n, dtype=bool)
        for start in (80 + 40 * d, 250 + 20 * d):
            blocked[start:start + 10] = True
            labels.append({"device_id": f"p{d}", "state": "1", "at": ts[start].isoformat()})
            labels.append({"device_id": f"p{d}", "state": "0", "at": ts[start + 10].isoformat()})
        frames.append(pd.DataFrame({"device_id": f"p{d}", "ts": ts,
                                    "pressure": 3 + rng.normal(0, 0.1, n) + blocked * 1.5,
                                    "flow": 12 + rng.normal(0, 0.3, n) - blocked * 5}))
    write(bench.lake, "pump", pd.concat(frames, ignore_index=True), 1)
    bench.import_labels(labels, entity_column="device_id", label_column="state", table="pump", source="ops",
                        who="x", time_column="at")
    job = TrainJob(task="anomaly", table="pump", name="pb-window",
                   options={"features": ["pressure", "flow"], "label": "blocked", "label_window": 3600})
    from iot2ml.ml.jobs import training_sql

    frame = bench.read(training_sql(job, bench.lake.tables(), bench.columns("pump")))
    p0 = frame[frame["device_id"] == "p0"].sort_values("ts")
    assert p0["blocked"].iloc[:80].isna().all()  # before any label
    assert (p0["blocked"].iloc[80:90] == True).all() and (p0["blocked"].iloc[90:150] == False).all()
    assert p0["blocked"].iloc[151:250].isna().all()  # the "0" label is older than the hour window
    described = bench.train(job)
    assert described["metrics"]["event_f1"] > described["baseline_metrics"]["event_f1"]
