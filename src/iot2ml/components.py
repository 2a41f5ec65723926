"""The platform's components, one row each, and their runners.

``COMPONENTS`` is the table ``iot2ml up`` loops over (start order, readiness, ports, what a child
gets when ``up`` dies, the banner) and the CLI makes one command of each, ``iot2ml <name>``, with
the options every component shares. A component is ready once it has written its run file
``data_dir/run/<name>.json`` (with its pid); it stops cleanly on SIGTERM/SIGINT. Adding a
component is one ``Component(...)`` row plus its runner.

>>> [c.name for c in COMPONENTS]
['broker', 'ingest', 'api', 'scheduler', 'serve', 'monitor']
>>> [[c.name for c in stage] for stage in start_stages()]
[['broker'], ['ingest', 'api', 'scheduler', 'serve', 'monitor']]
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .core.config import Settings
from .core.runtime import clear_run_info, run_dir, write_run_info

log = logging.getLogger("iot2ml")


@dataclass(frozen=True)
class Port:
    """A port a component listens on: the setting that holds it and the flag that changes it."""

    setting: str
    flag: str
    when: str | None = None
    """A setting that must be true for the port to be used (e.g. ``tls_on``); ``None``: always."""


@dataclass(frozen=True)
class Endpoint:
    """A line of ``up``'s banner: ``url`` is formatted with the settings (``{host}``, ``{mqtt_port}``...)."""

    key: str
    label: str
    url: str
    note: str = ""
    when: str | None = None
    """A setting that must be true for the line to be shown; ``None``: always."""


@dataclass(frozen=True)
class Switch:
    """An on/off option only this component takes, passed to its runner as keyword ``name``."""

    name: str
    flag: str
    help: str


@dataclass(frozen=True)
class Component:
    """One row of the platform: what runs, in which order, on which ports, and how it dies with ``up``."""

    name: str
    help: str
    run: Callable[..., None]
    """``run(settings, **switches)``: runs in the foreground until SIGTERM/SIGINT."""
    stage: int
    """``up`` starts stage by stage, each once the previous one is ready, and stops in reverse."""
    death_signal: signal.Signals
    """What the child gets when ``up`` dies, even by SIGKILL (PR_SET_PDEATHSIG)."""
    ports: tuple[Port, ...] = ()
    endpoints: tuple[Endpoint, ...] = ()
    switches: tuple[Switch, ...] = ()


def active_ports(settings: Settings, components: tuple[Component, ...] | None = None) -> list[Port]:
    """The ports ``settings`` use (those whose ``when`` holds)."""
    components = COMPONENTS if components is None else components
    return [p for c in components for p in c.ports if p.when is None or getattr(settings, p.when)]


def start_stages(components: tuple[Component, ...] | None = None) -> list[list[Component]]:
    """The components grouped by stage, in start order (stop order is the reverse)."""
    components = COMPONENTS if components is None else components
    stages = sorted({c.stage for c in components})
    return [[c for c in components if c.stage == s] for s in stages]


def component(name: str) -> Component:
    """The row named ``name``."""
    for c in COMPONENTS:
        if c.name == name:
            return c
    raise KeyError(f"no component {name!r}: one of {', '.join(c.name for c in COMPONENTS)}")


def use_metrics_dir(settings: Settings) -> None:
    """Let every process of this data dir share Prometheus metrics (must run before any metric exists)."""
    folder = run_dir(settings.data_dir) / "metrics"
    folder.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("PROMETHEUS_MULTIPROC_DIR", str(folder))


def wait_for_broker(settings: Settings, timeout: float | None = None) -> str:
    """The broker's service URL, waiting up to ``timeout`` seconds (``None``: for ever) for it to start."""
    from .core.transport import find_broker

    return find_broker(settings.data_dir, wait=timeout)


def run_broker_component(settings: Settings, *, fallback_ports: bool = False) -> None:
    from .auth.ca import platform_ca, server_tls_files
    from .auth.certs import Certificates
    from .auth.store import Devices
    from .broker.service import run_broker
    from .core.catalog import Catalog

    catalog = Catalog(settings.catalog)
    try:
        tls = {"certs": Certificates(catalog, platform_ca(settings)), "tls_files": server_tls_files(settings)} \
            if settings.tls_on else {}
        run_broker(settings, Devices(catalog), fallback_ports=fallback_ports, **tls)
    finally:
        catalog.close()


