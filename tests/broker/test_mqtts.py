"""MQTT over TLS with device certificates (real nats-server, its verify_and_map, real paho over TLS),
provisioning by claim with a CSR, revocation that drops a connected device; SQLite and PostgreSQL."""

import json
import ssl
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from test_broker_auth import connect as connect_plain
from test_broker_auth import stream_messages

from iot2ml.core.config import load_settings


class Tls:
    """A paho client over TLS with a client certificate; records CONNACKs and disconnects."""

    def __init__(self, port: int, ca: str, cert: str, key: str, folder: Path, client_id: str) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "ca.pem").write_text(ca)
        (folder / "cert.pem").write_text(cert)
        (folder / "key.pem").write_text(key)
        self.events: list[tuple[str, int]] = []
        self.messages: list[tuple[str, bytes]] = []
        self.connected = threading.Event()
        self.answered = threading.Event()
        self.c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv311)
        self.c.tls_set(ca_certs=str(folder / "ca.pem"), certfile=str(folder / "cert.pem"),
                       keyfile=str(folder / "key.pem"))
        self.c.on_connect = self._on_connect
        self.c.on_disconnect = lambda _c, _u, _f, rc, _p: self.events.append(("disconnect", rc.value))
        self.c.on_message = lambda _c, _u, m: self.messages.append((m.topic, m.payload))
        self.port = port

    def _on_connect(self, _c, _u, _f, reason, _p) -> None:
        self.events.append(("connack", reason.value))
        self.answered.set()
        if reason.value == 0:
            self.connected.set()

    def start(self) -> "Tls":
        try:
            self.c.connect("127.0.0.1", self.port)
        except (ssl.SSLError, OSError) as err:
            self.events.append(("tls-error", str(err)))  # type: ignore[arg-type]
            self.answered.set()
            return self
        self.c.loop_start()
        return self

    def stop(self) -> None:
        self.c.loop_stop()
        self.c.disconnect()


def _csr(device_id: str) -> tuple[str, str]:
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, device_id)]))
           .sign(key, hashes.SHA256()))
    return (csr.public_bytes(serialization.Encoding.PEM).decode(),
            key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption()).decode())


