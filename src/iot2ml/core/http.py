"""What every HTTP app of iot2ml shares (the API and the serving process alike).

- Who is calling: ``bearer`` reads ``Authorization: Bearer <token>``; the app is handed the
  ``Credentials`` that check it (``auth.Guard``) and routes ask for a ``Principal`` by declaring
  ``Admin``, ``Reader``, ``Caller``, ``Operator`` or ``DeviceOwner``.
- What a route needs: each module's router names a small object of its dependencies (``needs``);
  the composition root hands it in with ``provide(app, obj)``. No route reaches into another module.
- Errors: ``http_status(err)`` is the one status mapping of the error tree drawn in
  ``core/errors.py``; ``install_error_handlers`` answers every ``Iot2mlError`` (and
  ``PermissionError``) with ``{"detail": ...}`` and that status.
- ``/metrics``: Prometheus metrics of every iot2ml process of this data dir.

Imported only by the HTTP modules (``import iot2ml`` loads no FastAPI); prometheus_client only when
``/metrics`` is read. Imports nothing of ours outside ``core``.
"""

from __future__ import annotations

import os
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
    Transient,
)
from .ids import check_device_id

T = TypeVar("T")


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
    return json_response({"detail": error_detail(err)}, http_status(err))


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
    """An authenticated caller: a device (``kind='device'``) or an API key (``kind='key'``)."""

    kind: str
    name: str
    role: str  # device type for devices; 'admin' or 'reader' for keys


class Credentials(Protocol):
    """Checks a bearer token (``auth.Guard``). Each raises ``AuthError`` (401) for unknown credentials
    and ``Forbidden`` (403) for known ones that may not do this."""

    def device(self, token: str | None, device_id: str) -> Principal:
        """The device ``device_id``, if ``token`` is its token."""
        ...

    def caller(self, token: str | None) -> Principal:
        """A device or an API key of any role."""
        ...

    def key(self, token: str | None, *, role: str = "reader") -> Principal:
        """An API key; ``role='admin'`` requires an admin key."""
        ...

    def operator(self, token: str | None) -> Principal:
        """An admin API key, or the data dir's control secret (the CLI on this machine)."""
        ...


def bearer(authorization: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header, else ``None``."""
    if authorization and authorization[:7].lower() == "bearer ":
        return authorization[7:].strip() or None
    return None


_BEARER = HTTPBearer(auto_error=False, scheme_name="bearer",
                     description="A device's token or an API key: 'Authorization: Bearer <token>'")


def _token(credentials: Annotated[HTTPAuthorizationCredentials | None, Security(_BEARER)]) -> str | None:
    return (credentials.credentials.strip() or None) if credentials is not None else None


Token = Annotated[str | None, Depends(_token)]
"""The bearer token, if any."""


def _admin(request: Request, token: Token) -> Principal:
    return provided(request, Credentials).key(token, role="admin")


def _reader(request: Request, token: Token) -> Principal:
    return provided(request, Credentials).key(token, role="reader")


def _caller(request: Request, token: Token) -> Principal:
    return provided(request, Credentials).caller(token)


def _operator(request: Request, token: Token) -> Principal:
    return provided(request, Credentials).operator(token)


def _device_owner(device_id: str, request: Request, token: Token) -> Principal:
    check_device_id(device_id)  # a bad id is named before credentials are looked at
    return provided(request, Credentials).device(token, device_id)


Admin = Annotated[Principal, Depends(_admin)]
"""An admin API key (writes)."""
Reader = Annotated[Principal, Depends(_reader)]
"""Any API key (reads)."""
Caller = Annotated[Principal, Depends(_caller)]
"""A device token or an API key of any role."""
Operator = Annotated[Principal, Depends(_operator)]
"""An admin API key or the data dir's control secret."""
DeviceOwner = Annotated[Principal, Depends(_device_owner)]
"""The device of the ``{device_id}`` path parameter, with its own token."""


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
             response_class=PlainTextResponse)
    async def metrics() -> Response:
        body, content_type = render_metrics()
        return Response(body, media_type=content_type)
