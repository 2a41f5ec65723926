"""The SQL catalog: device types, devices with their hashed tokens, API keys.

SQLite under the data dir by default, PostgreSQL (or any SQLAlchemy URL) at scale. Every change
bumps ``version`` so that the broker and the API notice it without a restart.

Tokens are random 192-bit secrets, stored only as SHA-256 (looked up by the HTTP API) and as a
cheap bcrypt hash (checked by the NATS server at CONNECT, which accepts only bcrypt). With that much
entropy a slow hash adds nothing, and a cheap one keeps reconnect storms cheap.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import threading
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Iterator

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError, OperationalError

from .errors import AlreadyExists, InvalidInput, NotFound, Transient
from .ids import check_device_id, check_type_name, column_name

BCRYPT_ROUNDS = 4
ROLES = ("admin", "reader")
FIELD_TYPES = {
    "float": "float", "double": "float", "number": "float",
    "int": "int", "integer": "int", "bigint": "int",
    "string": "string", "text": "string", "str": "string",
    "bool": "bool", "boolean": "bool",
    "timestamp": "timestamp",
}

_meta = sa.MetaData()
_types = sa.Table(
    "device_types", _meta,
    sa.Column("name", sa.String(64), primary_key=True),
    sa.Column("schema_json", sa.Text, nullable=True),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
)
_devices = sa.Table(
    "devices", _meta,
    sa.Column("device_id", sa.String(128), primary_key=True),
    sa.Column("type", sa.String(64), sa.ForeignKey("device_types.name"), nullable=False),
    sa.Column("token_sha256", sa.String(64), nullable=True, unique=True),
    sa.Column("token_bcrypt", sa.String(80), nullable=True),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
)
_keys = sa.Table(
    "api_keys", _meta,
    sa.Column("name", sa.String(128), primary_key=True),
    sa.Column("key_sha256", sa.String(64), nullable=False, unique=True),
    sa.Column("role", sa.String(16), nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
)
_schedules = sa.Table(
    "schedules", _meta,
    sa.Column("name", sa.String(128), primary_key=True),
    sa.Column("job_json", sa.Text, nullable=False),
    sa.Column("every_seconds", sa.Float, nullable=True),
    sa.Column("min_new_rows", sa.BigInteger, nullable=True),
    sa.Column("on_labels", sa.Boolean, nullable=False, default=False),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
)
_runs = sa.Table(
    "schedule_runs", _meta,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("schedule", sa.String(128), nullable=False, index=True),
    sa.Column("trigger", sa.String(64), nullable=False),
    sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
    sa.Column("status", sa.String(16), nullable=False),  # running, ok, failed
    sa.Column("duration_s", sa.Float, nullable=True),
    sa.Column("error", sa.Text, nullable=True),
    sa.Column("model_version", sa.Integer, nullable=True),
    sa.Column("table_rows", sa.BigInteger, nullable=True),
    sa.Column("labels_version", sa.BigInteger, nullable=True),
)
_state = sa.Table(
    "catalog_state", _meta,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("version", sa.BigInteger, nullable=False),
)


@dataclass(frozen=True)
class Device:
    device_id: str
    type: str
    active: bool


@dataclass(frozen=True)
class DeviceType:
    name: str
    schema: dict[str, str] | None


def sha256(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def _now() -> datetime:
    return datetime.now(timezone.utc)


def normalise_url(url: str) -> str:
    """Use psycopg 3 for ``postgresql://`` URLs."""
    if url.startswith("postgresql://") or url.startswith("postgres://"):
        return "postgresql+psycopg://" + url.split("://", 1)[1]
    return url


def parse_schema(spec: str | dict[str, str] | None) -> dict[str, str] | None:
    """Parse ``"pressure:float,flow:float"`` (or a dict) into ``{column: type}``.

    >>> parse_schema("pressure:float, count:int")
    {'pressure': 'float', 'count': 'int'}
    """
    if spec is None or spec == "":
        return None
    items = spec.items() if isinstance(spec, dict) else (
        part.split(":", 1) if ":" in part else (part, "")
        for part in (p.strip() for p in spec.split(",")) if part
    )
    out: dict[str, str] = {}
    for name, kind in items:
        kind = str(kind).strip().lower()
        if kind not in FIELD_TYPES:
            raise InvalidInput(
                f"schema field {name!r} has type {kind!r}: use one of float, int, string, bool, timestamp"
            )
        out[column_name(str(name).strip())] = FIELD_TYPES[kind]
    return out


