"""Alertmanager's aggregation: group, dedup, time, silence and acknowledge notifications.

Pure logic with time handed in. Alerts come in per rule through :meth:`Grouper.sync` (the rule's
current firing alerts; those gone since the last sync are resolved); :meth:`Grouper.due` returns
the :class:`~iot2ml.monitor.notifiers.Notification` objects (with their ``at`` and ``repeat``) to
hand to the dispatcher now, rendered by the notifiers (the webhook's version 4 body included).

- A *group* is (receiver, values of ``group_by``). ``group_by`` defaults to ``("alertname",
  "severity")``: one notification per rule and severity however many ``--by`` label sets breach —
  1,000 devices over the limit are one message listing 1,000 alerts. (Alertmanager's own default is
  no grouping at all, everything in one group per route; a rule's ``--by`` defines *instances*, not
  groups, as in Grafana where ``group_by`` defaults to alertname and folder.)
- ``group_wait`` (default 30s): a new group sends its first notification this long after its first
  alert. ``group_interval`` (5m): afterwards the group is looked at every interval and sends if its
  set of firing alerts grew or an alert resolved. ``repeat_interval`` (4h): an unchanged firing
  group is re-sent after this long. A group that was notified for nothing stays silent; one whose
  alerts all resolved sends the "resolved" notification and is removed.
- Dedup is Alertmanager's: a notification goes out only if the firing set is not a subset of the
  last one sent, a notified alert resolved, or the repeat is due.
- A :class:`Silence` (label matchers, or ``alertname`` for a rule, with an end time) keeps matching
  alerts out of notifications while active; it does not change any state or any ``alerts`` row.
- :meth:`Grouper.ack` (by fingerprint) stops *repeats* for that alert until it resolves or fires
  again; a change to its group is still sent.

Persistence contract: call :meth:`Grouper.snapshot` after the notifications of a :meth:`due` were
handed to the dispatcher (which owns delivery and retry) and store it; :meth:`Grouper.restore`
into a fresh grouper resumes with the same timers and dedup log, so a restart neither re-sends a
notification nor loses one. A crash between ``due`` and the snapshot re-sends that batch once (at
least once, never lost).

Sources (Alertmanager configuration reference, ``route``):
``group_wait`` "How long to initially wait to send a notification for a group of alerts" default
30s; ``group_interval`` "How long to wait before sending a notification about new alerts that are
added to a group of alerts for which an initial notification has already been sent" default 5m;
``repeat_interval`` "How long to wait before sending a notification again if it has already been
sent successfully for an alert" default 4h — https://prometheus.io/docs/alerting/latest/configuration/
; dedup rule from Alertmanager ``notify/notify.go`` (``DedupStage.needsUpdate``); payload: the
webhook receiver's version 4 JSON.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime

from ..core.errors import AlreadyExists, InvalidInput, NotFound
from .notifiers import Alert, Notification
from .rules import AlertState, Result, Rule, RuleState, StateChange

__all__ = ["DEFAULT_GROUP_BY", "AlertEngine", "Grouper", "Route", "Silence"]

DEFAULT_GROUP_BY = ("alertname", "severity")


@dataclass(frozen=True)
class Route:
    """Timing and grouping for one receiver. Durations are seconds; defaults are Alertmanager's."""

    receiver: str
    group_by: tuple[str, ...] = DEFAULT_GROUP_BY
    group_wait: float = 30.0
    group_interval: float = 300.0
    repeat_interval: float = 4 * 3600.0
    send_resolved: bool = True

    def __post_init__(self) -> None:
        for key in ("group_wait", "group_interval", "repeat_interval"):
            value = getattr(self, key)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise InvalidInput(f"route {self.receiver!r}: {key} {value!r} must be seconds >= 0, e.g. 300")
        if self.group_interval <= 0:
            raise InvalidInput(f"route {self.receiver!r}: group_interval must be > 0, e.g. 300")
        object.__setattr__(self, "group_by", tuple(self.group_by))


@dataclass(frozen=True)
class Silence:
    """Mutes alerts whose labels equal every matcher, from ``starts_at`` until ``ends_at``."""

    id: str
    matchers: Mapping[str, str]
    ends_at: float
    starts_at: float = 0.0
    comment: str = ""

    def active(self, now: float) -> bool:
        return self.starts_at <= now < self.ends_at

    def matches(self, labels: Mapping[str, str]) -> bool:
        return all(labels.get(k) == v for k, v in self.matchers.items())

    def to_dict(self) -> dict[str, object]:
        return {"id": self.id, "matchers": dict(self.matchers), "ends_at": self.ends_at,
                "starts_at": self.starts_at, "comment": self.comment}


