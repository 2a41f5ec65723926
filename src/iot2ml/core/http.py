"""What every HTTP app of iot2ml shares (the API and the serving process alike).

- Who is calling: ``bearer`` reads ``Authorization: Bearer <token>``; the app is handed the
  ``Credentials`` that check it (``auth.Guard``) and every route declares the permission it needs
  (``needs_permission("models:read")``, ``DeviceOwner`` for a device's own telemetry, ``PUBLIC``),
  checked against the caller's role (``auth.roles``).
- Audit: ``install_audit`` hands every write and every denied request to a sink (``auth.audit``).
- What a route needs: each module's router names a small object of its dependencies (``needs``);
  the composition root hands it in with ``provide(app, obj)``. No route reaches into another module.
- Errors: ``http_status(err)`` is the one status mapping of the error tree drawn in
  ``core/errors.py``; ``install_error_handlers`` answers every ``Iot2mlError`` (and
  ``PermissionError``) with ``{"detail": ...}`` and that status (429 adds ``Retry-After``).
- Limits: the ``Credentials`` count each request against its caller's rate limit when they
  resolve it (``authorize``, ``device``); routes that take a payload ``charge`` its bytes.
- ``/metrics``: Prometheus metrics of every iot2ml process of this data dir.

Imported only by the HTTP modules (``import iot2ml`` loads no FastAPI); prometheus_client only when
``/metrics`` is read. Imports nothing of ours outside ``core``.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Annotated, Any, Protocol, TypeVar

import orjson
from fastapi import Depends, FastAPI, Request, Security
from fastapi.responses import PlainTextResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from .errors import (
    AlreadyExists,
    AuthError,
    InvalidInput,
    Iot2mlError,
    Malformed,
    NotConfirmed,
    NotFound,
    PayloadTooLarge,
    RateLimited,
    Transient,
)
from .ids import check_device_id

T = TypeVar("T")
log = logging.getLogger("iot2ml.http")


# --------------------------------------------------------------------------- errors


def http_status(err: BaseException) -> int:
    """The HTTP status of an error of ours (see the tree in ``core/errors.py``)."""
    if isinstance(err, AuthError):
        return 401
    if isinstance(err, PermissionError):  # Forbidden, and the built-in one
        return 403
    if isinstance(err, NotFound):
        return 404
    if isinstance(err, AlreadyExists):
        return 409
    if isinstance(err, PayloadTooLarge):
        return 413
    if isinstance(err, InvalidInput):
        return 422
    if isinstance(err, NotConfirmed):
        return 504
    if isinstance(err, RateLimited):
        return 429
    if isinstance(err, Transient):
        return 503
    return 400


def error_detail(err: BaseException) -> Any:
    """What ``detail`` says: the message, or ``{"error", "reasons"}`` for a message refused with several."""
    if isinstance(err, Malformed) and err.reasons:
        return {"error": str(err), "reasons": err.reasons}
    return str(err)


def json_response(body: Any, status: int = 200) -> Response:
    """A JSON response written by orjson (numpy values included): cheaper than FastAPI's encoder."""
    return Response(orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY), status_code=status,
                    media_type="application/json")


def error_response(err: BaseException) -> Response:
    response = json_response({"detail": error_detail(err)}, http_status(err))
    if isinstance(err, RateLimited):
        response.headers["Retry-After"] = str(err.retry_after)
    return response


async def known_query_only(request: Request) -> None:
    """Refuse query parameters the route does not declare (a typo such as ``?limt=5`` would else be
    ignored silently) or gives more than once: ``InvalidInput`` (422) naming the parameter and those
    the route takes. Install
    app-wide: ``FastAPI(dependencies=[Depends(known_query_only)])``."""
    if not request.query_params:
        return
    route = request.scope.get("route")
    dependant = getattr(route, "dependant", None)
    if dependant is None:
        return
    known: set[str] = set()
    pending = [dependant]
    while pending:  # the route's own parameters and those of its dependencies
        current = pending.pop()
        known.update(p.alias for p in current.query_params)
        pending.extend(current.dependencies)
    unknown = [k for k in request.query_params if k not in known]
    if unknown:
        takes = ", ".join(sorted(known)) or "none"
        raise InvalidInput(f"unknown query parameter {unknown[0]!r}: this route takes {takes}")
    for key in known:  # no route takes a list: a repeated parameter would silently keep its last value
        given = len(request.query_params.getlist(key))
        if given > 1:
            raise InvalidInput(f"query parameter {key!r} is given {given} times: give it once")


def install_error_handlers(app: FastAPI) -> None:
    """Answer every ``Iot2mlError`` and ``PermissionError`` a route raises with its status and ``detail``."""

    async def handle(_request: Request, err: Exception) -> Response:
        return error_response(err)

    app.add_exception_handler(Iot2mlError, handle)
    app.add_exception_handler(PermissionError, handle)


