"""Helpers for lake maintenance tests: pump-like and raw-like batches, counting and checksums."""

from __future__ import annotations

import datetime as dt
import hashlib
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pytest

from iot2ml.lake import Lake

T0 = dt.datetime(2026, 3, 1, 12, 0, 0, tzinfo=dt.timezone.utc)
UTC_US = pa.timestamp("us", tz="UTC")


def pump_batch(start: int, n: int) -> pa.Table:
    seqs = list(range(start, start + n))
    return pa.table(
        {
            "device_id": [f"pump-{s % 5}" for s in seqs],
            "ts": pa.array([T0 + dt.timedelta(milliseconds=s) for s in seqs], UTC_US),
            "_seq": pa.array(seqs, pa.int64()),
            "pressure": [s * 0.5 for s in seqs],
        }
    )


def raw_batch(start: int, n: int, day: str) -> pa.Table:
    seqs = list(range(start, start + n))
    return pa.table(
        {
            "_seq": pa.array(seqs, pa.int64()),
            "device_id": [f"pump-{s % 5}" for s in seqs],
            "received_at": pa.array([T0 + dt.timedelta(milliseconds=s) for s in seqs], UTC_US),
            "payload": [f'{{"n": {s}}}' for s in seqs],
            "day": [day] * n,
        }
    )


def fingerprint(lake: Lake, table: str) -> tuple[int, int, str]:
    """(rows, distinct _seq, a checksum of every row's content), read from a fresh snapshot."""
    from deltalake import DeltaTable

    data = DeltaTable(lake.uri(table)).to_pyarrow_table()
    data = data.sort_by("_seq").select(sorted(data.column_names))
    digest = hashlib.sha256()
    for col in data.columns:
        digest.update(repr(col.to_pylist()).encode())
    return data.num_rows, pc.count_distinct(data["_seq"]).as_py(), digest.hexdigest()


def data_files(lake: Lake, table: str) -> tuple[int, int]:
    """(files referenced by the current version, parquet files on disk)."""
    from deltalake import DeltaTable

    referenced = len(DeltaTable(lake.uri(table)).file_uris())
    root = Path(lake.uri(table))
    on_disk = sum(1 for p in root.rglob("*.parquet") if "_delta_log" not in p.parts)
    return referenced, on_disk


@pytest.fixture
def lake(tmp_path: Path) -> Lake:
    return Lake(str(tmp_path / "lake"))


@pytest.fixture(name="pump_batch")
def _pump_batch() -> object:
    return pump_batch


@pytest.fixture(name="raw_batch")
def _raw_batch() -> object:
    return raw_batch


@pytest.fixture(name="fingerprint")
def _fingerprint() -> object:
    return fingerprint


@pytest.fixture(name="data_files")
def _data_files() -> object:
    return data_files
