"""Evaluate an alert rule's condition over a sliding window of a lake table, incrementally.

``iot2ml alerts add high-pressure --table pump --when "max(pressure) > 5" --by device_id --window 1m``
is compiled by :func:`compile_rule` into a :class:`CompiledRule`: exactly one aggregate (``min``,
``max``, ``avg``/``mean``, ``sum``, ``count``, ``count(*)``, ``stddev``, ``last``) of one column,
compared (``>``, ``>=``, ``<``, ``<=``, ``=``, ``!=``) with a number. The text is parsed here with
one regular expression and never reaches SQL, so there is nothing to inject; anything else
(subqueries, ``;``, other functions, several comparisons) is refused with the reason.

:class:`WindowEvaluator` keeps the rows of the rule's table whose ``ts`` is inside the window in a
bounded in-memory Arrow buffer. Each :meth:`~WindowEvaluator.evaluate` reads only the rows with
``_seq`` above the mark (the highest ``_seq`` read so far) and ``ts`` inside the window, the way
``serve.mqtt.StreamScorer`` follows a table; rows older than ``now - window`` drop out of the
buffer. The first evaluation (after a start or restart) seeds the buffer with one read of the rows
with ``ts >= now - window``. The aggregate is computed per ``--by`` group with Polars and returned
as the :data:`~iot2ml.monitor.rules.Result` the alert engine takes: one
:class:`~iot2ml.monitor.rules.Sample` per group, :data:`~iot2ml.monitor.rules.NO_DATA` for an empty
window, or :class:`~iot2ml.monitor.rules.EvalError` when reading or computing failed (it never
raises). ``count`` / ``count(*)`` without ``--by`` over an empty window is a sample of value 0, as
SQL's ``SELECT count(*)`` is, so ``count(*) = 0`` can fire.

The mark assumes ``_seq`` grows with each commit (the broker stream's sequence): rows committed
later with a lower ``_seq`` are not seen until a restart re-seeds.
"""

from __future__ import annotations

import logging
import math
import operator
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from ..core.errors import InvalidInput
from ..core.storage import TableStore
from .rules import NO_DATA, EvalError, Result, Sample

__all__ = ["AGGREGATES", "CompiledRule", "WindowEvaluator", "compile_rule"]

log = logging.getLogger(__name__)

#: Aggregate names accepted in ``--when`` and the one they stand for.
AGGREGATES = {"min": "min", "max": "max", "avg": "avg", "mean": "avg", "sum": "sum", "count": "count",
              "stddev": "stddev", "last": "last"}
_OPS: dict[str, Callable[[float, float], bool]] = {
    ">": operator.gt, ">=": operator.ge, "<": operator.lt, "<=": operator.le, "=": operator.eq,
    "!=": operator.ne}
_OP_ALIASES = {"==": "=", "<>": "!="}
_IDENT = r'[A-Za-z_][A-Za-z0-9_]*|"(?:[^"]|"")+"'
_NUMBER = r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?"
_WHEN = re.compile(rf"^\s*(?P<agg>[A-Za-z_]+)\s*\(\s*(?P<arg>\*|{_IDENT})\s*\)\s*"
                   rf"(?P<op>>=|<=|!=|<>|==|=|>|<)\s*(?P<num>{_NUMBER})\s*$")
_COMPARISON = re.compile(r">=|<=|!=|<>|==|=|>|<")
_CALL = re.compile(r"\s*([A-Za-z_][A-Za-z0-9_]*)\s*\(")
_EXAMPLE = "e.g. 'max(pressure) > 5', 'avg(flow) < 2.5' or 'count(*) = 0'"


