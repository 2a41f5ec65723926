"""Secrets and tokens never reach a log or the lake: a platform is run with TLS and plain MQTT, every
kind of secret is issued and used (rightly and wrongly: wrong passwords, a reused refresh token, an
unknown token, a foreign certificate), then every file under the data dir (component logs, both
nats-server logs, the catalog, the lake's Parquet decoded) is searched for each secret. Only the
files meant to keep a secret (``secrets/``, the CA's and the server's keys, the broker configs, the
CLI session) are left out."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pyarrow.parquet as pq

from iot2ml.core.runtime import http_verify

KEEPERS = {"secrets", "ca.key", "server.key", "nats.conf", "session.json"}
"""Files (or folders) whose job is to keep a secret, mode 0600."""


def run(data: Path, *args: str, stdin: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "iot2ml", *args, "--data-dir", str(data)], capture_output=True,
                          text=True, timeout=120, input=stdin, env=os.environ.copy())
    assert not check or proc.returncode == 0, f"iot2ml {' '.join(args)}: {proc.stdout}\n{proc.stderr}"
    return proc


def searchable(data: Path) -> dict[str, str]:
    """``{path: text}`` of every file under ``data`` but the keepers; Parquet files decoded."""
    out: dict[str, str] = {}
    for path in data.rglob("*"):
        if not path.is_file() or KEEPERS & set(path.relative_to(data).parts):
            continue
        if path.suffix == ".parquet":
            try:
                out[str(path)] = json.dumps(pq.read_table(path).to_pylist(), default=str)
            except Exception:  # noqa: BLE001 - a file being replaced; its bytes are searched below
                out[str(path)] = path.read_bytes().decode("latin-1")
        else:
            out[str(path)] = path.read_bytes().decode("latin-1")
    return out


def test_no_secret_reaches_a_log_or_the_lake(tmp_path):
    data = tmp_path / "data"
    up = subprocess.run(
        [sys.executable, "-m", "iot2ml", "up", "--detach", "--json", "--data-dir", str(data), "--nats-port", "0",
         "--mqtt-port", "0", "--http-port", "0", "--serve-port", "0", "--mqtts-port", "0"],
        capture_output=True, text=True, timeout=180, env=os.environ.copy())
    assert up.returncode == 0, up.stdout + up.stderr
    info = json.loads(up.stdout.strip().splitlines()[-1])
    secrets: dict[str, str] = {"admin key": info["admin_key"]}
    try:
        api, verify = info["urls"]["http"], http_verify(info["ca_file"])
        mqtt_port = int(info["urls"]["mqtt"].rsplit(":", 1)[1])
        mqtts_port = int(info["urls"]["mqtts"].rsplit(":", 1)[1])
        for name in ("service.password", "control", "door.password"):
            secrets[name] = (data / "secrets" / name).read_text().strip()

        secrets["api key"] = json.loads(run(data, "keys", "add", "ci", "--role", "operator", "--json").stdout)["key"]
        secrets["device token"] = json.loads(run(data, "devices", "add", "pump-1", "--type", "pump",
                                                 "--json").stdout)["token"]
        device = json.loads(run(data, "devices", "add", "pump-2", "--type", "pump", "--cert", "--json").stdout)
        secrets["device key"] = device["key"].split("-----")[2].strip()  # the base64 body of the PEM
        claim = json.loads(run(data, "provisioning", "add", "pumps", "--type", "pump", "--json").stdout)
        secrets["claim key"] = claim["claim_key"].split("-----")[2].strip()
        secrets["password"] = "correct-horse-battery-9"
        secrets["wrong password"] = "wrong-horse-battery-7"
        run(data, "users", "add", "ana", "--role", "admin", "--password-stdin", stdin=secrets["password"] + "\n")
        secrets["unknown token"] = "i2m_" + "Zx9" * 14

        # Use them: HTTP with each credential, rightly and wrongly.
        http = httpx.Client(base_url=api, verify=verify, timeout=30)
        assert http.post("/api/v1/auth/login", json={"username": "ana", "password": secrets["wrong password"]}
                         ).status_code == 401
        pair = http.post("/api/v1/auth/login", json={"username": "ana", "password": secrets["password"]}).json()
        secrets["access token"], secrets["refresh token"] = pair["access_token"], pair["refresh_token"]
        for key in (secrets["admin key"], secrets["api key"], secrets["access token"], secrets["unknown token"]):
            http.get("/api/v1/tables", headers={"Authorization": f"Bearer {key}"})
            http.post("/api/v1/keys", headers={"Authorization": f"Bearer {key}"}, json={"name": "x" + key[-4:]})
        second = http.post("/api/v1/auth/refresh", json={"refresh_token": secrets["refresh token"]}).json()
        secrets["second refresh token"] = second["refresh_token"]
        assert http.post("/api/v1/auth/refresh", json={"refresh_token": secrets["refresh token"]}).status_code == 401
        r = http.post("/api/v1/devices/pump-1/telemetry", headers={"Authorization": f"Bearer {secrets['device token']}"},
                      json=[{"ts": "2026-11-22T03:00:00Z", "pressure": 3.1}])
        assert r.status_code == 201, r.text
        http.post("/api/v1/devices/pump-1/telemetry", headers={"Authorization": f"Bearer {secrets['unknown token']}"},
                  json=[{"pressure": 1}])

        # MQTT with the token (and a wrong one), MQTTS with the certificate.
        pub = ["mosquitto_pub", "-h", "127.0.0.1", "-q", "1", "-t", "devices/pump-1/telemetry", "-m", '{"p": 1}']
        subprocess.run([*pub, "-p", str(mqtt_port), "-u", "pump-1", "-P", secrets["device token"]], timeout=30,
                       capture_output=True)
        subprocess.run([*pub, "-p", str(mqtt_port), "-u", "pump-1", "-P", secrets["unknown token"]], timeout=30,
                       capture_output=True)
        for name in ("cert", "key", "ca"):
            (tmp_path / f"{name}.pem").write_text(device[name])
        subprocess.run(["mosquitto_pub", "-h", "127.0.0.1", "-p", str(mqtts_port), "--cafile", str(tmp_path / "ca.pem"),
                        "--cert", str(tmp_path / "cert.pem"), "--key", str(tmp_path / "key.pem"), "-q", "1",
                        "-t", "devices/pump-2/telemetry", "-m", '{"p": 2}'], timeout=30, capture_output=True)

        # The CLI logged in and out; its session file is a keeper, its log lines are not.
        run(data, "login", "--user", "ana", "--password-stdin", stdin=secrets["password"] + "\n")
        run(data, "logout")
        time.sleep(3)  # the audit buffer and the ingest flush
    finally:
        run(data, "down", check=False)

    files = searchable(data)
    assert any(p.endswith("api.log") for p in files) and any("nats-server.log" in p for p in files)
    assert any(p.endswith(".parquet") and "audit" in p for p in files), "the audit table was not written"
    leaks = [f"{label} in {path}" for label, value in secrets.items() for path, text in files.items()
             if value and value in text]
    assert leaks == []
