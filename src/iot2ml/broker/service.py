"""``iot2ml broker``: run the embedded NATS server, keep its users in step with the device registry
(handed in: ``auth.store.Devices`` over the catalog), create the telemetry stream, restart the server if it dies."""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
import time
from dataclasses import replace
from typing import Callable

from ..core.config import Settings
from ..core.devices import DeviceDirectory
from ..core.errors import BrokerUnavailable, PortInUse
from ..core.runtime import claim_port, clear_run_info, free_port, secret, write_run_info
from ..core.transport import STREAM, TELEMETRY_SUBJECT, service_url
from .nats import BrokerPorts, EmbeddedNats, render_config

log = logging.getLogger("iot2ml.broker")

async def ensure_stream(url: str, settings: Settings) -> None:
    """Create (or update) the JetStream stream that buffers all telemetry durably."""
    import nats
    from nats.js.api import DiscardPolicy, RetentionPolicy, StorageType, StreamConfig

    nc = await nats.connect(url, connect_timeout=5, max_reconnect_attempts=3)
    try:
        js = nc.jetstream()
        config = StreamConfig(
            name=STREAM,
            subjects=[TELEMETRY_SUBJECT],
            retention=RetentionPolicy.LIMITS,
            storage=StorageType.FILE,
            discard=DiscardPolicy.OLD,
            max_bytes=settings.stream_max_bytes,
            max_age=settings.stream_max_age_hours * 3600,
            duplicate_window=120,
        )
        try:
            await js.stream_info(STREAM)
            await js.update_stream(config)
        except nats.js.errors.NotFoundError:
            await js.add_stream(config)
    finally:
        await nc.close()


class BrokerService:
    """The embedded broker whose users are the active ``devices``. ``start()``, then ``watch()`` until stopped."""

    def __init__(self, settings: Settings, devices: DeviceDirectory, *, fallback_ports: bool = False) -> None:
        import bcrypt

        self.settings = settings
        self.devices = devices
        host = settings.host
        self.ports = BrokerPorts(
            host=host,
            nats_port=claim_port(host, settings.nats_port, "--nats-port", fallback=fallback_ports),
            mqtt_port=claim_port(host, settings.mqtt_port, "--mqtt-port", fallback=fallback_ports),
            monitor_port=free_port(host),
        )
        password = secret(settings.data_dir, "service.password")
        self._service_hash = bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=4)).decode()
        self.nats = EmbeddedNats(settings.data_dir / "broker")
        self._seen_version = -1
        self._wake = threading.Event()
        self._stop = threading.Event()

    @property
    def url(self) -> str:
        return service_url(self.settings.data_dir, self.ports.host, self.ports.nats_port)

    def _render(self) -> None:
        self._seen_version = self.devices.version()
        self.nats.write_config(
            render_config(
                ports=self.ports,
                store_dir=(self.settings.data_dir / "broker" / "jetstream").absolute(),
                service_password_hash=self._service_hash,
                devices=self.devices.broker_users(),
                max_payload=self.settings.max_payload_bytes,
                max_store_bytes=self.settings.stream_max_bytes,
            )
        )

    def start(self) -> None:
        for attempt in range(3):
            self._render()
            try:
                self.nats.start(self.ports)
                break
            except BrokerUnavailable as exc:
                # A port we checked free was taken before nats-server bound it (another program won the race).
                if "address already in use" not in str(exc):
                    raise
                for flag, port in (("--nats-port", self.ports.nats_port), ("--mqtt-port", self.ports.mqtt_port)):
                    if f":{port}:" in str(exc) or f":{port} " in str(exc):
                        raise PortInUse({flag: port}) from exc
                if attempt == 2:
                    raise
                log.warning("broker monitoring port %s was taken while starting: trying another",
                            self.ports.monitor_port)
                self.ports = replace(self.ports, monitor_port=free_port(self.ports.host))
        asyncio.run(ensure_stream(self.url, self.settings))
        write_run_info(
            self.settings.data_dir,
            "broker",
            {
                "host": self.ports.host,
                "nats_port": self.ports.nats_port,
                "mqtt_port": self.ports.mqtt_port,
                "monitor_port": self.ports.monitor_port,
                "nats_url": f"nats://{self.ports.host}:{self.ports.nats_port}",
            },
        )
        log.info("broker ready: nats %s mqtt %s", self.ports.nats_port, self.ports.mqtt_port)

    def refresh(self) -> bool:
        """Re-render and reload if the catalog changed; True if it did."""
        if self.devices.version() == self._seen_version:
            return False
        self._render()
        self.nats.reload()
        log.info("catalog changed: broker users reloaded")
        return True

    def poke(self) -> None:
        """Check the catalog now (SIGHUP from ``iot2ml devices add``)."""
        self._wake.set()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()

    def watch(self, *, poll: float = 1.0, on_tick: Callable[[], None] | None = None) -> None:
        """Until ``stop()``: follow catalog changes and restart nats-server if it dies."""
        failures = 0
        while not self._stop.is_set():
            self._wake.wait(poll)
            self._wake.clear()
            if self._stop.is_set():
                break
            try:
                self.refresh()
                if not self.nats.alive():
                    log.warning("nats-server died: restarting")
                    self._render()
                    self.nats.start(self.ports)
                    asyncio.run(ensure_stream(self.url, self.settings))
                failures = 0
            except (BrokerUnavailable, Exception) as err:  # noqa: BLE001 - keep supervising
                failures += 1
                log.error("broker upkeep failed (%s): %s", failures, err)
                time.sleep(min(5.0, 0.2 * failures))
            if on_tick:
                on_tick()

    def close(self) -> None:
        self.nats.stop()
        clear_run_info(self.settings.data_dir, "broker")


def run_broker(settings: Settings, devices: DeviceDirectory, *, fallback_ports: bool = False) -> None:
    """Foreground ``iot2ml broker``: SIGTERM/SIGINT stop it, SIGHUP re-reads the devices."""
    service = BrokerService(settings, devices, fallback_ports=fallback_ports)
    signal.signal(signal.SIGTERM, lambda *_: service.stop())
    signal.signal(signal.SIGINT, lambda *_: service.stop())
    signal.signal(signal.SIGHUP, lambda *_: service.poke())
    try:
        service.start()
        service.watch()
    finally:
        service.close()
