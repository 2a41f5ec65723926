"""Alert rules end to end: `iot2ml alerts` over a real lake, the monitor running in a thread, a real
webhook receiver, a restart, silences and acks, and the same through /api/v1/alerts."""

from __future__ import annotations

import json
import queue
import threading
import time
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient
from test_evaluate import Writer
from test_notifiers import HTTPReceiver
from typer.testing import CliRunner

from iot2ml.api import create_app
from iot2ml.auth.store import Keys
from iot2ml.cli import app as cli
from iot2ml.core.catalog import Catalog
from iot2ml.core.config import load_settings
from iot2ml.lake import Lake
from iot2ml.monitor.service import Monitor
from iot2ml.monitor.store import AlertRules, Notifiers


@pytest.fixture
def settings(tmp_path):
    return load_settings(data_dir=tmp_path / "data", nats_port=0, mqtt_port=0, http_port=0, monitor_group_wait=0.5,
                         monitor_group_interval=1.0, monitor_repeat_interval=3600.0)


@pytest.fixture
def receiver() -> Iterator[HTTPReceiver]:
    r = HTTPReceiver()
    yield r
    r.close()


def run(settings, *args: str):
    return CliRunner().invoke(cli, [*args, "--data-dir", str(settings.data_dir)])


class Running:
    """The monitor component's loop in a thread, over its own catalog connection."""

    def __init__(self, settings) -> None:
        self.catalog = Catalog(settings.catalog)
        self.monitor = Monitor(settings, Lake(settings.lake), AlertRules(self.catalog), Notifiers(self.catalog),
                               tick=0.1)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.monitor.run, args=(self.stop,), daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=20)
        assert not self.thread.is_alive()
        self.catalog.close()


def bodies(receiver: HTTPReceiver, wait: float) -> list[dict]:
    out, deadline = [], time.monotonic() + wait
    while time.monotonic() < deadline:
        try:
            out.append(json.loads(receiver.next(timeout=0.1)["body"]))
        except queue.Empty:
            pass
    return out


def history(settings) -> list[dict]:
    r = run(settings, "alerts", "history", "--json")
    assert r.exit_code == 0, r.output
    return json.loads(r.output)