@dataclass
class _Tracked:
    """An alert as the grouper tracks it inside a group (timers in epoch seconds, rule, receivers)."""

    labels: dict[str, str]
    annotations: dict[str, str]
    starts_at: float
    fingerprint: str
    rule: str
    receivers: tuple[str, ...]
    state: str = "Firing"
    ends_at: float | None = None

    @property
    def resolved(self) -> bool:
        return self.ends_at is not None

    @classmethod
    def of(cls, inst: AlertState) -> _Tracked:
        assert inst.fired_at is not None, "only alerting instances are alerts"
        return cls(labels=dict(inst.labels), annotations=inst.annotations(), starts_at=inst.fired_at,
                   fingerprint=inst.fingerprint, rule=inst.rule.name, receivers=inst.rule.notify,
                   state=inst.state.value)

    def alert(self) -> Alert:
        """The notifiers' alert for this one."""
        return Alert(labels=dict(self.labels), annotations=dict(self.annotations),
                     status="resolved" if self.resolved else "firing",
                     starts_at=datetime.fromtimestamp(self.starts_at, UTC),
                     ends_at=None if self.ends_at is None else datetime.fromtimestamp(self.ends_at, UTC),
                     fingerprint=self.fingerprint)

    def to_dict(self) -> dict[str, object]:
        return {"labels": self.labels, "annotations": self.annotations, "starts_at": self.starts_at,
                "fingerprint": self.fingerprint, "rule": self.rule, "receivers": list(self.receivers),
                "state": self.state, "ends_at": self.ends_at}

    @classmethod
    def from_dict(cls, data: Mapping[str, object]) -> _Tracked:
        return cls(labels=dict(data["labels"]), annotations=dict(data["annotations"]),  # type: ignore[arg-type]
                   starts_at=float(data["starts_at"]), fingerprint=str(data["fingerprint"]),  # type: ignore[arg-type]
                   rule=str(data["rule"]), receivers=tuple(data["receivers"]),  # type: ignore[arg-type]
                   state=str(data["state"]), ends_at=data.get("ends_at"))  # type: ignore[arg-type]


@dataclass
class _Group:
    receiver: str
    labels: dict[str, str]
    next_flush: float
    alerts: dict[str, _Tracked] = field(default_factory=dict)
    # dedup log: what the last notification held, and when it went out
    sent_firing: set[str] = field(default_factory=set)
    sent_resolved: set[str] = field(default_factory=set)
    sent_at: float | None = None

    @property
    def key(self) -> str:
        """Alertmanager's groupKey: the route's key (the root ``{}`` then the route matching this
        receiver) ``:`` the group labels, values quoted as Go's ``%q`` does."""
        body = ",".join(f"{k}={json.dumps(str(v))}" for k, v in sorted(self.labels.items()))
        return f'{{}}/{{receiver={json.dumps(self.receiver)}}}:{{{body}}}'

    def to_dict(self) -> dict[str, object]:
        return {"receiver": self.receiver, "labels": self.labels, "next_flush": self.next_flush,
                "alerts": [a.to_dict() for a in self.alerts.values()], "sent_firing": sorted(self.sent_firing),
                "sent_resolved": sorted(self.sent_resolved), "sent_at": self.sent_at}

    @classmethod
    def from_dict(cls, data: Mapping[str, object]) -> _Group:
        alerts = [_Tracked.from_dict(a) for a in data["alerts"]]  # type: ignore[attr-defined]
        return cls(receiver=str(data["receiver"]), labels=dict(data["labels"]),  # type: ignore[arg-type]
                   next_flush=float(data["next_flush"]),  # type: ignore[arg-type]
                   alerts={a.fingerprint: a for a in alerts},
                   sent_firing=set(data["sent_firing"]),  # type: ignore[call-overload]
                   sent_resolved=set(data["sent_resolved"]),  # type: ignore[call-overload]
                   sent_at=data.get("sent_at"))  # type: ignore[arg-type]


