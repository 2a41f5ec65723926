"""Ingest from an external MQTT broker (``--mqtt-url mqtt://host:port``), e.g. Mosquitto.

Like a Kafka Connect MQTT source (seed 004's gateway): subscribe to ``devices/+/telemetry`` with
QoS 1 on a persistent session, copy each message into the telemetry stream, and PUBACK it to the
external broker only once the stream has stored it. A crash before that means the external broker
sends it again; resends carrying the same ``msg_id`` are dropped by the ingest's duplicate filter.
The external broker is in charge of device logins there; devices must still be registered here
(``iot2ml devices add``) so their readings find their type, else they are dead-lettered.

Mosquitto drops QoS 1 messages for a subscriber whose queue is full (``max_queued_messages``,
default 1000) and keeps only ``max_inflight_messages`` (default 20) unacknowledged: for bursts
larger than that, raise both in the broker's config (0 = no limit for the queue).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Callable
from urllib.parse import urlparse

from ..core.config import Settings
from ..core.errors import ConfigError
from ..core.ids import check_device_id

log = logging.getLogger("iot2ml.bridge")

TOPIC_FILTER = "devices/+/telemetry"
_IN_FLIGHT = 512


def parse_mqtt_url(url: str) -> tuple[str, int, bool]:
    """``mqtt://host:port`` (or ``mqtts://``) -> (host, port, tls)."""
    parsed = urlparse(url)
    if parsed.scheme not in ("mqtt", "mqtts", "tcp", "ssl") or not parsed.hostname:
        raise ConfigError(f"mqtt_url {url!r} is not valid: use mqtt://host:1883 or mqtts://host:8883")
    tls = parsed.scheme in ("mqtts", "ssl")
    return parsed.hostname, parsed.port or (8883 if tls else 1883), tls


async def run_bridge(settings: Settings, nats_url: str | Callable[[], str], stop: asyncio.Event,
                     *, ready: asyncio.Event | None = None) -> None:
    """Copy ``devices/+/telemetry`` from ``settings.mqtt_url`` into the stream until ``stop``."""
    import nats
    import paho.mqtt.client as mqtt

    host, port, tls = parse_mqtt_url(settings.mqtt_url or "")
    nc = None
    while nc is None:
        try:
            url = nats_url() if callable(nats_url) else nats_url
            nc = await nats.connect(url, name="iot2ml-bridge", max_reconnect_attempts=-1, reconnect_time_wait=0.5)
        except Exception as err:  # noqa: BLE001 - broker not up yet: wait, unless asked to stop
            log.info("bridge waiting for the broker: %s", err)
            try:
                await asyncio.wait_for(stop.wait(), 1.0)
                return
            except asyncio.TimeoutError:
                pass
    js = nc.jetstream()
    loop = asyncio.get_running_loop()
    # Unbounded on purpose: we PUBACK only after the stream stored a message, so the external
    # broker's in-flight window (max_inflight_messages) bounds what can be queued here.
    queue: asyncio.Queue[tuple[int, str, bytes]] = asyncio.Queue()
    subscribed = asyncio.Event()

    client_id = "iot2ml-bridge-" + hashlib.sha256(str(settings.data_dir.absolute()).encode()).hexdigest()[:12]
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=False,
                         manual_ack=True)
    if settings.mqtt_username:
        client.username_pw_set(settings.mqtt_username, settings.mqtt_password)
    if tls:
        client.tls_set()
    client.max_inflight_messages_set(_IN_FLIGHT)
    client.max_queued_messages_set(0)

    def on_connect(c, _userdata, _flags, reason, _props):  # noqa: ANN001
        if reason.is_failure:
            log.error("external MQTT broker refused the bridge: %s", reason)
            return
        c.subscribe(TOPIC_FILTER, qos=1)
        loop.call_soon_threadsafe(subscribed.set)

    def on_message(_c, _userdata, msg):  # noqa: ANN001
        loop.call_soon_threadsafe(queue.put_nowait, (msg.mid, msg.topic, msg.payload))

    client.on_connect = on_connect
    client.on_message = on_message
    client.connect_async(host, port, keepalive=30)
    client.loop_start()

    async def forward(mid: int, topic: str, payload: bytes) -> None:
        parts = topic.split("/")
        try:
            device = check_device_id(parts[1])
        except Exception:  # noqa: BLE001 - unusable topic: nothing to store it under
            log.warning("dropping message on topic %r: the device id is not valid", topic)
            client.ack(mid, 1)
            return
        delay = 0.1
        while True:
            try:
                await js.publish(f"devices.{device}.telemetry", payload, timeout=5)
                break
            except Exception as err:  # noqa: BLE001 - keep the message until the stream has it
                log.warning("stream did not store a bridged message, retrying: %s", err)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
        client.ack(mid, 1)

    pending: set[asyncio.Task[None]] = set()
    try:
        await asyncio.wait_for(subscribed.wait(), 30)
        log.info("bridging %s from %s:%d", TOPIC_FILTER, host, port)
        if ready is not None:
            ready.set()
        while not stop.is_set():
            try:
                mid, topic, payload = await asyncio.wait_for(queue.get(), 0.5)
            except asyncio.TimeoutError:
                continue
            task = asyncio.create_task(forward(mid, topic, payload))
            pending.add(task)
            task.add_done_callback(pending.discard)
            if len(pending) >= _IN_FLIGHT:
                await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
        if pending:
            await asyncio.wait(pending, timeout=10)
    finally:
        client.loop_stop()
        client.disconnect()
        await nc.close()
