"""``up``, ``down``, ``demo`` and one command per component of ``components.COMPONENTS``.

All of them take the shared options (``_common.SHARED_OPTIONS``), so one set of flags or one
``iot2ml.toml`` starts any of them; a component command ignores the options it does not use.
"""

from __future__ import annotations

import inspect
import json
import os
import signal
import threading
from pathlib import Path
from typing import Annotated, Any

import typer

from ..components import COMPONENTS, Component
from ..core.runtime import DETACHED_ENV
from ._common import (
    AsJson,
    DataDir,
    _run,
    _settings,
    app,
    command_line,
    console,
    shared_options,
)

Detach = Annotated[bool, typer.Option(
    "--detach", "-d", help="Start in the background (logs in DATA_DIR/run/) and return once every component "
                           "answers; 'iot2ml down' stops it.")]


def up(options: dict[str, Any], detach: Detach = False, as_json: AsJson = False) -> None:
    """Start the embedded broker, the ingest, the API, the scheduler and the serving runtime; Ctrl-C stops all."""
    from ..supervisor import Platform, running_platform, start_detached

    settings = _run(_settings, **options)
    flags = ["--detach"] * detach + ["--json"] * as_json
    platform = Platform(settings, command=command_line("up", options, *flags))
    if not detach:
        _serve(platform, as_json=as_json)
        return
    from ..core.runtime import secret

    running = running_platform(settings.data_dir)
    if running is None:
        _run(platform.settle_ports)  # every busy port now, with the command line that avoids them
    elif not as_json:
        console.print(f"iot2ml already runs under {settings.data_dir} (pid {running['pid']})")
    child = command_line("up", {**options, "data_dir": settings.data_dir.absolute()})[1:]
    with console.status("starting in the background..."):
        info = _run(start_detached, child, settings.data_dir)
    _banner(info, secret(settings.data_dir, "admin.key"), as_json=as_json)
    if not as_json:
        console.print(f"running in the background, logs in {settings.data_dir / 'run'}: "
                      f"'iot2ml down --data-dir {settings.data_dir}' stops it")


app.command()(shared_options(up))


@app.command()
def down(data_dir: DataDir = None) -> None:
    """Stop the platform 'iot2ml up' runs for this data dir (in the background or not); harmless if none runs."""
    from ..supervisor import stop_platform

    settings = _run(_settings, data_dir=data_dir)
    with console.status(f"stopping iot2ml under {settings.data_dir}..."):
        stopped = _run(stop_platform, settings.data_dir)
    if stopped is None:
        console.print(f"nothing runs under {settings.data_dir}")
    else:
        console.print(f"stopped {', '.join(stopped) or 'the supervisor'} under {settings.data_dir}")


def _banner(info: dict[str, Any], admin_key: str, *, as_json: bool = False) -> None:
    """What ``up`` prints once everything answers: ``info`` is the supervisor's ``up.json``."""
    if as_json:
        urls = {e["key"]: e["url"] for e in info["endpoints"]}
        keys = ("data_dir", "host", "nats_port", "mqtt_port", "mqtts_port", "http_port", "serve_port", "ca_file",
                "notes", "pid")
        print(json.dumps({**{k: info.get(k) for k in keys}, "urls": urls, "admin_key": admin_key}), flush=True)
        return
    for note in info.get("notes", ()):
        console.print(f"[yellow]note:[/] {note}")
    console.print("[bold green]iot2ml is up[/]")
    rows = [(e["label"], e["url"] + (f"   ({e['note']})" if e["note"] else "")) for e in info["endpoints"]]
    rows += [("CA file", info["ca_file"])] if info.get("ca_file") else []
    if os.environ.get(DETACHED_ENV):  # this console is a log file: secrets stay out of logs
        admin_key = f"in {Path(info['data_dir']) / 'secrets' / 'admin.key'}"
    rows += [("data dir", info["data_dir"]), ("admin key", admin_key)]
    width = max(len(label) for label, _ in rows)
    for label, value in rows:
        console.print(f"  {label:<{width}} {value}", highlight=False)


