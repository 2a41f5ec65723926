"""Read-only SQL over the lake with DuckDB.

A query sees the lake tables it names, each at the Delta version that was the latest when it
started, and nothing else: no other files, no network, no extensions, no Python variables, no
settings changes. The text must be exactly one ``SELECT`` (as DuckDB's own parser classifies it;
``WITH``, ``FROM x``, ``DESCRIBE``, ``SUMMARIZE`` and ``VALUES`` are selects too). A watchdog
interrupts the query after ``timeout`` seconds.

Queries run on a cursor of an *engine*: a locked-down in-memory DuckDB database built once for one
set of table versions (and limits), shared by every query that reads the same versions, dropped
when a table moves on (docs/decisions/0015). In an engine, a table on local disk is a view over
``read_parquet`` of exactly its version's files, which are also the only files the engine may open
(``allowed_paths``; the sandbox is closed before any query runs); any other table (S3, deletion
vectors, column mapping) is registered per query as an Arrow dataset of its version.

>>> result = run_query(lake, "SELECT device_id, avg(pressure) FROM pump GROUP BY 1")  # doctest: +SKIP
>>> result.columns, result.rows[:1], result.truncated  # doctest: +SKIP
(['device_id', 'avg(pressure)'], [['pump-1', 3.2]], False)
"""

from __future__ import annotations

import base64
import datetime as _dt
import heapq
import itertools
import math
import re
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Collection
from dataclasses import dataclass, field
from decimal import Decimal
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote

import pyarrow as pa
import pyarrow.types as pat

from ..core.errors import Iot2mlError, LakeUnavailable, NotFound, QueryError

if TYPE_CHECKING:
    from ..lake.tables import Lake, Snapshot

# Set when the connection is made; ``lock_configuration`` is set last, after the settings that
# DuckDB only takes per session.
_CONNECT_CONFIG: dict[str, Any] = {
    "enable_external_access": False,  # no files, URLs, ATTACH, COPY, INSTALL/LOAD
    "autoinstall_known_extensions": False,
    "autoload_known_extensions": False,
    "allow_community_extensions": False,
    "python_enable_replacements": False,  # `FROM some_python_variable` must not work
    "temp_directory": "",  # never spill to disk: too big a query fails on memory_limit
}
_BATCH_ROWS = 8192
_MISSING_TABLE = re.compile(r"Table with name (\"?)(.+?)\1 does not exist", re.IGNORECASE)


@dataclass
class QueryResult:
    """Rows of one query, ready for JSON: timestamps as RFC 3339 text with ``Z``, NaN as ``None``."""

    columns: list[str]
    rows: list[list[Any]]
    truncated: bool
    _table: pa.Table = field(repr=False)

    def to_arrow(self) -> pa.Table:
        """The rows as a ``pyarrow.Table`` with their original types."""
        return self._table

    def to_polars(self) -> Any:
        """The rows as a ``polars.DataFrame``."""
        import polars as pl

        return pl.from_arrow(self._table)

    @property
    def types(self) -> list[str]:
        """Each column's Arrow type, e.g. ``timestamp[us, tz=UTC]``, ``double``, ``string``."""
        return [str(f.type) for f in self._table.schema]

    def to_dict(self) -> dict[str, Any]:
        """``{"columns", "types", "rows", "truncated"}``, as the HTTP API returns it."""
        return {"columns": self.columns, "types": self.types, "rows": self.rows, "truncated": self.truncated}


