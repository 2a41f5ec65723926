"""Rate limits and payload quotas: token buckets, one per caller, so one device cannot starve the others.

A bucket holds up to ``burst`` tokens and refills at ``per_second`` tokens a second; a request (or a
message) takes one token, a payload takes one token per byte. What does not find its tokens is
refused: the bucket is left as it was, so a caller that keeps sending past its limit still gets
``per_second`` through, never less.

- ``Rate``: a rate and a burst; ``per_second == 0`` switches the limit off.
- ``Buckets``: buckets by key (device id, API key name, user name); thread-safe, O(1) a ``take``. A
  bucket idle long enough to be full again is dropped (a fresh one is the same), so memory follows
  the callers active in the last ``burst / per_second`` seconds.
- ``Limits``: what the HTTP guard applies (``auth.guard``): requests per device, per API key and per
  user, payload bytes per device; ``RateLimited`` (429 with ``Retry-After``) when over. Clock: this
  process's monotonic clock, so each process (API, serving) counts its own requests.
- ``DeviceLimiter``: the ingest's per-device message and byte buckets, decided for a whole batch at
  once (grouped by device with Arrow and numpy, no Python loop over rows). Clock: the broker's
  timestamp of each message, so draining a backlog after an outage replays the rates the devices
  really sent at.

Settings (``core.config``): ``limit_device_rate``, ``limit_device_burst``, ``limit_device_bytes``,
``limit_device_bytes_burst``, ``limit_key_rate``, ``limit_key_burst`` (API keys and users alike).
"""

from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from ..core.errors import RateLimited

if TYPE_CHECKING:
    from ..core.http import Principal

__all__ = ["BYTES", "MESSAGES", "OK", "Buckets", "DeviceLimiter", "Limits", "Rate"]

OK, MESSAGES, BYTES = 0, 1, 2
"""``DeviceLimiter.check`` codes: within the limits, over the message rate, over the byte rate."""

_EPS = 1e-6  # float slack when comparing token levels
_WIDTHS = (1, 4, 16, 64)  # size classes of devices settled side by side (padding wastes at most 4x)


@dataclass(frozen=True)
class Rate:
    """``per_second`` tokens a second, up to ``burst`` at once; ``per_second == 0``: no limit.

    >>> Rate(10, 20).refill_seconds
    2.0
    """

    per_second: float
    burst: float

    def __post_init__(self) -> None:
        if self.per_second < 0 or (self.per_second > 0 and self.burst < 1):
            raise ValueError(f"rate {self.per_second!r}/s with burst {self.burst!r}: use a rate >= 0 "
                             "(0 = off) and a burst >= 1")

    @property
    def on(self) -> bool:
        return self.per_second > 0

    @property
    def refill_seconds(self) -> float:
        """Seconds an empty bucket takes to fill up."""
        return self.burst / self.per_second if self.on else 0.0


class Buckets:
    """Token buckets of one ``rate`` by key. ``take(key, cost)`` answers 0.0 if the tokens were
    there (and takes them), else the seconds until they would be (and takes nothing).

    >>> clock = [0.0]
    >>> b = Buckets(Rate(2, 3), clock=lambda: clock[0])
    >>> [b.take("pump-7") for _ in range(4)]
    [0.0, 0.0, 0.0, 0.5]
    >>> clock[0] = 0.5
    >>> b.take("pump-7")
    0.0
    """

    def __init__(self, rate: Rate, *, clock: Callable[[], float] = time.monotonic, max_keys: int = 1_000_000) -> None:
        self.rate = rate
        self.clock = clock
        self.max_keys = max_keys
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # key -> (tokens, at); oldest first
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._buckets)

    def take(self, key: str, cost: float = 1.0) -> float:
        rate = self.rate
        if not rate.on:
            return 0.0
        cost = min(float(cost), rate.burst)  # more than a full bucket passes when the bucket is full
        with self._lock:
            now = self.clock()
            found = self._buckets.pop(key, None)
            tokens = rate.burst if found is None else min(rate.burst, found[0] + (now - found[1]) * rate.per_second)
            wait = 0.0
            if tokens + _EPS >= cost:
                tokens -= cost
            else:
                wait = (cost - tokens) / rate.per_second
            self._buckets[key] = (tokens, now)  # to the end: the most recently used
            self._evict(now)
            return wait

    def _evict(self, now: float) -> None:
        """Drop buckets full again (at most a few per call: O(1) amortised), or the oldest past ``max_keys``."""
        buckets, full_after = self._buckets, self.rate.refill_seconds
        for _ in range(4):
            if not buckets:
                return
            key, (_tokens, at) = next(iter(buckets.items()))
            if now - at < full_after and len(buckets) <= self.max_keys:
                return
            del buckets[key]


def _retry_after(wait: float) -> int:
    return max(1, math.ceil(wait))


