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
    for the lake. Used by the serving runtime's prediction log and input capture, and the audit."""

    MAX_PENDING = 200_000
    TABLE = ""
    SCHEMA = ""
    APP = ""

    def __init__(self, lake: TableStore | None) -> None:
        self.lake = lake
        self._rows: list[tuple[Any, ...]] = []
        self._lock = threading.Lock()
        self._app = f"{self.APP}-{uuid.uuid4().hex[:12]}"
        self._seq = 0
        self.dropped = 0
        self.written = 0

    def add(self, rows: list[tuple[Any, ...]]) -> None:
        if self.lake is None:
            return
        with self._lock:
            room = self.MAX_PENDING - len(self._rows)
            if room < len(rows):
                self.dropped += len(rows) - max(room, 0)
                rows = rows[:max(room, 0)]
            self._rows.extend(rows)

    def flush(self) -> int:
        """Append what is buffered; the number of rows written."""
        import pyarrow as pa

        from . import tables

        with self._lock:
            rows, self._rows = self._rows, []
        if not rows or self.lake is None:
            return 0
        schema = getattr(tables, self.SCHEMA)
        table = pa.table([pa.array(c, f.type) for c, f in zip(zip(*rows), schema)], schema=schema)
        self._seq += 1
        try:
            self.lake.append(self.TABLE, table, app_id=self._app, version=self._seq)
        except Exception as err:  # noqa: BLE001 - keep the rows for the next try, within the bound
            log.warning("%s append failed (%s); retrying with the next flush", self.TABLE, err)
            with self._lock:
                self._rows[:0] = rows[: self.MAX_PENDING - len(self._rows)]
            return 0
        self.written += len(rows)
        return len(rows)