def run_ingest_component(settings: Settings) -> None:
    import gc

    from .auth.store import Devices
    from .core.catalog import Catalog
    from .ingest.service import IngestService
    from .lake import Lake, Maintainer

    use_metrics_dir(settings)
    lake = Lake(settings.lake, settings.lake_storage_options)
    catalog = Catalog(settings.catalog)

    def url() -> str:
        from .core.transport import find_broker

        return find_broker(settings.data_dir)  # raises while no broker is up; the ingest retries

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        service = IngestService(settings, lake, Devices(catalog), nats_url=url)
        tasks = [asyncio.create_task(service.run(stop))]
        if settings.mqtt_url:
            from .ingest.bridge import run_bridge

            tasks.append(asyncio.create_task(run_bridge(settings, url, stop)))
        write_run_info(settings.data_dir, "ingest", {"lake": settings.lake})
        try:
            await asyncio.gather(*tasks)
        finally:
            clear_run_info(settings.data_dir, "ingest")

    # Each batch allocates hundreds of thousands of short-lived dicts: collecting the young
    # generation every 700 allocations would cost a third of the decode time.
    gc.set_threshold(200_000, 50, 1000)
    try:
        with Maintainer(lake, settings):  # compaction, checkpoints, vacuum, retention in the background
            asyncio.run(main())
    finally:
        catalog.close()


def _run_http(settings: Settings, name: str, app: Any, port: int) -> None:
    """Serve ``app`` with uvicorn on ``port``, recorded as component ``name`` in the run dir meanwhile."""
    import uvicorn

    def stop(*_: Any) -> None:
        raise SystemExit(0)

    # uvicorn shuts down gracefully on SIGTERM, then raises it again for the handler found before it:
    # exit through ours, so the run file below is removed.
    signal.signal(signal.SIGTERM, stop)
    tls: dict[str, Any] = {}
    info: dict[str, Any] = {"url": f"http://{settings.host}:{port}", "port": port}
    if settings.tls_on:  # HTTPS only: the plain port is off
        from .auth.ca import server_tls_files

        cert, key, bundle = server_tls_files(settings)
        tls = {"ssl_certfile": str(cert), "ssl_keyfile": str(key)}
        info = {"url": f"https://{settings.host}:{port}", "port": port,
                "ca_file": None if settings.tls_cert_file else str(bundle)}

    class Server(uvicorn.Server):
        async def startup(self, sockets: Any = None) -> None:
            await super().startup(sockets=sockets)
            if self.started:  # ready = listening (a TLS listener takes a moment more to load)
                write_run_info(settings.data_dir, name, info)

    server = Server(uvicorn.Config(app, host=settings.host, port=port, log_level="warning", access_log=False,
                                   timeout_graceful_shutdown=5, **tls))
    try:
        server.run()
    finally:
        clear_run_info(settings.data_dir, name)
    if not server.started:
        raise SystemExit(3)  # as uvicorn.run: the app or the port failed at startup (logged above)


def run_api_component(settings: Settings, *, port: int | None = None) -> None:

    from .api import create_app
    from .core.runtime import claim_port

    use_metrics_dir(settings)
    port = claim_port(settings.host, settings.http_port if port is None else port, "--http-port")
    app = create_app(settings, nats_url=wait_for_broker(settings))
    _run_http(settings, "api", app, port)


def serving_runtime(settings: Settings, catalog: Any) -> Any:
    """A ``ServingRuntime`` over this data dir's model registry and lake."""
    from .lake import Lake
    from .ml.registry import Registry, tracking_uri_for
    from .serve.runtime import ServingRuntime

    registry = Registry(tracking_uri_for(settings.data_dir, settings.mlflow_tracking_uri),
                        artifact_root=settings.mlflow_artifact_root
                        or str((settings.data_dir / "mlartifacts").absolute()))
    return ServingRuntime(settings, catalog, registry=registry, lake=Lake(settings.lake, settings.lake_storage_options))


def run_serve_component(settings: Settings, *, port: int | None = None, no_broker: bool = False) -> None:
    """The serving runtime: REST predictions, and with the broker MQTT request/reply and streaming."""

    from .api import create_serve_app
    from .core.catalog import Catalog
    from .core.runtime import claim_port

    use_metrics_dir(settings)
    port = claim_port(settings.host, settings.serve_port if port is None else port, "--serve-port")

    def url() -> str:
        from .core.transport import find_broker

        return find_broker(settings.data_dir)

    catalog = Catalog(settings.catalog)
    runtime = serving_runtime(settings, catalog)
    app = create_serve_app(settings, catalog=catalog, runtime=runtime, nats_url=None if no_broker else url)
    try:
        _run_http(settings, "serve", app, port)
    finally:
        catalog.close()