def _wait(predicate, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


def _check(broker, tmp_path: Path) -> None:
    certs = broker.service.certs
    port = broker.service.door_ports.mqtt_port

    # A device certificate: it connects, publishes on its own topic only, and lands in the stream.
    pump9 = certs.issue_device("pump-9", "pump")
    assert set(pump9) == {"device_id", "serial", "cert", "key", "ca"} and "PRIVATE KEY" in pump9["key"]
    broker.service.apply_now()
    dev = Tls(port, pump9["ca"], pump9["cert"], pump9["key"], tmp_path / "pump9", "pump-9").start()
    assert dev.connected.wait(10), dev.events
    for topic in ("devices/pump-9/telemetry", "devices/pump-8/telemetry"):  # the second is not its own
        info = dev.c.publish(topic, json.dumps({"pressure": 2.5}).encode(), qos=1)
        info.wait_for_publish(10)
    assert _wait(lambda: len(stream_messages(broker.url)) >= 1)
    time.sleep(0.3)
    assert stream_messages(broker.url) == [("devices.pump-9.telemetry", b'{"pressure": 2.5}')]

    # A certificate from another CA is refused at the handshake.
    other = trustme.CA().issue_cert("pump-9", common_name="pump-9")
    stranger = Tls(port, pump9["ca"], other.cert_chain_pems[0].bytes().decode(),
                   other.private_key_pem.bytes().decode(), tmp_path / "stranger", "stranger").start()
    assert not stranger.connected.wait(2.0), stranger.events
    stranger.stop()

    # Provisioning by claim: the claim may only use its provisioning topics.
    claim = certs.add_claim("pumps", "pump")
    assert set(claim) >= {"claim_cert", "claim_key", "ca"}
    broker.service.apply_now()
    holder = Tls(port, claim["ca"], claim["claim_cert"], claim["claim_key"], tmp_path / "claim", "new-pump").start()
    assert holder.connected.wait(10), holder.events
    holder.c.subscribe("provision/pumps/+/response", qos=1)
    time.sleep(0.5)
    holder.c.publish("devices/pump-9/telemetry", b'{"pressure": 99}', qos=1).wait_for_publish(10)  # not allowed
    holder.c.publish("provision/pumps/pump-9/request", json.dumps({"csr": _csr("pump-9")[0]}).encode(), qos=1)
    holder.c.publish("provision/pumps/pump-x/request", b'{"csr": "not a csr"}', qos=1)
    csr, key = _csr("pump-10")
    holder.c.publish("provision/pumps/pump-10/request", json.dumps({"csr": csr}).encode(), qos=1)
    assert _wait(lambda: len(holder.messages) >= 3), holder.messages
    answers = {topic: json.loads(body) for topic, body in holder.messages}
    assert "exists" in answers["provision/pumps/pump-9/response"]["error"]
    assert "csr" in answers["provision/pumps/pump-x/response"]["error"]
    issued = answers["provision/pumps/pump-10/response"]
    assert set(issued) == {"device_id", "cert", "ca"} and issued["device_id"] == "pump-10"
    assert "PRIVATE" not in json.dumps(issued)  # the key never left the device
    holder.stop()
    assert broker.service.devices.get_device("pump-10").type == "pump"

    # The new device reconnects with its own certificate, at once, and publishes as any device.
    new = Tls(port, issued["ca"], issued["cert"], key, tmp_path / "pump10", "pump-10").start()
    assert new.connected.wait(10), new.events
    new.c.publish("devices/pump-10/telemetry", b'{"pressure": 1.5}', qos=1).wait_for_publish(10)
    assert _wait(lambda: ("devices.pump-10.telemetry", b'{"pressure": 1.5}') in stream_messages(broker.url))
    assert ("devices.pump-9.telemetry", b'{"pressure": 99}') not in stream_messages(broker.url)

    # Revoking the device drops the connected one and refuses the next connection.
    broker.service.devices.remove_device("pump-10")
    broker.service.apply_now()
    assert _wait(lambda: ("disconnect", 0) in new.events or any(e[0] == "disconnect" for e in new.events)), new.events
    new.stop()
    again = Tls(port, issued["ca"], issued["cert"], key, tmp_path / "pump10b", "pump-10").start()
    time.sleep(1.5)
    assert not again.connected.is_set(), again.events
    again.stop()

    # Revoking one certificate: the device's new certificate works, the old one does not.
    rotated = certs.issue_device("pump-9", "pump", rotate=True)
    broker.service.apply_now()
    assert _wait(lambda: any(e[0] == "disconnect" for e in dev.events)), dev.events
    dev.stop()
    old = Tls(port, pump9["ca"], pump9["cert"], pump9["key"], tmp_path / "old", "pump-9").start()
    fresh = Tls(port, rotated["ca"], rotated["cert"], rotated["key"], tmp_path / "fresh", "pump-9b").start()
    assert fresh.connected.wait(10), fresh.events
    time.sleep(1.0)
    assert not old.connected.is_set(), old.events
    old.stop()

    # A new CA: certificates it signs get in, and those of the old one still do until they end.
    certs.ca.rotate()
    pump11 = certs.issue_device("pump-11", "pump")
    broker.service.apply_now()
    after = Tls(port, pump11["ca"], pump11["cert"], pump11["key"], tmp_path / "pump11", "pump-11").start()
    assert after.connected.wait(10), after.events
    assert fresh.connected.is_set()
    still = Tls(port, pump11["ca"], rotated["cert"], rotated["key"], tmp_path / "still", "pump-9c").start()
    assert still.connected.wait(10), still.events
    for client in (after, still, fresh):
        client.stop()


def test_mqtts_certificates_and_provisioning_sqlite(tmp_path, make_broker):
    settings = load_settings(data_dir=tmp_path / "data", nats_port=0, mqtt_port=0, mqtts_port=0)
    _check(make_broker(settings), tmp_path)


def test_certificates_and_claims_on_postgresql(tmp_path, postgres_url):
    """The catalog side of the above on PostgreSQL: what the broker is told, provisioning, revocation."""
    from iot2ml.auth.ca import CertificateAuthority
    from iot2ml.auth.certs import Certificates
    from iot2ml.broker.provisioning import answer
    from iot2ml.core.catalog import Catalog

    catalog = Catalog(postgres_url)
    certs = Certificates(catalog, CertificateAuthority(tmp_path / "ca"))
    first = certs.issue_device("pump-9", "pump")
    certs.add_claim("pumps", "pump")
    reply, body = answer(certs, "provision.pumps.pump-10.request", json.dumps({"csr": _csr("pump-10")[0]}).encode())
    assert reply == "provision.pumps.pump-10.response" and body["device_id"] == "pump-10", body
    users = {i.user: i for i in certs.broker_identities()}
    assert len(users) == 3
    assert users[f"SERIALNUMBER={first['serial']},OU=device,CN=pump-9"].publish == ("devices.pump-9.>",)
    claim_user = next(i for u, i in users.items() if "OU=claim" in u)
    assert claim_user.publish == ("provision.pumps.*.request",) and claim_user.subscribe == ("provision.pumps.*.response",)
    second = certs.issue_device("pump-9", "pump", rotate=True)
    certs.devices.remove_device("pump-10")
    certs.remove_claim("pumps")
    assert [i.user for i in certs.broker_identities()] == [f"SERIALNUMBER={second['serial']},OU=device,CN=pump-9"]
    catalog.close()


def test_plain_mqtt_can_be_turned_off_and_tokens_still_work_beside_tls(tmp_path, make_broker):
    on = make_broker(load_settings(data_dir=tmp_path / "on", nats_port=0, mqtt_port=0, mqtts_port=0))
    token = on.service.devices.add_device("pump-7", "pump")
    on.wait_reload()
    rc, c = connect_plain(on.mqtt_port, "pump-7", token)
    assert rc == 0
    c.loop_stop()
    c.disconnect()
    off = make_broker(load_settings(data_dir=tmp_path / "off", nats_port=0, mqtt_port=0, mqtts_port=0,
                                    plain_mqtt=False))
    assert off.service.ports.mqtt_port is None
    assert "mqtt {" not in off.service.nats.config_path.read_text().split("leafnodes")[0]
    assert off.service.door_ports.mqtt_port


@pytest.mark.parametrize("bad", ["", "nothing", "{\"csr\": 5}"])
def test_provisioning_answers_bad_requests_with_a_reason(tmp_path, bad):
    from iot2ml.auth.ca import CertificateAuthority
    from iot2ml.auth.certs import Certificates
    from iot2ml.broker.provisioning import answer
    from iot2ml.core.catalog import Catalog

    catalog = Catalog(f"sqlite:///{tmp_path / 'c.db'}")
    certs = Certificates(catalog, CertificateAuthority(tmp_path / "ca"))
    certs.add_claim("pumps", "pump")
    reply, body = answer(certs, "provision.pumps.pump-1.request", bad.encode())
    assert reply == "provision.pumps.pump-1.response" and "csr" in body["error"]
    _, body = answer(certs, "provision.nope.pump-1.request", json.dumps({"csr": _csr("x")[0]}).encode())
    assert "no active claim" in body["error"]
    certs.remove_claim("pumps")
    _, body = answer(certs, "provision.pumps.pump-1.request", json.dumps({"csr": _csr("x")[0]}).encode())
    assert "no active claim" in body["error"]
    catalog.close()
