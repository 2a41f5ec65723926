"""Data-quality kinds of alert rule, per device type: silent, stuck, range, dead_letters, schema.

``iot2ml alerts add NAME --type pump`` with one of ``--silent 5m|auto``, ``--stuck N``,
``--range FIELD[=LO:HI]``, ``--dead-letter-rate R``, ``--schema-changes`` (see ``kinds.py``). A device
type's readings are in the lake table named after the type (the ingest writes ``Decoded.curated[type]``
to table ``type``).

Every evaluator follows its tables by ``_seq`` like :class:`~iot2ml.monitor.evaluate.WindowEvaluator`:
the first :meth:`evaluate` seeds (one read, see each kind), later ones read only the rows with
``_seq`` above the mark. State is kept per device, per (device, field), per reason or per second
of the window, never as raw readings; ``rows_read`` counts what was read from the lake. ``evaluate``
never raises: a failure is an :class:`~iot2ml.monitor.rules.EvalError`.

Time: windows and silence are measured on ``received_at`` (when the platform got the message, the
broker's clock, comparable with the monitor's wall clock ``now``), not on the device's ``ts`` which a
skewed device clock would make look silent or chatty; a table without ``received_at`` uses ``ts``.
The order of readings (for ``stuck``) is ``ts`` then ``_seq``: the device's own order.

When there is nothing to judge (no device, no traffic, no change) an evaluation is one Normal
sample without labels, not NoData: a quiet table is not a data-quality alert (``--silent`` is).

Kinds:

- ``silent``: per device ever seen in the table, ``value`` = seconds since its last reading; breached
  when over the threshold. ``auto``: 5 x the device's typical interval (an EWMA of the median gap
  between readings of each read, zero gaps of one message ignored), at least :data:`AUTO_FLOOR`;
  until a device has :data:`AUTO_MIN_GAPS` gaps its threshold is :data:`AUTO_DEFAULT`. Seed: the last
  reading per device over the whole table (batch by batch, three columns), the typical interval from
  the last :data:`AUTO_SEED_LOOKBACK` seconds. A device gone for good keeps firing: silence it.
- ``stuck``: per (device, numeric field), the length of the trailing run of one value (nulls skip,
  they neither break nor extend a run), carried across evaluations; breached when >= N. Seed: the
  readings of the rule's window, so after a restart a run counts from the window's start.
- ``range``: per (device, field), readings outside ``[LO, HI]`` received within the window;
  breached when > 0 (a NaN reading counts as outside). ``FIELD`` alone: the bounds are the 0.1 % and
  99.9 % quantiles of the field's history, computed once at ``alerts add`` and stored. Pairs seen once
  stay (value 0) so they resolve.
- ``dead_letters``: per reason class (label ``reason``: :data:`REASONS`; the reason texts carry values,
  so they are classed), distinct messages dead-lettered within the window / messages received within
  it; breached when over R. Messages = ``raw`` rows (every message but oversized payloads) + the
  ``payload too large`` dead letters (never in ``raw``). ``--type``: only messages of devices of that
  type — from ``ctx.devices`` (a ``core.devices.DeviceDirectory``) when the context has one, else the
  devices seen in the type's table — and dead letters naming a column of the type's table (monitor
  may not import ``auth``). The ingest commits ``dead_letters`` just before ``raw``: an evaluation
  between the two commits may overstate one batch's rate (dead letters are read first to narrow it).
- ``schema``: label ``change`` = ``new column`` (a column of the table not in the baseline stored at
  ``alerts add``; value 1 while it appeared — its first non-null reading — within the window, then 0)
  or ``type conflict`` (dead letters whose reason says a value did not fit ``column TYPE.COL``, counted
  within the window); label ``column``.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from ..core.errors import InvalidInput, NotFound
from ..core.ids import check_type_name
from ..core.tables import BASE_COLUMNS, BUILT_IN, DEAD_LETTERS, RAW
from ..core.timeutil import parse_duration
from .rules import EvalError, Result, Sample

__all__ = [
    "AUTO_DEFAULT", "AUTO_FLOOR", "AUTO_MIN_GAPS", "AUTO_SEED_LOOKBACK", "REASONS", "dead_letters_evaluator",
    "define_dead_letters", "define_range", "define_schema", "define_silent", "define_stuck", "range_evaluator",
    "reason_class", "schema_evaluator", "silent_evaluator", "stuck_evaluator",
]

log = logging.getLogger(__name__)

AUTO_FACTOR = 5.0
"""``--silent auto``: silent after this many typical intervals."""
AUTO_FLOOR = 10.0
"""``--silent auto``: the threshold is never below this many seconds."""
AUTO_MIN_GAPS = 3
"""``--silent auto``: gaps a device needs before its own interval counts."""
AUTO_DEFAULT = 300.0
"""``--silent auto``: the threshold (seconds) of a device with fewer gaps than that."""
AUTO_SEED_LOOKBACK = 3600.0
"""``--silent auto``: seconds of history the first evaluation learns intervals from."""
_EWMA_KEEP = 0.8  # weight of the old typical interval per new gap

#: Reason classes of dead letters (the ``reason`` label), first match wins; else ``other``.
REASONS: tuple[tuple[str, str], ...] = (
    (r"^payload is \d+ bytes, over max_payload_bytes", "payload too large"),
    (r"^unknown device ", "unknown device"),
    (r"^malformed JSON", "malformed JSON"),
    (r"^payload is ", "payload not an object"),
    (r"^item \d+ is ", "item not an object"),
    (r"^msg_id ", "bad msg_id"),
    (r"^field 'device_id' is .* but the message came from", "device_id mismatch"),
    (r"^field .* is reserved", "reserved field"),
    (r"^field .* is an? (object|array): send one scalar", "nested field"),
    (r"^field .* expected \w+ \(column [a-z0-9_]+\.[a-z0-9_]+\)$", "type conflict"),
    (r"^ts ", "bad ts"),
)
_TOO_LARGE = "payload too large"


def reason_class(reason: str) -> str:
    """The class of a dead letter's reason (the ``reason`` label of a ``--dead-letter-rate`` alert).

    >>> reason_class("field 'pressure' value 'x' is a string, expected float (column pump.pressure)")
    'type conflict'
    """
    for pattern, name in REASONS:
        if re.search(pattern, reason):
            return name
    return "other"


# ---- shared pieces ------------------------------------------------------------------------------

def _type_table(spec: Mapping[str, Any], ctx: Any, flag: str, example: str) -> tuple[str, Any]:
    """The device type of ``--type`` and its table's schema, or ``InvalidInput`` saying how to fix it."""
    name = spec.get("type")
    if not name:
        raise InvalidInput(f"{flag} needs --type: the device type whose readings it watches, e.g. {example} --type pump")
    if not isinstance(name, str) or name in BUILT_IN:
        raise InvalidInput(f"--type {name!r} is not a device type (built-in tables are not): e.g. --type pump")
    try:
        check_type_name(name)
    except InvalidInput as err:
        raise InvalidInput(f"--type: {err}") from None
    schema = ctx.lake.schema(name)
    if schema is None:
        raise InvalidInput(f"--type {name!r}: the lake has no table {name!r} (no reading of that type stored yet): "
                           "see `iot2ml tables` for the device types with data, e.g. --type pump")
    missing = [c for c in ("device_id", "ts", "_seq") if c not in schema.names]
    if missing:
        raise InvalidInput(f"--type {name!r}: table {name!r} has no {', '.join(missing)}: it is not a device type's "
                           "table written by the ingest, e.g. --type pump")
    return name, schema


