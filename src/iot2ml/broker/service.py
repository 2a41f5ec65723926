"""``iot2ml broker``: run the embedded NATS server, keep its users in step with the device registry
(handed in: ``auth.store.Devices`` over the catalog), create the telemetry stream, restart the server if it dies."""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from ..core.config import Settings
from ..core.devices import CertificateDirectory, DeviceDirectory
from ..core.errors import BrokerUnavailable, PortInUse
from ..core.runtime import claim_port, clear_run_info, free_port, secret, write_run_info
from ..core.transport import STREAM, TELEMETRY_SUBJECT, service_url
from .nats import BrokerPorts, Door, EmbeddedNats, render_config, render_door_config
from .provisioning import Provisioner

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
    """The embedded broker whose users are the active ``devices``. ``start()``, then ``watch()`` until stopped.

    With TLS on (``settings.tls_on``) and ``certs`` given, a second nats-server, the TLS door, joins
    as a leaf node with MQTT over TLS for certificate holders (``tls_files`` = server certificate,
    its key, the CA bundle), and provisioning requests are answered."""

    def __init__(self, settings: Settings, devices: DeviceDirectory, *, fallback_ports: bool = False,
                 certs: CertificateDirectory | None = None,
                 tls_files: tuple[Path, Path, Path] | None = None) -> None:
        import bcrypt

        self.settings = settings
        self.devices = devices
        self.certs = certs
        host = settings.host
        plain = settings.plain_mqtt or not settings.tls_on
        self.ports = BrokerPorts(
            host=host,
            nats_port=claim_port(host, settings.nats_port, "--nats-port", fallback=fallback_ports),
            mqtt_port=claim_port(host, settings.mqtt_port, "--mqtt-port", fallback=fallback_ports) if plain else None,
            monitor_port=free_port(host),
        )
        password = secret(settings.data_dir, "service.password")
        self._service_hash = bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=4)).decode()
        self.nats = EmbeddedNats(settings.data_dir / "broker")
        self.door: Door | None = None
        self.door_nats: EmbeddedNats | None = None
        self.door_ports: BrokerPorts | None = None
        self.provisioner: Provisioner | None = None
        if settings.tls_on and certs is not None and tls_files is not None:
            self.door = Door(leaf_port=free_port("127.0.0.1"), password=secret(settings.data_dir, "door.password"),
                             cert_file=tls_files[0], key_file=tls_files[1], ca_file=tls_files[2])
            self.door_ports = BrokerPorts(
                host=host, nats_port=free_port("127.0.0.1"),
                mqtt_port=claim_port(host, int(settings.mqtts_port_in_force or 0), "--mqtts-port",
                                     fallback=fallback_ports),
                monitor_port=free_port("127.0.0.1"))
            self.door_nats = EmbeddedNats(settings.data_dir / "broker" / "tls")
        self._seen_version = -1
        self._render_lock = threading.Lock()
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
                door=self.door,
            )
        )
        if self.door_nats is not None and self.door is not None and self.door_ports is not None and self.certs:
            self.door_nats.write_config(render_door_config(
                ports=self.door_ports, door=self.door, identities=self.certs.broker_identities(),
                max_payload=self.settings.max_payload_bytes))

    def _start_door(self) -> None:
        if self.door_nats is not None and self.door_ports is not None:
            try:
                self.door_nats.start(self.door_ports)
            except BrokerUnavailable as exc:
                if "address already in use" in str(exc):
                    raise PortInUse({"--mqtts-port": self.door_ports.mqtt_port}) from exc
                raise

    def apply_now(self, *, wait: bool = True) -> None:
        """Render the configs from the catalog and make both servers load them; with ``wait``, return
        once the door says it loaded its config (provisioning answers only once the new device can
        connect)."""
        with self._render_lock:
            self._render()
            self.nats.reload()
            if self.door_nats is not None:
                self.door_nats.reload_and_wait() if wait else self.door_nats.reload()

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
        self._start_door()
        if self.door is not None and self.certs is not None:
            self.provisioner = Provisioner(self.url, self.certs, self.apply_now)
            self.provisioner.start()
        write_run_info(
            self.settings.data_dir,
            "broker",
            {
                "host": self.ports.host,
                "nats_port": self.ports.nats_port,
                "mqtt_port": self.ports.mqtt_port,
                "mqtts_port": None if self.door_ports is None else self.door_ports.mqtt_port,
                "ca_file": None if self.door is None else str(self.door.ca_file),
                "monitor_port": self.ports.monitor_port,
                "nats_url": f"nats://{self.ports.host}:{self.ports.nats_port}",
            },
        )
        log.info("broker ready: nats %s mqtt %s mqtts %s", self.ports.nats_port, self.ports.mqtt_port,
                 None if self.door_ports is None else self.door_ports.mqtt_port)

    def refresh(self) -> bool:
        """Re-render and reload if the catalog changed; True if it did."""
        if self.devices.version() == self._seen_version:
            return False
        self.apply_now(wait=False)
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
                if self.door_nats is not None and not self.door_nats.alive():
                    log.warning("the TLS door (nats-server) died: restarting")
                    with self._render_lock:
                        self._render()
                    self._start_door()
                failures = 0
            except (BrokerUnavailable, Exception) as err:  # noqa: BLE001 - keep supervising
                failures += 1
                log.error("broker upkeep failed (%s): %s", failures, err)
                time.sleep(min(5.0, 0.2 * failures))
            if on_tick:
                on_tick()

    def close(self) -> None:
        if self.provisioner is not None:
            self.provisioner.stop()
        if self.door_nats is not None:
            self.door_nats.stop()
        self.nats.stop()
        clear_run_info(self.settings.data_dir, "broker")


def run_broker(settings: Settings, devices: DeviceDirectory, *, fallback_ports: bool = False,
               certs: CertificateDirectory | None = None, tls_files: tuple[Path, Path, Path] | None = None) -> None:
    """Foreground ``iot2ml broker``: SIGTERM/SIGINT stop it, SIGHUP re-reads the devices."""
    service = BrokerService(settings, devices, fallback_ports=fallback_ports, certs=certs, tls_files=tls_files)
    signal.signal(signal.SIGTERM, lambda *_: service.stop())
    signal.signal(signal.SIGINT, lambda *_: service.stop())
    signal.signal(signal.SIGHUP, lambda *_: service.poke())
    try:
        service.start()
        service.watch()
    finally:
        service.close()
