"""The closed loop: a firing ``--retrain`` rule trains a challenger and rolls it out as a canary.

``iot2ml alerts add wine-drift --drift wine-quality --retrain "classify --table wine --label quality
--entity batch_id --name wine-quality" --canary 10 --bake 10m``: when an instance of the rule starts
firing, :class:`Retrainer` runs one retrain of the model in a background thread (one at a time per
rule; the monitor's tick never waits for it):

1. **Pin.** If the model is deployed and its primary follows an alias (``champion``: a new champion
   would answer at once), the primary is pinned to the version the alias names now
   (``models.pin_primary``, a deployment event by ``monitor (rule NAME)``). Serving does not change:
   the same version answers. This comes *before* training because training moves the alias.
2. **Train** the command (``models.train``); the registry's promotion rules decide whether the new
   version beats the champion (it then carries the ``champion`` alias).
3. **Roll out.** A new champion becomes the canary of the pinned primary (``models.deploy_canary``:
   ``--canary`` % of the traffic for ``--bake``, with the deployment's usual auto-rollback, which
   restores the pinned spec, so the old champion answers again). The old champion keeps the rest.
4. **Undo** the pin when nothing is rolled out (training failed, or the new version did not beat the
   champion) and the alias still names the pinned version: the deployment follows the alias again,
   and the same version answered throughout. A failed retrain never touches the serving champion.

Every step is a row of the ``alerts`` table (``alerts history``), with the rule's name, the firing
instance's fingerprint, its labels and what the retrain adds:

- ``Retraining`` (from ``Firing``; value: the alert's value): ``model``, ``command``;
- ``Retrained`` (value: the new version): ``model``, ``version``, ``champion`` (the version it beat),
  ``primary`` (the version answering the rest), ``canary`` (``10%``, or why there is none), ``bake``
  (``600s``), ``deployment``, ``reason`` (the registry's promotion decision);
- ``RetrainKept`` (value: the new version): ``model``, ``version``, ``champion``, ``reason``;
- ``RetrainFailed`` (no value): ``model``, ``error`` (and ``version`` if one was trained).

A label of the instance with one of these names and another value is kept as ``alert_<name>``.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from ..core.errors import InvalidInput
from ..core.timeutil import parse_duration
from .kinds import Context
from .rules import StateChange

__all__ = ["DEFAULT_BAKE", "DEFAULT_CANARY", "STATES", "Retrainer", "check_retrain"]

log = logging.getLogger("iot2ml.monitor.retrain")

DEFAULT_CANARY = 10
"""Per cent of the traffic a retrained champion gets while it bakes (``--canary``)."""
DEFAULT_BAKE = 600.0
"""Seconds a retrained champion bakes as a canary before it is promoted (``--bake``)."""
_AFTER = 0.001
"""A retrain's rows are stamped at least a millisecond after the row before them (the ``at`` column
keeps microseconds), so ``alerts history`` (newest first) shows the chain in order on a clock that
stood still."""
STATES = ("Retraining", "Retrained", "RetrainKept", "RetrainFailed")
"""The ``state`` of the ``alerts`` rows a retrain writes, in the order they come."""


def check_retrain(given: Mapping[str, Any], ctx: Context, model: str) -> dict[str, Any]:
    """``--retrain CMD [--canary PCT] [--bake DURATION]`` of a rule watching ``model``, checked without
    training: ``{"command", "model", "canary", "bake"}`` (``InvalidInput`` naming the flag and the fix)."""
    command = str(given.get("retrain") or "").strip()
    if not command:
        raise InvalidInput("--retrain needs the training command, e.g. --retrain \"classify --table wine "
                           f"--label quality --name {model}\"")
    if ctx.models is None:
        raise InvalidInput(f"--retrain {command!r}: no model registry is reachable here to train {model!r}; "
                           "add the rule through 'iot2ml alerts add' or the API of the platform")
    try:
        job = ctx.models.check_train(command, default_name=model)
    except InvalidInput as err:
        raise InvalidInput(f"--retrain {command!r}: {err}") from None
    if job["name"] != model:
        raise InvalidInput(f"--retrain {command!r} trains {job['name']!r}, but the rule watches {model!r}: "
                           f"retraining another model does not fix this one; use --name {model} or leave "
                           "--name out")
    canary = _number("--canary", given.get("canary", DEFAULT_CANARY), "e.g. --canary 10 (per cent)")
    if not 0 < canary < 100:
        raise InvalidInput(f"--canary {canary:g} must be a share between 0 and 100 (per cent), e.g. --canary 10")
    bake = given.get("bake", DEFAULT_BAKE)
    if isinstance(bake, str):
        try:
            bake = parse_duration(bake)
        except (InvalidInput, ValueError):
            raise InvalidInput(f"--bake {bake!r} is not a duration: use e.g. --bake 10m or --bake 600") from None
    bake = _number("--bake", bake, "e.g. --bake 10m")
    if not bake > 0:
        raise InvalidInput(f"--bake {bake:g} must be a positive duration, e.g. --bake 10m")
    return {"command": command, "model": model, "canary": int(canary) if canary == int(canary) else canary,
            "bake": bake}


def _number(flag: str, value: Any, example: str) -> float:
    if isinstance(value, bool):
        raise InvalidInput(f"{flag} {value!r} is not a number: {example}")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise InvalidInput(f"{flag} {value!r} is not a number: {example}") from None
    if not math.isfinite(number):
        raise InvalidInput(f"{flag} {value!r} is not a finite number: {example}")
    return number


class Retrainer:
    """Runs the retrains of firing ``--retrain`` rules in one background thread, one per rule at a time.

    :meth:`submit` starts one (the ``Retraining`` row) and returns at once; :meth:`collect` gives the
    rows of the retrains that ended since its last call. ``ctx.models`` (``wiring.ModelOps``) trains,
    pins and rolls out; ``clock`` stamps the rows (the monitor's clock)."""

    def __init__(self, ctx: Context, *, clock: Callable[[], float] = time.time) -> None:
        self.ctx, self.clock = ctx, clock
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="iot2ml-retrain")
        self._running: dict[str, Future[StateChange]] = {}
        self._lock = threading.Lock()

    def submit(self, record: Any, change: StateChange, now: float) -> StateChange | None:
        """Start retraining for ``change`` (an instance of ``record`` that began firing); the
        ``Retraining`` row, or None while a retrain of this rule is queued or running."""
        spec = record.spec["retrain"]
        with self._lock:
            if record.name in self._running:
                return None
            started = _Run(self.ctx.models, rule=record.name, change=change, spec=spec, default_model=record.table,
                           started=now, clock=self.clock)
            self._running[record.name] = self._pool.submit(started.run)
        log.info("alert %s fired: retraining %s with %r", record.name, started.model, started.command)
        return started.row("Retraining", change.value, now + _AFTER, command=started.command)

    def collect(self) -> list[StateChange]:
        """The rows of the retrains that ended since the last call (never waits)."""
        with self._lock:
            done = [name for name, future in self._running.items() if future.done()]
            futures = [self._running.pop(name) for name in done]
        return [future.result() for future in futures]

    def running(self) -> list[str]:
        """The rules with a retrain queued or running."""
        with self._lock:
            return sorted(self._running)

    def close(self) -> None:
        """Wait for the retrain in progress (a half-done roll-out would leave the primary pinned)."""
        if self.running():
            log.info("waiting for the retrain of %s to finish", ", ".join(self.running()))
        self._pool.shutdown(wait=True, cancel_futures=False)