class Catalog:
    """Devices, device types and API keys in a SQL database."""

    def __init__(self, url: str) -> None:
        url = normalise_url(url)
        kwargs: dict[str, Any] = {"future": True, "pool_pre_ping": True}
        if url.startswith("sqlite"):
            db_path = sa.engine.make_url(url).database
            if db_path and db_path != ":memory:":
                from pathlib import Path

                Path(db_path).parent.mkdir(parents=True, exist_ok=True)
            kwargs["connect_args"] = {"timeout": 30, "check_same_thread": False}
        self.url = url
        self._engine = sa.create_engine(url, **kwargs)
        if url.startswith("sqlite"):
            sa.event.listen(self._engine, "connect", _sqlite_pragmas)
        self._lock = threading.Lock()
        try:
            _meta.create_all(self._engine)
            with self._engine.begin() as conn:
                if conn.execute(sa.select(_state.c.version)).first() is None:
                    conn.execute(_state.insert().values(id=1, version=0))
        except IntegrityError:
            pass  # another process created the state row first
        except OperationalError as err:
            raise Transient(f"catalog {self._safe_url()} is unreachable: {err.orig}") from err

    def _safe_url(self) -> str:
        return sa.engine.make_url(self.url).render_as_string(hide_password=True)

    def close(self) -> None:
        self._engine.dispose()

    def _tx(self) -> Any:
        return self._engine.begin()

    def _bump(self, conn: Any) -> None:
        conn.execute(_state.update().where(_state.c.id == 1).values(version=_state.c.version + 1))

    def version(self) -> int:
        """A counter that grows on every change to devices, types or keys."""
        with self._engine.connect() as conn:
            return int(conn.execute(sa.select(_state.c.version)).scalar_one())

    # ---- device types -------------------------------------------------------------------
    def add_type(self, name: str, schema: str | dict[str, str] | None = None, *, exist_ok: bool = False) -> DeviceType:
        check_type_name(name)
        parsed = parse_schema(schema)
        with self._tx() as conn:
            row = conn.execute(sa.select(_types).where(_types.c.name == name)).first()
            if row is not None:
                if not exist_ok:
                    raise AlreadyExists(f"device type {name!r} exists: use 'iot2ml types show {name}'")
                if parsed is not None:
                    conn.execute(_types.update().where(_types.c.name == name).values(schema_json=json.dumps(parsed)))
                    self._bump(conn)
                return self._type_from_row(row) if parsed is None else DeviceType(name, parsed)
            conn.execute(_types.insert().values(
                name=name, schema_json=json.dumps(parsed) if parsed else None, created_at=_now()))
            self._bump(conn)
        return DeviceType(name, parsed)

    @staticmethod
    def _type_from_row(row: Any) -> DeviceType:
        return DeviceType(row.name, json.loads(row.schema_json) if row.schema_json else None)

    def get_type(self, name: str) -> DeviceType:
        with self._engine.connect() as conn:
            row = conn.execute(sa.select(_types).where(_types.c.name == name)).first()
        if row is None:
            raise NotFound(f"no device type {name!r}: add a device with '--type {name}' first")
        return self._type_from_row(row)

    def list_types(self) -> list[DeviceType]:
        with self._engine.connect() as conn:
            rows = conn.execute(sa.select(_types).order_by(_types.c.name)).all()
        return [self._type_from_row(r) for r in rows]

    # ---- devices ------------------------------------------------------------------------
    def add_device(self, device_id: str, type_name: str, *, rotate: bool = False) -> str:
        """Register ``device_id`` (or with ``rotate`` give an existing one a new token); return the token."""
        import bcrypt

        check_device_id(device_id)
        check_type_name(type_name)
        token = secrets.token_urlsafe(24)
        hashed = bcrypt.hashpw(token.encode(), bcrypt.gensalt(rounds=BCRYPT_ROUNDS)).decode()
        values = {"token_sha256": sha256(token), "token_bcrypt": hashed, "revoked_at": None}
        self.add_type(type_name, exist_ok=True)
        with self._tx() as conn:
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
            self._bump(conn)
        return token

    def remove_device(self, device_id: str) -> None:
        """Revoke the device's token. Its rows stay; messages it sent before still land."""
        with self._tx() as conn:
            done = conn.execute(
                _devices.update()
                .where(_devices.c.device_id == device_id, _devices.c.revoked_at.is_(None))
                .values(revoked_at=_now(), token_sha256=None, token_bcrypt=None)
            ).rowcount
            if not done:
                raise NotFound(f"no active device {device_id!r}: see 'iot2ml devices list'")
            self._bump(conn)

    def get_device(self, device_id: str) -> Device | None:
        with self._engine.connect() as conn:
            row = conn.execute(
                sa.select(_devices.c.device_id, _devices.c.type, _devices.c.revoked_at)
                .where(_devices.c.device_id == device_id)
            ).first()
        return None if row is None else Device(row.device_id, row.type, row.revoked_at is None)

    def device_types(self) -> dict[str, str]:
        """``{device_id: type}`` for every device ever registered (revoked ones too)."""
        with self._engine.connect() as conn:
            return dict(conn.execute(sa.select(_devices.c.device_id, _devices.c.type)).all())

    def list_devices(self) -> list[Device]:
        with self._engine.connect() as conn:
            rows = conn.execute(
                sa.select(_devices.c.device_id, _devices.c.type, _devices.c.revoked_at).order_by(_devices.c.device_id)
            ).all()
        return [Device(r.device_id, r.type, r.revoked_at is None) for r in rows]

    def device_for_token(self, token: str) -> Device | None:
        """The active device holding ``token``, or ``None``."""
        with self._engine.connect() as conn:
            row = conn.execute(
                sa.select(_devices.c.device_id, _devices.c.type)
                .where(_devices.c.token_sha256 == sha256(token), _devices.c.revoked_at.is_(None))
            ).first()
        return None if row is None else Device(row.device_id, row.type, True)

    def broker_users(self) -> Iterator[tuple[str, str]]:
        """``(device_id, bcrypt hash)`` of every active device, for the broker's config."""
        with self._engine.connect() as conn:
            yield from conn.execute(
                sa.select(_devices.c.device_id, _devices.c.token_bcrypt)
                .where(_devices.c.revoked_at.is_(None)).order_by(_devices.c.device_id)
            ).all()

    # ---- API keys -----------------------------------------------------------------------
    def add_key(self, name: str, role: str = "admin") -> str:
        if role not in ROLES:
            raise InvalidInput(f"role {role!r} is not known: use one of {', '.join(ROLES)}")
        if not name or len(name) > 128:
            raise InvalidInput("key name must be 1-128 characters")
        key = "i2m_" + secrets.token_urlsafe(32)
        try:
            with self._tx() as conn:
                conn.execute(_keys.insert().values(name=name, key_sha256=sha256(key), role=role, created_at=_now()))
                self._bump(conn)
        except IntegrityError:
            raise AlreadyExists(f"API key {name!r} exists: remove it first or choose another name") from None
        return key

    def set_key(self, name: str, key: str, role: str = "admin") -> None:
        """Store a key chosen elsewhere (the admin key kept in the data dir)."""
        with self._tx() as conn:
            conn.execute(_keys.delete().where(_keys.c.name == name))
            conn.execute(_keys.insert().values(name=name, key_sha256=sha256(key), role=role, created_at=_now()))
            self._bump(conn)

    def remove_key(self, name: str) -> None:
        with self._tx() as conn:
            if not conn.execute(_keys.delete().where(_keys.c.name == name)).rowcount:
                raise NotFound(f"no API key {name!r}")
            self._bump(conn)

    def key_role(self, key: str) -> tuple[str, str] | None:
        """``(name, role)`` of the API key, or ``None``."""
        with self._engine.connect() as conn:
            row = conn.execute(sa.select(_keys.c.name, _keys.c.role).where(_keys.c.key_sha256 == sha256(key))).first()
        return None if row is None else (row.name, row.role)

    def list_keys(self) -> list[tuple[str, str]]:
        with self._engine.connect() as conn:
            return [tuple(r) for r in conn.execute(sa.select(_keys.c.name, _keys.c.role).order_by(_keys.c.name)).all()]