def _is_numeric(arrow_type: Any) -> bool:
    import pyarrow.types as pat

    return pat.is_integer(arrow_type) or pat.is_floating(arrow_type) or pat.is_decimal(arrow_type)


def _numeric_fields(schema: Any) -> list[str]:
    return [f.name for f in schema if f.name not in BASE_COLUMNS and _is_numeric(f.type)]


def _time_column(schema: Any) -> str:
    return "received_at" if "received_at" in schema.names else "ts"


def _seconds_expr(column: str) -> Any:
    """A Polars expression: the timestamp ``column`` as float epoch seconds."""
    import polars as pl

    return pl.col(column).dt.epoch("us").cast(pl.Float64) / 1_000_000


def _scalar_at(at: float, arrow_type: Any) -> Any:
    """``at`` (epoch seconds) as a scalar of the timestamp type ``arrow_type`` for a dataset filter."""
    import pyarrow as pa

    per_second = {"s": 1, "ms": 1_000, "us": 1_000_000, "ns": 1_000_000_000}[arrow_type.unit]
    return pa.scalar(math.floor(at * per_second), type=arrow_type)


def _quiet() -> list[Sample]:
    """Nothing to judge: one Normal sample without labels (not NoData)."""
    return [Sample(labels={}, value=0.0, breached=False)]


def _failed(what: str, table: str, err: Exception) -> EvalError:
    log.warning("evaluating %s over %r failed: %s", what, table, err)
    return EvalError(f"evaluating {what} over table {table!r} failed: {type(err).__name__}: {err}")


class _Follow:
    """The rows of one lake table with ``_seq`` above a mark; ``rows_read`` counts every row read."""

    def __init__(self, lake: Any, table: str) -> None:
        self.lake, self.table = lake, table
        self.mark: int | None = None  # highest _seq read; None until seeded
        self.rows_read = 0

    @property
    def seeded(self) -> bool:
        return self.mark is not None

    def read(self, columns: Iterable[str] | Callable[[Any], Iterable[str]], where: Any = None) -> Any | None:
        """New rows (all rows matching ``where`` when not seeded yet); ``None`` if the table does not exist."""
        import pyarrow.compute as pc

        try:
            dataset = self.lake.dataset(self.table)
        except NotFound:  # not written yet (no dead letter so far)
            return None
        names = set(dataset.schema.names)
        wanted = columns(dataset.schema) if callable(columns) else columns
        selected = [c for c in dict.fromkeys(["_seq", *wanted]) if c in names]
        if self.mark is not None:
            where = pc.field("_seq") > self.mark
        rows = dataset.to_table(filter=where, columns=selected)
        self.note(rows)
        return rows

    def note(self, rows: Any) -> None:
        import pyarrow.compute as pc

        self.rows_read += rows.num_rows
        if rows.num_rows:
            newest = int(pc.max(rows.column("_seq")).as_py())
            self.mark = newest if self.mark is None else max(self.mark, newest)
        elif self.mark is None:
            self.mark = -1  # seeded with nothing: every later row is new


