"""Monitoring is fast and bounded: alert latency, evaluation cost as the table grows, drift report time.

Issue 9, acceptance item 6. Three phases, each with its reference measured in the same run:

alerts     `iot2ml up --detach` on free ports (0 = picked by the OS; never the machine's 4222/1883)
           over a fresh data dir, with the monitor's Alertmanager timings set for a benchmark
           (IOT2ML_MONITOR_GROUP_WAIT=0, ..._GROUP_INTERVAL=1, ..._REPEAT_INTERVAL=3600: the defaults,
           30 s / 5 min, hold notifications back on purpose). --devices devices of type ``rig`` (each
           its own MQTT connection and token, the simulator's paho fleet) publish one reading each in
           turn at --rate msg/s in total (1,000 msg/s: the ingest benchmark's freshness rate). Ten
           threshold rules ``max(<field_i>) > 5 --by device_id --window 10s --every 1s`` (no --for)
           notify a webhook (a threaded http.server in this process). Every --breach-every seconds
           one (rule, device) pair not used before gets a reading with field_i = 9 (its publish time
           is recorded here and carried in the reading as ``sent_at``). Latency per alert = the time
           the first webhook naming (alertname, device_id) as firing arrived - the publish time.
           Reference: the same breaching readings' ingest freshness (publish -> row visible in the
           lake table ``rig``, polled every 0.1 s), so the monitor's own share is the difference.
eval       a Delta table written directly with iot2ml.lake.Lake (increasing ``_seq`` and ``ts`` at
           1,000 rows/s of 1,000 devices, --commit-rows per commit) grows by 100k rows per step from
           --eval-start to --eval-end rows; after each step one WindowEvaluator.evaluate of
           ``max(pressure) > 5 --by device_id --window 1m`` (the same evaluator all along:
           incremental, reads by ``_seq`` mark). Process CPU seconds (time.process_time, all threads)
           per evaluation = CPU per 100k new rows. References at the checkpoints: ``rescan`` = a fresh
           WindowEvaluator each time (its seed read of ``ts >= now - window``, which Delta's file
           statistics let skip old files), and ``full_scan`` = reading the rule's columns of every row
           of the table and aggregating the window (rescanning history without any pruning).
           Then one compaction pass (lake.maintenance.Maintainer, as the platform runs every minute)
           and 5 more steps: ``at_<end>_compacted`` (the per-file share of an evaluation, apart from
           the rows; --no-compact skips it).
drift      1M captured rows in the lake table ``model_inputs`` (MODEL_INPUTS_SCHEMA: the inputs as a
           JSON text column, 5 numeric features and one categorical, two of them shifted) against a
           reference profile (monitor.profile.build_profile) of 10k training rows: time to read the
           rows, decode the JSON with Polars, and run monitor.drift.detect_drift, separately. If
           iot2ml.monitor.report.build_report exists it is timed too (``build_report_s``).

The machine's other load skews every figure (2 shared cores): ``machine`` reports cores and how busy
they were while the platform idled and during each phase. Progress goes to stderr; stdout carries one
JSON line.

    python benchmarks/monitor.py [--quick] [--skip-alerts] [--skip-eval] [--skip-drift]
        [--devices 1000] [--rate 1000] [--seconds 60] [--breach-every 0.5]
        [--eval-start 1000000] [--eval-end 10000000] [--commit-rows 25000]
        [--drift-rows 1000000] [--reference-rows 10000]

--quick: 30 s of alerts, the table grows from 100k to 1M rows, drift on 200k rows (~2 minutes).
Target (item 6): alert latency p99 <= 3 s for rules without --for; eval CPU flat from start to end.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import orjson

TARGET_P99_S = 3.0
FIELDS = ("pressure", "flow", "vibration", "temperature", "rpm", "power_kw", "current_a", "voltage_v",
          "humidity", "level")
THRESHOLD, BREACH = 5.0, 9.0
MONITOR_ENV = {"IOT2ML_MONITOR_GROUP_WAIT": "0", "IOT2ML_MONITOR_GROUP_INTERVAL": "1",
               "IOT2ML_MONITOR_REPEAT_INTERVAL": "3600"}


def say(msg: str) -> None:
    print(f"[monitor-bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class BenchError(RuntimeError):
    pass


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    v = sorted(values)
    return round(v[min(len(v) - 1, int(q * len(v)))], 3)


def summary(values: list[float]) -> dict[str, Any]:
    return {"p50": pct(values, 0.50), "p99": pct(values, 0.99), "max": round(max(values), 3) if values else None,
            "n": len(values)}


def size_label(n: int) -> str:
    return f"{n // 1_000_000}M" if n % 1_000_000 == 0 else f"{n // 1000}k"


# --------------------------------------------------------------------------- machine load


def machine_busy() -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs, from /proc/stat."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]
    return sum(fields) - idle, sum(fields)


class Busy:
    """% of all cores busy between construction and ``percent()``."""

    def __init__(self) -> None:
        self.start = machine_busy()

    def percent(self) -> float:
        end = machine_busy()
        return round(100 * (end[0] - self.start[0]) / max(1, end[1] - self.start[1]), 1)


def cpu_seconds(pid: int) -> float:
    with contextlib.suppress(OSError, IndexError, ValueError):
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return 0.0


# --------------------------------------------------------------------------- phase 1: alert latency


class Webhook:
    """A real HTTP receiver: the first time each (alertname, device_id) is reported firing."""

    def __init__(self) -> None:
        self.first_firing: dict[tuple[str, str], float] = {}
        self.posts = 0
        self.resolved = 0
        self.bad: list[str] = []
        me = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                now = time.time()
                self.send_response(200)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")
                me.note(body, now)

            def log_message(self, *_args: Any) -> None:
                pass

        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_port}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def note(self, body: bytes, now: float) -> None:
        try:
            doc = orjson.loads(body)
            alerts = doc["alerts"]
        except (orjson.JSONDecodeError, KeyError, TypeError) as err:
            with self.lock:
                self.bad.append(f"{type(err).__name__}: {body[:200]!r}")
            return
        with self.lock:
            self.posts += 1
            for a in alerts:
                if a.get("status") != "firing":
                    self.resolved += 1
                    continue
                labels = a.get("labels", {})
                key = (labels.get("alertname", ""), labels.get("device_id", ""))
                self.first_firing.setdefault(key, now)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class LakeWatch:
    """Reference: when each breaching reading's row becomes visible in the lake table (polled)."""

    def __init__(self, lake: Any, table: str, every: float = 0.1) -> None:
        self.lake, self.table, self.every = lake, table, every
        self.wanted: set[str] = set()
        self.visible: dict[str, float] = {}
        self.mark = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def start(self) -> None:
        import pyarrow.compute as pc

        data = self.lake.dataset(self.table).to_table(columns=["_seq"])
        self.mark = int(pc.max(data.column("_seq")).as_py() or 0) if data.num_rows else 0
        self.thread.start()

    def run(self) -> None:
        import pyarrow.compute as pc

        while not self.stop.wait(self.every):
            try:
                rows = self.lake.dataset(self.table).to_table(filter=pc.field("_seq") > self.mark,
                                                              columns=["_seq", "msg_id"])
            except Exception as err:  # noqa: BLE001 - keep polling; report at the end
                say(f"lake watch: {err}")
                continue
            now = time.time()
            if rows.num_rows:
                self.mark = max(self.mark, int(pc.max(rows.column("_seq")).as_py()))
                for m in rows.column("msg_id").to_pylist():
                    if m in self.wanted:
                        self.visible.setdefault(m, now)

    def close(self) -> None:
        self.stop.set()
        self.thread.join(10)


