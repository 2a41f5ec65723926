import time

import orjson
import pyarrow as pa
import pytest

from iot2ml.ingest.decode import Decoder, InMessage

from hostile import CASES, mixed_stream, oversize  # noqa: E402  (tests/ingest is on sys.path)

NOW = int(time.time() * 1_000_000)


def msg(seq: int, payload: bytes, device: str = "p1") -> InMessage:
    return InMessage(seq, f"devices.{device}.telemetry", NOW, payload)


def decoder(**kw) -> Decoder:
    return Decoder(lambda d: {"p1": "pump", "p2": "pump"}.get(d), schemas={"pump": {"pressure": "float"}}, **kw)


def test_object_array_and_timestamp_forms():
    out = decoder().decode([
        msg(1, b'{"ts": 1763780000.5, "pressure": 3.2, "flow": 11.9}'),
        msg(2, b'{"ts": 1763780000500, "pressure": 3}'),
        msg(3, b'[{"ts": "2025-11-22T02:53:20.5Z", "pressure": 1}, {"pressure": 2}]'),
    ])
    rows = out.curated["pump"].to_pylist()
    assert [r["pressure"] for r in rows] == [3.2, 3.0, 1.0, 2.0]
    assert rows[0]["ts"] == rows[1]["ts"] == rows[2]["ts"]  # seconds, ms and RFC 3339 agree
    assert rows[3]["ts"] == rows[3]["received_at"]  # missing ts = time received
    assert out.curated["pump"].schema.field("flow").type == pa.float64()
    assert out.raw.num_rows == 3 and out.dead == 0 and out.readings == 4


@pytest.mark.parametrize(("payload", "reason"), CASES + [oversize(1024)])
def test_each_hostile_payload_is_dead_lettered_with_its_reason(payload, reason):
    out = decoder(max_payload_bytes=1024).decode([msg(1, payload), msg(2, b'{"pressure": 5.5}')])
    reasons = out.dead_letters["reason"].to_pylist()
    assert len(reasons) == 1, reasons
    assert reason in reasons[0]
    assert out.curated["pump"]["pressure"].to_pylist()[-1] == 5.5  # the valid neighbour survives


def test_conflict_reason_names_field_value_and_expected_type():
    out = decoder().decode([msg(1, b'{"pressure": "high"}')])
    assert out.dead_letters["reason"][0].as_py() == (
        "field 'pressure' value 'high' is a string, expected float (column pump.pressure)"
    )


def test_new_fields_become_columns_and_keep_their_type():
    dec = decoder()
    first = dec.decode([msg(1, b'{"pressure": 1, "status": "ok", "alarm": false}')])
    assert first.curated["pump"].schema.field("status").type == pa.string()
    second = dec.decode([msg(2, b'{"status": 3}'), msg(3, b'{"alarm": "yes"}')])
    reasons = sorted(second.dead_letters["reason"].to_pylist())
    assert "expected bool" in reasons[0] and "expected string" in reasons[1]


def test_declared_int_column():
    dec = Decoder(lambda d: "pump", declared={"pump": {"count": "int"}})
    out = dec.decode([msg(1, b'{"count": 4}'), msg(2, b'{"count": 4.0}'), msg(3, b'{"count": 4.5}')])
    assert out.curated["pump"]["count"].to_pylist() == [4, 4]
    assert out.curated["pump"].schema.field("count").type == pa.int64()
    assert "expected int" in out.dead_letters["reason"][0].as_py()


def test_unknown_device_is_dead_lettered():
    out = decoder().decode([msg(1, b'{"pressure": 1}', device="ghost")])
    assert "unknown device 'ghost'" in out.dead_letters["reason"][0].as_py()
    assert out.raw.num_rows == 1  # raw keeps what the broker accepted


def test_resends_with_same_msg_id_are_dropped_once():
    dec = decoder()
    a = dec.decode([msg(1, b'{"msg_id": "m1", "pressure": 1}'), msg(2, b'{"msg_id": "m1", "pressure": 1}')])
    b = dec.decode([msg(3, b'{"msg_id": "m1", "pressure": 1}'), msg(4, b'{"msg_id": "m1", "pressure": 1}', "p2")])
    assert a.readings == 1 and a.duplicates == 1
    assert b.readings == 1 and b.duplicates == 1  # same msg_id from another device is not a resend
    assert a.dead == b.dead == 0


def test_field_names_are_normalised():
    out = decoder().decode([msg(1, b'{"PM2.5": 3, "Wind Speed": 2}')])
    assert {"pm2_5", "wind_speed"} <= set(out.curated["pump"].column_names)


def test_thousand_hostile_payloads_mixed_with_valid_ones_lose_nothing_valid():
    stream = mixed_stream(1200, 3000, limit=4096)
    dec = decoder(max_payload_bytes=4096)
    dead, kept = 0, []
    for start in range(0, len(stream), 500):  # in batches, as the ingest does
        chunk = stream[start:start + 500]
        out = dec.decode([msg(start + i + 1, p) for i, (p, _) in enumerate(chunk)])
        dead += out.dead
        if "pump" in out.curated:
            kept += out.curated["pump"]["msg_id"].to_pylist()
    valid = [orjson.loads(p)["msg_id"] for p, reason in stream if reason is None]
    assert sorted(k for k in kept if k) == sorted(valid)
    assert dead == 1200
