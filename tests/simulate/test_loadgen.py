"""The pipelined QoS 1 publisher against the real Mosquitto broker."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from iot2ml.core.errors import AuthError, BrokerUnavailable, InvalidInput
from iot2ml.core.runtime import free_port
from iot2ml.simulate.loadgen import PublishIncomplete, publish_qos1, publish_qos1_sync


def _topic() -> str:
    return f"iot2ml-test/{uuid.uuid4().hex}/x"


async def test_every_message_acked_and_delivered_once(private_mosquitto, subscriber_class) -> None:
    broker = private_mosquitto()
    topic = _topic()
    sub = subscriber_class(broker.host, broker.port, [topic], qos=1)
    payloads = [b'{"ts": 1763780000.%06d, "msg_id": "m-%d", "pad": "%s"}' % (i, i, b"x" * 150) for i in range(20_000)]

    result = await publish_qos1(broker.host, broker.port, username="dev", password="tok", topic=topic,
                                payloads=payloads)

    assert (result.sent, result.acked, result.first_connack_rc) == (20_000, 20_000, 0)
    assert result.elapsed > 0 and result.rate > 1_000
    got = [payload for _, payload in await asyncio.to_thread(sub.wait_for, 20_000, 60)]
    sub.close()
    assert len(got) == 20_000, f"subscriber got {len(got)} messages, expected 20000 exactly"
    assert set(got) == set(payloads)


async def test_packet_ids_wrap_past_65535(mosquitto) -> None:
    n = 70_000
    result = await publish_qos1(*mosquitto, username=None, password=None, topic=_topic(),
                                payloads=(b"%d" % i for i in range(n)), window=5_000)
    assert (result.sent, result.acked) == (n, n)


def test_sync_wrapper_with_window_of_one(mosquitto) -> None:
    result = publish_qos1_sync(*mosquitto, username="dev", password="tok", topic=_topic(),
                               payloads=[b"a", b"b", b"c"], window=1)
    assert (result.sent, result.acked) == (3, 3)


async def _fake_broker(connack_rc: int):
    """A TCP server answering any CONNECT with a CONNACK carrying ``connack_rc`` (error path only)."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(1024)
        writer.write(bytes([0x20, 0x02, 0x00, connack_rc]))
        await writer.drain()
        await asyncio.sleep(0.5)
        writer.close()

    return await asyncio.start_server(handle, "127.0.0.1", 0)


async def test_refused_connack_raises_auth_error() -> None:
    server = await _fake_broker(5)
    port = server.sockets[0].getsockname()[1]
    async with server:
        with pytest.raises(AuthError, match=r"return code 5 \(not authorised\)"):
            await publish_qos1("127.0.0.1", port, username="pump-1", password="wrong", topic="t", payloads=[b"x"],
                               timeout=5)


async def test_nothing_listening_raises_broker_unavailable() -> None:
    with pytest.raises(BrokerUnavailable, match="no MQTT broker answered"):
        await publish_qos1("127.0.0.1", free_port(), username=None, password=None, topic="t", payloads=[b"x"],
                           timeout=5)


async def test_broker_that_never_acks_stops_after_timeout() -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(1024)
        writer.write(b"\x20\x02\x00\x00")  # accept, then swallow everything
        while await reader.read(65536):
            pass

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    async with server:
        with pytest.raises(PublishIncomplete) as caught:
            await publish_qos1("127.0.0.1", server.sockets[0].getsockname()[1], username=None, password=None,
                               topic="t", payloads=[b"x"] * 10, timeout=0.5)
    assert (caught.value.result.sent, caught.value.result.acked) == (10, 0)


@pytest.mark.parametrize("kwargs, match", [
    ({"window": 0}, "window 0"),
    ({"window": 70_000}, "window 70000"),
    ({"topic": "a/+/b"}, "wildcards"),
])
async def test_bad_arguments_are_named(kwargs, match) -> None:
    args = {"username": None, "password": None, "topic": "t", "payloads": [b"x"], **kwargs}
    with pytest.raises(InvalidInput, match=match):
        await publish_qos1("127.0.0.1", 1, **args)


async def test_real_broker_refusing_a_password_raises_auth_error(private_mosquitto) -> None:
    broker = private_mosquitto(users={"pump-1": "right"})
    with pytest.raises(AuthError, match=r"refused username 'pump-1': CONNACK return code 5"):
        await publish_qos1(broker.host, broker.port, username="pump-1", password="wrong", topic="t",
                           payloads=[b"x"], timeout=5)
    ok = await publish_qos1(broker.host, broker.port, username="pump-1", password="right", topic="t",
                            payloads=[b"x"] * 10, timeout=5)
    assert (ok.sent, ok.acked, ok.first_connack_rc) == (10, 10, 0)
