"""1,200 hostile payloads mixed with 3,000 valid ones, over real MQTT into the running ingest."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import orjson

from hostile import mixed_stream
from iot2ml.auth.store import Devices
from iot2ml.core.catalog import Catalog
from iot2ml.lake import Lake
from iot2ml.simulate.loadgen import publish_qos1_sync
from iot2ml.supervisor import settings_env


def test_hostile_payloads_never_stop_the_ingest_and_lose_nothing_valid(settings, make_broker, tmp_path):
    broker = make_broker(settings)
    devices = Devices(Catalog(settings.catalog))
    devices.add_type("pump", "pressure:float")
    token = devices.add_device("h-1", "pump")
    broker.service.poke()
    broker.wait_reload()
    env = {**os.environ, **settings_env(settings), "IOT2ML_CONFIG": os.devnull}
    log = open(tmp_path / "ingest.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "iot2ml", "ingest"], env=env, stdout=log, stderr=log)
    try:
        stream = mixed_stream(1200, 3000, limit=settings.max_payload_bytes)
        res = publish_qos1_sync("127.0.0.1", broker.mqtt_port, username="h-1", password=token,
                                topic="devices/h-1/telemetry", payloads=[p for p, _ in stream])
        assert res.acked == len(stream)
        lake = Lake(settings.lake)

        def count(table: str) -> int:
            if table not in lake.tables():
                return 0
            lake.forget(table)
            return lake.open(table).to_pyarrow_dataset().count_rows()

        deadline = time.monotonic() + 60
        while count("dead_letters") < 1200 and time.monotonic() < deadline:
            time.sleep(0.3)
        time.sleep(1.0)
        assert proc.poll() is None, "the ingest died"
        pump = lake.open("pump").to_pyarrow_table(columns=["msg_id", "pressure"])
        valid = {orjson.loads(p)["msg_id"]: orjson.loads(p)["pressure"] for p, r in stream if r is None}
        got = list(zip(pump["msg_id"].to_pylist(), pump["pressure"].to_pylist()))
        # `[{"pressure": 1}, "x"]` keeps its valid first item: nothing valid around a bad one is lost.
        mixed = sum(1 for p, _ in stream if p == b'[{"pressure": 1}, "x"]')
        assert mixed > 0 and [g for g in got if g[0] is None] == [(None, 1.0)] * mixed
        assert dict(g for g in got if g[0] is not None) == valid
        dead = lake.open("dead_letters").to_pyarrow_table(columns=["reason"])["reason"].to_pylist()
        assert len(dead) == 1200
        phrases = {r for _, r in stream if r is not None}
        assert all(any(p in reason for p in phrases) for reason in dead)
        assert all(any(p in reason for reason in dead) for p in phrases)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(20)
