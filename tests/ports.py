"""Free TCP ports for test servers, below the kernel's ephemeral range.

A port picked with bind(0) comes from the ephemeral range (32768-60999 here), where any outgoing
connection of another test, guide or helper process can take it in the moment between the pick and
the server's own bind (seen in CI: "address already in use" for a uvicorn test server and for
nats-server). Ports are picked at random in 20000-32000, checked bindable, and never handed out
twice by one process.
"""

from __future__ import annotations

import random
import socket
import threading

_HANDED_OUT: set[int] = set()
_LOCK = threading.Lock()


def free_ports(n: int) -> list[int]:
    picked: list[int] = []
    with _LOCK:
        while len(picked) < n:
            port = random.randrange(20000, 32000)
            if port in _HANDED_OUT:
                continue
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", port))
                except OSError:
                    continue
            _HANDED_OUT.add(port)
            picked.append(port)
    return picked


def free_port() -> int:
    return free_ports(1)[0]
