"""SQL over a real lake: results, JSON values, limits and the sandbox."""

from __future__ import annotations

import json
import time
from pathlib import Path

import polars as pl
import pyarrow as pa
import pytest

import iot2ml.query
from iot2ml.core.errors import QueryError
from iot2ml.lake import Lake
from iot2ml.query import list_tables, query_arrow, run_query


def test_public_api_is_what_we_mean() -> None:
    assert sorted(iot2ml.query.__all__) == ["QueryResult", "list_tables", "query_arrow", "run_query"]


def test_aggregate_over_a_table(lake: Lake) -> None:
    result = run_query(lake, "SELECT device_id, count(*) AS n, sum(_seq) AS s FROM pump GROUP BY 1 ORDER BY 1")
    assert result.columns == ["device_id", "n", "s"]
    assert result.rows == [["pump-0", 10, 135], ["pump-1", 10, 145], ["pump-2", 10, 155]]
    assert result.truncated is False
    json.dumps(result.to_dict())  # every value is JSON-friendly (sum() is a HUGEINT/decimal in DuckDB)


def test_values_are_json_friendly(lake: Lake) -> None:
    result = run_query(
        lake,
        "SELECT ts, pressure, ts::DATE AS d, ts::TIMESTAMP AS naive, [1, 2] AS l, {'a': 1.5} AS s "
        "FROM pump WHERE _seq IN (0, 1) ORDER BY _seq",
    )
    first, second = result.rows
    assert first[0] == "2026-03-01T12:00:00.250000Z"
    assert second[0] == "2026-03-01T12:00:01.250000Z"
    assert first[1] is None  # NaN (every 7th reading) becomes null
    assert second[1] == pytest.approx(1.1)
    assert first[2] == "2026-03-01"
    assert first[3] == "2026-03-01T12:00:00.250000Z"  # the session is UTC, so naive is UTC
    assert first[4:] == [[1, 2], {"a": 1.5}]
    assert json.loads(json.dumps(result.to_dict()))["rows"][0][0] == first[0]


def test_arrow_and_polars_keep_the_types(lake: Lake) -> None:
    result = run_query(lake, "SELECT ts, pressure, _seq FROM pump ORDER BY _seq")
    table = result.to_arrow()
    assert table.schema.field("ts").type == pa.timestamp("us", tz=table.schema.field("ts").type.tz)
    assert table.schema.field("ts").type.tz in ("UTC", "Etc/UTC")
    assert table.schema.field("_seq").type == pa.int64()
    frame = result.to_polars()
    assert isinstance(frame, pl.DataFrame) and frame.height == 30
    assert frame["_seq"].to_list() == list(range(30))
    assert query_arrow(lake, "SELECT * FROM raw").num_rows == 20


def test_partition_column_and_joins(lake: Lake) -> None:
    result = run_query(
        lake,
        "WITH r AS (SELECT day, device_id, count(*) AS n FROM raw GROUP BY ALL) "
        "SELECT r.day, sum(r.n) FROM r JOIN (SELECT DISTINCT device_id FROM pump) p USING (device_id) "
        "GROUP BY 1 ORDER BY 1",
    )
    assert result.rows == [["2026-03-01", 10], ["2026-03-02", 10]]


def test_new_commits_are_seen(lake: Lake, pump_rows) -> None:
    lake.append("pump", pump_rows(30, 5), app_id="test", version=3)
    assert run_query(lake, "SELECT count(*) FROM pump").rows == [[35]]


def test_rows_beyond_max_rows_are_cut_and_flagged(lake: Lake) -> None:
    result = run_query(lake, "SELECT _seq FROM pump ORDER BY _seq DESC", max_rows=4)
    assert result.rows == [[29], [28], [27], [26]]
    assert result.truncated is True
    assert result.to_arrow().num_rows == 4
    exact = run_query(lake, "SELECT _seq FROM pump", max_rows=30)
    assert len(exact.rows) == 30 and exact.truncated is False


def test_large_result_streams_only_what_is_needed(lake: Lake) -> None:
    started = time.monotonic()
    result = run_query(lake, "SELECT range FROM range(50000000)", max_rows=10)
    assert result.truncated and len(result.rows) == 10
    assert time.monotonic() - started < 5


