"""Delta tables under one root (a local folder or ``s3://bucket/prefix``).

Appends carry a Delta ``txn`` action ``(app_id, version)`` in the same commit as the data, so a
writer that restarts can ask each table how far it got (``txn_version``) and skip what is in.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import pyarrow as pa

from ..core.errors import LakeUnavailable, NotFound

# Tables get these properties when created: checkpoints every 50 commits, log kept 2 days,
# files removed by compaction kept 1 hour for readers that still see an older version.
TABLE_CONFIG = {
    "delta.checkpointInterval": "50",
    "delta.logRetentionDuration": "interval 2 days",
    "delta.deletedFileRetentionDuration": "interval 1 hours",
}


@dataclass(frozen=True)
class DataFile:
    """One Parquet file of a table version: its local path, the Delta partition values it holds
    (not stored in the file) and whether its statistics show every non-partition column of the
    version's schema (``False`` when unknown, e.g. a file written before a column was added)."""

    path: str
    partition: dict[str, str | None]
    has_all_columns: bool


@dataclass(frozen=True)
class Snapshot:
    """One Delta version of a table, as a reader needs it to read exactly that version.

    ``files`` are the version's data files when they can be read as plain Parquet on local disk
    (reader protocol 1: no deletion vectors, no column mapping); otherwise ``None``, and
    ``dataset()`` is the way to read the version (it always is one).
    """

    table: str
    version: int
    schema: pa.Schema
    partition_by: tuple[str, ...]
    files: tuple[DataFile, ...] | None
    _load: Any = field(default=None, repr=False, compare=False)
    _commit: tuple[int, ...] | None = field(default=None, repr=False, compare=False)
    _made: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)
    _lock: Any = field(default_factory=threading.Lock, repr=False, compare=False)

    @property
    def key(self) -> tuple[Any, ...]:
        """What tells this version apart: table, version and (on local disk) its commit file, which
        differs when the table was written again from scratch."""
        return (self.table, self.version, self._commit)

    def dataset(self) -> Any:
        """A ``pyarrow.dataset.Dataset`` of exactly this version (made once, on first use)."""
        with self._lock:
            if "dataset" not in self._made:
                self._made["dataset"] = self._load()
            return self._made["dataset"]


