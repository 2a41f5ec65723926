"""Live quality (answers judged against labels and later telemetry), river's change detectors on the
error stream, and the ``--metric`` / ``--anomaly`` alert kinds, over a real lake and a real MLflow
registry of small trained models (read through ``wiring.ModelOps``, as the monitor does)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from iot2ml.core.config import load_settings
from iot2ml.core.errors import InvalidInput
from iot2ml.core.tables import (
    LABELS,
    LABELS_SCHEMA,
    MODEL_INPUTS,
    MODEL_INPUTS_SCHEMA,
    MONITOR_REPORTS_SCHEMA,
    PREDICTIONS,
    PREDICTIONS_SCHEMA,
)
from iot2ml.lake import Lake
from iot2ml.ml.jobs import TrainJob
from iot2ml.ml.workbench import Workbench
from iot2ml.monitor.kinds import Context, kind_of, rule_spec
from iot2ml.monitor.live import AnomalyEvaluator, MetricEvaluator, live_quality
from iot2ml.monitor.rules import NO_DATA, EvalError, Sample
from iot2ml.wiring import ModelOps

T0 = 1_800_000_000.0  # 2027-01-15: every test owns its clock
TS = pa.timestamp("us", tz="UTC")
DAY = 86_400.0


def stamp(seconds: float) -> int:
    return round(seconds * 1_000_000)


# ---- a real registry: three small models trained once for the module ------------------------------

def wine_frame(n: int, seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    alcohol = rng.normal(10.5, 1.2, n)
    acidity = rng.normal(0.5, 0.15, n)
    score = alcohol - 4 * acidity + rng.normal(0, 0.3, n)
    return pd.DataFrame({
        "device_id": [f"station-{i % 3}" for i in range(n)],
        "ts": pd.date_range("2026-11-01", periods=n, freq="min", tz="UTC"),
        "batch_id": [f"b{i}" for i in range(n)],
        "alcohol": alcohol, "volatile_acidity": acidity, "ph": rng.normal(3.3, 0.1, n),
        "quality": np.where(score > 9.4, "best", "good"),
    })


def pump_frame(n: int, seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame({
        "device_id": [f"pump-{i % 4}" for i in range(n)],
        "ts": pd.date_range("2026-11-01", periods=n, freq="min", tz="UTC"),
        "pressure": rng.normal(4.0, 0.2, n), "flow": rng.normal(60.0, 3.0, n),
    })


def temps_frame(start: float, hours: int, seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    ts = pd.to_datetime(start, unit="s", utc=True) + pd.to_timedelta(np.arange(hours), unit="h")
    frames = [pd.DataFrame({"device_id": d, "ts": ts,
                            "temp": 20 + 5 * np.sin(2 * np.pi * np.arange(hours) / 24) + rng.normal(0, 0.3, hours)})
              for d in ("t1", "t2")]
    return pd.concat(frames, ignore_index=True)


def write_readings(lake: Any, table: str, frame: pd.DataFrame, version: int) -> None:
    frame = frame.copy()
    frame["received_at"] = frame["ts"]
    frame["_seq"] = np.arange(len(frame)) + version * 1_000_000
    t = pa.Table.from_pandas(frame, preserve_index=False)
    for col in ("ts", "received_at"):
        t = t.set_column(t.schema.get_field_index(col), col, t[col].cast(TS))
    lake.append(table, t, app_id="test", version=version)


class ModelOpsWithoutParams(ModelOps):
    """A ``ModelOps`` that cannot give a run's parameters (as a composition root that does not hand
    them in): regress and forecast quality must say so rather than guess."""

    params = None


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """Settings on a temp data dir with real models: classify ``wine-quality`` (per batch_id, labels
    from the labels table), regress ``wine-alcohol`` (target a column of ``wine``), forecast
    ``temp-6h`` (hourly, 6 steps), anomaly ``pump-blockage``."""
    settings = load_settings(data_dir=tmp_path_factory.mktemp("live") / "data", nats_port=0, mqtt_port=0,
                             http_port=0)
    bench = Workbench(settings)
    frame = wine_frame(120, seed=1)
    write_readings(bench.lake, "wine", frame.drop(columns=["quality"]), 1)
    bench.import_labels(frame[["batch_id", "quality"]].to_dict("records"), entity_column="batch_id",
                        label_column="quality", table="wine", source="taster", who="ann")
    features = ["alcohol", "volatile_acidity", "ph"]
    bench.train(TrainJob(task="classify", table="wine", name="wine-quality",
                         options={"label": "quality", "entity": "batch_id", "features": features, "folds": 3}))
    bench.train(TrainJob(task="regress", table="wine", name="wine-alcohol",
                         options={"label": "alcohol", "features": ["volatile_acidity", "ph"], "folds": 3}))
    write_readings(bench.lake, "temps", temps_frame(T0 - 10 * DAY, 240, seed=3), 1)
    bench.train(TrainJob(task="forecast", table="temps", name="temp-6h",
                         options={"target": "temp", "freq": "1h", "horizon": 6, "candidates": "seasonal_naive",
                                  "n_jobs": 1}))
    write_readings(bench.lake, "pump", pump_frame(400, seed=2), 1)
    bench.train(TrainJob(task="anomaly", table="pump", name="pump-blockage",
                         options={"features": ["pressure", "flow"], "contamination": 0.05}))
    return settings


@pytest.fixture
def lake(tmp_path: Path) -> Lake:
    return Lake(str(tmp_path / "lake"))


@pytest.fixture
def ctx(registry: Any, lake: Lake) -> Context:
    return Context(lake, None, registry, ModelOps(registry, None))


# ---- rows as serving, people and the scorer write them --------------------------------------------

def capture(lake: Lake, model: str, rows: list[dict[str, Any]], *, version: int = 1, variant: str = "champion") -> None:
    """Rows of ``model_inputs`` as serving captures them: ``ts``, ``entity``/``device_id``, the answer JSON."""
    table = pa.Table.from_pylist([{
        "ts": stamp(r["ts"]), "model": model, "version": r.get("version", version), "variant": r.get("variant", variant),
        "source": "rest", "device_id": r.get("device_id"), "entity": r.get("entity"), "request_id": None,
        "inputs": json.dumps(r.get("inputs", {})), "prediction": json.dumps(r["answer"]),
    } for r in rows], schema=MODEL_INPUTS_SCHEMA)
    lake.append(MODEL_INPUTS, table, app_id="test-capture", version=int(T0) + len(rows))


def label(lake: Lake, pairs: list[tuple[str, str]], *, at: float) -> None:
    table = pa.Table.from_pylist([{"entity": e, "label": v, "ts": stamp(at), "source": "test", "who": "ann",
                                   "imported_at": stamp(at)} for e, v in pairs], schema=LABELS_SCHEMA)
    lake.append(LABELS, table, app_id="test-labels", version=int(at))


def classify_answer(cls: str) -> dict[str, Any]:
    other = "good" if cls == "best" else "best"
    return {"prediction": cls, "probabilities": {cls: 0.8, other: 0.2}}


def by(result: Any, *keys: str) -> dict[tuple[str, ...], Sample]:
    assert isinstance(result, list), result
    return {tuple(s.labels[k] for k in keys): s for s in result}


def quality(rows: list[dict[str, Any]]) -> dict[tuple[Any, ...], dict[str, Any]]:
    return {(r["version"], r["variant"], r["test"]): r for r in rows}


def metric_rule(ctx: Context, spec: dict[str, Any], window: float = DAY) -> Any:
    """Define the rule through the kinds table (as ``alerts add`` does) and build its evaluator."""
    from iot2ml.monitor.store import RuleRecord

    kind, given = rule_spec(spec)
    definition = kind_of(kind).define(given, ctx, window)
    record = RuleRecord("r", definition.table, definition.what, definition.by, window, 0.0, 10.0, "warning", (),
                        pd.Timestamp.now(tz="UTC").to_pydatetime(), kind, dict(definition.spec))
    return definition, kind_of(kind).evaluator(record, ctx)


# ---- live quality --------------------------------------------------------------------------------

def test_classify_accuracy_and_macro_f1_join_the_latest_label_of_each_entity(ctx, lake):
    # 20 answers "best"; truth: 10 best, 10 good (b10..b19 first said best, then relabelled good); b99 unlabelled
    capture(lake, "wine-quality", [{"ts": T0 + i, "entity": f"b{i}", "answer": classify_answer("best")}
                                   for i in range(20)] + [{"ts": T0 + 30, "entity": "b99",
                                                           "answer": classify_answer("good")}])
    label(lake, [(f"b{i}", "best") for i in range(20)], at=T0 + 100)
    label(lake, [(f"b{i}", "good") for i in range(10, 20)], at=T0 + 200)
    rows = live_quality(ctx, "wine-quality", T0 - 10, T0 + 300)
    found = quality(rows)
    accuracy = found[(1, "champion", "accuracy")]
    assert accuracy["statistic"] == pytest.approx(0.5) and accuracy["n_current"] == 20
    assert accuracy["scope"] == "quality" and accuracy["status"] == "ok"
    # macro F1 over {best, good}: best 2*10/(10+20), good 0
    assert found[(1, "champion", "f1")]["statistic"] == pytest.approx((20 / 30 + 0) / 2)
    assert {r["test"] for r in rows} == {"accuracy", "f1", "adwin", "page_hinkley"}
    # the rows fit the monitor_reports table (the writer stamps ``at``)
    table = pa.Table.from_pylist([{**r, "at": stamp(T0)} for r in rows], schema=MONITOR_REPORTS_SCHEMA)
    assert table.num_rows == len(rows)


def test_numeric_classes_compare_as_numbers_and_versions_variants_are_apart(ctx, lake):
    capture(lake, "wine-quality", [{"ts": T0 + i, "entity": f"e{i}", "answer": {"prediction": 6}} for i in range(4)])
    capture(lake, "wine-quality", [{"ts": T0 + 10 + i, "entity": f"e{i}", "answer": {"prediction": 5.0}}
                                   for i in range(4)], version=2, variant="canary")
    label(lake, [(f"e{i}", "6") for i in range(4)], at=T0 + 50)
    found = quality(live_quality(ctx, "wine-quality", T0, T0 + 60))
    assert found[(1, "champion", "accuracy")]["statistic"] == 1.0
    assert found[(2, "canary", "accuracy")]["statistic"] == 0.0


def test_no_labels_yet_is_no_data(ctx, lake):
    capture(lake, "wine-quality", [{"ts": T0, "entity": "b1", "answer": classify_answer("best")}])
    rows = live_quality(ctx, "wine-quality", T0 - 10, T0 + 10)
    assert {r["status"] for r in rows} == {"no_data"} and all(r["statistic"] is None for r in rows)
    assert {(r["version"], r["variant"]) for r in rows} == {(1, "champion")}


def test_adwin_and_page_hinkley_report_a_jump_in_the_error_stream(ctx, lake):
    rng = np.random.default_rng(0)
    n = 600
    wrong = np.concatenate([rng.random(n // 2) < 0.05, rng.random(n // 2) < 0.9])  # errors jump at row 300
    capture(lake, "wine-quality", [{"ts": T0 + i, "entity": f"b{i}", "answer": classify_answer("good" if w else "best")}
                                   for i, w in enumerate(wrong)])
    label(lake, [(f"b{i}", "best") for i in range(n)], at=T0 + n)
    found = quality(live_quality(ctx, "wine-quality", T0, T0 + n))
    adwin, ph = found[(1, "champion", "adwin")], found[(1, "champion", "page_hinkley")]
    assert adwin["statistic"] >= 1 and adwin["n_current"] == n
    assert T0 + n // 2 <= adwin["last_change"] <= T0 + n and adwin["status"].startswith("changed, last at 2027-")
    assert ph["statistic"] >= 1 and ph["last_change"] >= T0 + n // 2


def test_a_steady_error_stream_reports_no_change(ctx, lake):
    rng = np.random.default_rng(1)
    wrong = rng.random(600) < 0.1
    capture(lake, "wine-quality", [{"ts": T0 + i, "entity": f"b{i}", "answer": classify_answer("good" if w else "best")}
                                   for i, w in enumerate(wrong)])
    label(lake, [(f"b{i}", "best") for i in range(600)], at=T0 + 600)
    found = quality(live_quality(ctx, "wine-quality", T0, T0 + 600))
    assert found[(1, "champion", "adwin")]["statistic"] == 0 and found[(1, "champion", "adwin")]["status"] == "ok"
    assert found[(1, "champion", "adwin")]["last_change"] is None


def test_regress_error_against_the_reading_that_arrived_later(ctx, lake):
    # the truth: wine readings (alcohol) of the same device at the same ts, written after the answers
    capture(lake, "wine-alcohol", [{"ts": T0 + 60 * i, "device_id": "station-1", "answer": {"prediction": 10.0}}
                                   for i in range(10)] + [{"ts": T0 + 5000, "device_id": "station-1",
                                                           "answer": {"prediction": 10.0}}])  # never measured
    frame = pd.DataFrame({"device_id": "station-1", "ts": pd.to_datetime([T0 + 60 * i for i in range(10)], unit="s", utc=True),
                          "alcohol": [10.5 if i % 2 else 9.0 for i in range(10)], "volatile_acidity": 0.5, "ph": 3.3})
    write_readings(lake, "wine", frame, 1)
    found = quality(live_quality(ctx, "wine-alcohol", T0, T0 + 6000))
    assert found[(1, "champion", "mae")]["statistic"] == pytest.approx(0.75)
    assert found[(1, "champion", "rmse")]["statistic"] == pytest.approx(np.sqrt((0.25 + 1.0) / 2))
    assert found[(1, "champion", "mae")]["n_current"] == 10


def test_regress_without_the_run_parameters_says_so(registry, lake):
    ctx = Context(lake, None, registry, ModelOpsWithoutParams(registry, None))
    capture(lake, "wine-alcohol", [{"ts": T0, "device_id": "station-1", "answer": {"prediction": 10.0}}])
    rows = live_quality(ctx, "wine-alcohol", T0 - 1, T0 + 1)
    assert rows and all(r["status"].startswith("unsupported:") and "ModelOps.params" in r["status"] for r in rows)
    assert all(r["statistic"] is None for r in rows)


def test_forecast_error_of_stored_forecasts_against_the_mean_reading_of_each_closed_step(ctx, lake):
    from iot2ml.ml.jobs import score

    # batch scoring (`iot2ml predict`) of the real model writes one row per series and hourly step
    history = temps_frame(T0 - 2 * DAY, 48, seed=4)
    model = ctx.models.bench.registry.load("temp-6h", "1", unwrap=True)
    rows = score("temp-6h", model=model, version=1, task="forecast", frame=history)
    assert rows.num_rows == 12 and set(rows.column("device_id").to_pylist()) == {"t1", "t2"}
    lake.append(PREDICTIONS, rows, app_id="iot2ml-predict-temp-6h", version=1)
    steps = sorted({t.timestamp() for t in rows.column("ts").to_pylist()})
    means = {(d, t.timestamp()): m for d, t, m in zip(rows.column("device_id").to_pylist(),
                                                      rows.column("ts").to_pylist(), rows.column("prediction").to_pylist())}
    # the actuals arrive later: three readings in each hour, averaging 1.0 (t1) / 3.0 (t2) above the forecast
    actual = [{"device_id": d, "ts": pd.Timestamp(t + 60 * k, unit="s", tz="UTC"),
               "temp": means[(d, t)] + off + (k - 1) * 0.5}
              for (d, off) in (("t1", 1.0), ("t2", -3.0)) for t in steps for k in range(3)]
    write_readings(lake, "temps", pd.DataFrame(actual), 1)
    until = steps[3] + 1800  # steps 0..2 have closed; step 3 is still running, 4 and 5 are ahead
    found = quality(live_quality(ctx, "temp-6h", steps[0], until))
    mae = found[(1, "", "mae")]
    assert mae["statistic"] == pytest.approx(2.0) and mae["n_current"] == 6 and mae["kind"] == "forecast"
    assert (1, "", "rmse") not in found and found[(1, "", "adwin")]["statistic"] == 0
    _, rule = metric_rule(ctx, {"metric": "temp-6h:mae", "above": 1.5}, window=until - steps[0])
    sample = by(rule.evaluate(until), "version", "variant")[("1", "")]
    assert sample.value == pytest.approx(2.0) and sample.breached


def test_anomaly_models_have_no_live_metric(ctx):
    rows = live_quality(ctx, "pump-blockage", T0, T0 + 60)
    assert rows and all(r["status"].startswith("unsupported:") and "--anomaly" in r["status"] for r in rows)


# ---- the --metric rule -----------------------------------------------------------------------------

def test_metric_rule_fires_when_labels_disagree_and_not_when_they_agree(ctx, lake):
    definition, rule = metric_rule(ctx, {"metric": "wine-quality:accuracy", "below": "0.8"})
    assert (definition.table, definition.what, definition.by) == ("wine-quality", "accuracy < 0.8",
                                                                   ("version", "variant"))
    assert definition.spec == {"metric": "wine-quality:accuracy", "below": 0.8}
    assert isinstance(rule, MetricEvaluator)
    assert rule.evaluate(T0) is NO_DATA  # nothing captured yet
    capture(lake, "wine-quality", [{"ts": T0 + i, "entity": f"b{i}", "answer": classify_answer("best")}
                                   for i in range(10)])
    assert rule.evaluate(T0 + 20) is NO_DATA  # answers, no labels yet
    label(lake, [(f"b{i}", "best" if i < 5 else "good") for i in range(10)], at=T0 + 30)
    sample = by(rule.evaluate(T0 + 40), "version", "variant")[("1", "champion")]
    assert sample.value == pytest.approx(0.5) and sample.breached
    # people correct their labels: the same answers are now right and the rule is not breached
    label(lake, [(f"b{i}", "best") for i in range(5, 10)], at=T0 + 50)
    sample = by(rule.evaluate(T0 + 60), "version", "variant")[("1", "champion")]
    assert sample.value == 1.0 and not sample.breached


def test_metric_rule_reads_captures_incrementally_and_forgets_the_old(ctx, lake):
    _, rule = metric_rule(ctx, {"metric": "wine-quality:accuracy", "below": 0.8}, window=100.0)
    capture(lake, "wine-quality", [{"ts": T0 + i, "entity": f"b{i}", "answer": classify_answer("good")}
                                   for i in range(10)])
    label(lake, [(f"b{i}", "best") for i in range(20)], at=T0)
    assert by(rule.evaluate(T0 + 10), "version")[("1",)].value == 0.0
    capture(lake, "wine-quality", [{"ts": T0 + 200 + i, "entity": f"b{10 + i}", "answer": classify_answer("best")}
                                   for i in range(10)])
    before = rule.rows_read
    sample = by(rule.evaluate(T0 + 250), "version")[("1",)]
    assert sample.value == 1.0 and not sample.breached  # the wrong answers left the 100 s window
    assert rule.rows_read - before == 10  # only the new captures were read
    sample = by(rule.evaluate(T0 + 260), "version")[("1",)]
    assert sample.value == 1.0 and rule.rows_read - before == 20  # the settle margin re-reads, no double count
    assert rule._buffer.height == 10


def test_metric_rule_counts_a_capture_committed_late_once(ctx, lake):
    _, rule = metric_rule(ctx, {"metric": "wine-quality:accuracy", "below": 0.8}, window=600.0)
    label(lake, [(f"b{i}", "best") for i in range(3)], at=T0)
    capture(lake, "wine-quality", [{"ts": T0 + 10, "entity": "b0", "answer": classify_answer("best")}])
    assert by(rule.evaluate(T0 + 20), "version")[("1",)].value == 1.0
    # another serving process commits an older capture after the first was read (inside the settle margin)
    capture(lake, "wine-quality", [{"ts": T0 + 5, "entity": "b1", "answer": classify_answer("good")},
                                   {"ts": T0 + 25, "entity": "b2", "answer": classify_answer("best")}])
    sample = by(rule.evaluate(T0 + 30), "version")[("1",)]
    assert sample.value == pytest.approx(2 / 3) and sample.breached
    assert by(rule.evaluate(T0 + 40), "version")[("1",)].value == pytest.approx(2 / 3)
    assert rule._buffer.height == 3


def test_answers_without_an_entity_take_the_label_of_their_device(ctx, lake):
    # a model without an entity column is trained on the labels of its devices: judged the same way
    capture(lake, "wine-quality", [{"ts": T0 + i, "device_id": f"station-{i % 2}", "answer": classify_answer("best")}
                                   for i in range(4)])
    label(lake, [("station-0", "best"), ("station-1", "good")], at=T0 + 10)
    found = quality(live_quality(ctx, "wine-quality", T0, T0 + 10))
    assert found[(1, "champion", "accuracy")]["statistic"] == 0.5 and found[(1, "champion", "accuracy")]["n_current"] == 4


def test_metric_rule_on_regress_mae_above(ctx, lake):
    _, rule = metric_rule(ctx, {"metric": "wine-alcohol:mae", "above": 0.5})
    capture(lake, "wine-alcohol", [{"ts": T0 + 60 * i, "device_id": "station-2", "answer": {"prediction": 11.0}}
                                   for i in range(5)])
    frame = pd.DataFrame({"device_id": "station-2", "ts": pd.to_datetime([T0 + 60 * i for i in range(5)], unit="s", utc=True),
                          "alcohol": 10.0, "volatile_acidity": 0.5, "ph": 3.3})
    write_readings(lake, "wine", frame, 1)
    sample = by(rule.evaluate(T0 + 400), "version")[("1",)]
    assert sample.value == pytest.approx(1.0) and sample.breached


def test_metric_rule_that_cannot_judge_is_an_error_not_a_crash(registry, lake):
    ctx = Context(lake, None, registry, ModelOpsWithoutParams(registry, None))
    _, rule = metric_rule(ctx, {"metric": "wine-alcohol:rmse", "above": 1})
    capture(lake, "wine-alcohol", [{"ts": T0, "device_id": "station-1", "answer": {"prediction": 10.0}}])
    result = rule.evaluate(T0 + 1)
    assert isinstance(result, EvalError) and "ModelOps.params" in result.message


# ---- the --anomaly rule ----------------------------------------------------------------------------

def scored(lake: Lake, rows: list[tuple[str, float, bool]], *, at: float, model: str = "pump-blockage") -> None:
    """Rows of ``predictions`` as the streaming scorer writes them: ``label`` anomaly/normal."""
    table = pa.Table.from_pylist([{
        "device_id": d, "entity": None, "ts": stamp(ts), "model": model, "version": 1, "task": "anomaly",
        "prediction": 0.9 if flag else 0.1, "label": "anomaly" if flag else "normal", "scores": None,
        "scored_at": stamp(at)} for d, ts, flag in rows], schema=PREDICTIONS_SCHEMA)
    lake.append(PREDICTIONS, table, app_id="iot2ml-stream-pump-blockage", version=int(at))


def test_anomaly_rule_fires_for_the_flagged_device_only(ctx, lake):
    definition, rule = metric_rule(ctx, {"anomaly": "pump-blockage"}, window=60.0)
    assert (definition.table, definition.by, definition.spec) == ("pump-blockage", ("device_id",),
                                                                  {"anomaly": "pump-blockage"})
    assert isinstance(rule, AnomalyEvaluator)
    assert rule.evaluate(T0) is NO_DATA
    scored(lake, [("p1", T0 + 1, False), ("p2", T0 + 1, False), ("p1", T0 + 2, True), ("p1", T0 + 3, True)], at=T0 + 4)
    scored(lake, [("p3", T0 + 2, False)], at=T0 + 4, model="other-model")
    samples = by(rule.evaluate(T0 + 5), "device_id")
    assert set(samples) == {("p1",), ("p2",)}
    assert samples[("p1",)].breached and samples[("p1",)].value == 2.0
    assert not samples[("p2",)].breached and samples[("p2",)].value == 0.0
    # a later flag of p2 arrives; the earlier rows are re-read within the settle margin but counted once
    scored(lake, [("p2", T0 + 10, True)], at=T0 + 11)
    samples = by(rule.evaluate(T0 + 12), "device_id")
    assert samples[("p1",)].value == 2.0 and samples[("p2",)].value == 1.0 and samples[("p2",)].breached
    # once p1's flags are older than the window, p1 drops out (its alert resolves); p2's is still inside
    scored(lake, [("p1", T0 + 64, False)], at=T0 + 64)
    samples = by(rule.evaluate(T0 + 65), "device_id")
    assert samples[("p1",)].value == 0.0 and not samples[("p1",)].breached
    assert samples[("p2",)].breached


def test_anomaly_rule_follows_scored_at_not_the_whole_table(ctx, lake):
    _, rule = metric_rule(ctx, {"anomaly": "pump-blockage"}, window=3600.0)
    scored(lake, [(f"p{i}", T0 + i, False) for i in range(50)], at=T0 + 60)
    rule.evaluate(T0 + 61)
    scored(lake, [("p1", T0 + 200, True)], at=T0 + 200)
    rule.evaluate(T0 + 201)  # reads from the mark (T0 + 60) minus the settle margin: all 51 rows
    scored(lake, [("p2", T0 + 300, True)], at=T0 + 300)
    before = rule.rows_read
    samples = by(rule.evaluate(T0 + 1000), "device_id")
    assert rule.rows_read - before == 2  # scored_at >= T0 + 200 - 30: the two new rows, not the 50 old ones
    assert samples[("p1",)].value == 1.0 and samples[("p2",)].value == 1.0 and len(samples) == 50
    assert sum(s.breached for s in samples.values()) == 2


# ---- refusals at `alerts add` --------------------------------------------------------------------

class Describes:
    """Only for define-time validation of a model the registry cannot hold here (no task tag): the
    registry's ``describe()`` signature; everything else above uses the real registry."""

    def describe(self, model: str, ref: str | int = "champion") -> dict[str, Any]:
        return {"name": model, "version": 1, "task": None, "run_id": "x"}