def run_query(
    lake: Lake,
    sql: str,
    *,
    timeout: float = 30,
    max_rows: int = 100_000,
    memory_limit: str = "1GB",
    threads: int = 2,
    hidden: Collection[str] = (),
) -> QueryResult:
    """Run one read-only ``SELECT`` over the lake; at most ``max_rows`` rows come back. Tables in
    ``hidden`` (e.g. ``audit`` for a caller without ``audit:read``) do not exist for the query.

    Raises ``QueryError`` for anything that is not a single ``SELECT`` over lake tables, for SQL
    errors, for a query running past ``timeout`` seconds (setting ``query_timeout``) and for one
    needing more than ``memory_limit``.
    """
    table, truncated = _execute(lake, sql, timeout=timeout, max_rows=max_rows, memory_limit=memory_limit,
                                threads=threads, hidden=hidden)
    return QueryResult(columns=table.column_names, rows=_json_rows(table), truncated=truncated, _table=table)


def query_arrow(
    lake: Lake,
    sql: str,
    *,
    timeout: float = 30,
    max_rows: int | None = None,
    memory_limit: str = "1GB",
    threads: int = 2,
) -> pa.Table:
    """Like ``run_query`` but return a ``pyarrow.Table``; ``max_rows=None`` returns every row."""
    table, _ = _execute(lake, sql, timeout=timeout, max_rows=max_rows, memory_limit=memory_limit, threads=threads)
    return table


def list_tables(lake: Lake, *, hidden: Collection[str] = ()) -> list[dict[str, Any]]:
    """Every lake table with its columns (name and SQL type), rows, data files and Delta version.

    Rows come from the per-file statistics in the Delta log (no data is read); ``rows`` is ``None``
    when some file was written without statistics.
    """
    out = []
    for name in [t for t in lake.tables() if t not in hidden]:
        try:
            dt = lake.open(name)
        except Iot2mlError:
            continue  # dropped meanwhile, or unreadable: it is not listed
        schema = pa.schema(dt.schema().to_arrow())
        types = _PARSER.sql_types(schema)
        actions = pa.table(dt.get_add_actions(flatten=True))
        counts = actions.column("num_records") if "num_records" in actions.column_names else None
        rows = None
        if counts is not None and counts.null_count == 0:
            rows = int(sum(counts.to_pylist()))
        out.append(
            {
                "name": name,
                "columns": [{"name": f.name, "type": types.get(f.name, str(f.type))} for f in schema],
                "rows": rows,
                "files": actions.num_rows,
                "version": dt.version(),
            }
        )
    return out


# ---- execution ---------------------------------------------------------------------------
def _execute(
    lake: Lake, sql: str, *, timeout: float, max_rows: int | None, memory_limit: str, threads: int,
    hidden: Collection[str] = (),
) -> tuple[pa.Table, bool]:
    if not isinstance(sql, str) or not sql.strip():
        raise QueryError("query is empty: send one SELECT statement, e.g. 'SELECT * FROM raw LIMIT 10'")
    if max_rows is not None and max_rows < 1:
        raise QueryError(f"max_rows {max_rows!r} is below 1: use a positive number (setting query_max_rows)")
    if not timeout > 0:
        raise QueryError(f"query_timeout {timeout!r} is not positive: use a number of seconds above 0")

    named = _PARSER.check(sql)
    existing = [t for t in lake.tables() if t not in hidden]
    snapshots = []
    for name in existing if named is None else [t for t in existing if t.lower() in named]:
        try:
            snapshots.append(lake.snapshot(name))
        except NotFound:
            continue  # dropped meanwhile: the query says it does not exist
    engine = _ENGINES.acquire(lake.root, snapshots, memory_limit=memory_limit, threads=threads)
    try:
        con = engine.cursor()
        try:
            for snap in engine.by_dataset:
                con.register(snap.table, snap.dataset())
            return _fetch(con, sql, timeout=timeout, max_rows=max_rows, memory_limit=memory_limit, existing=existing)
        except LakeUnavailable:
            for snap in snapshots:  # a file went missing (the table was rewritten): read the log again next time
                lake.forget(snap.table)
            raise
        finally:
            con.close()
    finally:
        _ENGINES.release(engine)


