"""Turn a batch of broker messages into Arrow tables: ``raw``, one per device type, ``dead_letters``.

Columnar where it counts: each payload is parsed once by orjson, then every column is built with one
``pyarrow.array`` call. Only a column whose values do not fit its type is walked value by value, to
name the culprit rows in their dead letters; every other row of the batch is kept.

Limits: with a ``limiter`` (``auth.limits.DeviceLimiter``, handed in by the service) each device's
messages and payload bytes are checked against its buckets on the broker's clock, the whole batch
at once; a message over a limit becomes a dead letter naming the limit (it is not in ``raw``).

Types: JSON numbers become DOUBLE (like InfluxDB fields: an integer reading today and a fractional one
tomorrow must not split a column), booleans BOOLEAN, strings VARCHAR. A device type can declare
``int`` or ``timestamp`` columns up front. Nested objects and arrays are refused with a reason.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from operator import attrgetter
from typing import Protocol

import numpy as np
import orjson
import pyarrow as pa

from ..core.errors import InvalidInput
from ..core.ids import RESERVED_COLUMNS, column_name
from ..core.tables import BASE_FIELDS, DEAD_LETTERS_SCHEMA, RAW_SCHEMA
from ..core.timeutil import to_epoch_us

TS = pa.timestamp("us", tz="UTC")
ARROW_TYPES = {"float": pa.float64(), "int": pa.int64(), "string": pa.string(), "bool": pa.bool_(), "timestamp": TS}
_MS_THRESHOLD = 1e11
_MAX_US = 7_258_118_400 * 1_000_000
_DEAD_PAYLOAD_CHARS = 4096


def kind_of(arrow_type: pa.DataType) -> str:
    """Our name for an Arrow column type."""
    if pa.types.is_floating(arrow_type) or pa.types.is_decimal(arrow_type):
        return "float"
    if pa.types.is_integer(arrow_type):
        return "int"
    if pa.types.is_boolean(arrow_type):
        return "bool"
    if pa.types.is_timestamp(arrow_type) or pa.types.is_date(arrow_type):
        return "timestamp"
    return "string"


@dataclass(frozen=True, slots=True)
class InMessage:
    """One message from the broker: its stream sequence, subject, broker time (µs) and bytes."""

    seq: int
    subject: str
    received_us: int
    data: bytes


class Limiter(Protocol):
    """Per-device rate limits over a batch (``auth.limits.DeviceLimiter``)."""

    def check(self, devices: pa.Array, sizes: np.ndarray, times_us: np.ndarray) -> np.ndarray:
        """A code per message: 0 within the limits, else why not (for ``reason``)."""
        ...

    def reason(self, device: str, code: int) -> str:
        """The dead letter's reason for ``code``."""
        ...


@dataclass
class Decoded:
    """What one batch becomes. Tables carry ``_seq`` so a writer can skip rows it already has."""

    raw: pa.Table
    curated: dict[str, pa.Table]
    dead_letters: pa.Table
    seq_hi: int
    messages: int = 0
    readings: int = 0
    duplicates: int = 0
    dead: int = 0


class _DedupWindow:
    """Remembers ``(device_id, msg_id)`` pairs for ``window`` seconds (bounded, oldest dropped first).

    Keys are one string each and the dict keeps insertion order, so expiring pops from the front:
    cheap enough to check every reading of a batch.
    """

    def __init__(self, window: float, max_entries: int = 2_000_000) -> None:
        self.window = window
        self.max_entries = max_entries
        self._seen: dict[str, float] = {}

    def seen(self, device: str, msg_id: str, now: float) -> bool:
        if self.window <= 0:
            return False
        key = device + "\x00" + msg_id
        if key in self._seen:
            return True
        self._seen[key] = now
        return False

    def add(self, device: str, msg_id: str, at: float) -> None:
        self._seen[device + "\x00" + msg_id] = at

    def expire(self, now: float) -> None:
        cutoff = now - self.window
        seen = self._seen
        while seen:
            key = next(iter(seen))
            if seen[key] >= cutoff and len(seen) <= self.max_entries:
                break
            del seen[key]


@dataclass
class _Rows:
    """Readings of one device type in this batch, before columns are built."""

    items: list[dict] = field(default_factory=list)
    seqs: list[int] = field(default_factory=list)
    devices: list[str] = field(default_factory=list)
    received: list[int] = field(default_factory=list)
    topics: list[str] = field(default_factory=list)


