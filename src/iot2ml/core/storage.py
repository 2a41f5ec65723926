"""The interface between modules and the lake: named tables of Arrow data with exactly-once appends.

The tables the platform writes itself are named in ``core/tables.py``."""

from __future__ import annotations

import logging
import threading
import uuid
from typing import Any, Protocol

log = logging.getLogger("iot2ml.storage")


class TableStore(Protocol):
    """Named append-only tables. ``lake.tables.Lake`` is the Delta Lake implementation."""

    def tables(self) -> list[str]:
        """Names of the tables that exist."""
        ...

    def schema(self, table: str) -> Any | None:
        """The table's ``pyarrow.Schema``, or ``None`` if it does not exist."""
        ...

    def append(self, table: str, data: Any, *, app_id: str, version: int, partition_by: list[str] | None = None) -> int:
        """Append ``data`` (a ``pyarrow.Table``) in one commit that records ``(app_id, version)``; return the table version."""
        ...

    def txn_version(self, table: str, app_id: str) -> int | None:
        """The last ``version`` committed by ``app_id`` to ``table``, or ``None``."""
        ...

    def dataset(self, table: str) -> Any:
        """A ``pyarrow.dataset.Dataset`` of the table's current version (``NotFound`` if it does not exist)."""
        ...


class LakeBuffer:
    """Rows for one lake table (tuples in the order of its schema, ``SCHEMA``: a name in
    ``core.tables``), appended by ``flush`` from a bounded buffer under this process's own exactly-once
    mark; a failed append keeps the rows (within the bound) for the next flush. ``add`` never waits
    for the lake; ``add_table`` takes many rows at once as an Arrow table of that schema (a streamed
    batch: no Python tuple per row). Used by the serving runtime's prediction log and input capture,
    and the audit."""

    MAX_PENDING = 200_000
    TABLE = ""
    SCHEMA = ""
    APP = ""

    def __init__(self, lake: TableStore | None) -> None:
        self.lake = lake
        self._pieces: list[Any] = []  # in arrival order: lists of row tuples and pyarrow tables
        self._pending = 0  # rows in them
        self._lock = threading.Lock()
        self._app = f"{self.APP}-{uuid.uuid4().hex[:12]}"
        self._seq = 0
        self.dropped = 0
        self.written = 0

    def _room(self, n: int) -> int:
        """How many of ``n`` new rows fit (the rest count as dropped); call with the lock held."""
        room = max(0, min(n, self.MAX_PENDING - self._pending))
        self.dropped += n - room
        self._pending += room
        return room

    def add(self, rows: list[tuple[Any, ...]]) -> None:
        if self.lake is None:
            return
        with self._lock:
            rows = rows[:self._room(len(rows))]
            if not rows:
                return
            if self._pieces and isinstance(self._pieces[-1], list):
                self._pieces[-1].extend(rows)
            else:
                self._pieces.append(list(rows))

    def add_table(self, table: Any) -> None:
        """Add the rows of a ``pyarrow.Table`` of the schema (within the bound, as ``add``)."""
        if self.lake is None or table.num_rows == 0:
            return
        with self._lock:
            table = table.slice(0, self._room(table.num_rows))
            if table.num_rows:
                self._pieces.append(table)

    def flush(self) -> int:
        """Append what is buffered; the number of rows written."""
        import pyarrow as pa

        from . import tables

        with self._lock:
            pieces, self._pieces, self._pending = self._pieces, [], 0
        if not pieces or self.lake is None:
            return 0
        schema = getattr(tables, self.SCHEMA)
        chunks = [_columns(p, schema) if isinstance(p, list) else p for p in pieces]
        table = chunks[0] if len(chunks) == 1 else pa.concat_tables(chunks)
        self._seq += 1
        try:
            self.lake.append(self.TABLE, table, app_id=self._app, version=self._seq)
        except Exception as err:  # noqa: BLE001 - keep the rows for the next try, within the bound
            log.warning("%s append failed (%s); retrying with the next flush", self.TABLE, err)
            with self._lock:  # the failed rows first, then those added since
                keep = table.slice(0, max(0, self.MAX_PENDING - self._pending))
                if keep.num_rows:
                    self._pieces.insert(0, keep)
                    self._pending += keep.num_rows
            return 0
        self.written += table.num_rows
        return table.num_rows


def _columns(rows: list[tuple[Any, ...]], schema: Any) -> Any:
    """Rows (tuples in the order of ``schema``) as a ``pyarrow.Table``."""
    import pyarrow as pa

    return pa.table([pa.array(c, f.type) for c, f in zip(zip(*rows), schema)], schema=schema)