# --------------------------------------------------------------------------- dependencies


def provide(app: FastAPI, obj: Any, *, as_type: type | None = None) -> None:
    """Hand ``obj`` to the routes of ``app`` that declare ``needs(as_type or type(obj))``."""
    if not hasattr(app.state, "provided"):
        app.state.provided = {}
    app.state.provided[as_type or type(obj)] = obj


def provided(request: Request, cls: type[T]) -> T:
    """What the app was given for ``cls`` (a plain call: cheaper than a dependency on hot routes)."""
    try:
        return request.app.state.provided[cls]
    except (AttributeError, KeyError):
        raise RuntimeError(f"this app was not given a {cls.__name__}: its composition root must call "
                           f"provide(app, {cls.__name__}(...))") from None


def needs(cls: type[T]) -> Any:
    """A FastAPI dependency on what the app was given for ``cls``: ``Annotated[X, needs(X)]``."""

    def get(request: Request) -> T:
        return provided(request, cls)

    return Depends(get)


# --------------------------------------------------------------------------- who is calling


@dataclass(frozen=True)
class Principal:
    """An authenticated caller: a device (``kind='device'``), an API key (``kind='key'``), a user
    (``kind='user'``), or nobody on a public route (``kind='anonymous'``)."""

    kind: str
    name: str
    role: str  # device type for devices; a role of auth.roles for keys and users


class Credentials(Protocol):
    """Checks a bearer token (``auth.Guard``). Each raises ``AuthError`` (401) for unknown credentials
    and ``Forbidden`` (403) for known ones that may not do this."""

    def authorize(self, token: str | None, permission: str) -> Principal:
        """The caller, if their role grants ``permission`` (``PUBLIC``: anyone)."""
        ...

    def device(self, token: str | None, device_id: str) -> Principal:
        """The device ``device_id``, if ``token`` is its token."""
        ...

    def caller(self, token: str | None) -> Principal:
        """A device, an API key or a user, of any role."""
        ...

    def charge(self, who: Principal, nbytes: int) -> None:
        """Count ``nbytes`` of payload against ``who``'s quota; ``RateLimited`` (429) when over."""
        ...