class Decoder:
    """Stateful decoder: knows each type's columns, remembers recent msg_ids.

    ``device_type(device_id)`` returns the device's type or ``None`` if it is unknown.
    ``schemas`` maps type name -> ``{column: kind}`` (from the lake and from declared schemas).
    ``limiter`` refuses what a device sends over its rate limits (none: no limits).
    """

    def __init__(
        self,
        device_type: Callable[[str], str | None],
        *,
        schemas: dict[str, dict[str, str]] | None = None,
        declared: dict[str, dict[str, str]] | None = None,
        max_payload_bytes: int = 256 * 1024,
        dedup_window: float = 600.0,
        limiter: Limiter | None = None,
    ) -> None:
        self.device_type = device_type
        self.limiter = limiter
        self.schemas: dict[str, dict[str, str]] = {k: dict(v) for k, v in (schemas or {}).items()}
        self.declared: dict[str, dict[str, str]] = {k: dict(v) for k, v in (declared or {}).items()}
        self.max_payload_bytes = max_payload_bytes
        self.dedup = _DedupWindow(dedup_window)
        self._colnames: dict[str, str] = {}

    def remember(self, pairs: Iterable[tuple[str, str]], at: float | None = None) -> None:
        """Seed the duplicate filter (e.g. with msg_ids already in the lake after a restart)."""
        at = time.time() if at is None else at
        for device, msg_id in pairs:
            self.dedup.add(device, msg_id, at)

    def _column(self, key: str) -> str:
        col = self._colnames.get(key)
        if col is None:
            col = self._colnames[key] = column_name(key)
        return col

    def decode(self, messages: list[InMessage]) -> Decoded:
        raw_cols: dict[str, list] = {name: [] for name in RAW_SCHEMA.names}
        dead: dict[str, list] = {name: [] for name in DEAD_LETTERS_SCHEMA.names}
        by_type: dict[str, _Rows] = {}
        result = Decoded(raw=None, curated={}, dead_letters=None, seq_hi=0)  # type: ignore[arg-type]

        def reject(seq: int, device: str, topic: str, received: int, reason: str, payload: str) -> None:
            dead["_seq"].append(seq)
            dead["device_id"].append(device)
            dead["topic"].append(topic)
            dead["received_at"].append(received)
            dead["reason"].append(reason)
            dead["payload"].append(payload[:_DEAD_PAYLOAD_CHARS])
            dead["day"].append(_day(received))

        limited = self._limited(messages) if self.limiter is not None else None
        reasons: dict[tuple[str, int], str] = {}
        for i, msg in enumerate(messages):
            result.messages += 1
            result.seq_hi = max(result.seq_hi, msg.seq)
            parts = msg.subject.split(".")
            device = parts[1] if len(parts) >= 3 else ""
            topic = "/".join(parts)
            size = len(msg.data)
            if size > self.max_payload_bytes:
                reject(msg.seq, device, topic, msg.received_us,
                       f"payload is {size} bytes, over max_payload_bytes={self.max_payload_bytes}",
                       msg.data[:_DEAD_PAYLOAD_CHARS].decode("utf-8", "replace"))
                continue
            if limited is not None and limited[i]:
                code = limited[i]
                reason = reasons.get((device, code))
                if reason is None:
                    reason = reasons[device, code] = self.limiter.reason(device, code)  # type: ignore[union-attr]
                reject(msg.seq, device, topic, msg.received_us, reason, _text(msg.data))
                continue
            raw_cols["_seq"].append(msg.seq)
            raw_cols["topic"].append(topic)
            raw_cols["device_id"].append(device)
            raw_cols["received_at"].append(msg.received_us)
            raw_cols["payload"].append(msg.data)
            raw_cols["day"].append(_day(msg.received_us))

            dtype = self.device_type(device)
            if dtype is None:
                reject(msg.seq, device, topic, msg.received_us,
                       f"unknown device {device!r}: register it with 'iot2ml devices add {device} --type TYPE'",
                       _text(msg.data))
                continue
            try:
                doc = orjson.loads(msg.data)
            except orjson.JSONDecodeError as err:
                reason = f"malformed JSON: {err}"
                if b"NaN" in msg.data or b"Infinity" in msg.data:
                    reason = f"malformed JSON: NaN and Infinity are not JSON numbers (send null): {err}"
                reject(msg.seq, device, topic, msg.received_us, reason, _text(msg.data))
                continue
            if type(doc) is dict:
                items = [doc]
            elif type(doc) is list:
                items = doc
                if not all(type(x) is dict for x in items):
                    good = []
                    for i, x in enumerate(items):
                        if type(x) is dict:
                            good.append(x)
                        else:
                            reject(msg.seq, device, topic, msg.received_us,
                                   f"item {i} is {_json_kind(x)}, not an object: send {{\"field\": value, ...}}",
                                   _dump(x))
                    items = good
            else:
                reject(msg.seq, device, topic, msg.received_us,
                       f"payload is {_json_kind(doc)}: send a JSON object or an array of objects", _text(msg.data))
                continue
            if not items:
                continue
            rows = by_type.get(dtype)
            if rows is None:
                rows = by_type[dtype] = _Rows()
            n = len(items)
            rows.items.extend(items)
            rows.seqs.extend([msg.seq] * n)
            rows.devices.extend([device] * n)
            rows.received.extend([msg.received_us] * n)
            rows.topics.extend([topic] * n)

        for dtype, rows in by_type.items():
            table, stats = self._build(dtype, rows, reject)
            result.readings += stats[0]
            result.duplicates += stats[1]
            if table is not None and table.num_rows:
                result.curated[dtype] = table

        result.raw = pa.table(
            {k: _payloads(v) if k == "payload" else pa.array(v, RAW_SCHEMA.field(k).type) for k, v in raw_cols.items()},
            schema=RAW_SCHEMA,
        )
        result.dead_letters = pa.table(
            {k: pa.array(v, DEAD_LETTERS_SCHEMA.field(k).type) for k, v in dead.items()}, schema=DEAD_LETTERS_SCHEMA
        )
        result.dead = result.dead_letters.num_rows
        self.dedup.expire(time.time())
        return result

    def _limited(self, messages: list[InMessage]) -> list[int]:
        """The limiter's code for each message (0 = within), from Arrow/numpy columns of the batch;
        a message over max_payload_bytes costs nothing (it is refused for its size)."""
        n = len(messages)
        sizes = np.fromiter(map(len, map(attrgetter("data"), messages)), dtype=np.int64, count=n)
        sizes[sizes > self.max_payload_bytes] = 0
        times = np.fromiter(map(attrgetter("received_us"), messages), dtype=np.int64, count=n)
        subjects = pa.array(list(map(attrgetter("subject"), messages)), pa.string())
        found = pa.compute.extract_regex(subjects, r"^[^.]*\.(?P<device>[^.]*)\.")  # devices.<id>.telemetry
        devices = pa.compute.if_else(found.is_valid(), found.field("device"), pa.scalar("", pa.string()))
        return self.limiter.check(devices, sizes, times).tolist()  # type: ignore[union-attr]

    # ---- one device type --------------------------------------------------------------------
    def _build(self, dtype: str, rows: _Rows, reject: Callable[..., None]) -> tuple[pa.Table | None, tuple[int, int]]:
        n = len(rows.items)
        bad: dict[int, str] = {}  # row index -> first reason
        schema = self.schemas.setdefault(dtype, {})
        declared = self.declared.get(dtype, {})

        # Which keys appear, and the column each maps to.
        keys: set[str] = set().union(*rows.items)
        has_msg_id = "msg_id" in keys
        keys.discard("ts")
        keys.discard("msg_id")

        # ts
        ts_values = [item.get("ts") for item in rows.items]
        ts_us = self._timestamps(ts_values, rows.received, bad)

        # msg_id + dedup
        msg_ids: list[str | None] = [None] * n
        duplicates = 0
        now = time.time()
        for i, item in enumerate(rows.items if has_msg_id else ()):
            mid = item.get("msg_id")
            if mid is None:
                continue
            if type(mid) is str or (type(mid) is int):
                mid = str(mid)
                msg_ids[i] = mid
                if self.dedup.seen(rows.devices[i], mid, now):
                    bad.setdefault(i, "")  # "" = duplicate, dropped without a dead letter
                    duplicates += 1
            else:
                bad.setdefault(i, f"msg_id {mid!r} is {_json_kind(mid)}: send a string or an integer")

        # fields
        columns: dict[str, pa.Array] = {}
        for key in sorted(keys):
            col = self._column(key)
            values = [item.get(key) for item in rows.items]
            if col in RESERVED_COLUMNS:
                if col == "device_id":
                    for i, v in enumerate(values):
                        if v is not None and v != rows.devices[i]:
                            bad.setdefault(i, f"field 'device_id' is {v!r} but the message came from device "
                                              f"{rows.devices[i]!r}: drop it or send from that device")
                    continue
                for i, v in enumerate(values):
                    if v is not None:
                        bad.setdefault(i, f"field {key!r} is reserved: rename it")
                continue
            expected = schema.get(col) or declared.get(col)
            array, kind = self._column_array(key, col, values, expected, dtype, bad)
            if array is None:
                continue
            if col in columns:  # two keys map to one column: keep the first non-null
                array = pa.compute.coalesce(columns[col], array)
            columns[col] = array
            if kind is not None and col not in schema:
                schema[col] = kind

        keep = [i for i in range(n) if i not in bad]
        for i, reason in bad.items():
            if reason:
                reject(rows.seqs[i], rows.devices[i], rows.topics[i], rows.received[i], reason, _dump(rows.items[i]))
        if not keep:
            return None, (0, duplicates)

        base = {
            "device_id": pa.array(rows.devices, pa.string()),
            "ts": pa.array(ts_us, pa.int64()).cast(TS),
            "received_at": pa.array(rows.received, pa.int64()).cast(TS),
            "msg_id": pa.array(msg_ids, pa.string()),
            "_seq": pa.array(rows.seqs, pa.int64()),
        }
        fields = [pa.field(name, typ) for name, typ in BASE_FIELDS]
        arrays = [base[name] for name, _ in BASE_FIELDS]
        for col in sorted(columns):
            arr = columns[col]
            fields.append(pa.field(col, arr.type))
            arrays.append(arr)
        table = pa.Table.from_arrays(arrays, schema=pa.schema(fields))
        if len(keep) < n:
            table = table.take(pa.array(keep, pa.int64()))
        return table, (len(keep), duplicates)

    def _timestamps(self, values: list, received: list[int], bad: dict[int, str]) -> list[int]:
        try:
            arr = pa.array(values)
        except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError):
            arr = None
        if arr is not None and (pa.types.is_integer(arr.type) or pa.types.is_floating(arr.type) or pa.types.is_null(arr.type)):
            nums = arr.cast(pa.float64()).to_numpy(zero_copy_only=False)
            rec = np.asarray(received, dtype=np.int64)
            missing = np.isnan(nums)
            scale = np.where(nums >= _MS_THRESHOLD, 1_000.0, 1_000_000.0)
            with np.errstate(invalid="ignore", over="ignore"):
                us = np.rint(np.where(missing, 0.0, nums) * scale)
            out_of_range = ~missing & ((us < 0) | (us > _MAX_US))
            result = np.where(missing, rec, us.astype(np.int64, copy=False) if not out_of_range.any() else np.where(out_of_range, 0, us).astype(np.int64))
            for i in np.flatnonzero(out_of_range):
                bad.setdefault(int(i), f"ts {values[i]!r} is outside 1970..2200: check the device clock")
            return result.tolist()
        out: list[int] = []
        for i, value in enumerate(values):
            if value is None:
                out.append(received[i])
                continue
            try:
                out.append(to_epoch_us(value))
            except InvalidInput as err:
                bad.setdefault(i, str(err))
                out.append(0)
        return out

    def _column_array(
        self, key: str, col: str, values: list, expected: str | None, dtype: str, bad: dict[int, str]
    ) -> tuple[pa.Array | None, str | None]:
        """One column as an Arrow array of its kind; rows whose value does not fit go to ``bad``."""
        target = expected
        try:
            arr = pa.array(values)
            inferred = arr.type
        except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError):
            arr, inferred = None, None
        if arr is not None:
            got = _inferred_kind(inferred)
            if target is None and got in ("float", "int", "string", "bool"):
                target = "float" if got == "int" else got
            if got == "null":
                return (pa.nulls(len(values), ARROW_TYPES[target]) if target else None), target
            if got == target or (target == "float" and got == "int"):
                return arr.cast(ARROW_TYPES[target]), target
            if target == "int" and got == "int":
                return arr, target
        # Slow path: walk the values, reject what does not fit, build the rest.
        if target is None:
            target = _first_kind(values)
            if target is None:  # nothing usable: every value is nested or an array
                target = "string"
        clean: list = []
        kept = 0
        for i, v in enumerate(values):
            if v is None:
                clean.append(None)
                continue
            ok, converted = _fits(v, target)
            if ok:
                clean.append(converted)
                kept += 1
            else:
                clean.append(None)
                bad.setdefault(i, _mismatch(key, v, target, dtype, col))
        if not kept and expected is None:
            return None, None  # a new column with no usable value: do not create it
        return pa.array(clean, ARROW_TYPES[target]), target


