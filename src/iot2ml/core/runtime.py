"""The data directory: where each running component says where it listens, and shared secrets."""

from __future__ import annotations

import json
import os
import secrets
import shlex
import socket
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .errors import NotFound, PortInUse


DETACHED_ENV = "IOT2ML_DETACHED"
"""Set for the ``up`` that ``up --detach`` starts in the background (its console is ``up.log``)."""


def run_dir(data_dir: Path) -> Path:
    path = Path(data_dir) / "run"
    path.mkdir(parents=True, exist_ok=True)
    return path


def write_run_info(data_dir: Path, component: str, info: dict[str, Any]) -> None:
    """Record where ``component`` listens (atomic replace), so other commands can find it."""
    path = run_dir(data_dir) / f"{component}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({**info, "pid": os.getpid()}))
    os.replace(tmp, path)


def read_run_info(data_dir: Path, component: str) -> dict[str, Any]:
    """What ``component`` recorded in ``write_run_info``; ``NotFound`` if it never ran here."""
    path = Path(data_dir) / "run" / f"{component}.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise NotFound(
            f"no running {component} found under {data_dir}: start the platform with "
            f"'iot2ml up --detach --data-dir {data_dir}'"
        ) from None


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` runs (a zombie does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, IndexError):
        return os.name != "posix" or not Path("/proc/self").exists()


def running_info(data_dir: Path, component: str) -> dict[str, Any]:
    """``read_run_info`` of a component whose process is alive; ``NotFound`` for none or a stale file."""
    info = read_run_info(data_dir, component)
    if not pid_alive(int(info.get("pid", 0))):
        raise NotFound(f"{component} under {data_dir} stopped (pid {info.get('pid')}): start the platform with "
                       f"'iot2ml up --detach --data-dir {data_dir}'")
    return info


def wait_for_run_info(
    data_dir: Path, component: str, *, timeout: float | None, on_wait: Callable[[], None] | None = None,
    poll: float = 0.2,
) -> dict[str, Any]:
    """What a running ``component`` recorded, waiting up to ``timeout`` seconds (``None``: for ever)
    for one that is starting; ``on_wait()`` is called once if it has to wait. ``NotFound`` after."""
    deadline = None if timeout is None else time.monotonic() + timeout
    waited = False
    while True:
        try:
            return running_info(data_dir, component)
        except NotFound as err:
            if deadline is not None and time.monotonic() >= deadline:
                if waited:
                    raise NotFound(f"{err} (waited {timeout:.0f} s)") from None
                raise
        if not waited and on_wait is not None:
            on_wait()
        waited = True
        time.sleep(poll if deadline is None else max(0.0, min(poll, deadline - time.monotonic())))


def clear_run_info(data_dir: Path, component: str) -> None:
    """Remove the component's run file if this process wrote it (a successor may have replaced it)."""
    path = Path(data_dir) / "run" / f"{component}.json"
    try:
        if json.loads(path.read_text()).get("pid") == os.getpid():
            path.unlink(missing_ok=True)
    except (FileNotFoundError, ValueError):
        pass


def secret(data_dir: Path, name: str) -> str:
    """A random secret kept in ``data_dir/secrets/name`` (mode 0600), created on first use."""
    folder = Path(data_dir) / "secrets"
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = folder / name
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        value = secrets.token_urlsafe(32)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(value)
        return value


def control_token(data_dir: Path) -> str:
    """The secret with which commands on this machine (``iot2ml deploy``) ask the serving processes of
    ``data_dir`` to apply a change now (``POST /api/v1/serving/refresh``): who can read it can change
    the catalog anyway."""
    return secret(data_dir, "control")


def port_is_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def claim_port(host: str, port: int, flag: str, *, fallback: bool = False) -> int:
    """Return ``port`` if free; 0 picks one; a busy port raises ``PortInUse`` or, with ``fallback``, picks one."""
    return settle_ports(host, {flag: port}, fallback=fallback)[flag]


def settle_ports(
    host: str, wanted: dict[str, int], *, fallback: bool = False, command: Sequence[str] | None = None,
) -> dict[str, int]:
    """Check every port at once: ``{flag: port}`` -> ``{flag: port to use}``; 0 picks a free port.

    Busy ports raise one ``PortInUse`` naming all of them; with ``command`` (the command line as the
    user gave it) its fix is that command with each busy port's flag set to a port free now. With
    ``fallback`` busy ports are replaced by free ones instead.
    """
    chosen: dict[str, int] = {}
    busy: dict[str, int] = {}
    for flag, port in wanted.items():
        if port and port_is_free(host, port):
            chosen[flag] = port
        elif port and not fallback:
            busy[flag] = port
    for flag, port in wanted.items():
        if flag in chosen or flag in busy:
            continue
        taken = set(chosen.values()) | set(wanted.values())
        chosen[flag] = next(p for p in iter(lambda: free_port(host), None) if p not in taken)
    if busy:
        fix = None
        if command is not None:
            taken = set(chosen.values()) | set(wanted.values())
            replace = {}
            for flag, port in busy.items():
                replace[flag] = suggest_port(host, port, taken)
                taken.add(replace[flag])
            fix = shlex.join(_with_flags(list(command), replace))
        raise PortInUse(busy, fix=fix)
    return {flag: chosen[flag] for flag in wanted}


def suggest_port(host: str, near: int, taken: set[int]) -> int:
    """A free port just above ``near`` (so 1883 -> 1884), else any free port."""
    for port in range(near + 1, min(near + 100, 65536)):
        if port not in taken and port_is_free(host, port):
            return port
    return free_port(host)


def _with_flags(argv: list[str], values: dict[str, int]) -> list[str]:
    """``argv`` with each ``--flag value`` (or ``--flag=value``) of ``values`` set to its new value."""
    out: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
            continue
        name = arg.split("=", 1)[0]
        if name in values:
            skip = "=" not in arg
            continue
        out.append(arg)
    for flag, value in values.items():
        out += [flag, str(value)]
    return out


def poke_component(data_dir: Path, component: str) -> None:
    """SIGHUP a local ``component`` (the broker re-reads the catalog then); nothing if none runs here."""
    import signal

    try:
        os.kill(int(read_run_info(data_dir, component)["pid"]), signal.SIGHUP)
    except (NotFound, OSError, KeyError, ValueError):
        pass


def tls_verify(info: dict[str, Any]) -> str | bool:
    """What an HTTP client of a component should trust, from its run file: the platform CA bundle
    when the component serves HTTPS with a certificate the platform made, else the system's."""
    return str(info.get("ca_file") or "") or True


def http_verify(value: str | bool) -> Any:
    """``verify=`` for httpx from ``tls_verify``'s answer: an SSL context trusting that CA file, or the flag."""
    if isinstance(value, str):
        import ssl

        return ssl.create_default_context(cafile=value)
    return value
