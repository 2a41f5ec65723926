"""The labels table: CSV import into a real Delta lake, all-or-nothing validation, unknown entities."""

from __future__ import annotations

import datetime as dt
import subprocess
import sys
import threading
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pytest

from iot2ml.core.errors import InvalidInput, NotFound
from iot2ml.core.tables import LABELS_SCHEMA
from iot2ml.lake import Lake
from iot2ml.ml.labels import (
    append_labels,
    known_entities,
    read_labels_csv,
    validate_labels,
)
from iot2ml.query import query_arrow
from iot2ml.simulate.scenarios import QUALITY_CLASSES, WineStation, wine_ratings, write_ratings_csv

UTC = dt.timezone.utc
T0 = dt.datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
IMPORTED = dt.datetime(2026, 4, 1, 8, 30, tzinfo=UTC)
ALLOWED = set(QUALITY_CLASSES)


@pytest.fixture
def lake(tmp_path: Path) -> Lake:
    """A lake whose curated ``wine`` table holds 20 batches from each of two stations."""
    lake = Lake(str(tmp_path / "lake"))
    readings = []
    for i in range(2):
        station = WineStation(i, 7)
        readings += [(f"wine-{i:04d}", n, station.reading(0.0)) for n in range(20)]
    columns = {k: [r[k] for _, _, r in readings] for k in readings[0][2]}
    table = pa.table({
        "device_id": [d for d, _, _ in readings],
        "ts": pa.array([T0 + dt.timedelta(minutes=n) for _, n, _ in readings], pa.timestamp("us", tz="UTC")),
        "msg_id": [f"{d}-run-{n}" for d, n, _ in readings],
        **columns,
    })
    lake.append("wine", table, app_id="ingest", version=1)
    return lake


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def _import(lake: Lake, path: Path, **kwargs) -> int:
    """What ``iot2ml labels import`` does: read, check against the wine table, append."""
    rows = read_labels_csv(path, entity_column="batch_id", label_column="quality", time_column="rated_at")
    table = validate_labels(rows, entity_column="batch_id", label_column="quality", time_column="rated_at",
                            allowed_labels=ALLOWED, known_entities=known_entities(lake, "wine", "batch_id"),
                            source="csv", who="alice", imported_at=IMPORTED, **kwargs)
    return append_labels(lake, table)


def test_schema_is_the_labels_contract() -> None:
    assert LABELS_SCHEMA.names == ["entity", "label", "ts", "source", "who", "imported_at"]
    assert LABELS_SCHEMA.field("ts").type == pa.timestamp("us", tz="UTC")
    assert LABELS_SCHEMA.field("imported_at").type == pa.timestamp("us", tz="UTC")


def test_known_entities_come_from_the_curated_table(lake: Lake) -> None:
    entities = known_entities(lake, "wine", "batch_id")
    assert len(entities) == 40
    assert "wine-0000-b000000" in entities and "wine-0001-b000019" in entities
    with pytest.raises(NotFound, match="no table 'cider'.*the tables are wine"):
        known_entities(lake, "cider", "batch_id")
    with pytest.raises(InvalidInput, match="no column 'batch'.*batch_id"):
        known_entities(lake, "wine", "batch")


