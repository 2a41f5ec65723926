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
from datetime import datetime, timezone
from typing import Any

from ..core.storage import LakeBuffer, TableStore
from ..core.tables import AUDIT

__all__ = ["AuditLog", "read_audit"]

log = logging.getLogger("iot2ml.audit")

_COLUMNS = ("ts", "who", "kind", "role", "action", "target", "outcome", "status", "address", "component")


class _AuditRows(LakeBuffer):
    TABLE, SCHEMA, APP, MAX_PENDING = AUDIT, "AUDIT_SCHEMA", "iot2ml-audit", 100_000


class AuditLog:
    """A bounded buffer of audit rows (``core.storage.LakeBuffer``), appended to ``lake`` every
    ``interval`` seconds by a thread."""

    def __init__(self, lake: TableStore | None, *, component: str, interval: float = 1.0) -> None:
        self.lake = lake
        self.component = component
        self.interval = interval
        self._buffer = _AuditRows(lake)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def written(self) -> int:
        return self._buffer.written

    @property
    def dropped(self) -> int:
        return self._buffer.dropped

    def add(self, row: dict[str, Any]) -> None:
        """Keep ``row`` for the next append; never blocks on the lake."""
        values = {**row, "ts": datetime.fromtimestamp(row["ts"], timezone.utc), "component": self.component}
        self._buffer.add([tuple(values.get(c) for c in _COLUMNS)])

    def flush(self) -> int:
        """Append what is buffered; the number of rows written."""
        return self._buffer.flush()

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