def _inferred_kind(t: pa.DataType) -> str:
    """``kind_of`` for a type Arrow inferred from JSON values, plus ``null`` and ``nested``."""
    if pa.types.is_null(t):
        return "null"
    if pa.types.is_struct(t) or pa.types.is_list(t) or pa.types.is_large_list(t):
        return "nested"
    return kind_of(t)


def _first_kind(values: list) -> str | None:
    for v in values:
        t = type(v)
        if t is bool:
            return "bool"
        if t in (int, float):
            return "float"
        if t is str:
            return "string"
    return None


def _fits(v: object, kind: str) -> tuple[bool, object]:
    t = type(v)
    if kind == "float":
        if t is float:
            return math.isfinite(v), v  # type: ignore[arg-type]
        if t is int:
            f = float(v)  # type: ignore[arg-type]
            return math.isfinite(f), f
        return False, None
    if kind == "int":
        if t is int and -(2**63) <= v < 2**63:  # type: ignore[operator]
            return True, v
        if t is float and v.is_integer() and abs(v) < 2**63:  # type: ignore[union-attr]
            return True, int(v)  # type: ignore[arg-type]
        return False, None
    if kind == "bool":
        return t is bool, v
    if kind == "string":
        return t is str, v
    if kind == "timestamp":
        try:
            return True, to_epoch_us(v)
        except InvalidInput:
            return False, None
    return False, None


