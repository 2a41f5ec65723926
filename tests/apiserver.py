"""The API app under uvicorn on a free port, for tests that need real HTTP (a CLI, a browser)."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from typing import Any

from ports import free_port


@contextlib.contextmanager
def serving(settings: Any) -> Iterator[str]:
    """The API app of ``settings`` under uvicorn on a free port; its URL."""
    import uvicorn

    from iot2ml.api import create_app

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(settings), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the API did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(15)
