"""Shared fixtures: settings on a temp data dir, a real embedded broker on free ports."""

from __future__ import annotations

import os
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from iot2ml.core.config import Settings, load_settings

POSTGRES_URL = os.environ.get("IOT2ML_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/postgres")


@pytest.fixture(autouse=True)
def _isolated_config(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests never read a developer's own iot2ml.toml or IOT2ML_* variables."""
    for key in list(os.environ):
        if key.startswith("IOT2ML_") and key != "IOT2ML_TEST_POSTGRES":
            monkeypatch.delenv(key)
    monkeypatch.setenv("IOT2ML_CONFIG", os.devnull)


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return load_settings(data_dir=tmp_path / "data", nats_port=0, mqtt_port=0, http_port=0, flush_interval=0.2)


def _postgres_db() -> str | None:
    """A fresh PostgreSQL database for one test, or None if no server answers."""
    try:
        import psycopg
    except ImportError:
        return None
    name = "iot2ml_test_" + uuid.uuid4().hex[:10]
    try:
        with psycopg.connect(POSTGRES_URL, autocommit=True, connect_timeout=3) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
    except psycopg.Error:
        return None
    return POSTGRES_URL.rsplit("/", 1)[0] + "/" + name


def _drop_postgres_db(url: str) -> None:
    import psycopg

    name = url.rsplit("/", 1)[1]
    with psycopg.connect(POSTGRES_URL, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A fresh database on the machine's PostgreSQL (fails in CI if there is none)."""
    url = _postgres_db()
    if url is None:
        if os.environ.get("CI"):
            pytest.fail(f"PostgreSQL at {POSTGRES_URL} is not reachable (set IOT2ML_TEST_POSTGRES)")
        pytest.skip(f"PostgreSQL at {POSTGRES_URL} is not reachable")
    yield url
    _drop_postgres_db(url)


@pytest.fixture(params=["sqlite", "postgresql"])
def catalog_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """Each catalog test runs on SQLite and on the machine's PostgreSQL."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'catalog.db'}"
    else:
        yield request.getfixturevalue("postgres_url")


class RunningBroker:
    """The embedded broker run in-process (the nats-server child is real)."""

    def __init__(self, settings: Settings) -> None:
        from iot2ml.broker.service import BrokerService

        self.service = BrokerService(settings)
        self.service.start()
        self.thread = threading.Thread(target=self.service.watch, kwargs={"poll": 0.2}, daemon=True)
        self.thread.start()

    @property
    def mqtt_port(self) -> int:
        return self.service.ports.mqtt_port

    @property
    def url(self) -> str:
        return self.service.url

    def wait_reload(self) -> None:
        """Wait until the broker has applied the catalog's latest version."""
        deadline = time.monotonic() + 5
        while self.service.catalog.version() != self.service._seen_version and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)  # nats-server applies SIGHUP asynchronously

    def close(self) -> None:
        self.service.stop()
        self.thread.join(5)
        self.service.close()


@pytest.fixture
def make_broker() -> Iterator:
    """Factory of in-process brokers, all closed at the end of the test."""
    started: list[RunningBroker] = []

    def make(settings: Settings) -> RunningBroker:
        started.append(RunningBroker(settings))
        return started[-1]

    yield make
    for running in started:
        running.close()


@pytest.fixture
def broker(settings: Settings, make_broker) -> RunningBroker:
    return make_broker(settings)


@pytest.fixture
def external_mosquitto(tmp_path: Path) -> Iterator[tuple[str, int]]:
    """A real Mosquitto of our own on a free port, as a user's external broker (anonymous)."""
    import shutil
    import socket
    import subprocess

    from iot2ml.core.runtime import free_port

    if shutil.which("mosquitto") is None:
        pytest.fail("the mosquitto binary is not installed: apt-get install mosquitto")
    port = free_port()
    conf = tmp_path / "mosquitto.conf"
    lines = [f"listener {port} 127.0.0.1", "allow_anonymous true", "persistence false", "log_dest stderr"]
    if os.geteuid() == 0:
        lines.append("user root")
    conf.write_text("\n".join(lines) + "\n")
    log = open(tmp_path / "mosquitto.log", "wb")
    proc = subprocess.Popen(["mosquitto", "-c", str(conf)], stdout=log, stderr=log)
    deadline = time.monotonic() + 10
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if time.monotonic() > deadline:
                proc.kill()
                raise
            time.sleep(0.05)
    yield "127.0.0.1", port
    proc.terminate()
    proc.wait(5)
