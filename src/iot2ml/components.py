"""Run one component in the foreground: ``iot2ml broker``, ``iot2ml ingest``, ``iot2ml api``.

Each reads the same settings and data dir, records where it listens under ``data_dir/run/`` and
stops cleanly on SIGTERM/SIGINT, so ``iot2ml up`` can supervise them and a user can run and scale
them one by one.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from typing import Any

from .core.config import Settings
from .core.errors import BrokerUnavailable
from .core.runtime import clear_run_info, run_dir, write_run_info

log = logging.getLogger("iot2ml")


def use_metrics_dir(settings: Settings) -> None:
    """Let every process of this data dir share Prometheus metrics (must run before any metric exists)."""
    folder = run_dir(settings.data_dir) / "metrics"
    folder.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("PROMETHEUS_MULTIPROC_DIR", str(folder))


def wait_for_broker(settings: Settings, timeout: float | None = None) -> str:
    from .core.transport import find_broker

    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        try:
            return find_broker(settings.data_dir)
        except BrokerUnavailable:
            if deadline is not None and time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def run_broker_component(settings: Settings, *, fallback_ports: bool = False) -> None:
    from .broker.service import run_broker

    run_broker(settings, fallback_ports=fallback_ports)


def run_ingest_component(settings: Settings) -> None:
    import gc

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
        service = IngestService(settings, lake, catalog, nats_url=url)
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

    write_run_info(settings.data_dir, name, {"url": f"http://{settings.host}:{port}", "port": port})
    try:
        uvicorn.run(app, host=settings.host, port=port, log_level="warning", access_log=False,
                    timeout_graceful_shutdown=5)
    finally:
        clear_run_info(settings.data_dir, name)


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


def run_serve_component(settings: Settings, *, port: int | None = None, broker: bool = True) -> None:
    """The serving runtime: REST predictions, and with the broker MQTT request/reply and streaming."""

    from .core.catalog import Catalog
    from .core.runtime import claim_port
    from .serve.app import create_serve_app

    use_metrics_dir(settings)
    port = claim_port(settings.host, settings.serve_port if port is None else port, "--serve-port")

    def url() -> str:
        from .core.transport import find_broker

        return find_broker(settings.data_dir)

    catalog = Catalog(settings.catalog)
    runtime = serving_runtime(settings, catalog)
    app = create_serve_app(settings, catalog=catalog, runtime=runtime, nats_url=url if broker else None)
    try:
        _run_http(settings, "serve", app, port)
    finally:
        catalog.close()