class AlertBench:
    def __init__(self, root: Path, args: argparse.Namespace) -> None:
        from iot2ml.core.config import load_settings

        self.root, self.args = root, args
        self.data_dir = root / "data"
        self.data_dir.mkdir()
        self.env = {**os.environ, "IOT2ML_CONFIG": os.devnull, "IOT2ML_DATA_DIR": str(self.data_dir),
                    "IOT2ML_LOG_LEVEL": "WARNING", **MONITOR_ENV}
        # this process's own view of the platform's settings (catalog, lake)
        self.settings = load_settings(data_dir=self.data_dir, nats_port=0, mqtt_port=0, http_port=0, serve_port=0)
        self.ids = [f"rig-{i:04d}" for i in range(args.devices)]
        self.tokens: list[str] = []
        self.up_pid: int | None = None

    def iot2ml(self, *argv: str, timeout: float = 300) -> str:
        run = subprocess.run([sys.executable, "-m", "iot2ml", *argv], env=self.env, capture_output=True, text=True,
                             timeout=timeout, check=False)
        if run.returncode != 0:
            raise BenchError(f"iot2ml {' '.join(argv)} failed ({run.returncode}):\n{run.stderr[-3000:] or run.stdout}")
        return run.stdout

    def register(self) -> None:
        from iot2ml.auth.store import Devices
        from iot2ml.core.catalog import Catalog

        catalog = Catalog(self.settings.catalog)
        try:
            devices = Devices(catalog)
            devices.add_type("rig", exist_ok=True)
            self.tokens = [devices.add_device(d, "rig") for d in self.ids]
        finally:
            catalog.close()
        say(f"registered {len(self.ids)} devices of type rig")

    def start(self) -> dict[str, Any]:
        say("iot2ml up --detach (ports 0: free ones) ...")
        t0 = time.monotonic()
        out = self.iot2ml("up", "--detach", "--json", "--data-dir", str(self.data_dir), "--nats-port", "0",
                          "--mqtt-port", "0", "--http-port", "0", "--serve-port", "0")
        info = json.loads(out.strip().splitlines()[-1])
        self.up_pid = info.get("pid")
        self.info = info
        say(f"platform up in {time.monotonic() - t0:.1f} s: mqtt {info['mqtt_port']}, nats {info['nats_port']}, "
            f"http {info['http_port']}, serve {info['serve_port']}")
        return info

    def stop(self) -> None:
        from iot2ml.supervisor import stop_platform

        try:
            stop_platform(self.data_dir, timeout=60)
            say("platform stopped")
        except Exception as err:  # noqa: BLE001 - then end what we started: the supervisor's own group
            say(f"iot2ml down failed ({err}): killing the supervisor's process group {self.up_pid}")
            if self.up_pid:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(int(self.up_pid), signal.SIGKILL)

    def define_rules(self, webhook_url: str) -> list[str]:
        from iot2ml.core.catalog import Catalog
        from iot2ml.lake import Lake
        from iot2ml.monitor.service import define_rule
        from iot2ml.monitor.store import AlertRules, Notifiers

        catalog = Catalog(self.settings.catalog)
        names = []
        try:
            Notifiers(catalog).add("bench", "webhook", webhook_url)
            lake = Lake(self.settings.lake)
            for i, field in enumerate(FIELDS[: self.args.rules]):
                name = f"r{i:02d}-{field}"
                record = define_rule(lake, name, table="rig", when=f"max({field}) > {THRESHOLD:g}", by=("device_id",),
                                     window=10.0, for_=0.0, every=1.0, severity="critical", notify=("bench",))
                AlertRules(catalog).add(record)
                names.append(name)
        finally:
            catalog.close()
        say(f"notifier 'bench' -> {webhook_url}; {len(names)} rules: max(<field>) > {THRESHOLD:g} --by device_id "
            "--window 10s --every 1s --severity critical (no --for)")
        return names

    def run(self) -> dict[str, Any]:
        from iot2ml.core.runtime import read_run_info
        from iot2ml.lake import Lake
        from iot2ml.simulate.runner import _MqttFleet

        args = self.args
        self.register()
        busy_idle: float | None = None
        try:
            self.start()
        except BaseException:
            self.stop()  # a supervisor that came up halfway
            raise
        webhook = Webhook()
        # the simulator's fleet: one paho client per device, all on one network thread
        fleet = _MqttFleet("127.0.0.1", int(self.info["mqtt_port"]), self.ids, self.tokens)
        watch: LakeWatch | None = None
        try:
            t0 = time.monotonic()
            fleet.connect(60)
            say(f"{len(self.ids)} MQTT connections in {time.monotonic() - t0:.1f} s")
            idle = Busy()
            time.sleep(3)
            busy_idle = idle.percent()
            lake = Lake(self.settings.lake)
            # one reading per device so the table exists with its columns, then the rules
            seq = [0]

            def reading(i: int, breach_field: str | None = None, sent_at: float | None = None) -> bytes:
                now = time.time()
                body: dict[str, Any] = {"ts": round(now, 6), "msg_id": f"{self.ids[i]}-{seq[0]}"}
                seq[0] += 1
                for k, f in enumerate(FIELDS):
                    body[f] = round(((seq[0] * 7919 + k * 104729 + i) % 1000) / 250.0, 3)  # 0 .. 4
                if breach_field is not None:
                    body[breach_field] = BREACH
                    body["sent_at"] = sent_at
                else:
                    body["sent_at"] = 0.0
                return orjson.dumps(body)

            for i in range(len(self.ids)):
                fleet.send(i, reading(i))
            deadline = time.monotonic() + 120
            while lake.schema("rig") is None:
                if time.monotonic() > deadline:
                    raise BenchError("table rig did not appear within 120 s: is the ingest running?")
                time.sleep(0.2)
            names = self.define_rules(webhook.url)
            watch = LakeWatch(lake, "rig")
            watch.start()
            monitor_pid = int(read_run_info(self.data_dir, "monitor")["pid"])
            ingest_pid = int(read_run_info(self.data_dir, "ingest")["pid"])

            # steady load; breaches start after a warm-up of --warmup seconds (rules seeded, table settled)
            n_total = int(args.rate * (args.warmup + args.seconds))
            breach_at = [args.warmup + k * args.breach_every for k in range(int(args.seconds / args.breach_every))]
            breaches: dict[tuple[str, str], tuple[float, str]] = {}  # (rule, device) -> (publish time, msg_id)
            say(f"publishing {args.rate:g} msg/s over {len(self.ids)} devices for {args.warmup:g} s warm-up + "
                f"{args.seconds:g} s with {len(breach_at)} breaches (one every {args.breach_every:g} s)")
            busy = None
            start = time.monotonic()
            j, b, behind = 0, 0, 0.0
            pairs = len(self.ids) * len(names)
            while j < n_total or b < len(breach_at):
                elapsed = time.monotonic() - start
                if busy is None and elapsed >= args.warmup:
                    busy = Busy()
                    cpu_w = {"monitor": cpu_seconds(monitor_pid), "ingest": cpu_seconds(ingest_pid)}
                    t_w = time.monotonic()
                due = min(n_total, int(elapsed * args.rate) + 1)
                if due - j > 1:
                    behind = max(behind, (due - j - 1) / args.rate)
                while j < due:
                    fleet.send(j % len(self.ids), reading(j % len(self.ids)))
                    j += 1
                while b < len(breach_at) and breach_at[b] <= elapsed:
                    if b >= pairs:
                        raise BenchError("more breaches than (rule, device) pairs: lower --seconds or raise --devices")
                    rule = names[b % len(names)]
                    dev = (b * 37) % len(self.ids)  # distinct (rule, device) pairs for b < devices * rules
                    field = FIELDS[b % len(names)]
                    sent = time.time()
                    payload = reading(dev, field, sent)
                    fleet.send(dev, payload)
                    breaches[(rule, self.ids[dev])] = (sent, orjson.loads(payload)["msg_id"])
                    watch.wanted.add(breaches[(rule, self.ids[dev])][1])
                    b += 1
                nxt = min(start + j / args.rate, start + (breach_at[b] if b < len(breach_at) else 1e9))
                wait = nxt - time.monotonic()
                if wait > 0:
                    time.sleep(min(wait, 0.05))
            send_wall = time.monotonic() - start
            cpu1 = {"monitor": cpu_seconds(monitor_pid), "ingest": cpu_seconds(ingest_pid)}
            wall = time.monotonic() - t_w
            busy_run = busy.percent() if busy else None
            say(f"sent {j} readings + {b} breaches in {send_wall:.1f} s; waiting up to {args.grace:g} s for alerts")
            deadline = time.monotonic() + args.grace
            while time.monotonic() < deadline:
                with webhook.lock:
                    got = sum(1 for k in breaches if k in webhook.first_firing)
                if got == len(breaches) and len(watch.visible) == len(breaches):
                    break
                time.sleep(0.2)
            fleet.drain(10, lambda *_: None)
            sent_n, acked_n, failed_n = fleet.totals()
            latency = [webhook.first_firing[k] - t for k, (t, _) in breaches.items() if k in webhook.first_firing]
            visible = [watch.visible[m] - t for (t, m) in breaches.values() if m in watch.visible]
            extra = sorted(set(webhook.first_firing) - set(breaches))
            result = {
                "alert_latency_s": summary(latency),
                "missed_alerts": len(breaches) - len(latency),
                "unexpected_alerts": len(extra),
                "reference_lake_visible_s": summary(visible),
                "monitor_share_p50_s": (round(pct(latency, 0.5) - pct(visible, 0.5), 3)
                                        if latency and visible else None),
                "rules": len(names),
                "devices": len(self.ids),
                "rate_msgs_per_s": round(j / send_wall, 1),
                "target_rate_msgs_per_s": args.rate,
                "publisher_behind_max_s": round(behind, 3),
                "published": sent_n, "acked": acked_n, "failed": failed_n,
                "webhook_posts": webhook.posts,
                "monitor_settings": {k.removeprefix("IOT2ML_").lower(): float(v) for k, v in MONITOR_ENV.items()},
                "rule": f"max(<field>) > {THRESHOLD:g} --by device_id --window 10s --every 1s (no --for)",
                "cpu_percent_of_one_core": {k: round(100 * (cpu1[k] - cpu_w[k]) / wall, 1) for k in cpu1},
                "machine_busy_percent": {"idle_platform": busy_idle, "during": busy_run},
                "target_p99_s": TARGET_P99_S,
                "meets_target": bool(latency) and pct(latency, 0.99) <= TARGET_P99_S and len(latency) == len(breaches),
            }
            if extra:
                result["unexpected_examples"] = [list(k) for k in extra[:3]]
            if webhook.bad:
                result["bad_bodies"] = webhook.bad[:3]
            if fleet.errors:
                result["publisher_errors"] = fleet.errors[:3]
            return result
        finally:
            if watch is not None:
                watch.close()
            with contextlib.suppress(Exception):
                fleet.close()
            webhook.close()
            self.stop()


