"""Fixtures for the simulator tests: the real Mosquitto broker on 127.0.0.1:1883."""

from __future__ import annotations

import socket
import threading
import time
import uuid
from typing import Iterator

import pytest

MOSQUITTO = ("127.0.0.1", 1883)


@pytest.fixture(scope="session")
def mosquitto() -> tuple[str, int]:
    """``(host, port)`` of the Mosquitto broker (anonymous, no password check); skip if it is not up."""
    try:
        socket.create_connection(MOSQUITTO, timeout=2).close()
    except OSError as err:
        pytest.skip(f"Mosquitto is not reachable on {MOSQUITTO[0]}:{MOSQUITTO[1]} ({err}): "
                    "start it with 'mosquitto -d' to run the MQTT tests")
    return MOSQUITTO


class Subscriber:
    """A paho MQTT v5 subscriber that records every payload it gets (v5 so that Mosquitto keeps all
    QoS 1 messages in flight to us instead of dropping past its 1000-message queue)."""

    def __init__(self, host: str, port: int, topics: list[str]) -> None:
        import paho.mqtt.client as mqtt

        self.messages: list[tuple[str, bytes]] = []
        self._lock = threading.Lock()
        self._subscribed = threading.Event()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"sub-{uuid.uuid4().hex[:10]}",
                                  protocol=mqtt.MQTTv5)
        self.client.on_message = self._on_message
        self.client.on_subscribe = lambda *a: self._subscribed.set()
        self.client.connect(host, port, keepalive=30)
        self.client.loop_start()
        self.client.subscribe([(t, mqtt.SubscribeOptions(qos=1)) for t in topics])
        assert self._subscribed.wait(10), "the subscription was never acknowledged"

    def _on_message(self, client, userdata, msg) -> None:  # noqa: ANN001
        with self._lock:
            self.messages.append((msg.topic, msg.payload))

    def wait_for(self, count: int, timeout: float) -> list[tuple[str, bytes]]:
        """Messages once ``count`` arrived (or ``timeout`` passed), plus a short wait for extras."""
        deadline = time.monotonic() + timeout
        while len(self.messages) < count and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)
        with self._lock:
            return list(self.messages)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def subscribe(mosquitto: tuple[str, int]) -> Iterator:
    subs: list[Subscriber] = []

    def make(*topics: str) -> Subscriber:
        sub = Subscriber(*mosquitto, list(topics))
        subs.append(sub)
        return sub

    yield make
    for sub in subs:
        sub.close()
