"""The ``labels`` table: what people say about entities (a wine batch's quality, a blood sample's
reference viscosity), fed by CSV import, the API and later the rating UI.

A label row is ``(entity, label, ts, source, who, imported_at)``: the entity key as it appears in a
device type's table (e.g. ``batch_id``), the label as a string, when the label was given, where it
came from (``taster``, ``user``, ``csv``...) and who gave it. Training joins labels to telemetry by
the entity key.

Imports are all or nothing: ``validate_labels`` checks every row and raises one ``InvalidInput``
listing every problem, and ``append_labels`` writes the whole table in one Delta commit::

    rows = read_labels_csv("ratings.csv", entity_column="batch_id", label_column="quality",
                           time_column="rated_at")
    table = validate_labels(rows, entity_column="batch_id", label_column="quality", time_column="rated_at",
                            allowed_labels={"good", "better", "best"},
                            known_entities=known_entities(lake, "wine", "batch_id"),
                            source="csv", who="alice")
    append_labels(lake, table)
"""

from __future__ import annotations

import csv
import datetime as dt
import math
import os
import threading
from collections.abc import Iterable, Mapping
from typing import Any

import pyarrow as pa

from ..core.errors import InvalidInput, LakeUnavailable, NotFound
from ..core.storage import TableStore
from ..core.tables import LABELS, LABELS_SCHEMA

__all__ = ["append_labels", "known_entities", "read_labels_csv", "validate_labels"]

_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)
_LATEST = dt.datetime(2200, 1, 1, tzinfo=dt.timezone.utc)
_COMMIT_ATTEMPTS = 20
_append_lock = threading.Lock()  # writers in one process take turns; Delta catches the others


class _Problems:
    def __init__(self) -> None:
        self.items: list[str] = []

    def add(self, row: int, column: str, value: Any, why: str) -> None:
        self.items.append(f"row {row}, column {column!r}, value {value!r}: {why}")


def validate_labels(
    rows: Iterable[Mapping[str, Any]] | Any,
    *,
    entity_column: str,
    label_column: str,
    source: str,
    who: str,
    time_column: str | None = None,
    allowed_labels: set[str] | None = None,
    known_entities: set[str] | None = None,
    imported_at: dt.datetime | None = None,
) -> pa.Table:
    """Check label rows and return them as a table of ``LABELS_SCHEMA``, or raise for all problems.

    ``rows`` is a list of dicts, a pandas DataFrame or a pyarrow Table. Every row needs an entity
    (in ``known_entities`` when given) and a label (in ``allowed_labels`` when given); with
    ``time_column`` it needs a time there too (ISO 8601, epoch seconds or a datetime; a time
    without a zone is UTC), else the label's time is the import time. ``source`` and ``who`` are
    recorded for rows without a ``source``/``who`` value of their own.

    Raises ``InvalidInput`` naming the missing columns (and those present), or listing every bad
    row as ``row N, column C, value V: why`` (``N`` counts data rows from 1, headers excluded); the
    error's ``problems`` attribute holds the same lines. Nothing is returned when any row is bad.
    """
    for name, value in (("source", source), ("who", who)):
        if not isinstance(value, str) or not value.strip():
            raise InvalidInput(f"{name} {value!r} is empty: say where the labels come from and who gave them")
    records = _records(rows)
    if not records:
        raise InvalidInput("no label rows to import: the input is empty")
    present = list(dict.fromkeys(k for r in records for k in r))
    wanted = [c for c in (entity_column, label_column, time_column) if c is not None]
    missing = [c for c in wanted if c not in present]
    if missing:
        raise InvalidInput(
            f"column{'s' if len(missing) > 1 else ''} {', '.join(map(repr, missing))} not found: "
            f"the columns are {', '.join(map(repr, present)) or '(none)'}; pass the right column names"
        )
    allowed_text = ", ".join(sorted(allowed_labels)) if allowed_labels is not None else ""
    now = _utc(imported_at) if imported_at is not None else dt.datetime.now(dt.timezone.utc)
    problems = _Problems()
    out: dict[str, list[Any]] = {name: [] for name in LABELS_SCHEMA.names}
    for number, record in enumerate(records, start=1):
        raw_entity = record.get(entity_column)
        entity = _text(raw_entity)
        if entity is None:
            problems.add(number, entity_column, raw_entity, "missing entity")
        elif known_entities is not None and entity not in known_entities:
            problems.add(number, entity_column, raw_entity,
                         f"unknown entity: no {entity_column} {entity!r} in the data ({len(known_entities)} known)")
        raw_label = record.get(label_column)
        label = _text(raw_label)
        if label is None:
            problems.add(number, label_column, raw_label, "missing label")
        elif allowed_labels is not None and label not in allowed_labels:
            hint = next((a for a in allowed_labels if a.lower() == label.lower()), None)
            problems.add(number, label_column, raw_label,
                         f"label not in the allowed set ({allowed_text})" + (f": did you mean {hint!r}?" if hint else ""))
        ts: dt.datetime | None = now
        if time_column is not None:
            ts, why = _timestamp(record.get(time_column))
            if ts is None:
                problems.add(number, time_column, record.get(time_column), f"bad timestamp: {why}")
        out["entity"].append(entity)
        out["label"].append(label)
        out["ts"].append(ts)
        out["source"].append(_text(record.get("source")) or source.strip())
        out["who"].append(_text(record.get("who")) or who.strip())
        out["imported_at"].append(now)
    if problems.items:
        count = len({line.split(",", 1)[0] for line in problems.items})
        err = InvalidInput(
            f"{count} of {len(records)} label rows are invalid, nothing was imported; fix these and import again:\n  "
            + "\n  ".join(problems.items)
        )
        err.problems = problems.items  # type: ignore[attr-defined]
        raise err
    return pa.table(out, schema=LABELS_SCHEMA)