def _start(platform: Any, *, as_json: bool = False) -> None:
    names = [c.name for c in platform.components]
    with console.status(f"starting {', '.join(names)}..."):
        _run(platform.start)
    _banner(platform.status("up"), platform.admin_key, as_json=as_json)


def _serve(platform: Any, *, extra: Any = None, as_json: bool = False) -> None:
    stopping = threading.Event()

    def on_signal(*_: Any) -> None:
        stopping.set()
        platform.stop()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    try:
        _start(platform, as_json=as_json)
        if extra is not None:
            extra(platform, stopping)
        else:
            if not as_json:
                console.print("press Ctrl-C to stop")
            platform.watch()
    finally:
        started = any(platform.pids().values())
        with console.status("stopping..."):
            platform.shutdown()
        if started and not as_json:
            console.print("stopped")


def demo(
    options: dict[str, Any],
    duration: Annotated[float | None, typer.Option(help="Stop after this many seconds (default: until Ctrl-C).")] = None,
    devices: Annotated[int, typer.Option(help="Simulated devices per scenario.")] = 5,
    rate: Annotated[float, typer.Option(help="Messages per second per device.")] = 1.0,
) -> None:
    """`up` plus simulated pollution and pump devices; shows live counts and a sample query (busy ports: free ones)."""
    settings = _run(_settings, **options)
    from ..demo import run_demo
    from ..supervisor import Platform

    platform = Platform(settings, fallback_ports=True)
    _serve(platform, extra=lambda p, stopping: run_demo(p, stopping, console=console, duration=duration,
                                                       devices=devices, rate=rate))


app.command()(shared_options(demo))


def _component_command(component: Component) -> None:
    """``iot2ml <component>``: the shared options, then the component's own switches."""

    def run(options: dict[str, Any], **switches: bool) -> None:
        from ..core.logs import setup_logging
        from ..core.runtime import settle_ports

        setup_logging()
        settings = _run(_settings, **options)
        flags = [s.flag for s in component.switches if switches.get(s.name)]
        from ..components import active_ports

        _run(settle_ports, settings.host, {p.flag: getattr(settings, p.setting) or 0
                                           for p in active_ports(settings, (component,))},
             command=command_line(component.name, options, *flags))  # every busy port at once
        _run(component.run, settings, **switches)

    own = [inspect.Parameter(s.name, inspect.Parameter.KEYWORD_ONLY, default=False,
                             annotation=Annotated[bool, typer.Option(s.flag, help=s.help)])
           for s in component.switches]
    run.__name__ = run.__qualname__ = component.name
    run.__doc__ = component.help
    _commands[component.name] = command = shared_options(run, own)
    app.command(name=component.name)(command)


_commands: dict[str, Any] = {}
_groups: dict[str, typer.Typer] = {}


def component_group(name: str) -> typer.Typer:
    """The subcommands of component ``name`` (``iot2ml monitor report``): its command becomes a group
    whose callback, taking the same options, runs the component when no subcommand is given, so
    ``iot2ml NAME --data-dir D`` runs it as before. Add commands to the returned ``Typer``."""
    if name in _groups:
        return _groups[name]
    command = _commands[name]
    app.registered_commands[:] = [c for c in app.registered_commands if c.name != name]

    def callback(ctx: typer.Context, **options: Any) -> None:
        if ctx.invoked_subcommand is None:
            command(**options)

    signature = inspect.signature(command)
    context = inspect.Parameter("ctx", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=typer.Context)
    callback.__signature__ = signature.replace(  # type: ignore[attr-defined]
        parameters=[context, *signature.parameters.values()])
    callback.__name__ = callback.__qualname__ = name
    callback.__doc__ = command.__doc__
    group = typer.Typer(invoke_without_command=True, help=command.__doc__)
    group.callback()(callback)
    app.add_typer(group, name=name)
    _groups[name] = group
    return group


for _component in COMPONENTS:
    _component_command(_component)
