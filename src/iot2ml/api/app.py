"""The API process's app, composed from the routers each module exposes.

=========================  ==========================================================================
``serve.http``             ``POST /api/v1/models/{name}/predict``, ``/api/v1/serving`` (this process's
                           own runtime: see ``docs/decisions/0009-predictions-on-the-api-port.md``)
``ingest.http``            ``POST /api/v1/devices/{device_id}/telemetry``
``query.http``             ``POST /api/v1/query``, ``GET /api/v1/tables``
``auth.http``              ``/api/v1/auth`` (login, refresh, logout), ``/api/v1/users``, ``/api/v1/keys``,
                           ``/api/v1/devices``, ``GET /api/v1/audit``
``ml.http``                ``POST /api/v1/train``, ``GET /api/v1/models``, ``POST /api/v1/labels``
``serve.http``             ``/api/v1/deployments`` (changes wait for the serving processes)
``monitor.http``           ``/api/v1/notifiers`` (add, list, remove, test), ``/api/v1/alerts`` (rules, history,
                           ack, silence)
``core.http``              who is calling and the permission each route declares, the status of each
                           error, the audit of writes and refusals (rows: ``auth.audit``), ``GET /metrics``
=========================  ==========================================================================

Each router gets what it needs as one small object (``core.http.provide``); this module builds
them from the settings, and owns the broker connection telemetry is published on.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from contextlib import asynccontextmanager, suppress
from typing import Any

from fastapi import Depends, FastAPI
from fastapi.responses import RedirectResponse

from ..auth import Guard
from ..auth.audit import AuditLog, read_audit
from ..auth.ca import platform_ca
from ..auth.certs import Certificates
from ..auth.http import AuthHTTP
from ..auth.http import router as auth_router
from ..auth.limits import Limits
from ..auth.roles import allows
from ..auth.store import Devices
from ..auth.users import TokenPolicy
from ..core.catalog import Catalog
from ..core.config import Settings
from ..core.errors import BrokerUnavailable
from ..core.http import (
    PERMISSION_KEY,
    PUBLIC,
    Credentials,
    add_metrics_route,
    document_permissions,
    install_audit,
    install_error_handlers,
    known_query_only,
    provide,
)
from ..core.runtime import control_token, poke_component
from ..core.tables import AUDIT
from ..ingest.http import Schemas, TelemetryHTTP
from ..ingest.http import router as telemetry_router
from ..lake import Lake
from ..ml.http import MLHTTP
from ..ml.http import router as ml_router
from ..monitor.http import AlertsHTTP, NotifiersHTTP
from ..monitor.http import router as notifiers_router
from ..monitor.store import AlertRules, Notifiers
from ..query.http import QueryHTTP
from ..query.http import router as query_router
from ..serve.deployments import Deployments
from ..serve.http import DeploymentsControl, Serving, deployments_router, predict_router
from ..serve.runtime import ServingRuntime
from ..wiring import ModelOps

log = logging.getLogger("iot2ml.api")


class _Broker:
    """The API's connection to the broker, over which telemetry is published (JetStream-acked)."""

    def __init__(self, url: str | None) -> None:
        self.url = url
        self.nc: Any = None
        self.js: Any = None

    async def connect(self) -> None:
        if self.url:
            import nats

            self.nc = await nats.connect(self.url, name="iot2ml-api", max_reconnect_attempts=-1,
                                         reconnect_time_wait=0.5)
            self.js = self.nc.jetstream()

    async def close(self) -> None:
        if self.nc is not None:  # the broker may be gone already: do not wait on it for ever
            with suppress(Exception):  # shutting down anyway
                await asyncio.wait_for(self.nc.close(), 3)

    @property
    def connected(self) -> bool:
        return bool(self.nc and self.nc.is_connected)

    async def publish(self, subject: str, data: bytes, headers: dict[str, str] | None) -> None:
        if self.js is None:
            raise BrokerUnavailable("the API is not connected to the broker: start it ('iot2ml up' or 'iot2ml broker')")
        try:
            await self.js.publish(subject, data, headers=headers, timeout=5)
        except Exception as err:
            raise BrokerUnavailable(f"the broker did not confirm the write, retry: {err}") from err


class _LazyRegistry:
    """The workbench's model registry, built on first use: MLflow takes a second or two to import,
    and an API nobody asks for predictions or models need not pay it."""

    def __init__(self, get: Callable[[], Any]) -> None:
        self._get = get

    def __getattr__(self, name: str) -> Any:
        return getattr(self._get(), name)


