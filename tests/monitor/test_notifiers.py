"""Notifiers against real local receivers: an HTTP server (webhook, Slack, Apprise's json://) and an
SMTP server (aiosmtpd), each on a free port; the dispatcher's retries, backoff, drops and drain; the
CLI and the HTTP API."""

from __future__ import annotations

import email
import email.policy
import json
import queue
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from ports import free_port  # below the ephemeral range: tests/ports.py
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from iot2ml.api import create_app
from iot2ml.auth.store import Keys
from iot2ml.cli import app as cli
from iot2ml.core.catalog import Catalog
from iot2ml.core.errors import InvalidInput, Terminal, Transient
from iot2ml.monitor import (
    KINDS,
    Alert,
    Dispatcher,
    Notification,
    Notifiers,
    SlackNotifier,
    make_notifier,
)
from iot2ml.monitor.checks import check_notifier
from iot2ml.monitor.grouping import AlertEngine, Route
from iot2ml.monitor.notifiers import test_notification
from iot2ml.monitor.rules import ZERO_TIME, Rule, Sample, fingerprint




class HTTPReceiver:
    """A real HTTP server recording each POST; answers the statuses in ``answers`` first, then 200,
    after ``delay`` seconds."""

    def __init__(self) -> None:
        self.got: queue.Queue[dict[str, Any]] = queue.Queue()
        self.answers: list[int] = []
        self.delay = 0.0
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                receiver.got.put({"path": self.path, "body": body, "at": time.monotonic(),
                                  "type": self.headers.get("Content-Type")})
                time.sleep(receiver.delay)
                status = receiver.answers.pop(0) if receiver.answers else 200
                answer = b"ok" if status < 400 else b"not now"
                self.send_response(status)
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, *_args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def next(self, timeout: float = 5.0) -> dict[str, Any]:
        return self.got.get(timeout=timeout)

    def text(self) -> str:
        return self.next()["body"].decode()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class SMTPReceiver:
    """A real SMTP server (aiosmtpd) keeping each message."""

    def __init__(self) -> None:
        from aiosmtpd.controller import Controller

        self.got: queue.Queue[Any] = queue.Queue()
        receiver = self

        class Handler:
            async def handle_DATA(self, _server: Any, _session: Any, envelope: Any) -> str:
                receiver.got.put((envelope.rcpt_tos, email.message_from_bytes(envelope.content,
                                                                              policy=email.policy.default)))
                return "250 OK"

        self.port = free_port()
        self.controller = Controller(Handler(), hostname="127.0.0.1", port=self.port)
        self.controller.start()
        self.url = f"smtp://127.0.0.1:{self.port}"

    def next(self, timeout: float = 5.0) -> tuple[list[str], Any]:
        return self.got.get(timeout=timeout)

    def text(self) -> str:
        _, msg = self.next()
        return f"Subject: {msg['subject']}\n\n{msg.get_content()}"

    def close(self) -> None:
        self.controller.stop()


@pytest.fixture
def http_receiver() -> Iterator[HTTPReceiver]:
    r = HTTPReceiver()
    yield r
    r.close()


@pytest.fixture
def smtp_receiver() -> Iterator[SMTPReceiver]:
    r = SMTPReceiver()
    yield r
    r.close()


@pytest.fixture
def store(tmp_path) -> Notifiers:
    return Notifiers(Catalog(f"sqlite:///{tmp_path / 'catalog.db'}"))


def closed_url() -> str:
    return f"http://127.0.0.1:{free_port()}/hook"


def group(*alerts: Alert, **kwargs: Any) -> Notification:
    return Notification(alerts=alerts, receiver="ops", group_labels={"alertname": "HighTemp"},
                        external_url="http://iot2ml:8000", **kwargs)


T0 = datetime(2026, 11, 27, 9, 30, 0, tzinfo=UTC)


def hot(device: str, status: str = "firing") -> Alert:
    return Alert(labels={"alertname": "HighTemp", "severity": "critical", "device": device},
                 annotations={"summary": f"{device} is over 80 C"}, status=status, starts_at=T0,
                 ends_at=T0.replace(minute=45) if status == "resolved" else None,
                 generator_url="http://iot2ml:8000/rules/HighTemp")


# --------------------------------------------------------------------------- the contract, every kind


