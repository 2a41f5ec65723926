"""A small real lake (Delta tables on disk) for the SQL tests."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pyarrow as pa
import pytest

from iot2ml.lake import Lake

T0 = dt.datetime(2026, 3, 1, 12, 0, 0, tzinfo=dt.timezone.utc)
UTC_US = pa.timestamp("us", tz="UTC")


def pump_rows(start: int, n: int) -> pa.Table:
    """``n`` pump readings with ``_seq`` from ``start``; every 7th pressure is NaN."""
    seqs = list(range(start, start + n))
    return pa.table(
        {
            "device_id": [f"pump-{s % 3}" for s in seqs],
            "ts": pa.array([T0 + dt.timedelta(seconds=s, microseconds=250_000) for s in seqs], UTC_US),
            "received_at": pa.array([T0 + dt.timedelta(seconds=s + 1) for s in seqs], UTC_US),
            "msg_id": [f"m{s}" for s in seqs],
            "_seq": pa.array(seqs, pa.int64()),
            "pressure": [float("nan") if s % 7 == 0 else 1.0 + s / 10 for s in seqs],
        }
    )


def raw_rows(start: int, n: int, day: str) -> pa.Table:
    seqs = list(range(start, start + n))
    return pa.table(
        {
            "_seq": pa.array(seqs, pa.int64()),
            "topic": [f"t/pump-{s % 3}" for s in seqs],
            "device_id": [f"pump-{s % 3}" for s in seqs],
            "received_at": pa.array([T0 + dt.timedelta(seconds=s) for s in seqs], UTC_US),
            "payload": ['{"pressure": 1}'] * n,
            "day": [day] * n,
        }
    )


@pytest.fixture(name="pump_rows")
def _pump_rows() -> object:
    """The ``pump_rows(start, n)`` helper, for tests that append more."""
    return pump_rows


@pytest.fixture
def lake(tmp_path: Path) -> Lake:
    """Tables ``pump`` (30 rows in 3 commits) and ``raw`` (20 rows over 2 days)."""
    lake = Lake(str(tmp_path / "lake"))
    for i in range(3):
        lake.append("pump", pump_rows(i * 10, 10), app_id="test", version=i)
    lake.append("raw", raw_rows(0, 10, "2026-03-01"), app_id="test", version=1, partition_by=["day"])
    lake.append("raw", raw_rows(10, 10, "2026-03-02"), app_id="test", version=2, partition_by=["day"])
    return lake
