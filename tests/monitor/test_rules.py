"""The alert state machine (Grafana's states) and Alertmanager's grouping, driven by an injected clock."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from iot2ml.core.errors import InvalidInput, NotFound
from iot2ml.monitor.grouping import AlertEngine, Grouper, Route, Silence
from iot2ml.monitor.notifiers import Notification
from iot2ml.monitor.rules import NO_DATA, EvalError, Rule, Sample, fingerprint

T0 = 1_800_000_000.0  # 2027-01-15: any fixed instant; every test owns its clock


def rule(**kw) -> Rule:
    base = {"name": "high-pressure", "severity": "critical", "for_seconds": 30, "every_seconds": 10,
            "by": ("device_id",), "notify": ("ops",)}
    return Rule(**{**base, **kw})


def samples(breached: dict[str, bool] | list[str], value: float = 6.0) -> list[Sample]:
    if isinstance(breached, list):
        breached = {d: True for d in breached}
    return [Sample({"device_id": d}, value if b else 1.0, b) for d, b in breached.items()]


def states(changes) -> list[tuple[str, str, str]]:
    return [(c.labels.get("device_id", "-"), c.from_state, c.state) for c in changes]


def run(engine: AlertEngine, script, start: float, end: float, step: float = 10.0, name: str = "high-pressure"):
    """Evaluate ``script(t)`` every ``step`` from ``start`` to ``end`` (inclusive); collect rows and notes."""
    rows, notes = [], []
    t = start
    while t <= end:
        result = script(t)
        if result is not None:
            rows += [(t, c) for c in engine.evaluate(name, result, t)]
        notes += engine.due(t)
        t += step
    return rows, notes


# -- the state diagram -----------------------------------------------------------------------------

def test_for_zero_goes_straight_to_firing_and_back_with_resolved():
    e = AlertEngine([rule(for_seconds=0)])
    assert states(e.evaluate("high-pressure", samples(["d1"]), T0)) == [("d1", "Normal", "Firing")]
    assert e.evaluate("high-pressure", samples(["d1"]), T0 + 10) == []  # no row while nothing changes
    assert states(e.evaluate("high-pressure", samples({"d1": False}), T0 + 20)) == [("d1", "Firing", "Resolved")]
    assert e.alerting() == []


def test_pending_for_the_for_duration_then_firing():
    e = AlertEngine([rule(for_seconds=30)])
    rows, _ = run(e, lambda t: samples(["d1"]), T0, T0 + 40)
    assert [(t - T0, c.from_state, c.state) for t, c in rows] == [(0, "Normal", "Pending"), (30, "Pending", "Firing")]


def test_pending_back_to_normal_is_a_row_but_never_a_notification():
    e = AlertEngine([rule(for_seconds=30)])
    rows, notes = run(e, lambda t: samples({"d1": t < T0 + 20}), T0, T0 + 3600)
    assert [(c.from_state, c.state) for _, c in rows] == [("Normal", "Pending"), ("Pending", "Normal")]
    assert notes == []


def test_flapping_inside_for_never_fires():
    e = AlertEngine([rule(for_seconds=30)])
    rows, notes = run(e, lambda t: samples({"d1": int((t - T0) / 10) % 3 != 2}), T0, T0 + 3600)
    assert "Firing" not in {c.state for _, c in rows} and len(rows) > 100
    assert notes == []


def test_keep_firing_for_recovers_before_resolving():
    e = AlertEngine([rule(for_seconds=0, keep_firing_for_seconds=30)])
    pattern = {0: True, 10: False, 20: True, 30: False, 40: False, 50: False, 60: False}
    rows, _ = run(e, lambda t: samples({"d1": pattern[int(t - T0)]}), T0, T0 + 60)
    assert [(t - T0, c.state) for t, c in rows] == [
        (0, "Firing"), (10, "Recovering"), (20, "Firing"), (30, "Recovering"), (60, "Resolved")]


def test_a_device_missing_from_two_evaluations_resolves():
    e = AlertEngine([rule(for_seconds=0)])
    e.evaluate("high-pressure", samples(["d1", "d2"]), T0)
    assert e.evaluate("high-pressure", samples(["d2"]), T0 + 10) == []
    assert states(e.evaluate("high-pressure", samples(["d2"]), T0 + 20)) == [("d1", "Firing", "Resolved")]
    assert [i.labels["device_id"] for i in e.alerting()] == ["d2"]


# -- NoData and Error ------------------------------------------------------------------------------

def test_no_data_state_by_default_then_resolved_when_data_returns():
    e = AlertEngine([rule(for_seconds=0)])
    (change,) = e.evaluate("high-pressure", NO_DATA, T0)
    assert (change.from_state, change.state) == ("Normal", "NoData")
    assert change.labels == {"alertname": "high-pressure", "severity": "critical"}  # the rule, not a device
    assert e.evaluate("high-pressure", [], T0 + 10) == []  # an empty result is no data too, and no new row
    assert states(e.evaluate("high-pressure", samples({"d1": False}), T0 + 20)) == [("-", "NoData", "Resolved")]


@pytest.mark.parametrize(("option", "expected"), [("Alerting", ["Firing"]), ("Normal", []), ("KeepLast", [])])
def test_no_data_options(option, expected):
    e = AlertEngine([rule(for_seconds=0, by=(), no_data_state=option)])
    assert [c.state for c in e.evaluate("high-pressure", NO_DATA, T0)] == expected


def test_keep_last_state_keeps_firing_through_no_data():
    e = AlertEngine([rule(for_seconds=0, by=(), no_data_state="KeepLast")])
    e.evaluate("high-pressure", [Sample({}, 9.0, True)], T0)
    assert e.evaluate("high-pressure", NO_DATA, T0 + 10) == []
    assert [i.state.value for i in e.alerting()] == ["Firing"]


def test_a_failing_query_goes_to_error_and_alerts_once():
    e = AlertEngine([rule(for_seconds=0)])
    rows, notes = run(e, lambda t: EvalError("table 'pump' not found"), T0, T0 + 3 * 3600)  # 1,081 evaluations
    assert [(c.from_state, c.state) for _, c in rows] == [("Normal", "Error")]
    assert len(notes) == 1 and notes[0].at == T0 + 30
    (alert,) = notes[0].alerts
    assert alert.status == "firing" and alert.annotations["error"] == "table 'pump' not found"
    rows, notes = run(e, lambda t: samples({"d1": False}), T0 + 3 * 3600 + 10, T0 + 3 * 3600 + 400)
    assert [c.state for _, c in rows] == ["Resolved"]
    assert [n.status for n in notes] == ["resolved"]


def test_error_honours_the_pending_period_and_keeps_device_states():
    e = AlertEngine([rule(for_seconds=30)])
    run(e, lambda t: samples(["d1"]), T0, T0 + 30)  # d1 fires at T0 + 30
    rows, _ = run(e, lambda t: EvalError("timeout"), T0 + 40, T0 + 80)
    assert [(t - T0, c.state) for t, c in rows] == [(40, "Pending"), (70, "Error")]
    assert sorted(i.state.value for i in e.alerting()) == ["Error", "Firing"]  # d1 still fires


def test_rule_options_are_checked_with_the_key_and_the_fix():
    with pytest.raises(InvalidInput, match="no_data_state 'Ok' is not one of NoData, Alerting"):
        rule(no_data_state="Ok")
    with pytest.raises(InvalidInput, match="for_seconds -1"):
        rule(for_seconds=-1)
    with pytest.raises(InvalidInput, match="--by 'alertname'"):
        rule(by=("alertname",))


# -- rows ------------------------------------------------------------------------------------------

def test_a_state_change_is_an_alerts_row():
    e = AlertEngine([rule(for_seconds=0)])
    (change,) = e.evaluate("high-pressure", samples(["d1"], value=7.5), T0)
    row = change.to_row()
    assert set(row) == {"rule", "state", "labels", "value", "at", "fingerprint", "severity"}
    assert row["rule"] == "high-pressure" and row["state"] == "Firing" and row["value"] == 7.5
    assert row["at"] == "2027-01-15T08:00:00Z" and row["severity"] == "critical"
    assert row["labels"] == {"alertname": "high-pressure", "severity": "critical", "device_id": "d1"}
    assert row["fingerprint"] == fingerprint(row["labels"])
    assert json.loads(json.dumps(row)) == row


# -- grouping --------------------------------------------------------------------------------------

def test_a_thousand_devices_breaching_at_once_give_one_notification_per_group():
    e = AlertEngine([rule(for_seconds=0, notify=("ops", "oncall"))])
    devices = [f"pump-{i:04d}" for i in range(1000)]
    assert len(e.evaluate("high-pressure", samples(devices), T0)) == 1000  # every device has its row
    assert e.due(T0 + 29) == []  # group_wait: 30s
    notes = e.due(T0 + 30)
    assert sorted(n.receiver for n in notes) == ["oncall", "ops"]  # one group per receiver
    for note in notes:
        assert len(note.alerts) == 1000 and note.status == "firing"
        assert note.group_labels == {"alertname": "high-pressure", "severity": "critical"}
        assert note.common_labels == {"alertname": "high-pressure", "severity": "critical"}
        payload = note.to_webhook()
        assert payload["version"] == "4" and payload["alerts"][0]["endsAt"] == "0001-01-01T00:00:00Z"
        assert {a["labels"]["device_id"] for a in payload["alerts"]} == set(devices)
    rows, later = run(e, lambda t: samples(devices), T0 + 40, T0 + 600)
    assert rows == [] and later == []


def test_later_alerts_are_batched_every_group_interval():
    e = AlertEngine([rule(for_seconds=0)])
    fired = {0: ["d1"], 40: ["d1", "d2"], 100: ["d1", "d2", "d3"], 200: ["d1", "d2", "d3", "d4"]}
    current: list[str] = []

    def script(t):
        current[:] = fired.get(int(t - T0), current) or current
        return samples(list(current))

    _, notes = run(e, script, T0, T0 + 1000)
    assert [(n.at - T0, len(n.alerts)) for n in notes] == [(30, 1), (330, 4)]  # 30 + group_interval 300


def test_an_unchanged_firing_group_is_repeated_after_repeat_interval():
    e = AlertEngine([rule(for_seconds=0)])
    _, notes = run(e, lambda t: samples(["d1"]), T0, T0 + 4 * 3600 + 100)
    assert [(n.at - T0, n.repeat) for n in notes] == [(30, False), (30 + 4 * 3600, True)]


def test_resolved_alerts_go_out_with_the_next_group_notification():
    e = AlertEngine([rule(for_seconds=0)])
    def script(t):
        firing = ["d1", "d2"] if t < T0 + 100 else (["d2"] if t < T0 + 700 else [])
        return samples({d: d in firing for d in ("d1", "d2")})

    _, notes = run(e, script, T0, T0 + 2000)
    assert [(n.at - T0, n.status) for n in notes] == [(30, "firing"), (330, "firing"), (930, "resolved")]
    second = {a.labels["device_id"]: a.status for a in notes[1].alerts}
    assert second == {"d1": "resolved", "d2": "firing"}
    assert notes[1].alerts[-1].ends_at is not None
    assert notes[1].to_webhook()["alerts"][-1]["endsAt"] != "0001-01-01T00:00:00Z"
    assert e.grouper.groups == {}  # an all-resolved group is gone once its notification went out


def test_an_alert_that_fires_and_resolves_before_group_wait_is_never_sent():
    e = AlertEngine([rule(for_seconds=0)])
    _, notes = run(e, lambda t: samples({"d1": t < T0 + 20}), T0, T0 + 3600)
    assert notes == []


def test_a_silence_mutes_notifications_but_not_state_rows():
    e = AlertEngine([rule(for_seconds=0)])
    e.silence(Silence(id="s1", matchers={"alertname": "high-pressure"}, starts_at=T0, ends_at=T0 + 3600))
    rows, notes = run(e, lambda t: samples(["d1"]), T0, T0 + 3600 + 400)
    assert [c.state for _, c in rows] == ["Firing"]
    assert [n.at - T0 for n in notes] == [3630]  # the first flush after the silence ended
    assert e.grouper.silences == {}  # expired silences are dropped


def test_a_silence_on_one_device_leaves_the_others_notified():
    e = AlertEngine([rule(for_seconds=0)])
    e.silence(Silence(id="s1", matchers={"device_id": "d1"}, ends_at=T0 + 3600))
    _, notes = run(e, lambda t: samples(["d1", "d2"]), T0, T0 + 60)
    assert [[a.labels["device_id"] for a in n.alerts] for n in notes] == [["d2"]]


def test_ack_stops_repeats_until_the_alert_resolves():
    e = AlertEngine([rule(for_seconds=0)])
    run(e, lambda t: samples(["d1"]), T0, T0 + 30)
    e.ack(fingerprint({"alertname": "high-pressure", "severity": "critical", "device_id": "d1"}))
    _, notes = run(e, lambda t: samples(["d1"]), T0 + 40, T0 + 9 * 3600)
    assert notes == []  # no repeat at 4h or 8h
    _, notes = run(e, lambda t: samples({"d1": False}), T0 + 9 * 3600 + 10, T0 + 9 * 3600 + 400)
    assert [n.status for n in notes] == ["resolved"]
    _, notes = run(e, lambda t: samples(["d1"]), T0 + 10 * 3600, T0 + 15 * 3600)
    assert [n.repeat for n in notes] == [False, True]  # fired again: the ack is spent, repeats resume


def test_ack_of_one_alert_still_sends_changes_of_its_group():
    e = AlertEngine([rule(for_seconds=0)])
    run(e, lambda t: samples(["d1"]), T0, T0 + 30)
    e.ack(fingerprint({"alertname": "high-pressure", "severity": "critical", "device_id": "d1"}))
    _, notes = run(e, lambda t: samples(["d1", "d2"]), T0 + 40, T0 + 400)
    assert [len(n.alerts) for n in notes] == [2]
    with pytest.raises(NotFound, match="is not firing"):
        e.ack("0000000000000000")


def test_rules_of_different_severity_are_different_groups():
    e = AlertEngine([rule(for_seconds=0), rule(name="low-pressure", severity="warning", for_seconds=0)])
    e.evaluate("high-pressure", samples(["d1"]), T0)
    e.evaluate("low-pressure", samples(["d2"]), T0)
    assert sorted(n.group_labels["alertname"] for n in e.due(T0 + 30)) == ["high-pressure", "low-pressure"]


def test_route_timings_override_the_defaults():
    e = AlertEngine([rule(for_seconds=0)], [Route("ops", group_wait=0, group_interval=60, repeat_interval=600)])
    _, notes = run(e, lambda t: samples(["d1"]), T0, T0 + 700)
    assert [n.at - T0 for n in notes] == [0, 600]


# -- restart ---------------------------------------------------------------------------------------

def _scenario(t: float):
    """Devices come and go, the query fails for a while, all fire for an hour, all resolve at the end."""
    k = int((t - T0) // 10)
    if 300 <= k < 330:
        return EvalError("lake unavailable")
    if 1200 <= k < 1560:
        return samples([f"d{i}" for i in range(5)])
    if k >= 2000:
        return samples({f"d{i}": False for i in range(5)})
    return samples({f"d{i}": (k // (40 * (i + 1))) % 2 == 0 for i in range(5)})


def _notes(notes: list[Notification]) -> list[dict]:
    return [{"at": n.at, "repeat": n.repeat, **n.to_webhook()} for n in notes]


def test_a_restart_from_the_snapshot_neither_repeats_nor_loses_a_notification():
    rules = [rule(for_seconds=20)]
    routes = [Route("ops", group_wait=30, group_interval=120, repeat_interval=600)]
    end = T0 + 2100 * 10
    quiet = Silence(id="d9", matchers={"device_id": "d9"}, ends_at=end + 10)
    reference = AlertEngine(rules, routes)
    reference.silence(quiet)
    ref_rows, ref_notes = run(reference, _scenario, T0, end)
    assert len(ref_notes) > 20 and {n.status for n in ref_notes} == {"firing", "resolved"}
    assert any(n.repeat for n in ref_notes)

    engine, rows, notes, t = AlertEngine(rules, routes), [], [], T0
    engine.silence(quiet)
    while t <= end:
        rows += [(t, c) for c in engine.evaluate("high-pressure", _scenario(t), t)]
        notes += engine.due(t)
        saved = json.dumps(engine.snapshot())  # handed to the dispatcher, then saved: now a restart
        engine = AlertEngine(rules, routes)
        engine.restore(json.loads(saved))
        t += 10
    assert engine.grouper.silences == {"d9": quiet}  # silences survive the restart too
    assert [(t, c.to_row()) for t, c in rows] == [(t, c.to_row()) for t, c in ref_rows]
    assert _notes(notes) == _notes(ref_notes)


def test_a_snapshot_of_another_version_is_refused():
    with pytest.raises(InvalidInput, match="version 2"):
        AlertEngine().restore({"version": 2})


# -- fingerprints ----------------------------------------------------------------------------------

def test_fingerprint_is_prometheus_label_set_fingerprint():
    # the test vector of prometheus/common model.LabelSet.Fingerprint (5799056148416392346)
    assert fingerprint({"name": "garland, briggs", "fear": "love is not enough"}) == f"{5799056148416392346:016x}"
    assert fingerprint({}) == "cbf29ce484222325"


def test_fingerprints_are_stable_across_processes():
    code = ("from iot2ml.monitor.rules import fingerprint;"
            "print(fingerprint({'alertname': 'high-pressure', 'severity': 'critical', 'device_id': 'pump-1'}))")
    outs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={**os.environ, "PYTHONHASHSEED": seed}).stdout.strip() for seed in ("1", "2")}
    assert outs == {fingerprint({"device_id": "pump-1", "severity": "critical", "alertname": "high-pressure"})}


def test_grouper_without_a_route_uses_alertmanager_defaults():
    route = Grouper().route("ops")
    assert (route.group_wait, route.group_interval, route.repeat_interval) == (30, 300, 4 * 3600)
    assert route.group_by == ("alertname", "severity")


def test_removing_a_rule_resolves_its_alerts():
    e = AlertEngine([rule(for_seconds=0)])
    run(e, lambda t: samples(["d1"]), T0, T0 + 30)
    assert states(e.remove("high-pressure", T0 + 40)) == [("d1", "Firing", "Resolved")]
    assert [n.status for n in e.due(T0 + 330)] == ["resolved"]
    with pytest.raises(NotFound, match="rule 'high-pressure' does not exist"):
        e.evaluate("high-pressure", NO_DATA, T0 + 400)
