"""Notifiers and every delivery attempt, in the catalog (tables ``notifiers``, ``notification_deliveries``).

Targets are stored whole (a Slack webhook URL or an SMTP password is what sends); ``list`` and
``record`` show them masked (``notifiers.masked_target``); ``get`` and ``notifier`` hand out the real one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError

from ..core.catalog import Catalog, metadata
from ..core.errors import AlreadyExists, NotFound
from .notifiers import (
    Delivery,
    Notifier,
    check_name,
    make_notifier,
    masked_options,
    masked_target,
)

__all__ = ["NotifierRecord", "Notifiers"]

_notifiers = sa.Table(
    "notifiers", metadata,
    sa.Column("name", sa.String(64), primary_key=True),
    sa.Column("kind", sa.String(32), nullable=False),
    sa.Column("target", sa.Text, nullable=False),
    sa.Column("options_json", sa.Text, nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
)
_deliveries = sa.Table(
    "notification_deliveries", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("notifier", sa.String(64), nullable=False, index=True),
    sa.Column("group_key", sa.Text, nullable=False),
    sa.Column("status", sa.String(16), nullable=False),  # ok, failed, dropped
    sa.Column("attempt", sa.Integer, nullable=False),
    sa.Column("error", sa.Text, nullable=True),
    sa.Column("at", sa.DateTime(timezone=True), nullable=False),
)


@dataclass(frozen=True)
class NotifierRecord:
    """A stored notifier. ``masked()`` is what lists show."""

    name: str
    kind: str
    target: str
    options: dict[str, Any]
    created_at: datetime

    def masked(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "target": masked_target(self.kind, self.target),
                "options": masked_options(self.options), "created_at": _iso(self.created_at)}


def _iso(t: datetime) -> str:
    return (t if t.tzinfo else t.replace(tzinfo=UTC)).isoformat()


class Notifiers:
    """The notifiers of this platform and the log of their deliveries."""

    def __init__(self, catalog: Catalog) -> None:
        self.catalog = catalog
        catalog.register(_notifiers, _deliveries)

    def add(self, name: str, kind: str, target: str, **options: Any) -> NotifierRecord:
        """Store a notifier after checking it can be built (the URL parses, the kind is known)."""
        check_name(name)
        make_notifier(kind, target, name=name, **options)
        record = NotifierRecord(name, kind, target, dict(options), datetime.now(UTC))
        try:
            with self.catalog.begin() as conn:
                conn.execute(_notifiers.insert().values(name=name, kind=kind, target=target,
                                                        options_json=json.dumps(record.options),
                                                        created_at=record.created_at))
        except IntegrityError:
            raise AlreadyExists(f"notifier {name!r} exists: remove it first ('iot2ml notifiers remove {name}') "
                                "or choose another name") from None
        return record

    def get(self, name: str) -> NotifierRecord:
        with self.catalog.connect() as conn:
            row = conn.execute(sa.select(_notifiers).where(_notifiers.c.name == name)).first()
        if row is None:
            raise NotFound(f"no notifier {name!r}: see 'iot2ml notifiers list'")
        return _record(row)

    def list(self) -> list[NotifierRecord]:
        with self.catalog.connect() as conn:
            rows = conn.execute(sa.select(_notifiers).order_by(_notifiers.c.name)).all()
        return [_record(r) for r in rows]

    def remove(self, name: str) -> None:
        with self.catalog.begin() as conn:
            if not conn.execute(_notifiers.delete().where(_notifiers.c.name == name)).rowcount:
                raise NotFound(f"no notifier {name!r}: see 'iot2ml notifiers list'")

    def notifier(self, name: str) -> Notifier:
        """The notifier ``name``, ready to send."""
        r = self.get(name)
        return make_notifier(r.kind, r.target, name=r.name, **r.options)

    def notifiers(self) -> list[Notifier]:
        """Every stored notifier, ready to send."""
        return [make_notifier(r.kind, r.target, name=r.name, **r.options) for r in self.list()]

    def record(self, delivery: Delivery) -> None:
        """Log one delivery attempt."""
        with self.catalog.begin() as conn:
            conn.execute(_deliveries.insert().values(
                notifier=delivery.notifier, group_key=delivery.group_key, status=delivery.status,
                attempt=delivery.attempt, error=delivery.error, at=delivery.at))

    def deliveries(self, notifier: str | None = None, *, limit: int = 100) -> list[Delivery]:
        """The latest delivery attempts (of ``notifier``), oldest first."""
        query = sa.select(_deliveries).order_by(_deliveries.c.id.desc()).limit(limit)
        if notifier is not None:
            query = query.where(_deliveries.c.notifier == notifier)
        with self.catalog.connect() as conn:
            rows = conn.execute(query).all()
        return [Delivery(r.notifier, r.group_key, r.status, r.attempt, r.error,
                         r.at if r.at.tzinfo else r.at.replace(tzinfo=UTC)) for r in reversed(rows)]


def _record(row: Any) -> NotifierRecord:
    return NotifierRecord(row.name, row.kind, row.target, json.loads(row.options_json), row.created_at)
