"""``iot2ml up``: start the broker, the ingest and the API as child processes and keep them running.

Ports are settled here once (a busy port fails ``up`` with the flag to change it; ``demo`` picks a
free one) and handed to the children through ``IOT2ML_*`` variables, so a restarted child comes back
on the same ports. Children die with the supervisor (PR_SET_PDEATHSIG), even if it is killed.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from .core.catalog import Catalog
from .core.config import Settings
from .core.errors import Iot2mlError
from .core.runtime import claim_port, read_run_info, run_dir, secret

log = logging.getLogger("iot2ml.up")

COMPONENTS = ("broker", "ingest", "api", "scheduler", "serve")


# Signal a child gets when `up` dies, even by SIGKILL. The ingest and the broker stop gracefully
# (flush, stop nats-server); the API and the scheduler hold nothing unacknowledged, and a graceful
# uvicorn shutdown can wait on a broker that is gone: they are killed outright.
_DEATH_SIGNAL = {"broker": signal.SIGTERM, "ingest": signal.SIGTERM, "api": signal.SIGKILL,
                 "scheduler": signal.SIGKILL, "serve": signal.SIGTERM}


def _pdeathsig(sig: int) -> None:  # pragma: no cover - runs in the child
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, sig)
    except OSError:
        pass


def settings_env(settings: Settings) -> dict[str, str]:
    """The settings as ``IOT2ML_*`` variables for a child process."""
    env: dict[str, str] = {}
    for name, value in settings.model_dump().items():
        if value is None:
            continue
        key = f"IOT2ML_{name.upper()}"
        env[key] = json.dumps(value) if isinstance(value, (dict, list)) else str(value)
    return env


@dataclass
class _Child:
    name: str
    proc: subprocess.Popen[bytes] | None = None
    restarts: int = 0
    started_at: float = 0.0
    log_path: Any = None


@dataclass
class Platform:
    """The whole platform on one machine. ``start()``, then ``watch()``; ``stop()`` from any thread."""

    settings: Settings
    fallback_ports: bool = False
    admin_key: str = ""
    notes: list[str] = field(default_factory=list)
    _children: dict[str, _Child] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)

    def _settle_ports(self) -> None:
        s = self.settings
        chosen = {}
        for name, flag in (("nats_port", "--nats-port"), ("mqtt_port", "--mqtt-port"), ("http_port", "--http-port"),
                           ("serve_port", "--serve-port")):
            wanted = getattr(s, name)
            got = claim_port(s.host, wanted, flag, fallback=self.fallback_ports)
            if wanted and got != wanted:
                self.notes.append(f"port {wanted} is busy: {flag} {got} chosen instead")
            chosen[name] = got
        self.settings = s.model_copy(update={**chosen, "data_dir": s.data_dir.absolute()})

    def start(self, *, timeout: float = 60.0) -> None:
        self._settle_ports()
        s = self.settings
        s.data_dir.mkdir(parents=True, exist_ok=True)
        metrics_dir = run_dir(s.data_dir) / "metrics"
        shutil.rmtree(metrics_dir, ignore_errors=True)
        metrics_dir.mkdir(parents=True)
        catalog = Catalog(s.catalog)
        try:
            self.admin_key = secret(s.data_dir, "admin.key")
            if catalog.key_role(self.admin_key) is None:
                catalog.set_key("admin", self.admin_key, "admin")
        finally:
            catalog.close()
        self._env = {**os.environ, **settings_env(s), "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir)}
        self._env["IOT2ML_CONFIG"] = os.devnull
        for name in COMPONENTS:
            self._children[name] = _Child(name, log_path=run_dir(s.data_dir) / f"{name}.log")
        self._spawn("broker")
        self._wait_ready("broker", timeout)
        self._spawn("ingest")
        self._spawn("api")
        self._spawn("scheduler")
        self._spawn("serve")
        self._wait_ready("api", timeout)
        self._wait_ready("ingest", timeout)
        self._wait_ready("scheduler", timeout)
        self._wait_ready("serve", timeout)

    def _spawn(self, name: str) -> None:
        child = self._children[name]
        with open(child.log_path, "ab") as out:
            child.proc = subprocess.Popen(
                [sys.executable, "-m", "iot2ml", name],
                env=self._env,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                preexec_fn=functools.partial(_pdeathsig, _DEATH_SIGNAL[name]),
            )
        child.started_at = time.monotonic()

    def _wait_ready(self, name: str, timeout: float) -> None:
        child = self._children[name]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert child.proc is not None
            if self._stop.is_set():
                raise Iot2mlError(f"stopped while {name} was starting")
            if child.proc.poll() is not None:
                tail = child.log_path.read_text(errors="replace")[-2000:]
                raise Iot2mlError(f"{name} exited with code {child.proc.returncode} while starting:\n{tail}")
            try:
                if read_run_info(self.settings.data_dir, name).get("pid") == child.proc.pid:
                    return
            except Iot2mlError:
                pass
            time.sleep(0.1)
        raise Iot2mlError(f"{name} did not start within {timeout:.0f} s: see {child.log_path}")

    @property
    def urls(self) -> dict[str, str]:
        s = self.settings
        return {
            "mqtt": f"mqtt://{s.host}:{s.mqtt_port}",
            "nats": f"nats://{s.host}:{s.nats_port}",
            "http": f"http://{s.host}:{s.http_port}",
            "docs": f"http://{s.host}:{s.http_port}/docs",
            "metrics": f"http://{s.host}:{s.http_port}/metrics",
            "serve": f"http://{s.host}:{s.serve_port}",
        }

    def pids(self) -> dict[str, int | None]:
        return {n: (c.proc.pid if c.proc else None) for n, c in self._children.items()}

    def watch(self, *, poll: float = 0.5) -> None:
        """Restart children that die, until ``stop()``."""
        while not self._stop.wait(poll):
            for child in self._children.values():
                if child.proc is None or child.proc.poll() is None:
                    continue
                code = child.proc.returncode
                backoff = min(30.0, 0.5 * 2 ** min(child.restarts, 6))
                if time.monotonic() - child.started_at > 60:
                    child.restarts = 0
                log.warning("%s exited with code %s: restarting in %.1f s", child.name, code, backoff)
                if self._stop.wait(backoff):
                    break
                child.restarts += 1
                self._spawn(child.name)

    def stop(self) -> None:
        self._stop.set()

    def shutdown(self, timeout: float = 15.0) -> None:
        """Stop children: ingest and API first (they flush), the broker last."""
        self._stop.set()
        for group in (("api", "ingest", "scheduler", "serve"), ("broker",)):
            procs = [c.proc for n, c in self._children.items() if n in group and c.proc and c.proc.poll() is None]
            for proc in procs:
                proc.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + timeout
            for proc in procs:
                try:
                    proc.wait(max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(5)
