"""Upkeep of the lake while the ingest keeps appending: compaction, checkpoints, vacuum, retention.

The ingest commits a small file to each table every second or so. Left alone, a table grows by
thousands of files an hour and every query pays for opening them. ``Maintainer`` runs one pass
every ``compact_interval`` seconds, on its own ``DeltaTable`` handles (never the writer's):

1. retention on ``raw`` and ``dead_letters``: drop the ``day`` partitions older than
   ``raw_retention_days`` (a metadata-only delete: whole files leave the log, none is rewritten);
2. compaction: in each partition holding ``compact_min_files`` files or more below ``target_size``,
   rewrite them into files of about ``target_size``;
3. a checkpoint and a log cleanup after anything was committed, so opening the table stays fast;
4. vacuum: delete the files that compaction and retention removed from the log more than
   ``vacuum_retention_hours`` ago (readers of an older version still find them until then).

Why compaction does not skip today's partition: compaction is a Delta ``dataChange=false``
rewrite, which delta-rs lets commit alongside blind appends (neither side's commit fails), and
today's partition is both where the small files pile up and what dashboards read. The price is
rewriting today's still-growing file once a pass until it reaches ``target_size``; that is bounded
by ``target_size`` per pass.

What can fail and how it is handled: a commit that loses against a concurrent one raises
``CommitFailedError`` in delta-rs; the pass logs it and the next pass tries again on a fresh view
of the table. Any other error is logged too; the thread never dies of one.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import logging
import math
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from ..core.config import Settings, load_settings
from ..core.errors import InvalidInput, LakeUnavailable, NotFound
from ..core.tables import DEAD_LETTERS, RAW
from .tables import Lake

log = logging.getLogger(__name__)

#: Files are compacted into files of about this size (bytes).
DEFAULT_TARGET_SIZE = 64 * 1024 * 1024
#: Tables whose ``day`` partitions expire after ``raw_retention_days``.
RETENTION_TABLES = (RAW, DEAD_LETTERS)
# A full vacuum (which also deletes files no commit refers to, left by failed writes) lists every
# file of the table, so it runs at most this often, and only when the retention is an hour or more:
# a file an append is still writing is seconds old, never an hour.
_FULL_VACUUM_EVERY = 3600.0


class _CommitConflict(LakeUnavailable):
    """A maintenance commit lost against a concurrent commit; the next pass retries."""


# ---- one table at a time -------------------------------------------------------------------
def compact(
    lake: Lake,
    table: str,
    *,
    min_files: int = 16,
    target_size: int = DEFAULT_TARGET_SIZE,
) -> dict[str, Any]:
    """Compact each partition of ``table`` that has ``min_files`` files below ``target_size`` bytes.

    A checkpoint and a log cleanup follow when anything was rewritten. Returns figures:
    ``files_before``, ``files_after``, ``files_removed``, ``files_added``, ``partitions``.
    Raises ``LakeUnavailable`` (retry later) when a concurrent commit conflicts.
    """
    dt = _open(lake, table)
    figures = _compact(dt, table, min_files=min_files, target_size=target_size)
    if figures["files_removed"]:
        _checkpoint(dt, table)
    return figures


def vacuum(lake: Lake, table: str, *, retention_hours: float = 1.0, full: bool = False) -> dict[str, Any]:
    """Delete the files of ``table`` that left its log more than ``retention_hours`` ago.

    delta-rs counts whole hours: a fraction is rounded up (readers keep their files longer, never
    shorter). ``full`` also deletes files no commit refers to (left by failed writes); it is
    refused below one hour, where it could delete the file of an append that is being committed.
    Returns ``{"deleted": n}``.
    """
    if full and retention_hours < 1:
        raise InvalidInput(
            f"vacuum full=True with retention_hours={retention_hours!r} could delete files being written: "
            "use retention_hours >= 1 for a full vacuum"
        )
    return {"deleted": _vacuum(_open(lake, table), table, retention_hours=retention_hours, full=full)}


def apply_retention(
    lake: Lake,
    table: str = RAW,
    *,
    days: float,
    now: _dt.datetime | None = None,
) -> dict[str, Any]:
    """Delete the ``day`` partitions of ``table`` older than ``days`` (a metadata-only delete).

    The cut is at day granularity: a row is kept until its whole day is older than ``days``, so
    up to one day longer than asked. Nothing is committed when no partition is old enough.

    Note for writers: delta-rs fails a blind append made from a table snapshot older than this
    delete ("a concurrent transaction deleted data this operation read"). ``Lake.append`` then
    drops its cached snapshot and raises ``LakeUnavailable``; the retry succeeds. With a daily
    cut this happens at most once a day per table.
    """
    if not days > 0:
        raise InvalidInput(f"raw_retention_days {days!r} is not positive: use a number of days above 0")
    return _retention(_open(lake, table), table, days=days, now=now)


# ---- the background thread ---------------------------------------------------------------
class Maintainer:
    """Runs the upkeep of every lake table every ``settings.compact_interval`` seconds.

    Use it as a context manager (the thread starts on enter, stops and joins on exit, twice is
    fine) or call ``run_once()`` yourself. The first pass starts at once.
    """

    def __init__(
        self,
        lake: Lake,
        settings: Settings | None = None,
        *,
        target_size: int = DEFAULT_TARGET_SIZE,
    ) -> None:
        self.lake = lake
        self.settings = settings if settings is not None else load_settings()
        self.target_size = target_size
        self.passes = 0
        self.errors = 0
        self.last: dict[str, Any] | None = None
        self._handles: dict[str, Any] = {}
        self._full_vacuumed: dict[str, float] = {}
        self._vacuumed: dict[str, set[str]] = {}
        self._pass_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # lifecycle
    def start(self) -> None:
        """Start the background thread (no-op if it runs)."""
        if self._thread is not None and self._thread.is_alive():
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="iot2ml-lake-maintainer", daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        """Ask the thread to stop after the step it is in, and wait for it."""
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    def __enter__(self) -> Maintainer:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self._pass(stoppable=True)
            except Exception:  # noqa: BLE001 - the thread must outlive any failure
                self.errors += 1
                log.exception("lake maintenance pass failed; trying again in %ss", self.settings.compact_interval)
            self._stop.wait(self.settings.compact_interval)

    # one pass
    def run_once(self) -> dict[str, Any]:
        """One pass over every table; returns what it did, per table and in total."""
        return self._pass(stoppable=False)

    def _pass(self, *, stoppable: bool) -> dict[str, Any]:
        with self._pass_lock:
            started = time.monotonic()
            tables: dict[str, dict[str, Any]] = {}
            for name in self.lake.tables():
                if stoppable and self._stop.is_set():
                    break
                tables[name] = self._upkeep(name)
            errors = sum(len(t.get("errors", [])) for t in tables.values())
            self.errors += errors
            self.passes += 1
            figures = {
                "tables": tables,
                "files_before": sum(t.get("files_before", 0) for t in tables.values()),
                "files_after": sum(t.get("files_after", 0) for t in tables.values()),
                "errors": errors,
                "seconds": round(time.monotonic() - started, 3),
            }
            self.last = figures
            return figures

    def _upkeep(self, name: str) -> dict[str, Any]:
        s = self.settings
        fig: dict[str, Any] = {"errors": []}
        try:
            dt = self._handle(name)
        except Exception as err:  # noqa: BLE001
            self._fail(name, "open", err, fig)
            return fig
        fig["files_before"] = _file_count(dt)
        committed = False
        steps: list[tuple[str, Any]] = []
        if name in RETENTION_TABLES and "day" in dt.metadata().partition_columns:
            steps.append(("retention", lambda: _retention(dt, name, days=s.raw_retention_days)))
        steps.append(
            ("compaction", lambda: _compact(dt, name, min_files=s.compact_min_files, target_size=self.target_size))
        )
        for step, run in steps:
            try:
                out = run()
            except Exception as err:  # noqa: BLE001
                self._fail(name, step, err, fig)
                continue
            fig[step] = out
            committed |= bool(out.get("deleted_files") or out.get("files_removed"))
        if committed:
            try:
                _checkpoint(dt, name)
            except Exception as err:  # noqa: BLE001
                self._fail(name, "checkpoint", err, fig)
        try:
            full = self._full_vacuum_due(name)
            seen = self._vacuumed.setdefault(name, set())
            fig["vacuumed"] = _vacuum(dt, name, retention_hours=s.vacuum_retention_hours, full=full, seen=seen)
            if full:
                self._full_vacuumed[name] = time.monotonic()
        except Exception as err:  # noqa: BLE001
            self._fail(name, "vacuum", err, fig)
        with contextlib.suppress(Exception):
            fig["files_after"] = _file_count(dt)
            fig["version"] = dt.version()
        disk = _files_on_disk(self.lake, name)
        if disk is not None:
            fig["files_on_disk"] = disk
        if committed or fig.get("vacuumed"):
            log.info(
                "lake table %s: %s -> %s files (%s on disk), %s vacuumed%s",
                name, fig["files_before"], fig.get("files_after"), fig.get("files_on_disk", "?"),
                fig.get("vacuumed", 0),
                f", {fig['retention']['deleted_files']} old files dropped" if fig.get("retention", {}).get("deleted_files") else "",
            )
        if not fig["errors"]:
            del fig["errors"]
        return fig

    def _handle(self, name: str) -> Any:
        """This thread's own ``DeltaTable`` for ``name``, brought up to date."""
        dt = self._handles.get(name)
        if dt is None:
            dt = _open(self.lake, name)
            self._handles[name] = dt
        else:
            with _translated(name, "refresh"):
                dt.update_incremental()
        return dt

    def _fail(self, name: str, step: str, err: Exception, fig: dict[str, Any]) -> None:
        self._handles.pop(name, None)  # reload the table from its log next time
        fig["errors"].append(f"{step}: {err}")
        if isinstance(err, _CommitConflict):
            log.warning("lake %s of table %s lost against a concurrent commit; retried next pass", step, name)
        else:
            log.error("lake %s of table %s failed: %s", step, name, err, exc_info=not isinstance(err, LakeUnavailable))

    def _full_vacuum_due(self, name: str) -> bool:
        if self.settings.vacuum_retention_hours < 1:
            return False
        last = self._full_vacuumed.get(name)
        return last is None or time.monotonic() - last >= _FULL_VACUUM_EVERY


