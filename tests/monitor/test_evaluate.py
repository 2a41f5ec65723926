"""Alert conditions compiled against a table's schema and evaluated incrementally over a real lake."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from iot2ml.core.errors import InvalidInput
from iot2ml.lake import Lake
from iot2ml.monitor.evaluate import CompiledRule, WindowEvaluator, compile_rule
from iot2ml.monitor.grouping import AlertEngine
from iot2ml.monitor.rules import NO_DATA, EvalError, Rule, Sample

T0 = 1_800_000_000.0  # 2027-01-15: every test owns its clock
TS = pa.timestamp("us", tz="UTC")
TABLE = "pump"


class Writer:
    """Appends readings to a real lake table with increasing ``_seq``, as the ingest does."""

    def __init__(self, lake: Lake) -> None:
        self.lake, self.seq, self.commits = lake, 0, 0

    def write(self, devices: list[str], ts: list[float], pressure: list[float], flow: list[float] | None = None) -> None:
        n = len(devices)
        seqs = np.arange(self.seq + 1, self.seq + n + 1, dtype=np.int64)
        self.seq += n
        self.commits += 1
        table = pa.table({
            "device_id": pa.array(devices, pa.string()),
            "ts": pa.array([int(t * 1_000_000) for t in ts], pa.int64()).cast(TS),
            "_seq": pa.array(seqs, pa.int64()),
            "pressure": pa.array(pressure, pa.float64()),
            "flow": pa.array(flow if flow is not None else [1.0] * n, pa.float64()),
        })
        self.lake.append(TABLE, table, app_id="test-ingest", version=self.commits)


@pytest.fixture
def lake(tmp_path: Path) -> Lake:
    return Lake(str(tmp_path / "lake"))


@pytest.fixture
def writer(lake: Lake) -> Writer:
    return Writer(lake)


def compiled(lake: Lake, when: str, by: tuple[str, ...] = ("device_id",), window: float = 60) -> CompiledRule:
    return compile_rule(TABLE, when, by, window, schema=lake.schema(TABLE))


def by_device(result) -> dict[str, Sample]:
    assert isinstance(result, list), result
    return {s.labels["device_id"]: s for s in result}


# ---- compile ---------------------------------------------------------------------------
def test_compile_reads_the_contract_example(lake, writer):
    writer.write(["p1"], [T0], [1.0])
    rule = compiled(lake, "max(pressure) > 5")
    assert (rule.agg, rule.column, rule.op, rule.threshold, rule.by) == ("max", "pressure", ">", 5.0, ("device_id",))
    assert set(rule.columns) == {"ts", "_seq", "device_id", "pressure"}
    assert compiled(lake, " AVG( flow )<2.5").agg == "avg"
    assert compiled(lake, "mean(flow) <> 1e1").op == "!="
    star = compiled(lake, "count(*) = 0")
    assert (star.agg, star.column, star.op, star.threshold) == ("count", None, "=", 0.0)


@pytest.mark.parametrize(("when", "named"), [
    ("max(pressure) > 5; DROP TABLE pump", "';'"),
    ("max((SELECT 1)) > 5", "nests"),
    ("max(pressure) > (select 5)", "nests"),
    ("max(pressure) > 5 and min(pressure) < 1", "more than one comparison"),
    ("max(pressure) > 5 > 4", "more than one comparison"),
    ("median(pressure) > 5", "'median' is not an aggregate"),
    ("read_csv(pressure) > 5", "'read_csv' is not an aggregate"),
    ("max(pressure) + 1 > 5", "not one aggregate compared with a number"),
    ("max(pressure) > flow", "not one aggregate compared with a number"),
    ("max(pressure)", "not one aggregate compared with a number"),
    ("pressure > 5", "not one aggregate compared with a number"),
    ("max(*) > 5", "only count takes '*'"),
    ("max(temperature) > 5", "column 'temperature' is not in table 'pump'"),
    ("max(device_id) > 5", "needs a numeric column"),
    ("max(pressure) > 1e999", "out of range"),
])
def test_compile_refuses_with_the_reason(lake, writer, when, named):
    writer.write(["p1"], [T0], [1.0])
    with pytest.raises(InvalidInput) as err:
        compiled(lake, when)
    assert named in str(err.value)


def test_compile_refuses_unknown_table_column_and_window(lake, writer):
    with pytest.raises(InvalidInput, match="table 'pump' does not exist"):
        compile_rule(TABLE, "max(pressure) > 5", (), 60, schema=None)
    writer.write(["p1"], [T0], [1.0])
    with pytest.raises(InvalidInput) as err:
        compiled(lake, "max(temperature) > 5")
    assert "device_id, ts, _seq, pressure, flow" in str(err.value)  # the table's columns are listed
    with pytest.raises(InvalidInput, match="--by column 'site'"):
        compiled(lake, "max(pressure) > 5", by=("site",))
    for window in (0, -60, float("nan"), float("inf")):
        with pytest.raises(InvalidInput, match="--window"):
            compiled(lake, "max(pressure) > 5", window=window)


# ---- evaluate --------------------------------------------------------------------------
def test_aggregates_per_device_with_breaches(lake, writer):
    writer.write(["p1", "p1", "p2", "p2", "p3"], [T0 - 50, T0 - 10, T0 - 40, T0 - 5, T0 - 1],
                 [4.0, 6.0, 1.0, 2.0, 5.0], [1.0, 3.0, 2.0, 4.0, 9.0])
    result = by_device(WindowEvaluator(lake, compiled(lake, "max(pressure) > 5")).evaluate(T0))
    assert {d: (s.value, s.breached) for d, s in result.items()} == {
        "p1": (6.0, True), "p2": (2.0, False), "p3": (5.0, False)}
    result = by_device(WindowEvaluator(lake, compiled(lake, "avg(flow) < 2.5")).evaluate(T0))
    assert {d: (s.value, s.breached) for d, s in result.items()} == {
        "p1": (2.0, True), "p2": (3.0, False), "p3": (9.0, False)}
    result = by_device(WindowEvaluator(lake, compiled(lake, "count(*) >= 2")).evaluate(T0))
    assert {d: (s.value, s.breached) for d, s in result.items()} == {
        "p1": (2.0, True), "p2": (2.0, True), "p3": (1.0, False)}
    result = by_device(WindowEvaluator(lake, compiled(lake, "last(pressure) != 6")).evaluate(T0))
    assert {d: (s.value, s.breached) for d, s in result.items()} == {
        "p1": (6.0, False), "p2": (2.0, True), "p3": (5.0, True)}
    overall = WindowEvaluator(lake, compiled(lake, "sum(pressure) > 17", by=())).evaluate(T0)
    assert overall == [Sample(labels={}, value=18.0, breached=True)]


def test_old_rows_drop_out_of_the_window(lake, writer):
    writer.write(["p1", "p1"], [T0 - 30, T0], [9.0, 1.0])
    ev = WindowEvaluator(lake, compiled(lake, "max(pressure) > 5", window=60))
    assert by_device(ev.evaluate(T0))["p1"] == Sample({"device_id": "p1"}, 9.0, True)
    assert ev.buffered == 2
    after = by_device(ev.evaluate(T0 + 31))  # the 9.0 is now 61 s old
    assert after["p1"] == Sample({"device_id": "p1"}, 1.0, False)
    assert ev.buffered == 1
    assert ev.evaluate(T0 + 61) is NO_DATA
    assert ev.buffered == 0


def test_empty_window_is_no_data_but_count_without_by_is_zero(lake, writer):
    writer.write(["p1"], [T0 - 3600], [9.0])
    assert WindowEvaluator(lake, compiled(lake, "max(pressure) > 5")).evaluate(T0) is NO_DATA
    assert WindowEvaluator(lake, compiled(lake, "count(*) > 0")).evaluate(T0) is NO_DATA
    silent = WindowEvaluator(lake, compiled(lake, "count(*) = 0", by=())).evaluate(T0)
    assert silent == [Sample(labels={}, value=0.0, breached=True)]


def test_reads_only_new_rows_and_a_restart_seeds_from_the_window(lake, writer):
    rng = np.random.default_rng(7)
    devices = [f"p{i % 10}" for i in range(1_000)]
    writer.write(["old"] * 500, [T0 - 3600] * 500, [99.0] * 500)  # long outside the window
    writer.write(devices, list(T0 - 30 + rng.random(1_000)), list(rng.normal(3, 1, 1_000)))
    ev = WindowEvaluator(lake, compiled(lake, "max(pressure) > 5", window=60))
    assert len(by_device(ev.evaluate(T0))) == 10
    seed = ev.rows_read
    assert seed == 1_000  # the 500 old rows are not read at all
    for k in range(3):
        writer.write(devices, list(T0 + k + rng.random(1_000)), list(rng.normal(3, 1, 1_000)))
        result = by_device(ev.evaluate(T0 + k + 1))
        assert "old" not in result
    assert ev.rows_read == 3_000 + seed
    assert ev.mark == writer.seq
    assert ev.evaluate(T0 + 3) and ev.rows_read == 3_000 + seed  # nothing new: nothing read
    assert ev.buffered == 4_000

    restarted = WindowEvaluator(lake, compiled(lake, "max(pressure) > 5", window=60))
    later = T0 + 45  # the seeded 1,000 (ts < T0 - 29) are outside; the 3,000 new ones inside
    assert restarted.evaluate(later) == ev.evaluate(later)
    assert restarted.rows_read == 3_000 and restarted.buffered == 3_000


def test_a_missing_or_corrupt_table_is_an_eval_error(lake, writer, tmp_path):
    writer.write(["p1"], [T0], [9.0])
    ev = WindowEvaluator(lake, compiled(lake, "max(pressure) > 5"))
    assert by_device(ev.evaluate(T0))["p1"].breached
    for parquet in (tmp_path / "lake" / TABLE).glob("*.parquet"):
        parquet.write_bytes(b"not parquet")
    writer.write(["p1"], [T0 + 1], [1.0])
    corrupt = WindowEvaluator(lake, compiled(lake, "max(pressure) > 5")).evaluate(T0 + 1)
    assert isinstance(corrupt, EvalError) and "'pump'" in corrupt.message
    shutil.rmtree(tmp_path / "lake" / TABLE)
    gone = ev.evaluate(T0 + 2)
    assert isinstance(gone, EvalError) and "'pump'" in gone.message
    fresh = WindowEvaluator(Lake(str(tmp_path / "lake")), ev.compiled).evaluate(T0 + 2)
    assert isinstance(fresh, EvalError)


def test_a_window_over_max_rows_is_an_error_not_a_wrong_answer(lake, writer):
    writer.write(["p1"] * 5, [T0 - 50, T0 - 40, T0 - 30, T0 - 20, T0 - 10], [9.0, 1, 1, 1, 1])
    ev = WindowEvaluator(lake, compiled(lake, "max(pressure) > 5", window=60), max_rows=4)
    result = ev.evaluate(T0)
    assert isinstance(result, EvalError) and "more than 4 rows" in result.message
    assert ev.dropped == 1 and ev.buffered == 4
    assert by_device(ev.evaluate(T0 + 11))["p1"].value == 1.0  # the dropped row left the window


def test_results_drive_the_alert_engine(lake, writer):
    writer.write(["p1", "p2", "p3", "p4"], [T0 - 5] * 4, [6.0, 7.0, 8.0, 1.0])
    ev = WindowEvaluator(lake, compiled(lake, "max(pressure) > 5"))
    engine = AlertEngine([Rule(name="high-pressure", severity="critical", for_seconds=0, every_seconds=10,
                               by=("device_id",))])
    changes = engine.evaluate("high-pressure", ev.evaluate(T0), T0)
    assert sorted((c.labels["device_id"], c.state, c.value) for c in changes) == [
        ("p1", "Firing", 6.0), ("p2", "Firing", 7.0), ("p3", "Firing", 8.0)]
    assert {c.labels["alertname"] for c in changes} == {"high-pressure"}
    assert len(engine.alerting()) == 3