class Lake:
    """The Delta tables of one data lake."""

    def __init__(self, root: str, storage_options: dict[str, str] | None = None) -> None:
        self.root = root.rstrip("/")
        self.storage_options = dict(storage_options or {})
        self.is_local = "://" not in self.root or self.root.startswith("file://")
        if self.is_local:
            Path(self.root.removeprefix("file://")).mkdir(parents=True, exist_ok=True)
        else:
            self.storage_options = _with_http_allowed(self.storage_options)
        self._cache: dict[str, Any] = {}
        self._snapshots: dict[str, Snapshot] = {}
        self._lock = threading.Lock()

    def uri(self, table: str) -> str:
        return f"{self.root}/{table}"

    # ---- discovery ---------------------------------------------------------------------
    def tables(self) -> list[str]:
        """Names of the tables that exist, sorted."""
        if self.is_local:
            base = Path(self.root.removeprefix("file://"))
            return sorted(p.parent.name for p in base.glob("*/_delta_log") if p.is_dir())
        return sorted(self._remote_tables())

    def _remote_tables(self) -> list[str]:
        import pyarrow.fs as pafs

        fs, path = self._pyarrow_fs()
        bucket = path.split("/", 1)[0]
        names = []
        try:
            # A prefix nobody wrote to yet has no objects: an empty lake, not an error.
            listing = fs.get_file_info(pafs.FileSelector(path, recursive=False, allow_not_found=True))
            for info in listing:
                if info.type == pafs.FileType.Directory:
                    sub = fs.get_file_info(f"{info.path}/_delta_log")
                    if sub.type == pafs.FileType.Directory:
                        names.append(info.base_name)
            # ... but allow_not_found also hides a missing bucket, which is a mistake to report.
            no_bucket = not listing and fs.get_file_info(bucket).type == pafs.FileType.NotFound
        except Exception as err:  # noqa: BLE001 - translate any driver error at the boundary
            raise LakeUnavailable(
                f"lake {self.root} cannot be listed: {_first_line(err)}: check lake_storage_options "
                "(AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION)"
            ) from err
        if no_bucket:
            raise LakeUnavailable(f"lake_uri {self.root!r}: bucket {bucket!r} does not exist: create it or fix lake_uri")
        return names

    def _pyarrow_fs(self) -> tuple[Any, str]:
        import pyarrow.fs as pafs

        opts = {k.upper(): v for k, v in self.storage_options.items()}  # deltalake ignores key case too
        endpoint = opts.get("AWS_ENDPOINT_URL") or opts.get("AWS_ENDPOINT")
        if endpoint and "://" in endpoint:
            scheme = endpoint.split("://", 1)[0].lower()
        else:
            scheme = "http" if _truthy(opts.get("AWS_ALLOW_HTTP")) else "https"
        try:
            fs = pafs.S3FileSystem(
                access_key=opts.get("AWS_ACCESS_KEY_ID"),
                secret_key=opts.get("AWS_SECRET_ACCESS_KEY"),
                session_token=opts.get("AWS_SESSION_TOKEN"),
                endpoint_override=endpoint,
                region=opts.get("AWS_REGION") or opts.get("AWS_DEFAULT_REGION") or "us-east-1",
                scheme=scheme,
            )
        except Exception as err:  # noqa: BLE001
            raise LakeUnavailable(f"lake {self.root}: lake_storage_options are not usable: {_first_line(err)}") from err
        return fs, self.root.split("://", 1)[1]

    def exists(self, table: str) -> bool:
        from deltalake import DeltaTable

        if table in self._cache:
            return True
        try:
            return DeltaTable.is_deltatable(self.uri(table), storage_options=self.storage_options)
        except Exception as err:  # noqa: BLE001 - translate any driver error at the boundary
            raise LakeUnavailable(f"lake {self.root} cannot be read: {err}") from err

    # ---- open / read -------------------------------------------------------------------
    def open(self, table: str, *, refresh: bool = True) -> Any:
        """The table's ``DeltaTable`` (cached; ``refresh`` loads commits made since)."""
        with self._lock:
            return self._open_locked(table, refresh=refresh)

    def _open_locked(self, table: str, *, refresh: bool) -> Any:
        from deltalake import DeltaTable
        from deltalake.exceptions import TableNotFoundError

        dt = self._cache.get(table)
        try:
            if dt is None:
                dt = DeltaTable(self.uri(table), storage_options=self.storage_options)
                self._cache[table] = dt
            elif refresh:
                dt.update_incremental()
        except TableNotFoundError:
            raise NotFound(f"no table {table!r} in the lake: see 'iot2ml tables'") from None
        except Exception as err:  # noqa: BLE001
            raise LakeUnavailable(f"table {table!r} cannot be read: {err}") from err
        return dt

    def schema(self, table: str) -> pa.Schema | None:
        try:
            dt = self.open(table)
        except NotFound:
            return None
        return pa.schema(dt.schema().to_arrow())

    def txn_version(self, table: str, app_id: str) -> int | None:
        try:
            dt = self.open(table)
        except NotFound:
            return None
        return dt.transaction_version(app_id)

    def dataset(self, table: str) -> Any:
        """A ``pyarrow.dataset.Dataset`` of the table's current version."""
        return self.open(table).to_pyarrow_dataset()

    def snapshot(self, table: str) -> Snapshot:
        """The table's latest version as a ``Snapshot``; checked on every call, cached per version.

        On local disk the check is two ``stat`` calls (the cached version's commit file is still
        the same file and the next one is not there: Delta commits are numbered without gaps);
        elsewhere the log is read from the cached version on (``update_incremental``).
        """
        known = self._snapshots.get(table)
        if known is not None and self.is_local and self._is_latest(table, known):
            return known
        with self._lock:
            known = self._snapshots.get(table)
            if known is not None and self.is_local and known._commit != self._commit_mark(table, known.version):
                self._cache.pop(table, None)  # written again from scratch: read its log from the start
                self._snapshots.pop(table, None)
            dt = self._open_locked(table, refresh=True)
            for _ in range(5):
                version = dt.version()
                known = self._snapshots.get(table)
                if known is not None and known.version == version:
                    return known
                try:
                    snap = self._read_snapshot(table, dt, version)
                except Exception as err:  # noqa: BLE001 - translate any driver error at the boundary
                    raise LakeUnavailable(f"table {table!r} version {version} cannot be read: {err}") from err
                if dt.version() == version:  # no commit was loaded while reading (an append updates dt)
                    self._snapshots[table] = snap
                    return snap
            raise LakeUnavailable(f"table {table!r} changes faster than it can be read: run the query again")

    def _is_latest(self, table: str, snap: Snapshot) -> bool:
        return snap._commit == self._commit_mark(table, snap.version) and not os.path.exists(
            self._commit_file(table, snap.version + 1))

    def _commit_file(self, table: str, version: int) -> str:
        return f"{self.uri(table).removeprefix('file://')}/_delta_log/{version:020d}.json"

    def _commit_mark(self, table: str, version: int) -> tuple[int, ...] | None:
        """Identity of a local commit file (inode, size, mtime): a table written again from
        scratch has a commit of the same number but another file."""
        try:
            st = os.stat(self._commit_file(table, version))
        except OSError:
            return None
        return (st.st_ino, st.st_size, st.st_mtime_ns)

    def _read_snapshot(self, table: str, dt: Any, version: int) -> Snapshot:
        schema = pa.schema(dt.schema().to_arrow())
        partition_by = tuple(dt.metadata().partition_columns)
        protocol = dt.protocol()
        files: tuple[DataFile, ...] | None = None
        if self.is_local and protocol.min_reader_version == 1:
            base = os.path.abspath(self.uri(table).removeprefix("file://"))
            actions = pa.table(dt.get_add_actions(flatten=True)).to_pydict()
            columns = [c for c in schema.names if c not in partition_by]
            out: list[DataFile] | None = []
            for i, rel in enumerate(actions.get("path", [])):
                rel = unquote(rel)  # the log holds URI-encoded paths relative to the table
                if "://" in rel or rel.startswith("/"):
                    out = None  # files outside the table folder (a shallow clone): read through the dataset
                    break
                out.append(DataFile(
                    path=f"{base}/{rel}",
                    partition={c: actions[f"partition.{c}"][i] if f"partition.{c}" in actions else None
                               for c in partition_by},
                    has_all_columns=all(_has_stats(actions, c, i) for c in columns),
                ))
            files = tuple(out) if out is not None else None
        snap = Snapshot(table=table, version=version, schema=schema, partition_by=partition_by, files=files,
                        _load=lambda: self._dataset_at(table, version),
                        _commit=self._commit_mark(table, version) if self.is_local else None)
        if not files:  # not plain Parquet, or no file at all: made now, while dt is at this version
            snap._made["dataset"] = dt.to_pyarrow_dataset()
        return snap

    def _dataset_at(self, table: str, version: int) -> Any:
        from deltalake import DeltaTable

        try:
            return DeltaTable(self.uri(table), version=version, storage_options=self.storage_options).to_pyarrow_dataset()
        except Exception as err:  # noqa: BLE001 - translate any driver error at the boundary
            raise LakeUnavailable(f"table {table!r} version {version} cannot be read: {err}; run the query again") from err

    # ---- write -------------------------------------------------------------------------
    def append(
        self,
        table: str,
        data: pa.Table,
        *,
        app_id: str,
        version: int,
        partition_by: list[str] | None = None,
    ) -> int:
        """Append ``data`` in one commit recording ``(app_id, version)``; new columns are added."""
        from deltalake import CommitProperties, Transaction, write_deltalake

        props = CommitProperties(app_transactions=[Transaction(app_id, version)], max_commit_retries=50)
        try:
            target: Any
            if table in self._cache or self.exists(table):
                target = self.open(table, refresh=False)
            else:
                target = self.uri(table)
            write_deltalake(
                target,
                data,
                mode="append",
                schema_mode="merge",
                partition_by=partition_by,
                storage_options=None if not isinstance(target, str) else self.storage_options,
                configuration=TABLE_CONFIG if isinstance(target, str) else None,
                commit_properties=props,
            )
            if isinstance(target, str):
                return self.open(table).version()
            return target.version()
        except NotFound:
            raise
        except Exception as err:  # noqa: BLE001
            self._cache.pop(table, None)  # reload the log on the next try
            raise LakeUnavailable(f"append to table {table!r} failed: {err}") from err

    def forget(self, table: str) -> None:
        """Drop the cached handle (after another process rewrote the table)."""
        with self._lock:
            self._cache.pop(table, None)
            self._snapshots.pop(table, None)


def _has_stats(actions: dict[str, list[Any]], column: str, row: int) -> bool:
    """Whether file ``row`` has a null count for ``column`` (or one of its nested fields)."""
    return any(values[row] is not None for key, values in actions.items()
               if key == f"null_count.{column}" or key.startswith(f"null_count.{column}."))


def _truthy(value: str | None) -> bool:
    return str(value).strip().lower() in ("true", "1", "yes")


def _with_http_allowed(options: dict[str, str]) -> dict[str, str]:
    """``options`` plus ``AWS_ALLOW_HTTP=true`` when the endpoint is an ``http://`` URL.

    An explicit ``http://`` endpoint (a local S3 server such as SeaweedFS or MinIO) is meant to be
    used; without the flag deltalake refuses it with "URL scheme is not allowed". A value the
    user set, in any case, is kept.
    """
    upper = {k.upper(): v for k, v in options.items()}
    endpoint = str(upper.get("AWS_ENDPOINT_URL") or upper.get("AWS_ENDPOINT") or "")
    if endpoint.lower().startswith("http://") and "AWS_ALLOW_HTTP" not in upper:
        return {**options, "AWS_ALLOW_HTTP": "true"}
    return options


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
