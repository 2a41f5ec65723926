"""The serving process's HTTP face: ``POST /api/v1/models/{name}/predict`` and what is deployed.

The predict route reads the body itself (orjson, a size limit before parsing) instead of letting
FastAPI build pydantic objects per request: that is most of a request's cost at thousands per
second. Every client error is a 4xx naming the field; a model that fails answers 503.
"""

from __future__ import annotations

import asyncio
import logging
from contextlib import asynccontextmanager
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response

from ..core.errors import AuthError, InvalidInput, Iot2mlError, NotFound
from .runtime import ModelFailed, ServingRuntime

log = logging.getLogger("iot2ml.serve")

PREDICT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["instances"],
    "properties": {
        "instances": {
            "type": "array", "minItems": 1,
            "items": {"type": "object", "additionalProperties": True},
            "description": "One object per prediction: feature name -> value. Forecast models take DeepAR "
                           "series objects ({\"start\": ..., \"target\": [...]}).",
        },
        "configuration": {
            "type": ["object", "null"],
            "description": "Forecasts (DeepAR): {\"quantiles\": [\"0.1\", \"0.9\"], \"output_types\": [\"mean\", \"quantiles\"]}",
        },
        "request_id": {"type": ["string", "null"]},
    },
}


def _json(body: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY), status_code=status,
                    media_type="application/json")


def error_status(err: BaseException) -> int:
    if isinstance(err, AuthError):
        return 401
    if isinstance(err, PermissionError):
        return 403
    if isinstance(err, NotFound):
        return 404
    if isinstance(err, InvalidInput):
        return 422
    if isinstance(err, ModelFailed):
        return 503
    return 400


def add_predict_routes(app: FastAPI, runtime: ServingRuntime, guard: Any, *, max_body: int) -> None:
    """Mount the predict and deployment-status routes on ``app``."""

    @app.post(
        "/api/v1/models/{name}/predict",
        summary="Predict with a deployed model",
        openapi_extra={"requestBody": {"required": True, "content": {"application/json": {"schema": PREDICT_SCHEMA}}}},
        responses={200: {"description": "{predictions, model, version, variant, request_id}"},
                   400: {"description": "Body is not a JSON object"}, 401: {}, 403: {},
                   404: {"description": "Model not deployed"}, 413: {"description": "Body too large"},
                   422: {"description": "An instance lacks, adds or mistypes a field: named in detail"},
                   503: {"description": "The model failed"}},
    )
    async def predict(name: str, request: Request) -> Response:
        auth = request.headers.get("authorization")
        token = auth[7:].strip() if auth and auth[:7].lower() == "bearer " else None
        try:
            who = guard.caller(token)
        except (AuthError, PermissionError) as err:
            return _json({"detail": str(err)}, error_status(err))
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > max_body:
            return _json({"detail": f"body is {declared} bytes, over max_payload_bytes={max_body}"}, 413)
        body = await request.body()
        if len(body) > max_body:
            return _json({"detail": f"body is over max_payload_bytes={max_body}"}, 413)
        try:
            data = orjson.loads(body)
        except orjson.JSONDecodeError as err:
            return _json({"detail": f"body is not JSON: {err}"}, 400)
        if not isinstance(data, dict):
            return _json({"detail": "body must be a JSON object such as {\"instances\": [{...}]}"}, 400)
        unknown = [k for k in data if k not in ("instances", "configuration", "request_id")]
        if unknown:
            return _json({"detail": f"unknown field {unknown[0]!r}: the body takes instances, configuration, "
                                    "request_id"}, 422)
        if "instances" not in data:
            return _json({"detail": "body lacks 'instances': send {\"instances\": [{feature: value, ...}]}"}, 422)
        configuration = data.get("configuration")
        if configuration is not None and not isinstance(configuration, dict):
            return _json({"detail": "'configuration' must be an object"}, 422)
        request_id = data.get("request_id")
        if request_id is not None and not isinstance(request_id, str):
            return _json({"detail": "'request_id' must be a string"}, 422)
        request_id = request_id or request.headers.get("x-request-id")
        key = who.name if who.kind == "device" else None
        if who.kind == "device":
            try:
                runtime.check_device(name, who.name, who.role)
            except (Iot2mlError, PermissionError) as err:
                return _json({"detail": str(err)}, error_status(err))
        if key is None and isinstance(data["instances"], list) and data["instances"] \
                and isinstance(data["instances"][0], dict):
            device = data["instances"][0].get("device_id")
            key = str(device) if isinstance(device, (str, int, float)) else None  # a list/object routes nothing
        try:
            answer = await runtime.predict(name, data["instances"], key=key, request_id=request_id,
                                           configuration=configuration)
        except (Iot2mlError, PermissionError) as err:
            return _json({"detail": str(err)}, error_status(err))
        return _json(answer.body())

    @app.get("/api/v1/serving", summary="What this serving process answers with: variants, versions, figures",
             responses={401: {"description": "No or unknown API key / device token"}})
    async def serving(request: Request) -> Response:
        auth = request.headers.get("authorization")
        token = auth[7:].strip() if auth and auth[:7].lower() == "bearer " else None
        try:
            guard.caller(token)
        except (AuthError, PermissionError) as err:
            return _json({"detail": str(err)}, error_status(err))
        return _json({"deployments": runtime.describe(), "models_loaded": runtime.cache.describe(),
                      "prediction_log": {"written": runtime.plog.written, "dropped": runtime.plog.dropped}})


def create_serve_app(settings: Any, *, catalog: Any, runtime: ServingRuntime, nats_url: Any = None) -> FastAPI:
    """The app of ``iot2ml serve``. With ``nats_url`` (a URL or a function giving one) it also answers
    MQTT requests and runs the streaming deployments."""
    from ..auth import Guard

    guard = Guard(catalog)
    state: dict[str, Any] = {}

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await runtime.start()
        if nats_url is not None:
            from .mqtt import run_device_channels

            state["stop"] = asyncio.Event()
            state["channels"] = asyncio.create_task(run_device_channels(settings, runtime, catalog, nats_url,
                                                                        state["stop"]))
        yield
        if "stop" in state:
            state["stop"].set()
            try:
                await asyncio.wait_for(state["channels"], 5)
            except Exception as err:  # noqa: BLE001 - shutting down anyway
                log.debug("device channels did not stop cleanly: %s", err)
        await runtime.stop()

    app = FastAPI(title="iot2ml serving", version="0.1.0", lifespan=lifespan,
                  description="Predictions from deployed models. Devices authenticate with their token, "
                              "people and scripts with API keys.")

    @app.exception_handler(Iot2mlError)
    async def _errors(_request: Request, err: Iot2mlError) -> JSONResponse:
        return JSONResponse({"detail": str(err)}, status_code=error_status(err))

    add_predict_routes(app, runtime, guard, max_body=settings.max_payload_bytes)

    @app.get("/healthz", summary="Liveness")
    async def healthz() -> dict[str, Any]:
        return {"ok": runtime.ready.is_set(), "deployments": sorted(runtime._specs)}

    @app.get("/metrics", summary="Prometheus metrics of every iot2ml process on this data dir",
             response_class=PlainTextResponse)
    async def metrics() -> Response:
        from ..api.metrics import render

        body, content_type = render()
        return Response(body, media_type=content_type)

    app.state.runtime = runtime
    return app