def test_simulated_ratings_import_into_the_lake_and_join_the_telemetry(lake: Lake, tmp_path: Path) -> None:
    ratings = wine_ratings(["wine-0000", "wine-0001"], 20, seed=7, noise=0.0)
    path = tmp_path / "ratings.csv"
    write_ratings_csv(path, ratings)

    assert _import(lake, path) == 0  # the Delta version of the new labels table
    assert lake.txn_version("labels", "iot2ml-labels") == 1  # the import counter
    got = query_arrow(lake, "SELECT entity, label, ts, source, who, imported_at FROM labels ORDER BY entity")
    assert got.num_rows == 40
    by_batch = {r["batch_id"]: r for r in ratings}
    for row in got.to_pylist():
        rating = by_batch[row["entity"]]
        assert row["label"] == rating["quality"]
        assert (row["source"], row["who"]) == (rating["source"], rating["who"])  # the file's own columns win
        assert row["ts"] == dt.datetime.fromisoformat(rating["rated_at"])
        assert row["imported_at"] == IMPORTED
    # the labels say what the simulator hid, and join the telemetry by batch id
    truth = {WineStation(i, 7).batch_id(n): WineStation(i, 7).true_quality(n) for i in range(2) for n in range(20)}
    assert {r["entity"]: r["label"] for r in got.to_pylist()} == truth
    joined = query_arrow(lake, "SELECT count(*) FROM wine JOIN labels ON wine.batch_id = labels.entity")
    assert joined.column(0)[0].as_py() == 40

    # a second import is the next version of the app's counter
    assert _import(lake, path) == 1
    assert lake.txn_version("labels", "iot2ml-labels") == 2
    assert query_arrow(lake, "SELECT count(*) FROM labels").column(0)[0].as_py() == 80


def test_every_problem_is_reported_with_its_row_and_nothing_is_written(lake: Lake, tmp_path: Path) -> None:
    good = wine_ratings(["wine-0000"], 3, seed=7, noise=0.0)
    path = _write(tmp_path / "bad.csv", "\n".join([
        "batch_id,quality,rated_at,source,who",
        f"{good[0]['batch_id']},{good[0]['quality']},2026-03-01T10:00:00Z,user,u1",    # row 1 fine
        ",best,2026-03-01T10:00:00Z,user,u2",                                          # row 2 no entity
        "wine-0009-b000001,good,2026-03-01T10:00:00Z,user,u3",                         # row 3 unknown
        f"{good[1]['batch_id']},excellent,2026-03-01T10:00:00Z,taster,t1",             # row 4 bad label
        f"{good[2]['batch_id']},Best,yesterday,user,u4",                               # row 5 two problems
        f"{good[2]['batch_id']},,,user,u5",                                            # row 6 two missing
    ]) + "\n")
    assert _import(lake, _write(tmp_path / "ok.csv", f"batch_id,quality,rated_at\n{good[0]['batch_id']},good,1772359200\n")) == 0

    with pytest.raises(InvalidInput) as info:
        _import(lake, path)
    message = str(info.value)
    assert message.startswith("5 of 6 label rows are invalid, nothing was imported")
    assert info.value.problems == [  # type: ignore[attr-defined]
        "row 2, column 'batch_id', value '': missing entity",
        "row 3, column 'batch_id', value 'wine-0009-b000001': unknown entity: no batch_id 'wine-0009-b000001' "
        "in the data (40 known)",
        "row 4, column 'quality', value 'excellent': label not in the allowed set (best, better, good)",
        "row 5, column 'quality', value 'Best': label not in the allowed set (best, better, good): did you mean 'best'?",
        "row 5, column 'rated_at', value 'yesterday': bad timestamp: not ISO 8601 (e.g. 2026-03-01T12:00:00Z) "
        "or epoch seconds",
        "row 6, column 'quality', value '': missing label",
        "row 6, column 'rated_at', value '': bad timestamp: missing time",
    ]
    assert all(line in message for line in info.value.problems)  # type: ignore[attr-defined]
    # the good first import is all there is
    assert lake.txn_version("labels", "iot2ml-labels") == 1
    assert query_arrow(lake, "SELECT entity, label, ts FROM labels").to_pylist() == [
        {"entity": good[0]["batch_id"], "label": "good", "ts": dt.datetime(2026, 3, 1, 10, 0, tzinfo=UTC)},
    ]


