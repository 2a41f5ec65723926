"""`iot2ml ingest --mqtt-url` against a real Mosquitto (default settings, our own instance)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid

import orjson

from iot2ml.auth.store import Devices
from iot2ml.core.catalog import Catalog
from iot2ml.lake import Lake
from iot2ml.simulate.loadgen import publish_qos1_sync
from iot2ml.supervisor import settings_env


def test_ingest_from_external_mosquitto(settings, make_broker, tmp_path, external_mosquitto):
    host, port = external_mosquitto
    settings = settings.model_copy(update={"mqtt_url": f"mqtt://{host}:{port}"})
    make_broker(settings)
    device = f"ext-{uuid.uuid4().hex[:8]}"
    Devices(Catalog(settings.catalog)).add_device(device, "ext")
    env = {**os.environ, **settings_env(settings), "IOT2ML_CONFIG": os.devnull}
    log = open(tmp_path / "ingest.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "iot2ml", "ingest"], env=env, stdout=log, stderr=log)
    try:
        time.sleep(3)  # the bridge subscribes
        payloads = [orjson.dumps({"msg_id": f"m{i}", "n": i, "level": i * 0.1}) for i in range(2000)]
        payloads.append(payloads[5])  # a resend: stored once
        # Paced: Mosquitto's default queue of 1,000 messages per subscriber drops beyond it
        # (see ingest/bridge.py).
        for start in range(0, len(payloads), 250):
            chunk = payloads[start:start + 250]
            res = publish_qos1_sync(host, port, username=None, password=None,
                                    topic=f"devices/{device}/telemetry", payloads=chunk)
            assert res.acked == len(chunk)
            time.sleep(0.1)
        lake = Lake(settings.lake)

        def rows() -> int:
            if "ext" not in lake.tables():
                return 0
            lake.forget("ext")
            return lake.open("ext").to_pyarrow_dataset().count_rows()

        deadline = time.monotonic() + 60
        while rows() < 2000 and time.monotonic() < deadline:
            time.sleep(0.3)
        time.sleep(1.0)
        table = lake.open("ext").to_pyarrow_table(columns=["device_id", "n"])
        assert table.num_rows == 2000, (tmp_path / "ingest.log").read_text()[-2000:]
        assert sorted(table["n"].to_pylist()) == list(range(2000))
        assert set(table["device_id"].to_pylist()) == {device}
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(20)