@dataclass(frozen=True)
class CompiledRule:
    """A checked ``--when`` over a table: ``agg(column) op threshold`` per ``by`` group in ``window_seconds``.

    ``agg`` is the canonical name (``mean`` is ``avg``); ``column`` is ``None`` for ``count(*)``.
    """

    table: str
    when: str
    agg: str
    column: str | None
    op: str
    threshold: float
    by: tuple[str, ...]
    window_seconds: float
    ts_type: Any  # the table's ``ts`` Arrow type

    @property
    def columns(self) -> list[str]:
        """The columns read from the lake: ``ts``, ``_seq``, the ``by`` columns and the aggregated one."""
        wanted = ["ts", "_seq", *self.by, *([self.column] if self.column else [])]
        return list(dict.fromkeys(wanted))

    def breached(self, value: float | None) -> bool:
        """Whether ``value`` meets the condition; a missing or NaN value never does."""
        if value is None or math.isnan(value):
            return False
        return _OPS[self.op](value, self.threshold)


def compile_rule(table: str, when: str, by: Sequence[str] = (), window_seconds: float = 60.0, *,
                 schema: Any) -> CompiledRule:
    """Check ``when`` against ``schema`` (the table's ``pyarrow.Schema``, ``None`` if it does not exist).

    Raises ``InvalidInput`` naming what is wrong and how to write it.
    """
    import pyarrow.types as pat

    if schema is None:
        raise InvalidInput(f"table {table!r} does not exist: see `iot2ml tables` for the lake's tables")
    names = list(schema.names)
    listed = ", ".join(names)
    if not (isinstance(window_seconds, (int, float)) and not isinstance(window_seconds, bool)
            and math.isfinite(window_seconds) and window_seconds > 0):
        raise InvalidInput(f"--window {window_seconds!r} must be a duration > 0, e.g. 1m")
    if "ts" not in names or not pat.is_timestamp(schema.field("ts").type):
        raise InvalidInput(f"table {table!r} has no timestamp column 'ts' to window on (columns: {listed})")
    if "_seq" not in names or not pat.is_integer(schema.field("_seq").type):
        raise InvalidInput(f"table {table!r} has no integer column '_seq' to follow new rows by "
                           f"(columns: {listed}): alert on a table the ingest writes")
    if isinstance(by, str):
        by = (by,)
    for key in by:
        if key not in names:
            raise InvalidInput(f"--by column {key!r} is not in table {table!r}: its columns are {listed}")
    if not isinstance(when, str):
        raise InvalidInput(f"--when {when!r} is not text: write one aggregate compared with a number, {_EXAMPLE}")
    agg, arg, op, threshold = _parse_when(when)
    column = None if arg == "*" else arg
    if column is not None and column not in names:
        raise InvalidInput(f"--when {when!r}: column {column!r} is not in table {table!r}: its columns are {listed}")
    if column is not None and agg != "count":
        kind = schema.field(column).type
        if not (pat.is_integer(kind) or pat.is_floating(kind) or pat.is_decimal(kind)):
            raise InvalidInput(f"--when {when!r}: {agg}() needs a numeric column but {column!r} is {kind}: "
                               "use count() or a numeric column")
    return CompiledRule(table=table, when=when, agg=agg, column=column, op=op, threshold=threshold,
                        by=tuple(by), window_seconds=float(window_seconds), ts_type=schema.field("ts").type)


