"""People: users with a role and an argon2id password hash, their sessions and tokens, in the catalog.

A login answers a short-lived access token (a JWT signed HS256 with a key kept in the catalog, so
every API and serving process of a catalog checks it; ``aud`` and ``iss`` checked) and an opaque
refresh token (stored only as SHA-256). Each login starts a session (a refresh *family*): a refresh
answers a new pair and marks the old refresh token used; presenting a used one again revokes the
whole family, access tokens included (``docs/decisions/0012-users-roles-tokens.md``).

Failed logins lock the user out for a time that doubles with each failure past
``TokenPolicy.max_failures`` (kept in the catalog, so every process sees it) and likewise the
client address (kept in this process).
"""

from __future__ import annotations

import hashlib
import math
import re
import secrets
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError

from ..core.catalog import Catalog, metadata
from ..core.errors import AlreadyExists, AuthError, InvalidInput, NotFound
from .roles import check_role

__all__ = ["Session", "TokenPolicy", "Users"]

ISSUER = "iot2ml"
ALGORITHM = "HS256"
MIN_PASSWORD = 8
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$")

_users = sa.Table(
    "users", metadata,
    sa.Column("name", sa.String(64), primary_key=True),
    sa.Column("password_hash", sa.Text, nullable=False),
    sa.Column("role", sa.String(16), nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("disabled_at", sa.DateTime(timezone=True), nullable=True),
    sa.Column("failed_logins", sa.Integer, nullable=False, server_default="0"),
    sa.Column("locked_until", sa.Float, nullable=True),  # epoch seconds
)
_sessions = sa.Table(
    "auth_sessions", metadata,
    sa.Column("family", sa.String(32), primary_key=True),
    sa.Column("user_name", sa.String(64), nullable=False, index=True),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("revoked_at", sa.Float, nullable=True),
    sa.Column("revoked_why", sa.String(64), nullable=True),
)
_refresh = sa.Table(
    "refresh_tokens", metadata,
    sa.Column("token_sha256", sa.String(64), primary_key=True),
    sa.Column("family", sa.String(32), nullable=False, index=True),
    sa.Column("issued_at", sa.Float, nullable=False),
    sa.Column("expires_at", sa.Float, nullable=False),
    sa.Column("used_at", sa.Float, nullable=True),
)
_secrets = sa.Table(
    "auth_secrets", metadata,
    sa.Column("name", sa.String(64), primary_key=True),
    sa.Column("value", sa.Text, nullable=False),
)


@dataclass(frozen=True)
class TokenPolicy:
    """Lifetimes and lockout (``core.config.Settings`` ``auth_*``; see ``from_settings``)."""

    access_ttl: float = 900.0
    refresh_ttl: float = 7 * 86400.0
    audience: str = "iot2ml"
    max_failures: int = 5
    max_failures_per_address: int = 20
    lockout: float = 30.0
    lockout_max: float = 900.0

    @classmethod
    def from_settings(cls, settings: Any) -> TokenPolicy:
        return cls(access_ttl=settings.auth_access_ttl, refresh_ttl=settings.auth_refresh_ttl,
                   audience=settings.auth_audience, max_failures=settings.auth_max_failures,
                   max_failures_per_address=settings.auth_max_failures_per_address,
                   lockout=settings.auth_lockout, lockout_max=settings.auth_lockout_max)

    def lock_for(self, failures: int, limit: int) -> float:
        """Seconds locked after ``failures`` failures in a row (0 below ``limit``; doubling past it)."""
        if failures < limit:
            return 0.0
        return min(self.lockout * 2 ** min(failures - limit, 30), self.lockout_max)


@dataclass(frozen=True)
class Session:
    """Who an access token speaks for: the user, their role now, the session (refresh family)."""

    user: str
    role: str
    family: str


def _sha256(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def _hasher() -> Any:
    from argon2 import (
        PasswordHasher,  # argon2id, RFC 9106 low-memory profile by default
    )

    return PasswordHasher()


def check_user_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME.match(name):
        raise InvalidInput(f"user name {name!r} is not allowed: use 1-64 letters, digits, '_', '.', '@', '-'")
    return name


def check_password(password: str) -> str:
    if not isinstance(password, str) or len(password) < MIN_PASSWORD:
        raise InvalidInput(f"password is too short: use at least {MIN_PASSWORD} characters")
    if len(password) > 1024:
        raise InvalidInput("password is too long: use at most 1024 characters")
    return password


class Users:
    """Users, sessions and tokens in ``catalog``."""

    def __init__(self, catalog: Catalog, policy: TokenPolicy | None = None) -> None:
        self.catalog = catalog
        self.policy = policy or TokenPolicy()
        catalog.register(_users, _sessions, _refresh, _secrets)
        self._hash = _hasher()
        self._dummy = self._hash.hash(secrets.token_urlsafe(16))  # same work for unknown users
        self._key: bytes | None = None
        self._addresses: dict[str, tuple[int, float, float]] = {}  # address -> (failures, last, locked until)
        self._lock = threading.Lock()

    # ---- users --------------------------------------------------------------------------
    def add_user(self, name: str, password: str, role: str) -> None:
        check_user_name(name)
        check_role(role)
        hashed = self._hash.hash(check_password(password))
        try:
            with self.catalog.begin() as conn:
                conn.execute(_users.insert().values(name=name, password_hash=hashed, role=role,
                                                    created_at=datetime.now(timezone.utc), failed_logins=0))
                self.catalog.bump(conn)
        except IntegrityError:
            raise AlreadyExists(f"user {name!r} exists: 'iot2ml users passwd {name}' changes the password") from None

    def set_password(self, name: str, password: str) -> None:
        """A new password; the user's sessions are revoked and a lockout lifted."""
        hashed = self._hash.hash(check_password(password))
        self._update(name, password_hash=hashed, failed_logins=0, locked_until=None)
        self.revoke_sessions(name, why="password changed")

    def set_role(self, name: str, role: str) -> None:
        self._update(name, role=check_role(role))

    def disable(self, name: str) -> None:
        """The user can no longer log in; their tokens stop working (within the guard's cache time)."""
        self._update(name, disabled_at=datetime.now(timezone.utc))
        self.revoke_sessions(name, why="user disabled")

    def enable(self, name: str) -> None:
        self._update(name, disabled_at=None, failed_logins=0, locked_until=None)

    def remove(self, name: str) -> None:
        with self.catalog.begin() as conn:
            if not conn.execute(_users.delete().where(_users.c.name == name)).rowcount:
                raise NotFound(f"no user {name!r}: see 'iot2ml users list'")
            self.catalog.bump(conn)
        self.revoke_sessions(name, why="user removed")

    def list_users(self) -> list[dict[str, Any]]:
        with self.catalog.connect() as conn:
            rows = conn.execute(sa.select(_users).order_by(_users.c.name)).all()
        now = time.time()
        return [{"name": r.name, "role": r.role, "active": r.disabled_at is None,
                 "locked": bool(r.locked_until and r.locked_until > now), "failed_logins": r.failed_logins}
                for r in rows]

    def get_user(self, name: str) -> dict[str, Any]:
        """One row of ``list_users``; ``NotFound`` if there is no such user."""
        found = [u for u in self.list_users() if u["name"] == name]
        if not found:
            raise NotFound(f"no user {name!r}: see 'iot2ml users list'")
        return found[0]

    def _update(self, name: str, **values: Any) -> None:
        with self.catalog.begin() as conn:
            if not conn.execute(_users.update().where(_users.c.name == name).values(**values)).rowcount:
                raise NotFound(f"no user {name!r}: see 'iot2ml users list'")
            self.catalog.bump(conn)

    # ---- login, refresh, logout ---------------------------------------------------------
    def login(self, name: str, password: str, *, address: str | None = None) -> dict[str, Any]:
        """The token pair for a right password; ``AuthError`` otherwise (the same message for an unknown
        user and a wrong password), or while the user or ``address`` is locked out."""
        now = time.time()
        self._check_address(address, now)
        with self.catalog.connect() as conn:
            row = conn.execute(sa.select(_users).where(_users.c.name == name)).first() if isinstance(name, str) else None
        if row is not None and row.locked_until and row.locked_until > now:
            raise AuthError(f"too many failed logins for {name!r}: retry in {int(row.locked_until - now) + 1} s")
        if not self._verify(row.password_hash if row is not None else self._dummy, password):
            self._failed(row, address, now)
            raise AuthError("wrong user name or password")
        if row.disabled_at is not None:
            raise AuthError(f"user {name!r} is disabled: ask an admin ('iot2ml users enable')")
        values: dict[str, Any] = {"failed_logins": 0, "locked_until": None}
        if self._hash.check_needs_rehash(row.password_hash):
            values["password_hash"] = self._hash.hash(password)
        with self.catalog.begin() as conn:
            conn.execute(_users.update().where(_users.c.name == name).values(**values))
        family = uuid.uuid4().hex
        with self.catalog.begin() as conn:
            conn.execute(_sessions.insert().values(family=family, user_name=name, created_at=now))
            refresh = self._new_refresh(conn, family, now)
        return self._pair(name, row.role, family, refresh, now)

    def refresh(self, refresh_token: str) -> dict[str, Any]:
        """A new pair for an unused refresh token (which is then used up). A used one revokes its
        whole session: someone else holds a copy."""
        now = time.time()
        digest = _sha256(refresh_token or "")
        with self.catalog.begin() as conn:
            row = conn.execute(sa.select(_refresh).where(_refresh.c.token_sha256 == digest)).first()
            if row is None:
                raise AuthError("unknown refresh token: log in again")
            session = conn.execute(sa.select(_sessions).where(_sessions.c.family == row.family)).first()
            if session is None or session.revoked_at is not None:
                raise AuthError("this session was ended: log in again")
            if row.expires_at <= now:
                raise AuthError("refresh token expired: log in again")
            taken = conn.execute(_refresh.update().where(_refresh.c.token_sha256 == digest,
                                                         _refresh.c.used_at.is_(None)).values(used_at=now)).rowcount
            if taken:
                user = conn.execute(sa.select(_users.c.role, _users.c.disabled_at)
                                    .where(_users.c.name == session.user_name)).first()
                if user is None or user.disabled_at is not None:
                    raise AuthError(f"user {session.user_name!r} is disabled or removed")
                refresh = self._new_refresh(conn, row.family, now)
        if not taken:  # outside the transaction above, so the revocation stays whatever happens next
            self._revoke_family(row.family, "refresh token reused")
            raise AuthError("refresh token already used: the session is revoked, log in again")
        return self._pair(session.user_name, user.role, row.family, refresh, now)

    def logout(self, refresh_token: str | None = None, *, family: str | None = None) -> bool:
        """End the session of ``refresh_token`` (or ``family``); whether there was one."""
        if refresh_token:
            with self.catalog.connect() as conn:
                family = conn.execute(sa.select(_refresh.c.family)
                                      .where(_refresh.c.token_sha256 == _sha256(refresh_token))).scalar()
        return bool(family) and self._revoke_family(family, "logout")

    def revoke_sessions(self, name: str, *, why: str) -> None:
        with self.catalog.begin() as conn:
            conn.execute(_sessions.update().where(_sessions.c.user_name == name, _sessions.c.revoked_at.is_(None))
                         .values(revoked_at=time.time(), revoked_why=why))
            self.catalog.bump(conn)

    def _revoke_family(self, family: str, why: str) -> bool:
        with self.catalog.begin() as conn:
            done = conn.execute(_sessions.update().where(_sessions.c.family == family, _sessions.c.revoked_at.is_(None))
                                .values(revoked_at=time.time(), revoked_why=why)).rowcount
            self.catalog.bump(conn)
        return bool(done)

    def _new_refresh(self, conn: sa.Connection, family: str, now: float) -> str:
        token = "i2r_" + secrets.token_urlsafe(32)
        conn.execute(_refresh.insert().values(token_sha256=_sha256(token), family=family, issued_at=now,
                                              expires_at=now + self.policy.refresh_ttl))
        return token

    def _pair(self, name: str, role: str, family: str, refresh: str, now: float) -> dict[str, Any]:
        import jwt

        claims = {"iss": ISSUER, "aud": self.policy.audience, "sub": name, "role": role, "sid": family,
                  "iat": int(now), "exp": math.ceil(now + self.policy.access_ttl), "jti": uuid.uuid4().hex}
        access = jwt.encode(claims, self.signing_key(), algorithm=ALGORITHM)
        return {"access_token": access, "refresh_token": refresh, "token_type": "bearer",
                "expires_in": int(self.policy.access_ttl)}

    # ---- access tokens ------------------------------------------------------------------
    def decode(self, token: str) -> dict[str, Any]:
        """The claims of a valid access token; ``AuthError`` (401) naming what is wrong otherwise
        (bad signature or algorithm, tampered, expired, another audience or issuer)."""
        import jwt

        try:
            return jwt.decode(token, self.signing_key(), algorithms=[ALGORITHM], audience=self.policy.audience,
                              issuer=ISSUER, options={"require": ["exp", "iat", "sub", "aud", "iss", "sid"]})
        except jwt.ExpiredSignatureError:
            raise AuthError("access token expired: refresh it (POST /api/v1/auth/refresh) or log in again") from None
        except jwt.InvalidAudienceError:
            raise AuthError("access token is for another audience") from None
        except jwt.InvalidTokenError as err:
            raise AuthError(f"invalid access token: {type(err).__name__}") from None

    def session(self, name: str, family: str) -> Session | None:
        """The session ``family`` of user ``name`` if it and the user are still active."""
        with self.catalog.connect() as conn:
            row = conn.execute(
                sa.select(_users.c.role)
                .select_from(_users.join(_sessions, _sessions.c.user_name == _users.c.name))
                .where(_users.c.name == name, _users.c.disabled_at.is_(None), _sessions.c.family == family,
                       _sessions.c.revoked_at.is_(None))
            ).first()
        return None if row is None else Session(name, row.role, family)

    def signing_key(self) -> bytes:
        """The HS256 key of this catalog's access tokens, made on first use."""
        if self._key is None:
            with self._lock:
                if self._key is None:
                    self._key = self._load_key()
        return self._key

    def _load_key(self) -> bytes:
        for _ in range(2):
            with self.catalog.connect() as conn:
                value = conn.execute(sa.select(_secrets.c.value).where(_secrets.c.name == "jwt")).scalar()
            if value:
                return bytes.fromhex(value)
            try:
                with self.catalog.begin() as conn:
                    conn.execute(_secrets.insert().values(name="jwt", value=secrets.token_hex(64)))
            except IntegrityError:
                continue  # another process made it first: read theirs
        raise AuthError("the token signing key could not be read from the catalog")

    # ---- failures -----------------------------------------------------------------------
    def _verify(self, hashed: str, password: Any) -> bool:
        from argon2.exceptions import InvalidHashError, VerificationError

        if not isinstance(password, str):
            return False
        try:
            return self._hash.verify(hashed, password)
        except (VerificationError, InvalidHashError):
            return False

    def _check_address(self, address: str | None, now: float) -> None:
        if not address:
            return
        with self._lock:
            _failures, _last, until = self._addresses.get(address, (0, 0.0, 0.0))
        if until > now:
            raise AuthError(f"too many failed logins from {address}: retry in {int(until - now) + 1} s")

    def _failed(self, row: Any, address: str | None, now: float) -> None:
        if row is not None:
            failures = row.failed_logins + 1
            lock = self.policy.lock_for(failures, self.policy.max_failures)
            with self.catalog.begin() as conn:
                conn.execute(_users.update().where(_users.c.name == row.name).values(
                    failed_logins=_users.c.failed_logins + 1, locked_until=now + lock if lock else None))
        if address:
            with self._lock:
                failures, last, _until = self._addresses.get(address, (0, 0.0, 0.0))
                if now - last > self.policy.lockout_max:
                    failures = 0  # a quiet spell forgives
                failures += 1
                lock = self.policy.lock_for(failures, self.policy.max_failures_per_address)
                if len(self._addresses) > 100_000:
                    self._addresses.clear()
                self._addresses[address] = (failures, now, now + lock if lock else 0.0)
