"""Serving over HTTP: predictions, what a serving process serves, and the deployments control plane.

- ``predict_router``: ``POST /api/v1/models/{name}/predict``, ``GET /api/v1/serving`` and
  ``POST /api/v1/serving/refresh``, over the process's own ``ServingRuntime`` (handed in as
  ``Serving``). The serving process (``iot2ml serve``) and the API mount it alike.
- ``deployments_router``: ``/api/v1/deployments`` (list, show, deploy, rollback, undeploy), handed a
  ``DeploymentsControl``. A change returns once every running serving process answers with it
  (``control.confirm``), unless ``?wait=false``.

The predict route reads the body itself (orjson, a size limit before parsing) instead of letting
FastAPI build pydantic objects per request: that is most of a request's cost at thousands per
second. Every client error is a 4xx naming the field; a model that fails answers 503.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Query, Request
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field, field_validator

from ..core.devices import DeviceDirectory
from ..core.errors import (
    InvalidInput,
    Iot2mlError,
    Malformed,
    NotConfirmed,
    NotFound,
    PayloadTooLarge,
)
from ..core.http import (
    PERMISSION_KEY,
    Credentials,
    Principal,
    bearer,
    error_response,
    json_response,
    needs,
    needs_permission,
    provided,
)
from . import control
from .deployments import Deployment, Deployments
from .runtime import ServingRuntime

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

_FIELDS = ("instances", "configuration", "request_id")


# --------------------------------------------------------------------------- predictions


@dataclass
class Serving:
    """What ``predict_router`` needs: this process's runtime, the body limit, and its component name."""

    runtime: ServingRuntime
    max_body: int
    component: str = "serve"


predict_router = APIRouter(tags=["predictions"])
ServingRead = Annotated[Principal, needs_permission("serving:read")]
ServingRefresh = Annotated[Principal, needs_permission("serving:refresh")]


async def _read(request: Request, max_body: int) -> dict[str, Any]:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_body:
        raise PayloadTooLarge(f"body is {declared} bytes, over max_payload_bytes={max_body}")
    body = await request.body()
    if len(body) > max_body:
        raise PayloadTooLarge(f"body is over max_payload_bytes={max_body}")
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as err:
        raise Malformed(f"body is not JSON: {err}") from None
    if not isinstance(data, dict):
        raise Malformed("body must be a JSON object such as {\"instances\": [{...}]}")
    unknown = [k for k in data if k not in _FIELDS]
    if unknown:
        raise InvalidInput(f"unknown field {unknown[0]!r}: the body takes instances, configuration, request_id")
    if "instances" not in data:
        raise InvalidInput("body lacks 'instances': send {\"instances\": [{feature: value, ...}]}")
    if data.get("configuration") is not None and not isinstance(data["configuration"], dict):
        raise InvalidInput("'configuration' must be an object")
    if data.get("request_id") is not None and not isinstance(data["request_id"], str):
        raise InvalidInput("'request_id' must be a string")
    return data


@predict_router.post(
    control.PREDICT_PATH,
    summary="Predict with a deployed model",
    openapi_extra={"requestBody": {"required": True, "content": {"application/json": {"schema": PREDICT_SCHEMA}}},
                   PERMISSION_KEY: "predict"},
    responses={200: {"description": "{predictions, model, version, variant, request_id}"},
               400: {"description": "Body is not a JSON object"}, 401: {}, 403: {},
               404: {"description": "Model not deployed"}, 413: {"description": "Body too large"},
               422: {"description": "An instance lacks, adds or mistypes a field: named in detail"},
               429: {"description": "The caller is over its rate limit or payload quota: see Retry-After"},
               503: {"description": "The model failed"}},
)
async def predict(name: str, request: Request) -> Response:
    # No FastAPI dependencies on this route: plain calls cost less per request.
    serving = provided(request, Serving)
    runtime = serving.runtime
    try:
        credentials = provided(request, Credentials)
        who = credentials.authorize(bearer(request.headers.get("authorization")), "predict")  # counts the request
        data = await _read(request, serving.max_body)
        credentials.charge(who, len(await request.body()))  # a device's payload quota (the body is read once)
        key = who.name if who.kind == "device" else None
        if key is not None:
            runtime.check_device(name, who.name, who.role)
        instances = data["instances"]
        if key is None and isinstance(instances, list) and instances and isinstance(instances[0], dict):
            device = instances[0].get("device_id")
            key = str(device) if isinstance(device, (str, int, float)) else None  # a list/object routes nothing
        answer = await runtime.predict(name, instances, key=key,
                                       request_id=data.get("request_id") or request.headers.get("x-request-id"),
                                       configuration=data.get("configuration"))
    except (Iot2mlError, PermissionError) as err:
        return error_response(err)
    return json_response(answer.body())