@dataclass(frozen=True)
class Schedule:
    name: str
    job: dict[str, Any]
    every_seconds: float | None
    min_new_rows: int | None
    on_labels: bool


class Schedules:
    """Retraining schedules and the history of their runs, in the catalog database."""

    def __init__(self, catalog: Catalog) -> None:
        self._engine = catalog._engine

    def add(self, name: str, job: dict[str, Any], *, every_seconds: float | None = None,
            min_new_rows: int | None = None, on_labels: bool = False, replace: bool = False) -> Schedule:
        if not name or len(name) > 128:
            raise InvalidInput("schedule name must be 1-128 characters")
        if every_seconds is None and min_new_rows is None and not on_labels:
            raise InvalidInput(f"schedule {name!r} has no trigger: give --every, --min-new-rows or --on-labels")
        if every_seconds is not None and every_seconds <= 0:
            raise InvalidInput(f"--every {every_seconds!r} must be a positive duration such as 30m or 1h")
        row = {"name": name, "job_json": json.dumps(job), "every_seconds": every_seconds,
               "min_new_rows": min_new_rows, "on_labels": on_labels, "created_at": _now()}
        with self._engine.begin() as conn:
            if conn.execute(sa.select(_schedules.c.name).where(_schedules.c.name == name)).first():
                if not replace:
                    raise AlreadyExists(f"schedule {name!r} exists: remove it first")
                conn.execute(_schedules.delete().where(_schedules.c.name == name))
            conn.execute(_schedules.insert().values(**row))
        return Schedule(name, job, every_seconds, min_new_rows, on_labels)

    def remove(self, name: str) -> None:
        with self._engine.begin() as conn:
            if not conn.execute(_schedules.delete().where(_schedules.c.name == name)).rowcount:
                raise NotFound(f"no schedule {name!r}: see 'iot2ml schedule list'")

    def list(self) -> list[Schedule]:
        with self._engine.connect() as conn:
            rows = conn.execute(sa.select(_schedules).order_by(_schedules.c.name)).all()
        return [Schedule(r.name, json.loads(r.job_json), r.every_seconds, r.min_new_rows, bool(r.on_labels))
                for r in rows]

    def start_run(self, name: str, trigger: str, *, table_rows: int | None, labels_version: int | None) -> int:
        with self._engine.begin() as conn:
            result = conn.execute(_runs.insert().values(
                schedule=name, trigger=trigger, started_at=_now(), status="running",
                table_rows=table_rows, labels_version=labels_version))
            return int(result.inserted_primary_key[0])

    def finish_run(self, run_id: int, *, ok: bool, duration_s: float, error: str | None = None,
                   model_version: int | None = None) -> None:
        with self._engine.begin() as conn:
            conn.execute(_runs.update().where(_runs.c.id == run_id).values(
                finished_at=_now(), status="ok" if ok else "failed", duration_s=duration_s,
                error=(error or None) and error[:4000], model_version=model_version))

    def runs(self, name: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
        query = sa.select(_runs).order_by(_runs.c.id.desc()).limit(limit)
        if name:
            query = query.where(_runs.c.schedule == name)
        with self._engine.connect() as conn:
            rows = conn.execute(query).all()
        return [
            {k: (v.isoformat() if isinstance(v, datetime) else v) for k, v in r._mapping.items()}
            for r in rows
        ]

    def last_run(self, name: str) -> dict[str, Any] | None:
        found = self.runs(name, limit=1)
        return found[0] if found else None


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()
