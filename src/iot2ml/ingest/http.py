"""Telemetry over HTTP: ``POST /api/v1/devices/{device_id}/telemetry``.

The body is decoded and checked as the ingest would (every problem listed, nothing stored if one
is found), then published to the broker's stream; the 201 comes only once JetStream stored it, so
an HTTP post is as durable as an MQTT QoS 1 publish. The ingest writes it to the lake from there.
The request and the body's bytes count against the device's limits (``auth.limits``): 429 with
``Retry-After`` when over.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import APIRouter, Header, Request

from ..core.errors import Malformed, PayloadTooLarge
from ..core.http import Credentials, DeviceOwner, needs, provided
from ..core.storage import TableStore
from ..core.tables import BASE_COLUMNS, BUILT_IN
from ..core.timeutil import now_us
from ..core.transport import telemetry_subject
from .decode import Decoder, InMessage, kind_of

Publish = Callable[[str, bytes, dict[str, str] | None], Awaitable[None]]
"""``publish(subject, data, headers)``: returns once the broker's stream stored the message;
raises ``BrokerUnavailable`` when it cannot."""


class Schemas:
    """Column kinds of the device types' tables, re-read from the lake at most every ``ttl`` seconds."""

    def __init__(self, lake: TableStore, ttl: float = 5.0) -> None:
        self.lake = lake
        self.ttl = ttl
        self._at = 0.0
        self._value: dict[str, dict[str, str]] = {}

    def get(self) -> dict[str, dict[str, str]]:
        if time.monotonic() - self._at > self.ttl:
            out: dict[str, dict[str, str]] = {}
            for table in self.lake.tables():
                if table in BUILT_IN:
                    continue
                schema = self.lake.schema(table)
                if schema is not None:
                    out[table] = {f.name: kind_of(f.type) for f in schema if f.name not in BASE_COLUMNS}
            self._value, self._at = out, time.monotonic()
        return self._value


@dataclass
class TelemetryHTTP:
    """What the telemetry route needs: the body limit, the lake's schemas and a way to publish."""

    max_payload_bytes: int
    publish: Publish
    schemas: Schemas


router = APIRouter(tags=["telemetry"])
Deps = Annotated[TelemetryHTTP, needs(TelemetryHTTP)]


@router.post(
    "/api/v1/devices/{device_id}/telemetry",
    status_code=201,
    summary="Send readings from a device",
    responses={400: {"description": "Bad payload: every problem is listed"}, 401: {}, 403: {}, 413: {},
               422: {"description": "The device id in the path is not valid"},
               429: {"description": "The device is over its rate limit or payload quota: see Retry-After"},
               503: {"description": "The broker did not confirm the write: retry"}},
)
async def post_telemetry(
    device_id: str,
    request: Request,
    who: DeviceOwner,
    deps: Deps,
    idempotency_key: str | None = Header(None, description="Resends with the same key are stored once (2 min)."),
) -> dict[str, Any]:
    limit = deps.max_payload_bytes
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"body is {declared} bytes, over max_payload_bytes={limit}")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise PayloadTooLarge(f"body is over max_payload_bytes={limit}")
    data = bytes(body)
    provided(request, Credentials).charge(who, len(data))  # the device's payload quota
    decoder = Decoder(lambda _d: who.role, schemas=deps.schemas.get(), max_payload_bytes=limit, dedup_window=0)
    decoded = decoder.decode([InMessage(0, telemetry_subject(device_id), now_us(), data)])
    if decoded.dead:
        raise Malformed("nothing was stored: fix these and resend", decoded.dead_letters["reason"].to_pylist())
    headers = {"Nats-Msg-Id": f"{device_id}:{idempotency_key}"} if idempotency_key else None
    await deps.publish(telemetry_subject(device_id), data, headers)
    return {"accepted": decoded.readings}