def _serving_state(serving: Serving) -> dict[str, Any]:
    runtime = serving.runtime
    return {"deployments": runtime.describe(), "models_loaded": runtime.cache.describe(),
            "prediction_log": {"written": runtime.plog.written, "dropped": runtime.plog.dropped},
            "capture": runtime.capture.describe(),
            "process": {"component": serving.component, "pid": os.getpid(), "lazy": runtime.lazy,
                        "judge": runtime.judging}}


ServingDeps = Annotated[Serving, needs(Serving)]


@predict_router.get("/api/v1/serving", summary="What this serving process answers with: variants, versions, figures",
                    responses={401: {"description": "No or unknown API key / device token"}})
async def serving_state(_who: ServingRead, serving: ServingDeps) -> Response:
    return json_response(_serving_state(serving))


@predict_router.post("/api/v1/serving/refresh", summary="Apply the deployments in the catalog now, then answer "
                     "as GET /api/v1/serving ('iot2ml deploy' calls it to wait for a change)",
                     responses={401: {"description": "No or unknown API key"},
                                403: {"description": "A role without serving:refresh"}})
async def serving_refresh(_who: ServingRefresh, serving: ServingDeps) -> Response:
    await serving.runtime.refresh(relist=True)
    return json_response(_serving_state(serving))


# --------------------------------------------------------------------------- deployments control plane


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


@dataclass
class DeploymentsControl:
    """What ``deployments_router`` needs. ``registry()`` gives the model registry (built on first use);
    ``runtime`` is this process's own, applied in-process; the others are found under ``data_dir``."""

    deployments: Deployments
    devices: DeviceDirectory
    registry: Callable[[], Any]
    data_dir: Path
    runtime: ServingRuntime | None = None
    component: str = "api"


deployments_router = APIRouter(prefix="/api/v1/deployments", tags=["deployments"])
ControlDeps = Annotated[DeploymentsControl, needs(DeploymentsControl)]
DeploymentsRead = Annotated[Principal, needs_permission("deployments:read")]
DeploymentsWrite = Annotated[Principal, needs_permission("deployments:write")]
Wait = Annotated[bool, Query(description="Return once every running serving process serves the change "
                                         "(false: as soon as it is stored).")]
Timeout = Annotated[float, Query(gt=0, le=600, description="Seconds to wait for the serving processes; "
                                                           "past them the answer is 504 (the change stays stored).")]


def _local_peer(ctl: DeploymentsControl, loop: asyncio.AbstractEventLoop) -> control.Peer:
    runtime = ctl.runtime
    assert runtime is not None

    async def apply() -> list[dict[str, Any]]:
        await runtime.refresh(relist=True)
        return runtime.describe()

    def refresh(timeout: float) -> list[dict[str, Any]]:
        try:
            return asyncio.run_coroutine_threadsafe(apply(), loop).result(timeout)
        except TimeoutError:
            raise NotConfirmed("is still loading the models") from None
        except Exception as err:  # noqa: BLE001 - reported as what did not confirm
            raise NotConfirmed(f"failed to refresh: {type(err).__name__}: {err}") from None

    return control.Peer(f"{ctl.component} (pid {os.getpid()}, this process)", "this process's log", refresh)


