"""Credential checks for HTTP, with a short cache so a device posting every second does not hit the
catalog every time. Revocations show within ``ttl`` seconds.

``Guard`` is the ``core.http.Credentials`` the composition roots hand to their apps."""

from __future__ import annotations

import hmac
import time

from ..core.catalog import Catalog
from ..core.errors import AuthError, Forbidden
from ..core.http import Principal
from .store import Devices, Keys, sha256

__all__ = ["Guard", "Principal"]


class Guard:
    """Device tokens and API keys from ``catalog``; ``control`` is the data dir's control secret
    (``core.runtime.control_token``), accepted by ``operator`` for the CLI on this machine."""

    def __init__(self, catalog: Catalog, *, ttl: float = 2.0, control: str | None = None) -> None:
        self.catalog = catalog
        self.devices = Devices(catalog)
        self.keys = Keys(catalog)
        self.ttl = ttl
        self._control = control
        self._cache: dict[str, tuple[float, Principal | None]] = {}

    def _cached(self, kind: str, secret: str, load) -> Principal | None:
        key = kind + sha256(secret)
        now = time.monotonic()
        hit = self._cache.get(key)
        if hit is not None and now - hit[0] < self.ttl:
            return hit[1]
        found = load()
        if len(self._cache) > 100_000:
            self._cache.clear()
        self._cache[key] = (now, found)
        return found

    def device(self, token: str | None, device_id: str) -> Principal:
        """The device for ``token``; ``AuthError`` (401) if unknown, ``Forbidden`` (403) if another device's."""
        if not token:
            raise AuthError("missing device token: send 'Authorization: Bearer <token>'")

        def load() -> Principal | None:
            dev = self.devices.device_for_token(token)
            return None if dev is None else Principal("device", dev.device_id, dev.type)

        who = self._cached("d", token, load)
        if who is None:
            raise AuthError("unknown or revoked device token")
        if who.name != device_id:
            raise Forbidden(f"this token belongs to device {who.name!r}, not {device_id!r}")
        return who

    def caller(self, token: str | None) -> Principal:
        """Whoever ``token`` belongs to: a device (``kind='device'``, ``role`` = its type) or an API key of
        any role (``kind='key'``); ``AuthError`` (401) when it is neither."""
        if not token:
            raise AuthError("missing credentials: send 'Authorization: Bearer <device token or API key>'")

        def device() -> Principal | None:
            dev = self.devices.device_for_token(token)
            return None if dev is None else Principal("device", dev.device_id, dev.type)

        def key() -> Principal | None:
            found = self.keys.key_role(token)
            return None if found is None else Principal("key", found[0], found[1])

        who = self._cached("d", token, device) or self._cached("k", token, key)
        if who is None:
            raise AuthError("unknown or revoked device token or API key")
        return who

    def key(self, key: str | None, *, role: str = "reader") -> Principal:
        """The API key's principal; ``role='admin'`` requires an admin key."""
        if not key:
            raise AuthError("missing API key: send 'Authorization: Bearer <key>' (see 'iot2ml keys add')")

        def load() -> Principal | None:
            found = self.keys.key_role(key)
            return None if found is None else Principal("key", found[0], found[1])

        who = self._cached("k", key, load)
        if who is None:
            raise AuthError("unknown API key")
        if role == "admin" and who.role != "admin":
            raise Forbidden(f"API key {who.name!r} has role {who.role!r}; this needs an admin key")
        return who

    def operator(self, token: str | None) -> Principal:
        """The data dir's control secret (``Principal('key', 'local', 'admin')``), else an admin API key."""
        if token and self._control and hmac.compare_digest(token.encode(), self._control.encode()):
            return Principal("key", "local", "admin")
        return self.key(token, role="admin")
