"""Online prediction: iot2ml's serving port and API port against `mlflow models serve`, same model,
same load, one run.

Model     scikit-learn's wine data (178 wines x 13 measurements, 3 cultivars), trained by our own
          code path (`run_training`, ClassifyTask without entity aggregation: one row = one wine) and
          registered in a fresh data dir's MLflow registry as ``wine-bench`` version 1
Reference `mlflow models serve -m models:/wine-bench/1 --env-manager local -w 1` (uvicorn, 1 worker),
          POST /invocations {"dataframe_records": [<one wine>]}
iot2ml    `iot2ml deploy wine-bench` then `iot2ml serve --no-broker` (the serving port) and
          `iot2ml broker` + `iot2ml api` (the API port, which answers predictions with its own
          runtime: docs/decisions/0009), POST /api/v1/models/wine-bench/predict
          {"instances": [<one wine>]} with an API key; each port measured in turn, the other idle
Load      Debian's `wrk`: 2 threads, 16 connections, the same single-row body on every request,
          a discarded warm-up run, then the measured run (benchmarks/wrk_post.lua)
Before any load one request must return 200 with a prediction, else the run fails.

Targets: the serving port >= 10x the req/s of the reference, p99 <= 0.25x; the API port >= 0.7x
the req/s of the serving port, p99 <= 2x (all with no non-2xx or socket errors).
Measured when the target was set: a 100-tree LightGBM wine classifier under `mlflow models serve`
(MLflow 3.17, uvicorn, 1 worker): 81 req/s, p50 193 ms, p99 329 ms at 16 connections.
Prints one JSON line: `mlflow`, `iot2ml` (serving port), `iot2ml_api` (API port) and the ratios;
`--only mlflow` runs just the reference, `--only iot2ml` just our two ports.

    python benchmarks/serve.py [--duration 20] [--warmup 3] [--connections 16] [--only mlflow|iot2ml]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
LUA = HERE / "wrk_post.lua"
MODEL = "wine-bench"
TARGETS = {"rps_ratio_min": 10, "p99_ratio_max": 0.25, "api_rps_ratio_min": 0.7, "api_p99_ratio_max": 2.0}


def say(msg: str) -> None:
    print(f"[serve-bench] {msg}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tree_rss_mb(pid: int) -> float:
    """Resident memory of ``pid`` and all its descendants (uvicorn workers are children)."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            parents[int(stat.parent.name)] = int(fields[1])
    tree, grew = {pid}, True
    while grew:
        more = {p for p, pp in parents.items() if pp in tree} - tree
        tree |= more
        grew = bool(more)
    kb = 0
    for p in tree:
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    kb += int(line.split()[1])
    return round(kb / 1024, 1)


class Server:
    """A server process in its own process group; stopping it ends the whole group (workers too)."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], log: Path) -> None:
        self.name, self.log = name, log
        say(f"starting {name}: {' '.join(argv)}")
        with log.open("wb") as out:
            self.proc = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def tail(self, lines: int = 30) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        return ""

    def stop(self) -> None:
        if self.proc.poll() is not None:
            return
        for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, sig)
            try:
                self.proc.wait(wait)
                break
            except subprocess.TimeoutExpired:
                continue
        say(f"stopped {self.name}")


class BenchError(RuntimeError):
    pass


def post(url: str, body: bytes, headers: dict[str, str], timeout: float = 10) -> tuple[int, bytes]:
    req = urllib.request.Request(url, data=body, method="POST", headers={"Content-Type": "application/json", **headers})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def wait_until_ready(server: Server, probe: Callable[[], bool], timeout: float) -> None:
    """Call ``probe()`` until it returns True; fail with the server's log if it dies or times out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not server.alive():
            raise BenchError(f"{server.name} exited with {server.proc.returncode}:\n{server.tail()}")
        with contextlib.suppress(OSError):
            if probe():
                return
        time.sleep(0.5)
    raise BenchError(f"{server.name} not ready after {timeout:.0f} s:\n{server.tail()}")


