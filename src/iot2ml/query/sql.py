"""Read-only SQL over the lake with DuckDB.

Each query gets a fresh in-memory DuckDB connection that sees the lake tables it names (each one a
``pyarrow`` dataset of the table's current Delta version) and nothing else: no files, no network,
no extensions, no Python variables, no settings changes. The text must be exactly one ``SELECT``
(as DuckDB's own parser classifies it; ``WITH``, ``FROM x``, ``DESCRIBE``, ``SUMMARIZE`` and
``VALUES`` are selects too). A timer interrupts the connection after ``timeout`` seconds.

>>> result = run_query(lake, "SELECT device_id, avg(pressure) FROM pump GROUP BY 1")  # doctest: +SKIP
>>> result.columns, result.rows[:1], result.truncated  # doctest: +SKIP
(['device_id', 'avg(pressure)'], [['pump-1', 3.2]], False)
"""

from __future__ import annotations

import base64
import datetime as _dt
import math
import re
import threading
import uuid
from collections.abc import Collection
from dataclasses import dataclass, field
from decimal import Decimal
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.types as pat

from ..core.errors import Iot2mlError, LakeUnavailable, QueryError

if TYPE_CHECKING:
    from ..lake.tables import Lake

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
    import duckdb

    out = []
    con = duckdb.connect(":memory:", config=dict(_CONNECT_CONFIG))
    try:
        for name in [t for t in lake.tables() if t not in hidden]:
            try:
                dt = lake.open(name)
            except Iot2mlError:
                continue  # dropped meanwhile, or unreadable: it is not listed
            schema = pa.schema(dt.schema().to_arrow())
            con.register("_t", schema.empty_table())
            types = {row[0]: row[1] for row in con.execute('DESCRIBE "_t"').fetchall()}
            con.unregister("_t")
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
    finally:
        con.close()
    return out


# ---- execution ---------------------------------------------------------------------------
def _execute(
    lake: Lake, sql: str, *, timeout: float, max_rows: int | None, memory_limit: str, threads: int,
    hidden: Collection[str] = (),
) -> tuple[pa.Table, bool]:
    import duckdb

    if not isinstance(sql, str) or not sql.strip():
        raise QueryError("query is empty: send one SELECT statement, e.g. 'SELECT * FROM raw LIMIT 10'")
    if max_rows is not None and max_rows < 1:
        raise QueryError(f"max_rows {max_rows!r} is below 1: use a positive number (setting query_max_rows)")
    if not timeout > 0:
        raise QueryError(f"query_timeout {timeout!r} is not positive: use a number of seconds above 0")

    try:
        con = duckdb.connect(":memory:", config={**_CONNECT_CONFIG, "memory_limit": memory_limit, "threads": threads})
    except duckdb.Error as err:
        raise QueryError(f"query engine cannot start with memory_limit={memory_limit!r}, threads={threads!r}: {_first_line(err)}") from None
    try:
        _check_one_select(con, sql)
        existing = [t for t in lake.tables() if t not in hidden]
        for name in _referenced_tables(con, sql, existing):
            con.register(name, lake.dataset(name))
        con.execute("SET enable_progress_bar=false")
        con.execute("SET lock_configuration=true")
        return _fetch(con, sql, timeout=timeout, max_rows=max_rows, memory_limit=memory_limit, existing=existing)
    finally:
        con.close()


def _check_one_select(con: Any, sql: str) -> None:
    import duckdb

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


def _referenced_tables(con: Any, sql: str, existing: list[str]) -> list[str]:
    """The lake tables the query names; all of them when DuckDB cannot tell."""
    try:
        named = {n.lower() for n in con.get_table_names(sql, qualified=False)}
    except Exception:  # noqa: BLE001 - the binder will report the real problem when the query runs
        return existing
    return [t for t in existing if t.lower() in named]


def _fetch(
    con: Any, sql: str, *, timeout: float, max_rows: int | None, memory_limit: str, existing: list[str]
) -> tuple[pa.Table, bool]:
    import duckdb

    timed_out = threading.Event()

    def stop() -> None:
        timed_out.set()
        con.interrupt()

    timer = threading.Timer(timeout, stop)
    timer.daemon = True
    timer.start()
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
    except duckdb.Error as err:
        raise _translate(err, memory_limit=memory_limit, existing=existing) from None
    except (OSError, pa.ArrowException) as err:
        raise LakeUnavailable(f"a lake file could not be read while querying: {err}; run the query again") from err
    finally:
        timer.cancel()
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
            f"query tried to reach files, the network or extensions, which is not allowed: "
            f"read only the lake tables ({tables})"
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
