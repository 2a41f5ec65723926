"""What every command group shares: the root app, consoles, shared options and error handling."""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from ..core.config import Settings, load_settings
from ..core.errors import Iot2mlError

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False, help="iot2ml: devices -> broker -> Delta lake -> SQL.")

console = Console()

err_console = Console(stderr=True)

DataDir = Annotated[Path | None, typer.Option("--data-dir", help="Data directory \\[env IOT2ML_DATA_DIR].")]
NatsPort = Annotated[int | None, typer.Option("--nats-port", help="NATS port, 0 = pick a free one.")]
MqttPort = Annotated[int | None, typer.Option("--mqtt-port", help="MQTT port, 0 = pick a free one.")]
HttpPort = Annotated[int | None, typer.Option("--http-port", help="HTTP API port, 0 = pick a free one.")]
ServePort = Annotated[int | None, typer.Option("--serve-port", help="Predictions (serving) port, 0 = pick a free one.")]
Host = Annotated[str | None, typer.Option("--host", help="Address to listen on.")]
CatalogUrl = Annotated[str | None, typer.Option("--catalog-url", help="Catalog DB URL (sqlite:///... or postgresql://...).")]
MqttUrl = Annotated[str | None, typer.Option("--mqtt-url", help="Also ingest from an external MQTT broker (mqtt://host:port).")]
AsJson = Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")]
Reason = Annotated[str, typer.Option(help="Why: kept in the audit trail ('iot2ml deployments history').")]


def _settings(**overrides: Any) -> Settings:
    return load_settings(**overrides)

def _fail(err: Exception) -> None:
    err_console.print(f"[bold red]error:[/] {err}")
    raise typer.Exit(2)

def _run(fn, *args: Any, **kwargs: Any) -> Any:
    try:
        return fn(*args, **kwargs)
    except Iot2mlError as err:
        _fail(err)

def _catalog(data_dir: Path | None, catalog_url: str | None):
    from ..core.catalog import Catalog

    settings = _run(_settings, data_dir=data_dir, catalog_url=catalog_url)
    return settings, _run(Catalog, settings.catalog)

def _poke_broker(settings: Settings) -> None:
    """Tell a local broker to re-read the catalog now (it also polls every second)."""
    from ..core.runtime import read_run_info

    try:
        os.kill(int(read_run_info(settings.data_dir, "broker")["pid"]), signal.SIGHUP)
    except (Iot2mlError, OSError, KeyError, ValueError):
        pass

def _who() -> str:
    """Who changes a deployment from this shell: the OS user, else ``cli``."""
    import getpass

    try:
        return getpass.getuser() or "cli"
    except (KeyError, OSError):
        return "cli"
