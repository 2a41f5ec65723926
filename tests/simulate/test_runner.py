"""run_simulation against the real Mosquitto broker (MQTT path) and a recording HTTP endpoint.

Mosquitto here allows anonymous clients and checks no passwords, so these tests cover what the
runner sends and counts, not the platform's authentication (the platform's end-to-end tests do).
"""

from __future__ import annotations

import _thread
import json
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Iterator

import pytest

from iot2ml.auth.store import Devices
from iot2ml.core.catalog import Catalog
from iot2ml.core.config import load_settings
from iot2ml.core.errors import AuthError, BrokerUnavailable, ConfigError, NotFound
from iot2ml.core.runtime import free_port
from iot2ml.simulate import get_scenario, run_simulation


@pytest.fixture
def settings(tmp_path):
    return load_settings(data_dir=tmp_path)


def _prefix() -> str:
    return "t" + uuid.uuid4().hex[:10]


def _by_device(messages: list[tuple[str, bytes]]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for topic, payload in messages:
        out.setdefault(topic.split("/")[1], []).append(json.loads(payload))
    return out


def test_mqtt_run_sends_every_reading_once_and_counts_pubacks(settings, mosquitto, subscribe) -> None:
    prefix = _prefix()
    ids = [f"{prefix}-{i:04d}" for i in range(3)]
    sub = subscribe(*(f"devices/{d}/telemetry" for d in ids), qos=1)
    before = time.time()

    stats = run_simulation(settings, "pump", devices=3, rate=10, duration=1.5, id_prefix=prefix, progress=True,
                           mqtt_host=mosquitto[0], mqtt_port=mosquitto[1])

    assert (stats.sent, stats.acked, stats.failed, stats.interrupted) == (45, 45, 0, False)
    assert stats.per_device == dict.fromkeys(ids, 15)
    assert 1.2 < stats.elapsed < 10
    got = _by_device(sub.wait_for(45, 10))
    assert sorted(got) == ids
    for device, readings in got.items():
        assert [r["msg_id"] for r in readings] == [f"{device}-{stats.run_id}-{n}" for n in range(15)]
        assert all(set(r) == {"ts", "msg_id", "pressure", "flow", "vibration"} for r in readings)
        stamps = [r["ts"] for r in readings]
        assert stamps == sorted(stamps) and before - 1 < stamps[0] and stamps[-1] < time.time() + 1
        assert 1.0 < stamps[-1] - stamps[0] < 2.5  # paced at 10/s, not sent in one burst
    catalog = Catalog(settings.catalog)
    try:
        assert {d.device_id: d.type for d in Devices(catalog).list_devices()} == dict.fromkeys(ids, "pump")
    finally:
        catalog.close()


def test_rerun_rotates_tokens_and_gives_new_msg_ids(settings, mosquitto, subscribe) -> None:
    prefix = _prefix()
    sub = subscribe(f"devices/{prefix}-0000/telemetry", qos=1)
    runs = [run_simulation(settings, "pollution", devices=1, rate=20, duration=0.5, id_prefix=prefix, progress=False,
                           mqtt_host=mosquitto[0], mqtt_port=mosquitto[1], start_time=1_700_000_000.0)
            for _ in range(2)]
    assert runs[0].run_id != runs[1].run_id
    readings = [json.loads(p) for _, p in sub.wait_for(20, 10)]
    assert len({r["msg_id"] for r in readings}) == 20
    # start_time replays a fixed period: the same readings, ts = start_time + k / rate
    first, second = readings[:10], readings[10:]
    assert [r["ts"] for r in first] == [round(1_700_000_000.0 + k / 20, 3) for k in range(10)]
    strip = [{k: v for k, v in r.items() if k != "msg_id"} for r in first]
    assert strip == [{k: v for k, v in r.items() if k != "msg_id"} for r in second]
    model = get_scenario("pollution").make_device(0, 0)
    assert {k: v for k, v in first[3].items() if k not in ("ts", "msg_id")} == model.reading(first[3]["ts"])


def test_stop_event_ends_an_open_ended_run(settings, mosquitto) -> None:
    stop = threading.Event()
    threading.Timer(1.0, stop.set).start()
    stats = run_simulation(settings, "pump", devices=2, rate=50, duration=None, id_prefix=_prefix(), progress=False,
                           stop=stop, mqtt_host=mosquitto[0], mqtt_port=mosquitto[1])
    assert stats.interrupted and 60 <= stats.sent <= 200
    assert stats.acked == stats.sent and stats.failed == 0


def test_ctrl_c_ends_the_run_cleanly(settings, mosquitto) -> None:
    threading.Timer(1.0, _thread.interrupt_main).start()
    stats = run_simulation(settings, "pump", devices=2, rate=50, duration=None, id_prefix=_prefix(), progress=False,
                           mqtt_host=mosquitto[0], mqtt_port=mosquitto[1])
    assert stats.interrupted and stats.sent > 0 and stats.acked == stats.sent
    assert not [t for t in threading.enumerate() if t.name == "iot2ml-sim-mqtt"]


def test_no_broker_raises_broker_unavailable(settings) -> None:
    with pytest.raises(BrokerUnavailable, match="accepted none of 1 devices.*iot2ml up"):
        run_simulation(settings, "pump", devices=1, rate=1, duration=1, id_prefix=_prefix(), progress=False,
                       mqtt_host="127.0.0.1", mqtt_port=free_port(), connect_timeout=1.0)


def test_no_platform_running_names_the_fix(settings) -> None:
    with pytest.raises(NotFound, match="iot2ml up"):
        run_simulation(settings, "pump", devices=1, rate=1, duration=1, progress=False)


@pytest.mark.parametrize("kwargs, match", [
    ({"devices": 0}, "devices=0"),
    ({"rate": 0}, "rate=0"),
    ({"duration": -1}, "duration=-1"),
    ({"transport": "coap"}, "transport='coap'.*mqtt, http"),
])
def test_bad_options_are_named(settings, kwargs, match) -> None:
    args = {"devices": 1, "rate": 1.0, "duration": 1.0, **kwargs}
    with pytest.raises(ConfigError, match=match):
        run_simulation(settings, "pump", progress=False, **args)


# ---- HTTP -----------------------------------------------------------------------------------
class _Recorder(ThreadingHTTPServer):
    """Answers the telemetry route like the API would: 201 if the bearer token is this device's."""

    def __init__(self, catalog_url: str) -> None:
        self.devices = Devices(Catalog(catalog_url))
        self.posts: list[tuple[str, list[dict]]] = []
        self.refuse = False
        super().__init__(("127.0.0.1", 0), _Handler)


class _Handler(BaseHTTPRequestHandler):
    server: _Recorder

    def do_POST(self) -> None:  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        device_id = self.path.split("/")[4]
        token = self.headers.get("Authorization", "").removeprefix("Bearer ")
        owner = self.server.devices.device_for_token(token)
        ok = not self.server.refuse and owner is not None and owner.device_id == device_id and \
            self.path == f"/api/v1/devices/{device_id}/telemetry"
        if ok:
            self.server.posts.append((device_id, body))
        self.send_response(201 if ok else 401)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args) -> None:  # noqa: ANN002
        pass