def test_missing_columns_name_the_columns_present(tmp_path: Path) -> None:
    path = _write(tmp_path / "r.csv", "batch,score\nwine-0000-b000000,good\n")
    with pytest.raises(InvalidInput, match=r"no column 'batch_id', 'quality': its columns are 'batch', 'score'"):
        read_labels_csv(path, entity_column="batch_id", label_column="quality")
    with pytest.raises(InvalidInput, match=r"no column 'when'"):
        read_labels_csv(_write(tmp_path / "s.csv", "batch_id,quality\n"), entity_column="batch_id",
                        label_column="quality", time_column="when")
    with pytest.raises(InvalidInput, match="is empty"):
        read_labels_csv(_write(tmp_path / "e.csv", ""), entity_column="batch_id", label_column="quality")
    with pytest.raises(NotFound, match="does not exist"):
        read_labels_csv(tmp_path / "nope.csv", entity_column="batch_id", label_column="quality")
    with pytest.raises(InvalidInput, match=r"column 'quality' not found: the columns are 'batch_id', 'score'"):
        validate_labels([{"batch_id": "x", "score": 1}], entity_column="batch_id", label_column="quality",
                        source="api", who="bob")


def test_rows_can_be_dicts_dataframes_or_arrow_tables() -> None:
    rows = [{"sample": "s1", "visc": 4.25, "at": T0}, {"sample": 17, "visc": "3.9", "at": T0.replace(tzinfo=None)}]
    expected = [("s1", "4.25", T0), ("17", "3.9", T0)]
    for given in (rows, pd.DataFrame(rows), pa.Table.from_pylist(rows[:1]), pd.DataFrame(rows[:1])):
        table = validate_labels(given, entity_column="sample", label_column="visc", time_column="at",
                                source="lab", who="lab-01")
        assert table.schema.equals(LABELS_SCHEMA)
        got = list(zip(*(table.column(c).to_pylist() for c in ("entity", "label", "ts"))))
        assert got == expected[: table.num_rows]
        assert set(table.column("source").to_pylist()) == {"lab"}
    # without a time column the label's time is the import time
    table = validate_labels([{"e": "a", "l": "x"}], entity_column="e", label_column="l", source="api", who="bob",
                            imported_at=IMPORTED)
    assert table.column("ts").to_pylist() == [IMPORTED] == table.column("imported_at").to_pylist()
    frame = pd.DataFrame({"e": ["a", None], "l": ["x", "y"]})
    with pytest.raises(InvalidInput, match="row 2, column 'e', value None: missing entity"):
        validate_labels(frame, entity_column="e", label_column="l", source="api", who="bob")
    with pytest.raises(InvalidInput, match="input is empty"):
        validate_labels([], entity_column="e", label_column="l", source="api", who="bob")
    with pytest.raises(InvalidInput, match="who '' is empty"):
        validate_labels([{"e": "a", "l": "x"}], entity_column="e", label_column="l", source="api", who="")


def test_append_refuses_unvalidated_tables(lake: Lake) -> None:
    with pytest.raises(InvalidInput, match="validate_labels"):
        append_labels(lake, pa.table({"entity": ["a"], "label": ["b"]}))
    with pytest.raises(InvalidInput, match="empty"):
        append_labels(lake, LABELS_SCHEMA.empty_table())
    assert "labels" not in lake.tables()


def test_concurrent_imports_each_get_their_own_version(tmp_path: Path) -> None:
    root = str(tmp_path / "lake")
    table = validate_labels([{"e": "a", "l": "x"}], entity_column="e", label_column="l", source="api", who="bob")
    append_labels(Lake(root), table)
    # threads of one process take turns; other processes race through Delta's conflict check
    code = (
        "import sys; from iot2ml.lake import Lake; from iot2ml.ml.labels import append_labels, validate_labels\n"
        "t = validate_labels([{'e': 'a', 'l': 'x'}], entity_column='e', label_column='l', source='api', who='bob')\n"
        "for _ in range(3): append_labels(Lake(sys.argv[1]), t)\n"
    )
    procs = [subprocess.Popen([sys.executable, "-c", code, root], stderr=subprocess.PIPE, text=True) for _ in range(3)]
    errors: list[BaseException] = []

    def run() -> None:
        try:
            for _ in range(3):
                append_labels(Lake(root), table)
        except BaseException as err:  # noqa: BLE001
            errors.append(err)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert errors == []
    for proc in procs:
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
    lake = Lake(root)
    assert lake.txn_version("labels", "iot2ml-labels") == 16
    assert query_arrow(lake, "SELECT count(*) FROM labels").column(0)[0].as_py() == 16
