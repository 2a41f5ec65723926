"""A fast MQTT 3.1.1 QoS 1 publisher on raw asyncio sockets: our load generator.

One connection, clean session, up to ``window`` PUBLISH packets in flight, PUBACKs matched by packet
id. It exists because ``mosquitto_pub -l -q 1`` (Debian 2.0.11) drops messages at the end of its
input, and paho tops out far below what a broker takes. Packets are built by bytes concatenation and
written in chunks; PUBACKs are parsed from one buffer.

Example::

    result = publish_qos1_sync("127.0.0.1", 1883, username="pump-0001", password=token,
                               topic="devices/pump-0001/telemetry", payloads=(b"{}" for _ in range(10_000)))
    assert result.acked == result.sent == 10_000
"""

from __future__ import annotations

import asyncio
import itertools
import socket
import struct
import time
import uuid
from dataclasses import dataclass
from typing import Iterable

from ..core.errors import AuthError, BrokerUnavailable, InvalidInput

__all__ = ["PublishIncomplete", "PublishResult", "publish_qos1", "publish_qos1_sync"]

_CHUNK = 512  # packets per write
_MAX_REMAINING = 268_435_455
_QUICKACK: int | None = getattr(socket, "TCP_QUICKACK", None)
_CONNACK_MEANING = {
    1: "unacceptable protocol version",
    2: "client identifier rejected",
    3: "server unavailable",
    4: "bad user name or password",
    5: "not authorised",
}


@dataclass(frozen=True)
class PublishResult:
    """What one ``publish_qos1`` run did."""

    sent: int
    """PUBLISH packets written."""
    acked: int
    """PUBACKs received (each packet id counted once)."""
    elapsed: float
    """Seconds from CONNECT to the last PUBACK."""
    first_connack_rc: int
    """Return code of the CONNACK (0 = accepted)."""

    @property
    def rate(self) -> float:
        """Acknowledged messages per second."""
        return self.acked / self.elapsed if self.elapsed > 0 else 0.0


class PublishIncomplete(BrokerUnavailable):
    """The connection was lost or the broker stopped acknowledging; ``result`` says how far it got."""

    def __init__(self, message: str, result: PublishResult) -> None:
        super().__init__(message)
        self.result = result


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | 0x80 if n else byte)
        if not n:
            return bytes(out)


def _utf8(text: str) -> bytes:
    raw = text.encode()
    return struct.pack("!H", len(raw)) + raw


def _connect_packet(client_id: str, username: str | None, password: str | None, keepalive: int) -> bytes:
    flags = 0x02  # clean session
    body = _utf8(client_id)
    if username is not None:
        flags |= 0x80
        body += _utf8(username)
        if password is not None:
            flags |= 0x40
            body += _utf8(password)
    variable = _utf8("MQTT") + bytes([4, flags]) + struct.pack("!H", keepalive)
    rest = variable + body
    return b"\x10" + _varint(len(rest)) + rest