# ---- steps on one DeltaTable ---------------------------------------------------------------
def _open(lake: Lake, table: str) -> Any:
    from deltalake import DeltaTable
    from deltalake.exceptions import TableNotFoundError

    try:
        return DeltaTable(lake.uri(table), storage_options=lake.storage_options or None)
    except TableNotFoundError:
        raise NotFound(f"no table {table!r} in the lake at {lake.root}: see 'iot2ml tables'") from None
    except Exception as err:  # noqa: BLE001
        raise LakeUnavailable(f"table {table!r} cannot be opened: {err}") from err


@contextlib.contextmanager
def _translated(table: str, step: str) -> Iterator[None]:
    from deltalake.exceptions import CommitFailedError

    try:
        yield
    except CommitFailedError as err:
        raise _CommitConflict(
            f"{step} of table {table!r} conflicted with a concurrent commit ({_first_line(err)}): "
            "nothing was changed, run it again"
        ) from err
    except (InvalidInput, NotFound, LakeUnavailable):
        raise
    except Exception as err:  # noqa: BLE001 - translate every driver error here
        raise LakeUnavailable(f"{step} of table {table!r} failed: {_first_line(err)}") from err


def _actions(dt: Any) -> pa.Table:
    return pa.table(dt.get_add_actions(flatten=True))


