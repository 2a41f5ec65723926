"""Acknowledged messages land in the lake exactly once while the ingest is SIGKILLed and restarted.

Real parts only: the embedded nats-server (MQTT + JetStream), the ingest as its own process, Delta
tables on disk. The duplicate filter on msg_id is switched off (dedup_window=0), so only the
sequence bookkeeping in the Delta commits can keep rows from doubling.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time

import orjson
import pytest
from fastapi.testclient import TestClient

from iot2ml.api import create_app
from iot2ml.auth.store import Devices
from iot2ml.core.catalog import Catalog
from iot2ml.lake import Lake
from iot2ml.simulate.loadgen import publish_qos1_sync
from iot2ml.supervisor import settings_env

DEVICES = 5
PER_DEVICE = 10_000
HTTP_BODIES = 200
HTTP_READINGS = 10


def start_ingest(settings, log_path):
    env = {**os.environ, **settings_env(settings), "IOT2ML_CONFIG": os.devnull, "IOT2ML_LOG_LEVEL": "WARNING"}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    with open(log_path, "ab") as log:
        return subprocess.Popen([sys.executable, "-m", "iot2ml", "ingest"], env=env, stdout=log, stderr=log)


def count(lake: Lake, table: str) -> int:
    if table not in lake.tables():
        return 0
    return lake.open(table).to_pyarrow_dataset().count_rows()


@pytest.mark.timeout(240)
def test_exactly_once_through_sigkills(settings, make_broker, tmp_path):
    settings = settings.model_copy(update={"dedup_window": 0.0, "flush_interval": 0.2,
                                           "compact_interval": 3.0, "compact_min_files": 8})
    broker = make_broker(settings)
    devices = Devices(Catalog(settings.catalog))
    tokens = {f"eo-{d}": devices.add_device(f"eo-{d}", "pump") for d in range(DEVICES)}
    http_token = devices.add_device("eo-http", "pump")
    broker.service.poke()
    broker.wait_reload()

    log_path = tmp_path / "ingest.log"
    proc = start_ingest(settings, log_path)
    publish_done = threading.Event()
    three_kills = threading.Event()
    errors: list[BaseException] = []

    def publish() -> None:
        try:
            base = 1_763_780_000.0
            for d, (dev, token) in enumerate(tokens.items()):
                if d == DEVICES - 1:  # hold the last device's messages until the ingest died 3 times
                    assert three_kills.wait(180), "the ingest was not killed 3 times"
                for start in range(0, PER_DEVICE, 1_000):
                    payloads = [
                        orjson.dumps({"ts": base + i, "msg_id": f"{dev}-{i}", "n": i, "pressure": i * 0.5})
                        for i in range(start, start + 1_000)
                    ]
                    res = publish_qos1_sync("127.0.0.1", broker.mqtt_port, username=dev, password=token,
                                            topic=f"devices/{dev}/telemetry", payloads=payloads)
                    assert res.acked == len(payloads)
                    time.sleep(0.2)
            app = create_app(settings, nats_url=broker.url)
            with TestClient(app) as client:
                for b in range(HTTP_BODIES):
                    body = [{"msg_id": f"http-{b}-{k}", "n": b * 100 + k, "pressure": 1.0} for k in range(HTTP_READINGS)]
                    r = client.post("/api/v1/devices/eo-http/telemetry", json=body,
                                    headers={"Authorization": f"Bearer {http_token}"})
                    assert r.status_code == 201, r.text
        except BaseException as err:  # noqa: BLE001
            errors.append(err)
        finally:
            publish_done.set()

    publisher = threading.Thread(target=publish, daemon=True)
    publisher.start()
    rng = random.Random(1)
    kills = 0
    lake = Lake(settings.lake)
    seen_at_kill = []
    while not publish_done.is_set() or kills < 3:
        # Kill only after the ingest committed something since its last start, then at a random moment.
        before = count(lake, "raw") if "raw" in lake.tables() else 0
        deadline = time.monotonic() + 60
        while count(lake, "raw") <= before and not publish_done.is_set() and time.monotonic() < deadline:
            lake.forget("raw")
            time.sleep(0.05)
        time.sleep(rng.uniform(0.0, 0.8))
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        kills += 1
        lake.forget("raw")
        seen_at_kill.append(count(lake, "raw"))
        proc = start_ingest(settings, log_path)
        if kills >= 3:
            three_kills.set()
    publisher.join(60)
    assert not errors, errors

    expected = DEVICES * PER_DEVICE + HTTP_BODIES * HTTP_READINGS
    deadline = time.monotonic() + 90
    while count(lake, "pump") < expected and time.monotonic() < deadline:
        time.sleep(0.5)
    time.sleep(1.5)  # anything extra would show up now
    proc.send_signal(signal.SIGTERM)
    proc.wait(20)

    assert kills >= 3
    # The kills fell while data was flowing: the lake held part of it each time, more each time.
    mid_flow = [c for c in seen_at_kill if 0 < c < DEVICES * PER_DEVICE]
    assert len(set(mid_flow)) >= 3, seen_at_kill
    pump = lake.open("pump").to_pyarrow_table(columns=["device_id", "msg_id", "n", "pressure"])
    assert pump.num_rows == expected, log_path.read_text()[-3000:]
    ids = pump["msg_id"].to_pylist()
    assert len(set(ids)) == expected  # no duplicates
    want = {f"{d}-{i}" for d in tokens for i in range(PER_DEVICE)}
    want |= {f"http-{b}-{k}" for b in range(HTTP_BODIES) for k in range(HTTP_READINGS)}
    assert set(ids) == want
    rows = {m: (n, p) for m, n, p in zip(ids, pump["n"].to_pylist(), pump["pressure"].to_pylist())}
    assert rows["eo-3-1234"] == (1234, 617.0)  # content, not just counts
    raw = lake.open("raw").to_pyarrow_table(columns=["_seq"])["_seq"].to_pylist()
    assert len(raw) == len(set(raw)) == DEVICES * PER_DEVICE + HTTP_BODIES
    assert count(lake, "dead_letters") == 0