def _num(value: float) -> str:
    """``5``, ``0.5``, ``8388608``: no exponent, no trailing ``.0``."""
    return f"{value:g}" if value < 1e6 else f"{value:.0f}"


class Limits:
    """The limits an HTTP process applies (``Guard``): ``admit`` counts a request of a device, an API
    key or a user; ``charge`` counts the payload bytes of a device. Both raise ``RateLimited``
    naming the limit and the whole seconds to wait; callers of other kinds pass."""

    def __init__(self, *, device: Rate, device_bytes: Rate, key: Rate,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.device = Buckets(device, clock=clock)
        self.device_bytes = Buckets(device_bytes, clock=clock)
        self.key = Buckets(key, clock=clock)

    @classmethod
    def from_settings(cls, settings: Any) -> Limits:
        """From ``core.config.Settings`` ``limit_*``."""
        return cls(device=Rate(settings.limit_device_rate, settings.limit_device_burst),
                   device_bytes=Rate(settings.limit_device_bytes, settings.limit_device_bytes_burst),
                   key=Rate(settings.limit_key_rate, settings.limit_key_burst))

    @classmethod
    def off(cls) -> Limits:
        """No limit at all."""
        return cls(device=Rate(0, 1), device_bytes=Rate(0, 1), key=Rate(0, 1))

    def admit(self, who: Principal) -> None:
        """Count one request of ``who``."""
        if who.kind == "device":
            buckets, what = self.device, f"device {who.name}"
        elif who.kind in ("key", "user"):
            buckets, what = self.key, f"{'API key' if who.kind == 'key' else 'user'} {who.name}"
        else:
            return
        wait = buckets.take(f"{who.kind}:{who.name}")
        if wait:
            seconds = _retry_after(wait)
            raise RateLimited(f"rate limit: {what} over {_num(buckets.rate.per_second)} requests/s "
                              f"(burst {_num(buckets.rate.burst)}); retry after {seconds} s", seconds)

    def charge(self, who: Principal, nbytes: int) -> None:
        """Count ``nbytes`` of payload of ``who`` (devices only)."""
        if who.kind != "device" or nbytes <= 0:
            return
        wait = self.device_bytes.take(who.name, nbytes)
        if wait:
            seconds = _retry_after(wait)
            rate = self.device_bytes.rate
            raise RateLimited(f"rate limit: device {who.name} over {_num(rate.per_second)} payload bytes/s "
                              f"(burst {_num(rate.burst)}); retry after {seconds} s", seconds)


class DeviceLimiter:
    """Per-device message and byte buckets for the ingest, decided a batch at a time on the broker's
    clock. ``slack`` seconds of each rate are added to each bucket: telemetry the HTTP API admitted
    on its own clock reaches the broker a little later and less evenly, and must not be refused
    here for that.

    >>> limiter = DeviceLimiter(Rate(1, 2), Rate(0, 1), slack=0)
    >>> limiter.check(["a", "a", "a", "b"], [10, 10, 10, 10], [0, 1_000, 2_000, 3_000]).tolist()
    [0, 0, 1, 0]
    """

    def __init__(self, messages: Rate, payload: Rate, *, slack: float = 1.0, max_devices: int = 1_000_000) -> None:
        self.messages = messages
        self.payload = payload
        self.max_devices = max_devices
        dims = [(r, MESSAGES) for r in (messages,) if r.on] + [(r, BYTES) for r in (payload,) if r.on]
        self._codes = np.array([code for _, code in dims], dtype=np.uint8)
        self._rates = np.array([r.per_second for r, _ in dims], dtype=np.float64)
        self._caps = np.array([r.burst + r.per_second * slack for r, _ in dims], dtype=np.float64)
        self._full_after = max((r.refill_seconds + slack for r, _ in dims), default=0.0)
        # Buckets in numpy arrays, a slot per device: no Python object per device to allocate or
        # for the garbage collector to walk. A free slot has ``at`` NaN.
        self._slots: dict[str, int] = {}
        self._names: list[str] = []
        self._free: list[int] = []
        self._levels = np.empty((len(dims), 0), dtype=np.float64)
        self._at = np.empty(0, dtype=np.float64)  # seconds from _origin of each bucket's last message
        self._origin: int | None = None  # µs; the clock in seconds counts from here

    @classmethod
    def from_settings(cls, settings: Any) -> DeviceLimiter:
        return cls(Rate(settings.limit_device_rate, settings.limit_device_burst),
                   Rate(settings.limit_device_bytes, settings.limit_device_bytes_burst))

    @property
    def on(self) -> bool:
        return len(self._rates) > 0

    def __len__(self) -> int:
        return len(self._slots)

    def reason(self, device: str, code: int) -> str:
        """The dead letter's reason for a message refused with ``code``."""
        if code == MESSAGES:
            return (f"rate limit: device {device} over {_num(self.messages.per_second)} messages/s "
                    f"(burst {_num(self.messages.burst)}): slow the device down or raise limit_device_rate")
        return (f"rate limit: device {device} over {_num(self.payload.per_second)} payload bytes/s "
                f"(burst {_num(self.payload.burst)}): slow the device down or raise limit_device_bytes")

    def over(self, devices: Any, sizes: Any, times_us: Any) -> np.ndarray:
        """The boolean mask of messages over a limit (``check(...) != OK``)."""
        return self.check(devices, sizes, times_us) != OK

    def check(self, devices: Any, sizes: Any, times_us: Any) -> np.ndarray:
        """One code per message (``OK``, ``MESSAGES``, ``BYTES``), taking the tokens of those within.

        ``devices``: device ids (an Arrow string array or a sequence); ``sizes``: payload bytes (a
        size of 0 costs nothing: a message refused for another reason); ``times_us``: broker
        timestamps, microseconds since the epoch, in the order the messages were stored.

        Grouped by device with Arrow and numpy: devices with up to 64 messages are checked side by
        side in one padded pass per size class; a device over a limit, or with more messages, goes
        message by message in vectorised runs (``_decide``). Python loops run per device only."""
        import pyarrow as pa
        import pyarrow.compute as pc

        n = len(devices)
        codes = np.zeros(n, dtype=np.uint8)
        if not self.on or n == 0:
            return codes
        array = devices if isinstance(devices, (pa.Array, pa.ChunkedArray)) else pa.array(devices, pa.string())
        encoded = pc.dictionary_encode(pc.fill_null(array, ""))
        if isinstance(encoded, pa.ChunkedArray):
            encoded = encoded.combine_chunks()
        ids = encoded.indices.to_numpy(zero_copy_only=False)
        names: list[str] = encoded.dictionary.to_pylist()
        size = np.asarray(sizes, dtype=np.float64)
        stamps = np.asarray(times_us, dtype=np.int64)
        if self._origin is None:
            self._origin = int(stamps.min())
        seconds = (stamps - self._origin) / 1e6  # small numbers: exact to well under a microsecond
        dims = len(self._rates)
        cost = np.empty((dims, n), dtype=np.float64)
        for d, code in enumerate(self._codes):
            cost[d] = np.where(size > 0, 1.0, 0.0) if code == MESSAGES else np.minimum(size, self._caps[d])
        order = np.argsort(ids, kind="stable")
        m = len(names)
        counts = np.bincount(ids, minlength=m)
        ends = np.cumsum(counts)
        starts = ends - counts
        firsts = seconds[order[starts]]
        # each device's buckets (full for a device not seen lately), refilled up to its first message
        slots = self._slots_of(names)
        caps, rates = self._caps[:, None], self._rates[:, None]
        levels, at = self._levels[:, slots], self._at[slots]
        fresh = np.isnan(at)
        levels[:, fresh] = caps
        at = np.where(fresh, firsts, np.maximum(at, firsts))
        levels = np.minimum(caps, levels + rates * (at - np.where(fresh, firsts, self._at[slots])))
        # devices with few messages: every device of a size class in one padded pass; a device
        # whose messages all fit is settled there, the others go message by message (``_decide``)
        slow: list[int] = []
        low = 0
        for width in _WIDTHS:
            group = np.flatnonzero((counts > low) & (counts <= width))
            low = width
            if len(group):
                slow.extend(self._settle(group, width, levels, at, order, starts, counts, seconds, cost))
        slow.extend(np.flatnonzero(counts > _WIDTHS[-1]).tolist())
        for k in slow:
            rows = order[starts[k]:ends[k]]
            times = np.maximum.accumulate(np.maximum(seconds[rows], at[k]))  # the bucket's clock never goes back
            left, when, refused = self._decide(levels[:, k].copy(), float(at[k]), times, cost[:, rows])
            codes[rows] = refused
            levels[:, k], at[k] = left, when
        self._levels[:, slots], self._at[slots] = levels, at
        self._evict(float(seconds.max()))
        return codes

    def _slots_of(self, names: list[str]) -> np.ndarray:
        """The slot of each device, new ones taken from the free list (the arrays grow by doubling)."""
        get = self._slots.get
        slots = np.fromiter((get(name, -1) for name in names), dtype=np.int64, count=len(names))
        new = np.flatnonzero(slots < 0)
        if len(new):
            short = len(new) - len(self._free)
            if short > 0:
                size = len(self._at)
                grown = max(2 * size, size + short, 1024)
                self._levels = np.concatenate([self._levels, np.zeros((len(self._rates), grown - size))], axis=1)
                self._at = np.concatenate([self._at, np.full(grown - size, np.nan)])
                self._names.extend([""] * (grown - size))
                self._free.extend(range(grown - 1, size - 1, -1))
            for k in new.tolist():
                slot = self._free.pop()
                slots[k] = slot
                self._slots[names[k]] = slot
                self._names[slot] = names[k]
                self._at[slot] = np.nan
        return slots

    def _settle(self, group: np.ndarray, width: int, levels: np.ndarray, at: np.ndarray, order: np.ndarray,
                starts: np.ndarray, counts: np.ndarray, seconds: np.ndarray, cost: np.ndarray) -> list[int]:
        """Devices ``group`` (at most ``width`` messages each) side by side, padded: those whose
        messages all fit get their new levels in ``levels``/``at``; the others are returned."""
        step = np.arange(width)
        real = step[None, :] < counts[group][:, None]
        pos = np.where(real, starts[group][:, None] + step[None, :], (starts[group] + counts[group] - 1)[:, None])
        rows = order[pos]
        t = np.maximum.accumulate(np.maximum(seconds[rows], at[group][:, None]), axis=1)
        c = cost[:, rows] * real  # padding costs nothing at the last message's time: levels stay
        rates, caps = self._rates[:, None, None], self._caps[:, None, None]
        spent = np.cumsum(c, axis=2)
        never = levels[:, group][:, :, None] + rates * (t - at[group][:, None]) - spent
        capped = np.minimum.accumulate(caps - rates * t + (spent - c), axis=2) + rates * t - spent
        level = np.minimum(never, capped)
        fits = (level >= -_EPS).all(axis=(0, 2))
        done = group[fits]
        levels[:, done] = level[:, fits, -1]
        at[done] = t[fits, -1]
        return group[~fits].tolist()

    def _decide(self, levels: np.ndarray, at: float, times: np.ndarray,
                cost: np.ndarray) -> tuple[np.ndarray, float, np.ndarray]:
        """Greedy token bucket over one device's messages, in runs: the longest run that fits is taken
        with cumulative sums, then the refused stretch is skipped to the next message that fits. Work
        per run is the run's length plus a small window, so a flood costs O(its length)."""
        n = len(times)
        refused = np.zeros(n, dtype=np.uint8)
        rates, caps = self._rates[:, None], self._caps[:, None]
        p, window = 0, 64
        while p < n:
            end = min(n, p + window)
            t, c = times[p:end], cost[:, p:end]
            spent = np.cumsum(c, axis=1)
            # level after message i if every message from p on is taken: either never capped since p,
            # or capped last just before some j <= i (min over j by a running minimum)
            never = levels[:, None] + rates * (t - at) - spent
            capped = np.minimum.accumulate(caps - rates * t + (spent - c), axis=1) + rates * t - spent
            level = np.minimum(never, capped)
            short = (level < -_EPS).any(axis=0)
            if not short.any():
                levels, at, p, window = level[:, -1].copy(), float(t[-1]), end, window * 2
                continue
            k = int(np.argmax(short))
            if k:
                levels, at = level[:, k - 1].copy(), float(t[k - 1])
            refused[p + k] = self._codes[int(np.argmax(level[:, k] < -_EPS))]
            p, window = self._skip(levels, at, times, cost, p + k + 1, refused), 64
        return levels, at, refused

    def _skip(self, levels: np.ndarray, at: float, times: np.ndarray, cost: np.ndarray, q: int,
              refused: np.ndarray) -> int:
        """Refuse from ``q`` on until a message fits the bucket (which refusals leave alone); its index."""
        n, window = len(times), 64
        rates, caps = self._rates[:, None], self._caps[:, None]
        while q < n:
            end = min(n, q + window)
            have = np.minimum(caps, levels[:, None] + rates * (times[q:end] - at))
            short = have + _EPS < cost[:, q:end]
            fits = ~short.any(axis=0)
            stop = int(np.argmax(fits)) if fits.any() else end - q
            if stop:
                refused[q:q + stop] = self._codes[np.argmax(short[:, :stop], axis=0)]
            q += stop
            if q < end:
                return q
            window *= 2
        return q

    def _evict(self, now: float) -> None:
        """Forget devices idle long enough for their buckets to be full again (a fresh bucket is the
        same), then the longest idle past ``max_devices``."""
        with np.errstate(invalid="ignore"):
            idle = np.flatnonzero(now - self._at >= self._full_after)
        extra = len(self._slots) - len(idle) - self.max_devices
        if extra > 0:
            age = np.where(np.isnan(self._at), -np.inf, now - self._at)
            age[idle] = -np.inf
            idle = np.concatenate([idle, np.argpartition(-age, extra - 1)[:extra]])
        for slot in idle.tolist():
            del self._slots[self._names[slot]]
            self._free.append(slot)
        self._at[idle] = np.nan
