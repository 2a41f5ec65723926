"""HTTP ingest: device tokens (401/403), clear 4xx reasons, 201 only once the broker stored it."""

from __future__ import annotations

import asyncio

import pytest
from fastapi.testclient import TestClient

from iot2ml.api import create_app
from iot2ml.auth.store import Devices, Keys
from iot2ml.core.catalog import Catalog
from iot2ml.core.transport import STREAM


def stream_count(url: str) -> int:
    async def go():
        import nats

        nc = await nats.connect(url)
        info = await nc.jetstream().stream_info(STREAM)
        await nc.close()
        return info.state.messages

    return asyncio.run(go())


@pytest.fixture
def client(settings, broker):
    settings = settings.model_copy(update={"max_payload_bytes": 2048})
    app = create_app(settings, nats_url=broker.url)
    with TestClient(app) as c:
        c.catalog = Catalog(settings.catalog)
        c.broker = broker
        yield c


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def test_accepts_object_and_array_with_201(client):
    token = Devices(client.catalog).add_device("pump-7", "pump")
    r = client.post("/api/v1/devices/pump-7/telemetry", headers=auth(token),
                    content=b'[{"ts": "2026-11-22T03:00:00Z", "pressure": 3.1}, {"pressure": 3.2}]')
    assert r.status_code == 201 and r.json() == {"accepted": 2}
    r = client.post("/api/v1/devices/pump-7/telemetry", headers=auth(token), json={"ts": 1763780000.5, "flow": 1})
    assert r.status_code == 201 and r.json() == {"accepted": 1}
    assert stream_count(client.broker.url) == 2


def test_tokens_are_checked(client):
    t7 = Devices(client.catalog).add_device("pump-7", "pump")
    Devices(client.catalog).add_device("pump-8", "pump")
    body = {"pressure": 1}
    r = client.post("/api/v1/devices/pump-7/telemetry", json=body)
    assert r.status_code == 401 and "missing device token" in r.json()["detail"]
    r = client.post("/api/v1/devices/pump-7/telemetry", json=body, headers=auth("wrong"))
    assert r.status_code == 401
    r = client.post("/api/v1/devices/pump-8/telemetry", json=body, headers=auth(t7))
    assert r.status_code == 403 and "belongs to device 'pump-7'" in r.json()["detail"]
    Devices(client.catalog).remove_device("pump-7")
    import time

    time.sleep(2.1)  # the guard caches a token for 2 s
    r = client.post("/api/v1/devices/pump-7/telemetry", json=body, headers=auth(t7))
    assert r.status_code == 401
    assert stream_count(client.broker.url) == 0


@pytest.mark.parametrize(
    ("body", "status", "words"),
    [
        (b"{not json", 400, "malformed JSON"),
        (b'{"pressure": NaN}', 400, "NaN"),
        (b'"hello"', 400, "payload is a string"),
        (b'[{"pressure": 1}, 5]', 400, "item 1 is a number"),
        (b'{"ts": "soon"}', 400, "is not RFC 3339"),
        (b'{"pressure": [1]}', 400, "field 'pressure' is an array"),
        (b'{"pad": "' + b"x" * 4096 + b'"}', 413, "max_payload_bytes=2048"),
    ],
)
def test_bad_bodies_get_4xx_with_reason_and_store_nothing(client, body, status, words):
    token = Devices(client.catalog).add_device("pump-7", "pump")
    r = client.post("/api/v1/devices/pump-7/telemetry", content=body, headers=auth(token))
    assert r.status_code == status
    assert words in r.text
    if status == 400:  # every reason, listed
        detail = r.json()["detail"]
        assert detail["error"] == "nothing was stored: fix these and resend"
        assert any(words in reason for reason in detail["reasons"]), detail
    assert stream_count(client.broker.url) == 0


def test_bad_device_id_in_path(client):
    r = client.post("/api/v1/devices/a.b/telemetry", json={"x": 1}, headers=auth("t"))
    assert r.status_code == 422 and "letters, digits" in r.json()["detail"]  # named before the token is checked


def test_idempotency_key_stores_a_resend_once(client):
    token = Devices(client.catalog).add_device("pump-7", "pump")
    for _ in range(3):
        r = client.post("/api/v1/devices/pump-7/telemetry", json={"pressure": 1},
                        headers={**auth(token), "Idempotency-Key": "abc"})
        assert r.status_code == 201
    assert stream_count(client.broker.url) == 1


def test_admin_endpoints_need_an_admin_key(client):
    reader = Keys(client.catalog).add_key("r", "reader")
    admin = Keys(client.catalog).add_key("a", "admin")
    assert client.post("/api/v1/devices", json={"device_id": "x1", "type": "pump"}).status_code == 401
    r = client.post("/api/v1/devices", json={"device_id": "x1", "type": "pump"}, headers=auth(reader))
    assert r.status_code == 403
    r = client.post("/api/v1/devices", json={"device_id": "x1", "type": "pump"}, headers=auth(admin))
    assert r.status_code == 201 and r.json()["token"]
    r = client.post("/api/v1/devices", json={"device_id": "x1", "type": "pump"}, headers=auth(admin))
    assert r.status_code == 409
    assert client.get("/api/v1/devices", headers=auth(admin)).json() == [
        {"device_id": "x1", "type": "pump", "active": True}
    ]
    assert client.get("/openapi.json").status_code == 200
