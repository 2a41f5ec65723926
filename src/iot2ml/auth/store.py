"""Who exists: device types, devices with their hashed tokens, API keys with their roles, in the catalog.

Every change bumps the catalog's ``version`` so that the broker and the API notice it without a restart.

Tokens are random 192-bit secrets, stored only as SHA-256 (looked up by the HTTP API) and as a
cheap bcrypt hash (checked by the NATS server at CONNECT, which accepts only bcrypt). With that much
entropy a slow hash adds nothing, and a cheap one keeps reconnect storms cheap.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from typing import Any

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError

from ..core.catalog import Catalog, metadata
from ..core.devices import Device, DeviceType, parse_schema
from ..core.errors import AlreadyExists, InvalidInput, NotFound
from ..core.ids import check_device_id, check_type_name
from .roles import ROLES as _ROLES
from .roles import check_role

__all__ = ["BCRYPT_ROUNDS", "Devices", "Keys", "ROLES", "sha256"]

BCRYPT_ROUNDS = 4
MAX_KEY_LIFETIME = 100 * 365 * 86400.0
ROLES = (*_ROLES, "reader")
"""Roles an API key may take: those of ``auth.roles`` and ``reader`` (viewer + predict; keys made before roles)."""

_types = sa.Table(
    "device_types", metadata,
    sa.Column("name", sa.String(64), primary_key=True),
    sa.Column("schema_json", sa.Text, nullable=True),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
)
_devices = sa.Table(
    "devices", metadata,
    sa.Column("device_id", sa.String(128), primary_key=True),
    sa.Column("type", sa.String(64), sa.ForeignKey("device_types.name"), nullable=False),
    sa.Column("token_sha256", sa.String(64), nullable=True, unique=True),
    sa.Column("token_bcrypt", sa.String(80), nullable=True),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
)
_keys = sa.Table(
    "api_keys", metadata,
    sa.Column("name", sa.String(128), primary_key=True),
    sa.Column("key_sha256", sa.String(64), nullable=False, unique=True),
    sa.Column("role", sa.String(16), nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("expires_at", sa.Float, nullable=True),  # epoch seconds; null = never
)

_certs = sa.Table(
    "certificates", metadata,
    sa.Column("serial", sa.String(64), primary_key=True),  # the id in the subject (SERIALNUMBER=...)
    sa.Column("kind", sa.String(16), nullable=False),  # device | claim
    sa.Column("name", sa.String(128), nullable=False, index=True),  # the device id or the claim name
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("not_after", sa.DateTime(timezone=True), nullable=False),
    sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
)
_claims = sa.Table(
    "provisioning_claims", metadata,
    sa.Column("name", sa.String(64), primary_key=True),
    sa.Column("type", sa.String(64), nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
)


def sha256(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def _now() -> datetime:
    return datetime.now(timezone.utc)


class Devices:
    """Device types and devices (a ``core.devices.DeviceDirectory``)."""

    def __init__(self, catalog: Catalog) -> None:
        self.catalog = catalog
        catalog.register(_types, _devices, _certs, _claims)

    def version(self) -> int:
        """The catalog's change counter (grows with every change of devices, types or keys)."""
        return self.catalog.version()

    # ---- device types -------------------------------------------------------------------
    def add_type(self, name: str, schema: str | dict[str, str] | None = None, *, exist_ok: bool = False) -> DeviceType:
        check_type_name(name)
        parsed = parse_schema(schema)
        with self.catalog.begin() as conn:
            row = conn.execute(sa.select(_types).where(_types.c.name == name)).first()
            if row is not None:
                if not exist_ok:
                    raise AlreadyExists(f"device type {name!r} exists: use 'iot2ml types show {name}'")
                if parsed is not None:
                    conn.execute(_types.update().where(_types.c.name == name).values(schema_json=json.dumps(parsed)))
                    self.catalog.bump(conn)
                return _type_from_row(row) if parsed is None else DeviceType(name, parsed)
            conn.execute(_types.insert().values(
                name=name, schema_json=json.dumps(parsed) if parsed else None, created_at=_now()))
            self.catalog.bump(conn)
        return DeviceType(name, parsed)

    def get_type(self, name: str) -> DeviceType:
        with self.catalog.connect() as conn:
            row = conn.execute(sa.select(_types).where(_types.c.name == name)).first()
        if row is None:
            raise NotFound(f"no device type {name!r}: add a device with '--type {name}' first")
        return _type_from_row(row)

    def list_types(self) -> list[DeviceType]:
        with self.catalog.connect() as conn:
            rows = conn.execute(sa.select(_types).order_by(_types.c.name)).all()
        return [_type_from_row(r) for r in rows]

    # ---- devices ------------------------------------------------------------------------
    def add_device(self, device_id: str, type_name: str, *, rotate: bool = False, token: bool = True) -> str:
        """Register ``device_id`` (or with ``rotate`` give an existing one a new token); return the token
        ('' with ``token=False``: a device that logs in with a certificate only)."""
        import bcrypt

        check_device_id(device_id)
        check_type_name(type_name)
        secret = secrets.token_urlsafe(24) if token else ""
        values: dict[str, Any] = {"revoked_at": None}
        if token:
            hashed = bcrypt.hashpw(secret.encode(), bcrypt.gensalt(rounds=BCRYPT_ROUNDS)).decode()
            values.update(token_sha256=sha256(secret), token_bcrypt=hashed)
        self.add_type(type_name, exist_ok=True)
        with self.catalog.begin() as conn:
            row = conn.execute(sa.select(_devices).where(_devices.c.device_id == device_id)).first()
            if row is not None:
                if row.type != type_name:
                    raise AlreadyExists(
                        f"device {device_id!r} exists with type {row.type!r}, not {type_name!r}: pick another id"
                    )
                if row.revoked_at is None and not rotate:
                    raise AlreadyExists(f"device {device_id!r} exists: pass --rotate to issue a new token")
                conn.execute(_devices.update().where(_devices.c.device_id == device_id).values(**values))
            else:
                conn.execute(_devices.insert().values(
                    device_id=device_id, type=type_name, created_at=_now(), **values))
            self.catalog.bump(conn)
        return secret

    def remove_device(self, device_id: str) -> None:
        """Revoke the device's token. Its rows stay; messages it sent before still land."""
        with self.catalog.begin() as conn:
            done = conn.execute(
                _devices.update()
                .where(_devices.c.device_id == device_id, _devices.c.revoked_at.is_(None))
                .values(revoked_at=_now(), token_sha256=None, token_bcrypt=None)
            ).rowcount
            if not done:
                raise NotFound(f"no active device {device_id!r}: see 'iot2ml devices list'")
            conn.execute(_certs.update().where(_certs.c.kind == "device", _certs.c.name == device_id,
                                               _certs.c.revoked_at.is_(None)).values(revoked_at=_now()))
            self.catalog.bump(conn)

    def get_device(self, device_id: str) -> Device | None:
        with self.catalog.connect() as conn:
            row = conn.execute(
                sa.select(_devices.c.device_id, _devices.c.type, _devices.c.revoked_at)
                .where(_devices.c.device_id == device_id)
            ).first()
        return None if row is None else Device(row.device_id, row.type, row.revoked_at is None)

    def device_types(self) -> dict[str, str]:
        """``{device_id: type}`` for every device ever registered (revoked ones too)."""
        with self.catalog.connect() as conn:
            return dict(conn.execute(sa.select(_devices.c.device_id, _devices.c.type)).all())

    def list_devices(self) -> list[Device]:
        with self.catalog.connect() as conn:
            rows = conn.execute(
                sa.select(_devices.c.device_id, _devices.c.type, _devices.c.revoked_at).order_by(_devices.c.device_id)
            ).all()
        return [Device(r.device_id, r.type, r.revoked_at is None) for r in rows]

    def device_for_token(self, token: str) -> Device | None:
        """The active device holding ``token``, or ``None``."""
        with self.catalog.connect() as conn:
            row = conn.execute(
                sa.select(_devices.c.device_id, _devices.c.type)
                .where(_devices.c.token_sha256 == sha256(token), _devices.c.revoked_at.is_(None))
            ).first()
        return None if row is None else Device(row.device_id, row.type, True)

    def broker_users(self) -> Iterator[tuple[str, str]]:
        """``(device_id, bcrypt hash)`` of every active device, for the broker's config."""
        with self.catalog.connect() as conn:
            rows = conn.execute(
                sa.select(_devices.c.device_id, _devices.c.token_bcrypt)
                .where(_devices.c.revoked_at.is_(None)).order_by(_devices.c.device_id)
            ).all()
        for row in rows:
            yield row.device_id, row.token_bcrypt


