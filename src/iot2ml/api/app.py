"""The FastAPI app: telemetry ingest over HTTP, SQL, devices and keys admin, model deployments, metrics, health."""

from __future__ import annotations

import asyncio
import time
from contextlib import asynccontextmanager, suppress
from typing import Annotated, Any

import orjson
from fastapi import Depends, FastAPI, Header, HTTPException, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from pydantic import BaseModel, ConfigDict, Field, field_validator

from ..auth import Guard, Principal
from ..core.catalog import Catalog
from ..core.config import Settings
from ..core.errors import (
    AlreadyExists,
    AuthError,
    InvalidInput,
    Iot2mlError,
    NotFound,
    QueryError,
)
from ..core.ids import check_device_id
from ..core.storage import DEAD_LETTERS, RAW
from ..core.timeutil import now_us
from ..core.transport import telemetry_subject
from ..ingest.decode import BASE_FIELDS, Decoder, InMessage, kind_of
from ..lake import Lake

_BASE = {name for name, _ in BASE_FIELDS}


class QueryRequest(BaseModel):
    sql: str = Field(..., description="One read-only SELECT over the lake tables.", examples=["SELECT count(*) FROM raw"])


class QueryResponse(BaseModel):
    columns: list[str]
    rows: list[list[Any]]
    truncated: bool = False


class DeviceRequest(BaseModel):
    device_id: str
    type: str
    rotate: bool = False


class KeyRequest(BaseModel):
    name: str
    role: str = "admin"


class TrainRequest(BaseModel):
    task: str = Field(..., description="forecast, classify, regress or anomaly", examples=["classify"])
    table: str
    name: str
    options: dict[str, Any] = Field(default_factory=dict, description="Task options, e.g. {\"label\": \"quality\"}")
    where: str | None = None


class LabelsRequest(BaseModel):
    rows: list[dict[str, Any]]
    entity_column: str = "entity"
    label_column: str = "label"
    table: str | None = Field(None, description="Check that every entity exists in this table.")
    source: str = "api"


class DeployRequest(BaseModel):
    """What ``iot2ml deploy NAME`` takes, as JSON; an empty body serves the champion."""

    model_config = ConfigDict(extra="forbid")

    version: str | None = Field(None, description="Version number or alias to serve (default: champion).",
                                examples=["7"])
    canary: float | None = Field(None, description="% of requests for `version`; the rest stay on the primary.",
                                 examples=[10])
    bake: float | None = Field(None, description="Canary: seconds, or a duration such as \"5m\", before promotion.",
                               examples=["5m"])
    rollback_on: str | dict[str, float] | None = Field(
        None, description="Canary: thresholds that roll it back.", examples=["error_rate>0.01,p99_ms>50"])
    ab: str | dict[str, float] | None = Field(None, description="A/B weights by version, sticky per device.",
                                              examples=["6:50,7:50"])
    shadow: str | None = Field(None, description="Version that gets a copy of every request, never answers.")
    stream: str | None = Field(None, description="Device type whose arriving rows are scored (\"\" stops).")
    devices: str | None = Field(None, description="Device type whose MQTT requests without 'model' this answers.")
    reason: str = Field("", description="Why: kept in the audit trail.")

    @field_validator("version", "shadow", mode="before")
    @classmethod
    def _ref(cls, value: Any) -> Any:
        return str(value) if isinstance(value, int) and not isinstance(value, bool) else value

    @field_validator("bake", mode="before")
    @classmethod
    def _duration(cls, value: Any) -> Any:
        if isinstance(value, str):
            from ..core.timeutil import parse_duration

            try:
                return parse_duration(value)
            except InvalidInput as err:
                raise ValueError(str(err)) from None
        return value

    @field_validator("ab", mode="before")
    @classmethod
    def _weights(cls, value: Any) -> Any:
        if isinstance(value, dict):  # {"6": 50, "7": 50}
            return ",".join(f"{ref}:{weight}" for ref, weight in value.items())
        return value


class ReasonRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    reason: str = Field("", description="Why: kept in the audit trail.")