class Grouper:
    """Groups alerts per receiver and decides when to notify. ``routes`` by receiver name;
    receivers without a route get ``Route(receiver)`` (Alertmanager's defaults)."""

    def __init__(self, routes: Iterable[Route] = (), *, default_receiver: str = "default") -> None:
        self.routes = {r.receiver: r for r in routes}
        self.default_receiver = default_receiver
        self.groups: dict[str, _Group] = {}
        self.silences: dict[str, Silence] = {}
        #: fingerprint -> the startsAt and state the ack was given for
        self.acks: dict[str, tuple[float, str]] = {}
        self._by_rule: dict[str, set[str]] = {}

    def route(self, receiver: str) -> Route:
        return self.routes.get(receiver) or Route(receiver)

    # -- input ----------------------------------------------------------------------------------
    def sync(self, rule: str, alerts: Iterable[_Tracked], now: float) -> None:
        """The firing alerts of ``rule`` now; alerts of the rule not listed any more are resolved."""
        current = {a.fingerprint: a for a in alerts}
        for fp in self._by_rule.get(rule, set()) - set(current):
            for group in self.groups.values():
                alert = group.alerts.get(fp)
                if alert is not None and not alert.resolved:
                    alert.ends_at = now
            self.acks.pop(fp, None)
        for alert in current.values():
            ack = self.acks.get(alert.fingerprint)
            if ack is not None and ack != (alert.starts_at, alert.state):
                del self.acks[alert.fingerprint]  # fired again or changed: the ack is spent
            for receiver in alert.receivers or (self.default_receiver,):
                group = self._group(receiver, alert.labels, now)
                group.alerts[alert.fingerprint] = dataclasses.replace(alert)
        self._by_rule[rule] = set(current)

    def _group(self, receiver: str, labels: Mapping[str, str], now: float) -> _Group:
        route = self.route(receiver)
        glabels = {k: labels[k] for k in route.group_by if k in labels}
        probe = _Group(receiver=receiver, labels=glabels, next_flush=now + route.group_wait)
        group = self.groups.get(probe.key)
        if group is None:
            group = self.groups[probe.key] = probe
        return group

    # -- silences and acks ----------------------------------------------------------------------
    def silence(self, silence: Silence) -> None:
        self.silences[silence.id] = silence

    def unsilence(self, silence_id: str) -> None:
        if self.silences.pop(silence_id, None) is None:
            raise NotFound(f"silence {silence_id!r} does not exist: see `iot2ml alerts list`")

    def silenced(self, labels: Mapping[str, str], now: float) -> bool:
        return any(s.active(now) and s.matches(labels) for s in self.silences.values())

    def ack(self, fp: str) -> None:
        """Stop repeats of the firing alert ``fp`` until it resolves or changes."""
        for group in self.groups.values():
            alert = group.alerts.get(fp)
            if alert is not None and not alert.resolved:
                self.acks[fp] = (alert.starts_at, alert.state)
                return
        raise NotFound(f"alert {fp!r} is not firing: see `iot2ml alerts list` for the ids of firing alerts")

    # -- output ---------------------------------------------------------------------------------
    def due(self, now: float) -> list[Notification]:
        """The notifications to send at ``now``, in a stable order; advances the group timers."""
        out: list[Notification] = []
        for key in sorted(self.groups):
            group = self.groups[key]
            if group.next_flush > now:
                continue
            route = self.route(group.receiver)
            note = self._flush(group, route, now)
            if note is not None:
                out.append(note)
            for fp in [fp for fp, a in group.alerts.items() if a.resolved]:
                del group.alerts[fp]  # a resolved alert is looked at once, at the flush after it resolved
            if not group.alerts:
                del self.groups[key]
            else:
                group.next_flush = now + route.group_interval
        for sid in [sid for sid, s in self.silences.items() if s.ends_at <= now]:
            del self.silences[sid]
        return out

    def _flush(self, group: _Group, route: Route, now: float) -> Notification | None:
        visible = [a for a in group.alerts.values() if not self.silenced(a.labels, now)]
        firing = [a for a in visible if not a.resolved]
        resolved = [a for a in visible if a.resolved and a.fingerprint in group.sent_firing]
        firing_fps = {a.fingerprint for a in firing}
        resolved_fps = {a.fingerprint for a in resolved}
        repeat = False
        if group.sent_at is None:
            send = bool(firing)
        elif not firing_fps <= group.sent_firing:
            send = True  # a new alert in the group
        elif not firing:
            send = bool(group.sent_firing)  # everything notified has resolved
        elif route.send_resolved and not resolved_fps <= group.sent_resolved:
            send = True  # an alert resolved, others still fire
        else:
            firing = [a for a in firing if self.acks.get(a.fingerprint) != (a.starts_at, a.state)]
            send = bool(firing) and now - group.sent_at >= route.repeat_interval
            repeat = True
        if not send:
            return None
        group.sent_firing = firing_fps
        group.sent_resolved = resolved_fps
        group.sent_at = now
        shown = firing + (resolved if route.send_resolved else [])
        if not shown:
            return None  # all resolved and the route does not send resolved: the log is updated
        return Notification(
            alerts=tuple(a.alert() for a in sorted(shown, key=lambda a: (a.resolved, a.fingerprint))),
            receiver=group.receiver, group_labels=dict(group.labels), group_key=group.key,
            status="firing" if firing else "resolved", at=now, repeat=repeat)

    # -- persistence ----------------------------------------------------------------------------
    def snapshot(self) -> dict[str, object]:
        """Everything needed to resume: groups with timers and dedup log, silences, acks (JSON-able)."""
        return {"groups": [g.to_dict() for _, g in sorted(self.groups.items())],
                "silences": [s.to_dict() for s in self.silences.values()],
                "acks": {fp: list(v) for fp, v in self.acks.items()},
                "by_rule": {r: sorted(fps) for r, fps in self._by_rule.items()}}

    def restore(self, data: Mapping[str, object]) -> None:
        groups = [_Group.from_dict(g) for g in data.get("groups") or []]  # type: ignore[attr-defined]
        self.groups = {g.key: g for g in groups}
        self.silences = {}
        for s in data.get("silences") or []:  # type: ignore[attr-defined]
            self.silences[s["id"]] = Silence(id=s["id"], matchers=dict(s["matchers"]), ends_at=s["ends_at"],
                                             starts_at=s.get("starts_at", 0.0), comment=s.get("comment", ""))
        acks: Mapping[str, list] = data.get("acks") or {}  # type: ignore[assignment]
        self.acks = {fp: (float(v[0]), str(v[1])) for fp, v in acks.items()}
        self._by_rule = {r: set(fps) for r, fps in (data.get("by_rule") or {}).items()}  # type: ignore[attr-defined]