def precheck(server: Server, url: str, body: bytes, headers: dict[str, str], classes: list[str],
             timeout: float) -> dict:
    """One request must answer 200 with a prediction of a known class; retried while the server warms up."""
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        if not server.alive():
            raise BenchError(f"{server.name} exited with {server.proc.returncode}:\n{server.tail()}")
        try:
            status, raw = post(url, body, headers)
        except OSError as err:
            last = f"{type(err).__name__}: {err}"
        else:
            last = f"HTTP {status}: {raw[:500].decode(errors='replace')}"
            if status == 200:
                answer = json.loads(raw)
                preds = answer.get("predictions") if isinstance(answer, dict) else None
                first = preds[0] if isinstance(preds, list) and preds else None
                label = first.get("prediction") if isinstance(first, dict) else first
                if str(label) not in classes:
                    raise BenchError(f"{server.name} answered 200 without a prediction of {classes}: {last}")
                say(f"{server.name} pre-check: 200, prediction {label!r}")
                return answer
        time.sleep(0.5)
    raise BenchError(f"{server.name} pre-check failed at {url}: {last}\n{server.tail()}")


def wrk(url: str, body_file: Path, auth: str | None, *, seconds: float, connections: int, threads: int) -> dict:
    argv = ["wrk", f"-t{threads}", f"-c{connections}", f"-d{seconds:g}s", "--latency", "--timeout", "10s",
            "-s", str(LUA), url]
    env = {**os.environ, "WRK_BODY_FILE": str(body_file), "WRK_AUTH": auth or ""}
    run = subprocess.run(argv, check=False, env=env, capture_output=True, text=True, timeout=seconds + 60)
    if run.returncode != 0:
        raise BenchError(f"wrk failed ({run.returncode}): {run.stderr or run.stdout}")
    found = re.search(r"^WRK_JSON (\{.*\})$", run.stdout, re.MULTILINE)
    if not found:
        raise BenchError(f"wrk printed no WRK_JSON line:\n{run.stdout}")
    for line in run.stdout.splitlines():
        if line.strip() and not line.startswith("WRK_JSON"):
            print(f"    {line}", file=sys.stderr)
    w = json.loads(found.group(1))
    return {
        "rps": round(w["requests"] / (w["duration_us"] / 1e6), 1),
        "p50_ms": round(w["p50_us"] / 1000, 2),
        "p99_ms": round(w["p99_us"] / 1000, 2),
        "p90_ms": round(w["p90_us"] / 1000, 2),
        "max_ms": round(w["max_us"] / 1000, 2),
        "requests": w["requests"],
        "non_2xx": w["status"],
        "errors": w["connect"] + w["read"] + w["write"] + w["timeout"],
    }


def load(server: Server, url: str, body_file: Path, auth: str | None, args: argparse.Namespace) -> dict:
    say(f"{server.name}: warm-up {args.warmup:g} s (discarded)")
    wrk(url, body_file, auth, seconds=args.warmup, connections=args.connections, threads=args.threads)
    say(f"{server.name}: measuring {args.duration:g} s, {args.connections} connections")
    figures = wrk(url, body_file, auth, seconds=args.duration, connections=args.connections, threads=args.threads)
    figures["rss_mb"] = tree_rss_mb(server.proc.pid)
    say(f"{server.name}: {figures}")
    return figures


