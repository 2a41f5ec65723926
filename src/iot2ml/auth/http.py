"""Who may do what, over HTTP: log in, refresh and log out (``/api/v1/auth``), users, API keys, devices,
the audit trail.

Every route declares its permission (``core.http.needs_permission``; ``auth.roles`` says which
roles grant it); the ``Guard`` of ``auth/guard.py`` checks it. A revocation made here (a device, a
key, a user disabled or removed, a logout) drops the guard's cache, so it counts from the next request."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Annotated, Any

from fastapi import APIRouter, Request
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict

from ..core.errors import InvalidInput
from ..core.http import PUBLIC, Principal, bearer, needs, needs_permission
from ..core.timeutil import parse_duration
from .certs import Certificates
from .store import Devices, Keys
from .users import Users


class DeviceRequest(BaseModel):
    device_id: str
    type: str
    rotate: bool = False
    cert: bool = False  # answer a key pair and a certificate signed by the platform CA instead of a token


class ClaimRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    type: str


class KeyRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    role: str = "admin"
    expires: str | None = None  # a duration such as 30d; none: until removed


class LoginRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    username: str
    password: str


class RefreshRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    refresh_token: str


class LogoutRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    refresh_token: str | None = None


class UserRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    password: str
    role: str


class UserChange(BaseModel):
    model_config = ConfigDict(extra="forbid")
    password: str | None = None
    role: str | None = None
    active: bool | None = None


@dataclass
class AuthHTTP:
    """What these routes need: the stores, ``forget`` (drop the guard's cache after a revocation) and
    ``audit`` (rows of the audit trail since an epoch second, newest first; ``None``: not kept)."""

    devices: Devices
    keys: Keys
    users: Users | None = None
    forget: Callable[[], None] = lambda: None
    audit: Callable[[float, int], list[dict[str, Any]]] | None = field(default=None)
    certs: Certificates | None = None
    poke_broker: Callable[[], None] = lambda: None
    """Tell the broker to apply a certificate change now (it also polls)."""


router = APIRouter(tags=["users, keys and devices"])
Deps = Annotated[AuthHTTP, needs(AuthHTTP)]
Anyone = Annotated[Principal, needs_permission(PUBLIC)]
DevicesRead = Annotated[Principal, needs_permission("devices:read")]
DevicesWrite = Annotated[Principal, needs_permission("devices:write")]
KeysAdmin = Annotated[Principal, needs_permission("keys:admin")]
UsersAdmin = Annotated[Principal, needs_permission("users:admin")]
AuditRead = Annotated[Principal, needs_permission("audit:read")]
CaAdmin = Annotated[Principal, needs_permission("ca:admin")]

_TOKENS = {200: {"description": '{"access_token", "refresh_token", "token_type": "bearer", "expires_in"}'},
           401: {"description": "Wrong user name or password, disabled, locked out (retry later), or a refresh "
                                "token that is unknown, expired or used (then the whole session is revoked)"}}


def _certs(deps: AuthHTTP) -> Certificates:
    if deps.certs is None:
        raise RuntimeError("this app was not given a certificate store: AuthHTTP(certs=...)")
    return deps.certs


def _users(deps: AuthHTTP) -> Users:
    if deps.users is None:
        raise RuntimeError("this app was not given a users store: AuthHTTP(users=...)")
    return deps.users


# --------------------------------------------------------------------------- log in


@router.post("/api/v1/auth/login", summary="Log in: an access token (JWT) and a refresh token", responses=_TOKENS)
async def login(req: LoginRequest, request: Request, _who: Anyone, deps: Deps) -> dict[str, Any]:
    address = request.client.host if request.client else None
    users = _users(deps)
    pair = await asyncio.to_thread(users.login, req.username, req.password, address=address)
    request.state.principal = Principal("user", req.username, users.get_user(req.username)["role"])
    return pair


@router.post("/api/v1/auth/refresh", summary="A new token pair for a refresh token (which is then used up)",
             responses=_TOKENS)
async def refresh(req: RefreshRequest, _who: Anyone, deps: Deps) -> dict[str, Any]:
    try:
        return await asyncio.to_thread(_users(deps).refresh, req.refresh_token)
    finally:
        deps.forget()  # a reused token revoked its session: its access tokens stop now


@router.post("/api/v1/auth/logout", status_code=204,
             summary="End the session of a refresh token (or of the bearer access token): both stop working")
async def logout(request: Request, _who: Anyone, deps: Deps, req: LogoutRequest | None = None) -> Response:
    users = _users(deps)
    family = None
    token = bearer(request.headers.get("authorization"))
    if token and token.count(".") == 2:
        family = str((await asyncio.to_thread(users.decode, token))["sid"])
    if req is None or not req.refresh_token:
        if family is None:
            raise InvalidInput("send {\"refresh_token\": ...} or 'Authorization: Bearer <access token>'")
    else:
        await asyncio.to_thread(users.logout, req.refresh_token)
    if family is not None:
        await asyncio.to_thread(users.logout, family=family)
    deps.forget()
    return Response(status_code=204)


# --------------------------------------------------------------------------- users


@router.get("/api/v1/users", summary="Users: name, role, active, locked")
async def get_users(_who: UsersAdmin, deps: Deps) -> list[dict[str, Any]]:
    return await asyncio.to_thread(_users(deps).list_users)


@router.post("/api/v1/users", status_code=201, summary="Add a user",
             responses={409: {"description": "The user exists"},
                        422: {"description": "A bad name, a short password or an unknown role"}})
async def post_user(req: UserRequest, _who: UsersAdmin, deps: Deps) -> dict[str, str]:
    await asyncio.to_thread(_users(deps).add_user, req.name, req.password, req.role)
    return {"name": req.name, "role": req.role}


@router.patch("/api/v1/users/{name}", summary="Change a user's password, role or whether they may log in",
              responses={404: {"description": "No such user"}})
async def patch_user(name: str, req: UserChange, _who: UsersAdmin, deps: Deps) -> dict[str, Any]:
    users = _users(deps)

    def change() -> None:
        users.get_user(name)
        if req.password is not None:
            users.set_password(name, req.password)
        if req.role is not None:
            users.set_role(name, req.role)
        if req.active is False:
            users.disable(name)
        elif req.active is True:
            users.enable(name)

    await asyncio.to_thread(change)
    deps.forget()
    return await asyncio.to_thread(users.get_user, name)


@router.delete("/api/v1/users/{name}", status_code=204, summary="Remove a user; their sessions end",
               responses={404: {"description": "No such user"}})
async def delete_user(name: str, _who: UsersAdmin, deps: Deps) -> Response:
    await asyncio.to_thread(_users(deps).remove, name)
    deps.forget()
    return Response(status_code=204)


# --------------------------------------------------------------------------- devices and keys


@router.get("/api/v1/devices", summary="Registered devices")
async def get_devices(_who: DevicesRead, deps: Deps) -> list[dict[str, Any]]:
    devices = await asyncio.to_thread(deps.devices.list_devices)
    return [{"device_id": d.device_id, "type": d.type, "active": d.active} for d in devices]


@router.post("/api/v1/devices", status_code=201, summary="Register a device; answers its token once",
             responses={409: {"description": "The device exists (send rotate: true for a new token)"},
                        422: {"description": "A device id or type name that is not allowed: the reason says why"}})
async def post_device(req: DeviceRequest, _who: DevicesWrite, deps: Deps) -> dict[str, str]:
    if req.cert:  # {"device_id", "cert", "key", "ca", "serial"}: the key is shown once, never stored
        answer = await asyncio.to_thread(_certs(deps).issue_device, req.device_id, req.type, rotate=req.rotate)
        deps.poke_broker()
        return answer
    token = await asyncio.to_thread(deps.devices.add_device, req.device_id, req.type, rotate=req.rotate)
    deps.forget()  # a rotated token replaces the old one at once
    return {"device_id": req.device_id, "token": token}


@router.get("/api/v1/devices/{device_id}/certificates", summary="A device's certificates (serial, validity)")
async def get_device_certs(device_id: str, _who: DevicesRead, deps: Deps) -> list[dict[str, Any]]:
    return await asyncio.to_thread(_certs(deps).list, device_id)


@router.delete("/api/v1/devices/{device_id}/certificates/{serial}", status_code=204,
               summary="Revoke one certificate: a device connected with it is dropped",
               responses={404: {"description": "No active certificate of that serial"}})
async def delete_device_cert(device_id: str, serial: str, _who: DevicesWrite, deps: Deps) -> Response:
    await asyncio.to_thread(_certs(deps).revoke, device_id, serial=serial)
    deps.poke_broker()
    return Response(status_code=204)


@router.get("/api/v1/provisioning/claims", summary="Provisioning claims: name, device type, active")
async def get_claims(_who: DevicesRead, deps: Deps) -> list[dict[str, Any]]:
    return await asyncio.to_thread(_certs(deps).list_claims)


@router.post("/api/v1/provisioning/claims", status_code=201,
             summary="A provisioning claim: answers its certificate and key once",
             responses={409: {"description": "A claim of that name exists"}})
async def post_claim(req: ClaimRequest, _who: DevicesWrite, deps: Deps) -> dict[str, str]:
    answer = await asyncio.to_thread(_certs(deps).add_claim, req.name, req.type)
    deps.poke_broker()
    return answer


@router.delete("/api/v1/provisioning/claims/{name}", status_code=204,
               summary="Revoke a claim (the devices it provisioned keep their certificates)",
               responses={404: {"description": "No active claim of that name"}})
async def delete_claim(name: str, _who: DevicesWrite, deps: Deps) -> Response:
    await asyncio.to_thread(_certs(deps).remove_claim, name)
    deps.poke_broker()
    return Response(status_code=204)


@router.get("/api/v1/ca", summary="The platform CA: its certificate (PEM), fingerprint, validity, older CAs trusted")
async def get_ca(_who: DevicesRead, deps: Deps) -> dict[str, Any]:
    return await asyncio.to_thread(_certs(deps).ca.info)


@router.post("/api/v1/ca/rotate", summary="A new CA; certificates the old one signed stay valid until they end")
async def rotate_ca(_who: CaAdmin, deps: Deps) -> dict[str, Any]:
    info = await asyncio.to_thread(_certs(deps).ca.rotate)
    deps.poke_broker()
    return info


@router.delete("/api/v1/devices/{device_id}", status_code=204, summary="Revoke a device",
               responses={404: {"description": "No active device of that id"}})
async def delete_device(device_id: str, _who: DevicesWrite, deps: Deps) -> Response:
    await asyncio.to_thread(deps.devices.remove_device, device_id)
    deps.forget()
    return Response(status_code=204)


@router.get("/api/v1/keys", summary="API keys: name, role, expiry (never the key)")
async def get_keys(_who: KeysAdmin, deps: Deps) -> list[dict[str, Any]]:
    return await asyncio.to_thread(deps.keys.describe_keys)


@router.post("/api/v1/keys", status_code=201, summary="Create an API key; answers it once",
             responses={409: {"description": "A key of that name exists"},
                        422: {"description": "An unknown role, a bad name or expiry"}})
async def post_key(req: KeyRequest, _who: KeysAdmin, deps: Deps) -> dict[str, Any]:
    expires = parse_duration(req.expires) if req.expires else None
    key = await asyncio.to_thread(deps.keys.add_key, req.name, req.role, expires=expires)
    return {"name": req.name, "role": req.role, "key": key}


@router.delete("/api/v1/keys/{name}", status_code=204, summary="Revoke an API key",
               responses={404: {"description": "No such key"}})
async def delete_key(name: str, _who: KeysAdmin, deps: Deps) -> Response:
    await asyncio.to_thread(deps.keys.remove_key, name)
    deps.forget()
    return Response(status_code=204)


# --------------------------------------------------------------------------- audit


@router.get("/api/v1/audit", summary="The audit trail: who did what, when, from where, allowed or denied")
async def get_audit(_who: AuditRead, deps: Deps, since: str = "1d", limit: int = 1000) -> list[dict[str, Any]]:
    import time

    seconds = parse_duration(since)
    if not 0 <= seconds <= 100 * 365 * 86400:  # NaN too
        raise InvalidInput(f"since {since!r} must be a duration up to 100 years, e.g. 1h or 30d")
    if deps.audit is None:
        return []
    return await asyncio.to_thread(deps.audit, time.time() - seconds, max(1, min(limit, 100_000)))