class _Protocol(asyncio.Protocol):
    """Reads CONNACK and PUBACKs; tells the writer when the window has room."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self._sock: socket.socket | None = None
        self.buf = bytearray()
        self.connack: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self.inflight = bytearray(65536)  # 1 = packet id awaits its PUBACK
        self.n_inflight = 0
        self.acked = 0
        self.last_ack = time.monotonic()
        self.lost: Exception | None = None
        self.paused = False
        self._waiter: asyncio.Future[None] | None = None
        self._wake_at = 0  # wake the writer once n_inflight <= this

    # -- asyncio callbacks ------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self._sock = transport.get_extra_info("socket")

    def _quickack(self) -> None:
        # Brokers that Nagle their PUBACKs (Mosquitto's default) stall ~40 ms per window on our
        # delayed ACKs; Linux resets TCP_QUICKACK after a while, so set it again on every read.
        if _QUICKACK is not None and self._sock is not None:
            try:
                self._sock.setsockopt(socket.IPPROTO_TCP, _QUICKACK, 1)
            except OSError:
                pass

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = exc or ConnectionResetError("the broker closed the connection")
        if not self.connack.done():
            self.connack.set_exception(self.lost)
        self._wake()

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        self._wake()

    def data_received(self, data: bytes) -> None:
        self._quickack()
        buf = self.buf
        buf += data
        pos, end = 0, len(buf)
        inflight = self.inflight
        acks = 0
        while end - pos >= 2:
            first = buf[pos]
            length = buf[pos + 1]
            i = pos + 2
            if length & 0x80:  # multi-byte remaining length (nothing a broker sends us, but be general)
                length, mult, i = 0, 1, pos + 1
                while True:
                    if i >= end:
                        break
                    byte = buf[i]
                    length += (byte & 0x7F) * mult
                    mult <<= 7
                    i += 1
                    if not byte & 0x80:
                        break
                if i >= end and buf[i - 1] & 0x80:
                    break  # header incomplete
            if end - i < length:
                break  # body incomplete
            kind = first >> 4
            if kind == 4 and length == 2:  # PUBACK
                pid = (buf[i] << 8) | buf[i + 1]
                if inflight[pid]:
                    inflight[pid] = 0
                    acks += 1
            elif kind == 2 and length >= 2 and not self.connack.done():  # CONNACK
                self.connack.set_result(buf[i + 1])
            pos = i + length
        if pos:
            del buf[:pos]
        if acks:
            self.acked += acks
            self.n_inflight -= acks
            self.last_ack = time.monotonic()
            if self.n_inflight <= self._wake_at:
                self._wake()

    # -- for the writer -------------------------------------------------------------
    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def ready(self, wake_at: int) -> bool:
        return self.lost is not None or (not self.paused and self.n_inflight <= wake_at)

    async def wait(self, wake_at: int, timeout: float) -> None:
        """Wait until at most ``wake_at`` packets are in flight; ``TimeoutError`` if acks stall."""
        while not self.ready(wake_at):
            before = self.acked
            self._wake_at = wake_at
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await asyncio.wait_for(self._waiter, timeout)
            except TimeoutError:
                if self.acked == before:
                    raise
            finally:
                self._waiter = None


async def publish_qos1(
    host: str,
    port: int,
    *,
    username: str | None,
    password: str | None,
    topic: str,
    payloads: Iterable[bytes],
    window: int = 1000,
    client_id: str | None = None,
    timeout: float = 30.0,
) -> PublishResult:
    """Publish every payload to ``topic`` with QoS 1 over one connection; return once all are acked.

    Keeps up to ``window`` messages unacknowledged (packet ids 1..65535, reused once acked).
    ``timeout`` bounds the TCP connect, the wait for CONNACK and any stretch without a PUBACK.
    Raises ``AuthError`` if the CONNACK refuses us, ``BrokerUnavailable`` if nothing listens, and
    ``PublishIncomplete`` (a ``BrokerUnavailable`` carrying the partial ``result``) if the broker
    drops the connection or stops acknowledging.
    """
    if not 1 <= window <= 65535:
        raise InvalidInput(f"window {window!r} is out of range: use 1..65535 unacknowledged messages")
    if timeout <= 0:
        raise InvalidInput(f"timeout {timeout!r} must be positive seconds")
    topic_b = topic.encode()
    if not topic_b or b"+" in topic_b or b"#" in topic_b:
        raise InvalidInput(f"topic {topic!r} cannot be published to: give a topic without wildcards")
    topic_part = struct.pack("!H", len(topic_b)) + topic_b
    overhead = len(topic_part) + 2  # topic + packet id
    client_id = client_id or f"iot2ml-loadgen-{uuid.uuid4().hex[:12]}"
    keepalive = min(65535, max(60, int(timeout * 2) + 1))

    loop = asyncio.get_running_loop()
    start = time.monotonic()
    try:
        transport, proto = await asyncio.wait_for(loop.create_connection(_Protocol, host, port), timeout)
    except (OSError, TimeoutError) as err:
        raise BrokerUnavailable(
            f"no MQTT broker answered at {host}:{port} ({err or 'timed out'}): start it or pass the right host/port"
        ) from err

    sent = 0

    def result() -> PublishResult:
        return PublishResult(sent, proto.acked, proto.last_ack - start if proto.acked else 0.0, rc)

    rc = -1
    try:
        transport.write(_connect_packet(client_id, username, password, keepalive))
        try:
            rc = await asyncio.wait_for(proto.connack, timeout)
        except (OSError, TimeoutError) as err:
            raise BrokerUnavailable(
                f"MQTT broker at {host}:{port} sent no CONNACK within {timeout}s ({err or 'timed out'}): "
                "is it an MQTT port?"
            ) from err
        if rc != 0:
            meaning = _CONNACK_MEANING.get(rc, "unknown code")
            raise AuthError(
                f"MQTT broker at {host}:{port} refused username {username!r}: CONNACK return code {rc} "
                f"({meaning}): check the device id and token, or wait for the broker to load a new device"
            )

        inflight = proto.inflight
        headers: dict[int, bytes] = {}
        pid = 0
        it = iter(payloads)
        refill = max(1, min(_CHUNK, window // 4))
        while True:
            if not proto.ready(window - 1):
                await proto.wait(window - refill, timeout)
            if proto.lost is not None:
                raise ConnectionResetError(str(proto.lost))
            batch = list(itertools.islice(it, min(_CHUNK, window - proto.n_inflight)))
            if not batch:
                break
            parts: list[bytes] = []
            append = parts.append
            for payload in batch:
                if isinstance(payload, str):
                    payload = payload.encode()
                size = overhead + len(payload)
                head = headers.get(size)
                if head is None:
                    if size > _MAX_REMAINING:
                        raise InvalidInput(f"payload of {len(payload)} bytes is larger than MQTT allows")
                    head = headers[size] = b"\x32" + _varint(size)
                pid = pid % 65535 + 1
                while inflight[pid]:
                    pid = pid % 65535 + 1
                inflight[pid] = 1
                append(head)
                append(topic_part)
                append(pid.to_bytes(2, "big"))
                append(payload)
            proto.n_inflight += len(batch)
            transport.write(b"".join(parts))
            sent += len(batch)
            if proto.ready(window - 1):
                await asyncio.sleep(0)  # let PUBACKs in
        await proto.wait(0, timeout)
        if proto.lost is not None and proto.n_inflight:
            raise ConnectionResetError(str(proto.lost))
        transport.write(b"\xe0\x00")  # DISCONNECT
        return result()
    except TimeoutError:
        res = result()
        raise PublishIncomplete(
            f"MQTT broker at {host}:{port} sent no PUBACK for {timeout}s: {res.acked} of {res.sent} sent "
            "messages acknowledged; raise timeout or check the broker",
            res,
        ) from None
    except ConnectionError as err:
        res = result()
        raise PublishIncomplete(
            f"MQTT broker at {host}:{port} closed the connection ({err}): {res.acked} of {res.sent} sent "
            "messages acknowledged; see the broker log (permissions, payload size)",
            res,
        ) from None
    finally:
        transport.close()


def publish_qos1_sync(
    host: str,
    port: int,
    *,
    username: str | None,
    password: str | None,
    topic: str,
    payloads: Iterable[bytes],
    window: int = 1000,
    client_id: str | None = None,
    timeout: float = 30.0,
) -> PublishResult:
    """``publish_qos1`` for code without an event loop (runs its own with ``asyncio.run``)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        pass
    else:
        raise RuntimeError("publish_qos1_sync was called inside a running event loop: use 'await publish_qos1(...)'")
    return asyncio.run(
        publish_qos1(
            host, port, username=username, password=password, topic=topic, payloads=payloads,
            window=window, client_id=client_id, timeout=timeout,
        )
    )
