from datetime import datetime, timedelta, timezone

import pytest

from iot2ml.core.catalog import Catalog
from iot2ml.core.errors import AlreadyExists, InvalidInput
from iot2ml.core.timeutil import parse_duration
from iot2ml.ml.schedules import Schedule, Schedules
from iot2ml.ml.scheduler import due, parse_train_args

NOW = datetime(2026, 11, 22, 12, 0, tzinfo=timezone.utc)


def last(minutes_ago: float, status: str = "ok", rows: int | None = 100, labels: int | None = 3) -> dict:
    return {"started_at": (NOW - timedelta(minutes=minutes_ago)).isoformat(), "status": status,
            "table_rows": rows, "labels_version": labels}


def test_due_by_interval_rows_and_labels():
    every = Schedule("a", {}, 3600, None, False)
    assert due(every, None, now=NOW, table_rows=0, labels_version=None) == "first run"
    assert due(every, last(30), now=NOW, table_rows=0, labels_version=None) is None
    assert due(every, last(61), now=NOW, table_rows=0, labels_version=None) == "interval"
    assert due(every, last(61, status="running"), now=NOW, table_rows=0, labels_version=None) is None

    rows = Schedule("b", {}, None, 500, False)
    assert due(rows, last(1), now=NOW, table_rows=599, labels_version=None) is None
    assert due(rows, last(1), now=NOW, table_rows=600, labels_version=None) == "500 new rows"

    labels = Schedule("c", {}, None, None, True)
    assert due(labels, last(1, labels=3), now=NOW, table_rows=0, labels_version=3) is None
    assert due(labels, last(1, labels=3), now=NOW, table_rows=0, labels_version=4) == "new labels"


def test_parse_train_args_and_durations():
    job = parse_train_args("forecast --table pollution --target ozone --freq 1h --horizon 24 --name ozone-24h",
                           default_name="retrain-ozone")
    assert job == {"task": "forecast", "table": "pollution", "name": "ozone-24h", "where": None,
                   "options": {"target": "ozone", "freq": "1h", "horizon": 24}}
    with pytest.raises(InvalidInput, match="must start with the task"):
        parse_train_args("--table x", default_name="n")
    with pytest.raises(InvalidInput, match="task 'fly' is not known"):
        parse_train_args("fly --table x", default_name="n")
    assert parse_duration("2d") == 172800
    with pytest.raises(InvalidInput, match="30m"):
        parse_duration("soon")


def test_schedules_and_history_in_the_catalog(catalog_url):
    schedules = Schedules(Catalog(catalog_url))
    schedules.add("s1", {"task": "anomaly", "table": "pump", "name": "m"}, every_seconds=60)
    with pytest.raises(AlreadyExists):
        schedules.add("s1", {"task": "anomaly"}, every_seconds=60)
    with pytest.raises(InvalidInput, match="no trigger"):
        schedules.add("s2", {"task": "anomaly"})
    run = schedules.start_run("s1", "first run", table_rows=10, labels_version=None)
    schedules.finish_run(run, ok=False, duration_s=0.5, error="InvalidInput: no rows")
    history = schedules.runs("s1")
    assert [(h["status"], h["error"], h["trigger"]) for h in history] == [("failed", "InvalidInput: no rows", "first run")]
    assert [s.name for s in schedules.list()] == ["s1"]
