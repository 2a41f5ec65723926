"""Devices and API keys over HTTP (admin keys only): list, register and revoke devices, create keys.

Who is calling is checked by ``core.http`` (``Admin``), with the ``Guard`` of ``auth/guard.py``."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import APIRouter
from fastapi.responses import Response
from pydantic import BaseModel

from ..core.http import Admin, needs
from .store import Devices, Keys


class DeviceRequest(BaseModel):
    device_id: str
    type: str
    rotate: bool = False


class KeyRequest(BaseModel):
    name: str
    role: str = "admin"


@dataclass
class AuthHTTP:
    """What the admin routes need: the device and key stores."""

    devices: Devices
    keys: Keys


router = APIRouter(tags=["devices and keys"])
Deps = Annotated[AuthHTTP, needs(AuthHTTP)]


@router.get("/api/v1/devices", summary="Registered devices")
async def get_devices(_who: Admin, deps: Deps) -> list[dict[str, Any]]:
    devices = await asyncio.to_thread(deps.devices.list_devices)
    return [{"device_id": d.device_id, "type": d.type, "active": d.active} for d in devices]


@router.post("/api/v1/devices", status_code=201, summary="Register a device; answers its token once",
             responses={409: {"description": "The device exists (send rotate: true for a new token)"},
                        422: {"description": "A device id or type name that is not allowed: the reason says why"}})
async def post_device(req: DeviceRequest, _who: Admin, deps: Deps) -> dict[str, str]:
    token = await asyncio.to_thread(deps.devices.add_device, req.device_id, req.type, rotate=req.rotate)
    return {"device_id": req.device_id, "token": token}


@router.delete("/api/v1/devices/{device_id}", status_code=204, summary="Revoke a device",
               responses={404: {"description": "No active device of that id"}})
async def delete_device(device_id: str, _who: Admin, deps: Deps) -> Response:
    await asyncio.to_thread(deps.devices.remove_device, device_id)
    return Response(status_code=204)


@router.post("/api/v1/keys", status_code=201, summary="Create an API key; answers it once",
             responses={409: {"description": "A key of that name exists"},
                        422: {"description": "An unknown role or a bad name"}})
async def post_key(req: KeyRequest, _who: Admin, deps: Deps) -> dict[str, str]:
    key = await asyncio.to_thread(deps.keys.add_key, req.name, req.role)
    return {"name": req.name, "key": key}