@pytest.mark.parametrize(("spec", "named"), [
    ({"metric": "nope:accuracy", "below": 0.8}, "--metric 'nope': model 'nope' is not registered"),
    ({"metric": "wine-quality:mae", "below": 0.8}, "'mae' is not a live metric of classify model wine-quality"),
    ({"metric": "wine-quality:accuracy"}, "neither --below nor --above"),
    ({"metric": "wine-quality:accuracy", "below": 0.8, "above": 0.9}, "both --below and --above"),
    ({"metric": "wine-quality:accuracy", "below": "high"}, "--below 'high' is not a number"),
    ({"metric": "wine-quality", "below": 0.8}, "must be MODEL:METRIC"),
    ({"metric": "pump-blockage:accuracy", "below": 0.8}, "--anomaly pump-blockage"),
    ({"anomaly": "nope"}, "--anomaly 'nope': model 'nope' is not registered"),
    ({"anomaly": "wine-quality"}, "is a classify model, not an anomaly model: watch its quality with --metric"),
    ({"anomaly": "pump-blockage", "below": 1}, "--below do(es) not apply to a --anomaly rule"),
])
def test_bad_rules_are_refused_with_the_flag_and_an_example(ctx, spec, named):
    with pytest.raises(InvalidInput) as err:
        metric_rule(ctx, spec)
    assert named in str(err.value)
    if "metric" in spec and "MODEL:METRIC" not in named and "not a live metric" not in named and "anomaly" not in named:
        assert "--metric wine-quality:accuracy --below 0.8" in str(err.value)


def test_metric_of_a_model_without_a_task_and_without_a_registry_is_refused(lake):
    with pytest.raises(InvalidInput, match="no live metric"):
        kind_of("metric").define({"metric": "m:accuracy", "below": 0.8}, Context(lake, models=Describes()), DAY)
    with pytest.raises(InvalidInput, match="no model registry"):
        kind_of("anomaly").define({"anomaly": "m"}, Context(lake), DAY)


def test_f1_alias_and_metric_evaluator_of_a_stored_rule(ctx):
    definition, rule = metric_rule(ctx, {"metric": "wine-quality:macro_f1", "above": 0.1})
    assert definition.spec == {"metric": "wine-quality:f1", "above": 0.1} and definition.what == "f1 > 0.1"
    assert (rule.metric, rule.op, rule.threshold) == ("f1", "above", 0.1)