class _Parser:
    """One sandboxed connection without tables that classifies statements, names their tables and
    says which SQL type DuckDB gives each Arrow column."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._con: Any = None
        self._types: dict[bytes, dict[str, str]] = {}

    def _connect(self) -> Any:
        import duckdb

        if self._con is None:
            self._con = duckdb.connect(":memory:", config={**_CONNECT_CONFIG, "threads": 1})
            self._con.execute("SET lock_configuration=true")
        return self._con

    def sql_types(self, schema: pa.Schema) -> dict[str, str]:
        """``{column: SQL type}``, e.g. ``TIMESTAMP WITH TIME ZONE`` for ``timestamp[us, tz=UTC]``."""
        key = schema.serialize().to_pybytes()
        with self._lock:
            types = self._types.get(key)
            if types is None:
                con = self._connect()
                con.register("_iot2ml_schema", schema.empty_table())
                try:
                    types = {row[0]: row[1] for row in con.execute('DESCRIBE "_iot2ml_schema"').fetchall()}
                finally:
                    con.unregister("_iot2ml_schema")
                if len(self._types) >= 256:
                    self._types.clear()
                self._types[key] = types
            return dict(types)

    def check(self, sql: str) -> set[str] | None:
        """Refuse anything but one SELECT; the (lower-case) table names it reads, ``None`` when
        DuckDB cannot tell (its name lookup binds parts of the query, e.g. an ``ASOF`` join).

        A query that reaches for files is refused here already: the lookup binds its table
        functions, and this connection may open no file.
        """
        import duckdb

        with self._lock:
            con = self._connect()
            try:
                statements = con.extract_statements(sql)
            except duckdb.Error as err:
                raise QueryError(f"query is not valid SQL: {_first_line(err)}") from None
            if not statements:
                raise QueryError("query has no statement: send one SELECT statement")
            if len(statements) > 1:
                raise QueryError(f"query has {len(statements)} statements: send exactly one SELECT (no ';' between statements)")
            kind = statements[0].type.name
            if kind != "SELECT":
                raise QueryError(
                    f"query is a statement of type {kind}, but only SELECT is allowed: the lake is read-only "
                    "here (no INSERT, COPY, ATTACH, SET, PRAGMA, INSTALL/LOAD)"
                )
            try:
                return {n.lower() for n in con.get_table_names(sql, qualified=False)}
            except duckdb.PermissionException as err:
                raise _translate(err, memory_limit="", existing=[]) from None
            except Exception:  # noqa: BLE001 - the query names any visible table; the binder reports real problems
                return None


class _Engine:
    """One locked-down in-memory DuckDB database holding views of fixed table versions.

    Queries run on their own cursor (connection) of it. Tables read as plain Parquet are views over
    exactly their version's files, which are also the only files the database may open
    (``allowed_paths``); the others are registered per cursor as Arrow datasets of their version.
    """

    def __init__(self, key: tuple[Any, ...]) -> None:
        self.key = key
        self.db: Any = None
        self.by_dataset: list[Snapshot] = []
        self.error: BaseException | None = None
        self.ready = threading.Event()
        self.users = 0
        self.retired = False
        self._lock = threading.Lock()

    def build(self, snapshots: list[Snapshot], *, memory_limit: str, threads: int) -> None:
        import duckdb

        try:
            db = duckdb.connect(":memory:", config={**_CONNECT_CONFIG, "enable_external_access": True,
                                                    "memory_limit": memory_limit, "threads": threads})
        except duckdb.Error as err:
            raise QueryError(f"query engine cannot start with memory_limit={memory_limit!r}, threads={threads!r}: {_first_line(err)}") from None
        try:
            plain = [_plain_parquet(s) for s in snapshots]
            native = [s for s, ok in zip(snapshots, plain) if ok]
            self.by_dataset = [s for s, ok in zip(snapshots, plain) if not ok]
            if native:
                paths = [f.path for s in native for f in s.files or ()]
                db.execute(f"SET allowed_paths = [{', '.join(_literal(p) for p in paths)}]")
                for snap in native:
                    db.execute(f"CREATE VIEW {_ident(snap.table)} AS {_view_sql(db, snap)}")
            # The sandbox closes before any query runs: no other file, no network, no setting.
            db.execute("SET enable_external_access=false")
            db.execute("SET enable_progress_bar=false")
            db.execute("SET lock_configuration=true")
        except duckdb.IOException as err:
            db.close()
            raise LakeUnavailable(f"a lake file could not be read: {_first_line(err)}; run the query again") from None
        except BaseException:
            db.close()
            raise
        self.db = db

    def cursor(self) -> Any:
        with self._lock:
            return self.db.cursor()

    def close(self) -> None:
        if self.db is not None:
            self.db.close()


class _Engines:
    """Engines by (lake, table versions, limits), built once, shared by the queries that read the
    same versions, retired when a table moves on or when more than ``size`` are kept."""

    def __init__(self, size: int = 8) -> None:
        self.size = size
        self._lock = threading.Lock()
        self._engines: OrderedDict[tuple[Any, ...], _Engine] = OrderedDict()

    def acquire(self, root: str, snapshots: list[Snapshot], *, memory_limit: str, threads: int) -> _Engine:
        versions = tuple(sorted((s.key for s in snapshots), key=repr))
        key = (root, versions, memory_limit, threads)
        idle: list[_Engine] = []
        with self._lock:
            engine = self._engines.get(key)
            builder = engine is None
            if engine is None:
                engine = self._engines[key] = _Engine(key)
                idle = self._retire_locked(lambda k: k[0] == root and _moved_on(k[1], versions))
                while len(self._engines) > self.size:
                    idle += self._retire_locked(lambda k: True, first=True)
            else:
                self._engines.move_to_end(key)
            engine.users += 1
        for old in idle:
            old.close()
        if builder:
            try:
                engine.build(snapshots, memory_limit=memory_limit, threads=threads)
            except BaseException as err:
                engine.error = err
                with self._lock:
                    if self._engines.get(key) is engine:
                        del self._engines[key]
                raise
            finally:
                engine.ready.set()
                if engine.error is not None:
                    self.release(engine)
        else:
            engine.ready.wait()
            if engine.error is not None:
                self.release(engine)
                raise engine.error
        return engine

    def release(self, engine: _Engine) -> None:
        with self._lock:
            engine.users -= 1
            close = engine.retired and engine.users == 0
        if close:
            engine.close()

    def _retire_locked(self, which: Any, *, first: bool = False) -> list[_Engine]:
        idle = []
        for key in list(self._engines):
            if which(key):
                engine = self._engines.pop(key)
                engine.retired = True
                if engine.users == 0:
                    idle.append(engine)
                if first:
                    break
        return idle


def _moved_on(old: tuple[tuple[Any, ...], ...], new: tuple[tuple[Any, ...], ...]) -> bool:
    """Whether ``old`` holds a table at another version than ``new`` does (``Snapshot.key``)."""
    latest = {key[0]: key for key in new}
    return any(key[0] in latest and key != latest[key[0]] for key in old)


_GLOB = frozenset("*?[]{}")
_HIVE_TYPES = ("string", "large_string", "int8", "int16", "int32", "int64", "date32[day]", "bool")


def _plain_parquet(snap: Snapshot) -> bool:
    """Whether DuckDB reads exactly this version from its files: plain paths (no glob characters)
    and partition values that DuckDB decodes from the ``col=value`` folders as Delta has them."""
    if not snap.files:
        return False
    types = {f.name: str(f.type) for f in snap.schema}
    if any(types.get(c) not in _HIVE_TYPES for c in snap.partition_by):
        return False
    for f in snap.files:
        if _GLOB & set(f.path):
            return False
        folders = {}
        for part in f.path.split("/")[:-1]:
            name, eq, value = part.partition("=")
            if eq:
                folders[name] = unquote(value)
        if any(value is None or folders.get(col) != value for col, value in f.partition.items()):
            return False
    return True


def _view_sql(db: Any, snap: Snapshot) -> str:
    """``SELECT`` of the version's columns, in its schema's order and with the types DuckDB gives
    its Arrow schema, over ``read_parquet`` of its files."""
    want = _PARSER.sql_types(snap.schema)
    options = []
    if not all(f.has_all_columns for f in snap.files or ()):
        options.append("union_by_name=true")
    if snap.partition_by:
        hive = ", ".join(f"{_literal(c)}: {want[c]}" for c in snap.partition_by)
        options.append(f"hive_partitioning=true, hive_types={{{hive}}}")
    else:
        options.append("hive_partitioning=false")
    source = f"read_parquet([{', '.join(_literal(f.path) for f in snap.files or ())}], {', '.join(options)})"
    have = {row[0]: row[1] for row in db.execute(f"DESCRIBE SELECT * FROM {source}").fetchall()}
    columns = []
    for name, kind in want.items():
        if name not in have:
            columns.append(f"CAST(NULL AS {kind}) AS {_ident(name)}")
        elif have[name] != kind:
            columns.append(f"CAST({_ident(name)} AS {kind}) AS {_ident(name)}")
        else:
            columns.append(_ident(name))
    return f"SELECT {', '.join(columns)} FROM {source}"


def _ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


class _Watchdog:
    """One thread that interrupts queries past their deadline (a timer thread per query costs as
    much as a small query)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._heap: list[list[Any]] = []
        self._count = itertools.count()
        self._thread: threading.Thread | None = None

    def watch(self, seconds: float, stop: Any) -> list[Any]:
        entry = [time.monotonic() + seconds, next(self._count), stop]
        with self._cond:
            heapq.heappush(self._heap, entry)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="iot2ml-query-timeout", daemon=True)
                self._thread.start()
            self._cond.notify()
        return entry

    def cancel(self, entry: list[Any]) -> None:
        """After this returns the ``stop`` of ``entry`` is not running and will not run."""
        with self._cond:
            entry[2] = None

    def _run(self) -> None:
        with self._cond:
            while True:
                while self._heap and self._heap[0][2] is None:
                    heapq.heappop(self._heap)
                if not self._heap:
                    self._cond.wait()
                    continue
                wait = self._heap[0][0] - time.monotonic()
                if wait > 0:
                    self._cond.wait(wait)
                    continue
                stop = heapq.heappop(self._heap)[2]
                try:
                    stop()
                except Exception:  # noqa: BLE001,S110 - the query ended meanwhile
                    pass


