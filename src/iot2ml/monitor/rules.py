"""Alert rules and the state of each alert instance: pure logic, time handed in, no I/O.

A rule is evaluated every ``every_seconds``; each evaluation yields a :data:`Result` — a list of
:class:`Sample` (one per ``--by`` label set, with the value and whether the condition breached),
:data:`NO_DATA` (the query ran and returned nothing) or :class:`EvalError` (the query failed).
:class:`RuleState` spreads the result over one :class:`AlertState` per label set and returns a
:class:`StateChange` for every transition: those are the rows of the ``alerts`` lake table.

State diagram of one instance (Grafana-managed alert instance states)::

      Normal ──breached, for > 0──► Pending ──breached for `for` seconds──► Firing
        ▲                             │                                    │   ▲
        │◄──── not breached ──────────┘ (row "Normal", never notified)     │   │ breached
        │                                                                  ▼   │
        │◄──── not breached for keep_firing_for (row "Resolved") ──── Recovering
        │◄──── not breached, keep_firing_for = 0 (row "Resolved") ──────── Firing
      Normal ──breached, for = 0──► Firing

      NoData / Error results go to the NoData / Error state (honouring the pending period like a
      breach: Normal → Pending → Error), or are read as a breach ("Alerting"), as no breach
      ("Normal"), or change nothing ("KeepLast"), per ``no_data_state`` / ``exec_err_state``.

Firing, Recovering, NoData and Error are *alerting* states: the instance is a firing alert for the
grouper (:mod:`iot2ml.monitor.grouping`). Leaving an alerting state for Normal is recorded with the
row state ``"Resolved"`` (Grafana's history shows it as "Normal (Resolved)"); the instance is then
Normal. Entering Error is one state change, so a rule whose query keeps failing alerts once (and
is re-sent only after ``repeat_interval``, like any firing alert), not every evaluation.

NoData and Error belong to the rule, not to a ``--by`` label set: they apply to the rule-level
instance labelled ``{alertname, severity}`` (the same instance as the data when the rule has no
``--by``), as Grafana does; the error text is the ``error`` annotation. A label set missing from
``missing_series_evals`` successful evaluations in a row (Grafana's default 2) is resolved and
dropped ("MissingSeries").

Sources:

- Grafana alert instance states, pending period, keep firing for ("Recovering"):
  https://grafana.com/docs/grafana/latest/alerting/fundamentals/alert-rule-evaluation/state-and-health/
- No Data and Error states and their options (NoData/Error, Alerting, Normal, Keep Last State;
  "The Error state honors the pending period: Normal → Pending → Error"):
  https://grafana.com/docs/grafana/latest/alerting/fundamentals/alert-rule-evaluation/nodata-and-error-states/
- Fingerprint: Prometheus ``model.LabelSet.Fingerprint`` — 64-bit FNV-1a over the label names
  sorted, each name and value followed by the separator byte 0xff, printed as 16 hex digits
  (github.com/prometheus/common ``model/signature.go``), which Alertmanager uses as the alert id.
"""

from __future__ import annotations

import enum
import functools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

from ..core.errors import InvalidInput

__all__ = [
    "NO_DATA",
    "RESOLVED",
    "ZERO_TIME",
    "AlertState",
    "EvalError",
    "NoData",
    "Result",
    "Rule",
    "RuleState",
    "Sample",
    "State",
    "StateChange",
    "fingerprint",
    "rfc3339",
]

_FNV_OFFSET = 0xCBF29CE484222325
_FNV_PRIME = 0x100000001B3
_MASK = (1 << 64) - 1


def fingerprint(labels: Mapping[str, str]) -> str:
    """Alertmanager's alert id: FNV-1a 64 of the sorted labels, stable across processes.

    >>> fingerprint({})
    'cbf29ce484222325'
    >>> fingerprint({"b": "2", "a": "1"}) == fingerprint({"a": "1", "b": "2"})
    True
    """
    return _fnv(tuple(sorted((str(k), str(v)) for k, v in labels.items())))


@functools.lru_cache(maxsize=65536)
def _fnv(items: tuple[tuple[str, str], ...]) -> str:
    h = _FNV_OFFSET
    for name, value in items:
        for byte in b"%s\xff%s\xff" % (name.encode(), value.encode()):
            h = ((h ^ byte) * _FNV_PRIME) & _MASK
    return f"{h:016x}"


