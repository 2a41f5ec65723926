"""The serving process's app (``iot2ml serve``): the predict routes of ``serve.http`` over its own
runtime, plus MQTT request/reply and streaming deployments when it is given the broker.

The same pieces as the API's app (``core.http`` for who is calling, errors and ``/metrics``;
``serve.http`` for the routes), composed for a process that does nothing but answer predictions.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI

from ..auth import Guard
from ..auth.audit import AuditLog
from ..auth.limits import Limits
from ..auth.users import TokenPolicy
from ..core.catalog import Catalog
from ..core.config import Settings
from ..core.http import (
    PERMISSION_KEY,
    PUBLIC,
    Credentials,
    Principal,
    add_metrics_route,
    document_permissions,
    install_audit,
    install_error_handlers,
    provide,
)
from ..core.runtime import control_token
from ..serve.http import Serving, predict_router
from ..serve.runtime import ServingRuntime

log = logging.getLogger("iot2ml.serve")


def create_serve_app(settings: Settings, *, catalog: Catalog, runtime: ServingRuntime,
                     nats_url: str | Callable[[], str] | None = None) -> FastAPI:
    """The app of ``iot2ml serve``. With ``nats_url`` (a URL or a function giving one) it also answers
    MQTT requests and runs the streaming deployments."""
    guard = Guard(catalog, control=control_token(settings.data_dir), policy=TokenPolicy.from_settings(settings),
                  limits=Limits.from_settings(settings))
    audit = AuditLog(getattr(runtime, "lake", None), component="serve")  # refusals and refreshes
    channels: dict[str, Any] = {}

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        audit.start()
        await runtime.start()
        if nats_url is not None:
            from ..serve.mqtt import run_device_channels

            channels["stop"] = asyncio.Event()
            def admit(device: str, nbytes: int) -> None:  # a device's MQTT requests count as its HTTP ones
                who = Principal("device", device, "")
                guard.limits.admit(who)
                guard.limits.charge(who, nbytes)

            channels["task"] = asyncio.create_task(run_device_channels(settings, runtime, guard.devices, nats_url,
                                                                       channels["stop"], admit=admit))
        try:
            yield
        finally:
            if "stop" in channels:
                channels["stop"].set()
                try:
                    await asyncio.wait_for(channels["task"], 5)
                except Exception as err:  # noqa: BLE001 - shutting down anyway
                    log.debug("device channels did not stop cleanly: %s", err)
            await runtime.stop()
            await asyncio.to_thread(audit.stop)

    app = FastAPI(title="iot2ml serving", version="0.1.0", lifespan=lifespan,
                  description="Predictions from deployed models. Devices authenticate with their token, "
                              "scripts with API keys, people with an access token (POST /api/v1/auth/login "
                              "on the API port).")
    install_error_handlers(app)
    install_audit(app, audit, skip=frozenset({"/api/v1/models/{name}/predict"}))
    provide(app, guard, as_type=Credentials)
    provide(app, Serving(runtime, settings.max_payload_bytes, component="serve"))
    app.include_router(predict_router)

    @app.get("/healthz", summary="Liveness", openapi_extra={PERMISSION_KEY: PUBLIC})
    async def healthz() -> dict[str, Any]:
        return {"ok": runtime.ready.is_set(), "deployments": runtime.deployed()}

    add_metrics_route(app)
    document_permissions(app)
    app.state.runtime = runtime
    return app
