"""The audit trail: one row of the ``audit`` lake table per write and per denied request.

``AuditLog.add`` (called by ``core.http.install_audit`` after each such request) only appends to a
bounded buffer; a thread appends the buffer to the lake every ``interval`` seconds under this
process's own exactly-once mark (as the serving runtime's ``prediction_log``). A full buffer counts
what it drops; a failed append keeps the rows for the next try. Rows hold names, roles, the route's
permission, method and path, the outcome and the client address: never a header, body or token.

The lake is handed in (``core.storage.TableStore``), so ``auth`` needs no lake of its own.
"""

from __future__ import annotations

import logging
import threading
import uuid
from datetime import datetime, timezone
from typing import Any

from ..core.storage import TableStore
from ..core.tables import AUDIT

__all__ = ["AuditLog", "read_audit"]

log = logging.getLogger("iot2ml.audit")

_COLUMNS = ("ts", "who", "kind", "role", "action", "target", "outcome", "status", "address", "component")


class AuditLog:
    """A bounded buffer of audit rows, appended to ``lake`` every ``interval`` seconds by a thread."""

    MAX_PENDING = 100_000

    def __init__(self, lake: TableStore | None, *, component: str, interval: float = 1.0) -> None:
        self.lake = lake
        self.component = component
        self.interval = interval
        self._rows: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._app = f"iot2ml-audit-{uuid.uuid4().hex[:12]}"
        self._seq = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.written = 0
        self.dropped = 0

    def add(self, row: dict[str, Any]) -> None:
        """Keep ``row`` for the next append; never blocks on the lake."""
        with self._lock:
            if len(self._rows) >= self.MAX_PENDING:
                self.dropped += 1
                return
            self._rows.append(row)

    def flush(self) -> int:
        """Append what is buffered; the number of rows written."""
        import pyarrow as pa

        from ..core.tables import AUDIT_SCHEMA

        with self._lock:
            rows, self._rows = self._rows, []
        if not rows or self.lake is None:
            return 0
        columns = {c: [r.get(c) for r in rows] for c in _COLUMNS}
        columns["ts"] = [datetime.fromtimestamp(t, timezone.utc) for t in columns["ts"]]
        columns["component"] = [self.component] * len(rows)
        table = pa.table({c: pa.array(columns[c], f.type) for c, f in zip(_COLUMNS, AUDIT_SCHEMA)},
                         schema=AUDIT_SCHEMA)
        self._seq += 1
        try:
            self.lake.append(AUDIT, table, app_id=self._app, version=self._seq)
        except Exception as err:  # noqa: BLE001 - keep the rows for the next try, within the bound
            log.warning("audit append failed (%s); retrying with the next flush", err)
            with self._lock:
                self._rows[:0] = rows[: self.MAX_PENDING - len(self._rows)]
            return 0
        self.written += len(rows)
        return len(rows)

    def start(self) -> None:
        if self._thread is None and self.lake is not None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="iot2ml-audit", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        """Stop the thread and append what is left."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
        self.flush()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.flush()
            except Exception:  # noqa: BLE001 - the audit thread must outlive one bad batch
                log.exception("audit flush failed")


def read_audit(lake: TableStore, since: float, limit: int = 1000) -> list[dict[str, Any]]:
    """Audit rows at or after epoch second ``since``, newest first, at most ``limit``."""
    import pyarrow.compute as pc
    import pyarrow.dataset as ds

    from ..core.errors import NotFound

    if lake.schema(AUDIT) is None:
        return []
    try:
        data = lake.dataset(AUDIT)
    except NotFound:
        return []
    cutoff = datetime.fromtimestamp(since, timezone.utc)
    table = data.to_table(filter=ds.field("ts") >= cutoff)
    if table.num_rows == 0:
        return []
    table = table.take(pc.sort_indices(table, [("ts", "descending")])[:limit])
    rows = table.to_pylist()
    for row in rows:
        row["ts"] = row["ts"].isoformat().replace("+00:00", "Z")
    return rows