@pytest.mark.parametrize(
    ("sql", "says"),
    [
        ("INSERT INTO pump SELECT * FROM pump", "type INSERT, but only SELECT"),
        ("UPDATE pump SET pressure = 0", "type UPDATE"),
        ("DELETE FROM pump", "type DELETE"),
        ("CREATE TABLE x AS SELECT 1", "type CREATE"),
        ("DROP TABLE pump", "type DROP"),
        ("COPY pump TO '/tmp/iot2ml-leak.csv'", "type COPY"),
        ("ATTACH '/tmp/iot2ml-other.db' AS o", "type ATTACH"),
        ("INSTALL httpfs", "type"),
        ("LOAD httpfs", "type LOAD"),
        ("PRAGMA version", "type PRAGMA"),
        ("SET threads = 64", "type SET"),
        ("EXPLAIN SELECT 1", "type EXPLAIN"),
        ("CALL pragma_version()", "type CALL"),
        ("SELECT 1; SELECT 2", "2 statements"),
        ("SELECT 1; DROP TABLE pump", "2 statements"),
        ("", "empty"),
        ("  ;  ", "no statement"),
        ("SELEC * FROM pump", "not valid SQL"),
        ("SELECT * FROM read_csv('/etc/passwd')", "not allowed"),
        ("SELECT * FROM read_text('/etc/hostname')", "not allowed"),
        ("SELECT * FROM '/etc/passwd'", "no table '/etc/passwd' in the lake"),  # file scans are off
        ("SELECT * FROM glob('/*')", "not allowed"),
        ("SELECT * FROM read_parquet('https://example.com/x.parquet')", "not allowed"),
        ("SELECT * FROM 's3://bucket/x.parquet'", "not allowed"),
    ],
)
def test_forbidden_sql_is_refused(lake: Lake, sql: str, says: str) -> None:
    with pytest.raises(QueryError, match=says):
        run_query(lake, sql)


def test_nothing_was_written(lake: Lake, tmp_path: Path) -> None:
    for sql in ("COPY pump TO '/tmp/iot2ml-leak.csv'", "CREATE TABLE x AS SELECT 1"):
        with pytest.raises(QueryError):
            run_query(lake, sql)
    assert not Path("/tmp/iot2ml-leak.csv").exists()
    assert lake.tables() == ["pump", "raw"]
    assert run_query(lake, "SELECT count(*) FROM pump").rows == [[30]]


def test_the_sandbox_settings_are_in_force_and_locked(lake: Lake) -> None:
    names = ["enable_external_access", "python_enable_replacements", "lock_configuration", "threads", "memory_limit"]
    sql = "SELECT " + ", ".join(f"current_setting('{n}')" for n in names)
    assert run_query(lake, sql, threads=1, memory_limit="256MB").rows == [[False, False, True, 1, "244.1 MiB"]]


def test_unknown_table_lists_the_tables(lake: Lake) -> None:
    with pytest.raises(QueryError, match=r"no table 'pumps' in the lake: the tables are pump, raw") as caught:
        run_query(lake, "SELECT * FROM pumps")
    assert "Did you mean" not in str(caught.value)


def test_unknown_column_is_a_query_error(lake: Lake) -> None:
    with pytest.raises(QueryError, match="pressur"):
        run_query(lake, "SELECT pressur FROM pump")


def test_timeout_stops_a_heavy_query_quickly(lake: Lake) -> None:
    started = time.monotonic()
    with pytest.raises(QueryError, match=r"query_timeout=0.5s"):
        run_query(lake, "SELECT count(*) FROM pump a, pump b, range(100000000) c WHERE a._seq + c.range > b._seq", timeout=0.5)
    assert time.monotonic() - started < 3


def test_memory_limit_is_enforced(lake: Lake) -> None:
    with pytest.raises(QueryError, match="memory limit 32MB"):
        run_query(lake, "SELECT count(DISTINCT range::VARCHAR) FROM range(20000000)", memory_limit="32MB")


def test_a_broken_table_does_not_break_queries_on_others(lake: Lake, tmp_path: Path) -> None:
    broken = Path(lake.root) / "broken" / "_delta_log"
    broken.mkdir(parents=True)
    (broken / "00000000000000000000.json").write_text("this is not a delta log\n")
    assert run_query(lake, "SELECT count(*) FROM pump").rows == [[30]]


def test_list_tables(lake: Lake) -> None:
    tables = {t["name"]: t for t in list_tables(lake)}
    assert sorted(tables) == ["pump", "raw"]
    pump = tables["pump"]
    assert pump["rows"] == 30 and pump["files"] == 3 and pump["version"] == 2
    types = {c["name"]: c["type"] for c in pump["columns"]}
    assert types == {
        "device_id": "VARCHAR",
        "ts": "TIMESTAMP WITH TIME ZONE",
        "received_at": "TIMESTAMP WITH TIME ZONE",
        "msg_id": "VARCHAR",
        "_seq": "BIGINT",
        "pressure": "DOUBLE",
    }
    assert tables["raw"]["rows"] == 20 and tables["raw"]["files"] == 2
    assert "day" in {c["name"] for c in tables["raw"]["columns"]}


def test_empty_lake(tmp_path: Path) -> None:
    lake = Lake(str(tmp_path / "empty"))
    assert list_tables(lake) == []
    assert run_query(lake, "SELECT 42 AS answer").rows == [[42]]
    with pytest.raises(QueryError, match=r"the tables are \(none yet\)"):
        run_query(lake, "SELECT * FROM raw")
