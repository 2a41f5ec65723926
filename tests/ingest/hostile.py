"""Hostile payloads, each with the words its dead-letter reason must contain."""

from __future__ import annotations

import random

import orjson

CASES: list[tuple[bytes, str]] = [
    (b"", "malformed JSON"),
    (b"{", "malformed JSON"),
    (b"not json", "malformed JSON"),
    (b'{"pressure": NaN}', "NaN"),
    (b'{"pressure": Infinity}', "NaN and Infinity"),
    (b'{"pressure": -Infinity}', "NaN and Infinity"),
    (b"null", "payload is null"),
    (b"42", "payload is a number"),
    (b'"text"', "payload is a string"),
    (b"[7]", "item 0 is a number"),
    (b'[{"pressure": 1}, "x"]', "item 1 is a string"),
    (b'{"ts": "yesterday", "pressure": 1}', "ts 'yesterday' is not RFC 3339"),
    (b'{"ts": true, "pressure": 1}', "ts True is a boolean"),
    (b'{"ts": -5, "pressure": 1}', "outside 1970..2200"),
    (b'{"ts": 1e300, "pressure": 1}', "outside 1970..2200"),
    (b'{"ts": {"a": 1}, "pressure": 1}', "ts {'a': 1} has type dict"),
    (b'{"pressure": "high"}', "field 'pressure' value 'high' is a string, expected float"),
    (b'{"pressure": true}', "field 'pressure' value True is a boolean, expected float"),
    (b'{"pressure": {"a": 1}}', "field 'pressure' is an object"),
    (b'{"pressure": [1, 2]}', "field 'pressure' is an array"),
    (b'{"msg_id": [1], "pressure": 1}', "msg_id [1] is an array"),
    (b'{"received_at": 5, "pressure": 1}', "field 'received_at' is reserved"),
    (b'{"device_id": "someone-else", "pressure": 1}', "field 'device_id' is 'someone-else'"),
    (b"\xff\xfe\x00garbage", "malformed JSON"),
    (b'{"pressure": 1e999}', "malformed JSON"),
]


def oversize(limit: int) -> tuple[bytes, str]:
    return b'{"pad": "' + b"x" * limit + b'"}', "over max_payload_bytes"


def mixed_stream(n_hostile: int, n_valid: int, *, limit: int, seed: int = 7) -> list[tuple[bytes, str | None]]:
    """Hostile and valid payloads shuffled; valid ones carry a unique msg_id and pressure."""
    rng = random.Random(seed)
    items: list[tuple[bytes, str | None]] = []
    cases = CASES + [oversize(limit)]
    for i in range(n_hostile):
        items.append(cases[i % len(cases)])
    for i in range(n_valid):
        items.append((orjson.dumps({"msg_id": f"ok-{i}", "pressure": rng.uniform(0, 10), "flow": i}), None))
    rng.shuffle(items)
    return items