def _parse_when(when: str) -> tuple[str, str, str, float]:
    """``(aggregate, column or '*', operator, threshold)``, or ``InvalidInput`` saying why not."""
    head = f"--when {when!r}"
    if ";" in when:
        raise InvalidInput(f"{head} has ';': write one condition, {_EXAMPLE}")
    if len(_COMPARISON.findall(when)) > 1 or re.search(r"\b(and|or|not|between|in)\b", when, re.IGNORECASE):
        raise InvalidInput(f"{head} has more than one comparison: write one per rule, {_EXAMPLE}")
    if re.search(r"\bselect\b", when, re.IGNORECASE) or when.count("(") > 1:
        raise InvalidInput(f"{head} nests calls or queries: write one aggregate of one column, {_EXAMPLE}")
    match = _WHEN.match(when)
    call = _CALL.match(when)
    name = (match.group("agg") if match else call.group(1) if call else "").lower()
    if name and name not in AGGREGATES:
        raise InvalidInput(f"{head}: {name!r} is not an aggregate here: use one of "
                           f"{', '.join(sorted(AGGREGATES))}, count(*)")
    if match is None:
        raise InvalidInput(f"{head} is not one aggregate compared with a number: {_EXAMPLE}")
    agg, arg = AGGREGATES[name], match.group("arg")
    if arg == "*" and agg != "count":
        raise InvalidInput(f"{head}: only count takes '*': name a column, e.g. '{name}(pressure)'")
    if arg.startswith('"'):
        arg = arg[1:-1].replace('""', '"')
    threshold = float(match.group("num"))
    if not math.isfinite(threshold):
        raise InvalidInput(f"{head}: the number {match.group('num')!r} is out of range")
    op = match.group("op")
    return agg, arg, _OP_ALIASES.get(op, op), threshold


class WindowEvaluator:
    """Follows one compiled rule's table and evaluates its condition; see the module docstring.

    ``rows_read`` counts the rows read from the lake over the evaluator's life. The buffer holds at
    most ``max_rows`` rows (the newest); while rows dropped for room would still be inside the
    window, evaluations are ``EvalError`` rather than a wrong aggregate (``dropped`` counts them).
    """

    def __init__(self, store: TableStore, compiled: CompiledRule, *, max_rows: int = 1_000_000) -> None:
        if max_rows < 1:
            raise InvalidInput(f"max_rows {max_rows!r} must be >= 1, e.g. 1000000")
        self.store, self.compiled, self.max_rows = store, compiled, max_rows
        self.rows_read = 0
        self.dropped = 0
        self.mark: int | None = None  # highest _seq read; None until seeded
        self._buffer: Any = None  # pyarrow.Table of the window's rows
        self._dropped_until: Any = None  # newest ts dropped for room (a Python datetime), or None

    @property
    def buffered(self) -> int:
        """Rows held in the window buffer now."""
        return 0 if self._buffer is None else self._buffer.num_rows

    def evaluate(self, now: float) -> Result:
        """The condition per ``by`` group over the rows with ``ts >= now - window``; never raises."""
        try:
            cutoff = self._cutoff(now)
            self._read(cutoff)
            self._expire(cutoff)
            if self._dropped_until is not None and self._dropped_until >= cutoff.as_py():
                return EvalError(f"rule window over table {self.compiled.table!r} holds more than "
                                 f"{self.max_rows} rows: shorten --window or raise max_rows")
            self._dropped_until = None
            return self._aggregate()
        except Exception as err:  # noqa: BLE001 - an evaluation reports its failure, the engine decides
            log.warning("evaluating %r over %r failed: %s", self.compiled.when, self.compiled.table, err)
            return EvalError(f"evaluating {self.compiled.when!r} over table {self.compiled.table!r} failed: "
                             f"{type(err).__name__}: {err}")

    def _cutoff(self, now: float) -> Any:
        import pyarrow as pa

        kind = self.compiled.ts_type
        per_second = {"s": 1, "ms": 1_000, "us": 1_000_000, "ns": 1_000_000_000}[kind.unit]
        return pa.scalar(math.floor((now - self.compiled.window_seconds) * per_second), type=kind)

    def _read(self, cutoff: Any) -> None:
        """Append the rows with ``ts >= cutoff`` and ``_seq`` above the mark (all of them when seeding)."""
        import pyarrow as pa
        import pyarrow.compute as pc

        where = pc.field("ts") >= cutoff
        if self.mark is not None:
            where = where & (pc.field("_seq") > self.mark)
        rows = self.store.dataset(self.compiled.table).to_table(filter=where, columns=self.compiled.columns)
        self.rows_read += rows.num_rows
        if rows.num_rows:
            newest = int(pc.max(rows.column("_seq")).as_py())
            self.mark = newest if self.mark is None else max(self.mark, newest)
            self._buffer = rows if self._buffer is None else pa.concat_tables(
                [self._buffer, rows], promote_options="default")
            if self._buffer.num_columns and self._buffer.column(0).num_chunks > 64:
                self._buffer = self._buffer.combine_chunks()
        elif self.mark is None:
            self.mark = -1  # seeded with an empty window: every later row counts as new
        if self._buffer is None:
            self._buffer = rows

    def _expire(self, cutoff: Any) -> None:
        import pyarrow.compute as pc

        buffer = self._buffer
        if buffer.num_rows:
            buffer = buffer.filter(pc.greater_equal(buffer.column("ts"), cutoff))
        if buffer.num_rows > self.max_rows:
            order = pc.sort_indices(buffer, sort_keys=[("ts", "ascending"), ("_seq", "ascending")])
            buffer = buffer.take(order)
            extra = buffer.num_rows - self.max_rows
            newest_dropped = buffer.column("ts")[extra - 1].as_py()
            self._dropped_until = max(self._dropped_until or newest_dropped, newest_dropped)
            self.dropped += extra
            buffer = buffer.slice(extra)
            log.warning("alert window over %r is over %d rows: dropped the %d oldest",
                        self.compiled.table, self.max_rows, extra)
        self._buffer = buffer

    def _aggregate(self) -> Result:
        import polars as pl

        rule = self.compiled
        frame = pl.from_arrow(self._buffer)
        assert isinstance(frame, pl.DataFrame)
        if frame.height == 0:
            if rule.agg == "count" and not rule.by:
                return [Sample(labels={}, value=0.0, breached=rule.breached(0.0))]
            return NO_DATA
        expr = _expression(rule).cast(pl.Float64).alias("__value")
        out = frame.group_by(list(rule.by)).agg(expr) if rule.by else frame.select(expr)
        values = out.get_column("__value").to_list()
        keys = [out.get_column(key).to_list() for key in rule.by]
        samples = []
        for i, value in enumerate(values):
            labels = {key: "" if column[i] is None else str(column[i]) for key, column in zip(rule.by, keys)}
            samples.append(Sample(labels=labels, value=value, breached=rule.breached(value)))
        samples.sort(key=lambda s: tuple(s.labels.values()))
        return samples