def train(data_dir: Path) -> tuple[int, dict[str, float], list[str]]:
    """Fit and register the wine classifier; returns (version, one wine row, the classes)."""
    from sklearn.datasets import load_wine

    from iot2ml.ml.jobs import TrainJob, run_training
    from iot2ml.ml.registry import Registry, tracking_uri_for

    data = load_wine(as_frame=True)
    frame = data.frame.rename(columns={"target": "cultivar"})
    frame["cultivar"] = frame["cultivar"].map({0: "c0", 1: "c1", 2: "c2"})
    frame.columns = [c.replace("/", "_").replace(" ", "_") for c in frame.columns]
    features = [c for c in frame.columns if c != "cultivar"]
    registry = Registry(tracking_uri_for(data_dir), artifact_root=str((data_dir / "mlartifacts").absolute()))
    job = TrainJob(task="classify", table="wine", name=MODEL, options={"label": "cultivar", "aggregate": False})
    say("training and registering the wine classifier")
    with contextlib.redirect_stdout(sys.stderr):  # MLflow prints; stdout carries only the result line
        described = run_training(job, read=lambda _sql: frame.copy(), tables=lambda: ["wine"],
                                 columns=lambda _t: list(frame.columns), version=lambda _t: 0, registry=registry)
    say(f"registered {MODEL} version {described['version']} ({described['promotion']}), "
        f"macro_f1 {described['metrics'].get('macro_f1', float('nan')):.3f}")
    row = {c: float(frame.loc[0, c]) for c in features}
    return int(described["version"]), row, sorted(frame["cultivar"].unique())


