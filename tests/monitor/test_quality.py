"""Data-quality alert rules (silent, stuck, range, dead-letter rate, schema changes) over a real lake."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pytest
from typer.testing import CliRunner

from iot2ml.cli import app as cli
from iot2ml.core.catalog import Catalog
from iot2ml.core.errors import InvalidInput
from iot2ml.core.tables import DEAD_LETTERS, DEAD_LETTERS_SCHEMA, RAW, RAW_SCHEMA
from iot2ml.lake import Lake
from iot2ml.monitor.kinds import Context, rule_spec
from iot2ml.monitor.quality import reason_class
from iot2ml.monitor.rules import EvalError, Sample
from iot2ml.monitor.service import Monitor, define_rule, history
from iot2ml.monitor.store import AlertRules, Notifiers

T0 = 1_800_000_000.0  # 2027-01-15: every test owns its clock
TS = pa.timestamp("us", tz="UTC")


def _us(values: list[float]) -> pa.Array:
    return pa.array([round(t * 1_000_000) for t in values], pa.int64()).cast(TS)


class Writer:
    """Appends what the ingest writes: readings of type ``pump``, ``raw`` messages and dead letters, with
    one ``_seq`` per message increasing across the three tables."""

    def __init__(self, lake: Lake) -> None:
        self.lake, self.seq, self.commits = lake, 0, 0

    def _seqs(self, n: int) -> list[int]:
        out = list(range(self.seq + 1, self.seq + n + 1))
        self.seq += n
        return out

    def _append(self, table: str, data: pa.Table) -> None:
        self.commits += 1
        self.lake.append(table, data, app_id="test-ingest", version=self.commits)

    def readings(self, devices: list[str], at: list[float], **fields: list) -> None:
        n = len(devices)
        columns = {
            "device_id": pa.array(devices, pa.string()), "ts": _us(at), "received_at": _us(at),
            "msg_id": pa.array([None] * n, pa.string()), "_seq": pa.array(self._seqs(n), pa.int64()),
        }
        for name, values in fields.items():
            columns[name] = pa.array(values, pa.float64()) if name != "colour" else pa.array(values, pa.string())
        self._append("pump", pa.table(columns))

    def messages(self, devices: list[str], at: float, dead: dict[int, str] | None = None,
                 too_large: list[str] = ()) -> None:
        """``raw`` rows for ``devices`` at ``at``; ``dead`` {index: reason} of those also dead-lettered;
        ``too_large`` devices whose payload was too large (dead letters only, as the ingest does)."""
        seqs = self._seqs(len(devices))
        big = self._seqs(len(too_large))
        dead = dead or {}
        letters = [(seqs[i], devices[i], reason) for i, reason in dead.items()]
        letters += [(s, d, "payload is 300000 bytes, over max_payload_bytes=262144") for s, d in zip(big, too_large)]
        if letters:
            n = len(letters)
            self._append(DEAD_LETTERS, pa.table({
                "_seq": pa.array([x[0] for x in letters], pa.int64()), "device_id": [x[1] for x in letters],
                "topic": [f"devices/{x[1]}/telemetry" for x in letters], "received_at": _us([at] * n),
                "reason": [x[2] for x in letters], "payload": ["{}"] * n, "day": ["2027-01-15"] * n,
            }, schema=DEAD_LETTERS_SCHEMA))
        n = len(devices)
        self._append(RAW, pa.table({
            "_seq": pa.array(seqs, pa.int64()), "topic": [f"devices/{d}/telemetry" for d in devices],
            "device_id": devices, "received_at": _us([at] * n), "payload": ["{}"] * n, "day": ["2027-01-15"] * n,
        }, schema=RAW_SCHEMA))


@pytest.fixture
def lake(tmp_path: Path) -> Lake:
    return Lake(str(tmp_path / "lake"))


@pytest.fixture
def writer(lake: Lake) -> Writer:
    return Writer(lake)


def rule(lake: Lake, kind: str, spec: dict, window: float = 60.0, name: str = "q"):
    return define_rule(Context(lake), name, kind=kind, spec=spec, window=window)


def evaluator(lake: Lake, record):
    from iot2ml.monitor.kinds import kind_of

    return kind_of(record.kind).evaluator(record, Context(lake))


def samples(result, *keys: str) -> dict:
    assert isinstance(result, list), result
    return {tuple(s.labels[k] for k in keys) if len(keys) > 1 else s.labels[keys[0]]: s for s in result}


def quiet(result) -> bool:
    return result == [Sample(labels={}, value=0.0, breached=False)]


# ---- silent ---------------------------------------------------------------------------------------
def test_silent_fires_for_the_device_that_stopped_and_reads_only_new_rows(lake, writer):
    writer.readings(["p1", "p2"], [T0 - 400, T0 - 10], pressure=[1.0, 1.0])
    record = rule(lake, "silent", {"silent": "5m", "type": "pump"})
    assert (record.table, record.when, record.by, record.spec) == (
        "pump", "silent > 5m", ("device_id",), {"silent": 300.0, "type": "pump"})
    ev = evaluator(lake, record)
    got = samples(ev.evaluate(T0), "device_id")
    assert got["p1"].breached and got["p1"].value == pytest.approx(400)
    assert not got["p2"].breached and got["p2"].value == pytest.approx(10)
    seeded = ev.rows_read
    writer.readings(["p1"], [T0 + 5], pressure=[2.0])
    got = samples(ev.evaluate(T0 + 10), "device_id")
    assert ev.rows_read == seeded + 1  # only the new row
    assert not got["p1"].breached and got["p1"].value == pytest.approx(5)
    assert not got["p2"].breached and got["p2"].value == pytest.approx(20)
    assert samples(ev.evaluate(T0 + 320), "device_id")["p2"].breached
    assert ev.rows_read == seeded + 1


def test_silent_auto_learns_each_devices_interval(lake, writer):
    fast = [T0 - 100 + 10 * i for i in range(10)]  # every 10 s, last at T0 - 10
    writer.readings(["fast"] * 10 + ["new"], [*fast, T0 - 100], pressure=[1.0] * 11)
    record = rule(lake, "silent", {"silent": "auto", "type": "pump"})
    assert record.spec == {"silent": "auto", "type": "pump"} and "usual interval" in record.when
    ev = evaluator(lake, record)
    got = samples(ev.evaluate(T0 + 30), "device_id")  # 40 s of silence: under 5 x 10 s
    assert not got["fast"].breached and not got["new"].breached
    assert ev.limit("fast") == pytest.approx(50) and ev.limit("new") == 300  # one reading: the default
    got = samples(ev.evaluate(T0 + 45), "device_id")  # 55 s of silence
    assert got["fast"].breached and not got["new"].breached
    # the interval follows new readings: a device that slows down to every 60 s gets a longer limit
    before = ev.rows_read
    writer.readings(["fast"] * 4, [T0 + 50, T0 + 110, T0 + 170, T0 + 230], pressure=[1.0] * 4)
    got = samples(ev.evaluate(T0 + 240), "device_id")
    assert ev.rows_read == before + 4 and not got["fast"].breached
    assert ev.limit("fast") > 100


# ---- stuck ----------------------------------------------------------------------------------------
def test_stuck_counts_runs_across_evaluations(lake, writer):
    writer.readings(["p1"] * 3 + ["p2"] * 3, [T0 - 30, T0 - 20, T0 - 10] * 2,
                    pressure=[5.0, 5.0, 5.0, 1.0, 2.0, 3.0], flow=[1.0, 2.0, None, 4.0, 4.0, 4.0])
    record = rule(lake, "stuck", {"stuck": 4, "type": "pump"})
    assert record.by == ("device_id", "field") and record.spec == {"stuck": 4, "type": "pump"}
    ev = evaluator(lake, record)
    got = samples(ev.evaluate(T0), "device_id", "field")
    assert {k: s.value for k, s in got.items()} == {
        ("p1", "flow"): 1, ("p1", "pressure"): 3, ("p2", "flow"): 3, ("p2", "pressure"): 1}  # a null skips
    assert not any(s.breached for s in got.values())
    seeded = ev.rows_read
    writer.readings(["p1", "p1", "p2"], [T0 + 1, T0 + 2, T0 + 1], pressure=[5.0, 5.0, 9.0], flow=[2.0, 2.0, 4.0])
    got = samples(ev.evaluate(T0 + 5), "device_id", "field")
    assert ev.rows_read == seeded + 3
    assert got["p1", "pressure"].breached and got["p1", "pressure"].value == 5
    assert got["p1", "flow"].value == 3 and got["p2", "flow"].breached and got["p2", "flow"].value == 4
    assert not got["p2", "pressure"].breached
    writer.readings(["p1"], [T0 + 3], pressure=[5.5], flow=[2.5])  # the value moves: the run ends
    got = samples(ev.evaluate(T0 + 6), "device_id", "field")
    assert got["p1", "pressure"].value == 1 and not got["p1", "pressure"].breached


# ---- range ----------------------------------------------------------------------------------------
def test_range_declared_counts_readings_outside_within_the_window(lake, writer):
    writer.readings(["p1", "p1", "p2"], [T0 - 20, T0 - 10, T0 - 10], pressure=[12.0, -1.0, 5.0], flow=[1.0] * 3)
    record = rule(lake, "range", {"range": ["pressure=0:10", "flow=:3"], "type": "pump"})
    assert record.spec["range"] == {"pressure": [0.0, 10.0], "flow": [None, 3.0]}
    assert record.when == "pressure outside [0, 10], flow outside [, 3]"
    ev = evaluator(lake, record)
    got = samples(ev.evaluate(T0), "device_id", "field")
    assert got["p1", "pressure"].breached and got["p1", "pressure"].value == 2
    assert not got["p2", "pressure"].breached and not got["p1", "flow"].breached
    seeded = ev.rows_read
    writer.readings(["p2"], [T0 + 30], pressure=[4.0], flow=[7.0])
    got = samples(ev.evaluate(T0 + 45), "device_id", "field")
    assert ev.rows_read == seeded + 1
    assert got["p2", "flow"].breached and got["p2", "flow"].value == 1
    assert got["p1", "pressure"].value == 1  # the reading at T0 - 20 left the 1 min window
    got = samples(ev.evaluate(T0 + 100), "device_id", "field")
    assert not any(s.breached for s in got.values())  # all out of the window: every pair resolves


def test_range_learned_bounds_are_the_historys_quantiles(lake, writer):
    n = 1000
    writer.readings(["p1"] * n, [T0 - 5000 + i for i in range(n)], pressure=[float(i) for i in range(n)])
    record = rule(lake, "range", {"range": ["pressure"], "type": "pump"})
    lo, hi = record.spec["range"]["pressure"]
    assert record.spec["learned"] == ["pressure"]
    assert lo == pytest.approx(0.999) and hi == pytest.approx(998.001)
    ev = evaluator(lake, record)
    assert quiet(ev.evaluate(T0)) or not any(s.breached for s in ev.evaluate(T0))
    writer.readings(["p1", "p1"], [T0 + 1, T0 + 2], pressure=[500.0, 2000.0])
    got = samples(ev.evaluate(T0 + 3), "device_id", "field")
    assert got["p1", "pressure"].breached and got["p1", "pressure"].value == 1


# ---- dead letters ----------------------------------------------------------------------------------
CONFLICT = "field 'pressure' value 'high' is a string, expected float (column pump.pressure)"


def test_dead_letter_rate_per_reason(lake, writer):
    writer.readings(["p1"], [T0 - 100], pressure=[1.0])  # p1 is a pump
    writer.messages([f"p{i}" for i in range(1, 9)] + ["zz", "zz"], T0 - 10,
                    dead={0: CONFLICT, 1: CONFLICT, 8: "unknown device 'zz': register it with 'iot2ml devices add zz "
                                                      "--type TYPE'", 9: "unknown device 'zz': ..."},
                    too_large=["p1"])
    record = rule(lake, "dead_letters", {"dead_letter_rate": 0.1})
    assert (record.table, record.by, record.when) == ("dead_letters", ("reason",), "dead-letter rate > 0.1")
    ev = evaluator(lake, record)
    got = samples(ev.evaluate(T0), "reason")
    # 11 messages: 10 in raw + 1 too large (never in raw)
    assert got["type conflict"].value == pytest.approx(2 / 11) and got["type conflict"].breached
    assert got["unknown device"].value == pytest.approx(2 / 11)
    assert got["payload too large"].value == pytest.approx(1 / 11) and not got["payload too large"].breached
    seeded = ev.rows_read
    writer.messages(["p1"] * 9, T0 + 20)
    got = samples(ev.evaluate(T0 + 30), "reason")
    assert ev.rows_read == seeded + 9
    assert got["type conflict"].value == pytest.approx(2 / 20) and not got["type conflict"].breached
    got = samples(ev.evaluate(T0 + 55), "reason")  # the bad second left the window
    assert all(s.value == 0 and not s.breached for s in got.values())


def test_dead_letter_rate_of_one_type_counts_its_devices_only(lake, writer):
    writer.readings(["p1", "p2"], [T0 - 100] * 2, pressure=[1.0, 1.0])
    writer.messages(["p1", "p2", "zz", "zz"], T0 - 10, dead={0: CONFLICT, 2: "unknown device 'zz'", 3: "unknown device 'zz'"})
    record = rule(lake, "dead_letters", {"dead_letter_rate": 0.05, "type": "pump"})
    assert record.when == "dead-letter rate of pump > 0.05" and record.spec["type"] == "pump"
    got = samples(evaluator(lake, record).evaluate(T0), "reason")
    assert set(got) == {"type conflict"} and got["type conflict"].value == pytest.approx(1 / 2)


def test_reason_classes():
    assert reason_class(CONFLICT) == "type conflict"
    assert reason_class("payload is 300000 bytes, over max_payload_bytes=262144") == "payload too large"
    assert reason_class("payload is a number: send a JSON object or an array of objects") == "payload not an object"
    assert reason_class("malformed JSON: unexpected character") == "malformed JSON"
    assert reason_class("field 'x' is an object: send one scalar per field") == "nested field"
    assert reason_class("something new") == "other"


# ---- schema ---------------------------------------------------------------------------------------
def test_schema_changes_new_column_and_conflicts(lake, writer):
    writer.readings(["p1"], [T0 - 100], pressure=[1.0])
    record = rule(lake, "schema", {"schema_changes": True, "type": "pump"})
    assert record.by == ("change", "column") and "pressure" in record.spec["columns"]
    ev = evaluator(lake, record)
    assert quiet(ev.evaluate(T0))
    writer.readings(["p1"], [T0 + 10], pressure=[1.0], colour=["red"])
    writer.messages(["p1", "p1"], T0 + 10, dead={0: CONFLICT, 1: CONFLICT})
    dead_before = ev.dead.rows_read
    got = samples(ev.evaluate(T0 + 20), "change", "column")
    assert got["new column", "colour"].breached and got["new column", "colour"].value == 1
    assert got["type conflict", "pressure"].breached and got["type conflict", "pressure"].value == 2
    assert ev.dead.rows_read == dead_before + 2  # only the two new dead letters
    after = ev.rows_read  # + one look for when the new column appeared
    got = samples(ev.evaluate(T0 + 100), "change", "column")
    assert not any(s.breached for s in got.values())  # both left the window: resolved
    assert ev.rows_read == after  # nothing new: nothing read


# ---- refusals -------------------------------------------------------------------------------------
@pytest.mark.parametrize(("kind", "spec", "named"), [
    ("silent", {"silent": "5m"}, "--silent needs --type"),
    ("silent", {"silent": "5m", "type": "valve"}, "no table 'valve'"),
    ("silent", {"silent": "5m", "type": "raw"}, "not a device type"),
    ("silent", {"silent": "-5m", "type": "pump"}, "must be a duration > 0"),
    ("silent", {"silent": "soon", "type": "pump"}, "'soon' is not a duration"),
    ("silent", {"silent": "5m", "type": "pump", "below": 3}, "--below do(es) not apply"),
    ("stuck", {"stuck": 1, "type": "pump"}, "--stuck 1 must be a whole number of readings >= 2"),
    ("stuck", {"stuck": 5, "type": "pump", "fields": ["colour"]}, "not a field"),
    ("range", {"range": ["pressure=10:0"], "type": "pump"}, "LO 10 is not below HI 0"),
    ("range", {"range": ["pressure=1:1"], "type": "pump"}, "LO equals HI"),
    ("range", {"range": ["pressure=a:1"], "type": "pump"}, "'a' is not a number"),
    ("range", {"range": ["pressure=:"], "type": "pump"}, "has no bound"),
    ("range", {"range": ["speed=0:1"], "type": "pump"}, "'speed' is not a field of table 'pump'"),
    ("range", {"range": ["msg_id"], "type": "pump"}, "is not a field"),
    ("range", {"range": ["label"], "type": "pump"}, "not numeric"),
    ("dead_letters", {"dead_letter_rate": 1.5}, "from 0 to below 1"),
    ("dead_letters", {"dead_letter_rate": 0.1, "type": "nope"}, "no table 'nope'"),
    ("schema", {"schema_changes": True}, "--schema-changes needs --type"),
])
def test_refusals_name_the_flag_and_the_fix(lake, kind, spec, named):
    table = pa.table({"device_id": ["p1"], "ts": _us([T0]), "received_at": _us([T0]), "msg_id": pa.array([None], pa.string()),
                      "_seq": pa.array([1], pa.int64()), "pressure": [1.0], "label": ["a"]})
    lake.append("pump", table, app_id="t", version=1)
    with pytest.raises(InvalidInput) as err:
        rule(lake, kind, spec)
    assert named in str(err.value), str(err.value)
    if "apply" not in named:  # kinds.refuse_extra's own wording
        assert any(fix in str(err.value) for fix in ("e.g.", "use one of", "its numeric fields")), str(err.value)


def test_an_evaluation_never_raises(lake, writer):
    writer.readings(["p1"], [T0], pressure=[1.0])
    record = rule(lake, "stuck", {"stuck": 3, "type": "pump"})
    ev = evaluator(lake, record)
    ev.lake = None  # the lake went away
    assert isinstance(ev.evaluate(T0), EvalError)


# ---- end to end: the monitor and the CLI -------------------------------------------------------------
def test_a_silent_device_fires_through_the_monitor(settings):
    lake = Lake(settings.lake)
    writer = Writer(lake)
    writer.readings(["p1", "p2"], [T0 - 10, T0 - 10], pressure=[1.0, 1.0])
    catalog = Catalog(settings.catalog)
    try:
        rules = AlertRules(catalog)
        rules.add(define_rule(Context(lake), "pump-silent", kind="silent", spec={"silent": "1m", "type": "pump"},
                              window=60, every=1))
        clock = [T0]
        monitor = Monitor(settings, lake, rules, Notifiers(catalog), clock=lambda: clock[0])
        monitor.start()
        try:
            monitor.tick()
            assert history(lake) == []  # both devices spoke 10 s ago
            writer.readings(["p2"], [T0 + 50], pressure=[1.0])  # only p2 keeps talking
            clock[0] = T0 + 60
            monitor.tick()
            rows = history(lake, rule="pump-silent")
            assert [(r["state"], r["labels"]["device_id"], r["value"]) for r in rows] == [("Firing", "p1", 70.0)]
        finally:
            monitor.close()
    finally:
        catalog.close()


def test_cli_adds_a_silent_rule_and_refuses_a_one_reading_run(settings):
    Writer(Lake(settings.lake)).readings(["p1"], [T0], pressure=[1.0])

    def run(*args: str):
        return CliRunner().invoke(cli, ["alerts", *args, "--data-dir", str(settings.data_dir)])

    r = run("add", "pump-silent", "--silent", "5m", "--type", "pump")
    assert r.exit_code == 0, r.output
    listed = json.loads(run("list", "--json").output)
    assert [(x["name"], x["kind"], x["table"], x["when"], x["by"]) for x in listed] == [
        ("pump-silent", "silent", "pump", "silent > 5m", ["device_id"])]
    r = run("add", "pump-stuck", "--stuck", "1", "--type", "pump")
    assert r.exit_code == 2 and "--stuck 1 must be a whole number of readings >= 2" in r.output, r.output


def test_rule_spec_takes_the_quality_flags():
    assert rule_spec({"silent": "5m", "type": "pump"}) == ("silent", {"silent": "5m", "type": "pump"})
    assert rule_spec({"schema_changes": True, "type": "pump"})[0] == "schema"
    assert rule_spec({"dead_letter_rate": 0.05})[0] == "dead_letters"