_PARSER = _Parser()
_ENGINES = _Engines()
_WATCHDOG = _Watchdog()


def _fetch(
    con: Any, sql: str, *, timeout: float, max_rows: int | None, memory_limit: str, existing: list[str]
) -> tuple[pa.Table, bool]:
    import duckdb

    timed_out = threading.Event()

    def stop() -> None:
        timed_out.set()
        con.interrupt()

    watch = _WATCHDOG.watch(timeout, stop)
    batches: list[pa.RecordBatch] = []
    truncated = False
    try:
        reader = con.sql(sql).to_arrow_reader(_BATCH_ROWS)
        schema = reader.schema
        try:
            count = 0
            for batch in reader:
                batches.append(batch)
                count += batch.num_rows
                if max_rows is not None and count > max_rows:
                    truncated = True
                    break
        finally:
            reader.close()
    except duckdb.InterruptException:
        if timed_out.is_set():
            raise QueryError(
                f"query ran longer than query_timeout={timeout:g}s and was stopped: "
                "filter on ts or day, aggregate, or add a LIMIT (or raise query_timeout)"
            ) from None
        raise QueryError("query was interrupted") from None
    except duckdb.IOException as err:
        raise LakeUnavailable(f"a lake file could not be read while querying: {_first_line(err)}; run the query again") from None
    except duckdb.Error as err:
        raise _translate(err, memory_limit=memory_limit, existing=existing) from None
    except (OSError, pa.ArrowException) as err:
        raise LakeUnavailable(f"a lake file could not be read while querying: {err}; run the query again") from err
    finally:
        _WATCHDOG.cancel(watch)
    table = pa.Table.from_batches(batches, schema=schema)
    if truncated:
        table = table.slice(0, max_rows)
    return table, truncated