def _frame(rows: Any) -> Any:
    import polars as pl

    frame = pl.from_arrow(rows)
    assert isinstance(frame, pl.DataFrame)
    return frame


class _Buckets:
    """Counts per (second, key) within a window: what a rate over the window needs, not the rows."""

    def __init__(self) -> None:
        self.counts: dict[tuple[int, str], int] = {}

    def add(self, grouped: Any, key: str) -> None:
        """Add a Polars frame of ``__sec``, ``key``, ``__n`` rows."""
        for sec, name, n in grouped.select(["__sec", key, "__n"]).iter_rows():
            self.counts[(sec, name)] = self.counts.get((sec, name), 0) + int(n)

    def expire(self, cutoff: float) -> None:
        first = math.floor(cutoff)
        for k in [k for k in self.counts if k[0] < first]:
            del self.counts[k]

    def totals(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for (_, name), n in self.counts.items():
            out[name] = out.get(name, 0) + n
        return out


# ---- silent -------------------------------------------------------------------------------------

def define_silent(spec: dict[str, Any], ctx: Any, window: float) -> Any:
    """``--silent 5m|auto --type T``: a device of T sent nothing for that long."""
    from .kinds import Definition, refuse_extra

    refuse_extra("--silent", spec, ("silent", "type"))
    value = spec["silent"]
    if isinstance(value, str) and value.strip().lower() == "auto":
        threshold: float | str = "auto"
        what = f"silent > {AUTO_FACTOR:g} x usual interval"
    else:
        threshold = _positive_duration("--silent", value, "--silent 5m or --silent auto")
        what = f"silent > {_shown(value)}"
    name, _ = _type_table(spec, ctx, "--silent", "--silent 5m")
    return Definition(table=name, what=what, by=("device_id",), spec={"silent": threshold, "type": name})


def _positive_duration(flag: str, value: Any, example: str) -> float:
    if isinstance(value, bool):
        raise InvalidInput(f"{flag} {value!r} is not a duration: e.g. {example}")
    try:
        seconds = float(value) if isinstance(value, (int, float)) else parse_duration(str(value))
    except InvalidInput:
        raise InvalidInput(f"{flag} {value!r} is not a duration: e.g. {example}") from None
    if not (math.isfinite(seconds) and seconds > 0):
        raise InvalidInput(f"{flag} {value!r} must be a duration > 0: e.g. {example}")
    return seconds


def _shown(value: Any) -> str:
    return value.strip() if isinstance(value, str) else f"{float(value):g}s"


@dataclass
class _Device:
    last: float
    typical: float | None = None
    gaps: int = 0


class SilentEvaluator:
    """Seconds since each device's last reading, against a fixed or learned threshold."""

    def __init__(self, lake: Any, table: str, threshold: float | None) -> None:
        self.lake, self.table, self.threshold = lake, table, threshold  # None: auto
        self.follow = _Follow(lake, table)
        self.devices: dict[str, _Device] = {}

    @property
    def rows_read(self) -> int:
        return self.follow.rows_read

    def evaluate(self, now: float) -> Result:
        try:
            self._read(now)
            if not self.devices:
                return _quiet()
            return [self._sample(device, state, now) for device, state in sorted(self.devices.items())]
        except Exception as err:  # noqa: BLE001 - an evaluation reports its failure, the engine decides
            return _failed("--silent", self.table, err)

    def limit(self, device: str) -> float:
        """The silence (seconds) over which ``device`` is silent."""
        if self.threshold is not None:
            return self.threshold
        state = self.devices.get(device)
        if state is None or state.typical is None or state.gaps < AUTO_MIN_GAPS:
            return AUTO_DEFAULT
        return max(AUTO_FLOOR, AUTO_FACTOR * state.typical)

    def _sample(self, device: str, state: _Device, now: float) -> Sample:
        silence = max(0.0, now - state.last)
        return Sample(labels={"device_id": device}, value=silence, breached=silence > self.limit(device))

    def _read(self, now: float) -> None:
        import polars as pl
        import pyarrow.compute as pc

        schema = self.lake.schema(self.table)
        if schema is None:
            raise InvalidInput(f"table {self.table!r} does not exist any more")
        at = _time_column(schema)
        if not self.follow.seeded:
            # the last reading of every device ever seen, batch by batch (two columns, order-free)
            for batch in self.lake.dataset(self.table).to_batches(columns=["device_id", at, "_seq"]):
                frame = _frame(batch).select("device_id", "_seq", _seconds_expr(at).alias("__t"))
                self.follow.note(batch)
                self._update_last(frame.group_by("device_id").agg(pl.col("__t").max()))
            if self.follow.mark is None:
                self.follow.mark = -1
            if self.threshold is None:
                recent = self.lake.dataset(self.table).to_table(
                    columns=["device_id", at], filter=pc.field(at) >= _scalar_at(now - AUTO_SEED_LOOKBACK, schema.field(at).type))
                self.follow.rows_read += recent.num_rows
                self._learn(_frame(recent).select("device_id", _seconds_expr(at).alias("__t")), prior=False)
            return
        rows = self.follow.read(["device_id", at])
        if rows is None or not rows.num_rows:
            return
        frame = _frame(rows).select("device_id", _seconds_expr(at).alias("__t"))
        if self.threshold is None:
            self._learn(frame, prior=True)
        self._update_last(frame.group_by("device_id").agg(pl.col("__t").max()))

    def _update_last(self, grouped: Any) -> None:
        for device, last in grouped.select(["device_id", "__t"]).iter_rows():
            if device is None or last is None:
                continue
            state = self.devices.get(device)
            if state is None:
                self.devices[device] = _Device(last=last)
            elif last > state.last:
                state.last = last

    def _learn(self, frame: Any, *, prior: bool) -> None:
        """Fold the gaps between the readings of ``frame`` (and each device's last before it) into the EWMA."""
        import polars as pl

        if frame.height == 0:
            return
        if prior and self.devices:
            known = pl.DataFrame({"device_id": list(self.devices), "__t": [s.last for s in self.devices.values()]},
                                 schema={"device_id": pl.String, "__t": pl.Float64})
            known = known.filter(pl.col("device_id").is_in(frame.get_column("device_id").unique().implode()))
            frame = pl.concat([known, frame.select("device_id", pl.col("__t").cast(pl.Float64))])
        gaps = (frame.sort(["device_id", "__t"])
                .with_columns(pl.col("__t").diff().over("device_id").alias("__gap"))
                .filter(pl.col("__gap") > 0)
                .group_by("device_id").agg(pl.col("__gap").median().alias("__m"), pl.len().alias("__k")))
        for device, median, k in gaps.select(["device_id", "__m", "__k"]).iter_rows():
            state = self.devices.get(device)
            if state is None:
                state = self.devices[device] = _Device(last=-math.inf)
            if state.typical is None:
                state.typical = median
            else:
                alpha = 1.0 - _EWMA_KEEP ** k
                state.typical += alpha * (median - state.typical)
            state.gaps += int(k)


def silent_evaluator(record: Any, ctx: Any) -> SilentEvaluator:
    threshold = record.spec.get("silent")
    return SilentEvaluator(ctx.lake, record.table, None if threshold == "auto" else float(threshold))


# ---- stuck --------------------------------------------------------------------------------------

def define_stuck(spec: dict[str, Any], ctx: Any, window: float) -> Any:
    """``--stuck N --type T [fields]``: a numeric field of a device repeated one value N readings in a row."""
    from .kinds import Definition, refuse_extra

    refuse_extra("--stuck", spec, ("stuck", "type", "fields"))
    n = spec["stuck"]
    if isinstance(n, bool) or not isinstance(n, (int, float)) or not math.isfinite(n) or n != int(n) or n < 2:
        raise InvalidInput(f"--stuck {n!r} must be a whole number of readings >= 2 (one reading is not a run): "
                           "e.g. --stuck 20")
    name, schema = _type_table(spec, ctx, "--stuck", "--stuck 20")
    numeric = _numeric_fields(schema)
    fields = spec.get("fields")
    if fields:
        fields = [fields] if isinstance(fields, str) else list(fields)
        for f in fields:
            _check_numeric(name, schema, f, "fields")
    elif not numeric:
        raise InvalidInput(f"--stuck: table {name!r} has no numeric field to watch (columns: {', '.join(schema.names)})")
    out = {"stuck": int(n), "type": name}
    if fields:
        out["fields"] = fields
    shown = ",".join(fields) if fields else "any field"
    return Definition(table=name, what=f"{shown} same value >= {int(n)} readings", by=("device_id", "field"), spec=out)


def _check_numeric(table: str, schema: Any, field: Any, flag: str) -> str:
    numeric = _numeric_fields(schema)
    listed = ", ".join(numeric) or "none"
    if not isinstance(field, str) or field not in schema.names or field in BASE_COLUMNS:
        raise InvalidInput(f"--{flag} {field!r} is not a field of table {table!r}: its numeric fields are {listed}")
    if field not in numeric:
        raise InvalidInput(f"--{flag} {field!r} is {schema.field(field).type}, not numeric: use one of {listed}")
    return field


class StuckEvaluator:
    """The trailing run of one value per (device, numeric field), carried across evaluations."""

    def __init__(self, lake: Any, table: str, n: int, window: float, fields: list[str] | None = None) -> None:
        self.lake, self.table, self.n, self.window, self.fields = lake, table, n, window, fields
        self.follow = _Follow(lake, table)
        self.runs: dict[tuple[str, str], tuple[float, int]] = {}  # (device, field) -> (last value, run length)

    @property
    def rows_read(self) -> int:
        return self.follow.rows_read

    def evaluate(self, now: float) -> Result:
        try:
            self._read(now)
            if not self.runs:
                return _quiet()
            return [Sample(labels={"device_id": d, "field": f}, value=float(run), breached=run >= self.n)
                    for (d, f), (_, run) in sorted(self.runs.items())]
        except Exception as err:  # noqa: BLE001 - an evaluation reports its failure, the engine decides
            return _failed("--stuck", self.table, err)

    def _columns(self, schema: Any) -> list[str]:
        fields = [f for f in (self.fields or _numeric_fields(schema)) if f in schema.names]
        return ["device_id", "ts", *fields]

    def _read(self, now: float) -> None:
        import pyarrow.compute as pc

        schema = self.lake.schema(self.table)
        if schema is None:
            raise InvalidInput(f"table {self.table!r} does not exist any more")
        at = _time_column(schema)
        where = None if self.follow.seeded else pc.field(at) >= _scalar_at(now - self.window, schema.field(at).type)
        rows = self.follow.read(self._columns, where)
        if rows is not None and rows.num_rows:
            self._fold(rows)

    def _fold(self, rows: Any) -> None:
        import polars as pl

        fields = [c for c in rows.column_names if c not in BASE_COLUMNS]
        if not fields:
            return
        frame = (_frame(rows).sort(["device_id", "ts", "_seq"]).with_row_index("__i")
                 .with_columns([pl.col(f).cast(pl.Float64) for f in fields]))
        long = (frame.unpivot(index=["__i", "device_id"], on=fields, variable_name="field", value_name="value")
                .drop_nulls("value").sort(["device_id", "field", "__i"]))
        key = ["device_id", "field"]
        long = long.with_columns(
            (pl.col("value") != pl.col("value").shift(1)).over(key).fill_null(True).cast(pl.Int64).alias("__new"))
        long = long.with_columns(pl.col("__new").cum_sum().over(key).alias("__run"))
        agg = long.group_by(key).agg(
            pl.col("value").first().alias("first"), pl.col("value").last().alias("last"),
            pl.col("__run").max().alias("runs"), (pl.col("__run") == pl.col("__run").max()).sum().alias("tail"))
        for device, field, first, last, runs, tail in agg.select([*key, "first", "last", "runs", "tail"]).iter_rows():
            before = self.runs.get((device, field))
            run = int(tail)
            if before is not None and runs == 1 and before[0] == first:
                run += before[1]
            self.runs[(device, field)] = (last, run)


def stuck_evaluator(record: Any, ctx: Any) -> StuckEvaluator:
    spec = record.spec
    return StuckEvaluator(ctx.lake, record.table, int(spec["stuck"]), record.window, spec.get("fields"))


# ---- range --------------------------------------------------------------------------------------

_RANGE = re.compile(r"^\s*(?P<field>[^=\s]+)\s*(?:=\s*(?P<lo>[^:]*?)\s*:\s*(?P<hi>[^:]*?)\s*)?$")
_LOW, _HIGH = 0.001, 0.999


def define_range(spec: dict[str, Any], ctx: Any, window: float) -> Any:
    """``--range FIELD=LO:HI`` (declared; an open end is ``=:10`` or ``=0:``) or ``--range FIELD`` (learned)."""
    from .kinds import Definition, refuse_extra

    refuse_extra("--range", spec, ("range", "type"))
    items = spec["range"]
    items = [items] if isinstance(items, str) else list(items)
    name, schema = _type_table(spec, ctx, "--range", "--range pressure=0:10")
    bounds: dict[str, list[float | None]] = {}
    learned: list[str] = []
    for item in items:
        match = _RANGE.match(item) if isinstance(item, str) else None
        if match is None:
            raise InvalidInput(f"--range {item!r} is not FIELD=LO:HI or FIELD: e.g. --range pressure=0:10, "
                               "--range pressure=:10 or --range flow (learned from the data)")
        field = _check_numeric(name, schema, match.group("field"), "range")
        if field in bounds:
            raise InvalidInput(f"--range {item!r}: field {field!r} is given twice: give one range per field")
        if match.group("lo") is None:
            bounds[field] = _learn_bounds(ctx.lake, name, field)
            learned.append(field)
            continue
        lo, hi = (_bound(item, match.group(k)) for k in ("lo", "hi"))
        if lo is None and hi is None:
            raise InvalidInput(f"--range {item!r} has no bound: e.g. --range {field}=0:10 or {field}=:10")
        if lo is not None and hi is not None and lo >= hi:
            raise InvalidInput(f"--range {item!r}: LO {lo:g} is not below HI {hi:g}: e.g. --range {field}={hi:g}:{lo:g}"
                               if lo > hi else f"--range {item!r}: LO equals HI: widen it, e.g. --range {field}={lo:g}:{lo + 1:g}")
        bounds[field] = [lo, hi]
    what = ", ".join(f"{f} outside {'learned ' if f in learned else ''}[{_end(lo)}, {_end(hi)}]"
                     for f, (lo, hi) in bounds.items())
    return Definition(table=name, what=what, by=("device_id", "field"),
                      spec={"range": bounds, "learned": learned, "type": name})


def _bound(item: str, text: str) -> float | None:
    if text == "":
        return None
    try:
        value = float(text)
    except ValueError:
        raise InvalidInput(f"--range {item!r}: {text!r} is not a number: e.g. --range pressure=0:10") from None
    if not math.isfinite(value):
        raise InvalidInput(f"--range {item!r}: {text!r} is not finite: leave the end open instead, e.g. pressure=0:")
    return value


def _end(value: float | None) -> str:
    return "" if value is None else f"{value:g}"


def _learn_bounds(lake: Any, table: str, field: str) -> list[float | None]:
    """The 0.1 % and 99.9 % quantiles of ``field``'s history in ``table``."""
    import pyarrow.compute as pc

    column = lake.dataset(table).to_table(columns=[field]).column(field)
    column = pc.drop_null(column)
    if len(column):
        column = column.cast("float64")
        column = column.filter(pc.is_finite(column))
    if not len(column):
        raise InvalidInput(f"--range {field!r}: table {table!r} has no {field} readings to learn a range from: "
                           f"declare it, e.g. --range {field}=0:10")
    lo, hi = pc.quantile(column, q=[_LOW, _HIGH], interpolation="linear").to_pylist()
    return [float(lo), float(hi)]


class RangeEvaluator:
    """Readings outside their field's bounds per (device, field) within the window."""

    def __init__(self, lake: Any, table: str, bounds: Mapping[str, Any], window: float) -> None:
        self.lake, self.table, self.window = lake, table, window
        self.bounds = {f: (lo, hi) for f, (lo, hi) in bounds.items()}
        self.follow = _Follow(lake, table)
        self.seen: set[tuple[str, str]] = set()
        self.outside: Any = None  # Polars frame of device_id, field, __t: the readings out of range in the window

    @property
    def rows_read(self) -> int:
        return self.follow.rows_read

    def evaluate(self, now: float) -> Result:
        import polars as pl

        try:
            self._read(now)
            cutoff = now - self.window
            if self.outside is not None:
                self.outside = self.outside.filter(pl.col("__t") >= cutoff)
            if not self.seen:
                return _quiet()
            counts: dict[tuple[str, str], int] = {}
            if self.outside is not None and self.outside.height:
                grouped = self.outside.group_by(["device_id", "field"]).agg(pl.len().alias("__n"))
                counts = {(d, f): int(n) for d, f, n in grouped.select(["device_id", "field", "__n"]).iter_rows()}
            return [Sample(labels={"device_id": d, "field": f}, value=float(counts.get((d, f), 0)),
                           breached=counts.get((d, f), 0) > 0) for d, f in sorted(self.seen)]
        except Exception as err:  # noqa: BLE001 - an evaluation reports its failure, the engine decides
            return _failed("--range", self.table, err)

    def _read(self, now: float) -> None:
        import polars as pl
        import pyarrow.compute as pc

        schema = self.lake.schema(self.table)
        if schema is None:
            raise InvalidInput(f"table {self.table!r} does not exist any more")
        at = _time_column(schema)
        where = None if self.follow.seeded else pc.field(at) >= _scalar_at(now - self.window, schema.field(at).type)
        rows = self.follow.read(["device_id", at, *self.bounds], where)
        if rows is None or not rows.num_rows:
            return
        fields = [f for f in self.bounds if f in rows.column_names]
        if not fields:
            return
        frame = _frame(rows).select("device_id", _seconds_expr(at).alias("__t"),
                                    *[pl.col(f).cast(pl.Float64) for f in fields])
        limits = pl.DataFrame({"field": fields, "__lo": [self.bounds[f][0] for f in fields],
                               "__hi": [self.bounds[f][1] for f in fields]},
                              schema={"field": pl.String, "__lo": pl.Float64, "__hi": pl.Float64})
        long = (frame.unpivot(index=["device_id", "__t"], on=fields, variable_name="field", value_name="value")
                .drop_nulls("value").join(limits, on="field", how="left"))
        for d, f in long.select(["device_id", "field"]).unique().iter_rows():
            self.seen.add((d, f))
        out = long.filter((pl.col("__lo").is_not_null() & (pl.col("value") < pl.col("__lo")))
                          | (pl.col("__hi").is_not_null() & (pl.col("value") > pl.col("__hi")))
                          | pl.col("value").is_nan()).select("device_id", "field", "__t")
        if out.height:
            self.outside = out if self.outside is None else pl.concat([self.outside, out])


def range_evaluator(record: Any, ctx: Any) -> RangeEvaluator:
    return RangeEvaluator(ctx.lake, record.table, record.spec["range"], record.window)


# ---- dead letters -------------------------------------------------------------------------------

def define_dead_letters(spec: dict[str, Any], ctx: Any, window: float) -> Any:
    """``--dead-letter-rate R [--type T]``: the share of messages dead-lettered in the window, per reason."""
    from .kinds import Definition, refuse_extra

    refuse_extra("--dead-letter-rate", spec, ("dead_letter_rate", "type"))
    rate = spec["dead_letter_rate"]
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not (0 <= rate < 1):
        raise InvalidInput(f"--dead-letter-rate {rate!r} must be a share of messages from 0 to below 1: "
                           "e.g. --dead-letter-rate 0.05 (5 %)")
    out: dict[str, Any] = {"dead_letter_rate": float(rate)}
    where = ""
    if spec.get("type"):
        name, _ = _type_table(spec, ctx, "--dead-letter-rate", "--dead-letter-rate 0.05")
        out["type"] = name
        where = f" of {name}"
    return Definition(table=DEAD_LETTERS, what=f"dead-letter rate{where} > {float(rate):g}", by=("reason",), spec=out)


def _classify(column: str = "reason") -> Any:
    import polars as pl

    expr: Any = None
    for pattern, name in REASONS:
        cond = pl.col(column).str.contains(pattern)
        expr = pl.when(cond).then(pl.lit(name)) if expr is None else expr.when(cond).then(pl.lit(name))
    return expr.otherwise(pl.lit("other"))


class _TypeDevices:
    """The devices of one type: from a ``DeviceDirectory`` when there is one, else those seen in its table."""

    def __init__(self, lake: Any, table: str, directory: Any = None) -> None:
        self.table, self.directory = table, directory
        self.follow = _Follow(lake, table)
        self.lake = lake
        self.known: set[str] = set()
        self._version: Any = object()

    def current(self) -> set[str]:
        import pyarrow.compute as pc

        if self.directory is not None:
            version = self.directory.version()
            if version != self._version:
                self.known = {d for d, t in self.directory.device_types().items() if t == self.table}
                self._version = version
            return self.known
        if not self.follow.seeded:
            if self.lake.schema(self.table) is not None:
                for batch in self.lake.dataset(self.table).to_batches(columns=["device_id", "_seq"]):
                    self.follow.note(batch)
                    self.known.update(d for d in pc.unique(batch.column("device_id")).to_pylist() if d is not None)
            if self.follow.mark is None:
                self.follow.mark = -1
            return self.known
        rows = self.follow.read(["device_id"])
        if rows is not None and rows.num_rows:
            self.known.update(d for d in pc.unique(rows.column("device_id")).to_pylist() if d is not None)
        return self.known


class DeadLetterEvaluator:
    """Per reason class, the share of the window's messages that were dead-lettered."""

    def __init__(self, lake: Any, rate: float, window: float, type_: str | None = None, directory: Any = None) -> None:
        self.lake, self.rate, self.window, self.type = lake, rate, window, type_
        self.dead = _Follow(lake, DEAD_LETTERS)
        self.raw = _Follow(lake, RAW)
        self.devices = _TypeDevices(lake, type_, directory) if type_ else None
        self.messages = _Buckets()
        self.rejected = _Buckets()
        self.reasons: set[str] = set()

    @property
    def rows_read(self) -> int:
        return self.dead.rows_read + self.raw.rows_read

    def evaluate(self, now: float) -> Result:
        try:
            cutoff = now - self.window
            self._read(cutoff)
            self.messages.expire(cutoff)
            self.rejected.expire(cutoff)
            total = sum(self.messages.totals().values())
            per_reason = self.rejected.totals()
            if not self.reasons:
                return _quiet()
            out = []
            for reason in sorted(self.reasons):
                value = per_reason.get(reason, 0) / total if total else 0.0
                out.append(Sample(labels={"reason": reason}, value=value, breached=value > self.rate))
            return out
        except Exception as err:  # noqa: BLE001 - an evaluation reports its failure, the engine decides
            return _failed("--dead-letter-rate", DEAD_LETTERS, err)

    def _read(self, cutoff: float) -> None:
        import polars as pl
        import pyarrow as pa
        import pyarrow.compute as pc

        since = pc.field("received_at") >= _scalar_at(cutoff, pa.timestamp("us", tz="UTC"))
        # dead letters first: the ingest commits them just before raw
        dead = self.dead.read(["device_id", "received_at", "reason"], since)
        raw = self.raw.read(["device_id", "received_at"], since)
        keep: Any = None
        if self.devices is not None:
            devices = pl.Series(sorted(self.devices.current()), dtype=pl.String).implode()
            keep = pl.col("device_id").is_in(devices)
        if dead is not None and dead.num_rows:
            frame = _frame(dead).with_columns(_classify().alias("__reason"),
                                              _seconds_expr("received_at").floor().cast(pl.Int64).alias("__sec"))
            frame = frame.filter(pl.col("__sec") >= math.floor(cutoff))
            if keep is not None:
                frame = frame.filter(keep | pl.col("reason").str.contains(f"(column {self.type}.", literal=True))
            grouped = frame.group_by(["__sec", "__reason"]).agg(pl.col("_seq").n_unique().alias("__n"))
            self.rejected.add(grouped, "__reason")
            self.reasons.update(grouped.get_column("__reason").unique().to_list())
            large = frame.filter(pl.col("__reason") == _TOO_LARGE).with_columns(pl.lit("").alias("__all"))
            self.messages.add(large.group_by(["__sec", "__all"]).agg(pl.col("_seq").n_unique().alias("__n")), "__all")
        if raw is not None and raw.num_rows:
            frame = _frame(raw).with_columns(_seconds_expr("received_at").floor().cast(pl.Int64).alias("__sec"),
                                             pl.lit("").alias("__all"))
            frame = frame.filter(pl.col("__sec") >= math.floor(cutoff))
            if keep is not None:
                frame = frame.filter(keep)
            self.messages.add(frame.group_by(["__sec", "__all"]).agg(pl.len().alias("__n")), "__all")


def dead_letters_evaluator(record: Any, ctx: Any) -> DeadLetterEvaluator:
    spec = record.spec
    return DeadLetterEvaluator(ctx.lake, float(spec["dead_letter_rate"]), record.window, spec.get("type"),
                               getattr(ctx, "devices", None))


# ---- schema -------------------------------------------------------------------------------------

def define_schema(spec: dict[str, Any], ctx: Any, window: float) -> Any:
    """``--schema-changes --type T``: a new column in T's table, or values that do not fit a column's type."""
    from .kinds import Definition, refuse_extra

    refuse_extra("--schema-changes", spec, ("schema_changes", "type"))
    if spec["schema_changes"] is not True:
        raise InvalidInput(f"--schema-changes takes no value (got {spec['schema_changes']!r}): e.g. "
                           "--schema-changes --type pump")
    name, schema = _type_table(spec, ctx, "--schema-changes", "--schema-changes")
    columns = {f.name: str(f.type) for f in schema}
    return Definition(table=name, what=f"new or conflicting columns in {name}", by=("change", "column"),
                      spec={"schema_changes": True, "type": name, "columns": columns})


class SchemaEvaluator:
    """New columns since the baseline and type conflicts in the window, per column."""

    def __init__(self, lake: Any, table: str, baseline: Iterable[str], window: float) -> None:
        self.lake, self.table, self.window = lake, table, window
        self.baseline = set(baseline)
        self.dead = _Follow(lake, DEAD_LETTERS)
        self.conflicts = _Buckets()
        self.conflicted: set[str] = set()
        self.appeared: dict[str, float] = {}  # new column -> when its first value was received
        self.scanned = 0  # rows read to date new columns

    @property
    def rows_read(self) -> int:
        return self.dead.rows_read + self.scanned

    def evaluate(self, now: float) -> Result:
        try:
            cutoff = now - self.window
            self._new_columns(now)
            self._read_conflicts(cutoff)
            self.conflicts.expire(cutoff)
            counts = self.conflicts.totals()
            out = [Sample(labels={"change": "new column", "column": c}, value=float(at >= cutoff), breached=at >= cutoff)
                   for c, at in sorted(self.appeared.items())]
            out += [Sample(labels={"change": "type conflict", "column": c}, value=float(counts.get(c, 0)),
                           breached=counts.get(c, 0) > 0) for c in sorted(self.conflicted)]
            return out or _quiet()
        except Exception as err:  # noqa: BLE001 - an evaluation reports its failure, the engine decides
            return _failed("--schema-changes", self.table, err)

    def _new_columns(self, now: float) -> None:
        import pyarrow.compute as pc

        schema = self.lake.schema(self.table)
        if schema is None:
            raise InvalidInput(f"table {self.table!r} does not exist any more")
        at = _time_column(schema)
        for column in schema.names:
            if column in self.baseline or column in self.appeared:
                continue
            rows = self.lake.dataset(self.table).to_table(columns=[at, column], filter=pc.field(column).is_valid())
            self.scanned += rows.num_rows
            rows = rows.filter(pc.is_valid(rows.column(column)))  # files older than the column may pass the filter
            first = pc.min(rows.column(at)).as_py() if rows.num_rows else None
            self.appeared[column] = first.timestamp() if first is not None else now

    def _read_conflicts(self, cutoff: float) -> None:
        import polars as pl
        import pyarrow as pa
        import pyarrow.compute as pc

        since = pc.field("received_at") >= _scalar_at(cutoff, pa.timestamp("us", tz="UTC"))
        dead = self.dead.read(["received_at", "reason"], since)
        if dead is None or not dead.num_rows:
            return
        pattern = rf"expected \w+ \(column {re.escape(self.table)}\.([a-z0-9_]+)\)$"
        frame = (_frame(dead)
                 .with_columns(pl.col("reason").str.extract(pattern, 1).alias("__column"),
                               _seconds_expr("received_at").floor().cast(pl.Int64).alias("__sec"))
                 .filter(pl.col("__column").is_not_null() & (pl.col("__sec") >= math.floor(cutoff))))
        if not frame.height:
            return
        grouped = frame.group_by(["__sec", "__column"]).agg(pl.col("_seq").n_unique().alias("__n"))
        self.conflicts.add(grouped, "__column")
        self.conflicted.update(grouped.get_column("__column").unique().to_list())


def schema_evaluator(record: Any, ctx: Any) -> SchemaEvaluator:
    return SchemaEvaluator(ctx.lake, record.table, record.spec.get("columns") or (), record.window)
