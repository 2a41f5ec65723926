"""Monitoring over HTTP: ``/api/v1/notifiers`` and ``/api/v1/alerts`` (reads: ``alerts:read``;
changes: ``alerts:write``, ``notifiers:write``; see ``auth.roles``)."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import APIRouter, Query
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field

from ..core.errors import InvalidInput
from ..core.http import Principal, json_response, needs, needs_permission
from ..core.storage import TableStore
from ..core.timeutil import parse_duration
from .dispatch import deliver
from .kinds import Context, rule_spec
from .notifiers import test_notification
from .service import define_rule, history
from .store import AlertRules, Notifiers, firing_ids


class NotifierRequest(BaseModel):
    name: str = Field(..., examples=["ops"])
    kind: str = Field(..., description="webhook, slack, email or apprise", examples=["webhook"])
    target: str = Field(..., description="A URL; for email the address(es)", examples=["http://host:9000/hook"])
    options: dict[str, Any] = Field(default_factory=dict, description="email: smtp (smtp://host:25), sender; "
                                    "any kind: timeout (seconds)", examples=[{}])


@dataclass
class NotifiersHTTP:
    """What the notifier routes need: the store."""

    notifiers: Notifiers


router = APIRouter(tags=["monitoring"])
AlertsRead = Annotated[Principal, needs_permission("alerts:read")]
AlertsWrite = Annotated[Principal, needs_permission("alerts:write")]
NotifiersWrite = Annotated[Principal, needs_permission("notifiers:write")]
Deps = Annotated[NotifiersHTTP, needs(NotifiersHTTP)]


@router.get("/api/v1/notifiers", summary="Notifiers, secrets masked")
async def get_notifiers(_who: AlertsRead, deps: Deps) -> list[dict[str, Any]]:
    return [r.masked() for r in await asyncio.to_thread(deps.notifiers.list)]


@router.post("/api/v1/notifiers", status_code=201, summary="Add a notifier",
             responses={409: {"description": "A notifier of that name exists"},
                        422: {"description": "An unknown kind, a bad name or a target that does not parse"}})
async def post_notifier(req: NotifierRequest, _who: NotifiersWrite, deps: Deps) -> dict[str, Any]:
    record = await asyncio.to_thread(deps.notifiers.add, req.name, req.kind, req.target, **req.options)
    return record.masked()


@router.delete("/api/v1/notifiers/{name}", status_code=204, summary="Remove a notifier",
               responses={404: {"description": "No notifier of that name"}})
async def delete_notifier(name: str, _who: NotifiersWrite, deps: Deps) -> Response:
    await asyncio.to_thread(deps.notifiers.remove, name)
    return Response(status_code=204)


@router.post("/api/v1/notifiers/{name}/test",
             summary="Send a test notification; answers the delivery (status 'ok' or 'failed' with its error)",
             responses={404: {"description": "No notifier of that name"}})
async def test_notifier(name: str, _who: NotifiersWrite, deps: Deps) -> Response:
    notifier = await asyncio.to_thread(deps.notifiers.notifier, name)
    delivery = await asyncio.to_thread(deliver, notifier, test_notification(), record=deps.notifiers.record)
    return json_response(delivery.to_dict())  # a receiver that is down is an answer, not an error of ours


# ------------------------------------------------------------------------------------------- alerts

class AlertRuleRequest(BaseModel):
    """One kind of rule per request (the CLI's flags, ``-`` as ``_``): ``when`` with ``table``, or
    ``silent``, ``stuck``, ``range``, ``dead_letter_rate``, ``schema_changes`` (with ``type``),
    ``drift``, ``metric`` (with ``below`` or ``above``), ``anomaly``."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    name: str = Field(..., examples=["high-pressure"])
    table: str | None = Field(None, examples=["pump"])
    when: str | None = Field(None, examples=["max(pressure) > 5"])
    by: list[str] = Field(default_factory=list, examples=[["device_id"]])
    silent: str | None = Field(None, description="Duration (5m) or 'auto'", examples=["5m"])
    stuck: int | None = Field(None, examples=[20])
    range: list[str] = Field(default_factory=list, examples=[["pressure=0:10"]])
    dead_letter_rate: float | None = Field(None, examples=[0.05])
    schema_changes: bool = False
    type: str | None = Field(None, examples=["pump"])
    drift: str | None = Field(None, examples=["wine-quality"])
    metric: str | None = Field(None, examples=["wine-quality:accuracy"])
    below: float | None = None
    above: float | None = None
    anomaly: str | None = Field(None, examples=["pump-blockage"])
    retrain: str | None = Field(None, examples=["classify --table wine --label quality --entity batch_id --name wine-quality"])
    canary: int | None = Field(None, examples=[10])
    bake: str | None = Field(None, description="Duration the retrained canary bakes", examples=["10m"])
    window: str = Field("1m", description="Duration: 90s, 1m, 1h", examples=["1m"])
    for_: str = Field("0s", alias="for", description="Duration the condition holds before firing", examples=["30s"])
    every: str = Field("1m", description="Evaluation interval", examples=["10s"])
    severity: str = Field("warning", examples=["critical"])
    notify: list[str] = Field(default_factory=list, examples=[["ops"]])


class SilenceRequest(BaseModel):
    for_: str = Field("1h", alias="for", description="How long, e.g. 1h", examples=["1h"])


@dataclass
class AlertsHTTP:
    """What the alert routes need: the rules store and the lake (for the schemas and the history)."""

    rules: AlertRules
    lake: TableStore
    models: Any = None  # wiring.ModelOps: rules on models look them up
    devices: Any = None  # core.devices.DeviceDirectory: rules per device type


AlertDeps = Annotated[AlertsHTTP, needs(AlertsHTTP)]


def _listed(rules: AlertRules) -> list[dict[str, Any]]:
    firing = firing_ids(rules.load_state())
    return [{**r.to_dict(), "alerts": [{"id": fp, **{k: v for k, v in a.items() if k != "rule"}}
                                       for fp, a in firing.items() if a["rule"] == r.name]} for r in rules.list()]


@router.get("/api/v1/alerts", summary="Alert rules and their firing alerts")
async def get_alerts(_who: AlertsRead, deps: AlertDeps) -> list[dict[str, Any]]:
    return await asyncio.to_thread(_listed, deps.rules)


@router.post("/api/v1/alerts", status_code=201, summary="Add an alert rule",
             responses={409: {"description": "A rule of that name exists"},
                        422: {"description": "A condition, table, column, duration or notifier that does not fit"}})
async def post_alert(req: AlertRuleRequest, _who: AlertsWrite, deps: AlertDeps) -> dict[str, Any]:
    def add() -> dict[str, Any]:
        options = req.model_dump(include={"table", "when", "by", "silent", "stuck", "range", "dead_letter_rate",
                                          "schema_changes", "type", "drift", "metric", "below", "above", "anomaly",
                                          "retrain", "canary"})
        options["bake"] = None if req.bake is None else parse_duration(req.bake)
        kind, spec = rule_spec(options)
        record = define_rule(Context(deps.lake, deps.rules.catalog, None, deps.models, deps.devices), req.name, kind=kind, spec=spec,
                             window=parse_duration(req.window), for_=parse_duration(req.for_),
                             every=parse_duration(req.every), severity=req.severity, notify=tuple(req.notify))
        return deps.rules.add(record).to_dict()

    return await asyncio.to_thread(add)


@router.get("/api/v1/alerts/history", summary="State changes of alerts, newest first")
async def get_alert_history(_who: AlertsRead, deps: AlertDeps, rule: str | None = None,
                            limit: Annotated[int, Query(ge=1, le=100_000)] = 1000) -> list[dict[str, Any]]:
    return await asyncio.to_thread(history, deps.lake, rule=rule, limit=limit)


@router.delete("/api/v1/alerts/{name}", status_code=204, summary="Remove an alert rule",
               responses={404: {"description": "No rule of that name"}})
async def delete_alert(name: str, _who: AlertsWrite, deps: AlertDeps) -> Response:
    await asyncio.to_thread(deps.rules.remove, name)
    return Response(status_code=204)


@router.post("/api/v1/alerts/{id}/ack", status_code=202, summary="Acknowledge a firing alert (by its id)",
             responses={404: {"description": "No firing alert of that id"}})
async def ack_alert(id: str, _who: AlertsWrite, deps: AlertDeps) -> dict[str, Any]:
    cmd = await asyncio.to_thread(deps.rules.ack, id)
    return {"id": id, "request": cmd.id}


@router.post("/api/v1/alerts/{name}/silence", status_code=202, summary="Silence a rule's notifications for a while",
             responses={404: {"description": "No rule of that name"}})
async def silence_alert(name: str, _who: AlertsWrite, deps: AlertDeps, req: SilenceRequest | None = None) -> dict[str, Any]:
    seconds = parse_duration((req or SilenceRequest()).for_)
    if seconds <= 0:
        raise InvalidInput(f"for {seconds!r} must be > 0, e.g. 1h")
    cmd = await asyncio.to_thread(deps.rules.silence, name, time.time() + seconds)
    return {"name": name, "until": cmd.until, "request": cmd.id}


# ------------------------------------------------------------------------------------------- drift reports

@router.get("/api/v1/monitor/{model}", summary="Drift of a model's captured inputs and answers (and live quality)",
            responses={404: {"description": "No model of that name"},
                       422: {"description": "A window that is not a duration > 0 (at most 366d)"}})
async def get_monitor_report(model: str, _who: AlertsRead, deps: AlertDeps,
                             window: Annotated[str, Query(max_length=32, examples=["1h"],
                                                          description="Duration: 90s, 30m, 1h, 2d")] = "1h",
                             ) -> dict[str, Any]:
    from .report import build_report, parse_window

    seconds = parse_window(window)
    ctx = Context(deps.lake, deps.rules.catalog, None, deps.models, deps.devices)
    return await asyncio.to_thread(build_report, ctx, model, window=seconds)
