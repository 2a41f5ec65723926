"""``iot2ml up``: start the components of ``components.COMPONENTS`` as child processes and keep them running.

Everything here loops over that table: ports are settled once, all at once (busy ones fail ``up``
with one command line that uses free ports; ``demo`` picks free ones), children start stage by stage
and stop in reverse, each gets its ports and settings through ``IOT2ML_*`` variables (so a restarted
child comes back on the same ports) and dies with the supervisor (PR_SET_PDEATHSIG), even if it is
killed. The supervisor records itself in ``data_dir/run/up.json`` (state ``starting``, ``up`` or
``failed``), which ``up --detach`` waits on and ``down`` stops.
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
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .auth.store import Keys
from .components import COMPONENTS, Component, active_ports, start_stages
from .core.catalog import Catalog
from .core.config import Settings
from .core.errors import Iot2mlError, NotFound
from .core.runtime import (
    DETACHED_ENV,
    clear_run_info,
    pid_alive,
    read_run_info,
    run_dir,
    running_info,
    secret,
    settle_ports,
    write_run_info,
)

log = logging.getLogger("iot2ml.up")

RUN_NAME = "up"
"""The supervisor's own run file: ``data_dir/run/up.json``; its console goes to ``up.log`` when detached."""


def _pdeathsig(sig: int) -> None:  # pragma: no cover - runs in the child
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, sig)
    except OSError:
        pass


def settings_env(settings: Settings) -> dict[str, str]:
    """The settings as ``IOT2ML_*`` variables for a child process."""
    env: dict[str, str] = {}
    for name, value in settings.model_dump(exclude=set(type(settings).model_computed_fields)).items():
        if value is None:
            continue
        key = f"IOT2ML_{name.upper()}"
        env[key] = json.dumps(value) if isinstance(value, (dict, list)) else str(value)
    return env


def endpoints(values: dict[str, Any], components: Sequence[Component] = COMPONENTS) -> list[dict[str, str]]:
    """Every component's endpoints formatted with ``values`` (the settings): key, label, url, note."""
    return [{"key": e.key, "label": e.label, "url": e.url.format(**values), "note": e.note.format(**values)}
            for c in components for e in c.endpoints if e.when is None or values.get(e.when)]


def running_platform(data_dir: Path) -> dict[str, Any] | None:
    """What the live supervisor of ``data_dir`` recorded (``state`` starting or up), else None."""
    try:
        info = running_info(data_dir, RUN_NAME)
    except NotFound:
        return None
    return info if info.get("state") in ("starting", "up") else None


@dataclass
class _Child:
    component: Component
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None
    restarts: int = 0
    started_at: float = 0.0


