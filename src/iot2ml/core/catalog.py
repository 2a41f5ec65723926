"""The SQL catalog: one database that modules keep their small stores in.

SQLite under the data dir by default, PostgreSQL (or any SQLAlchemy URL) at scale. This module knows
no store: each module declares its tables on ``metadata`` and registers them when it opens its store
(``auth/store.py``: device types, devices, API keys; ``ml/schedules.py``: retraining schedules;
``serve/deployments.py``: deployments and their audit trail)::

    _things = sa.Table("things", metadata, sa.Column("name", sa.String(64), primary_key=True))

    class Things:
        def __init__(self, catalog: Catalog) -> None:
            self.catalog = catalog
            catalog.register(_things)

        def add(self, name: str) -> None:
            with self.catalog.begin() as conn:
                conn.execute(_things.insert().values(name=name))
                self.catalog.bump(conn)  # if others watch this store for changes

A store that others watch (the broker re-renders its users, the API and serving re-read device
types) calls ``bump`` in the transaction of each change; they compare ``version()`` to notice it.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError, OperationalError, ProgrammingError

from .errors import Transient

__all__ = ["Catalog", "metadata", "normalise_url"]

metadata = sa.MetaData()
"""Every catalog table, declared by the module that owns it."""

_state = sa.Table(
    "catalog_state", metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("version", sa.BigInteger, nullable=False),
)


def normalise_url(url: str) -> str:
    """Use psycopg 3 for ``postgresql://`` URLs."""
    if url.startswith("postgresql://") or url.startswith("postgres://"):
        return "postgresql+psycopg://" + url.split("://", 1)[1]
    return url


class Catalog:
    """A connection pool to the catalog database, the tables registered on it and its change counter."""

    def __init__(self, url: str) -> None:
        url = normalise_url(url)
        kwargs: dict[str, Any] = {"future": True, "pool_pre_ping": True}
        if url.startswith("sqlite"):
            db_path = sa.engine.make_url(url).database
            if db_path and db_path != ":memory:":
                Path(db_path).parent.mkdir(parents=True, exist_ok=True)
            kwargs["connect_args"] = {"timeout": 30, "check_same_thread": False}
        self.url = url
        self._engine = sa.create_engine(url, **kwargs)
        if url.startswith("sqlite"):
            sa.event.listen(self._engine, "connect", _sqlite_pragmas)
        self._lock = threading.Lock()
        self._registered: set[str] = set()
        self.register(_state)
        try:
            with self.begin() as conn:
                if conn.execute(sa.select(_state.c.version)).first() is None:
                    conn.execute(_state.insert().values(id=1, version=0))
        except IntegrityError:
            pass  # another process created the state row first

    @property
    def safe_url(self) -> str:
        """The URL without its password, for messages."""
        return sa.engine.make_url(self.url).render_as_string(hide_password=True)

    def register(self, *tables: sa.Table) -> None:
        """Create ``tables`` (declared on ``metadata``) unless they exist; once per table and catalog.

        A table made by an older release gets the columns added since (each new column must be
        nullable or have a server default, so existing rows stay valid)."""
        with self._lock:
            todo = [t for t in tables if t.name not in self._registered]
            if not todo:
                return
            for attempt in range(2):
                try:
                    with self._translated():
                        metadata.create_all(self._engine, tables=todo)
                        self._add_new_columns(todo)
                    break
                except (IntegrityError, ProgrammingError):
                    if attempt:  # another process created them at the same moment: look again once
                        raise
            self._registered.update(t.name for t in todo)

    def _add_new_columns(self, tables: list[sa.Table]) -> None:
        inspector = sa.inspect(self._engine)
        for table in tables:
            have = {c["name"] for c in inspector.get_columns(table.name)}
            for column in table.columns:
                if column.name in have:
                    continue
                kind = column.type.compile(dialect=self._engine.dialect)
                default = "" if column.server_default is None else f" DEFAULT '{column.server_default.arg}'"
                null = "" if column.nullable or default else " NULL"
                with self._engine.begin() as conn:
                    conn.execute(sa.text(f'ALTER TABLE "{table.name}" ADD COLUMN "{column.name}" {kind}{default}{null}'))

    @contextlib.contextmanager
    def begin(self) -> Iterator[sa.Connection]:
        """A connection in a transaction: committed when the block ends, rolled back if it raises."""
        with self._translated(), self._engine.begin() as conn:
            yield conn

    @contextlib.contextmanager
    def connect(self) -> Iterator[sa.Connection]:
        """A connection for reads."""
        with self._translated(), self._engine.connect() as conn:
            yield conn

    def bump(self, conn: sa.Connection) -> None:
        """Count a change, inside the transaction ``conn`` that makes it."""
        conn.execute(_state.update().where(_state.c.id == 1).values(version=_state.c.version + 1))

    def version(self) -> int:
        """A counter that grows with every change a store counted with ``bump``."""
        with self.connect() as conn:
            return int(conn.execute(sa.select(_state.c.version)).scalar_one())

    def close(self) -> None:
        self._engine.dispose()

    @contextlib.contextmanager
    def _translated(self) -> Iterator[None]:
        try:
            yield
        except OperationalError as err:
            raise Transient(f"catalog {self.safe_url} is unreachable or busy: {err.orig}") from err


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()