ZERO_TIME = "0001-01-01T00:00:00Z"
"""``endsAt`` of a firing alert, as Alertmanager sends it (Go's zero time)."""


def rfc3339(at: float | datetime | None) -> str:
    """Epoch seconds or a datetime (naive means UTC) as RFC 3339 UTC; ``None`` is Alertmanager's
    zero time (an open alert)."""
    if at is None:
        return ZERO_TIME
    if not isinstance(at, datetime):
        at = datetime.fromtimestamp(at, UTC)
    elif at.tzinfo is None:
        at = at.replace(tzinfo=UTC)
    return at.astimezone(UTC).isoformat().replace("+00:00", "Z")


class State(str, enum.Enum):
    """The state of one alert instance (Grafana's names; ``Firing`` is Grafana's "Alerting")."""

    NORMAL = "Normal"
    PENDING = "Pending"
    FIRING = "Firing"
    RECOVERING = "Recovering"
    NODATA = "NoData"
    ERROR = "Error"

    @property
    def alerting(self) -> bool:
        """A firing alert for the grouper."""
        return self in _ALERTING


_ALERTING = frozenset({State.FIRING, State.RECOVERING, State.NODATA, State.ERROR})
#: The row state written when an alerting instance returns to Normal.
RESOLVED = "Resolved"

_NO_DATA_OPTIONS = ("NoData", "Alerting", "Normal", "KeepLast")
_ERROR_OPTIONS = ("Error", "Alerting", "Normal", "KeepLast")


@dataclass(frozen=True)
class Rule:
    """One alert rule. Durations are seconds; ``by`` names the labels of an instance.

    ``notify`` names receivers (routes of the grouper); ``annotations`` travel with every alert.
    ``no_data_state`` is one of NoData (default), Alerting, Normal, KeepLast; ``exec_err_state`` one
    of Error (default), Alerting, Normal, KeepLast — Grafana's options.
    """

    name: str
    severity: str = "warning"
    for_seconds: float = 0.0
    every_seconds: float = 60.0
    by: tuple[str, ...] = ()
    notify: tuple[str, ...] = ()
    annotations: Mapping[str, str] = field(default_factory=dict)
    no_data_state: str = "NoData"
    exec_err_state: str = "Error"
    keep_firing_for_seconds: float = 0.0
    missing_series_evals: int = 2

    def __post_init__(self) -> None:
        if not self.name or any(c.isspace() for c in self.name):
            raise InvalidInput(f"rule name {self.name!r} is empty or has spaces: use e.g. 'high-pressure'")
        for key in ("for_seconds", "every_seconds", "keep_firing_for_seconds"):
            value = getattr(self, key)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise InvalidInput(f"rule {self.name!r}: {key} {value!r} must be a duration >= 0, e.g. 30")
        if self.every_seconds <= 0:
            raise InvalidInput(f"rule {self.name!r}: every_seconds {self.every_seconds!r} must be > 0, e.g. 10")
        if self.no_data_state not in _NO_DATA_OPTIONS:
            raise InvalidInput(f"rule {self.name!r}: no_data_state {self.no_data_state!r} is not one of "
                               f"{', '.join(_NO_DATA_OPTIONS)}")
        if self.exec_err_state not in _ERROR_OPTIONS:
            raise InvalidInput(f"rule {self.name!r}: exec_err_state {self.exec_err_state!r} is not one of "
                               f"{', '.join(_ERROR_OPTIONS)}")
        if self.missing_series_evals < 1:
            raise InvalidInput(f"rule {self.name!r}: missing_series_evals {self.missing_series_evals!r} "
                               "must be >= 1")
        for reserved in ("alertname", "severity"):
            if reserved in self.by:
                raise InvalidInput(f"rule {self.name!r}: --by {reserved!r} is set by the rule itself: "
                                   "leave it out")
        object.__setattr__(self, "by", tuple(self.by))
        object.__setattr__(self, "notify", tuple(self.notify))
        object.__setattr__(self, "annotations", dict(self.annotations))

    def labels(self, by_values: Mapping[str, str] | None = None) -> dict[str, str]:
        """The labels of an instance: alertname and severity plus the ``--by`` values."""
        labels = {"alertname": self.name, "severity": self.severity}
        for key in self.by:
            if by_values is not None and key in by_values:
                labels[key] = str(by_values[key])
        return labels