@dataclass
class Platform:
    """The whole platform on one machine. ``start()``, then ``watch()``; ``stop()`` from any thread.

    ``command`` is the command line as the user gave it: a busy port's error says to run it again
    with free ports.
    """

    settings: Settings
    fallback_ports: bool = False
    command: Sequence[str] | None = None
    components: tuple[Component, ...] = COMPONENTS
    admin_key: str = ""
    notes: list[str] = field(default_factory=list)
    _children: dict[str, _Child] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)
    _state: str = ""

    def settle_ports(self) -> None:
        """Check every port at once (``PortInUse`` names the busy ones) and fix the ports to use."""
        s = self.settings
        if s.tls_on and s.mqtts_port is None:
            s = s.model_copy(update={"mqtts_port": s.mqtts_port_in_force})
        ports = active_ports(s, self.components)
        wanted = {p.flag: getattr(s, p.setting) for p in ports}
        chosen = settle_ports(s.host, wanted, fallback=self.fallback_ports, command=self.command)
        for p in ports:
            if wanted[p.flag] and chosen[p.flag] != wanted[p.flag]:
                self.notes.append(f"port {wanted[p.flag]} is busy: {p.flag} {chosen[p.flag]} chosen instead")
        self.settings = s.model_copy(update={**{p.setting: chosen[p.flag] for p in ports},
                                             "data_dir": s.data_dir.absolute()})

    def start(self, *, timeout: float = 60.0) -> None:
        """Start every component, stage by stage; returns once all are ready."""
        data_dir = self.settings.data_dir
        other = running_platform(data_dir)
        if other is not None and other.get("pid") != os.getpid():
            raise Iot2mlError(f"iot2ml already runs under {data_dir} (pid {other['pid']}): "
                              f"'iot2ml down --data-dir {data_dir}' stops it")
        try:
            self.settle_ports()
            s = self.settings
            s.data_dir.mkdir(parents=True, exist_ok=True)
            self._record("starting")
            metrics_dir = run_dir(s.data_dir) / "metrics"
            shutil.rmtree(metrics_dir, ignore_errors=True)
            metrics_dir.mkdir(parents=True)
            catalog = Catalog(s.catalog)
            try:
                self.admin_key = secret(s.data_dir, "admin.key")
                keys = Keys(catalog)
                if keys.key_role(self.admin_key) is None:
                    keys.set_key("admin", self.admin_key, "admin")
            finally:
                catalog.close()
            self._env = {**os.environ, **settings_env(s), "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir)}
            self._env["IOT2ML_CONFIG"] = os.devnull
            for c in self.components:
                self._children[c.name] = _Child(c, run_dir(s.data_dir) / f"{c.name}.log")
            for stage in start_stages(self.components):
                for c in stage:
                    self._spawn(c.name)
                for c in stage:
                    self._wait_ready(c.name, timeout)
        except Iot2mlError as err:
            self._record("failed", error=str(err))
            raise
        self._record("up")

    def status(self, state: str) -> dict[str, Any]:
        """What ``up.json`` says: state, ports, endpoints, notes and the children's pids."""
        s = self.settings
        values = s.model_dump()
        ports = {p.setting: values[p.setting] for p in active_ports(s, self.components)}
        if s.tls_on:  # what clients trust: the platform CA (and, with a certificate it made, the server's)
            ports["ca_file"] = str(s.data_dir / "ca" / "bundle.pem")
        return {"state": state, "data_dir": str(s.data_dir), "host": s.host, **ports,
                "endpoints": endpoints(values, self.components), "notes": self.notes, "pids": self.pids()}

    def _record(self, state: str, **extra: Any) -> None:
        write_run_info(self.settings.data_dir, RUN_NAME, {**self.status(state), **extra})
        self._state = state

    def child_command(self, name: str) -> list[str]:
        """The command line of component ``name``'s process: ``iot2ml <name>``."""
        return [sys.executable, "-m", "iot2ml", name]

    def _spawn(self, name: str) -> None:
        child = self._children[name]
        with open(child.log_path, "ab") as out:
            child.proc = subprocess.Popen(
                self.child_command(name),
                env=self._env,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                preexec_fn=functools.partial(_pdeathsig, child.component.death_signal),
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
        return {e["key"]: e["url"] for e in endpoints(self.settings.model_dump(), self.components)}

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
                log.warning("%s exited with code %s: restarting in %.1f s", child.component.name, code, backoff)
                if self._stop.wait(backoff):
                    break
                child.restarts += 1
                self._spawn(child.component.name)
                self._record("up")

    def stop(self) -> None:
        self._stop.set()

    def shutdown(self, timeout: float = 15.0) -> None:
        """Stop the children stage by stage in reverse start order (the broker last), then forget ``up.json``."""
        self._stop.set()
        for stage in reversed(start_stages(self.components)):
            names = {c.name for c in stage}
            procs = [c.proc for n, c in self._children.items() if n in names and c.proc and c.proc.poll() is None]
            for proc in procs:
                proc.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + timeout
            for proc in procs:
                try:
                    proc.wait(max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(5)
        if self._state != "failed":  # a failure stays on record for 'up --detach' to report
            clear_run_info(self.settings.data_dir, RUN_NAME)


def start_detached(argv: Sequence[str], data_dir: Path, *, timeout: float = 180.0) -> dict[str, Any]:
    """Run ``iot2ml <argv>`` (an ``up`` without ``--detach``) in the background, logging to
    ``data_dir/run/up.log``, and return its ``up.json`` once every component is ready. A supervisor
    already running there is waited on instead. Raises ``Iot2mlError`` with the reason it failed."""
    data_dir = Path(data_dir)
    info = running_platform(data_dir)
    proc = None
    log_path = run_dir(data_dir) / f"{RUN_NAME}.log"
    if info is None:
        with open(log_path, "ab") as out:
            # Its banner goes to a log: it names the admin key's file instead of printing the key.
            proc = subprocess.Popen([sys.executable, "-m", "iot2ml", *argv], stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True,
                                    env={**os.environ, DETACHED_ENV: "1"})
        pid = proc.pid
    else:
        pid = int(info["pid"])
    deadline = time.monotonic() + timeout
    while True:
        try:
            info = read_run_info(data_dir, RUN_NAME)
        except NotFound:
            info = {}
        if info.get("pid") == pid:
            if info.get("state") == "up":
                return info
            if info.get("state") == "failed":
                if proc is not None:
                    proc.wait(30)
                raise Iot2mlError(info.get("error") or f"iot2ml up failed: see {log_path}")
        exited = proc.poll() is not None if proc is not None else not pid_alive(pid)
        if exited:
            tail = log_path.read_text(errors="replace")[-2000:].strip()
            code = f" with code {proc.returncode}" if proc is not None else ""
            raise Iot2mlError(f"iot2ml up exited{code} while starting (log {log_path}):\n{tail}")
        if time.monotonic() > deadline:
            if proc is not None:
                proc.terminate()
            raise Iot2mlError(f"the platform did not start within {timeout:.0f} s: see {log_path} and the "
                              f"components' logs next to it")
        time.sleep(0.1)


def stop_platform(data_dir: Path, *, timeout: float = 60.0) -> list[str] | None:
    """SIGTERM the supervisor of ``data_dir`` and wait until it and every component stopped.

    Returns the names of the components that were running, or None if no supervisor runs there."""
    info = running_platform(Path(data_dir))
    if info is None:
        return None
    pid = int(info["pid"])
    children = {}
    for c in COMPONENTS:
        try:
            children[c.name] = int(running_info(data_dir, c.name)["pid"])
        except (NotFound, KeyError, ValueError):
            continue
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    deadline = time.monotonic() + timeout
    while pid_alive(pid) or any(pid_alive(p) for p in children.values()):
        if time.monotonic() > deadline:
            left = [n for n, p in children.items() if pid_alive(p)]
            raise Iot2mlError(f"iot2ml under {data_dir} (pid {pid}) did not stop within {timeout:.0f} s"
                              + (f"; still running: {', '.join(left)}" if left else "")
                              + f": see {run_dir(Path(data_dir))}")
        time.sleep(0.1)
    return list(children)
