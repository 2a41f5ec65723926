"""The ``iot2ml`` command: composition root of the CLI, one module per command group."""

from __future__ import annotations

import sys

from ..core.errors import Iot2mlError
from . import platform, devices, data, ml, deploy, monitor  # noqa: F401, I001 - each registers its commands, in help order
from ._common import app, err_console

__all__ = ["app", "main"]


def main() -> None:
    try:
        app()
    except Iot2mlError as err:
        err_console.print(f"[bold red]error:[/] {err}")
        sys.exit(2)

