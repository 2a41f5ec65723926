"""Compaction, vacuum, retention and the Maintainer thread on real Delta tables."""

from __future__ import annotations

import datetime as dt
import threading
import time
from pathlib import Path

import pytest

from iot2ml.core.config import Settings
from iot2ml.core.errors import InvalidInput, LakeUnavailable, NotFound
from iot2ml.lake import Lake
from iot2ml.lake.maintenance import Maintainer, apply_retention, compact, vacuum

NOW = dt.datetime(2026, 3, 31, 8, 0, tzinfo=dt.timezone.utc)


def _day(days_ago: int) -> str:
    return (NOW - dt.timedelta(days=days_ago)).date().isoformat()


def _fill(lake: Lake, pump_batch, commits: int, rows: int = 20) -> None:
    for i in range(commits):
        lake.append("pump", pump_batch(i * rows, rows), app_id="test", version=i)


def test_compaction_after_200_appends_keeps_every_row(lake, pump_batch, fingerprint, data_files) -> None:
    _fill(lake, pump_batch, 200)
    before = fingerprint(lake, "pump")
    assert data_files(lake, "pump") == (200, 200)

    figures = compact(lake, "pump", min_files=16)

    assert figures["files_before"] == 200 and figures["files_removed"] == 200
    assert figures["files_after"] <= 2
    assert fingerprint(lake, "pump") == before == (4000, 4000, before[2])
    vacuum(lake, "pump", retention_hours=0)
    assert data_files(lake, "pump") == (figures["files_after"], figures["files_after"])
    assert fingerprint(lake, "pump") == before


def test_vacuum_keeps_replaced_files_for_the_retention_period(lake, pump_batch, data_files) -> None:
    _fill(lake, pump_batch, 20)
    compact(lake, "pump", min_files=16)
    assert vacuum(lake, "pump", retention_hours=1) == {"deleted": 0}
    assert data_files(lake, "pump") == (1, 21)  # a reader of the old version still finds its files
    assert vacuum(lake, "pump", retention_hours=0) == {"deleted": 20}
    assert data_files(lake, "pump") == (1, 1)


def test_few_small_files_are_left_alone(lake, pump_batch, data_files) -> None:
    _fill(lake, pump_batch, 10)
    figures = compact(lake, "pump", min_files=16)
    assert figures["files_removed"] == 0 and figures["partitions"] == 0
    assert data_files(lake, "pump") == (10, 10)


def test_partitioned_table_is_compacted_per_day(lake, raw_batch, fingerprint, data_files) -> None:
    for i in range(60):
        lake.append("raw", raw_batch(i * 10, 10, _day(i % 3)), app_id="test", version=i, partition_by=["day"])
    lake.append("raw", raw_batch(9000, 10, _day(9)), app_id="test", version=99, partition_by=["day"])
    before = fingerprint(lake, "raw")

    figures = compact(lake, "raw", min_files=16)

    assert figures["partitions"] == 3  # the day with one file is not touched
    assert figures["files_removed"] == 60 and figures["files_after"] == 4
    assert fingerprint(lake, "raw") == before


def test_a_concurrent_writer_loses_nothing(lake, pump_batch, fingerprint, settings: Settings) -> None:
    _fill(lake, pump_batch, 50)
    stop = threading.Event()
    written = {"commits": 50, "failures": 0}

    def writer() -> None:  # the ingest: its own Lake handle, appending every few ms
        own = Lake(lake.root)
        while not stop.is_set():
            n = written["commits"]
            try:
                own.append("pump", pump_batch(n * 20, 20), app_id="test", version=n)
            except LakeUnavailable:
                written["failures"] += 1
                continue
            written["commits"] = n + 1

    thread = threading.Thread(target=writer)
    thread.start()
    maintainer = Maintainer(lake, settings.model_copy(update={"compact_min_files": 8, "vacuum_retention_hours": 0}))
    compacted = 0
    try:
        for _ in range(6):
            time.sleep(0.15)
            figures = maintainer.run_once()
            assert figures["errors"] == 0, figures
            compacted += figures["tables"]["pump"].get("compaction", {}).get("files_removed", 0)
    finally:
        stop.set()
        thread.join()

    rows, distinct, _ = fingerprint(lake, "pump")
    assert rows == distinct == written["commits"] * 20
    assert written["failures"] == 0  # compaction never makes an append fail
    assert compacted > 50
    expected = Lake(str(Path(lake.root).parent / "expected"))
    expected.append("pump", pump_batch(0, rows), app_id="test", version=0)
    assert fingerprint(lake, "pump") == fingerprint(expected, "pump")


