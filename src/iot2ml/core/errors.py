"""The iot2ml exception tree.

::

    Iot2mlError
     +-- ConfigError              bad setting: names the key, the value and the fix
     +-- Transient                worth retrying (the retry loops decide by type)
     |    +-- BrokerUnavailable
     |    +-- LakeUnavailable
     +-- Terminal                 retrying will not help
          +-- InvalidInput        bad data from a device or client (becomes a 4xx or a dead letter)
          +-- NotFound            no such device, table, type or key
          +-- AlreadyExists
          +-- AuthError           wrong or missing credentials
          +-- QueryError          SQL that cannot run, or is not allowed to
          +-- PortInUse           a port we were asked to bind is taken
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


class InvalidInput(Terminal):
    """Data from a device or a client is not acceptable; the message says why."""


class NotFound(Terminal):
    """No such device, device type, table or key."""


class AlreadyExists(Terminal):
    """The thing to create exists already."""


class AuthError(Terminal):
    """Missing, wrong or revoked credentials."""


class QueryError(Terminal):
    """SQL that cannot run, or that is not allowed (writes, file or network access)."""


class PortInUse(Terminal):
    """A port to listen on is taken by another program."""

    def __init__(self, port: int, flag: str) -> None:
        super().__init__(f"port {port} is already in use: pass {flag} with a free port, or {flag} 0 to pick one")
        self.port = port
        self.flag = flag
