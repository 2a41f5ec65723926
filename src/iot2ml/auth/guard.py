"""Credential checks for HTTP, with a short cache so a device posting every second does not hit the
catalog every time. Revocations by another process show within ``ttl`` seconds; those made through
this process's routes at once (``forget``).

``Guard`` is the ``core.http.Credentials`` the composition roots hand to their apps: it tells who a
bearer token belongs to (a device, an API key, a user's access token, the data dir's control secret)
and whether their role grants a route's declared permission (``auth.roles``).

It is also where requests are counted against their caller's rate limit (``auth.limits``): each
``authorize`` and ``device`` answer costs the caller one request, ``charge`` the bytes of a payload;
over a limit they raise ``RateLimited`` (429 with ``Retry-After``). The data dir's control secret
(the CLI on this machine, which can change the catalog anyway) is not limited; the admin API key
printed by ``iot2ml up`` is, like every key."""

from __future__ import annotations

import hmac
import time
from collections.abc import Callable

from ..core.catalog import Catalog
from ..core.errors import AuthError, Forbidden
from ..core.http import Principal
from .limits import Limits
from .roles import DEVICE_PERMISSIONS, PUBLIC, ROLE_PERMISSIONS, roles_with
from .store import Devices, Keys, sha256
from .users import TokenPolicy, Users

__all__ = ["Guard", "Principal"]

LOCAL = Principal("key", "local", "admin")
"""The data dir's control secret: the CLI on this machine, which can change the catalog anyway."""


class Guard:
    """Device tokens, API keys and users' access tokens from ``catalog``; ``control`` is the data dir's
    control secret (``core.runtime.control_token``), accepted as admin for the CLI on this machine;
    ``limits`` the rate limits of callers (``Limits.from_settings``; default none)."""

    def __init__(self, catalog: Catalog, *, ttl: float = 2.0, control: str | None = None,
                 policy: TokenPolicy | None = None, limits: Limits | None = None) -> None:
        self.catalog = catalog
        self.limits = limits or Limits.off()
        self.devices = Devices(catalog)
        self.keys = Keys(catalog)
        self.users = Users(catalog, policy)
        self.ttl = ttl
        self._control = control
        self._cache: dict[str, tuple[float, Principal | None]] = {}

    def forget(self) -> None:
        """Drop every cached answer: a revocation made by this process counts from the next request."""
        self._cache.clear()

    def _cached(self, kind: str, secret: str, load: Callable[[], Principal | None]) -> Principal | None:
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

    def _device(self, token: str) -> Principal | None:
        def load() -> Principal | None:
            dev = self.devices.device_for_token(token)
            return None if dev is None else Principal("device", dev.device_id, dev.type)

        return self._cached("d", token, load)

    def _key(self, token: str) -> Principal | None:
        def load() -> Principal | None:
            found = self.keys.key_role(token)
            return None if found is None else Principal("key", found[0], found[1])

        return self._cached("k", token, load)

    def _user(self, token: str) -> Principal:
        claims = self.users.decode(token)  # signature, algorithm, expiry, audience: raises AuthError

        def load() -> Principal | None:
            session = self.users.session(str(claims["sub"]), str(claims["sid"]))
            return None if session is None else Principal("user", session.user, session.role)

        who = self._cached("u", f"{claims['sub']}\0{claims['sid']}", load)
        if who is None:
            raise AuthError("this session was ended or the user is disabled: log in again")
        return who

    def device(self, token: str | None, device_id: str) -> Principal:
        """The device for ``token``; ``AuthError`` (401) if unknown, ``Forbidden`` (403) if another device's
        or not a device's at all."""
        if not token:
            raise AuthError("missing device token: send 'Authorization: Bearer <token>'")
        who = self._device(token)
        if who is None:
            try:
                other = self.caller(token)
            except AuthError:
                raise AuthError("unknown or revoked device token") from None
            raise Forbidden(f"{other.kind} {other.name!r} may not send telemetry as device {device_id!r}: "
                            "use the device's own token")
        if who.name != device_id:
            raise Forbidden(f"this token belongs to device {who.name!r}, not {device_id!r}")
        self.limits.admit(who)
        return who

    def caller(self, token: str | None) -> Principal:
        """Whoever ``token`` belongs to: a device (``kind='device'``, ``role`` = its type), an API key
        (``kind='key'``), a user's access token (``kind='user'``) or the control secret (admin);
        ``AuthError`` (401) when it is none of them."""
        if not token:
            raise AuthError("missing credentials: send 'Authorization: Bearer <token, API key or access token>'")
        if self._control and hmac.compare_digest(token.encode(), self._control.encode()):
            return LOCAL
        if token.count(".") == 2:  # a JWT; device tokens and API keys have no dots
            return self._user(token)
        who = self._device(token) or self._key(token)
        if who is None:
            raise AuthError("unknown or revoked device token or API key (or an expired key)")
        return who

    def authorize(self, token: str | None, permission: str) -> Principal:
        """The caller, if their role grants ``permission``; ``AuthError`` (401) for no or unknown
        credentials, ``Forbidden`` (403) naming the roles that would do."""
        if permission == PUBLIC:
            return Principal("anonymous", "", "")
        who = self.caller(token)
        if who is not LOCAL:
            self.limits.admit(who)  # denied requests count too: a flood of them is still a flood
        if who.kind == "device":
            if permission in DEVICE_PERMISSIONS:
                return who
            raise Forbidden(f"device {who.name!r} may only send its telemetry and ask for predictions; "
                            f"{permission} needs a user or API key with role {' or '.join(roles_with(permission))}")
        if permission not in ROLE_PERMISSIONS.get(who.role, ()):
            need = roles_with(permission)
            raise Forbidden(f"{who.kind} {who.name!r} has role {who.role!r}; {permission} needs "
                            + (f"role {' or '.join(need)}" if need else "a device's own token"))
        return who

    def charge(self, who: Principal, nbytes: int) -> None:
        """Count ``nbytes`` of a payload ``who`` sent (a device's telemetry or prediction body)
        against its byte quota; ``RateLimited`` (429) when over."""
        self.limits.charge(who, nbytes)

    # ---- before permissions (kept for callers of the first API) ---------------------------
    def key(self, key: str | None, *, role: str = "reader") -> Principal:
        """An API key or user; ``role='admin'`` requires the admin role."""
        if not key:
            raise AuthError("missing API key: send 'Authorization: Bearer <key>' (see 'iot2ml keys add')")
        who = self.caller(key)
        if who.kind == "device":
            raise Forbidden(f"device {who.name!r} may not do this: use an API key")
        if role == "admin" and who.role != "admin":
            raise Forbidden(f"{who.kind} {who.name!r} has role {who.role!r}; this needs the admin role")
        return who

    def operator(self, token: str | None) -> Principal:
        """The data dir's control secret, else an admin API key or user."""
        return self.key(token, role="admin")