def test_retention_deletes_only_old_days(lake, raw_batch, fingerprint) -> None:
    ages = [0, 29, 30, 31, 45]
    for i, age in enumerate(ages):
        lake.append("raw", raw_batch(i * 100, 100, _day(age)), app_id="test", version=i, partition_by=["day"])
        lake.append("dead_letters", raw_batch(i * 100, 5, _day(age)), app_id="test", version=i, partition_by=["day"])

    figures = apply_retention(lake, "raw", days=30, now=NOW)

    assert figures == {"cutoff": _day(30), "deleted_files": 2, "deleted_rows": 200}
    kept = lake.open("raw").to_pyarrow_table()
    assert sorted(set(kept["day"].to_pylist())) == sorted(_day(a) for a in (0, 29, 30))
    assert kept.num_rows == 300
    assert lake.open("dead_letters").to_pyarrow_table().num_rows == 25  # not asked for
    version = lake.open("raw").version()
    assert apply_retention(lake, "raw", days=30, now=NOW)["deleted_files"] == 0
    assert lake.open("raw").version() == version  # nothing to delete: no commit


def test_retention_refuses_tables_without_day_and_unknown_tables(lake, pump_batch) -> None:
    _fill(lake, pump_batch, 1)
    with pytest.raises(InvalidInput, match="'pump' is not partitioned by 'day'"):
        apply_retention(lake, "pump", days=30)
    with pytest.raises(NotFound, match="no table 'nope'"):
        apply_retention(lake, "nope", days=30)
    with pytest.raises(InvalidInput, match="raw_retention_days 0"):
        apply_retention(lake, "raw", days=0)


def test_a_writer_retrying_after_a_retention_delete_loses_nothing(lake, raw_batch) -> None:
    """delta-rs fails one append made from a snapshot older than the delete; the retry succeeds."""
    lake.append("raw", raw_batch(0, 10, _day(40)), app_id="ingest", version=0, partition_by=["day"])
    lake.append("raw", raw_batch(10, 10, _day(0)), app_id="ingest", version=1, partition_by=["day"])
    apply_retention(lake, "raw", days=30, now=NOW)  # own DeltaTable: the lake's handle is now stale
    failures = 0
    for attempt in range(3):
        try:
            lake.append("raw", raw_batch(20, 10, _day(0)), app_id="ingest", version=2, partition_by=["day"])
            break
        except LakeUnavailable:
            failures += 1
    assert failures <= 1
    data = lake.open("raw").to_pyarrow_table()
    assert sorted(data["_seq"].to_pylist()) == list(range(10, 30))


def test_maintainer_thread_runs_passes_and_survives_a_broken_table(
    lake, pump_batch, settings: Settings, data_files
) -> None:
    _fill(lake, pump_batch, 20)
    broken = Path(lake.root) / "broken" / "_delta_log"
    broken.mkdir(parents=True)
    (broken / "00000000000000000000.json").write_text("not a delta log\n")
    fast = settings.model_copy(update={"compact_interval": 0.05, "compact_min_files": 4, "vacuum_retention_hours": 0})

    maintainer = Maintainer(lake, fast)
    with maintainer:
        deadline = time.monotonic() + 10
        while maintainer.passes < 3 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert maintainer.passes >= 3
        assert maintainer._thread is not None and maintainer._thread.is_alive()
        assert maintainer.errors >= 3  # the broken table fails on every pass
        assert "open" in maintainer.last["tables"]["broken"]["errors"][0]
        # the good table was compacted and vacuumed despite the broken one
        assert data_files(lake, "pump") == (1, 1)

        # once the broken table is fixed (removed), passes are clean again
        for path in sorted(broken.parent.rglob("*"), reverse=True):
            path.unlink() if path.is_file() else path.rmdir()
        broken.parent.rmdir()
        errors = maintainer.errors
        seen = maintainer.passes
        while maintainer.passes < seen + 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert maintainer.last["errors"] == 0 and maintainer.errors - errors <= 1
    maintainer.__exit__(None, None, None)  # a second exit is harmless
    assert maintainer._thread is None


def test_maintainer_applies_retention_to_raw_and_dead_letters(lake, raw_batch, settings: Settings) -> None:
    today = dt.datetime.now(dt.timezone.utc).date()
    for i, age in enumerate([0, 40]):
        day = (today - dt.timedelta(days=age)).isoformat()
        for table in ("raw", "dead_letters"):
            lake.append(table, raw_batch(i * 10, 10, day), app_id="test", version=i, partition_by=["day"])

    figures = Maintainer(lake, settings.model_copy(update={"raw_retention_days": 30})).run_once()

    for table in ("raw", "dead_letters"):
        assert figures["tables"][table]["retention"]["deleted_rows"] == 10
        assert lake.open(table).to_pyarrow_table()["day"].to_pylist() == [today.isoformat()] * 10


def test_stopping_is_prompt(lake, settings: Settings) -> None:
    slow = settings.model_copy(update={"compact_interval": 3600})
    started = time.monotonic()
    with Maintainer(lake, slow) as maintainer:
        time.sleep(0.05)
    assert maintainer.passes == 1 and time.monotonic() - started < 2
