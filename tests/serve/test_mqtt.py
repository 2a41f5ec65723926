"""Predictions over the real embedded broker: a device asks over MQTT and gets its answer on its own
topic (and cannot read another device's), the device type's bound model answers requests without
'model', and a streaming deployment scores every arriving reading exactly once across a restart."""

from __future__ import annotations

import json
import queue
import threading
import time

import paho.mqtt.client as mqtt
import pytest
from servekit import ServerThread, free_port, instance

from iot2ml.auth.store import Devices
from iot2ml.core.catalog import Catalog
from iot2ml.query import run_query
from iot2ml.serve.deployments import Deployments, build_spec


def client(port: int, user: str, password: str, subscribe: str | None = None) -> tuple[mqtt.Client, queue.Queue]:
    inbox: queue.Queue = queue.Queue()
    connected = threading.Event()
    granted: dict = {}
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv311)
    c.username_pw_set(user, password)
    c.on_connect = lambda *_a: connected.set()
    c.on_message = lambda _c, _u, msg: inbox.put((msg.topic, json.loads(msg.payload)))
    c.on_subscribe = lambda _c, _u, _mid, codes, _p: granted.setdefault("codes", [x.value for x in codes])
    c.connect("127.0.0.1", port)
    c.loop_start()
    assert connected.wait(10)
    if subscribe:
        c.subscribe(subscribe, qos=0)
        deadline = time.monotonic() + 5
        while "codes" not in granted and time.monotonic() < deadline:
            time.sleep(0.02)
        c._granted = granted.get("codes")  # type: ignore[attr-defined]
    return c, inbox


