"""Timestamps as devices send them: epoch seconds, epoch milliseconds or RFC 3339 text."""

from __future__ import annotations

import math
from datetime import datetime, timezone

from .errors import InvalidInput

# Epoch values above this are milliseconds (1e11 s is the year 5138).
_MS_THRESHOLD = 1e11
# Accept 1970..2200 only: anything else is a sensor clock gone wrong.
_MIN_US = 0
_MAX_US = 7_258_118_400 * 1_000_000


def to_epoch_us(value: object) -> int:
    """Return the timestamp ``value`` as integer microseconds since the epoch (UTC).

    >>> to_epoch_us(1763780000.5)
    1763780000500000
    >>> to_epoch_us(1763780000500)
    1763780000500000
    >>> to_epoch_us("2026-11-22T03:00:00Z")
    1795316400000000
    """
    if isinstance(value, bool):
        raise InvalidInput(f"ts {value!r} is a boolean: send epoch seconds, epoch ms or RFC 3339 text")
    if isinstance(value, (int, float)):
        if not math.isfinite(value):
            raise InvalidInput(f"ts {value!r} is not finite: send epoch seconds, epoch ms or RFC 3339 text")
        us = int(round(value * (1_000 if value >= _MS_THRESHOLD else 1_000_000)))
    elif isinstance(value, str):
        text = value.strip()
        if text.endswith(("Z", "z")):
            text = text[:-1] + "+00:00"
        try:
            parsed = datetime.fromisoformat(text)
        except ValueError:
            raise InvalidInput(
                f"ts {value!r} is not RFC 3339: use e.g. '2026-11-22T03:00:00Z' or epoch seconds"
            ) from None
        if parsed.tzinfo is None:
            parsed = parsed.replace(tzinfo=timezone.utc)
        delta = parsed - datetime(1970, 1, 1, tzinfo=timezone.utc)
        us = (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds
    else:
        raise InvalidInput(
            f"ts {value!r} has type {type(value).__name__}: send epoch seconds, epoch ms or RFC 3339 text"
        )
    if not _MIN_US <= us <= _MAX_US:
        raise InvalidInput(f"ts {value!r} is outside 1970..2200: check the device clock")
    return us


def now_us() -> int:
    """Microseconds since the epoch, now."""
    return int(datetime.now(timezone.utc).timestamp() * 1_000_000)


_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> float:
    """``90s``, ``30m``, ``1h``, ``2d`` or plain seconds.

    >>> parse_duration("1h"), parse_duration("90s"), parse_duration("15")
    (3600.0, 90.0, 15.0)
    """
    text = text.strip().lower()
    try:
        if text and text[-1] in _UNITS:
            return float(text[:-1]) * _UNITS[text[-1]]
        return float(text)
    except ValueError:
        raise InvalidInput(f"duration {text!r} is not valid: use e.g. 90s, 30m, 1h or 2d") from None