def _translate(err: Exception, *, memory_limit: str, existing: list[str]) -> QueryError:
    import duckdb

    text = _first_line(err)
    tables = ", ".join(existing) or "(none yet)"
    if isinstance(err, duckdb.CatalogException):
        missing = _MISSING_TABLE.search(str(err))
        if missing:
            return QueryError(f"no table {missing.group(2)!r} in the lake: the tables are {tables}")
        return QueryError(f"query names something that does not exist: {text}")
    if isinstance(err, duckdb.PermissionException):
        return QueryError(
            "query tried to reach files, the network or extensions, which is not allowed: "
            + (f"read only the lake tables ({tables})" if existing else "read only the lake tables")
        )
    if isinstance(err, duckdb.OutOfMemoryException):
        return QueryError(
            f"query needs more than the memory limit {memory_limit}: filter on ts or day, aggregate, or add a LIMIT"
        )
    if isinstance(err, (duckdb.ParserException, duckdb.SyntaxException)):
        return QueryError(f"query is not valid SQL: {text}")
    if isinstance(err, duckdb.InvalidInputException) and "configuration" in str(err):
        return QueryError("query tried to change a setting, which is not allowed: send only a SELECT")
    return QueryError(f"query failed: {text}")


def _first_line(err: Exception) -> str:
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__