def _expression(rule: CompiledRule) -> Any:
    import polars as pl

    if rule.column is None:
        return pl.len()
    col = pl.col(rule.column)
    if rule.agg == "count":
        return col.count()
    if rule.agg == "avg":
        return col.mean()
    if rule.agg == "stddev":
        return col.std()  # sample standard deviation, as SQL's stddev
    if rule.agg == "last":
        return col.sort_by(["ts", "_seq"]).last()
    return getattr(col, rule.agg)()


# ---- the "threshold" kind of alert rule (see kinds.py) ------------------------------------------

def define_threshold(spec: dict[str, Any], ctx: Any, window: float) -> Any:
    """``--table T --when 'agg(col) op N' [--by col]``: checked against the table's schema."""
    from .kinds import Definition, refuse_extra

    refuse_extra("--when", spec, ("when", "table", "by"))
    table = spec.get("table")
    if not table:
        raise InvalidInput("--when needs --table: the lake table to watch, e.g. --table pump")
    by = spec.get("by") or ()
    by = (by,) if isinstance(by, str) else tuple(by)
    compiled = compile_rule(table, spec["when"], by, window, schema=ctx.lake.schema(table))
    return Definition(table=table, what=compiled.when, by=compiled.by, spec={})


def threshold_evaluator(record: Any, ctx: Any) -> WindowEvaluator:
    compiled = compile_rule(record.table, record.when, record.by, record.window, schema=ctx.lake.schema(record.table))
    return WindowEvaluator(ctx.lake, compiled)