def read_labels_csv(
    path: str | os.PathLike[str],
    *,
    entity_column: str,
    label_column: str,
    time_column: str | None = None,
) -> list[dict[str, Any]]:
    """The rows of a CSV file with a header, as dicts keyed by the header's names (values as text).

    Raises ``NotFound`` for a missing file and ``InvalidInput`` for an empty one or one without the
    named columns (the message lists the columns it has). Values are checked by ``validate_labels``.
    """
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            header = [h.strip() for h in (reader.fieldnames or [])]
            if not header:
                raise InvalidInput(f"labels file {os.fspath(path)!r} is empty: it needs a header row and data rows")
            wanted = [c for c in (entity_column, label_column, time_column) if c is not None]
            missing = [c for c in wanted if c not in header]
            if missing:
                raise InvalidInput(
                    f"labels file {os.fspath(path)!r} has no column {', '.join(map(repr, missing))}: its columns are "
                    f"{', '.join(map(repr, header))}; pass the right --entity-column/--label-column/--time-column"
                )
            reader.fieldnames = header
            return [{k: v for k, v in row.items() if k is not None} for row in reader]
    except FileNotFoundError:
        raise NotFound(f"labels file {os.fspath(path)!r} does not exist: check the path") from None
    except UnicodeDecodeError as err:
        raise InvalidInput(f"labels file {os.fspath(path)!r} is not UTF-8 text ({err.reason}): save it as UTF-8 CSV") from None
    except csv.Error as err:
        raise InvalidInput(f"labels file {os.fspath(path)!r} is not valid CSV: {err}") from None


def append_labels(lake: TableStore, table: pa.Table, *, app_id: str = "iot2ml-labels") -> int:
    """Append validated labels to the ``labels`` table in one commit; return the table's new version.

    Each commit records ``(app_id, n)``, ``n`` counting up from 1 per ``app_id``. Writers in one
    process take turns; a writer that loses a race with another process is told so by Delta
    (nothing written) and tries again with the next number.
    """
    if not isinstance(table, pa.Table) or not table.schema.equals(LABELS_SCHEMA):
        got = table.schema if isinstance(table, pa.Table) else type(table).__name__
        raise InvalidInput(f"labels must be a table of LABELS_SCHEMA, got {got}: build it with validate_labels")
    if table.num_rows == 0:
        raise InvalidInput("no labels to append: the table is empty")
    with _append_lock:
        for attempt in range(_COMMIT_ATTEMPTS):
            version = (lake.txn_version(LABELS, app_id) or 0) + 1
            try:
                return lake.append(LABELS, table, app_id=app_id, version=version)
            except LakeUnavailable as err:
                if "concurrent" not in str(err).lower() or attempt == _COMMIT_ATTEMPTS - 1:
                    raise
                forget = getattr(lake, "forget", None)
                if forget is not None:
                    forget(LABELS)
    raise AssertionError("unreachable")  # pragma: no cover