@pytest.fixture
def mqtt_served(trained, make_broker):
    from iot2ml.api import create_serve_app
    from iot2ml.components import serving_runtime

    settings, bench = trained
    catalog = Catalog(settings.catalog)
    deployments = Deployments(catalog)
    for d in deployments.list():
        deployments.remove(d.name, who="test reset")
    bench.registry.client.set_registered_model_alias("wine", "champion", "1")
    Devices(catalog).add_type("wine", exist_ok=True)
    broker = make_broker(settings)
    # Streaming deployments score what the ingest commits: run the real ingest on this data dir.
    import os
    import subprocess
    import sys

    from iot2ml.supervisor import settings_env

    ingest = subprocess.Popen([sys.executable, "-m", "iot2ml", "ingest"],
                              env={**os.environ, **settings_env(settings), "IOT2ML_CONFIG": os.devnull},
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    servers = []

    def start():
        app = create_serve_app(settings, catalog=catalog, runtime=serving_runtime(settings, catalog),
                               nats_url=broker.url)
        servers.append(ServerThread(app, free_port()))
        return app

    def stop():
        while servers:
            servers.pop().stop()

    start.stop = stop
    yield settings, bench, catalog, deployments, broker, start
    stop()
    ingest.terminate()
    ingest.wait(30)
    catalog.close()


def test_device_round_trip_over_mqtt(mqtt_served):
    _settings, _bench, catalog, deployments, broker, start = mqtt_served
    tok_a = Devices(catalog).add_device(f"ws-a{time.monotonic_ns()}", "wine")
    dev_a = Devices(catalog).list_devices()[-1].device_id
    dev_b = f"ws-b{time.monotonic_ns()}"
    tok_b = Devices(catalog).add_device(dev_b, "wine")
    broker.service.poke()
    broker.wait_reload()
    deployments.put(build_spec(None, "wine", devices="wine"), who="test", action="deploy")
    app = start()
    deadline = time.monotonic() + 20
    while "wine" not in app.state.runtime._specs and time.monotonic() < deadline:
        time.sleep(0.1)

    a, inbox_a = client(broker.mqtt_port, dev_a, tok_a, subscribe=f"devices/{dev_a}/predictions")
    # Device B may not read A's answers: the broker refuses the subscription (SUBACK 0x80).
    b, inbox_b = client(broker.mqtt_port, dev_b, tok_b, subscribe=f"devices/{dev_a}/predictions")
    assert b._granted == [128]
    time.sleep(0.3)

    a.publish(f"devices/{dev_a}/predict", json.dumps({"request_id": "q1", "model": "wine", **instance(3)}), qos=1)
    topic, reply = inbox_a.get(timeout=10)
    assert topic == f"devices/{dev_a}/predictions"
    assert reply["request_id"] == "q1" and reply["model"] == "wine" and reply["version"] == 1
    assert reply["prediction"] in ("good", "better", "best") and "probabilities" in reply

    # Without 'model' the deployment bound to the device's type answers.
    a.publish(f"devices/{dev_a}/predict", json.dumps({"request_id": "q2", **instance(4)}), qos=1)
    _, reply = inbox_a.get(timeout=10)
    assert reply["request_id"] == "q2" and reply["model"] == "wine"

    # Bad input: an error answer naming the field, and the channel keeps answering.
    a.publish(f"devices/{dev_a}/predict", json.dumps({"request_id": "q3", "model": "wine", "alcohol": 1}), qos=1)
    _, reply = inbox_a.get(timeout=10)
    assert reply["request_id"] == "q3" and "volatile_acidity" in reply["error"]
    a.publish(f"devices/{dev_a}/predict", b"not json", qos=1)
    _, reply = inbox_a.get(timeout=10)
    assert "not JSON" in reply["error"]
    for i in range(50):
        a.publish(f"devices/{dev_a}/predict", json.dumps({"request_id": f"r{i}", **instance(i)}), qos=0)
        _, reply = inbox_a.get(timeout=10)
        assert reply["request_id"] == f"r{i}"
    assert inbox_b.empty()

    # A device of another type may not use this deployment.
    Devices(catalog).add_type("pump", exist_ok=True)
    dev_p = f"pump-x{time.monotonic_ns()}"
    tok_p = Devices(catalog).add_device(dev_p, "pump")
    broker.service.poke()
    broker.wait_reload()
    p, inbox_p = client(broker.mqtt_port, dev_p, tok_p, subscribe=f"devices/{dev_p}/predictions")
    time.sleep(0.3)
    p.publish(f"devices/{dev_p}/predict", json.dumps({"request_id": "p1", "model": "wine", **instance(1)}), qos=1)
    _, reply = inbox_p.get(timeout=10)
    assert reply["request_id"] == "p1" and "--devices pump" in reply["error"]
    p.loop_stop()
    p.disconnect()
    for c in (a, b):
        c.loop_stop()
        c.disconnect()


def _predictions(bench, name: str) -> list:
    try:
        return run_query(bench.lake, f"SELECT device_id, ts, version, label, task FROM predictions "
                                     f"WHERE model = '{name}' ORDER BY ts").rows
    except Exception:  # noqa: BLE001 - not there before the first write
        return []


def test_streaming_deployment_scores_every_arriving_row_once_across_a_restart(mqtt_served):
    _settings, bench, catalog, deployments, broker, start = mqtt_served
    device = f"ws-s{time.monotonic_ns()}"
    token = Devices(catalog).add_device(device, "wine")
    broker.service.poke()
    broker.wait_reload()
    deployments.put(build_spec(None, "wine", stream="wine"), who="test", action="deploy")
    app = start()
    deadline = time.monotonic() + 20
    while "wine" not in app.state.runtime._specs and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(2.0)  # the stream scorer starts within a second of the deployment

    c, inbox = client(broker.mqtt_port, device, token, subscribe=f"devices/{device}/predictions")
    base = time.time()

    def send(first: int, n: int) -> None:
        for i in range(first, first + n):
            payload = {"ts": base + i, **instance(1000 + i), "msg_id": f"m{i}"}
            info = c.publish(f"devices/{device}/telemetry", json.dumps(payload), qos=1)
            info.wait_for_publish(10)

    send(0, 40)
    got = []
    deadline = time.monotonic() + 20
    while len(got) < 40 and time.monotonic() < deadline:
        try:
            got.append(inbox.get(timeout=1)[1])
        except queue.Empty:
            pass
    assert len(got) == 40 and all(g["model"] == "wine" and g["prediction"] in ("good", "better", "best") for g in got)

    # Stop the serving process, send more while it is down, start it again: it goes on from its mark.
    start.stop()
    send(40, 30)
    start()
    deadline = time.monotonic() + 30
    rows = []
    while time.monotonic() < deadline:
        rows = [r for r in _predictions(bench, "wine") if r[0] == device]
        if len(rows) >= 70:
            break
        time.sleep(0.3)
    time.sleep(1.0)
    rows = [r for r in _predictions(bench, "wine") if r[0] == device]
    assert len(rows) == 70, len(rows)
    assert len({r[1] for r in rows}) == 70  # every reading once, none twice
    assert all(r[2] == 1 and r[3] in ("good", "better", "best") and r[4] == "classify" for r in rows)
    c.loop_stop()
    c.disconnect()



def test_a_device_over_its_rate_limit_gets_an_error_answer_over_mqtt(mqtt_served):
    """MQTT requests count against the device's limits as its HTTP ones do (auth.limits): past the
    burst the answer is an error naming the limit; another device is served meanwhile."""
    from iot2ml.api import create_serve_app
    from iot2ml.components import serving_runtime

    settings, _bench, catalog, deployments, broker, _start = mqtt_served
    limited = settings.model_copy(update={"limit_device_rate": 2, "limit_device_burst": 5})
    fast, calm = f"ws-fast{time.monotonic_ns()}", f"ws-calm{time.monotonic_ns()}"
    tok_fast, tok_calm = Devices(catalog).add_device(fast, "wine"), Devices(catalog).add_device(calm, "wine")
    broker.service.poke()
    broker.wait_reload()
    deployments.put(build_spec(None, "wine", devices="wine"), who="test", action="deploy")
    app = create_serve_app(limited, catalog=catalog, runtime=serving_runtime(limited, catalog), nats_url=broker.url)
    server = ServerThread(app, free_port())
    try:
        deadline = time.monotonic() + 20
        while "wine" not in app.state.runtime._specs and time.monotonic() < deadline:
            time.sleep(0.1)
        f, inbox_f = client(broker.mqtt_port, fast, tok_fast, subscribe=f"devices/{fast}/predictions")
        c, inbox_c = client(broker.mqtt_port, calm, tok_calm, subscribe=f"devices/{calm}/predictions")
        time.sleep(0.3)
        for i in range(30):
            f.publish(f"devices/{fast}/predict", json.dumps({"request_id": f"f{i}", **instance(i)}), qos=1)
        replies = [inbox_f.get(timeout=10)[1] for _ in range(30)]
        refused = [r for r in replies if "error" in r]
        assert 5 <= 30 - len(refused) <= 8, replies  # the burst, and what the rate refilled meanwhile
        assert all(f"rate limit: device {fast} over 2 requests/s" in r["error"] for r in refused)
        c.publish(f"devices/{calm}/predict", json.dumps({"request_id": "c1", **instance(1)}), qos=1)
        _, reply = inbox_c.get(timeout=10)
        assert reply["request_id"] == "c1" and "prediction" in reply
    finally:
        server.stop()