class AlertEngine:
    """Rules, their instance states and the grouper together: the whole alerting core of a monitor.

    Per tick: :meth:`evaluate` each rule that is due (write the returned rows to the ``alerts``
    table), then :meth:`due`, hand the notifications to the dispatcher, then :meth:`snapshot` and
    store it. :meth:`restore` of that snapshot after a restart resumes without a duplicate or a
    lost notification.
    """

    def __init__(self, rules: Iterable[Rule] = (), routes: Iterable[Route] = (), *,
                 default_receiver: str = "default") -> None:
        self.grouper = Grouper(routes, default_receiver=default_receiver)
        self.rules: dict[str, RuleState] = {}
        for rule in rules:
            self.add(rule)

    def add(self, rule: Rule) -> None:
        if rule.name in self.rules:
            raise AlreadyExists(f"rule {rule.name!r} exists: remove it first or pick another name")
        self.rules[rule.name] = RuleState(rule)

    def remove(self, name: str, now: float) -> list[StateChange]:
        """Drop a rule; its firing alerts resolve (rows returned, resolved notification follows)."""
        state = self._rule(name)
        changes = [c for inst in state.alerting() if (c := inst.resolve(now)) is not None]
        self.grouper.sync(name, [], now)
        del self.rules[name]
        return changes

    def _rule(self, name: str) -> RuleState:
        try:
            return self.rules[name]
        except KeyError:
            raise NotFound(f"rule {name!r} does not exist: see `iot2ml alerts list`") from None

    def evaluate(self, name: str, result: Result, now: float) -> list[StateChange]:
        """Apply one evaluation of rule ``name``; the state changes are the new ``alerts`` rows."""
        state = self._rule(name)
        changes = state.apply(result, now)
        self.grouper.sync(name, [_Tracked.of(inst) for inst in state.alerting()], now)
        return changes

    def due(self, now: float) -> list[Notification]:
        return self.grouper.due(now)

    def ack(self, fp: str) -> None:
        self.grouper.ack(fp)

    def silence(self, silence: Silence) -> None:
        self.grouper.silence(silence)

    def alerting(self) -> list[AlertState]:
        """Every instance in an alerting state, by rule then fingerprint."""
        return [inst for name in sorted(self.rules) for inst in
                sorted(self.rules[name].alerting(), key=lambda i: i.fingerprint)]

    def snapshot(self) -> dict[str, object]:
        return {"version": 1, "rules": {name: rs.snapshot() for name, rs in sorted(self.rules.items())},
                "grouper": self.grouper.snapshot()}

    def restore(self, data: Mapping[str, object]) -> None:
        """Load a :meth:`snapshot`; states of rules no longer defined are dropped."""
        if data.get("version") != 1:
            raise InvalidInput(f"alert snapshot version {data.get('version')!r} is unknown: expected 1")
        for name, rs_data in (data.get("rules") or {}).items():  # type: ignore[attr-defined]
            if name in self.rules:
                self.rules[name].restore(rs_data)
        self.grouper.restore(data["grouper"])  # type: ignore[arg-type]