class _Run:
    """One retrain: pin, train, roll out or undo; :meth:`run` returns its outcome row and never raises."""

    def __init__(self, models: Any, *, rule: str, change: StateChange, spec: Mapping[str, Any], default_model: str,
                 started: float, clock: Callable[[], float]) -> None:
        self.models, self.rule, self.change, self.started, self.clock = models, rule, change, started, clock
        self.command = str(spec["command"])
        self.model = str(spec.get("model") or default_model)
        self.canary = spec.get("canary", DEFAULT_CANARY)
        self.bake = float(spec.get("bake", DEFAULT_BAKE))
        self.who = f"monitor (rule {rule})"
        shown = ", ".join(f"{k}={v}" for k, v in sorted(change.labels.items()) if k not in ("alertname", "severity"))
        self.why = f"alert {rule}{f' ({shown})' if shown else ''} fired"

    def row(self, state: str, value: float | None, at: float, **added: Any) -> StateChange:
        ours = {"model": self.model, **{k: str(v) for k, v in added.items() if v is not None}}
        labels = {(f"alert_{k}" if k in ours and ours[k] != str(v) else k): str(v) for k, v in self.change.labels.items()}
        labels.update(ours)
        return StateChange(rule=self.rule, labels=labels, from_state="Firing" if state == "Retraining" else "Retraining",
                           state=state, value=value, at=at, fingerprint=self.change.fingerprint,
                           severity=self.change.severity)

    def _done(self, state: str, value: float | None, **added: Any) -> StateChange:
        return self.row(state, value, max(self.clock(), self.started + 2 * _AFTER), **added)

    def run(self) -> StateChange:
        try:
            return self._run()
        except Exception as err:  # the outcome row says what went wrong; the thread goes on
            log.exception("retrain for alert %s failed", self.rule)
            return self._done("RetrainFailed", None, error=f"{type(err).__name__}: {err}")

    def _run(self) -> StateChange:
        if self.models is None:
            return self._done("RetrainFailed", None, error="no model registry is reachable from this monitor: "
                              "run it as 'iot2ml monitor' or under 'iot2ml up', which hand it the models")
        try:
            pin = self.models.pin_primary(self.model, who=self.who, reason=(
                f"{self.why}: retraining with {self.command!r}; the primary is pinned to the version now serving "
                "so that a new champion takes only the canary share"))
        except Exception as err:  # noqa: BLE001 - nothing changed yet: do not train
            return self._done("RetrainFailed", None, error=f"pinning the deployment's primary failed, nothing "
                              f"trained: {type(err).__name__}: {err}")
        try:
            champion: int | None = int(self.models.describe(self.model, "champion")["version"])
        except Exception:  # noqa: BLE001 - no champion yet: the new version will be the first
            champion = None
        try:
            described = self.models.train(self.command, default_name=self.model)
        except Exception as err:  # noqa: BLE001 - a failed training leaves the champion serving
            log.warning("retrain for alert %s: training %r failed: %s", self.rule, self.command, err)
            undone = self._unpin(pin, "the retrain failed")
            return self._done("RetrainFailed", None, error=f"{type(err).__name__}: {err}{undone}")
        version = int(described["version"])
        if "champion" not in described.get("aliases", ()):
            undone = self._unpin(pin, f"v{version} did not beat the champion")
            return self._done("RetrainKept", float(version), version=version, champion=champion,
                              reason=f"{described.get('promotion') or 'the champion was kept'}{undone}")
        primary = pin["version"] if pin else None
        if pin is None:
            return self._done("Retrained", float(version), version=version, champion=champion,
                              reason=described.get("promotion"),
                              canary=f"none: {self.model} is not deployed; the registry's champion is v{version}")
        reason = f"{self.why}: {described.get('promotion') or f'v{version} is the new champion'}"
        try:
            deployed = self.models.deploy_canary(self.model, version, percent=float(self.canary),
                                                 bake_seconds=self.bake, who=self.who, reason=reason)
        except Exception as err:  # noqa: BLE001 - the pinned primary keeps serving the old champion
            log.warning("retrain for alert %s: canary of v%s failed: %s", self.rule, version, err)
            return self._done("RetrainFailed", None, version=version, champion=champion, primary=primary, error=(
                f"v{version} beat the champion but its canary was refused ({type(err).__name__}: {err}); "
                f"v{primary} keeps serving, pinned: roll out by hand with 'iot2ml deploy {self.model} "
                f"--version {version} --canary {self.canary:g} --bake {self.bake:g}'"))
        return self._done("Retrained", float(version), version=version, champion=champion, primary=primary,
                          canary=f"{self.canary:g}%", bake=f"{self.bake:g}s",
                          deployment=f"{self.model} generation {deployed.get('generation')}",
                          reason=described.get("promotion"))

    def _unpin(self, pin: Mapping[str, Any] | None, why: str) -> str:
        """Let the primary follow its alias again if nothing moved it; what the row should add."""
        if not pin or not pin.get("alias"):
            return ""
        try:
            now = int(self.models.describe(self.model, pin["alias"])["version"])
            if now != int(pin["version"]):
                return (f"; the primary stays pinned to v{pin['version']}: alias {pin['alias']!r} moved to v{now}")
            if self.models.unpin_primary(self.model, pin, who=self.who, reason=(
                    f"{self.why}: {why}; the primary follows {pin['alias']!r} (v{now}) again")):
                return ""
            return f"; the deployment changed since the pin: left as it is (primary v{pin['version']})"
        except Exception as err:  # noqa: BLE001 - the pinned version is the one that served: harmless, say so
            log.warning("retrain for alert %s: could not undo the pin: %s", self.rule, err)
            return (f"; the primary stays pinned to v{pin['version']} (undoing the pin failed: {err}): "
                    f"'iot2ml deploy {self.model} --version {pin['alias']}' follows the alias again")
