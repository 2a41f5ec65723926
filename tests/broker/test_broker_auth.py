"""The embedded broker enforces device identity from the catalog (real nats-server, real MQTT)."""

import asyncio
import threading

import paho.mqtt.client as mqtt
import pytest

from iot2ml.auth.store import Devices
from iot2ml.core.catalog import Catalog
from iot2ml.core.config import load_settings
from iot2ml.core.transport import STREAM


def connect(port: int, user: str, password: str) -> tuple[int, mqtt.Client]:
    """CONNECT and return (CONNACK code, client)."""
    done = threading.Event()
    result = {}

    def on_connect(_c, _u, _f, reason, _p):
        # paho reports MQTT 3.1.1 CONNACK code 5 as reason 135 "Not authorized"
        result["rc"] = 5 if reason.value == 135 else reason.value
        done.set()

    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv311)
    c.username_pw_set(user, password)
    c.on_connect = on_connect
    c.connect("127.0.0.1", port)
    c.loop_start()
    assert done.wait(10), "no CONNACK"
    return result["rc"], c


def publish(c: mqtt.Client, topic: str, payload: bytes) -> None:
    info = c.publish(topic, payload, qos=1)
    info.wait_for_publish(10)
    assert info.is_published()


def stream_messages(url: str) -> list[tuple[str, bytes]]:
    async def read():
        import nats

        nc = await nats.connect(url)
        js = nc.jetstream()
        info = await js.stream_info(STREAM)
        out = []
        for seq in range(info.state.first_seq, info.state.last_seq + 1):
            if info.state.messages == 0:
                break
            msg = await js.get_msg(STREAM, seq)
            out.append((msg.subject, msg.data))
        await nc.close()
        return out

    return asyncio.run(read())


def _check_identity(broker, devices: Devices) -> None:
    tok7 = devices.add_device("pump-7", "pump")
    devices.add_device("pump-8", "pump")
    broker.service.poke()
    broker.wait_reload()

    rc, _ = connect(broker.mqtt_port, "pump-7", "not-the-token")
    assert rc == 5  # CONNACK: not authorised
    rc, _ = connect(broker.mqtt_port, "pump-8", tok7)  # someone else's token
    assert rc == 5

    rc, c = connect(broker.mqtt_port, "pump-7", tok7)
    assert rc == 0
    publish(c, "devices/pump-7/telemetry", b'{"pressure": 1}')
    publish(c, "devices/pump-8/telemetry", b'{"spoofed": 1}')  # PUBACKed, but must not be stored
    c.loop_stop()
    c.disconnect()
    stored = stream_messages(broker.url)
    assert stored == [("devices.pump-7.telemetry", b'{"pressure": 1}')]

    # Revoke without restarting: the token stops working.
    devices.remove_device("pump-7")
    broker.service.poke()
    broker.wait_reload()
    rc, _ = connect(broker.mqtt_port, "pump-7", tok7)
    assert rc == 5
    # Add without restarting: the new device gets in.
    tok9 = devices.add_device("pump-9", "pump")
    broker.wait_reload()  # no poke: the broker notices by polling
    rc, c = connect(broker.mqtt_port, "pump-9", tok9)
    assert rc == 0
    c.loop_stop()
    c.disconnect()


def test_broker_enforces_catalog_identity_sqlite(broker, settings):
    _check_identity(broker, broker.service.devices)


def test_broker_enforces_catalog_identity_postgresql(tmp_path, postgres_url, make_broker):
    settings = load_settings(data_dir=tmp_path / "pg", nats_port=0, mqtt_port=0, catalog_url=postgres_url)
    _check_identity(make_broker(settings), Devices(Catalog(postgres_url)))


def test_busy_port_names_the_flag(settings):
    import socket

    from iot2ml.broker.service import BrokerService
    from iot2ml.core.errors import PortInUse

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(PortInUse, match=f"port {port} is already in use: pass --mqtt-port"):
            BrokerService(settings.model_copy(update={"mqtt_port": port}), Devices(Catalog(settings.catalog)))


def test_a_port_taken_between_the_check_and_the_start_is_named_or_replaced(settings):
    """Another program binds a port after it was checked free: the internal monitoring port is
    replaced and the broker starts; a user's port fails with the flag to change (nats-server's own
    reason shown, not only 'exited with code 1')."""
    import socket
    from dataclasses import replace

    from iot2ml.broker.service import BrokerService
    from iot2ml.core.errors import PortInUse

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        taken = s.getsockname()[1]
        service = BrokerService(settings, Devices(Catalog(settings.catalog)))
        service.ports = replace(service.ports, monitor_port=taken)
        try:
            service.start()
            assert service.nats.alive() and service.ports.monitor_port != taken
        finally:
            service.nats.stop()
        service = BrokerService(settings, Devices(Catalog(settings.catalog)))
        service.ports = replace(service.ports, mqtt_port=taken)
        try:
            with pytest.raises(PortInUse, match=f"port {taken} is already in use: pass --mqtt-port"):
                service.start()
        finally:
            service.nats.stop()
