"""Ingest throughput, freshness and memory against the raw broker drain, in one run.

Phases (same embedded nats-server, same publisher, same payloads):
  reference  the messages published to devices/<id>/telemetry and drained by a plain `mosquitto_sub`
             (QoS 1) while the ingest is stopped; then the stream is purged
  lake       the same messages into the lake through `iot2ml ingest` (running as its own process):
             time from the first publish until the last row is committed
  batched    the same for payloads of 100 readings each (readings/s into the lake)
  freshness  1,000 msg/s for --fresh-seconds; per message, publish -> visible in the lake (p50/p99)
Prints one JSON line.

    python benchmarks/ingest.py [--messages 200000] [--batched 20000] [--fresh-seconds 20]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import orjson

from iot2ml.auth.store import Devices
from iot2ml.broker.service import BrokerService
from iot2ml.core.catalog import Catalog
from iot2ml.core.config import load_settings
from iot2ml.core.transport import STREAM
from iot2ml.ingest.service import APP_ID
from iot2ml.lake import Lake
from iot2ml.simulate.loadgen import publish_qos1_sync
from iot2ml.supervisor import settings_env


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def single_payloads(n: int) -> list[bytes]:
    base = 1_763_780_000.0
    return [
        orjson.dumps({"ts": base + i * 0.001, "msg_id": f"pump-0007-{i:010d}", "pressure": 3.2 + (i % 100) * 0.01,
                      "flow": 11.93, "vibration": 0.317, "temperature": 41.52, "status": "running", "rpm": 1480,
                      "valve_open": True, "power_kw": 7.46, "site": "north-basin-3"})
        for i in range(n)
    ]


def batched_payloads(n: int) -> list[bytes]:
    base = 1_763_780_000.0
    out = []
    for m in range(n):
        readings = [{"ts": base + m + k * 0.01, "pressure": 3.2 + k * 0.01, "flow": 11.9, "vibration": 0.3}
                    for k in range(100)]
        out.append(orjson.dumps(readings))
    return out


class Bench:
    def __init__(self, root: Path) -> None:
        # One device publishes as fast as it can: the per-device limits (auth.limits) are off, so the
        # ingest's throughput is measured, not the limit.
        self.settings = load_settings(data_dir=root / "data", nats_port=0, mqtt_port=0, http_port=0,
                                      flush_interval=0.25, limit_device_rate=0, limit_device_bytes=0)
        self.catalog = Catalog(self.settings.catalog)
        devices = Devices(self.catalog)
        self.broker = BrokerService(self.settings, devices)
        self.broker.start()
        threading.Thread(target=self.broker.watch, daemon=True).start()
        self.token = devices.add_device("bench-0", "bench")
        self.broker.poke()
        time.sleep(1.5)
        self.lake = Lake(self.settings.lake)
        self.ingest: subprocess.Popen | None = None
        self.rss: list[float] = []

    def publish(self, payloads: list[bytes]) -> float:
        t0 = time.perf_counter()
        res = publish_qos1_sync("127.0.0.1", self.broker.ports.mqtt_port, username="bench-0", password=self.token,
                                topic="devices/bench-0/telemetry", payloads=payloads, window=2000, timeout=120)
        assert res.acked == len(payloads), res
        return time.perf_counter() - t0

    def stream(self, op: str) -> int:
        async def go() -> int:
            import nats

            nc = await nats.connect(self.broker.url)
            js = nc.jetstream()
            if op == "purge":
                await js.purge_stream(STREAM)
            info = await js.stream_info(STREAM)
            await nc.close()
            return info.state.last_seq

        return asyncio.run(go())

    def reference(self, payloads: list[bytes]) -> dict:
        sub = subprocess.Popen(
            ["mosquitto_sub", "-h", "127.0.0.1", "-p", str(self.broker.ports.mqtt_port), "-u", "bench-0",
             "-P", self.token, "-q", "1", "-t", "devices/bench-0/telemetry", "-C", str(len(payloads))],
            stdout=subprocess.DEVNULL,
        )
        time.sleep(1.0)
        t0 = time.perf_counter()
        pub_s = self.publish(payloads)
        sub.wait(300)
        elapsed = time.perf_counter() - t0
        self.stream("purge")
        return {"msgs": len(payloads), "seconds": round(elapsed, 3), "msg_per_s": round(len(payloads) / elapsed),
                "publish_seconds": round(pub_s, 3)}

    def start_ingest(self) -> None:
        env = {**os.environ, **settings_env(self.settings), "IOT2ML_CONFIG": os.devnull,
               "IOT2ML_LOG_LEVEL": "WARNING"}
        self.ingest = subprocess.Popen([sys.executable, "-m", "iot2ml", "ingest"], env=env)
        time.sleep(3.0)

    def committed(self) -> int:
        """Highest stream sequence committed to raw (reads only the new log entries)."""
        if "raw" not in self.lake.tables():
            return 0
        return self.lake.txn_version("raw", APP_ID) or 0

    def into_lake(self, payloads: list[bytes], readings_per_msg: int) -> dict:
        target = self.stream("info") + len(payloads)
        t0 = time.perf_counter()
        pub = threading.Thread(target=self.publish, args=(payloads,))
        pub.start()
        samples = []
        while self.committed() < target:
            samples.append(rss_mb(self.ingest.pid))
            time.sleep(0.05)
        elapsed = time.perf_counter() - t0
        pub.join()
        self.rss.extend(samples)
        half = max(1, len(samples) // 2)
        return {"msgs": len(payloads), "readings": len(payloads) * readings_per_msg, "seconds": round(elapsed, 3),
                "msg_per_s": round(len(payloads) / elapsed),
                "readings_per_s": round(len(payloads) * readings_per_msg / elapsed),
                # flat memory: the second half of the run peaks no higher than the first
                "rss_peak_mb_first_half": round(max(samples[:half], default=0), 1),
                "rss_peak_mb_second_half": round(max(samples[half:], default=0), 1)}

    def freshness(self, seconds: float, rate: int = 1000) -> dict:
        """Publish `rate` msg/s; a poller notes when each sequence becomes visible in the lake."""
        import paho.mqtt.client as mqtt

        first = self.stream("info") + 1
        sent_at: list[float] = []
        visible_at: dict[int, float] = {}
        stop = threading.Event()

        def poll() -> None:
            seen = first - 1
            while not stop.is_set() or seen < first - 1 + len(sent_at):
                now = time.time()
                c = self.committed()
                for s in range(seen + 1, c + 1):
                    visible_at[s] = now
                seen = max(seen, c)
                time.sleep(0.02)
                if stop.is_set() and time.time() - stop_time[0] > 30:
                    break

        stop_time = [0.0]
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
        client.username_pw_set("bench-0", self.token)
        client.connect("127.0.0.1", self.broker.ports.mqtt_port)
        client.loop_start()
        poller = threading.Thread(target=poll)
        poller.start()
        n = int(seconds * rate)
        t0 = time.time()
        for i in range(n):
            due = t0 + i / rate
            delay = due - time.time()
            if delay > 0:
                time.sleep(delay)
            sent_at.append(time.time())
            client.publish("devices/bench-0/telemetry", orjson.dumps({"msg_id": f"f-{i}", "pressure": 1.0}), qos=1)
        stop_time[0] = time.time()
        stop.set()
        poller.join()
        client.loop_stop()
        client.disconnect()
        lat = sorted(visible_at.get(first + i, float("inf")) - sent_at[i] for i in range(n))
        pct = lambda q: round(lat[min(n - 1, int(q * n))], 3)  # noqa: E731
        return {"rate": rate, "msgs": n, "p50_s": pct(0.50), "p99_s": pct(0.99), "max_s": round(lat[-1], 3)}

    def close(self) -> None:
        if self.ingest:
            self.ingest.send_signal(signal.SIGTERM)
            self.ingest.wait(30)
        self.broker.stop()
        self.broker.close()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--messages", type=int, default=200_000)
    ap.add_argument("--batched", type=int, default=20_000)
    ap.add_argument("--fresh-seconds", type=float, default=20)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        bench = Bench(Path(tmp))
        try:
            single = single_payloads(args.messages)
            ref = bench.reference(single)
            batched = batched_payloads(args.batched)
            ref_b = bench.reference(batched)
            bench.start_ingest()
            rss_idle = rss_mb(bench.ingest.pid)
            lake = bench.into_lake(single, 1)
            rss_after_single = max(bench.rss)
            lake_b = bench.into_lake(batched, 100)
            fresh = bench.freshness(args.fresh_seconds)
            result = {
                "bench": "ingest",
                "payload_bytes": len(single[0]),
                "batched_payload_bytes": len(batched[0]),
                "reference_single": ref,
                "lake_single": lake,
                "ratio_single": round(lake["msg_per_s"] / ref["msg_per_s"], 3),
                "reference_batched": ref_b,
                "lake_batched": lake_b,
                "batched_readings_per_s": lake_b["readings_per_s"],
                "freshness": fresh,
                "ingest_rss_mb": {"idle": round(rss_idle, 1), "peak_single": round(rss_after_single, 1),
                                  "peak_all": round(max(bench.rss), 1), "end": round(rss_mb(bench.ingest.pid), 1)},
            }
        finally:
            bench.close()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