@pytest.fixture
def api(settings) -> Iterator[_Recorder]:
    server = _Recorder(settings.catalog)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.devices.catalog.close()


def test_http_run_posts_batches_with_each_devices_token(settings, api) -> None:
    prefix = _prefix()
    url = f"http://127.0.0.1:{api.server_address[1]}"
    stats = run_simulation(settings, "pollution", devices=4, rate=20, duration=1.0, transport="http", id_prefix=prefix,
                           progress=False, api_url=url)
    assert (stats.sent, stats.acked, stats.failed) == (80, 80, 0), stats.errors
    assert all(isinstance(body, list) for _, body in api.posts)
    assert len(api.posts) < 80  # batched
    per_device: dict[str, list[str]] = {}
    for device, body in api.posts:
        per_device.setdefault(device, []).extend(r["msg_id"] for r in body)
    assert {d: sorted(m) for d, m in per_device.items()} == {
        f"{prefix}-{i:04d}": sorted(f"{prefix}-{i:04d}-{stats.run_id}-{n}" for n in range(20)) for i in range(4)
    }


def test_http_refusal_raises_auth_error(settings, api) -> None:
    api.refuse = True
    with pytest.raises(AuthError, match="HTTP 401"):
        run_simulation(settings, "pump", devices=1, rate=20, duration=3, transport="http", id_prefix=_prefix(),
                       progress=False, api_url=f"http://127.0.0.1:{api.server_address[1]}")


def test_broker_refusing_the_devices_raises_auth_error(settings, private_mosquitto) -> None:
    broker = private_mosquitto(users={"someone-else": "x"})
    with pytest.raises(AuthError, match=r"refused 2 of 2 devices .*Not authorized"):
        run_simulation(settings, "pump", devices=2, rate=1, duration=1, id_prefix=_prefix(), progress=False,
                       mqtt_host=broker.host, mqtt_port=broker.port, connect_timeout=1.5)


def test_broker_restart_mid_run_loses_nothing(settings, private_mosquitto) -> None:
    broker = private_mosquitto()

    def bounce() -> None:
        time.sleep(1.0)
        broker.stop()
        time.sleep(1.0)
        broker.start()

    threading.Thread(target=bounce, daemon=True).start()
    stats = run_simulation(settings, "pump", devices=3, rate=20, duration=4, id_prefix=_prefix(), progress=False,
                           mqtt_host=broker.host, mqtt_port=broker.port, drain_timeout=15)
    assert stats.sent == 3 * 80
    assert stats.acked == stats.sent, stats.errors  # kept while the broker was away, sent on reconnect
    assert any("cannot connect" in e for e in stats.errors)
