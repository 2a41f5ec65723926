"""The user's path end to end: `iot2ml up` as a user runs it, the CLI, MQTT via mosquitto_pub,
HTTP, SQL, metrics, and a clean stop. Everything real: child processes, nats-server, Delta tables."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[1]


def iot2ml(*args: str, env: dict | None = None, timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "iot2ml", *args], capture_output=True, text=True,
                          timeout=timeout, env=env or os.environ.copy())
    if check and proc.returncode != 0:
        raise AssertionError(f"iot2ml {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def wait_for(predicate, timeout: float = 30, every: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"condition not met in {timeout} s")


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is dead too
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except FileNotFoundError:
        return False


@pytest.fixture
def platform(tmp_path):
    data = tmp_path / "data"
    out = open(tmp_path / "up.out", "w+")
    proc = subprocess.Popen(
        [sys.executable, "-m", "iot2ml", "up", "--data-dir", str(data), "--nats-port", "0", "--mqtt-port", "0",
         "--http-port", "0", "--serve-port", "0"],
        stdout=out, stderr=subprocess.STDOUT, env=os.environ.copy(),
    )

    def ready():
        text = (tmp_path / "up.out").read_text()
        return text if "admin key" in text else None

    text = wait_for(ready, timeout=60)
    info = {
        "proc": proc,
        "data": data,
        "mqtt_port": int(re.search(r"MQTT\s+mqtt://127.0.0.1:(\d+)", text).group(1)),
        "http": re.search(r"HTTP API\s+(http://127.0.0.1:\d+)", text).group(1),
        "admin_key": re.search(r"admin key (\S+)", text).group(1),
        "out": tmp_path / "up.out",
    }
    yield info
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)


def test_up_cli_mqtt_http_sql_metrics_and_clean_stop(platform):
    data = str(platform["data"])
    added = json.loads(iot2ml("devices", "add", "pump-7", "--type", "pump", "--json", "--data-dir", data).stdout)
    assert added["device_id"] == "pump-7" and len(added["token"]) > 20
    token = added["token"]

    def pub(user, password, topic, message):
        return subprocess.run(["mosquitto_pub", "-h", "127.0.0.1", "-p", str(platform["mqtt_port"]), "-u", user,
                               "-P", password, "-q", "1", "-t", topic, "-m", message],
                              capture_output=True, text=True, timeout=20)

    # The broker learns the new device without a restart.
    wait_for(lambda: pub("pump-7", token, "devices/pump-7/telemetry",
                         '{"ts": 1763780000.5, "msg_id": "m1", "pressure": 3.2, "flow": 11.9}').returncode == 0)
    assert pub("pump-7", "bad-token", "devices/pump-7/telemetry", '{"pressure": 9}').returncode != 0
    r = httpx.post(f"{platform['http']}/api/v1/devices/pump-7/telemetry",
                   content='[{"ts": "2026-11-22T03:00:00Z", "pressure": 3.1}]',
                   headers={"Authorization": f"Bearer {token}"})
    assert r.status_code == 201 and r.json() == {"accepted": 1}
    pub("pump-7", token, "devices/pump-7/telemetry", "not json")

    last = {}

    def rows():
        out = iot2ml("query", "SELECT device_id, count(*) AS n, avg(pressure) AS p FROM pump GROUP BY 1",
                     "--format", "json", "--data-dir", data, check=False)
        last.update(rc=out.returncode, out=out.stdout[-300:], err=out.stderr[-500:])
        if out.returncode != 0:
            return None
        body = json.loads(out.stdout)
        return body if body["rows"] and body["rows"][0][1] == 2 else None

    try:
        body = wait_for(rows, timeout=60)
    except AssertionError:
        ingest_log = (platform["data"] / "run" / "ingest.log").read_text()[-1500:]
        raise AssertionError(f"pump rows never reached 2: last query {last}; ingest log: {ingest_log}") from None
    assert body["columns"] == ["device_id", "n", "p"]
    assert body["rows"] == [["pump-7", 2, pytest.approx(3.15)]]

    # SQL over HTTP with the admin key, and with a key made by `keys add`.
    key = json.loads(iot2ml("keys", "add", "analyst", "--role", "reader", "--json", "--data-dir", data).stdout)["key"]
    for k in (platform["admin_key"], key):
        r = httpx.post(f"{platform['http']}/api/v1/query", json={"sql": "SELECT reason FROM dead_letters"},
                       headers={"Authorization": f"Bearer {k}"})
        assert r.status_code == 200, r.text
        assert "malformed JSON" in r.json()["rows"][0][0]
    r = httpx.post(f"{platform['http']}/api/v1/query", json={"sql": "DROP TABLE pump"},
                   headers={"Authorization": f"Bearer {key}"})
    assert r.status_code == 400

    from iot2ml import Client

    df = Client(platform["http"], key).query(
        "SELECT count(*) AS n, count(*) FILTER (WHERE payload = 'not json') AS bad FROM raw")
    assert df["n"][0] >= 3 and df["bad"][0] == 1  # raw keeps every message, resends included

    metrics = httpx.get(f"{platform['http']}/metrics").text
    for name in ("iot2ml_ingest_messages_received_total", "iot2ml_ingest_dead_letters_total",
                 "iot2ml_ingest_consumer_lag", "iot2ml_ingest_write_seconds_bucket"):
        assert name in metrics
    received = re.search(r"^iot2ml_ingest_messages_received_total (\S+)", metrics, re.MULTILINE)
    assert received and float(received.group(1)) >= 3.0  # 2 readings + 1 bad message (+ a resend, if any)

    # Revocation takes effect without a restart.
    iot2ml("devices", "remove", "pump-7", "--data-dir", data)
    wait_for(lambda: pub("pump-7", token, "devices/pump-7/telemetry", '{"pressure": 1}').returncode != 0)

    # SIGTERM stops everything, children included.
    pids = [json.loads((platform["data"] / "run" / f"{c}.json").read_text())["pid"] for c in ("broker", "ingest", "api")]
    platform["proc"].send_signal(signal.SIGTERM)
    assert platform["proc"].wait(30) == 0
    wait_for(lambda: not any(alive(p) for p in pids), timeout=10)


def test_up_restarts_a_child_that_dies(platform):
    data = platform["data"]
    first = json.loads((data / "run" / "ingest.json").read_text())["pid"]
    os.kill(first, signal.SIGKILL)

    def restarted():
        try:
            pid = json.loads((data / "run" / "ingest.json").read_text())["pid"]
        except (FileNotFoundError, ValueError):
            return None
        return pid if pid != first and alive(pid) else None

    wait_for(restarted, timeout=30)


def test_busy_ports_named_at_once_then_the_suggested_command_detaches_and_down_stops_it(tmp_path):
    """The newcomer on a machine with Mosquitto and NATS running: one error naming both ports and one
    command line that works; `up --detach` returns once everything answers, `down` stops it all."""
    data = tmp_path / "d"
    with socket.socket() as a, socket.socket() as b:
        for s in (a, b):
            s.bind(("127.0.0.1", 0))
            s.listen()
        nats, mqtt = a.getsockname()[1], b.getsockname()[1]
        out = iot2ml("up", "--detach", "--data-dir", str(data), "--mqtt-port", str(mqtt), "--nats-port", str(nats),
                     "--http-port", "0", "--serve-port", "0", check=False)
        assert out.returncode == 2
        text = " ".join(out.stderr.split())
        found = re.search(rf"ports {nats} \(--nats-port\), {mqtt} \(--mqtt-port\) are already in use: run `([^`]+)`",
                          text)
        assert found, text
        argv = shlex.split(found.group(1))
        assert argv[:3] == ["iot2ml", "up", "--detach"]

        started = time.monotonic()
        up = json.loads(iot2ml(*argv[1:], "--json", timeout=120).stdout)  # the ports are still busy meanwhile
    took = time.monotonic() - started
    assert up["nats_port"] == int(argv[argv.index("--nats-port") + 1]) != nats
    assert up["mqtt_port"] == int(argv[argv.index("--mqtt-port") + 1]) != mqtt
    assert up["admin_key"] == (data / "secrets" / "admin.key").read_text().strip()
    pids = {c: json.loads((data / "run" / f"{c}.json").read_text())["pid"]
            for c in ("broker", "ingest", "api", "scheduler", "serve")}
    assert all(alive(p) for p in pids.values()), f"not every component answered when up returned after {took:.1f} s"
    assert "iot2ml is up" in (data / "run" / "up.log").read_text()

    # At once usable: a simulation, then the rows over the SDK with real timestamps.
    sim = iot2ml("simulate", "--scenario", "pump", "--devices", "2", "--rate", "10", "--duration", "1",
                 "--data-dir", str(data), timeout=90)
    assert "sent 20, acknowledged 20, failed 0" in sim.stdout and "stored 20 in table pump" in sim.stdout
    from iot2ml import Client

    df = Client(up["urls"]["http"], up["admin_key"]).query("SELECT ts, received_at, _seq, date_trunc('hour', ts) AS h,"
                                                           " device_id FROM pump")
    assert df.height == 20
    for column in ("ts", "received_at", "h"):
        assert str(df.schema[column]) == "Datetime(time_unit='us', time_zone='UTC')", df.schema
    assert str(df.schema["_seq"]).startswith("Int") and str(df.schema["device_id"]) == "String"

    down = iot2ml("down", "--data-dir", str(data), timeout=90)
    assert "stopped broker, ingest, api, scheduler, serve" in down.stdout
    assert not alive(up["pid"]) and not any(alive(p) for p in pids.values())
    assert "nothing runs" in iot2ml("down", "--data-dir", str(data)).stdout


def test_simulate_waits_for_a_platform_that_is_starting(tmp_path):
    """`iot2ml up ... &` then `iot2ml simulate` at once: it waits for the platform instead of failing."""
    data = tmp_path / "data"
    out = open(tmp_path / "up.out", "w")
    proc = subprocess.Popen([sys.executable, "-m", "iot2ml", "up", "--data-dir", str(data), "--nats-port", "0",
                             "--mqtt-port", "0", "--http-port", "0", "--serve-port", "0"], stdout=out,
                            stderr=subprocess.STDOUT)
    try:
        sim = iot2ml("simulate", "--scenario", "pump", "--devices", "2", "--rate", "10", "--duration", "1",
                     "--data-dir", str(data), timeout=120)
        assert "waiting for the platform to start" in sim.stderr
        assert "sent 20, acknowledged 20, failed 0" in sim.stdout and "stored 20 in table pump" in sim.stdout
        # `down` stops an `up` running in the foreground too.
        assert "stopped broker" in iot2ml("down", "--data-dir", str(data), timeout=90).stdout
        assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    banner = (tmp_path / "up.out").read_text().splitlines()
    mqtt = [line for line in banner if line.strip().startswith("MQTT")]
    assert len(mqtt) == 1 and mqtt[0].endswith("password <token>)"), banner  # one line in a log


def test_simulate_without_a_platform_says_what_to_start(tmp_path):
    out = iot2ml("simulate", "--scenario", "pump", "--data-dir", str(tmp_path / "none"), check=False, timeout=90,
                 env={**os.environ, "IOT2ML_PLATFORM_WAIT": "2"})
    assert out.returncode == 2
    text = " ".join(out.stderr.split())
    assert "waiting for the platform to start" in text
    assert f"no running broker found under {tmp_path / 'none'}: start the platform with 'iot2ml up --detach" in text
    assert "(waited 2 s)" in text


def test_quick_start_runs_the_demo(tmp_path):
    """README's first command ends in `iot2ml demo`; run that on this machine (busy default ports)."""
    readme = (ROOT / "README.md").read_text()
    commands = re.findall(r"```bash\n(.+?)\n```", readme)
    assert commands[0].endswith("iot2ml demo")
    assert commands[1] == (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1]
    out = subprocess.run(
        [sys.executable, "-m", "iot2ml", "demo", "--data-dir", str(tmp_path / "demo"), "--duration", "12"],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    text = out.stdout
    assert "iot2ml is up" in text and "admin key" in text
    counts = dict(re.findall(r"│ (pollution|pump|raw)\s+│\s+([\d,]+) │", text))
    assert int(counts["pollution"].replace(",", "")) > 0 and int(counts["pump"].replace(",", "")) > 0
    assert "pollution-0000" in text  # the sample query answered
    assert "stopped" in text


def test_simulate_cli_sends_to_the_running_platform(platform):
    data = str(platform["data"])
    for scenario, transport in (("pump", "mqtt"), ("pollution", "http")):
        out = iot2ml("simulate", "--scenario", scenario, "--devices", "3", "--rate", "5", "--duration", "3",
                     "--transport", transport, "--data-dir", data, timeout=90)
        sent = int(re.search(r"sent (\d+), acknowledged (\d+), failed 0", out.stdout).group(2))
        assert sent >= 30

        def landed(table=scenario, want=sent):
            res = iot2ml("query", f"SELECT count(*) FROM {table}", "--format", "json", "--data-dir", data, check=False)
            return res.returncode == 0 and json.loads(res.stdout)["rows"][0][0] == want

        wait_for(landed, timeout=30)


def test_up_trains_deploys_and_answers_predictions_through_the_api(platform):
    """The ML loop inside `up`: data in, a model trained and deployed with the CLI, answers through
    the API port (its own serving runtime) and a row per answer in prediction_log."""
    data = str(platform["data"])
    iot2ml("simulate", "--scenario", "pump", "--devices", "3", "--rate", "20", "--duration", "3", "--data-dir", data,
           timeout=90)
    wait_for(lambda: json.loads(iot2ml("query", "SELECT count(*) FROM pump", "--format", "json", "--data-dir", data,
                                       check=False).stdout or '{"rows": [[0]]}')["rows"][0][0] >= 150, timeout=30)
    iot2ml("train", "anomaly", "--table", "pump", "--features", "pressure,flow,vibration", "--name", "pump-blockage",
           "--data-dir", data, timeout=180)
    iot2ml("deploy", "pump-blockage", "--data-dir", data)
    url = f"{platform['http']}/api/v1/models/pump-blockage/predict"
    headers = {"Authorization": f"Bearer {platform['admin_key']}"}
    body = {"instances": [{"device_id": "pump-0000", "pressure": 4.8, "flow": 60.0, "vibration": 2.0},
                          {"device_id": "pump-0000", "pressure": 9.9, "flow": 5.0, "vibration": 30.0}],
            "request_id": "platform-1"}

    def answered():
        r = httpx.post(url, json=body, headers=headers, timeout=30)
        return r.json() if r.status_code == 200 else None

    out = answered()  # 'deploy' returned once the serving processes (serve and the API) serve it
    assert out is not None
    assert out["model"] == "pump-blockage" and out["version"] == 1 and out["variant"] == "primary"
    normal, broken = out["predictions"]
    assert broken["prediction"] is True and broken["score"] > normal["score"]

    def logged():
        res = iot2ml("query", "SELECT count(*) FROM prediction_log WHERE request_id LIKE 'platform-1/%'",
                     "--format", "json", "--data-dir", data, check=False)
        return res.returncode == 0 and json.loads(res.stdout)["rows"][0][0] == 2

    wait_for(logged, timeout=30)


def test_sigkill_of_up_takes_the_children_and_up_starts_again(platform, tmp_path):
    data = platform["data"]
    pids = [json.loads((data / "run" / f"{c}.json").read_text())["pid"] for c in ("broker", "ingest", "api", "scheduler")]
    platform["proc"].send_signal(signal.SIGKILL)
    platform["proc"].wait(10)
    try:
        wait_for(lambda: not any(alive(p) for p in pids), timeout=20)
    except AssertionError:
        left = {p: Path(f"/proc/{p}/cmdline").read_bytes().replace(b"\0", b" ")[-40:] for p in pids if alive(p)}
        raise AssertionError(f"still running after SIGKILL of up: {left}") from None
    again = subprocess.Popen(
        [sys.executable, "-m", "iot2ml", "up", "--data-dir", str(data), "--nats-port", "0", "--mqtt-port", "0",
         "--http-port", "0", "--serve-port", "0"], stdout=open(tmp_path / "again.out", "w"), stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: "iot2ml is up" in (tmp_path / "again.out").read_text(), timeout=60)
    finally:
        again.send_signal(signal.SIGTERM)
        assert again.wait(30) == 0