def iot2ml_cli(*args: str, env: dict[str, str]) -> str:
    run = subprocess.run([sys.executable, "-m", "iot2ml", *args], check=False, env=env, capture_output=True, text=True,
                         timeout=300)
    if run.returncode != 0:
        raise BenchError(f"iot2ml {' '.join(args)} failed ({run.returncode}):\n{run.stderr or run.stdout}")
    return run.stdout


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--duration", type=float, default=20, help="seconds of measured load per server")
    ap.add_argument("--warmup", type=float, default=3, help="seconds of discarded load before each measurement")
    ap.add_argument("--connections", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2, help="wrk threads")
    ap.add_argument("--only", choices=["mlflow", "iot2ml"], help="run only one side")
    ap.add_argument("--ready-timeout", type=float, default=180, help="seconds a server may take to answer")
    args = ap.parse_args()
    if shutil.which("wrk") is None:
        sys.exit("serve benchmark: `wrk` is not installed: apt-get install -y wrk")
    # Ctrl-C and SIGTERM unwind through the ExitStack below, which stops every server it started
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    result: dict = {"bench": "serve"}
    with tempfile.TemporaryDirectory(prefix="iot2ml-serve-bench-") as tmp, contextlib.ExitStack() as servers:
        root = Path(tmp)
        data_dir = root / "data"
        data_dir.mkdir()
        version, row, classes = train(data_dir)
        # the venv's bin first: `mlflow models serve` execs `uvicorn` by name
        path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
        env = {**os.environ, "PATH": path, "IOT2ML_CONFIG": os.devnull, "IOT2ML_DATA_DIR": str(data_dir),
               "IOT2ML_LOG_LEVEL": "WARNING", "MLFLOW_TRACKING_URI": f"sqlite:///{(data_dir / 'mlflow.db').absolute()}",
               # one API key at thousands of requests/s: the key limit (auth.limits) is off
               "IOT2ML_LIMIT_KEY_RATE": "0", "IOT2ML_LIMIT_DEVICE_RATE": "0", "IOT2ML_LIMIT_DEVICE_BYTES": "0",
               "MLFLOW_REGISTRY_URI": f"sqlite:///{(data_dir / 'mlflow.db').absolute()}"}
        result["model"] = {"name": MODEL, "version": version, "features": len(row), "row": row}

        if args.only in (None, "mlflow"):
            body = json.dumps({"dataframe_records": [row]}).encode()
            body_file = root / "mlflow.json"
            body_file.write_bytes(body)
            port = free_port()
            server = Server("mlflow models serve",
                            [sys.executable, "-m", "mlflow", "models", "serve", "-m", f"models:/{MODEL}/{version}",
                             "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port), "-w", "1"],
                            env, root / "mlflow.log")
            servers.callback(server.stop)
            base = f"http://127.0.0.1:{port}"
            wait_until_ready(server, lambda: urllib.request.urlopen(f"{base}/ping", timeout=2).status == 200,
                             args.ready_timeout)
            answer = precheck(server, f"{base}/invocations", body, {}, classes, 30)
            result["mlflow"] = {**load(server, f"{base}/invocations", body_file, None, args),
                                "prediction": answer["predictions"][0]}
            server.stop()

        if args.only in (None, "iot2ml"):
            body = json.dumps({"instances": [row]}).encode()
            body_file = root / "iot2ml.json"
            body_file.write_bytes(body)
            key = json.loads(iot2ml_cli("keys", "add", "bench", "--json", "--data-dir", str(data_dir), env=env))["key"]
            say(iot2ml_cli("deploy", MODEL, "--data-dir", str(data_dir), env=env).strip() or f"deployed {MODEL}")
            auth = f"Bearer {key}"
            own = {**env, "IOT2ML_NATS_PORT": "0", "IOT2ML_MQTT_PORT": "0"}
            serve_port, api_port = free_port(), free_port()
            broker = Server("iot2ml broker", [sys.executable, "-m", "iot2ml", "broker", "--data-dir", str(data_dir)],
                            own, root / "broker.log")
            servers.callback(broker.stop)
            serve = Server("iot2ml serve",
                           [sys.executable, "-m", "iot2ml", "serve", "--data-dir", str(data_dir),
                            "--serve-port", str(serve_port), "--no-broker"], own, root / "iot2ml.log")
            servers.callback(serve.stop)
            api = Server("iot2ml api", [sys.executable, "-m", "iot2ml", "api", "--data-dir", str(data_dir),
                                        "--http-port", str(api_port)], own, root / "api.log")
            servers.callback(api.stop)
            for name, server, port in (("iot2ml", serve, serve_port), ("iot2ml_api", api, api_port)):
                url = f"http://127.0.0.1:{port}/api/v1/models/{MODEL}/predict"
                answer = precheck(server, url, body, {"Authorization": auth}, classes, args.ready_timeout)
                result[name] = {**load(server, url, body_file, auth, args),
                                "prediction": answer["predictions"][0],
                                "served": {k: answer.get(k) for k in ("model", "version", "variant")}}
            for server in (api, serve, broker):
                server.stop()

    ref, ours, api = result.get("mlflow"), result.get("iot2ml"), result.get("iot2ml_api")

    def ratio(a: dict | None, b: dict | None, key: str, digits: int) -> float | None:
        return round(a[key] / b[key], digits) if a and b and b[key] else None

    def clean(*figures: dict | None) -> bool:
        return all(f["non_2xx"] == 0 and f["errors"] == 0 for f in figures if f)

    result["rps_ratio"] = ratio(ours, ref, "rps", 2)
    result["p99_ratio"] = ratio(ours, ref, "p99_ms", 3)
    result["api_rps_ratio"] = ratio(api, ours, "rps", 2)  # API port / serving port
    result["api_p99_ratio"] = ratio(api, ours, "p99_ms", 3)
    result["targets"] = TARGETS
    checks = []
    if result["rps_ratio"] is not None:
        checks += [result["rps_ratio"] >= TARGETS["rps_ratio_min"], result["p99_ratio"] <= TARGETS["p99_ratio_max"]]
    if result["api_rps_ratio"] is not None:
        checks += [result["api_rps_ratio"] >= TARGETS["api_rps_ratio_min"],
                   result["api_p99_ratio"] <= TARGETS["api_p99_ratio_max"]]
    result["met"] = (all(checks) and clean(ours, api)) if checks else None
    result["connections"] = args.connections
    result["threads"] = args.threads
    result["duration_s"] = args.duration
    result["warmup_s"] = args.warmup
    print(json.dumps(result))


if __name__ == "__main__":
    try:
        main()
    except BenchError as err:
        sys.exit(f"serve benchmark failed: {err}")