def bearer(authorization: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header, else ``None``."""
    if authorization and authorization[:7].lower() == "bearer ":
        return authorization[7:].strip() or None
    return None


_BEARER = HTTPBearer(auto_error=False, scheme_name="bearer",
                     description="A device's token, an API key or a user's access token: 'Authorization: Bearer <token>'")


def _token(credentials: Annotated[HTTPAuthorizationCredentials | None, Security(_BEARER)]) -> str | None:
    return (credentials.credentials.strip() or None) if credentials is not None else None


Token = Annotated[str | None, Depends(_token)]
"""The bearer token, if any."""

PUBLIC = "public"
"""The permission of routes anyone may call (``needs_permission(PUBLIC)``)."""

PERMISSION_KEY = "x-permission"
"""Where a route that checks its caller by a plain call (no dependency) declares its permission:
``openapi_extra={PERMISSION_KEY: "predict"}`` (it then appears in the OpenAPI document too)."""


def needs_permission(permission: str) -> Any:
    """A dependency answering the caller (a ``Principal``) if their role grants ``permission``
    (a name of ``auth.roles.PERMISSIONS``, or ``PUBLIC``); 401 or 403 otherwise::

        async def post_train(req: TrainRequest, who: Annotated[Principal, needs_permission("ml:write")]): ...

    Every route declares one: ``route_permission`` reads it back, and a test walks the OpenAPI
    document checking each route against each role."""

    if permission == PUBLIC:  # no bearer scheme in the OpenAPI document: none is asked for

        def public(request: Request) -> Principal:
            request.state.permission = PUBLIC
            return Principal("anonymous", "", "")

        public.permission = PUBLIC  # type: ignore[attr-defined]
        return Depends(public)

    def check(request: Request, token: Token) -> Principal:
        request.state.permission = permission
        credentials = provided(request, Credentials)
        if permission != PUBLIC:  # who it is, for the audit of a refusal (cached: the second look is cheap)
            request.state.principal = credentials.caller(token)
        return credentials.authorize(token, permission)

    check.permission = permission  # type: ignore[attr-defined]
    return Depends(check)


def route_permission(route: Any) -> str | None:
    """The permission ``route`` declares (through ``needs_permission``, ``DeviceOwner`` or
    ``openapi_extra[PERMISSION_KEY]``), else ``None``."""
    extra = getattr(route, "openapi_extra", None) or {}
    if PERMISSION_KEY in extra:
        return extra[PERMISSION_KEY]
    pending = [getattr(route, "dependant", None)]
    while pending:
        current = pending.pop()
        if current is None:
            continue
        found = getattr(current.call, "permission", None)
        if found:
            return found
        pending.extend(current.dependencies)
    return None


def api_routes(app: FastAPI) -> Iterator[tuple[str, str, Any]]:
    """``(method, path, route)`` of every route of ``app``, included routers' too (path with prefix)."""
    try:
        from fastapi.routing import iter_route_contexts
    except ImportError:  # FastAPI before included routers were kept lazily
        contexts: Iterable[Any] = ((r, getattr(r, "path_format", None)) for r in app.routes)
    else:
        contexts = ((c.original_route, c.path_format) for c in iter_route_contexts(app.routes))
    for route, path in contexts:
        for method in sorted(getattr(route, "methods", None) or ()):
            if path is not None and method != "HEAD":
                yield method, path, route


def document_permissions(app: FastAPI) -> None:
    """Write each route's declared permission into ``app.openapi()`` as ``x-permission``; a route
    that declares none has none there (and the permission walk of the tests fails on it)."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema and app.openapi_schema.get("x-permissions-documented"):
            return app.openapi_schema
        schema = build()
        for method, path, route in api_routes(app):
            operation = schema.get("paths", {}).get(path, {}).get(method.lower())
            permission = route_permission(route)
            if operation is not None and permission:
                operation[PERMISSION_KEY] = permission
        schema["x-permissions-documented"] = True
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


def _device_owner(device_id: str, request: Request, token: Token) -> Principal:
    check_device_id(device_id)  # a bad id is named before credentials are looked at
    request.state.permission = "telemetry:write"
    who = provided(request, Credentials).device(token, device_id)
    request.state.principal = who
    return who


_device_owner.permission = "telemetry:write"  # type: ignore[attr-defined]

Public = Annotated[Principal, needs_permission(PUBLIC)]
"""Anyone (log in, health)."""
DeviceOwner = Annotated[Principal, Depends(_device_owner)]
"""The device of the ``{device_id}`` path parameter, with its own token (``telemetry:write``)."""


# --------------------------------------------------------------------------- audit


class AuditSink(Protocol):
    """Where the audit middleware hands one row per write or denied request (``auth.audit.AuditLog``):
    ``add`` must never block."""

    def add(self, row: dict[str, Any]) -> None: ...


def install_audit(app: FastAPI, sink: AuditSink, *, skip: frozenset[str] = frozenset()) -> None:
    """Record every write (a method other than GET/HEAD/OPTIONS) and every request answered 401 or
    403 in ``sink``: who, role, action (the route's permission), target (method and path), outcome
    (the status), the client address, the time. Routes whose path template is in ``skip`` (telemetry,
    predictions: kept in their own tables) are recorded only when denied. No header, body or token
    is recorded. A plain ASGI middleware: it adds a dict lookup to a request, not a task."""
    app.add_middleware(_Audit, sink=sink, skip=skip)


class _Audit:
    def __init__(self, app: Any, *, sink: AuditSink, skip: frozenset[str]) -> None:
        self.app = app
        self.sink = sink
        self.skip = skip

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        state = scope.setdefault("state", {})  # what the permission dependency leaves: principal, permission
        status = [500]

        async def sent(message: Any) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sent)
        finally:
            self._record(scope, state, status[0])

    def _record(self, scope: Any, state: dict[str, Any], status: int) -> None:
        denied = status in (401, 403)
        method = scope.get("method", "")
        if not denied and method in ("GET", "HEAD", "OPTIONS"):
            return
        route = scope.get("route")
        if not denied and getattr(route, "path", None) in self.skip:
            return
        who = state.get("principal")
        client = scope.get("client")
        try:
            self.sink.add({
                "ts": time.time(), "who": who.name if who is not None else None,
                "kind": who.kind if who is not None else None, "role": who.role if who is not None else None,
                "action": state.get("permission") or (route_permission(route) if route is not None else None),
                "target": f"{method} {scope.get('path', '')}",
                "outcome": "denied" if denied else ("ok" if status < 400 else "failed"), "status": status,
                "address": client[0] if client else None,
            })
        except Exception:  # noqa: BLE001 - the audit never fails a request
            log.exception("audit row dropped")


# --------------------------------------------------------------------------- /metrics


def render_metrics() -> tuple[bytes, str]:
    """Prometheus exposition: every process of this data dir when ``PROMETHEUS_MULTIPROC_DIR`` is set."""
    from prometheus_client import (
        CONTENT_TYPE_LATEST,
        REGISTRY,
        CollectorRegistry,
        generate_latest,
    )

    folder = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if folder and os.path.isdir(folder):
        from prometheus_client import multiprocess

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=folder)
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST


def add_metrics_route(app: FastAPI) -> None:
    """``GET /metrics``."""

    @app.get("/metrics", summary="Prometheus metrics of every iot2ml process on this data dir",
             response_class=PlainTextResponse, openapi_extra={PERMISSION_KEY: PUBLIC})
    async def metrics() -> Response:
        body, content_type = render_metrics()
        return Response(body, media_type=content_type)