class Keys:
    """API keys, their roles (``auth.roles``: viewer, data-scientist, operator, admin; ``reader`` for
    keys made before roles) and an optional expiry."""

    def __init__(self, catalog: Catalog) -> None:
        self.catalog = catalog
        catalog.register(_keys)

    def add_key(self, name: str, role: str = "admin", *, expires: float | None = None) -> str:
        """Create the key ``name``, valid for ``expires`` seconds (``None``: until removed); return
        the key (shown once, stored only hashed)."""
        check_role(role, legacy=True)
        if not name or len(name) > 128:
            raise InvalidInput("key name must be 1-128 characters")
        if expires is not None and not (0 < expires <= MAX_KEY_LIFETIME):  # NaN too
            raise InvalidInput(f"expires {expires!r} must be a positive duration up to 100 years, e.g. 30d")
        key = "i2m_" + secrets.token_urlsafe(32)
        until = None if expires is None else time.time() + expires
        try:
            with self.catalog.begin() as conn:
                conn.execute(_keys.insert().values(name=name, key_sha256=sha256(key), role=role, created_at=_now(),
                                                   expires_at=until))
                self.catalog.bump(conn)
        except IntegrityError:
            raise AlreadyExists(f"API key {name!r} exists: remove it first or choose another name") from None
        return key

    def set_key(self, name: str, key: str, role: str = "admin") -> None:
        """Store a key chosen elsewhere (the admin key kept in the data dir)."""
        with self.catalog.begin() as conn:
            conn.execute(_keys.delete().where(_keys.c.name == name))
            conn.execute(_keys.insert().values(name=name, key_sha256=sha256(key), role=role, created_at=_now()))
            self.catalog.bump(conn)

    def remove_key(self, name: str) -> None:
        with self.catalog.begin() as conn:
            if not conn.execute(_keys.delete().where(_keys.c.name == name)).rowcount:
                raise NotFound(f"no API key {name!r}: see 'iot2ml keys list'")
            self.catalog.bump(conn)

    def key_role(self, key: str) -> tuple[str, str] | None:
        """``(name, role)`` of the API key, or ``None`` (unknown, removed or expired)."""
        with self.catalog.connect() as conn:
            row = conn.execute(sa.select(_keys.c.name, _keys.c.role, _keys.c.expires_at)
                               .where(_keys.c.key_sha256 == sha256(key))).first()
        if row is None or (row.expires_at is not None and row.expires_at <= time.time()):
            return None
        return row.name, row.role

    def list_keys(self) -> list[tuple[str, str]]:
        with self.catalog.connect() as conn:
            rows = conn.execute(sa.select(_keys.c.name, _keys.c.role).order_by(_keys.c.name)).all()
        return [(r.name, r.role) for r in rows]

    def describe_keys(self) -> list[dict[str, Any]]:
        """Every key: ``name``, ``role``, ``created_at``, ``expires_at`` (RFC 3339 or null), ``expired``."""
        with self.catalog.connect() as conn:
            rows = conn.execute(sa.select(_keys.c.name, _keys.c.role, _keys.c.created_at, _keys.c.expires_at)
                                .order_by(_keys.c.name)).all()
        now = time.time()
        return [{"name": r.name, "role": r.role, "created_at": _iso(r.created_at),
                 "expires_at": None if r.expires_at is None else _iso(datetime.fromtimestamp(r.expires_at, timezone.utc)),
                 "expired": r.expires_at is not None and r.expires_at <= now} for r in rows]


def _iso(value: datetime | None) -> str | None:
    if value is None:
        return None
    if value.tzinfo is None:  # SQLite gives naive datetimes back
        value = value.replace(tzinfo=timezone.utc)
    return value.isoformat().replace("+00:00", "Z")


def _type_from_row(row: Any) -> DeviceType:
    return DeviceType(row.name, json.loads(row.schema_json) if row.schema_json else None)
