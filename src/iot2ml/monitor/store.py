"""Notifiers and every delivery attempt, in the catalog (tables ``notifiers``, ``notification_deliveries``);
alert rules, the monitor's state and the requests to it (``alert_rules``, ``monitor_state``, ``monitor_commands``).

Targets are stored whole (a Slack webhook URL or an SMTP password is what sends); ``list`` and
``record`` show them masked (``notifiers.masked_target``); ``get`` and ``notifier`` hand out the real one.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError

from ..core.catalog import Catalog, metadata
from ..core.errors import AlreadyExists, InvalidInput, NotFound
from .notifiers import (
    Delivery,
    Notifier,
    check_name,
    make_notifier,
    masked_options,
    masked_target,
)
from .rules import State, fingerprint

__all__ = ["AlertRules", "Command", "NotifierRecord", "Notifiers", "RuleRecord"]

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


# ------------------------------------------------------------------------------------------- alert rules

_rules = sa.Table(
    "alert_rules", metadata,
    sa.Column("name", sa.String(64), primary_key=True),
    sa.Column("table", sa.String(128), nullable=False),
    sa.Column("when", sa.Text, nullable=False),
    sa.Column("by", sa.Text, nullable=False),  # JSON list
    sa.Column("window", sa.Float, nullable=False),
    sa.Column("for", sa.Float, nullable=False),
    sa.Column("every", sa.Float, nullable=False),
    sa.Column("severity", sa.String(32), nullable=False),
    sa.Column("notify", sa.Text, nullable=False),  # JSON list of notifier names
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("kind", sa.String(32), nullable=False, server_default="threshold"),  # see kinds.KINDS
    sa.Column("spec", sa.Text, nullable=False, server_default="{}"),  # JSON object: the kind's own settings
)
_state = sa.Table(
    "monitor_state", metadata,
    sa.Column("id", sa.Integer, primary_key=True),  # always 1
    sa.Column("snapshot", sa.Text, nullable=False),
    sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
)
_commands = sa.Table(
    "monitor_commands", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("kind", sa.String(16), nullable=False),  # ack, silence
    sa.Column("target", sa.String(128), nullable=False),  # a fingerprint (ack) or a rule name (silence)
    sa.Column("until", sa.Float, nullable=True),  # silence: epoch seconds
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
)


@dataclass(frozen=True)
class RuleRecord:
    """A stored alert rule; durations in seconds.

    ``kind`` names a row of ``kinds.KINDS``; ``table`` is what it watches (a lake table, a device
    type's table or a model), ``when`` its condition in words, ``spec`` the kind's own settings
    (JSON-able; ``spec["retrain"]`` when the rule retrains a model)."""

    name: str
    table: str
    when: str
    by: tuple[str, ...]
    window: float
    for_: float
    every: float
    severity: str
    notify: tuple[str, ...]
    created_at: datetime
    kind: str = "threshold"
    spec: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RuleRecord) and self.to_dict() == other.to_dict()

    def __hash__(self) -> int:
        return hash((self.name, self.kind, self.table, self.when))

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "table": self.table, "when": self.when, "by": list(self.by),
                "window": self.window, "for": self.for_, "every": self.every, "severity": self.severity,
                "notify": list(self.notify), "spec": self.spec, "created_at": _iso(self.created_at)}


@dataclass(frozen=True)
class Command:
    """A request to the running monitor, applied on its next tick."""

    id: int
    kind: str
    target: str
    until: float | None
    created_at: datetime


class AlertRules:
    """Alert rules, the monitor's snapshot and the ack/silence requests waiting for the monitor.

    ``ack`` and ``silence`` do not touch the snapshot (the running monitor owns it and would overwrite
    it): they queue a command row; the monitor applies the queued commands, then stores its snapshot and
    deletes those rows in one transaction (:meth:`save_state`), so none is lost or applied twice."""

    def __init__(self, catalog: Catalog) -> None:
        self.catalog = catalog
        catalog.register(_notifiers, _rules, _state, _commands)

    def add(self, rule: RuleRecord) -> RuleRecord:
        """Store a rule already checked (``compile_rule``, ``Rule``); every ``notify`` name must exist."""
        with self.catalog.begin() as conn:
            known = {r.name for r in conn.execute(sa.select(_notifiers.c.name))}
            missing = [n for n in rule.notify if n not in known]
            if missing:
                raise InvalidInput(f"--notify {', '.join(map(repr, missing))}: no such notifier: add it with "
                                   "'iot2ml notifiers add NAME --webhook URL' (see 'iot2ml notifiers list')")
            if conn.execute(sa.select(_rules.c.name).where(_rules.c.name == rule.name)).first() is not None:
                raise AlreadyExists(f"alert rule {rule.name!r} exists: remove it first "
                                    f"('iot2ml alerts remove {rule.name}') or choose another name")
            conn.execute(_rules.insert().values(
                name=rule.name, table=rule.table, when=rule.when, by=json.dumps(list(rule.by)), window=rule.window,
                **{"for": rule.for_}, every=rule.every, severity=rule.severity, notify=json.dumps(list(rule.notify)),
                created_at=rule.created_at, kind=rule.kind, spec=json.dumps(rule.spec, sort_keys=True)))
        return rule

    def list(self) -> list[RuleRecord]:
        with self.catalog.connect() as conn:
            rows = conn.execute(sa.select(_rules).order_by(_rules.c.name)).all()
        return [_rule(r) for r in rows]

    def get(self, name: str) -> RuleRecord:
        with self.catalog.connect() as conn:
            row = conn.execute(sa.select(_rules).where(_rules.c.name == name)).first()
        if row is None:
            raise NotFound(f"no alert rule {name!r}: see 'iot2ml alerts list'")
        return _rule(row)

    def remove(self, name: str) -> None:
        with self.catalog.begin() as conn:
            if not conn.execute(_rules.delete().where(_rules.c.name == name)).rowcount:
                raise NotFound(f"no alert rule {name!r}: see 'iot2ml alerts list'")

    # -- requests to the monitor ------------------------------------------------------------------
    def ack(self, fingerprint: str) -> Command:
        """Queue an ack of the firing alert ``fingerprint`` (``NotFound`` unless the monitor's state has it)."""
        if fingerprint not in firing_ids(self.load_state()):
            raise NotFound(f"alert {fingerprint!r} is not firing: see 'iot2ml alerts list' for the ids "
                           "of firing alerts")
        return self._queue("ack", fingerprint, None)

    def silence(self, name: str, until: float) -> Command:
        """Queue a silence of rule ``name``'s alerts until ``until`` (epoch seconds)."""
        self.get(name)
        return self._queue("silence", name, until)

    def _queue(self, kind: str, target: str, until: float | None) -> Command:
        at = datetime.now(UTC)
        with self.catalog.begin() as conn:
            cid = conn.execute(_commands.insert().values(kind=kind, target=target, until=until,
                                                         created_at=at)).inserted_primary_key[0]
        return Command(int(cid), kind, target, until, at)

    def commands(self) -> list[Command]:
        """The queued requests, oldest first."""
        with self.catalog.connect() as conn:
            rows = conn.execute(sa.select(_commands).order_by(_commands.c.id)).all()
        return [Command(r.id, r.kind, r.target, r.until, r.created_at if r.created_at.tzinfo
                        else r.created_at.replace(tzinfo=UTC)) for r in rows]

    # -- the monitor's state ----------------------------------------------------------------------
    def load_state(self) -> dict[str, Any] | None:
        with self.catalog.connect() as conn:
            text = conn.execute(sa.select(_state.c.snapshot).where(_state.c.id == 1)).scalar()
        return None if text is None else json.loads(text)

    def save_state(self, snapshot: dict[str, Any], *, applied: Sequence[int] = ()) -> None:
        """Store the snapshot and drop the ``applied`` commands, in one transaction."""
        text, at = json.dumps(snapshot), datetime.now(UTC)
        with self.catalog.begin() as conn:
            if not conn.execute(_state.update().where(_state.c.id == 1).values(snapshot=text, updated_at=at)).rowcount:
                conn.execute(_state.insert().values(id=1, snapshot=text, updated_at=at))
            if applied:
                conn.execute(_commands.delete().where(_commands.c.id.in_(list(applied))))


def firing_ids(state: dict[str, Any] | None) -> dict[str, dict[str, Any]]:
    """The alerting instances in a monitor snapshot by fingerprint: ``{"rule", "labels", "state", "value"}``."""
    out: dict[str, dict[str, Any]] = {}
    rules = ((state or {}).get("engine") or {}).get("rules") or {}
    for name, data in rules.items():
        for inst in data.get("instances") or []:
            if State(inst.get("state")).alerting:
                out[fingerprint(inst["labels"])] = {"rule": name, "labels": inst["labels"], "state": inst["state"],
                                                     "value": inst.get("value")}
    return out


def _rule(row: Any) -> RuleRecord:
    created = row.created_at if row.created_at.tzinfo else row.created_at.replace(tzinfo=UTC)
    return RuleRecord(row.name, row.table, row.when, tuple(json.loads(row.by)), row.window, row._mapping["for"],
                      row.every, row.severity, tuple(json.loads(row.notify)), created, row.kind,
                      json.loads(row.spec or "{}"))
