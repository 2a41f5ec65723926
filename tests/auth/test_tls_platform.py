"""TLS where it matters, as a user runs it: `iot2ml up --mqtts-port --no-plain-mqtt` gives HTTPS for the
API and serving (certificate signed by the platform CA, made on first start) and MQTTS with device
certificates; plain HTTP and plain MQTT are off. Real processes, mosquitto_pub over TLS, curl-like
httpx with and without the CA, `iot2ml login` and the SDK over HTTPS."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

import iot2ml
from iot2ml.core.runtime import http_verify


def cli(*args: str, data: Path, stdin: str | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "iot2ml", *args, "--data-dir", str(data)], capture_output=True,
                          text=True, timeout=timeout, input=stdin, env=os.environ.copy())
    assert proc.returncode == 0, f"iot2ml {' '.join(args)}: {proc.stdout}\n{proc.stderr}"
    return proc


def wait_for(predicate, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.3)
    raise AssertionError(f"not within {timeout} s")


@pytest.fixture
def tls_platform(tmp_path):
    data = tmp_path / "data"
    proc = subprocess.run(
        [sys.executable, "-m", "iot2ml", "up", "--detach", "--json", "--data-dir", str(data), "--nats-port", "0",
         "--mqtt-port", "0", "--http-port", "0", "--serve-port", "0", "--mqtts-port", "0", "--no-plain-mqtt"],
        capture_output=True, text=True, timeout=180, env=os.environ.copy())
    assert proc.returncode == 0, proc.stdout + proc.stderr
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    yield data, info
    subprocess.run([sys.executable, "-m", "iot2ml", "down", "--data-dir", str(data)], capture_output=True, timeout=90)


def test_https_and_mqtts_with_plain_listeners_off(tls_platform, tmp_path):
    data, info = tls_platform
    urls, key, ca = info["urls"], info["admin_key"], info["ca_file"]
    assert urls["http"].startswith("https://") and urls["serve"].startswith("https://")
    assert info["mqtt_port"] is None and "mqtt" not in urls and urls["mqtts"].startswith("mqtts://")
    headers = {"Authorization": f"Bearer {key}"}

    # HTTPS answers with a certificate the platform CA signed; plain HTTP and an untrusting client get nothing.
    assert httpx.get(f"{urls['http']}/api/v1/tables", headers=headers, verify=http_verify(ca)).status_code == 200
    assert httpx.get(f"{urls['serve']}/healthz", verify=http_verify(ca)).status_code == 200
    for bad in (lambda: httpx.get(urls["http"].replace("https://", "http://") + "/api/v1/tables", timeout=5),
                lambda: httpx.get(f"{urls['http']}/api/v1/tables", timeout=5)):  # system trust only
        with pytest.raises((httpx.HTTPError, OSError)):
            bad()
    port = int(urls["mqtts"].rsplit(":", 1)[1])

    # A device with a certificate publishes with mosquitto_pub over TLS; its reading lands in the lake.
    device = json.loads(cli("devices", "add", "pump-9", "--type", "pump", "--cert", "--json", data=data).stdout)
    files = {}
    for name in ("cert", "key", "ca"):
        files[name] = tmp_path / f"{name}.pem"
        files[name].write_text(device[name])
    os.chmod(files["key"], 0o600)

    def publish(cert: Path, key_file: Path) -> subprocess.CompletedProcess:
        return subprocess.run(["mosquitto_pub", "-h", "127.0.0.1", "-p", str(port), "--cafile", str(files["ca"]),
                               "--cert", str(cert), "--key", str(key_file), "-q", "1", "-i", "pump-9",
                               "-t", "devices/pump-9/telemetry", "-m", '{"pressure": 3.25}'],
                              capture_output=True, text=True, timeout=30)

    out = wait_for(lambda: (p := publish(files["cert"], files["key"])).returncode == 0 and p, timeout=20)
    assert out.returncode == 0

    def landed():
        r = httpx.post(f"{urls['http']}/api/v1/query", headers=headers, verify=http_verify(ca),
                       json={"sql": "SELECT device_id, pressure FROM pump"})
        return r.status_code == 200 and r.json()["rows"]

    assert wait_for(landed) == [["pump-9", 3.25]]

    # A certificate of another CA is refused by the TLS listener.
    import trustme

    other = trustme.CA().issue_cert("pump-9", common_name="pump-9")
    other.cert_chain_pems[0].write_to_path(str(tmp_path / "other.pem"))
    other.private_key_pem.write_to_path(str(tmp_path / "other.key"))
    assert publish(tmp_path / "other.pem", tmp_path / "other.key").returncode != 0

    # Revoking the certificate refuses the device's next connection.
    cli("devices", "revoke-cert", "pump-9", data=data)
    assert wait_for(lambda: publish(files["cert"], files["key"]).returncode != 0, timeout=15)

    # People log in over HTTPS: the CLI keeps the token (and what to trust), the SDK uses it.
    cli("users", "add", "ana", "--role", "viewer", "--password-stdin", data=data, stdin="ana-password-123\n")
    cli("login", "--user", "ana", "--password-stdin", data=data, stdin="ana-password-123\n")
    with iot2ml.Client.from_session(data) as client:
        assert client.query("SELECT count(*) AS n FROM pump")["n"].to_list() == [1]
    with socket.create_connection(("127.0.0.1", port), timeout=5):
        pass  # the MQTTS port listens; no plain MQTT port was opened (mqtt_port is null above)


def test_server_certificate_files(tmp_path):
    """The user's certificate is used as given; without one the platform CA signs one for this host."""
    import trustme
    from cryptography import x509

    from iot2ml.auth.ca import server_tls_files
    from iot2ml.core.config import load_settings
    from iot2ml.core.errors import ConfigError

    made = server_tls_files(load_settings(data_dir=tmp_path / "a", tls=True))
    cert = x509.load_pem_x509_certificate(made[0].read_bytes())
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "localhost" in names.get_values_for_type(x509.DNSName)
    assert made == server_tls_files(load_settings(data_dir=tmp_path / "a", tls=True))  # made once
    issuer = x509.load_pem_x509_certificate(made[2].read_bytes())
    assert cert.issuer == issuer.subject

    ca = trustme.CA()
    own = ca.issue_cert("iot.example.com")
    own.cert_chain_pems[0].write_to_path(str(tmp_path / "own.pem"))
    own.private_key_pem.write_to_path(str(tmp_path / "own.key"))
    given = server_tls_files(load_settings(data_dir=tmp_path / "b", tls_cert_file=tmp_path / "own.pem",
                                           tls_key_file=tmp_path / "own.key"))
    assert given[:2] == ((tmp_path / "own.pem").absolute(), (tmp_path / "own.key").absolute())
    with pytest.raises(ConfigError, match="--tls-key"):
        server_tls_files(load_settings(data_dir=tmp_path / "c", tls_cert_file=tmp_path / "own.pem"))
    with pytest.raises(ConfigError, match="does not exist"):
        server_tls_files(load_settings(data_dir=tmp_path / "d", tls_cert_file=tmp_path / "nope.pem",
                                       tls_key_file=tmp_path / "own.key"))
