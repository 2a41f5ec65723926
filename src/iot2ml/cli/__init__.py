"""The ``iot2ml`` command: composition root of the CLI, one module per command group."""

from __future__ import annotations

import sys

from ..core.errors import Iot2mlError
from . import platform, devices, certs, users, data, ml, deploy, monitor  # noqa: F401, I001 - each registers its commands, in help order
from ._common import app, err_console

__all__ = ["app", "main"]


def main() -> None:
    try:
        app()
    except Iot2mlError as err:
        err_console.print(f"[bold red]error:[/] {err}")
        sys.exit(2)
    finally:
        # Collect Arrow dataset scanners now, while Arrow is alive: left to the interpreter's final
        # teardown, their background threads can abort the process after a command succeeded
        # ("terminate called without an active exception", apache/arrow#34314), seen once in a guide.
        import gc

        gc.collect()

