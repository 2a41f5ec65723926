"""The interface between modules and the lake: named tables of Arrow data with exactly-once appends.

The tables the platform writes itself are named in ``core/tables.py``."""

from __future__ import annotations

from typing import Any, Protocol


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