def known_entities(lake: TableStore, table_name: str, entity_column: str) -> set[str]:
    """Every distinct non-null value of ``entity_column`` in lake table ``table_name``, as text.

    Raises ``NotFound`` when the table does not exist and ``InvalidInput`` when it has no such
    column (the message lists its columns).
    """
    import pyarrow.compute as pc

    for kind, name in (("table", table_name), ("column", entity_column)):
        if not isinstance(name, str) or not name:
            raise InvalidInput(f"{kind} name {name!r} is not usable: give a non-empty name")
    schema = lake.schema(table_name)
    if schema is None:
        tables = ", ".join(lake.tables()) or "(none yet)"
        raise NotFound(f"no table {table_name!r} in the lake to check entities against: the tables are {tables}")
    if entity_column not in schema.names:
        raise InvalidInput(
            f"table {table_name!r} has no column {entity_column!r}: its columns are {', '.join(schema.names)}"
        )
    column = lake.dataset(table_name).to_table(columns=[entity_column]).column(0)
    return {str(v) for v in pc.unique(column).to_pylist() if v is not None}


# ---- helpers ----------------------------------------------------------------------------------
def _records(rows: Any) -> list[Mapping[str, Any]]:
    if isinstance(rows, pa.Table):
        return rows.to_pylist()
    if hasattr(rows, "to_dict") and hasattr(rows, "columns"):  # a pandas DataFrame
        return rows.to_dict("records")
    if isinstance(rows, Mapping):
        raise InvalidInput("label rows must be a list of rows, a DataFrame or a pyarrow Table, not one dict")
    records = list(rows)
    bad = next((i for i, r in enumerate(records, start=1) if not isinstance(r, Mapping)), None)
    if bad is not None:
        raise InvalidInput(f"row {bad} is a {type(records[bad - 1]).__name__}, not a mapping of column to value")
    return records


def _missing(value: Any) -> bool:
    if value is None:
        return True
    try:
        return bool(value != value)  # NaN, NaT
    except (TypeError, ValueError):
        return False


def _text(value: Any) -> str | None:
    """``value`` as stripped text; ``None`` when it is missing or blank."""
    if _missing(value):
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)  # pandas turns integer ids into floats when a column has gaps
    text = str(value).strip()
    return text or None


def _utc(value: dt.datetime) -> dt.datetime:
    return value.replace(tzinfo=dt.timezone.utc) if value.tzinfo is None else value.astimezone(dt.timezone.utc)


def _timestamp(value: Any) -> tuple[dt.datetime | None, str]:
    """``(time in UTC, "")`` or ``(None, why not)``."""
    if _missing(value) or (isinstance(value, str) and not value.strip()):
        return None, "missing time"
    if isinstance(value, bool):
        return None, "a boolean is not a time"
    if isinstance(value, dt.datetime):
        ts = _utc(value)
    elif isinstance(value, dt.date):
        ts = dt.datetime(value.year, value.month, value.day, tzinfo=dt.timezone.utc)
    elif isinstance(value, (int, float)) or (isinstance(value, str) and _is_number(value)):
        seconds = float(value)
        if not math.isfinite(seconds):
            return None, "not a finite number of seconds"
        try:
            ts = _EPOCH + dt.timedelta(seconds=seconds)
        except OverflowError:
            return None, "out of range"
    elif isinstance(value, str):
        try:
            ts = _utc(dt.datetime.fromisoformat(value.strip().replace("z", "Z")))
        except ValueError:
            return None, "not ISO 8601 (e.g. 2026-03-01T12:00:00Z) or epoch seconds"
    else:
        return None, f"a {type(value).__name__} is not a time"
    if not _EPOCH <= ts < _LATEST:
        return None, "outside 1970..2199"
    return ts, ""


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True
