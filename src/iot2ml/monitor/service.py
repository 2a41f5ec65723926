"""The monitor: evaluates the stored alert rules over the lake, records every state change, notifies.

Every ``tick`` seconds (1 s) :meth:`Monitor.tick`:

1. reloads the rules from the catalog when they changed (a removed rule resolves its alerts);
2. applies the queued ``ack`` / ``silence`` requests (``AlertRules.ack`` / ``silence``);
3. runs, in threads, the :class:`~iot2ml.monitor.evaluate.WindowEvaluator` of each rule due by its
   ``--every``, then feeds the results to the :class:`~iot2ml.monitor.grouping.AlertEngine`;
4. appends the state changes to the lake table ``alerts`` in one commit marked
   ``(iot2ml-monitor, evaluation counter)``: a counter already committed (a crash after the append,
   before the snapshot) is not appended again;
5. hands the notifications that are due to the :class:`~iot2ml.monitor.dispatch.Dispatcher`, one
   per notifier named by the rule's ``--notify`` (one ``Route`` per notifier, timings from settings);
6. stores the engine snapshot and the counter, and drops the requests it applied, in one transaction.

On start the snapshot is restored, so a restart neither re-sends a notification nor loses one.
Requests go through the catalog rather than a load-modify-store of the snapshot by the CLI: the
running monitor owns the snapshot and would overwrite such an edit with its next store.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any

from ..core.errors import InvalidInput, Iot2mlError, NotFound
from ..core.storage import TableStore
from ..core.tables import ALERTS
from .dispatch import Dispatcher
from .grouping import AlertEngine, Route, Silence
from .kinds import KINDS, Context, Evaluator, kind_of
from .rules import EvalError, Result, Rule, StateChange
from .store import AlertRules, Notifiers, RuleRecord

__all__ = ["APP_ID", "Monitor", "define_rule", "history"]

log = logging.getLogger("iot2ml.monitor")

APP_ID = "iot2ml-monitor"
"""The Delta transaction mark of the ``alerts`` appends."""


def define_rule(lake: TableStore | Context, name: str, *, kind: str = "threshold",
                spec: dict[str, Any] | None = None, table: str | None = None, when: str | None = None,
                by: tuple[str, ...] = (), window: float = 60.0, for_: float = 0.0, every: float = 60.0,
                severity: str = "warning", notify: tuple[str, ...] = ()) -> RuleRecord:
    """A rule of ``kind`` (``kinds.KINDS``) checked by that kind (``InvalidInput`` with the reason); not stored.

    ``spec`` is what the user gave for the kind (the flags without dashes: ``{"silent": "5m", "type":
    "pump"}``); a threshold rule may instead pass ``table``, ``when`` and ``by``. ``retrain``,
    ``canary`` and ``bake`` in ``spec`` are checked by ``retrain.check_retrain``."""
    ctx = lake if isinstance(lake, Context) else Context(lake)
    Rule(name=name, severity=severity, for_seconds=for_, every_seconds=every, by=by, notify=notify)
    if not severity or any(c.isspace() for c in severity):
        raise InvalidInput(f"--severity {severity!r} is empty or has spaces: use e.g. critical, warning, info")
    if not (isinstance(window, (int, float)) and window > 0):
        raise InvalidInput(f"--window {window!r} must be a duration > 0, e.g. 1m")
    if spec is None:
        spec = {"table": table, "when": when, "by": list(by)}
    spec = {k: v for k, v in spec.items() if v is not None and v is not False and v != [] and v != ()}
    retrain = {k: spec.pop(k) for k in ("retrain", "canary", "bake") if k in spec}
    definition = kind_of(kind).define(spec, ctx, float(window))
    stored = dict(definition.spec)
    if retrain:
        from .retrain import check_retrain

        stored["retrain"] = check_retrain(retrain, ctx, definition.table)
    Rule(name=name, severity=severity, for_seconds=for_, every_seconds=every, by=definition.by, notify=notify)
    return RuleRecord(name, definition.table, definition.what, tuple(definition.by), float(window), float(for_),
                      float(every), severity, tuple(notify), datetime.now(UTC), kind, stored)


def history(lake: TableStore, *, rule: str | None = None, limit: int = 1000) -> list[dict[str, Any]]:
    """The ``alerts`` rows, newest first: ``{"rule", "state", "labels" (object), "value", "at"}``."""
    if lake.schema(ALERTS) is None:
        return []
    import pyarrow.compute as pc

    data = lake.dataset(ALERTS).to_table(filter=None if rule is None else pc.field("rule") == rule,
                                         columns=["rule", "state", "labels", "value", "at"])
    rows = data.to_pylist()
    rows.sort(key=lambda r: r["at"], reverse=True)
    out = []
    for r in rows[:limit]:
        at = r["at"] if r["at"].tzinfo else r["at"].replace(tzinfo=UTC)
        out.append({"rule": r["rule"], "state": r["state"], "labels": json.loads(r["labels"]), "value": r["value"],
                    "at": at.astimezone(UTC).isoformat().replace("+00:00", "Z")})
    return out


class _Loaded:
    """A stored rule as the monitor runs it: its evaluator (or why it cannot run) and its next time."""

    def __init__(self, record: RuleRecord, ctx: Context) -> None:
        self.record = record
        self.rule = Rule(name=record.name, severity=record.severity, for_seconds=record.for_,
                         every_seconds=record.every, by=record.by, notify=record.notify,
                         annotations={"when": record.when, "table": record.table, "kind": record.kind},
                         no_data_state=KINDS[record.kind].no_data_state if record.kind in KINDS else "NoData")
        self.next_at = 0.0
        self.evaluator: Evaluator | None = None
        self.error: str | None = None
        try:
            self.evaluator = kind_of(record.kind).evaluator(record, ctx)
        except Iot2mlError as err:  # the table, model or column went away or changed since `alerts add`
            self.error = str(err)
        except Exception as err:  # noqa: BLE001 - a rule that cannot be built is in Error, not the monitor down
            log.warning("alert rule %r cannot be evaluated: %s", record.name, err)
            self.error = f"{type(err).__name__}: {err}"

    def evaluate(self, now: float) -> Result:
        if self.evaluator is None:
            return EvalError(self.error or "the rule cannot be evaluated")
        try:
            return self.evaluator.evaluate(now)
        except Exception as err:  # noqa: BLE001 - evaluators should not raise; if one does, it is an Error state
            log.warning("alert rule %r: evaluation raised %s", self.record.name, err)
            return EvalError(f"{type(err).__name__}: {err}")


class Monitor:
    """The alerting loop over ``lake`` with its state in ``rules`` (an ``AlertRules``)."""

    def __init__(self, settings: Any, lake: TableStore, rules: AlertRules, notifiers: Notifiers, *,
                 clock: Callable[[], float] = time.time, tick: float = 1.0, models: Any = None,
                 devices: Any = None) -> None:
        self.settings, self.lake, self.rules, self.notifiers = settings, lake, rules, notifiers
        self.clock, self.tick_seconds = clock, tick
        self.engine = AlertEngine()
        self.ctx = Context(lake, getattr(rules, "catalog", None), settings, models, devices)
        self.loaded: dict[str, _Loaded] = {}
        self._retrainer: Any = None  # retrain.Retrainer, made when a rule with --retrain fires
        self.evaluations = 0
        self.dispatcher = Dispatcher(notifiers)
        self._pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="iot2ml-alert-eval")

    def _route(self, receiver: str) -> Route:
        s = self.settings
        return Route(receiver, group_wait=s.monitor_group_wait, group_interval=s.monitor_group_interval,
                     repeat_interval=s.monitor_repeat_interval)

    # -- lifecycle -----------------------------------------------------------------------------------
    def start(self) -> None:
        """Load the rules and restore the stored state."""
        self._reload(self.clock())
        state = self.rules.load_state()
        if state is not None:
            self.engine.restore(state["engine"])
            self.evaluations = int(state.get("evaluations", 0))
        self.dispatcher.start()

    def run(self, stop: threading.Event) -> None:
        """Tick every second until ``stop`` is set; then deliver what is queued and stop."""
        self.start()
        try:
            while not stop.is_set():
                started = time.monotonic()
                try:
                    self.tick()
                except Iot2mlError as err:  # the catalog or the lake is away: try again next tick
                    log.warning("monitor tick failed: %s", err)
                stop.wait(max(0.0, self.tick_seconds - (time.monotonic() - started)))
        finally:
            self.close()

    def close(self) -> None:
        self.dispatcher.stop()
        self._pool.shutdown(wait=True)
        if self._retrainer is not None:
            self._retrainer.close()  # waits for a running retrain: a roll-out is not left half done
            rows = self._retrainer.collect()
            if rows:
                self.evaluations += 1
                self._append(rows)
                self.rules.save_state({"engine": self.engine.snapshot(), "evaluations": self.evaluations})

    # -- one tick ------------------------------------------------------------------------------------
    def tick(self) -> None:
        now = self.clock()
        changes = self._reload(now)
        applied = self._apply_commands(now)
        due = [loaded for loaded in self.loaded.values() if loaded.next_at <= now]
        results = list(self._pool.map(lambda item: item.evaluate(now), due))
        for loaded, result in zip(due, results):
            made = self.engine.evaluate(loaded.rule.name, result, now)
            changes += made
            loaded.next_at = now + loaded.rule.every_seconds
            if loaded.record.spec.get("retrain"):
                changes += self._retrain(loaded.record, made, now)
        if self._retrainer is not None:
            changes += self._retrainer.collect()
        if changes:
            self.evaluations += 1
            self._append(changes)
        for note in self.engine.due(now):
            self._send(note)
        self.rules.save_state({"engine": self.engine.snapshot(), "evaluations": self.evaluations}, applied=applied)

    def _retrain(self, record: RuleRecord, made: list[StateChange], now: float) -> list[StateChange]:
        """Start a retrain for each instance of ``record`` that began firing; the rows that say so."""
        fired = [c for c in made if c.state == "Firing" and c.from_state != "Firing"]
        if not fired:
            return []
        if self._retrainer is None:
            from .retrain import Retrainer

            self._retrainer = Retrainer(self.ctx, clock=self.clock)
        out: list[StateChange] = []
        for change in fired:
            row = self._retrainer.submit(record, change, now)
            if row is not None:
                out.append(row)
        return out

    def _reload(self, now: float) -> list[StateChange]:
        """Follow the stored rules: a removed or redefined rule resolves its alerts (rows returned)."""
        records = {r.name: r for r in self.rules.list()}
        changes: list[StateChange] = []
        for name in list(self.loaded):
            record = records.get(name)
            if record is None or record != self.loaded[name].record:
                changes += self.engine.remove(name, now)
                del self.loaded[name]
        for name, record in records.items():
            if name not in self.loaded:
                loaded = self.loaded[name] = _Loaded(record, self.ctx)
                self.engine.add(loaded.rule)
                for receiver in loaded.rule.notify:
                    self.engine.grouper.routes.setdefault(receiver, self._route(receiver))
        return changes

    def _apply_commands(self, now: float) -> list[int]:
        applied = []
        for cmd in self.rules.commands():
            try:
                if cmd.kind == "ack":
                    self.engine.ack(cmd.target)
                elif cmd.kind == "silence":
                    self.engine.silence(Silence(id=f"silence-{cmd.id}", matchers={"alertname": cmd.target},
                                                ends_at=float(cmd.until or now), starts_at=cmd.created_at.timestamp()))
                else:
                    log.warning("unknown monitor request %r: ignored", cmd.kind)
            except NotFound as err:  # resolved between the request and now
                log.info("monitor request %s %s: %s", cmd.kind, cmd.target, err)
            applied.append(cmd.id)
        return applied

    def _append(self, changes: list[StateChange]) -> None:
        import pyarrow as pa

        from ..core.tables import ALERTS_SCHEMA

        done = self.lake.txn_version(ALERTS, APP_ID) if self.lake.schema(ALERTS) is not None else None
        if done is not None and done >= self.evaluations:
            log.info("alerts of evaluation %d are in the lake already: not appended again", self.evaluations)
            return
        rows = [c.to_row() for c in changes]
        table = pa.table({
            "rule": [r["rule"] for r in rows], "state": [r["state"] for r in rows],
            "labels": [json.dumps(r["labels"], sort_keys=True) for r in rows],
            "value": [r["value"] for r in rows],
            "at": [round(c.at * 1_000_000) for c in changes],
            "fingerprint": [r["fingerprint"] for r in rows], "severity": [r["severity"] for r in rows],
        }, schema=pa.schema([f if f.name != "at" else pa.field("at", pa.int64()) for f in ALERTS_SCHEMA]))
        table = table.set_column(4, "at", table.column("at").cast(ALERTS_SCHEMA.field("at").type))
        self.lake.append(ALERTS, table, app_id=APP_ID, version=self.evaluations)

    def _send(self, note: Any) -> None:
        try:
            notifier = self.notifiers.notifier(note.receiver)
        except NotFound:
            log.warning("notification %s: notifier %r does not exist any more: not sent", note.group_key,
                        note.receiver)
            return
        self.dispatcher.submit(note, to=[notifier])
