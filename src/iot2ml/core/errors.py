"""The iot2ml exception tree, with the HTTP status each answers with (``core.http.http_status``).

::

    Iot2mlError                                                                      HTTP
     +-- ConfigError        bad setting: names the key, the value and the fix        400
     +-- Transient          worth retrying (the retry loops decide by type)          503
     |    +-- BrokerUnavailable
     |    +-- LakeUnavailable
     |    +-- ModelFailed   a model raised, or did not load, on valid input
     |    +-- NotConfirmed  a deployment change is stored; a serving process
     |    |                 did not serve it in time                                 504
     |    +-- RateLimited   a caller over its rate limit or payload quota; says
     |                      when to retry (``Retry-After``)                          429
     +-- Terminal           retrying will not help                                   400
          +-- InvalidInput  data that parses but is wrong: names the field           422
          |    +-- PayloadTooLarge   a body over max_payload_bytes                   413
          +-- Malformed     not a request at all (not JSON, not an object), or a
          |                 telemetry message refused with every reason              400
          +-- NotFound      no such device, table, type, key, model or deployment    404
          +-- AlreadyExists                                                          409
          +-- AuthError     wrong or missing credentials                             401
          +-- Forbidden     known credentials that may not do this                   403
          |                 (also a ``PermissionError``, which answers 403 too)
          +-- QueryError    SQL that cannot run, or is not allowed to                400
          +-- PortInUse     ports we were asked to bind are taken, named at once     400

Anything else that escapes a route is a 500: a bug.
"""

from __future__ import annotations


class Iot2mlError(Exception):
    """Root of every error iot2ml raises on purpose."""


class ConfigError(Iot2mlError):
    """A setting has a bad value."""


class Transient(Iot2mlError):
    """A failure that may go away: retry with backoff."""


class Terminal(Iot2mlError):
    """A failure that retrying will not fix."""


class BrokerUnavailable(Transient):
    """The message broker cannot be reached."""


class LakeUnavailable(Transient):
    """The lake (local disk or object store) cannot be written or read."""


class ModelFailed(Transient):
    """The model raised or could not be loaded while answering valid input (the serving runtime)."""


class NotConfirmed(Transient):
    """A deployment change is stored, but a serving process did not answer with it in time."""


class RateLimited(Transient):
    """A device, API key or user is over its rate limit or payload quota (``auth.limits``):
    ``retry_after`` is the whole seconds (>= 1) before the request would be served."""

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = max(1, int(retry_after))


class InvalidInput(Terminal):
    """Data from a device or a client is not acceptable; the message says why."""


class PayloadTooLarge(InvalidInput):
    """A request body is over ``max_payload_bytes``."""


class Malformed(Terminal):
    """A body that cannot be read as a request (not JSON, not an object), or a message refused as a
    whole: ``reasons`` lists every problem when there are several."""

    def __init__(self, message: str, reasons: list[str] | None = None) -> None:
        super().__init__(message)
        self.reasons = list(reasons or [])


class NotFound(Terminal):
    """No such device, device type, table or key."""


class AlreadyExists(Terminal):
    """The thing to create exists already."""


class AuthError(Terminal):
    """Missing, wrong or revoked credentials."""


class Forbidden(Terminal, PermissionError):
    """The credentials are known but may not do this (another device's data, a reader key on an admin route)."""


class QueryError(Terminal):
    """SQL that cannot run, or that is not allowed (writes, file or network access)."""


class PortInUse(Terminal):
    """Ports to listen on are taken by other programs: ``busy`` maps each flag to its port.

    With ``fix`` (one command line that uses free ports instead) the message says to run it, else it
    names the flag to change.
    """

    def __init__(self, busy: dict[str, int], *, fix: str | None = None) -> None:
        self.busy = dict(busy)
        self.flag, self.port = next(iter(self.busy.items()))
        if fix is None:
            flags = ", ".join(self.busy)
            ports = ", ".join(str(p) for p in self.busy.values())
            message = (f"port {ports} is already in use: pass {flags} with a free port, or {self.flag} 0 to pick one"
                       if len(self.busy) == 1 else
                       f"ports {ports} are already in use: pass {flags} with free ports, or 0 to pick them")
        else:
            named = ", ".join(f"{port} ({flag})" for flag, port in self.busy.items())
            message = (f"port {named} is already in use" if len(self.busy) == 1 else
                       f"ports {named} are already in use") + f": run `{fix}`"
        super().__init__(message)