def _receivers(kind: str, http_receiver: HTTPReceiver, smtp_receiver: SMTPReceiver):
    """(notifier, receive, down, secret) for each kind, all real servers."""
    if kind == "webhook":
        return (make_notifier("webhook", http_receiver.url + "/hook?token=s3cret", name="ops"), http_receiver.text,
                make_notifier("webhook", closed_url(), timeout=2), "s3cret")
    if kind == "slack":
        return (make_notifier("slack", http_receiver.url + "/services/T0/B0/s3cret", name="team"),
                http_receiver.text, make_notifier("slack", closed_url(), timeout=2), "s3cret")
    if kind == "email":
        return (make_notifier("email", "ops@example.com", smtp=smtp_receiver.url, name="oncall"), smtp_receiver.text,
                make_notifier("email", "ops@example.com", smtp=f"smtp://127.0.0.1:{free_port()}", timeout=2), None)
    if kind == "apprise":
        port = http_receiver.url.rsplit(":", 1)[1]
        return (make_notifier("apprise", f"json://127.0.0.1:{port}/s3cret", name="other"), http_receiver.text,
                make_notifier("apprise", f"json://127.0.0.1:{free_port()}/x", timeout=2), "s3cret")
    return None


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_every_notifier_passes_the_contract(kind, http_receiver, smtp_receiver):
    found = _receivers(kind, http_receiver, smtp_receiver)
    assert found is not None, f"notifier kind {kind!r} has no receiver in this test: add one to _receivers"
    notifier, receive, down, secret = found
    check_notifier(notifier, receive, down=down, secret=secret)


# --------------------------------------------------------------------------- each body


def test_webhook_body_is_alertmanager_v4(http_receiver):
    n = group(hot("pump-1"), hot("pump-2", "resolved"), group_key='{}:{alertname="HighTemp"}')
    delivery = make_notifier("webhook", http_receiver.url + "/hook", name="ops").send(n)
    assert delivery.ok and delivery.notifier == "ops" and delivery.attempt == 1
    got = http_receiver.next()
    assert got["path"] == "/hook" and got["type"] == "application/json"
    body = json.loads(got["body"])
    assert set(body) == {"version", "groupKey", "truncatedAlerts", "status", "receiver", "groupLabels",
                         "commonLabels", "commonAnnotations", "externalURL", "alerts"}
    assert body["version"] == "4" and body["groupKey"] == '{}:{alertname="HighTemp"}' and body["truncatedAlerts"] == 0
    assert body["status"] == "firing" and body["receiver"] == "ops"  # one alert still fires
    assert body["groupLabels"] == {"alertname": "HighTemp"}
    assert body["commonLabels"] == {"alertname": "HighTemp", "severity": "critical"}  # device differs
    assert body["commonAnnotations"] == {}  # the summaries differ
    assert body["externalURL"] == "http://iot2ml:8000"
    firing, resolved = body["alerts"]
    for a in body["alerts"]:
        assert set(a) == {"status", "labels", "annotations", "startsAt", "endsAt", "generatorURL", "fingerprint"}
        assert a["startsAt"] == "2026-11-27T09:30:00Z" and a["generatorURL"] == "http://iot2ml:8000/rules/HighTemp"
        assert len(a["fingerprint"]) == 16 and int(a["fingerprint"], 16) >= 0
    assert firing["status"] == "firing" and firing["endsAt"] == ZERO_TIME == "0001-01-01T00:00:00Z"
    assert firing["labels"] == {"alertname": "HighTemp", "severity": "critical", "device": "pump-1"}
    assert firing["annotations"] == {"summary": "pump-1 is over 80 C"}
    assert resolved["status"] == "resolved" and resolved["endsAt"] == "2026-11-27T09:45:00Z"
    assert firing["fingerprint"] != resolved["fingerprint"]
    assert hot("pump-1").fingerprint == firing["fingerprint"]  # same labels, same fingerprint
    assert all(a["fingerprint"] == fingerprint(a["labels"]) for a in body["alerts"])  # Alertmanager's FNV-1a


def test_default_group_key_and_status():
    n = group(hot("pump-1", "resolved"))
    assert n.status == "resolved" and n.group_key == '{}:{alertname="HighTemp"}'
    assert n.subject == "[RESOLVED] HighTemp (pump-1 critical)"
    assert group(hot("a"), hot("b")).subject == "[FIRING:2] HighTemp (critical)"
    with pytest.raises(InvalidInput, match="alertname"):
        Alert(labels={"device": "x"})


