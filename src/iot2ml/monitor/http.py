"""Notifiers over HTTP: ``/api/v1/notifiers`` (list with any API key; add, remove, test with an admin key)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import APIRouter
from fastapi.responses import Response
from pydantic import BaseModel, Field

from ..core.http import Admin, Reader, json_response, needs
from .dispatch import deliver
from .notifiers import test_notification
from .store import Notifiers


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
Deps = Annotated[NotifiersHTTP, needs(NotifiersHTTP)]


@router.get("/api/v1/notifiers", summary="Notifiers, secrets masked")
async def get_notifiers(_who: Reader, deps: Deps) -> list[dict[str, Any]]:
    return [r.masked() for r in await asyncio.to_thread(deps.notifiers.list)]


@router.post("/api/v1/notifiers", status_code=201, summary="Add a notifier",
             responses={409: {"description": "A notifier of that name exists"},
                        422: {"description": "An unknown kind, a bad name or a target that does not parse"}})
async def post_notifier(req: NotifierRequest, _who: Admin, deps: Deps) -> dict[str, Any]:
    record = await asyncio.to_thread(deps.notifiers.add, req.name, req.kind, req.target, **req.options)
    return record.masked()


@router.delete("/api/v1/notifiers/{name}", status_code=204, summary="Remove a notifier",
               responses={404: {"description": "No notifier of that name"}})
async def delete_notifier(name: str, _who: Admin, deps: Deps) -> Response:
    await asyncio.to_thread(deps.notifiers.remove, name)
    return Response(status_code=204)


@router.post("/api/v1/notifiers/{name}/test",
             summary="Send a test notification; answers the delivery (status 'ok' or 'failed' with its error)",
             responses={404: {"description": "No notifier of that name"}})
async def test_notifier(name: str, _who: Admin, deps: Deps) -> Response:
    notifier = await asyncio.to_thread(deps.notifiers.notifier, name)
    delivery = await asyncio.to_thread(deliver, notifier, test_notification(), record=deps.notifiers.record)
    return json_response(delivery.to_dict())  # a receiver that is down is an answer, not an error of ours