def _file_count(dt: Any) -> int:
    return _actions(dt).num_rows


def _compact(dt: Any, table: str, *, min_files: int, target_size: int) -> dict[str, Any]:
    with _translated(table, "compaction"):
        actions = _actions(dt)
        before = actions.num_rows
        parts = list(dt.metadata().partition_columns)
        small = actions.filter(pc.less(actions["size_bytes"], target_size))
        groups: list[list[tuple[str, str, Any]] | None] = []
        if not parts:
            if small.num_rows >= min_files:
                groups.append(None)
        elif small.num_rows:
            keys = [f"partition.{p}" for p in parts]
            counted = small.group_by(keys).aggregate([("path", "count")])
            for row in counted.to_pylist():
                if row["path_count"] < min_files or any(row[k] is None for k in keys):
                    continue  # null partition values cannot be named in a filter; they are rare
                groups.append([(p, "=", str(row[f"partition.{p}"])) for p in parts])
        removed = added = 0
        for filters in groups:
            metrics = dt.optimize.compact(
                partition_filters=filters,
                target_size=target_size,
                max_concurrent_tasks=max(1, (os.cpu_count() or 2) // 2),
            )
            removed += int(metrics.get("numFilesRemoved", 0))
            added += int(metrics.get("numFilesAdded", 0))
        after = _file_count(dt) if groups else before
    return {
        "files_before": before,
        "files_after": after,
        "files_removed": removed,
        "files_added": added,
        "partitions": len(groups),
    }


def _checkpoint(dt: Any, table: str) -> None:
    with _translated(table, "checkpoint"):
        dt.create_checkpoint()
        dt.cleanup_metadata()


def _vacuum(dt: Any, table: str, *, retention_hours: float, full: bool, seen: set[str] | None = None) -> int:
    """Vacuum; return how many files it deleted that were not deleted before.

    delta-rs lists a removed file for as long as its tombstone stays in the log (an hour here) and
    commits a VACUUM START/END pair on every call. With ``seen`` (the files deleted by earlier
    calls) a dry run first skips calls that would delete nothing new.
    """
    if retention_hours < 0:
        raise InvalidInput(f"vacuum_retention_hours {retention_hours!r} is negative: use 0 or more hours")
    hours = int(math.ceil(retention_hours))
    with _translated(table, "vacuum"):
        if seen is not None and not full:
            candidates = dt.vacuum(retention_hours=hours, dry_run=True, enforce_retention_duration=False)
            if not _names(candidates) - seen:
                return 0
        deleted = _names(dt.vacuum(retention_hours=hours, dry_run=False, enforce_retention_duration=False, full=full))
    if seen is None:
        return len(deleted)
    new = len(deleted - seen)
    seen.clear()
    seen.update(deleted)  # what the log still lists; older tombstones have expired from it
    return new


def _names(paths: list[str]) -> set[str]:
    # delta-rs returns relative paths on one call and absolute ones on the next; data file names
    # carry a UUID, so the last part is enough to tell them apart.
    return {p.rsplit("/", 1)[-1] for p in paths}


def _retention(dt: Any, table: str, *, days: float, now: _dt.datetime | None = None) -> dict[str, Any]:
    if "day" not in dt.metadata().partition_columns:
        raise InvalidInput(
            f"table {table!r} is not partitioned by 'day': retention applies to {', '.join(RETENTION_TABLES)}"
        )
    now = now or _dt.datetime.now(_dt.timezone.utc)
    cutoff = (now - _dt.timedelta(days=days)).date().isoformat()
    with _translated(table, "retention"):
        days_present = _actions(dt).column("partition.day")
        old = pc.less(days_present, cutoff)
        if not pc.any(old).as_py():
            return {"cutoff": cutoff, "deleted_files": 0, "deleted_rows": 0}
        metrics = dt.delete(f"day < '{cutoff}'")
    return {
        "cutoff": cutoff,
        "deleted_files": int(metrics.get("num_removed_files", 0)),
        "deleted_rows": int(metrics.get("num_deleted_rows", 0)),
    }


def _files_on_disk(lake: Lake, table: str) -> int | None:
    """Parquet data files under the table's folder (local lakes only)."""
    if not lake.is_local:
        return None
    root = Path(lake.uri(table).removeprefix("file://"))
    count = 0
    for folder, dirs, files in os.walk(root):
        if "_delta_log" in dirs:
            dirs.remove("_delta_log")
        count += sum(1 for f in files if f.endswith(".parquet"))
    return count


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
