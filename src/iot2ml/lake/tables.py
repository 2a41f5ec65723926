"""Delta tables under one root (a local folder or ``s3://bucket/prefix``).

Appends carry a Delta ``txn`` action ``(app_id, version)`` in the same commit as the data, so a
writer that restarts can ask each table how far it got (``txn_version``) and skip what is in.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pyarrow as pa

from ..core.errors import LakeUnavailable, NotFound

# Tables get these properties when created: checkpoints every 50 commits, log kept 2 days,
# files removed by compaction kept 1 hour for readers that still see an older version.
TABLE_CONFIG = {
    "delta.checkpointInterval": "50",
    "delta.logRetentionDuration": "interval 2 days",
    "delta.deletedFileRetentionDuration": "interval 1 hours",
}


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
        from deltalake import DeltaTable
        from deltalake.exceptions import TableNotFoundError

        with self._lock:
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