class _Schemas:
    """Column kinds of the curated tables, re-read from the lake at most every few seconds."""

    def __init__(self, lake: Lake, ttl: float = 5.0) -> None:
        self.lake = lake
        self.ttl = ttl
        self._at = 0.0
        self._value: dict[str, dict[str, str]] = {}

    def get(self) -> dict[str, dict[str, str]]:
        if time.monotonic() - self._at > self.ttl:
            out: dict[str, dict[str, str]] = {}
            for table in self.lake.tables():
                if table in (RAW, DEAD_LETTERS):
                    continue
                schema = self.lake.schema(table)
                if schema is not None:
                    out[table] = {f.name: kind_of(f.type) for f in schema if f.name not in _BASE}
            self._value, self._at = out, time.monotonic()
        return self._value


def _bearer(authorization: str | None = Header(None, description="Bearer <device token or API key>")) -> str | None:
    if authorization and authorization.lower().startswith("bearer "):
        return authorization[7:].strip()
    return None


Token = Annotated[str | None, Depends(_bearer)]


def _admin(request: Request, token: Token) -> Principal:
    return request.app.state.guard.key(token, role="admin")


def _reader(request: Request, token: Token) -> Principal:
    return request.app.state.guard.key(token, role="reader")


Admin = Annotated[Principal, Depends(_admin)]
"""An admin API key (writes)."""
Reader = Annotated[Principal, Depends(_reader)]
"""Any API key (reads)."""


