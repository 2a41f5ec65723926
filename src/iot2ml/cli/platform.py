"""``up``, ``demo`` and the components one by one: broker, ingest, api, scheduler, serve."""

from __future__ import annotations

import signal
import threading
from typing import Annotated, Any

import typer

from ._common import (
    CatalogUrl,
    DataDir,
    Host,
    HttpPort,
    MqttPort,
    MqttUrl,
    NatsPort,
    ServePort,
    _run,
    _settings,
    app,
    console,
)


@app.command()
def up(
    data_dir: DataDir = None, nats_port: NatsPort = None, mqtt_port: MqttPort = None, http_port: HttpPort = None,
    host: Host = None, catalog_url: CatalogUrl = None, mqtt_url: MqttUrl = None, serve_port: ServePort = None,
) -> None:
    """Start the embedded broker, the ingest, the API, the scheduler and the serving runtime; Ctrl-C stops all."""
    settings = _run(_settings, data_dir=data_dir, nats_port=nats_port, mqtt_port=mqtt_port, http_port=http_port,
                    host=host, catalog_url=catalog_url, mqtt_url=mqtt_url, serve_port=serve_port)
    from ..supervisor import Platform

    platform = Platform(settings)
    _serve(platform)

def _start(platform: Any) -> None:
    with console.status("starting broker, ingest, API, scheduler and serving..."):
        _run(platform.start)
    for note in platform.notes:
        console.print(f"[yellow]note:[/] {note}")
    urls = platform.urls
    console.print("[bold green]iot2ml is up[/]")
    console.print(f"  MQTT      {urls['mqtt']}   (topic devices/<id>/telemetry, user <id>, password <token>)")
    console.print(f"  HTTP API  {urls['http']}   docs {urls['docs']}")
    console.print(f"  predict   {urls['serve']}/api/v1/models/<name>/predict   (after 'iot2ml deploy <name>')")
    console.print(f"  NATS      {urls['nats']}")
    console.print(f"  metrics   {urls['metrics']}")
    console.print(f"  data dir  {platform.settings.data_dir}")
    console.print(f"  admin key {platform.admin_key}")

def _serve(platform: Any, *, extra: Any = None) -> None:
    stopping = threading.Event()

    def on_signal(*_: Any) -> None:
        stopping.set()
        platform.stop()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    try:
        _start(platform)
        if extra is not None:
            extra(platform, stopping)
        else:
            console.print("press Ctrl-C to stop")
            platform.watch()
    finally:
        with console.status("stopping..."):
            platform.shutdown()
        console.print("stopped")

@app.command()
def demo(
    data_dir: DataDir = None, nats_port: NatsPort = None, mqtt_port: MqttPort = None, http_port: HttpPort = None,
    host: Host = None, serve_port: ServePort = None,
    duration: Annotated[float | None, typer.Option(help="Stop after this many seconds (default: until Ctrl-C).")] = None,
    devices: Annotated[int, typer.Option(help="Simulated devices per scenario.")] = 5,
    rate: Annotated[float, typer.Option(help="Messages per second per device.")] = 1.0,
) -> None:
    """`up` plus simulated pollution and pump devices; shows live counts and a sample query."""
    settings = _run(_settings, data_dir=data_dir, nats_port=nats_port, mqtt_port=mqtt_port, http_port=http_port,
                    host=host, serve_port=serve_port)
    from ..demo import run_demo
    from ..supervisor import Platform

    platform = Platform(settings, fallback_ports=True)
    _serve(platform, extra=lambda p, stopping: run_demo(p, stopping, console=console, duration=duration,
                                                       devices=devices, rate=rate))

@app.command()
def broker(
    data_dir: DataDir = None, nats_port: NatsPort = None, mqtt_port: MqttPort = None, host: Host = None,
    catalog_url: CatalogUrl = None,
) -> None:
    """Run only the embedded broker (NATS with MQTT and JetStream)."""
    from ..components import run_broker_component
    from ..core.logs import setup_logging

    setup_logging()
    settings = _run(_settings, data_dir=data_dir, nats_port=nats_port, mqtt_port=mqtt_port, host=host,
                    catalog_url=catalog_url)
    _run(run_broker_component, settings)

@app.command()
def ingest(
    data_dir: DataDir = None, catalog_url: CatalogUrl = None, mqtt_url: MqttUrl = None,
    nats_port: NatsPort = None, mqtt_port: MqttPort = None, http_port: HttpPort = None, host: Host = None,
) -> None:
    """Run only the ingest: broker stream -> Delta lake, exactly once."""
    from ..components import run_ingest_component
    from ..core.logs import setup_logging

    setup_logging()
    settings = _run(_settings, data_dir=data_dir, catalog_url=catalog_url, mqtt_url=mqtt_url)
    _run(run_ingest_component, settings)

@app.command()
def api(
    data_dir: DataDir = None, http_port: HttpPort = None, host: Host = None, catalog_url: CatalogUrl = None,
    nats_port: NatsPort = None, mqtt_port: MqttPort = None,
) -> None:
    """Run only the HTTP API."""
    from ..components import run_api_component
    from ..core.logs import setup_logging

    setup_logging()
    settings = _run(_settings, data_dir=data_dir, http_port=http_port, host=host, catalog_url=catalog_url)
    _run(run_api_component, settings)

@app.command()
def serve(
    data_dir: DataDir = None, serve_port: ServePort = None, host: Host = None, catalog_url: CatalogUrl = None,
    no_broker: Annotated[bool, typer.Option("--no-broker", help="REST only: no MQTT requests, no streaming.")] = False,
) -> None:
    """Run only the serving runtime: deployed models over REST, MQTT request/reply and streaming."""
    from ..components import run_serve_component
    from ..core.logs import setup_logging

    setup_logging()
    settings = _run(_settings, data_dir=data_dir, serve_port=serve_port, host=host, catalog_url=catalog_url)
    _run(run_serve_component, settings, broker=not no_broker)

@app.command()
def scheduler(data_dir: DataDir = None, catalog_url: CatalogUrl = None,
              nats_port: NatsPort = None, mqtt_port: MqttPort = None, http_port: HttpPort = None,
              host: Host = None) -> None:
    """Run only the retraining scheduler."""
    from ..core.logs import setup_logging
    from ..ml.scheduler import run_scheduler_component

    setup_logging()
    _run(run_scheduler_component, _run(_settings, data_dir=data_dir, catalog_url=catalog_url))
