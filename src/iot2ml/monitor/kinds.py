"""Kinds of alert rule: what a rule watches and how one evaluation of it reads the lake.

``iot2ml alerts add NAME`` takes exactly one of the kind flags below; the rest (``--window``,
``--for``, ``--every``, ``--severity``, ``--notify``) is common to every kind and handled by the
alert engine (``rules.py``, ``grouping.py``) the same way for all of them.

=============  ====================================  ==========================================
kind           flags (spec keys)                     module: define / evaluator
=============  ====================================  ==========================================
threshold      --table --when [--by]                 ``evaluate``
silent         --silent 5m|auto --type               ``quality``
stuck          --stuck N --type                      ``quality``
range          --range FIELD[=LO:HI] --type          ``quality``
dead_letters   --dead-letter-rate R [--type]         ``quality``
schema         --schema-changes --type               ``quality``
drift          --drift MODEL [--retrain ...]         ``report``
metric         --metric MODEL:METRIC --below|--above ``live``
anomaly        --anomaly MODEL                       ``live``
=============  ====================================  ==========================================

A kind is one row of :data:`KINDS`: its name, the spec key that selects it, and the dotted paths of
two functions in its module (imported when a rule of that kind is defined or run, so the monitor
loads only what its rules use):

- ``define(spec: dict, ctx: Context, window: float) -> Definition``: checks the user's spec
  (``InvalidInput`` with the reason and an example) and returns what is stored: the watched table
  or model, the condition in words, the label keys of an instance and the normalised spec;
- ``evaluator(record: RuleRecord, ctx: Context) -> Evaluator``: an object whose
  ``evaluate(now) -> Result`` gives one :class:`~iot2ml.monitor.rules.Sample` per label set,
  ``NO_DATA`` or an :class:`~iot2ml.monitor.rules.EvalError`; it must never raise and must read
  only what is new since its last call (``_seq`` marks, Delta versions), not rescan history.

A new kind is one row here and one module; nothing else changes (the CLI and the API pass the
spec through :func:`rule_spec`).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from ..core.errors import InvalidInput
from .rules import Result

if TYPE_CHECKING:
    from ..core.storage import TableStore
    from .store import RuleRecord

__all__ = ["KINDS", "Context", "Definition", "Evaluator", "RuleKind", "kind_of", "rule_spec"]


@dataclass(frozen=True)
class Context:
    """What defining or evaluating a rule may use: the lake, the catalog, settings and ``models``.

    ``models`` (``wiring.ModelOps``, handed in by the composition roots: monitor may not import ml or
    serve) has ``describe(model, ref="champion") -> dict`` (the registry's description: ``version``,
    ``task``, ``run_id``...; ``NotFound``), ``params(model, version) -> dict`` (the training run's
    parameters), ``reference_profile(model, version) -> Profile | None``,
    ``check_train(command, default_name=) -> job dict``, ``train(command, default_name=) -> dict``,
    ``deploy_canary(model, version, percent=, bake_seconds=, who=, reason=) -> dict``,
    ``pin_primary(model, who=, reason=)`` and ``unpin_primary(model, pinned, who=, reason=)``. It is ``None``
    where no models are reachable (rules on models are then refused or in Error with that reason).
    ``devices`` is a ``core.devices.DeviceDirectory`` (the registered devices and their types) or None.
    """

    lake: TableStore
    catalog: Any = None
    settings: Any = None
    models: Any = None
    devices: Any = None


@dataclass(frozen=True)
class Definition:
    """A checked rule as stored: ``table`` (a lake table or a model name), ``what`` (the condition in
    words, shown as ``when``), ``by`` (the label keys of an instance) and the normalised ``spec``."""

    table: str
    what: str
    by: tuple[str, ...] = ()
    spec: Mapping[str, Any] = field(default_factory=dict)


class Evaluator(Protocol):
    def evaluate(self, now: float) -> Result: ...


@dataclass(frozen=True)
class RuleKind:
    name: str
    selector: str  # the spec key (CLI flag without dashes, '-' as '_') that picks this kind
    define_path: str  # "module:function" under iot2ml.monitor
    evaluator_path: str
    #: The state of an evaluation without data (Grafana's option): a threshold over an empty window is
    #: NoData (an alerting state); a model that nothing was captured or labelled for yet is Normal.
    no_data_state: str = "NoData"

    def define(self, spec: Mapping[str, Any], ctx: Context, window: float) -> Definition:
        return _load(self.define_path)(dict(spec), ctx, window)

    def evaluator(self, record: RuleRecord, ctx: Context) -> Evaluator:
        return _load(self.evaluator_path)(record, ctx)


def _load(path: str) -> Callable[..., Any]:
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(f"iot2ml.monitor.{module}"), name)


KINDS: dict[str, RuleKind] = {k.name: k for k in (
    RuleKind("threshold", "when", "evaluate:define_threshold", "evaluate:threshold_evaluator"),
    RuleKind("silent", "silent", "quality:define_silent", "quality:silent_evaluator"),
    RuleKind("stuck", "stuck", "quality:define_stuck", "quality:stuck_evaluator"),
    RuleKind("range", "range", "quality:define_range", "quality:range_evaluator"),
    RuleKind("dead_letters", "dead_letter_rate", "quality:define_dead_letters", "quality:dead_letters_evaluator"),
    RuleKind("schema", "schema_changes", "quality:define_schema", "quality:schema_evaluator"),
    RuleKind("drift", "drift", "report:define_drift", "report:drift_evaluator", "Normal"),
    RuleKind("metric", "metric", "live:define_metric", "live:metric_evaluator", "Normal"),
    RuleKind("anomaly", "anomaly", "live:define_anomaly", "live:anomaly_evaluator", "Normal"),
)}
"""Every kind of alert rule by name."""

#: Spec keys that go with a kind's selector rather than pick a kind themselves.
MODIFIERS = ("table", "by", "type", "below", "above", "retrain", "canary", "bake")
#: Kinds whose firing may retrain the model (``--retrain``).
RETRAINABLE = ("drift", "metric")

_EXAMPLES = ("--when 'max(pressure) > 5' --table pump, --silent 5m --type pump, --stuck 20 --type pump, "
             "--range pressure=0:10 --type pump, --dead-letter-rate 0.05, --schema-changes --type pump, "
             "--drift wine-quality, --metric wine-quality:accuracy --below 0.8, --anomaly pump-blockage")


def _flag(key: str) -> str:
    return "--" + key.replace("_", "-")


def rule_spec(options: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """``(kind, spec)`` from the options a user gave (``None``/``False``/empty mean not given).

    Exactly one kind selector must be given; modifiers that no kind of the rule uses are refused
    by the kind's ``define`` (it sees them in the spec)."""
    given = {k: v for k, v in options.items() if v is not None and v is not False and v != [] and v != ()}
    selected = [kind for kind in KINDS.values() if kind.selector in given]
    if not selected:
        raise InvalidInput(f"say what the rule watches with one of: {_EXAMPLES}")
    if len(selected) > 1:
        flags = ", ".join(_flag(k.selector) for k in selected)
        raise InvalidInput(f"{flags} are different kinds of rule: give one per rule")
    unknown = [k for k in given if k not in MODIFIERS and k not in {kind.selector for kind in KINDS.values()}]
    if unknown:
        raise InvalidInput(f"unknown rule option(s) {', '.join(map(_flag, unknown))}")
    kind = selected[0]
    if "retrain" not in given and any(k in given for k in ("canary", "bake")):
        raise InvalidInput("--canary and --bake go with --retrain: they say how the retrained model is rolled out")
    if "retrain" in given and kind.name not in RETRAINABLE:
        raise InvalidInput(f"--retrain goes with --drift or --metric rules, not {_flag(kind.selector)}")
    return kind.name, given


def kind_of(name: str) -> RuleKind:
    try:
        return KINDS[name]
    except KeyError:
        raise InvalidInput(f"unknown kind of alert rule {name!r}: one of {', '.join(KINDS)}") from None


def refuse_extra(kind: str, spec: Mapping[str, Any], allowed: tuple[str, ...]) -> None:
    """Refuse spec keys that ``kind`` does not take (e.g. ``--below`` on a ``--silent`` rule)."""
    extra = [k for k in spec if k not in allowed]
    if extra:
        raise InvalidInput(f"{', '.join(map(_flag, extra))} do(es) not apply to a {kind} rule")