# --------------------------------------------------------------------------- phase 2: evaluation CPU


def eval_bench(root: Path, args: argparse.Namespace) -> dict[str, Any]:
    import gc

    import numpy as np
    import polars as pl
    import pyarrow as pa
    import pyarrow.compute as pc

    from iot2ml.lake import Lake
    from iot2ml.monitor.evaluate import WindowEvaluator, compile_rule

    step = 100_000
    start, end, per_commit = args.eval_start, args.eval_end, args.commit_rows
    if start % step or end % step or start < step or end < start:
        raise BenchError("--eval-start/--eval-end must be multiples of 100000 with start <= end")
    checkpoints = sorted({start, end, *[c for c in args.checkpoints if start <= c <= end]})
    root = root / "evallake"
    writer_lake, reader_lake = Lake(str(root)), Lake(str(root))  # the ingest and the monitor: two handles
    ts_type = pa.timestamp("us", tz="UTC")
    t_base = 1_800_000_000.0
    rate = 1000.0  # rows/s of the simulated fleet: 100k rows = 100 s of data
    devices = pa.array([f"rig-{i % 1000:04d}" for i in range(per_commit)], pa.string())
    rng = np.random.default_rng(3)
    seq = 0
    commits = 0

    def write(n: int) -> None:
        nonlocal seq, commits
        for _ in range(n // per_commit):
            seqs = np.arange(seq + 1, seq + per_commit + 1, dtype=np.int64)
            seq += per_commit
            commits += 1
            table = pa.table({
                "device_id": devices,
                "ts": pa.array((t_base + seqs / rate) * 1_000_000, pa.float64()).cast(pa.int64()).cast(ts_type),
                "_seq": pa.array(seqs),
                "pressure": pa.array(rng.normal(3.0, 0.5, per_commit)),
                "flow": pa.array(rng.normal(11.9, 0.3, per_commit)),
            })
            writer_lake.append("pump", table, app_id="monitor-bench", version=commits)

    def now() -> float:
        return t_base + seq / rate + 0.001

    def timed(fn: Any) -> tuple[float, float, Any]:
        gc.collect()
        c0, w0 = time.process_time(), time.perf_counter()
        out = fn()
        return time.process_time() - c0, time.perf_counter() - w0, out

    def full_scan() -> Any:
        """Rescanning history: every row's rule columns, then the window and the aggregate."""
        rows = reader_lake.dataset("pump").to_table(columns=["ts", "_seq", "device_id", "pressure"])
        cutoff = pa.scalar(int((now() - 60.0) * 1_000_000), type=ts_type)
        rows = rows.filter(pc.greater_equal(rows.column("ts"), cutoff))
        frame = pl.from_arrow(rows)
        return frame.group_by("device_id").agg(pl.col("pressure").max()).height

    # Fill up to one step before the start, seed the evaluator (the monitor does that once, at its
    # start), then the first measured step lands on the start (with --eval-start 100000 the first
    # step seeds an empty table instead and is not counted).
    say(f"eval: writing {size_label(start)} rows ({per_commit} rows per commit) ...")
    t0 = time.perf_counter()
    write(start - step)
    if seq == 0:
        write(per_commit)  # the table must exist to compile the rule
    rule = compile_rule("pump", "max(pressure) > 5", ("device_id",), 60.0, schema=reader_lake.schema("pump"))
    incremental = WindowEvaluator(reader_lake, rule)
    incremental.evaluate(now())
    first = seq == per_commit and start == step
    write(start - seq)
    if not first:
        cpu, wall, _ = timed(lambda: incremental.evaluate(now()))
    else:
        incremental.evaluate(now())
    say(f"eval: {size_label(start)} rows written in {time.perf_counter() - t0:.1f} s")
    series: dict[int, float] = {} if first else {start: cpu}
    wall_series: dict[int, float] = {} if first else {start: wall}
    at: dict[str, Any] = {}
    write_s = 0.0
    size = start
    while True:
        if size in checkpoints:
            fresh = [timed(lambda: WindowEvaluator(reader_lake, rule).evaluate(now())) for _ in range(3)]
            scans = [timed(full_scan) for _ in range(2 if size >= 5_000_000 else 3)]
            files = len(reader_lake.open("pump").file_uris())
            at[size] = {"rescan": min(c for c, _, _ in fresh), "rescan_wall": min(w for _, w, _ in fresh),
                        "full_scan": min(c for c, _, _ in scans), "full_scan_wall": min(w for _, w, _ in scans),
                        "files": files}
            say(f"eval: at {size_label(size)} ({files} files): rescan {at[size]['rescan']:.3f} CPU-s, "
                f"full scan {at[size]['full_scan']:.3f} CPU-s")
        if size >= end:
            break
        w0 = time.perf_counter()
        write(step)
        write_s += time.perf_counter() - w0
        size += step
        cpu, wall, result = timed(lambda: incremental.evaluate(now()))
        if not isinstance(result, list):
            raise BenchError(f"incremental evaluation at {size} rows gave {result!r}")
        series[size], wall_series[size] = cpu, wall
        if size % 1_000_000 == 0 or size == end:
            say(f"eval: {size_label(size)} rows: incremental {cpu:.3f} CPU-s ({wall:.3f} s wall), "
                f"buffer {incremental.buffered} rows")

    def incr_at(c: int) -> float:
        """Median over the 5 measured steps nearest ``c`` (single evaluations are noisy)."""
        near = sorted(series, key=lambda s: (abs(s - c), s))[:5]
        return statistics.median(series[s] for s in near)

    out: dict[str, Any] = {}
    for c in (start, end):
        label = size_label(c)
        out[f"at_{label}"] = round(incr_at(c), 4)
    for c in (start, end):
        label = size_label(c)
        out[f"rescan_at_{label}"] = round(at[c]["rescan"], 4)
    for c in (start, end):
        label = size_label(c)
        out[f"full_scan_at_{label}"] = round(at[c]["full_scan"], 4)
    out["ratio_end_to_start"] = {
        "incremental": round(incr_at(end) / incr_at(start), 2) if incr_at(start) else None,
        "rescan": round(at[end]["rescan"] / at[start]["rescan"], 2) if at[start]["rescan"] else None,
        "full_scan": round(at[end]["full_scan"] / at[start]["full_scan"], 2) if at[start]["full_scan"] else None,
    }
    out["series"] = {size_label(c): {"incremental": round(incr_at(c), 4), "rescan": round(at[c]["rescan"], 4),
                                     "full_scan": round(at[c]["full_scan"], 4), "files": at[c]["files"]}
                     for c in checkpoints}
    if args.compact:
        # The platform compacts small files (lake.maintenance): the same table after one pass, then
        # 5 more steps of 100k rows, so the per-file part of an evaluation shows apart from the rows.
        from iot2ml.core.config import load_settings
        from iot2ml.lake.maintenance import Maintainer

        c0 = time.perf_counter()
        done = Maintainer(Lake(str(root)), load_settings(data_dir=root.parent / "eval-settings")).run_once()
        compact_s = time.perf_counter() - c0
        after: list[float] = []
        for _ in range(5):
            write(step)
            cpu, _, result = timed(lambda: incremental.evaluate(now()))
            if not isinstance(result, list):
                raise BenchError(f"incremental evaluation after compaction gave {result!r}")
            after.append(cpu)
        files = len(reader_lake.open("pump").file_uris())
        out[f"at_{size_label(end)}_compacted"] = round(statistics.median(after), 4)
        out["compaction"] = {"seconds": round(compact_s, 1), "files_before": done["files_before"],
                             "files_after": done["files_after"], "files_during_steps": files}
        say(f"eval: compacted {done['files_before']} -> {done['files_after']} files in {compact_s:.1f} s; "
            f"incremental then {out[f'at_{size_label(end)}_compacted']:.3f} CPU-s")
    out["incremental_wall_s_median"] = round(statistics.median(wall_series.values()), 4) if wall_series else None
    out["incremental_first_step_cpu_s"] = round(series[min(series)], 4) if series else None
    out["note"] = ("CPU-seconds per evaluation after each 100k new rows (1,000 devices at 1,000 rows/s, window "
                   f"1m = 60k rows); {per_commit} rows per Delta commit; incremental = median of the 5 measured steps "
                   "nearest the size; rescan = fresh WindowEvaluator (seed read, Delta file stats skip old files); "
                   "full_scan = every row read")
    out["rows_read_incremental"] = incremental.rows_read
    out["write_s"] = round(write_s, 1)
    return out


# --------------------------------------------------------------------------- phase 3: drift report


def drift_bench(root: Path, args: argparse.Namespace) -> dict[str, Any]:
    import numpy as np
    import polars as pl
    import pyarrow as pa
    import pyarrow.compute as pc

    from iot2ml.core.tables import MODEL_INPUTS, MODEL_INPUTS_SCHEMA
    from iot2ml.lake import Lake
    from iot2ml.monitor.drift import detect_drift
    from iot2ml.monitor.profile import build_profile

    numeric = ("alcohol", "volatile_acidity", "ph", "sulphates", "residual_sugar")
    categorical = "grape"
    features = [*numeric, categorical]
    grapes = np.array(["merlot", "syrah", "riesling", "chardonnay", "pinot"])
    rng = np.random.default_rng(11)

    def frame(n: int, shift: float) -> pl.DataFrame:
        return pl.DataFrame({
            "alcohol": rng.normal(10.5 + shift, 1.2, n), "volatile_acidity": rng.normal(0.5, 0.15, n),
            "ph": rng.normal(3.3 + shift / 10, 0.1, n), "sulphates": rng.normal(0.65, 0.17, n),
            "residual_sugar": rng.gamma(2.0, 1.3, n),
            "grape": grapes[rng.choice(5, n, p=[0.3, 0.25, 0.2, 0.15, 0.1])],
        })

    reference = frame(args.reference_rows, 0.0)
    labels = np.array(["good", "better", "best"])
    ref_table = reference.to_arrow().append_column("prediction", pa.array(labels[np.arange(args.reference_rows) % 3]))
    profile = build_profile(ref_table, columns=[*features, "prediction"])  # as ml.jobs logs it at training
    n = args.drift_rows
    say(f"drift: writing {n} captured rows to {MODEL_INPUTS} ...")
    current = frame(n, 0.8)  # alcohol and ph shifted
    inputs = current.select(pl.struct(features).struct.json_encode().alias("inputs")).get_column("inputs")
    lake = Lake(str(root / "driftlake"))
    ts = pa.array((1_800_000_000.0 + np.arange(n) / 1000.0) * 1_000_000, pa.float64()).cast(pa.int64())
    table = pa.table({
        "ts": ts.cast(MODEL_INPUTS_SCHEMA.field("ts").type),
        "model": pa.array(["wine-quality"] * n), "version": pa.array(np.full(n, 3, np.int64)),
        "variant": pa.array(["champion"] * n), "source": pa.array(["mqtt"] * n),
        "device_id": pa.array([f"station-{i % 50}" for i in range(n)]), "entity": pa.nulls(n, pa.string()),
        "request_id": pa.nulls(n, pa.string()), "inputs": inputs.to_arrow().cast(pa.string()),
        "prediction": pa.array([f'{{"prediction": "{v}"}}' for v in labels[np.arange(n) % 3]]),
    }, schema=MODEL_INPUTS_SCHEMA)
    chunk = 250_000
    for k in range(0, n, chunk):
        lake.append(MODEL_INPUTS, table.slice(k, chunk), app_id="monitor-bench", version=k // chunk + 1)
    del table, inputs, current
    dtype = pl.Struct({**{c: pl.Float64 for c in numeric}, categorical: pl.String})

    drifted: list[str] = []

    def once() -> dict[str, float]:
        t0 = time.perf_counter()
        rows = Lake(str(root / "driftlake")).dataset(MODEL_INPUTS).to_table(
            filter=pc.field("model") == "wine-quality", columns=["inputs"])
        t1 = time.perf_counter()
        decoded = pl.from_arrow(rows.column("inputs")).str.json_decode(dtype).struct.unnest().to_arrow()
        t2 = time.perf_counter()
        report = detect_drift(profile, decoded, features=features)
        t3 = time.perf_counter()
        if decoded.num_rows != n or not report.drifted_features:
            raise BenchError(f"drift report over {decoded.num_rows} rows looks wrong: {report.share_drifted}")
        drifted[:] = report.drifted_features
        return {"read": t1 - t0, "decode": t2 - t1, "detect": t3 - t2, "total": t3 - t0}

    runs = [once() for _ in range(3)]
    best = {k: round(min(r[k] for r in runs), 3) for k in runs[0]}
    out: dict[str, Any] = {f"drift_report_{size_label(n)}_rows_s": best,
                           "drift_detail": {"reference_rows": args.reference_rows, "features": features,
                                            "drifted": drifted, "runs": 3, "figure": "best of 3, wall seconds",
                                            "decode": "polars str.json_decode with the profile's dtypes"}}
    try:
        report_mod = importlib.import_module("iot2ml.monitor.report")
        build_report = getattr(report_mod, "build_report", None)
    except ImportError:
        build_report = None
    if build_report is None:
        out["build_report_s"] = None
        out["drift_detail"]["build_report"] = "iot2ml.monitor.report.build_report does not exist yet: not timed"
        return out
    from iot2ml.monitor.kinds import Context

    class Models:  # the registry as the monitor sees it (wiring.ModelOps), with the profile above
        def describe(self, model: str, ref: str = "champion") -> dict[str, Any]:
            return {"name": model, "version": 3, "task": "classify"}

        def reference_profile(self, model: str, version: int) -> Any:
            return profile

    ctx = Context(Lake(str(root / "driftlake")), None, None, Models())
    until = 1_800_000_000.0 + n / 1000.0 + 1.0
    timings, report = [], None
    for _ in range(3):
        t0 = time.perf_counter()
        report = build_report(ctx, "wine-quality", window=until - 1_799_999_000.0, now=until, write=True)
        timings.append(time.perf_counter() - t0)
    version = report["versions"][0] if report and report["versions"] else {}
    if version.get("n_current") != n:
        raise BenchError(f"build_report saw {version.get('n_current')} rows, not {n}: {str(report)[:300]}")
    out["build_report_s"] = round(min(timings), 3)
    out["drift_detail"]["build_report"] = (
        "iot2ml.monitor.report.build_report(ctx, 'wine-quality', window=...) best of 3, wall seconds: read + "
        "decode inputs and prediction (its own JSON path) + detect_drift on features and prediction + append "
        "to monitor_reports")
    out["drift_detail"]["build_report_drifted"] = [f["feature"] if "feature" in f else f.get("name")
                                                  for f in version.get("features", []) if f.get("drifted")]
    return out


# --------------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="a short run (~2 minutes)")
    ap.add_argument("--skip-alerts", action="store_true")
    ap.add_argument("--skip-eval", action="store_true")
    ap.add_argument("--skip-drift", action="store_true")
    ap.add_argument("--devices", type=int, default=1000)
    ap.add_argument("--rules", type=int, default=10, choices=range(1, len(FIELDS) + 1))
    ap.add_argument("--rate", type=float, default=1000.0, help="readings/s in total (the ingest benchmark's rate)")
    ap.add_argument("--seconds", type=float, default=None, help="seconds of breaches (60; quick 30)")
    ap.add_argument("--warmup", type=float, default=5.0)
    ap.add_argument("--breach-every", type=float, default=0.5)
    ap.add_argument("--grace", type=float, default=20.0, help="seconds to wait for the last alerts")
    ap.add_argument("--eval-start", type=int, default=None, help="rows (1000000; quick 100000)")
    ap.add_argument("--eval-end", type=int, default=None, help="rows (10000000; quick 1000000)")
    ap.add_argument("--commit-rows", type=int, default=25_000, help="rows per Delta commit (divides 100000)")
    ap.add_argument("--no-compact", dest="compact", action="store_false",
                    help="skip the evaluation after one compaction pass at the end size")
    ap.add_argument("--drift-rows", type=int, default=None, help="captured rows (1000000; quick 200000)")
    ap.add_argument("--reference-rows", type=int, default=10_000)
    args = ap.parse_args()
    q = args.quick
    args.seconds = args.seconds or (30.0 if q else 60.0)
    args.eval_start = args.eval_start or (100_000 if q else 1_000_000)
    args.eval_end = args.eval_end or (1_000_000 if q else 10_000_000)
    args.drift_rows = args.drift_rows or (200_000 if q else 1_000_000)
    args.checkpoints = [args.eval_start * k for k in (2, 5)]
    if 100_000 % args.commit_rows:
        ap.error("--commit-rows must divide 100000")

    os.environ["IOT2ML_CONFIG"] = os.devnull  # no iot2ml.toml of the working directory leaks in
    result: dict[str, Any] = {"benchmark": "monitor", "quick": q}
    wall0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="iot2ml-monitor-bench-") as tmp:
        root = Path(tmp)
        if not args.skip_alerts:
            result.update(AlertBench(root, args).run())
        if not args.skip_eval:
            busy = Busy()
            result["eval_cpu_s_per_100k"] = eval_bench(root, args)
            result["eval_machine_busy_percent"] = busy.percent()
        if not args.skip_drift:
            busy = Busy()
            result.update(drift_bench(root, args))
            result["drift_machine_busy_percent"] = busy.percent()
    import deltalake
    import polars

    result["machine"] = {"cpus": os.cpu_count(), "python": platform.python_version(), "polars": polars.__version__,
                         "deltalake": deltalake.__version__,
                         "load_avg_1m": round(os.getloadavg()[0], 2), "shared": "other work runs on these cores"}
    result["wall_s"] = round(time.perf_counter() - wall0, 1)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