def run_scheduler_component(settings: Settings) -> None:
    """The retraining scheduler: runs the due schedules until stopped."""
    from .ml.scheduler import run_scheduler_component as run

    run(settings)


def run_monitor_component(settings: Settings) -> None:
    """The alert monitor: evaluates the alert rules over the lake and notifies, until SIGTERM/SIGINT."""
    import threading

    from .core.catalog import Catalog
    from .lake import Lake
    from .monitor.service import Monitor
    from .monitor.store import AlertRules, Notifiers
    from .auth.store import Devices
    from .wiring import ModelOps

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    catalog = Catalog(settings.catalog)
    try:
        monitor = Monitor(settings, Lake(settings.lake, settings.lake_storage_options), AlertRules(catalog),
                          Notifiers(catalog), models=ModelOps(settings, catalog), devices=Devices(catalog))
        write_run_info(settings.data_dir, "monitor", {"lake": settings.lake})
        try:
            monitor.run(stop)
        finally:
            clear_run_info(settings.data_dir, "monitor")
    finally:
        catalog.close()


# The ingest, the broker and the monitor stop gracefully when ``up`` dies (flush, stop nats-server,
# deliver queued notifications); the API and the scheduler hold nothing unacknowledged, and a graceful
# uvicorn shutdown can wait on a broker that is gone: they are killed outright.
COMPONENTS: tuple[Component, ...] = (
    Component(
        "broker", "Run only the embedded broker (NATS with MQTT and JetStream).",
        run_broker_component, stage=0, death_signal=signal.SIGTERM,
        ports=(Port("nats_port", "--nats-port"), Port("mqtt_port", "--mqtt-port", when="mqtt_plain_on"),
               Port("mqtts_port", "--mqtts-port", when="tls_on")),
        endpoints=(Endpoint("mqtt", "MQTT", "mqtt://{host}:{mqtt_port}",
                            "topic devices/<id>/telemetry, user <id>, password <token>", when="mqtt_plain_on"),
                   Endpoint("mqtts", "MQTTS", "mqtts://{host}:{mqtts_port}",
                            "client certificate from 'iot2ml devices add <id> --cert'", when="tls_on"),
                   Endpoint("nats", "NATS", "nats://{host}:{nats_port}")),
    ),
    Component(
        "ingest", "Run only the ingest: broker stream -> Delta lake, exactly once.",
        run_ingest_component, stage=1, death_signal=signal.SIGTERM,
    ),
    Component(
        "api", "Run only the HTTP API.",
        run_api_component, stage=1, death_signal=signal.SIGKILL,
        ports=(Port("http_port", "--http-port"),),
        endpoints=(Endpoint("ui", "UI", "{http_scheme}://{host}:{http_port}/ui", "sign in with a user: 'iot2ml users add'"),
                   Endpoint("http", "HTTP API", "{http_scheme}://{host}:{http_port}",
                            "docs {http_scheme}://{host}:{http_port}/docs"),
                   Endpoint("metrics", "metrics", "{http_scheme}://{host}:{http_port}/metrics")),
    ),
    Component(
        "scheduler", "Run only the retraining scheduler.",
        run_scheduler_component, stage=1, death_signal=signal.SIGKILL,
    ),
    Component(
        "serve", "Run only the serving runtime: deployed models over REST, MQTT request/reply and streaming.",
        run_serve_component, stage=1, death_signal=signal.SIGTERM,
        ports=(Port("serve_port", "--serve-port"),),
        endpoints=(Endpoint("serve", "predict", "{http_scheme}://{host}:{serve_port}",
                            "/api/v1/models/<name>/predict after 'iot2ml deploy <name>'"),),
        switches=(Switch("no_broker", "--no-broker", "REST only: no MQTT requests, no streaming."),),
    ),
    Component(
        "monitor", "Run only the alert monitor: evaluates the alert rules over the lake and notifies.",
        run_monitor_component, stage=1, death_signal=signal.SIGTERM,
    ),
)
