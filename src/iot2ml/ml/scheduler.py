"""``iot2ml scheduler``: retrain on an interval, after N new rows, or when new labels land.

Runs inside ``iot2ml up`` (supervised like the other components) or alone. Schedules and the history
of their runs live in the catalog (``iot2ml schedule list / runs``). A run that fails is recorded
with its error and changes nothing in the registry, so the current champion keeps serving.
"""

from __future__ import annotations

import logging
import shlex
import signal
import threading
import time
from datetime import datetime, timezone
from typing import Any

from ..core.catalog import Catalog
from ..core.config import Settings
from ..core.errors import InvalidInput, Iot2mlError
from ..core.runtime import clear_run_info, write_run_info
from ..core.tables import LABELS
from ..core.timeutil import parse_duration
from .schedules import Schedule, Schedules

log = logging.getLogger("iot2ml.scheduler")


def parse_train_args(text: str, *, default_name: str) -> dict[str, Any]:
    """``"forecast --table pollution --target ozone --name ozone-24h"`` -> a job dict.

    >>> parse_train_args("anomaly --table pump --features pressure,flow", default_name="x")["options"]
    {'features': ['pressure', 'flow']}
    """
    tokens = shlex.split(text)
    if not tokens or tokens[0].startswith("-"):
        raise InvalidInput(f"--train {text!r} must start with the task: forecast, classify, regress or anomaly")
    job: dict[str, Any] = {"task": tokens[0], "options": {}, "where": None, "name": default_name}
    i = 1
    while i < len(tokens):
        key = tokens[i]
        if not key.startswith("--") or i + 1 >= len(tokens):
            raise InvalidInput(f"--train: expected '--option value' at {key!r}")
        value: Any = tokens[i + 1]
        key = key[2:].replace("-", "_")
        if key in ("table", "name", "where"):
            job[key] = value
        elif key == "features":
            job["options"]["features"] = [f.strip() for f in value.split(",") if f.strip()]
        elif key == "horizon":
            job["options"][key] = int(value)
        elif key == "label_window":
            job["options"][key] = parse_duration(value)
        else:
            job["options"][key] = value
        i += 2
    if "table" not in job:
        raise InvalidInput("--train needs --table")
    from .jobs import TrainJob

    TrainJob(task=job["task"], table=job["table"], name=job["name"], options=job["options"], where=job["where"])
    return job


def _as_utc(text: str | None) -> datetime | None:
    if not text:
        return None
    value = datetime.fromisoformat(text)
    return value if value.tzinfo else value.replace(tzinfo=timezone.utc)


def due(schedule: Schedule, last: dict[str, Any] | None, *, now: datetime, table_rows: int | None,
        labels_version: int | None) -> str | None:
    """Why ``schedule`` should run now, or ``None``."""
    if last is None:
        return "first run"
    started = _as_utc(last["started_at"])
    if last["status"] == "running" and started and (now - started).total_seconds() < 6 * 3600:
        return None  # still running (or died less than 6 h ago)
    if schedule.every_seconds and started and (now - started).total_seconds() >= schedule.every_seconds:
        return "interval"
    if schedule.min_new_rows and table_rows is not None:
        new = table_rows - (last.get("table_rows") or 0)
        if new >= schedule.min_new_rows:
            return f"{new} new rows"
    if schedule.on_labels and labels_version is not None and labels_version != last.get("labels_version"):
        return "new labels"
    return None


class Scheduler:
    """Checks every schedule each ``poll`` seconds and runs the due ones, one at a time."""

    def __init__(self, settings: Settings, *, poll: float = 10.0) -> None:
        from .workbench import Workbench

        self.settings = settings
        self.catalog = Catalog(settings.catalog)
        self.schedules = Schedules(self.catalog)
        self.bench = Workbench(settings)
        self.poll = poll
        self._stop = threading.Event()

    def _table_rows(self, table: str) -> int | None:
        import pyarrow as pa

        if table not in self.bench.lake.tables():
            return None
        actions = pa.table(self.bench.lake.open(table).get_add_actions(flatten=True))
        return int(sum(actions.column("num_records").to_pylist())) if actions.num_rows else 0

    def _labels_version(self) -> int | None:
        return self.bench.version(LABELS) if LABELS in self.bench.lake.tables() else None

    def tick(self) -> list[dict[str, Any]]:
        """Run every due schedule once; returns what ran."""
        from .jobs import TrainJob

        ran = []
        for schedule in self.schedules.list():
            job = schedule.job
            rows = self._table_rows(job["table"])
            labels = self._labels_version()
            reason = due(schedule, self.schedules.last_run(schedule.name), now=datetime.now(timezone.utc),
                         table_rows=rows, labels_version=labels)
            if reason is None:
                continue
            run_id = self.schedules.start_run(schedule.name, reason, table_rows=rows, labels_version=labels)
            started = time.monotonic()
            try:
                described = self.bench.train(TrainJob(task=job["task"], table=job["table"], name=job["name"],
                                                      options=job.get("options", {}), where=job.get("where")))
                self.schedules.finish_run(run_id, ok=True, duration_s=time.monotonic() - started,
                                          model_version=described["version"])
                log.info("schedule %s (%s): %s v%s", schedule.name, reason, job["name"], described["version"])
                ran.append({"schedule": schedule.name, "trigger": reason, "status": "ok",
                            "version": described["version"]})
            except Exception as err:  # noqa: BLE001 - recorded; the champion stays as it was
                self.schedules.finish_run(run_id, ok=False, duration_s=time.monotonic() - started,
                                          error=f"{type(err).__name__}: {err}")
                log.error("schedule %s (%s) failed: %s", schedule.name, reason, err)
                ran.append({"schedule": schedule.name, "trigger": reason, "status": "failed", "error": str(err)})
        return ran

    def run(self) -> None:
        while not self._stop.is_set():
            try:
                self.tick()
            except Iot2mlError as err:
                log.error("scheduler pass failed: %s", err)
            self._stop.wait(self.poll)

    def stop(self) -> None:
        self._stop.set()


def run_scheduler_component(settings: Settings) -> None:
    scheduler = Scheduler(settings, poll=settings.schedule_poll)
    signal.signal(signal.SIGTERM, lambda *_: scheduler.stop())
    signal.signal(signal.SIGINT, lambda *_: scheduler.stop())
    write_run_info(settings.data_dir, "scheduler", {})
    try:
        scheduler.run()
    finally:
        clear_run_info(settings.data_dir, "scheduler")


__all__ = ["Scheduler", "due", "parse_duration", "parse_train_args"]