@dataclass(frozen=True)
class Sample:
    """The outcome of the condition for one label set: its value and whether it breached."""

    labels: Mapping[str, str]
    value: float | None
    breached: bool


class NoData:
    """The query ran and returned no rows (use the :data:`NO_DATA` instance)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "NO_DATA"


NO_DATA = NoData()


@dataclass(frozen=True)
class EvalError:
    """The query failed at run time; ``message`` says why."""

    message: str


Result = Sequence[Sample] | NoData | EvalError


@dataclass(frozen=True)
class StateChange:
    """One transition of one instance: a row of the ``alerts`` lake table."""

    rule: str
    labels: Mapping[str, str]
    from_state: str
    state: str
    value: float | None
    at: float
    fingerprint: str
    severity: str

    def to_row(self) -> dict[str, object]:
        """The row: rule, state, labels, value, at (RFC 3339), fingerprint, severity."""
        return {"rule": self.rule, "state": self.state, "labels": dict(self.labels), "value": self.value,
                "at": rfc3339(self.at), "fingerprint": self.fingerprint, "severity": self.severity}


@dataclass
class AlertState:
    """The state of one (rule, label set) instance. Mutated only by :meth:`apply`."""

    rule: Rule
    labels: dict[str, str]
    state: State = State.NORMAL
    value: float | None = None
    #: When the current bad streak began (Pending/alerting); None when Normal.
    active_since: float | None = None
    #: When the alert started firing (Alertmanager's startsAt); None unless alerting.
    fired_at: float | None = None
    #: Where Pending leads once ``for`` has passed (Firing, NoData or Error).
    target: State | None = None
    recovering_since: float | None = None
    error: str | None = None
    missing: int = 0

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.labels)

    def apply(self, outcome: Sample | NoData | EvalError, now: float) -> StateChange | None:
        """Feed one evaluation's outcome for this instance; return the transition, if any."""
        self.missing = 0
        if isinstance(outcome, Sample):
            self.value = outcome.value
            self.error = None
            return self._bad(State.FIRING, now) if outcome.breached else self._good(now)
        if isinstance(outcome, EvalError):
            option, special = self.rule.exec_err_state, State.ERROR
            self.error = outcome.message
        else:
            option, special = self.rule.no_data_state, State.NODATA
            self.value = None
        if option == "KeepLast":
            return None
        if option == "Normal":
            return self._good(now)
        return self._bad(State.FIRING if option == "Alerting" else special, now)

    def expire(self, now: float) -> StateChange | None:
        """The label set was missing from a successful evaluation; resolve after enough misses."""
        self.missing += 1
        if self.missing < self.rule.missing_series_evals:
            return None
        return self._to(State.NORMAL, now)

    def resolve(self, now: float) -> StateChange | None:
        """Back to Normal now, whatever the data (the rule was removed)."""
        return self._to(State.NORMAL, now)

    def _bad(self, target: State, now: float) -> StateChange | None:
        if self.state is State.NORMAL:
            self.active_since = now
            if self.rule.for_seconds > 0:
                self.target = target
                return self._to(State.PENDING, now)
            return self._to(target, now)
        if self.state is State.PENDING:
            self.target = target
            assert self.active_since is not None
            if now - self.active_since >= self.rule.for_seconds:
                return self._to(target, now)
            return None
        # alerting already: Recovering → Firing, or switch between Firing / NoData / Error
        self.recovering_since = None
        return None if self.state is target else self._to(target, now)

    def _good(self, now: float) -> StateChange | None:
        if self.state is State.NORMAL:
            return None
        if self.state is State.FIRING and self.rule.keep_firing_for_seconds > 0:
            self.recovering_since = now
            return self._to(State.RECOVERING, now)
        if self.state is State.RECOVERING:
            assert self.recovering_since is not None
            if now - self.recovering_since < self.rule.keep_firing_for_seconds:
                return None
        return self._to(State.NORMAL, now)

    def _to(self, state: State, now: float) -> StateChange | None:
        before = self.state
        if before is state:
            return None
        self.state = state
        if state.alerting and not before.alerting:
            self.fired_at = now
        if state is State.NORMAL:
            self.active_since = self.fired_at = self.target = self.recovering_since = None
        if state is not State.RECOVERING:
            self.recovering_since = None
        row_state = RESOLVED if state is State.NORMAL and before.alerting else state.value
        return StateChange(rule=self.rule.name, labels=dict(self.labels), from_state=before.value,
                           state=row_state, value=self.value, at=now, fingerprint=self.fingerprint,
                           severity=self.rule.severity)

    def annotations(self) -> dict[str, str]:
        out = dict(self.rule.annotations)
        if self.state is State.ERROR and self.error:
            out["error"] = self.error
        if self.state is State.NODATA:
            out["nodata"] = "the query returned no rows"
        if self.value is not None:
            out.setdefault("value", repr(self.value))
        return out

    def to_dict(self) -> dict[str, object]:
        return {"labels": dict(self.labels), "state": self.state.value, "value": self.value,
                "active_since": self.active_since, "fired_at": self.fired_at,
                "target": self.target.value if self.target else None,
                "recovering_since": self.recovering_since, "error": self.error, "missing": self.missing}

    @classmethod
    def from_dict(cls, rule: Rule, data: Mapping[str, object]) -> AlertState:
        target = data.get("target")
        return cls(rule=rule, labels=dict(data["labels"]),  # type: ignore[arg-type]
                   state=State(data["state"]), value=data.get("value"),  # type: ignore[arg-type]
                   active_since=data.get("active_since"), fired_at=data.get("fired_at"),  # type: ignore[arg-type]
                   target=State(target) if target else None,
                   recovering_since=data.get("recovering_since"),  # type: ignore[arg-type]
                   error=data.get("error"), missing=int(data.get("missing") or 0))  # type: ignore[arg-type]