def _mismatch(key: str, value: object, expected: str, dtype: str, col: str) -> str:
    kind = _json_kind(value)
    if kind in ("an object", "an array"):
        return (f"field {key!r} is {kind}: send one scalar per field "
                f"(e.g. flatten {{\"{key}\": {{\"a\": 1}}}} to \"{key}_a\": 1)")
    shown = repr(value)
    if len(shown) > 80:
        shown = shown[:77] + "..."
    return f"field {key!r} value {shown} is {kind}, expected {expected} (column {dtype}.{col})"


def _json_kind(value: object) -> str:
    return {
        dict: "an object", list: "an array", str: "a string", bool: "a boolean",
        int: "a number", float: "a number", type(None): "null",
    }.get(type(value), type(value).__name__)


def _text(data: bytes) -> str:
    return data[:_DEAD_PAYLOAD_CHARS].decode("utf-8", "replace")


def _payloads(datas: list[bytes]) -> pa.Array:
    """Payload bytes as one Arrow string array (a single copy), UTF-8 checked by Arrow;
    invalid bytes become U+FFFD."""
    lengths = np.fromiter(map(len, datas), dtype=np.int64, count=len(datas))
    offsets = np.zeros(len(datas) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    array = pa.Array.from_buffers(
        pa.large_string(), len(datas), [None, pa.py_buffer(offsets), pa.py_buffer(b"".join(datas))]
    )
    try:
        array.validate(full=True)
    except pa.ArrowInvalid:
        return pa.array([d.decode("utf-8", "replace") for d in datas], pa.string())
    return array.cast(pa.string())


def _dump(value: object) -> str:
    try:
        return orjson.dumps(value).decode()
    except TypeError:
        return repr(value)


_DAY_CACHE: dict[int, str] = {}


def _day(us: int) -> str:
    key = us // 86_400_000_000
    day = _DAY_CACHE.get(key)
    if day is None:
        day = _DAY_CACHE[key] = datetime.fromtimestamp(key * 86_400, tz=timezone.utc).strftime("%Y-%m-%d")
    return day
