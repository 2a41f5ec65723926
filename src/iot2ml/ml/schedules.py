"""Retraining schedules and the history of their runs, in the catalog (``iot2ml schedule ...``).

``ml/scheduler.py`` reads them and records each run; the CLI adds, lists and removes them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import sqlalchemy as sa

from ..core.catalog import Catalog, metadata
from ..core.errors import AlreadyExists, InvalidInput, NotFound

__all__ = ["Schedule", "Schedules"]

_schedules = sa.Table(
    "schedules", metadata,
    sa.Column("name", sa.String(128), primary_key=True),
    sa.Column("job_json", sa.Text, nullable=False),
    sa.Column("every_seconds", sa.Float, nullable=True),
    sa.Column("min_new_rows", sa.BigInteger, nullable=True),
    sa.Column("on_labels", sa.Boolean, nullable=False, default=False),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
)
_runs = sa.Table(
    "schedule_runs", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("schedule", sa.String(128), nullable=False, index=True),
    sa.Column("trigger", sa.String(64), nullable=False),
    sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
    sa.Column("status", sa.String(16), nullable=False),  # running, ok, failed
    sa.Column("duration_s", sa.Float, nullable=True),
    sa.Column("error", sa.Text, nullable=True),
    sa.Column("model_version", sa.Integer, nullable=True),
    sa.Column("table_rows", sa.BigInteger, nullable=True),
    sa.Column("labels_version", sa.BigInteger, nullable=True),
)


def _now() -> datetime:
    return datetime.now(timezone.utc)


@dataclass(frozen=True)
class Schedule:
    name: str
    job: dict[str, Any]
    every_seconds: float | None
    min_new_rows: int | None
    on_labels: bool


class Schedules:
    """Retraining schedules and the history of their runs, in the catalog database."""

    def __init__(self, catalog: Catalog) -> None:
        self.catalog = catalog
        catalog.register(_schedules, _runs)

    def add(self, name: str, job: dict[str, Any], *, every_seconds: float | None = None,
            min_new_rows: int | None = None, on_labels: bool = False, replace: bool = False) -> Schedule:
        if not name or len(name) > 128:
            raise InvalidInput("schedule name must be 1-128 characters")
        if every_seconds is None and min_new_rows is None and not on_labels:
            raise InvalidInput(f"schedule {name!r} has no trigger: give --every, --min-new-rows or --on-labels")
        if every_seconds is not None and every_seconds <= 0:
            raise InvalidInput(f"--every {every_seconds!r} must be a positive duration such as 30m or 1h")
        row = {"name": name, "job_json": json.dumps(job), "every_seconds": every_seconds,
               "min_new_rows": min_new_rows, "on_labels": on_labels, "created_at": _now()}
        with self.catalog.begin() as conn:
            if conn.execute(sa.select(_schedules.c.name).where(_schedules.c.name == name)).first():
                if not replace:
                    raise AlreadyExists(f"schedule {name!r} exists: remove it first")
                conn.execute(_schedules.delete().where(_schedules.c.name == name))
            conn.execute(_schedules.insert().values(**row))
        return Schedule(name, job, every_seconds, min_new_rows, on_labels)

    def remove(self, name: str) -> None:
        with self.catalog.begin() as conn:
            if not conn.execute(_schedules.delete().where(_schedules.c.name == name)).rowcount:
                raise NotFound(f"no schedule {name!r}: see 'iot2ml schedule list'")

    def list(self) -> list[Schedule]:
        with self.catalog.connect() as conn:
            rows = conn.execute(sa.select(_schedules).order_by(_schedules.c.name)).all()
        return [Schedule(r.name, json.loads(r.job_json), r.every_seconds, r.min_new_rows, bool(r.on_labels))
                for r in rows]

    def start_run(self, name: str, trigger: str, *, table_rows: int | None, labels_version: int | None) -> int:
        with self.catalog.begin() as conn:
            result = conn.execute(_runs.insert().values(
                schedule=name, trigger=trigger, started_at=_now(), status="running",
                table_rows=table_rows, labels_version=labels_version))
            return int(result.inserted_primary_key[0])

    def finish_run(self, run_id: int, *, ok: bool, duration_s: float, error: str | None = None,
                   model_version: int | None = None) -> None:
        with self.catalog.begin() as conn:
            conn.execute(_runs.update().where(_runs.c.id == run_id).values(
                finished_at=_now(), status="ok" if ok else "failed", duration_s=duration_s,
                error=(error or None) and error[:4000], model_version=model_version))

    def runs(self, name: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
        query = sa.select(_runs).order_by(_runs.c.id.desc()).limit(limit)
        if name:
            query = query.where(_runs.c.schedule == name)
        with self.catalog.connect() as conn:
            rows = conn.execute(query).all()
        return [
            {k: (v.isoformat() if isinstance(v, datetime) else v) for k, v in r._mapping.items()}
            for r in rows
        ]

    def last_run(self, name: str) -> dict[str, Any] | None:
        found = self.runs(name, limit=1)
        return found[0] if found else None