def test_slack_body_has_text_and_a_coloured_attachment(http_receiver):
    slack = make_notifier("slack", http_receiver.url + "/services/T/B/x")
    assert isinstance(slack, SlackNotifier)
    slack.send(group(hot("pump-1")))
    body = json.loads(http_receiver.next()["body"])
    assert body["text"] == "[FIRING:1] HighTemp (pump-1 critical)"
    (att,) = body["attachments"]
    assert att["color"] == "#d00000" and "pump-1 is over 80 C" in att["text"]
    assert {"title": "device", "value": "pump-1", "short": True} in att["fields"]
    slack.send(group(hot("pump-1", "resolved")))
    assert json.loads(http_receiver.next()["body"])["attachments"][0]["color"] == "#2eb886"  # green when resolved


def test_email_arrives_with_alertmanager_subject(smtp_receiver):
    mail = make_notifier("email", "ops@example.com, lead@example.com", smtp=smtp_receiver.url, sender="alerts@iot2ml")
    delivery = mail.send(group(hot("pump-1"), hot("pump-2")))
    assert delivery.ok and "ops@example.com" in delivery.detail
    rcpts, msg = smtp_receiver.next()
    assert rcpts == ["ops@example.com", "lead@example.com"]
    assert msg["Subject"] == "[FIRING:2] HighTemp (critical)" and msg["From"] == "alerts@iot2ml"
    text = msg.get_content()
    assert "Firing alerts: 2" in text and "pump-1 is over 80 C" in text and "pump-2 is over 80 C" in text
    assert "See http://iot2ml:8000" in text


def test_email_errors_are_translated(smtp_receiver):
    down = make_notifier("email", "ops@example.com", smtp=f"smtp://127.0.0.1:{free_port()}", timeout=2)
    with pytest.raises(Transient, match="cannot be reached"):
        down.send(test_notification())
    no_auth = make_notifier("email", "ops@example.com", smtp=f"smtp://me:pw@127.0.0.1:{smtp_receiver.port}")
    with pytest.raises(Terminal, match="does not support"):  # this server offers no AUTH: retrying won't help
        no_auth.send(test_notification())
    with pytest.raises(InvalidInput, match="--smtp"):
        make_notifier("email", "ops@example.com")
    with pytest.raises(InvalidInput, match="not an address"):
        make_notifier("email", "ops", smtp=smtp_receiver.url)


def test_http_errors_are_classed(http_receiver):
    hook = make_notifier("webhook", http_receiver.url + "/hook")
    http_receiver.answers = [503]
    with pytest.raises(Transient, match="answered 503"):
        hook.send(test_notification())
    http_receiver.answers = [429]
    with pytest.raises(Transient, match="429"):
        hook.send(test_notification())
    http_receiver.answers = [404]
    with pytest.raises(Terminal, match="refused the notification with 404"):
        hook.send(test_notification())
    with pytest.raises(InvalidInput, match="not an http"):
        make_notifier("webhook", "ftp://x/y")
    with pytest.raises(InvalidInput, match="kind 'pager' is not known"):
        make_notifier("pager", "http://x/")


def test_apprise_rejects_urls_it_does_not_know():
    with pytest.raises(InvalidInput, match="not one Apprise knows"):
        make_notifier("apprise", "nosuchservice://abc")


# --------------------------------------------------------------------------- the dispatcher


