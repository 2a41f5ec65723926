"""What every command group shares: the root app, consoles, shared options and error handling."""

from __future__ import annotations

import inspect
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from ..core.config import Settings, load_settings
from ..core.errors import Iot2mlError
from ..core.logs import setup_logging

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False, help="iot2ml: devices -> broker -> Delta lake -> SQL.")

_WIDE = 1000
"""Columns of a console that is not a terminal (a log file, a pipe): lines are never wrapped there."""


def _console(*, stderr: bool = False) -> Console:
    """A terminal's own width; elsewhere wide and unwrapped (``COLUMNS`` too is ignored: shells
    export the terminal's), so a script or a log gets each line whole."""
    try:
        tty = (sys.stderr if stderr else sys.stdout).isatty()
    except (AttributeError, ValueError):
        tty = False
    if tty:
        return Console(stderr=stderr)
    return Console(stderr=stderr, width=_WIDE, soft_wrap=True)


console = _console()

err_console = _console(stderr=True)


@app.callback()
def _quiet() -> None:
    """Our warnings on stderr; other libraries' messages and Python warnings into the debug log."""
    setup_logging(component=False)


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

Tls = Annotated[bool | None, typer.Option("--tls/--no-tls", help="HTTPS for the API and serving, MQTT over TLS "
                                          "with device certificates (certificate from --tls-cert or the platform CA).")]
MqttsPort = Annotated[int | None, typer.Option("--mqtts-port", help="MQTT-over-TLS port (turns TLS on; default 8883).")]
TlsCert = Annotated[Path | None, typer.Option("--tls-cert", help="Server certificate (PEM) for HTTPS and MQTTS "
                                              "(turns TLS on).")]
TlsKey = Annotated[Path | None, typer.Option("--tls-key", help="Private key (PEM) of --tls-cert.")]
PlainMqtt = Annotated[bool | None, typer.Option("--plain-mqtt/--no-plain-mqtt",
                                                help="Keep the plain MQTT listener (tokens) while TLS is on.")]

SHARED_OPTIONS: dict[str, Any] = {
    "data_dir": DataDir, "catalog_url": CatalogUrl, "host": Host, "mqtt_url": MqttUrl,
    "nats_port": NatsPort, "mqtt_port": MqttPort, "http_port": HttpPort, "serve_port": ServePort,
    "tls": Tls, "mqtts_port": MqttsPort, "tls_cert_file": TlsCert, "tls_key_file": TlsKey, "plain_mqtt": PlainMqtt,
}
"""The options ``up``, ``demo`` and every component command take (each ignores those it does not use),
so one set of flags or one config starts any of them."""

SHARED_FLAGS: dict[str, str] = {name: {"tls_cert_file": "--tls-cert", "tls_key_file": "--tls-key"}.get(
    name, "--" + name.replace("_", "-")) for name in SHARED_OPTIONS}
"""The flag of each shared option (the on/off ones, ``--tls`` and ``--plain-mqtt``, have a ``--no-`` form)."""


def shared_options(fn: Callable[..., Any], own: Sequence[inspect.Parameter] | None = None) -> Callable[..., Any]:
    """A command with every ``SHARED_OPTIONS`` option, then ``fn``'s own (or ``own``); ``fn`` is called
    as ``fn(options, **own)`` with ``options`` = ``{name: value or None}`` of the shared ones."""
    if own is None:
        own = [p for p in inspect.signature(fn, eval_str=True).parameters.values() if p.name != "options"]
    params = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=annotation)
              for name, annotation in SHARED_OPTIONS.items()]
    params += [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in own]

    def command(**given: Any) -> Any:
        return fn({name: given.pop(name) for name in SHARED_OPTIONS}, **given)

    command.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    command.__name__, command.__qualname__, command.__doc__ = fn.__name__, fn.__qualname__, fn.__doc__
    command.__module__ = fn.__module__
    return command


def command_line(name: str, options: dict[str, Any], *extra: str) -> list[str]:
    """The command as the user gave it (``iot2ml NAME``, ``extra``, then the shared options given)."""
    argv = ["iot2ml", name, *extra]
    for key, value in options.items():
        flag = SHARED_FLAGS[key]
        if isinstance(value, bool):
            argv.append(flag if value else "--no-" + flag[2:])
        elif value is not None:
            argv += [flag, str(value)]
    return argv


def _wait_for_platform(settings: Settings, *components: str) -> None:
    """For commands that talk to the running platform: wait up to ``settings.platform_wait`` seconds
    for ``components`` of one that is starting (saying so once), then fail naming what to start."""
    from ..core.runtime import wait_for_run_info

    timeout = settings.platform_wait
    said: list[bool] = []

    def say() -> None:
        if not said:
            err_console.print(f"waiting for the platform to start under {settings.data_dir}...")
            said.append(True)

    deadline = time.monotonic() + timeout
    for name in components:
        _run(wait_for_run_info, settings.data_dir, name, timeout=max(0.0, deadline - time.monotonic()), on_wait=say)
    from ..supervisor import running_platform

    # Under `up`, wait for all of it (the ingest too), as `up --detach` does.
    while (info := running_platform(settings.data_dir)) and info["state"] == "starting":
        if time.monotonic() > deadline:
            break
        say()
        time.sleep(0.2)


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
    from ..core.runtime import poke_component

    poke_component(settings.data_dir, "broker")

def _who() -> str:
    """Who changes a deployment from this shell: the OS user, else ``cli``."""
    import getpass

    try:
        return getpass.getuser() or "cli"
    except (KeyError, OSError):
        return "cli"