def create_app(settings: Settings, *, nats_url: str | None = None, lake: Lake | None = None,
               catalog: Catalog | None = None) -> FastAPI:
    """Build the app. ``nats_url`` is where telemetry is published (the broker's service URL)."""
    catalog = catalog or Catalog(settings.catalog)
    lake = lake or Lake(settings.lake, settings.lake_storage_options)
    guard = Guard(catalog)
    schemas = _Schemas(lake)
    state: dict[str, Any] = {}

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        import nats

        if nats_url:
            state["nc"] = await nats.connect(nats_url, name="iot2ml-api", max_reconnect_attempts=-1,
                                             reconnect_time_wait=0.5)
            state["js"] = state["nc"].jetstream()
        yield
        if "nc" in state:  # the broker may be gone already: do not wait on it for ever
            with suppress(Exception):  # shutting down anyway
                await asyncio.wait_for(state["nc"].close(), 3)

    app = FastAPI(
        title="iot2ml",
        version="0.1.0",
        description="Telemetry in, SQL out. Devices authenticate with their token, people and scripts with API keys.",
        lifespan=lifespan,
    )
    app.state.guard = guard

    @app.exception_handler(Iot2mlError)
    async def _errors(_request: Request, err: Iot2mlError) -> JSONResponse:
        status = 400
        if isinstance(err, AuthError):
            status = 401
        elif isinstance(err, NotFound):
            status = 404
        elif isinstance(err, AlreadyExists):
            status = 409
        return JSONResponse({"detail": str(err)}, status_code=status)

    @app.exception_handler(PermissionError)
    async def _forbidden(_request: Request, err: PermissionError) -> JSONResponse:
        return JSONResponse({"detail": str(err)}, status_code=403)


    @app.post(
        "/api/v1/devices/{device_id}/telemetry",
        status_code=201,
        summary="Send readings from a device",
        responses={400: {"description": "Bad payload: every problem is listed"}, 401: {}, 403: {}, 413: {}},
    )
    async def post_telemetry(
        device_id: str,
        request: Request,
        token: Token,
        idempotency_key: str | None = Header(None, description="Resends with the same key are stored once (2 min)."),
    ) -> dict[str, Any]:
        check_device_id(device_id)
        who = guard.device(token, device_id)
        limit = settings.max_payload_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise HTTPException(413, f"body is {declared} bytes, over max_payload_bytes={limit}")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise HTTPException(413, f"body is over max_payload_bytes={limit}")
        data = bytes(body)
        decoder = Decoder(lambda _d: who.role, schemas=schemas.get(), max_payload_bytes=limit, dedup_window=0)
        decoded = decoder.decode([InMessage(0, telemetry_subject(device_id), now_us(), data)])
        if decoded.dead:
            reasons = decoded.dead_letters["reason"].to_pylist()
            raise HTTPException(400, {"error": "nothing was stored: fix these and resend", "reasons": reasons})
        if "js" not in state:
            raise HTTPException(503, "the API is not connected to the broker")
        headers = {"Nats-Msg-Id": f"{device_id}:{idempotency_key}"} if idempotency_key else None
        try:
            await state["js"].publish(telemetry_subject(device_id), data, headers=headers, timeout=5)
        except Exception as err:
            raise HTTPException(503, f"broker did not confirm the write, retry: {err}") from err
        return {"accepted": decoded.readings}

    @app.post("/api/v1/query", response_model=QueryResponse, summary="Run one read-only SQL query")
    async def post_query(req: QueryRequest, _who: Reader) -> Response:
        from ..query import run_query

        try:
            result = await asyncio.to_thread(
                run_query, lake, req.sql, timeout=settings.query_timeout, max_rows=settings.query_max_rows
            )
        except QueryError as err:
            raise HTTPException(400, str(err)) from None
        payload = {"columns": result.columns, "rows": result.rows, "truncated": result.truncated}
        return Response(orjson.dumps(payload, default=str, option=orjson.OPT_SERIALIZE_NUMPY),
                        media_type="application/json")

    @app.get("/api/v1/tables", summary="Tables in the lake with their columns")
    async def get_tables(_who: Reader) -> list[dict[str, Any]]:
        from ..query import list_tables

        return await asyncio.to_thread(list_tables, lake)

    @app.get("/api/v1/devices", summary="Registered devices")
    async def get_devices(_who: Admin) -> list[dict[str, Any]]:
        devices = await asyncio.to_thread(catalog.list_devices)
        return [{"device_id": d.device_id, "type": d.type, "active": d.active} for d in devices]

    @app.post("/api/v1/devices", status_code=201, summary="Register a device; answers its token once")
    async def post_device(req: DeviceRequest, _who: Admin) -> dict[str, str]:
        token = await asyncio.to_thread(catalog.add_device, req.device_id, req.type, rotate=req.rotate)
        return {"device_id": req.device_id, "token": token}

    @app.delete("/api/v1/devices/{device_id}", status_code=204, summary="Revoke a device")
    async def delete_device(device_id: str, _who: Admin) -> Response:
        await asyncio.to_thread(catalog.remove_device, device_id)
        return Response(status_code=204)

    @app.post("/api/v1/keys", status_code=201, summary="Create an API key; answers it once")
    async def post_key(req: KeyRequest, _who: Admin) -> dict[str, str]:
        key = await asyncio.to_thread(catalog.add_key, req.name, req.role)
        return {"name": req.name, "key": key}

    def workbench() -> Any:
        if "workbench" not in state:
            from ..ml.workbench import Workbench

            state["workbench"] = Workbench(settings)
        return state["workbench"]

    @app.post("/api/v1/train", status_code=201, summary="Train and register a model (runs to completion)")
    async def post_train(req: TrainRequest, _who: Admin) -> dict[str, Any]:
        from ..ml.jobs import TrainJob

        job = TrainJob(task=req.task, table=req.table, name=req.name, options=req.options, where=req.where)
        return await asyncio.to_thread(workbench().train, job)

    @app.get("/api/v1/models", summary="Registered models: versions, aliases, metrics vs baseline")
    async def get_models(_who: Reader) -> list[dict[str, Any]]:
        return await asyncio.to_thread(workbench().models)

    @app.post("/api/v1/labels", status_code=201, summary="Add labels (all rows or none)")
    async def post_labels(req: LabelsRequest, who: Admin) -> dict[str, int]:
        n = await asyncio.to_thread(workbench().import_labels, req.rows, entity_column=req.entity_column,
                                    label_column=req.label_column, table=req.table, source=req.source,
                                    who=who.name)
        return {"imported": n}

    def deployments() -> Any:
        if "deployments" not in state:
            from ..serve.deployments import Deployments

            state["deployments"] = Deployments(catalog)
        return state["deployments"]

    def _deployed(name: str) -> dict[str, Any]:
        from ..serve.control import summary

        spec = deployments().get(name)
        if spec is None:
            raise NotFound(f"model {name!r} is not deployed: see GET /api/v1/deployments")
        return {**summary(spec), "events": deployments().events(name, limit=20)}

    @app.get("/api/v1/deployments", summary="Deployed models: variants, shares, stream and device bindings")
    async def get_deployments(_who: Reader) -> list[dict[str, Any]]:
        from ..serve.control import summary

        return [summary(d) for d in await asyncio.to_thread(deployments().list)]

    @app.get("/api/v1/deployments/{name}", summary="One deployment and its latest audit events",
             responses={404: {"description": "Not deployed"}})
    async def get_deployment(name: str, _who: Reader) -> dict[str, Any]:
        return await asyncio.to_thread(_deployed, name)

    @app.put("/api/v1/deployments/{name}", summary="Deploy a model: champion, a version, canary, A/B, shadow",
             responses={400: {"description": "Options that do not fit together; the reason says which"},
                        404: {"description": "No such model, version, alias or device type"},
                        409: {"description": "The device type is bound to another deployment"}})
    async def put_deployment(name: str, who: Admin, req: DeployRequest | None = None) -> dict[str, Any]:
        from ..serve.control import deploy

        req = req or DeployRequest()

        def apply() -> dict[str, Any]:
            return deploy(deployments(), catalog, workbench().registry.client, name, who=f"api:{who.name}",
                          version=req.version, canary=req.canary, bake_seconds=req.bake,
                          rollback_on=req.rollback_on, ab=req.ab, shadow=req.shadow, stream=req.stream,
                          devices=req.devices, reason=req.reason)

        return await asyncio.to_thread(apply)

    @app.post("/api/v1/deployments/{name}/rollback", summary="Restore the state before the last change",
              responses={404: {"description": "Not deployed, or nothing to roll back to"}})
    async def post_rollback(name: str, who: Admin, req: ReasonRequest | None = None) -> dict[str, Any]:
        from ..serve.control import summary

        restored = await asyncio.to_thread(deployments().rollback, name, who=f"api:{who.name}",
                                           reason=req.reason if req else "")
        return {**summary(restored), "action": "rollback"}

    @app.delete("/api/v1/deployments/{name}", status_code=204, summary="Stop serving a model (history stays)",
                responses={404: {"description": "Not deployed"}})
    async def delete_deployment(name: str, who: Admin) -> Response:
        await asyncio.to_thread(deployments().remove, name, who=f"api:{who.name}")
        return Response(status_code=204)

    @app.get("/metrics", summary="Prometheus metrics of every iot2ml process on this data dir",
             response_class=PlainTextResponse)
    async def get_metrics() -> Response:
        from .metrics import render

        body, content_type = render()
        return Response(body, media_type=content_type)

    @app.get("/healthz", summary="Liveness and broker connection")
    async def healthz() -> dict[str, Any]:
        nc = state.get("nc")
        return {"ok": True, "broker": bool(nc and nc.is_connected)}

    from ..serve.app import PREDICT_SCHEMA

    @app.post(
        "/api/v1/models/{name}/predict",
        summary="Predict with a deployed model (forwarded to the serving runtime)",
        openapi_extra={"requestBody": {"required": True, "content": {"application/json": {"schema": PREDICT_SCHEMA}}}},
        responses={200: {"description": "{predictions, model, version, variant, request_id}"}, 401: {}, 404: {},
                   413: {}, 422: {"description": "An instance lacks, adds or mistypes a field: named in detail"},
                   503: {"description": "The serving runtime is not running, or the model failed"}},
    )
    async def forward_predict(name: str, request: Request) -> Response:
        """One URL for everything: the API hands predictions to the serving process (``iot2ml serve``,
        started by ``up``). Clients that want the lowest latency call the serving port directly."""
        import httpx

        from ..core.runtime import read_run_info

        try:
            target = read_run_info(settings.data_dir, "serve")["url"]
        except (Iot2mlError, KeyError):
            return JSONResponse({"detail": "the serving runtime is not running: 'iot2ml up' starts it, "
                                           "or run 'iot2ml serve'"}, status_code=503)
        if "http" not in state:
            state["http"] = httpx.AsyncClient(timeout=30)
        headers = {k: v for k, v in request.headers.items()
                   if k.lower() in ("authorization", "content-type", "x-request-id")}
        try:
            answer = await state["http"].post(f"{target}/api/v1/models/{name}/predict",
                                              content=await request.body(), headers=headers)
        except httpx.HTTPError as err:
            return JSONResponse({"detail": f"the serving runtime did not answer: {err}"}, status_code=503)
        return Response(answer.content, status_code=answer.status_code,
                        media_type=answer.headers.get("content-type", "application/json"))

    return app