async def _confirmed(ctl: DeploymentsControl, name: str, wait: bool, timeout: float) -> list[str] | None:
    """Wait for this process's runtime and every other running serving process to serve the change."""
    if not wait:
        return None
    peers = control.serving_peers(ctl.data_dir, skip_pid=os.getpid())
    if ctl.runtime is not None:
        peers.insert(0, _local_peer(ctl, asyncio.get_running_loop()))
    return await asyncio.to_thread(control.confirm, peers, name, lambda: ctl.deployments.get(name), timeout=timeout)


def _deployed(ctl: DeploymentsControl, name: str) -> dict[str, Any]:
    spec = ctl.deployments.get(name)
    if spec is None:
        raise NotFound(f"model {name!r} is not deployed: see GET /api/v1/deployments")
    return {**control.summary(spec), "events": ctl.deployments.events(name, limit=20)}


@deployments_router.get("", summary="Deployed models: variants, shares, stream and device bindings")
async def list_deployments(_who: DeploymentsRead, ctl: ControlDeps) -> list[dict[str, Any]]:
    return [control.summary(d) for d in await asyncio.to_thread(ctl.deployments.list)]


@deployments_router.get("/{name}", summary="One deployment and its latest audit events",
                        responses={404: {"description": "Not deployed"}})
async def get_deployment(name: str, _who: DeploymentsRead, ctl: ControlDeps) -> dict[str, Any]:
    return await asyncio.to_thread(_deployed, ctl, name)


@deployments_router.put(
    "/{name}", summary="Deploy a model: champion, a version, canary, A/B, shadow",
    responses={404: {"description": "No such model, version, alias or device type"},
               409: {"description": "The device type is bound to another deployment"},
               422: {"description": "Options that do not fit together; the reason says which"},
               504: {"description": "Stored, but a serving process did not serve it within the timeout"}})
async def put_deployment(name: str, who: DeploymentsWrite, ctl: ControlDeps, req: DeployRequest | None = None,
                         wait: Wait = True, timeout: Timeout = 30.0) -> dict[str, Any]:
    req = req or DeployRequest()

    def apply() -> dict[str, Any]:
        return control.deploy(ctl.deployments, ctl.devices, ctl.registry(), name, who=f"api:{who.name}",
                              version=req.version, canary=req.canary, bake_seconds=req.bake,
                              rollback_on=req.rollback_on, ab=req.ab, shadow=req.shadow, stream=req.stream,
                              devices=req.devices, reason=req.reason)

    info = await asyncio.to_thread(apply)
    return _with(info, await _confirmed(ctl, name, wait, timeout))


@deployments_router.post("/{name}/rollback", summary="Restore the state before the last change",
                         responses={404: {"description": "Not deployed, or nothing to roll back to"},
                                    504: {"description": "Stored, but a serving process did not serve it in time"}})
async def rollback_deployment(name: str, who: DeploymentsWrite, ctl: ControlDeps, req: ReasonRequest | None = None,
                              wait: Wait = True, timeout: Timeout = 30.0) -> dict[str, Any]:
    restored: Deployment = await asyncio.to_thread(ctl.deployments.rollback, name, who=f"api:{who.name}",
                                                   reason=req.reason if req else "")
    info = {**control.summary(restored), "action": "rollback"}
    return _with(info, await _confirmed(ctl, name, wait, timeout))


@deployments_router.delete("/{name}", status_code=204, summary="Stop serving a model (history stays)",
                           responses={404: {"description": "Not deployed"},
                                      504: {"description": "Removed, but a serving process still serves it"}})
async def delete_deployment(name: str, who: DeploymentsWrite, ctl: ControlDeps, wait: Wait = True,
                            timeout: Timeout = 30.0) -> Response:
    await asyncio.to_thread(ctl.deployments.remove, name, who=f"api:{who.name}")
    await _confirmed(ctl, name, wait, timeout)
    return Response(status_code=204)


def _with(info: dict[str, Any], confirmed: list[str] | None) -> dict[str, Any]:
    if confirmed is not None:
        info["confirmed_by"] = confirmed
    return info