# ---- JSON-friendly values ----------------------------------------------------------------
def _json_rows(table: pa.Table) -> list[list[Any]]:
    columns = []
    for col in table.columns:
        values = col.to_pylist()
        if _needs_conversion(col.type):
            values = [_json_value(v) for v in values]
        columns.append(values)
    return [list(row) for row in zip(*columns)] if columns else []


def _needs_conversion(t: pa.DataType) -> bool:
    return not (pat.is_integer(t) or pat.is_string(t) or pat.is_large_string(t) or pat.is_boolean(t) or pat.is_null(t))


def _json_value(v: Any) -> Any:
    if v is None or isinstance(v, (bool, int, str)):
        return v
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if isinstance(v, _dt.datetime):
        # DuckDB's session time zone is UTC, so a naive timestamp is UTC too.
        v = v.astimezone(_dt.timezone.utc) if v.tzinfo else v.replace(tzinfo=_dt.timezone.utc)
        return v.isoformat().replace("+00:00", "Z")
    if isinstance(v, (_dt.date, _dt.time)):
        return v.isoformat()
    if isinstance(v, _dt.timedelta):
        return v.total_seconds()
    if isinstance(v, Decimal):
        if not v.is_finite():
            return None
        return int(v) if v == v.to_integral_value() else float(v)
    if isinstance(v, (bytes, bytearray, memoryview)):
        return base64.b64encode(bytes(v)).decode("ascii")
    if isinstance(v, pa.MonthDayNano):  # INTERVAL, as an ISO 8601 duration
        return f"P{v.months}M{v.days}DT{v.nanoseconds / 1e9:g}S"
    if isinstance(v, uuid.UUID):
        return str(v)
    if isinstance(v, dict):
        return {str(k): _json_value(x) for k, x in v.items()}
    if isinstance(v, list):
        if v and isinstance(v[0], tuple):  # pyarrow gives a MAP as a list of (key, value) tuples
            return {str(k): _json_value(x) for k, x in v}
        return [_json_value(x) for x in v]
    return str(v)