def wait_for(cond, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_retries_with_backoff_and_logs_every_attempt(http_receiver, store):
    store.add("ops", "webhook", http_receiver.url + "/hook")
    http_receiver.answers = [503, 503]
    with Dispatcher(store, attempts=5, backoff=0.2) as d:
        assert d.submit(group(hot("pump-1")))  # to every stored notifier
        wait_for(lambda: len(store.deliveries("ops")) == 3)
    tries = [http_receiver.next() for _ in range(3)]
    first_gap, second_gap = tries[1]["at"] - tries[0]["at"], tries[2]["at"] - tries[1]["at"]
    assert first_gap >= 0.2 and second_gap >= 0.4  # backoff doubles
    log = store.deliveries("ops")
    assert [(x.status, x.attempt) for x in log] == [("failed", 1), ("failed", 2), ("ok", 3)]
    assert "503" in log[0].error and log[2].error is None
    assert {x.group_key for x in log} == {'{}:{alertname="HighTemp"}'}
    assert http_receiver.got.empty()  # delivered once, not again


def test_receiver_down_is_retried_then_logged_failed(store):
    down = make_notifier("webhook", closed_url(), name="gone", timeout=2)
    with Dispatcher(store, attempts=3, backoff=0.05) as d:
        d.submit(test_notification(), to=[down])
        wait_for(lambda: len(store.deliveries("gone")) == 3)
    log = store.deliveries("gone")
    assert [(x.status, x.attempt) for x in log] == [("failed", 1), ("failed", 2), ("failed", 3)]
    assert all("cannot be reached" in x.error for x in log)


def test_terminal_failure_is_not_retried(http_receiver, store):
    http_receiver.answers = [404, 404, 404]
    hook = make_notifier("webhook", http_receiver.url + "/gone", name="ops")
    with Dispatcher(store, attempts=5, backoff=0.05) as d:
        d.submit(test_notification(), to=[hook])
        wait_for(lambda: len(store.deliveries("ops")) == 1)
        time.sleep(0.3)
    assert [(x.status, x.attempt) for x in store.deliveries("ops")] == [("failed", 1)]


def test_submit_does_not_block_on_a_hanging_receiver_and_counts_drops(http_receiver, store):
    http_receiver.delay = 1.0
    hook = make_notifier("webhook", http_receiver.url + "/slow", name="slow", timeout=5)
    d = Dispatcher(store, workers=1, max_queue=2, attempts=1).start()
    try:
        began = time.monotonic()
        accepted = [d.submit(group(hot(f"pump-{i}")), to=[hook]) for i in range(6)]
        assert time.monotonic() - began < 0.2  # the caller never waits for the receiver
        assert accepted[:2] == [True, True] and not all(accepted)
        assert d.dropped == accepted.count(False) >= 3
    finally:
        left = d.stop(timeout=10)
    assert left == 0
    log = store.deliveries("slow")
    assert sum(x.status == "dropped" for x in log) == d.dropped
    assert sum(x.status == "ok" for x in log) == accepted.count(True)
    assert all("queue is full" in x.error for x in log if x.status == "dropped")


def test_clean_stop_delivers_everything_queued(http_receiver, store):
    http_receiver.delay = 0.02
    hook = make_notifier("webhook", http_receiver.url + "/hook", name="ops")
    d = Dispatcher(store, workers=1, attempts=2, backoff=0.05).start()
    for i in range(15):
        assert d.submit(group(hot(f"pump-{i}")), to=[hook])
    assert d.stop(timeout=20) == 0
    assert http_receiver.got.qsize() == 15
    assert [x.status for x in store.deliveries("ops")] == ["ok"] * 15
    assert d.stop() == 0  # twice is fine
    assert not d.submit(test_notification(), to=[hook]) and d.dropped == 1  # stopped: dropped, not lost silently


def test_an_engine_notification_goes_through_the_dispatcher_as_alertmanager_v4(http_receiver, store):
    t0 = 1_800_000_000.0
    rule = Rule(name="high-pressure", severity="critical", for_seconds=0, every_seconds=10, notify=("ops",),
                by=("device_id",))
    engine = AlertEngine([rule], [Route("ops", group_wait=0)])
    engine.evaluate("high-pressure", [Sample({"device_id": d}, 9.0, True) for d in ("d1", "d2")], t0)
    (note,) = engine.due(t0)
    assert isinstance(note, Notification) and all(isinstance(a, Alert) for a in note.alerts)
    assert note.at == t0 and note.repeat is False
    hook = make_notifier("webhook", http_receiver.url + "/hook", name="ops")
    with Dispatcher(store, attempts=2, backoff=0.05) as d:
        assert d.submit(note, to=[hook])
        wait_for(lambda: len(store.deliveries("ops")) == 1)
    assert [(x.status, x.group_key) for x in store.deliveries("ops")] == [("ok", note.group_key)]
    body = json.loads(http_receiver.next()["body"])
    assert body == note.to_webhook() and body["version"] == "4" and body["receiver"] == "ops"
    assert set(body) == {"version", "groupKey", "truncatedAlerts", "status", "receiver", "groupLabels",
                         "commonLabels", "commonAnnotations", "externalURL", "alerts"}  # no `at`, no `repeat`
    assert body["groupLabels"] == body["commonLabels"] == {"alertname": "high-pressure", "severity": "critical"}
    assert len(body["alerts"]) == 2
    for a in body["alerts"]:
        assert a["status"] == "firing" and a["endsAt"] == ZERO_TIME and a["startsAt"] == "2027-01-15T08:00:00Z"
        assert a["fingerprint"] == fingerprint(a["labels"])  # Alertmanager's FNV-1a, as rules computes it
    assert {a["labels"]["device_id"] for a in body["alerts"]} == {"d1", "d2"}


def test_stop_timeout_logs_what_is_left(http_receiver, store):
    http_receiver.delay = 0.5
    hook = make_notifier("webhook", http_receiver.url + "/hook", name="ops")
    d = Dispatcher(store, workers=1).start()
    for i in range(6):
        d.submit(group(hot(f"pump-{i}")), to=[hook])
    left = d.stop(timeout=0.2)
    assert left >= 4
    assert sum(x.status == "dropped" and "stopped" in x.error for x in store.deliveries("ops")) == left


# --------------------------------------------------------------------------- the store


def test_store_masks_secrets_and_refuses_duplicates(store, smtp_receiver):
    from iot2ml.core.errors import AlreadyExists, NotFound

    store.add("team", "slack", "https://hooks.slack.com/services/T00/B00/XXXXsecret")
    store.add("oncall", "email", "ops@example.com", smtp="smtp://alice:hunter2@mail:587?starttls=1")
    shown = {r.name: r.masked() for r in store.list()}
    assert shown["team"]["target"] == "https://hooks.slack.com/***"
    assert shown["oncall"]["options"]["smtp"] == "smtp://alice:***@mail:587?starttls=1"
    assert "hunter2" not in json.dumps(shown) and "XXXXsecret" not in json.dumps(shown)
    assert store.get("team").target.endswith("XXXXsecret")  # stored whole: it is what sends
    with pytest.raises(AlreadyExists, match="remove it first"):
        store.add("team", "webhook", "http://x/")
    with pytest.raises(InvalidInput, match="name 'a b'"):
        store.add("a b", "webhook", "http://x/")
    store.remove("team")
    with pytest.raises(NotFound, match="no notifier 'team'"):
        store.remove("team")


# --------------------------------------------------------------------------- CLI and HTTP API


def run(settings, *args: str):
    return CliRunner().invoke(cli, [*args, "--data-dir", str(settings.data_dir)])


def test_cli_add_list_test_remove(settings, http_receiver, smtp_receiver):
    r = run(settings, "notifiers", "add", "ops", "--webhook", http_receiver.url + "/hook")
    assert r.exit_code == 0, r.output
    r = run(settings, "notifiers", "add", "team", "--slack", http_receiver.url + "/services/T/B/s3cret")
    assert r.exit_code == 0 and "s3cret" not in r.output, r.output
    r = run(settings, "notifiers", "add", "oncall", "--email", "ops@example.com", "--smtp", smtp_receiver.url)
    assert r.exit_code == 0, r.output
    r = run(settings, "notifiers", "add", "down", "--webhook", closed_url())
    assert r.exit_code == 0, r.output
    r = run(settings, "notifiers", "add", "both", "--webhook", "http://x/", "--slack", "http://y/")
    assert r.exit_code == 2 and "exactly one" in r.output
    r = run(settings, "notifiers", "add", "ops", "--webhook", "http://x/")
    assert r.exit_code == 2 and "exists" in r.output

    r = run(settings, "notifiers", "list", "--json")
    assert r.exit_code == 0, r.output
    rows = {x["name"]: x for x in json.loads(r.output)}
    assert sorted(rows) == ["down", "oncall", "ops", "team"] and rows["oncall"]["kind"] == "email"
    assert "s3cret" not in r.output and rows["team"]["target"].endswith("/***")

    r = run(settings, "notifiers", "test", "ops")
    assert r.exit_code == 0 and "delivered" in r.output, r.output
    assert json.loads(http_receiver.next()["body"])["alerts"][0]["labels"]["alertname"] == "Iot2mlTest"
    r = run(settings, "notifiers", "test", "oncall")
    assert r.exit_code == 0, r.output
    assert smtp_receiver.next()[1]["Subject"] == "[FIRING:1] Iot2mlTest (info)"
    r = run(settings, "notifiers", "test", "down")
    assert r.exit_code == 1 and "not delivered" in r.output and "cannot be reached" in r.output

    r = run(settings, "notifiers", "remove", "down")
    assert r.exit_code == 0, r.output
    r = run(settings, "notifiers", "remove", "down")
    assert r.exit_code == 2 and "no notifier 'down'" in r.output
    log = Notifiers(Catalog(settings.catalog)).deliveries()
    assert [(x.notifier, x.status) for x in log] == [("ops", "ok"), ("oncall", "ok"), ("down", "failed")]


def test_api_routes(settings, http_receiver):
    catalog = Catalog(settings.catalog)
    admin, reader = Keys(catalog).add_key("root", "admin"), Keys(catalog).add_key("viewer", "reader")
    as_admin, as_reader = {"Authorization": f"Bearer {admin}"}, {"Authorization": f"Bearer {reader}"}
    body = {"name": "ops", "kind": "webhook", "target": http_receiver.url + "/hook?token=s3cret"}
    with TestClient(create_app(settings, catalog=catalog)) as c:
        assert c.post("/api/v1/notifiers", json=body).status_code == 401
        assert c.post("/api/v1/notifiers", json=body, headers=as_reader).status_code == 403
        r = c.post("/api/v1/notifiers", json=body, headers=as_admin)
        assert r.status_code == 201 and r.json()["target"] == http_receiver.url + "/hook?token=***"
        assert c.post("/api/v1/notifiers", json=body, headers=as_admin).status_code == 409
        r = c.post("/api/v1/notifiers", json={**body, "name": "x", "kind": "pager"}, headers=as_admin)
        assert r.status_code == 422 and "pager" in r.json()["detail"]
        r = c.get("/api/v1/notifiers", headers=as_reader)
        assert r.status_code == 200 and [x["name"] for x in r.json()] == ["ops"] and "s3cret" not in r.text

        assert c.post("/api/v1/notifiers/ops/test", headers=as_reader).status_code == 403
        r = c.post("/api/v1/notifiers/ops/test", headers=as_admin)
        assert r.status_code == 200 and r.json()["status"] == "ok" and r.json()["notifier"] == "ops"
        assert json.loads(http_receiver.next()["body"])["version"] == "4"
        http_receiver.answers = [500]
        r = c.post("/api/v1/notifiers/ops/test", headers=as_admin)
        assert r.status_code == 200 and r.json()["status"] == "failed" and "500" in r.json()["error"]
        for bad in ({"timeout": "soon"}, {"timeout": -1}, {"colour": "red"}):
            r = c.post("/api/v1/notifiers", json={**body, "name": "bad", "options": bad}, headers=as_admin)
            assert r.status_code == 422, r.text
        r = c.post("/api/v1/notifiers", json={"name": "m", "kind": "email", "target": "a@b.c",
                                              "options": {"smtp": 25}}, headers=as_admin)
        assert r.status_code == 422 and "must be text" in r.json()["detail"]
        assert c.post("/api/v1/notifiers/nope/test", headers=as_admin).status_code == 404

        assert c.delete("/api/v1/notifiers/ops", headers=as_reader).status_code == 403
        assert c.delete("/api/v1/notifiers/ops", headers=as_admin).status_code == 204
        assert c.delete("/api/v1/notifiers/ops", headers=as_admin).status_code == 404
        assert c.get("/api/v1/notifiers", headers=as_reader).json() == []


def test_exports_and_light_import():
    import subprocess
    import sys

    from iot2ml import monitor

    assert {"Alert", "Notification", "Delivery", "Notifier", "WebhookNotifier", "SlackNotifier", "EmailNotifier",
            "AppriseNotifier", "KINDS", "make_notifier", "Dispatcher", "deliver", "Notifiers"} <= set(monitor.__all__)
    assert all(getattr(monitor, name) is not None for name in monitor.__all__)
    assert sorted(KINDS) == ["apprise", "email", "slack", "webhook"]
    code = ("import sys, iot2ml.monitor; "
            "print(sorted(m for m in ('apprise', 'smtplib', 'httpx', 'fastapi') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