def create_app(settings: Settings, *, nats_url: str | None = None, lake: Lake | None = None,
               catalog: Catalog | None = None, runtime: ServingRuntime | None = None) -> FastAPI:
    """Build the app. ``nats_url`` is where telemetry is published (the broker's service URL);
    ``runtime`` answers predictions (default: one of its own that loads models on first request
    and leaves the canary judge to ``iot2ml serve``)."""
    catalog = catalog or Catalog(settings.catalog)
    lake = lake or Lake(settings.lake, settings.lake_storage_options)
    guard = Guard(catalog, control=control_token(settings.data_dir), policy=TokenPolicy.from_settings(settings),
                  limits=Limits.from_settings(settings))
    audit = AuditLog(lake, component="api")
    broker = _Broker(nats_url)
    benches: list[Any] = []
    building = threading.Lock()  # first used from worker threads, maybe two at once

    def workbench() -> Any:
        with building:
            if not benches:
                from ..ml.workbench import Workbench

                benches.append(Workbench(settings))
        return benches[0]

    if runtime is None:
        runtime = ServingRuntime(settings, catalog, registry=_LazyRegistry(lambda: workbench().registry), lake=lake,
                                 lazy=True, judge=False)

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        audit.start()
        await broker.connect()
        await runtime.start()
        try:
            yield
        finally:
            await runtime.stop()
            await broker.close()
            await asyncio.to_thread(audit.stop)

    app = FastAPI(
        title="iot2ml",
        version="0.1.0",
        description="Telemetry in, SQL out, predictions. Devices authenticate with their token, scripts "
                    "with API keys, people with an access token from POST /api/v1/auth/login. Each route "
                    "declares the permission it needs (x-permission); roles grant them.",
        lifespan=lifespan,
        dependencies=[Depends(known_query_only)],
    )
    install_error_handlers(app)
    install_audit(app, audit, skip=frozenset({"/api/v1/devices/{device_id}/telemetry", "/api/v1/models/{name}/predict"}))
    provide(app, guard, as_type=Credentials)
    provide(app, Serving(runtime, settings.max_payload_bytes, component="api"))
    provide(app, TelemetryHTTP(settings.max_payload_bytes, broker.publish, Schemas(lake)))
    provide(app, QueryHTTP(lake, settings.query_timeout, settings.query_max_rows,
                           hidden_for=lambda who: () if allows(who.role, "audit:read") else (AUDIT,)))
    provide(app, AuthHTTP(guard.devices, guard.keys, guard.users, guard.forget,
                          audit=lambda since, limit: read_audit(lake, since, limit),
                          certs=Certificates(catalog, platform_ca(settings)),
                          poke_broker=lambda: poke_component(settings.data_dir, "broker")))
    provide(app, MLHTTP(workbench))
    provide(app, DeploymentsControl(Deployments(catalog), guard.devices, lambda: workbench().registry,
                                    settings.data_dir, runtime=runtime, component="api"))
    provide(app, NotifiersHTTP(Notifiers(catalog)))
    provide(app, AlertsHTTP(AlertRules(catalog), lake, ModelOps(settings, catalog), Devices(catalog)))
    # The predict route first: the route most requests take is matched first.
    for router in (predict_router, telemetry_router, query_router, auth_router, ml_router, deployments_router,
                   notifiers_router):
        app.include_router(router)
    add_metrics_route(app)
    document_permissions(app)

    @app.get("/healthz", summary="Liveness and broker connection", openapi_extra={PERMISSION_KEY: PUBLIC})
    async def healthz() -> dict[str, Any]:
        return {"ok": True, "broker": broker.connected}

    @app.get("/", summary="The web UI (redirect to /ui/)", openapi_extra={PERMISSION_KEY: PUBLIC},
             response_class=RedirectResponse, status_code=307,
             responses={200: {"description": "The UI's page, after the redirect", "content": {"text/html": {}}}})
    async def root() -> RedirectResponse:
        return RedirectResponse("/ui/")

    _mount_ui(app, settings, guard)
    app.state.runtime = runtime
    app.state.audit = audit
    return app


def _mount_ui(app: FastAPI, settings: Settings, guard: Guard) -> None:
    """The Dash UI (``ui/``) on this port under ``/ui``, with this process's users and permissions."""
    from a2wsgi import WSGIMiddleware

    from ..ui import UIDeps, create_ui

    def devices() -> list[dict[str, Any]]:
        return [{"device_id": d.device_id, "type": d.type, "active": d.active} for d in guard.devices.list_devices()]

    ui = create_ui(UIDeps(login=lambda user, password, address: guard.users.login(user, password, address=address),
                          authorize=guard.authorize, devices=devices, secure=settings.tls_on))
    app.mount("/ui", WSGIMiddleware(ui.server))
