"""The data directory: where each running component says where it listens, and shared secrets."""

from __future__ import annotations

import json
import os
import secrets
import socket
from pathlib import Path
from typing import Any

from .errors import NotFound, PortInUse


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
            f"no running {component} found under {data_dir}: start it with 'iot2ml up --data-dir {data_dir}'"
        ) from None


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
    if port == 0:
        return free_port(host)
    if port_is_free(host, port):
        return port
    if fallback:
        return free_port(host)
    raise PortInUse(port, flag)
