"""Fixtures for the simulator tests: the real Mosquitto on 127.0.0.1:1883, or one of our own."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import threading
import time
import uuid
from typing import Iterator

import pytest

@pytest.fixture(scope="session")
def mosquitto(tmp_path_factory) -> Iterator[tuple[str, int]]:
    """``(host, port)`` of a Mosquitto of our own for the session (anonymous, no caps on queues)."""
    if shutil.which("mosquitto") is None:
        pytest.fail("the mosquitto binary is not installed: apt-get install mosquitto")
    broker = PrivateMosquitto(tmp_path_factory.mktemp("mosquitto-session"), None)
    broker.start()
    yield broker.host, broker.port
    broker.stop()


class Subscriber:
    """A paho subscriber that records every message it gets.

    QoS 0 by default, on purpose: Mosquitto (max_inflight_messages 20, max_queued_messages 1000)
    silently drops QoS 1 deliveries to a subscriber slower than the publisher — paho takes ~17k msg/s,
    the load generator sends ~100k — while QoS 0 deliveries to a connected client are written to its
    socket straight away. What the tests check is what the broker accepted, not the broker's fan-out.
    """

    def __init__(self, host: str, port: int, topics: list[str], *, qos: int = 0) -> None:
        import paho.mqtt.client as mqtt

        self.messages: list[tuple[str, bytes]] = []
        self._lock = threading.Lock()
        self._subscribed = threading.Event()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"sub-{uuid.uuid4().hex[:10]}",
                                  protocol=mqtt.MQTTv311)
        self.client.on_message = self._on_message
        self.client.on_subscribe = lambda *a: self._subscribed.set()
        self.client.connect(host, port, keepalive=30)
        self.client.loop_start()
        self.client.subscribe([(t, qos) for t in topics])
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

    def make(*topics: str, qos: int = 0) -> Subscriber:
        sub = Subscriber(*mosquitto, list(topics), qos=qos)
        subs.append(sub)
        return sub

    yield make
    for sub in subs:
        sub.close()


class PrivateMosquitto:
    """A Mosquitto of our own on a free port, to stop and restart, or to check passwords."""

    def __init__(self, directory, users: dict[str, str] | None) -> None:  # noqa: ANN001
        from iot2ml.core.runtime import free_port

        self.host, self.port = "127.0.0.1", free_port()
        self.conf = directory / "mosquitto.conf"
        # No queue or in-flight caps: a slow QoS 1 subscriber gets every message (the defaults,
        # 1,000 queued and 20 in flight, drop messages for it under load).
        lines = [f"listener {self.port} {self.host}", "persistence false", "log_dest stderr",
                 "max_queued_messages 0", "max_inflight_messages 0"]
        if os.geteuid() == 0:
            lines.append("user root")  # else it drops to 'mosquitto', who cannot read pytest's 0700 tmp dirs
        if users is None:
            lines.append("allow_anonymous true")
        else:
            pw = directory / "passwd"
            pw.write_text("")
            for user, password in users.items():
                subprocess.run(["mosquitto_passwd", "-b", str(pw), user, password], check=True, timeout=10)
            lines += ["allow_anonymous false", f"password_file {pw}"]
        self.conf.write_text("\n".join(lines) + "\n")
        self.log = directory / "mosquitto.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(["mosquitto", "-c", str(self.conf)], stdout=log, stderr=log)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection((self.host, self.port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"mosquitto did not start on port {self.port}: see {self.log}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None


@pytest.fixture
def private_mosquitto(tmp_path_factory) -> Iterator:
    """``make(users=None)``: start a Mosquitto of our own (``users`` = required passwords)."""
    if shutil.which("mosquitto") is None or shutil.which("mosquitto_passwd") is None:
        pytest.skip("the mosquitto binaries are not installed: apt-get install mosquitto")
    brokers: list[PrivateMosquitto] = []

    def make(users: dict[str, str] | None = None) -> PrivateMosquitto:
        broker = PrivateMosquitto(tmp_path_factory.mktemp("mosquitto"), users)
        brokers.append(broker)
        broker.start()
        return broker

    yield make
    for broker in brokers:
        broker.stop()


@pytest.fixture
def subscriber_class() -> type:
    """The ``Subscriber`` helper, for tests that subscribe to a broker of their own."""
    return Subscriber