class RuleState:
    """All instances of one rule: :meth:`apply` one evaluation's :data:`Result`."""

    def __init__(self, rule: Rule) -> None:
        self.rule = rule
        self.instances: dict[str, AlertState] = {}

    def _instance(self, labels: dict[str, str]) -> AlertState:
        fp = fingerprint(labels)
        inst = self.instances.get(fp)
        if inst is None:
            inst = self.instances[fp] = AlertState(rule=self.rule, labels=labels)
        return inst

    def apply(self, result: Result, now: float) -> list[StateChange]:
        """One evaluation at ``now``: the transitions it caused, in a stable order."""
        changes: list[StateChange | None] = []
        if isinstance(result, EvalError):
            # the data is unknown: the rule-level instance takes the error, the others keep their state
            changes.append(self._instance(self.rule.labels()).apply(result, now))
            return [c for c in changes if c is not None]
        samples = [] if isinstance(result, NoData) else list(result)
        seen: set[str] = set()
        if not samples:
            inst = self._instance(self.rule.labels())
            seen.add(inst.fingerprint)
            changes.append(inst.apply(NO_DATA, now))
        for sample in samples:
            inst = self._instance(self.rule.labels(sample.labels))
            seen.add(inst.fingerprint)
            changes.append(inst.apply(sample, now))
        for fp in sorted(set(self.instances) - seen):
            inst = self.instances[fp]
            if inst.state in (State.NODATA, State.ERROR) and samples:
                changes.append(inst._good(now))  # data is back: the rule-level NoData/Error resolves
            else:
                changes.append(inst.expire(now))
        for fp in [fp for fp, inst in self.instances.items() if inst.state is State.NORMAL]:
            del self.instances[fp]  # Normal instances hold nothing worth keeping
        return [c for c in changes if c is not None]

    def alerting(self) -> list[AlertState]:
        """The instances that are firing alerts now."""
        return [inst for inst in self.instances.values() if inst.state.alerting]

    def snapshot(self) -> dict[str, object]:
        return {"rule": self.rule.name, "instances": [i.to_dict() for i in self.instances.values()]}

    def restore(self, data: Mapping[str, object]) -> None:
        if data.get("rule") != self.rule.name:
            raise InvalidInput(f"snapshot is of rule {data.get('rule')!r}, not {self.rule.name!r}")
        self.instances = {}
        for item in data.get("instances") or []:  # type: ignore[attr-defined]
            inst = AlertState.from_dict(self.rule, item)
            self.instances[inst.fingerprint] = inst