def wait_for(cond, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_alerts_end_to_end(settings, receiver):
    writer = Writer(Lake(settings.lake))
    now = time.time()
    writer.write(["p1", "p2", "p3"], [now - 1] * 3, [1.0, 1.0, 1.0])  # the table exists, nothing breaches
    assert run(settings, "notifiers", "add", "ops", "--webhook", receiver.url + "/hook").exit_code == 0
    add = ["alerts", "add", "high-pressure", "--table", "pump", "--when", "max(pressure) > 5", "--by", "device_id",
           "--window", "1m", "--for", "0s", "--every", "1s", "--severity", "critical", "--notify", "ops"]

    # refusals, each with its reason
    for change, reason in ((("--when", "max(pressure) > 5; drop"), "';'"), (("--table", "nope"), "does not exist"),
                           (("--by", "colour"), "'colour' is not in table"), (("--notify", "pager"), "no such notifier"),
                           (("--every", "soon"), "--every")):
        args = list(add)
        at = args.index(change[0])
        args[at + 1] = change[1]
        r = run(settings, *args)
        assert r.exit_code == 2 and reason in r.output, (change, r.output)
    r = run(settings, *add)
    assert r.exit_code == 0, r.output
    r = run(settings, *add)
    assert r.exit_code == 2 and "exists" in r.output
    rules = json.loads(run(settings, "alerts", "list", "--json").output)
    assert [(x["name"], x["by"], x["for"], x["every"], x["notify"], x["alerts"]) for x in rules] == [
        ("high-pressure", ["device_id"], 0.0, 1.0, ["ops"], [])]

    mon = Running(settings)
    try:
        time.sleep(1.5)
        assert bodies(receiver, 0.1) == []  # nothing breaches
        writer.write(["p1", "p2", "p3", "p4"], [time.time()] * 4, [9.0, 7.0, 6.0, 2.0])
        got = bodies(receiver, 3.0)
        assert len(got) == 1, got  # ONE notification for the three devices
        note = got[0]
        assert note["version"] == "4" and note["status"] == "firing" and note["receiver"] == "ops"
        assert sorted(a["labels"]["device_id"] for a in note["alerts"]) == ["p1", "p2", "p3"]
        assert {a["labels"]["alertname"] for a in note["alerts"]} == {"high-pressure"}
        rows = history(settings)
        firing = [r for r in rows if r["state"] == "Firing"]
        assert sorted(r["labels"]["device_id"] for r in firing) == ["p1", "p2", "p3"]
        assert all(set(r) == {"rule", "state", "labels", "value", "at"} for r in rows)
        assert {r["labels"]["device_id"]: r["value"] for r in firing} == {"p1": 9.0, "p2": 7.0, "p3": 6.0}
        assert firing[0]["at"].endswith("Z") and firing[0]["labels"]["severity"] == "critical"
    finally:
        mon.close()

    # restart: the state comes back, nothing is sent again, no row is written twice
    mon = Running(settings)
    try:
        assert bodies(receiver, 2.5) == []
        assert len(history(settings)) == 3
        listed = json.loads(run(settings, "alerts", "list", "--json").output)[0]["alerts"]
        assert sorted(a["labels"]["device_id"] for a in listed) == ["p1", "p2", "p3"]

        r = run(settings, "alerts", "ack", listed[0]["id"])
        assert r.exit_code == 0, r.output
        r = run(settings, "alerts", "ack", "0123456789abcdef")
        assert r.exit_code == 2 and "not firing" in r.output
        wait_for(lambda: not AlertRules(mon.catalog).commands())  # the monitor applied it
        assert mon.monitor.engine.grouper.acks and listed[0]["id"] in mon.monitor.engine.grouper.acks

        # silenced: a new breaching device changes the group, but nothing is sent
        assert run(settings, "alerts", "silence", "nope", "--for", "1h").exit_code == 2
        r = run(settings, "alerts", "silence", "high-pressure", "--for", "1h")
        assert r.exit_code == 0, r.output
        wait_for(lambda: not AlertRules(mon.catalog).commands())
        writer.write(["p4"], [time.time()], [8.0])
        wait_for(lambda: any(r["labels"].get("device_id") == "p4" for r in history(settings)))
        assert bodies(receiver, 2.5) == []
    finally:
        mon.close()

    r = run(settings, "alerts", "remove", "high-pressure")
    assert r.exit_code == 0, r.output
    assert run(settings, "alerts", "remove", "high-pressure").exit_code == 2
    assert json.loads(run(settings, "alerts", "list", "--json").output) == []


def test_api_routes(settings, receiver):
    writer = Writer(Lake(settings.lake))
    writer.write(["p1"], [time.time()], [1.0])
    catalog = Catalog(settings.catalog)
    Notifiers(catalog).add("ops", "webhook", receiver.url)
    admin, reader = Keys(catalog).add_key("root", "admin"), Keys(catalog).add_key("viewer", "reader")
    as_admin, as_reader = {"Authorization": f"Bearer {admin}"}, {"Authorization": f"Bearer {reader}"}
    body = {"name": "high-pressure", "table": "pump", "when": "max(pressure) > 5", "by": ["device_id"],
            "window": "1m", "for": "30s", "every": "10s", "severity": "critical", "notify": ["ops"]}
    with TestClient(create_app(settings, catalog=catalog)) as c:
        assert c.post("/api/v1/alerts", json=body, headers=as_reader).status_code == 403
        r = c.post("/api/v1/alerts", json={**body, "when": "max(pressure) > (select 5)"}, headers=as_admin)
        assert r.status_code == 422 and "nests" in r.json()["detail"]
        r = c.post("/api/v1/alerts", json={**body, "notify": ["pager"]}, headers=as_admin)
        assert r.status_code == 422 and "pager" in r.json()["detail"]
        r = c.post("/api/v1/alerts", json=body, headers=as_admin)
        assert r.status_code == 201 and r.json()["for"] == 30.0 and r.json()["every"] == 10.0
        assert c.post("/api/v1/alerts", json=body, headers=as_admin).status_code == 409
        r = c.get("/api/v1/alerts", headers=as_reader)
        assert r.status_code == 200 and [x["name"] for x in r.json()] == ["high-pressure"]
        assert c.get("/api/v1/alerts/history", headers=as_reader).json() == []
        assert c.post("/api/v1/alerts/0123456789abcdef/ack", headers=as_admin).status_code == 404
        r = c.post("/api/v1/alerts/high-pressure/silence", json={"for": "1h"}, headers=as_admin)
        assert r.status_code == 202 and r.json()["until"] > time.time() + 3500
        assert c.post("/api/v1/alerts/nope/silence", json={"for": "1h"}, headers=as_admin).status_code == 404
        assert c.delete("/api/v1/alerts/high-pressure", headers=as_reader).status_code == 403
        assert c.delete("/api/v1/alerts/high-pressure", headers=as_admin).status_code == 204
        assert c.delete("/api/v1/alerts/high-pressure", headers=as_admin).status_code == 404


def test_monitor_command_has_the_shared_options():
    r = CliRunner().invoke(cli, ["monitor", "--help"], env={"COLUMNS": "200"})
    assert r.exit_code == 0, r.output
    for flag in ("--data-dir", "--catalog-url", "--host", "--http-port", "--serve-port", "--nats-port"):
        assert flag in r.output


def test_a_thousand_devices_breaching_at_once_are_one_notification(settings, receiver):
    """Issue 9 item 2: 1,000 devices breach in one commit -> one grouped notification with 1,000
    alerts at the real webhook receiver, and the next notification only when the group changes."""
    writer = Writer(Lake(settings.lake))
    now = time.time()
    devices = [f"p{i:04d}" for i in range(1000)]
    writer.write(devices[:3], [now - 1] * 3, [1.0] * 3)
    assert run(settings, "notifiers", "add", "ops", "--webhook", receiver.url + "/hook").exit_code == 0
    r = run(settings, "alerts", "add", "high-pressure", "--table", "pump", "--when", "max(pressure) > 5", "--by",
            "device_id", "--window", "1m", "--every", "1s", "--notify", "ops")
    assert r.exit_code == 0, r.output
    running = Running(settings)
    try:
        writer.write(devices, [time.time()] * 1000, [9.0] * 1000)
        got = bodies(receiver, wait=6.0)
    finally:
        running.close()
    firing = [b for b in got if b["status"] == "firing"]
    assert len(firing) == 1, [(b["status"], len(b["alerts"])) for b in got]
    assert len(firing[0]["alerts"]) == 1000 and firing[0]["groupLabels"] == {"alertname": "high-pressure", "severity": "warning"}
    assert {a["labels"]["device_id"] for a in firing[0]["alerts"]} == set(devices)


def test_the_sdk_covers_notifiers_alerts_and_reports(settings, receiver):
    """iot2ml.Client's monitoring methods against the real API app (in-process ASGI transport)."""
    import iot2ml
    from iot2ml.core.errors import AuthError, InvalidInput, NotFound

    Writer(Lake(settings.lake)).write(["p1"], [time.time()], [1.0])
    catalog = Catalog(settings.catalog)
    admin, reader = Keys(catalog).add_key("root", "admin"), Keys(catalog).add_key("viewer", "reader")
    with TestClient(create_app(settings, catalog=catalog)) as c:
        sdk, viewer = iot2ml.Client("http://testserver", admin), iot2ml.Client("http://testserver", reader)
        sdk._http, viewer._http = c, TestClient(c.app)
        sdk._http.headers["Authorization"] = f"Bearer {admin}"
        viewer._http.headers["Authorization"] = f"Bearer {reader}"
        assert sdk.add_notifier("ops", webhook=receiver.url + "/hook")["kind"] == "webhook"
        with pytest.raises(InvalidInput, match="exactly one"):
            sdk.add_notifier("two", webhook=receiver.url, slack=receiver.url)
        assert sdk.test_notifier("ops")["status"] == "ok"
        assert json.loads(receiver.next(timeout=5)["body"])["version"] == "4"
        assert [n["name"] for n in viewer.notifiers()] == ["ops"]
        rule = sdk.add_alert("high-pressure", table="pump", when="max(pressure) > 5", by=["device_id"], for_="30s",
                             notify=["ops"])
        assert rule["for"] == 30.0 and rule["kind"] == "threshold"
        assert sdk.add_alert("quiet", silent="5m", type="pump")["kind"] == "silent"
        with pytest.raises(InvalidInput, match="--stuck"):
            sdk.add_alert("stuck", stuck=1, type="pump")
        with pytest.raises(AuthError):
            viewer.add_alert("x", silent="5m", type="pump")
        assert [a["name"] for a in viewer.alerts()] == ["high-pressure", "quiet"]
        assert viewer.alert_history(rule="quiet") == []
        assert sdk.silence_alert("quiet", for_="1h")["until"] > time.time() + 3500
        with pytest.raises(NotFound):
            sdk.ack_alert("0123456789abcdef")
        with pytest.raises(NotFound):
            viewer.monitor_report("no-such-model", window="1h")
        sdk.remove_alert("quiet")
        with pytest.raises(NotFound):
            sdk.remove_alert("quiet")
    catalog.close()
