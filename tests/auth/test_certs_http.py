"""Certificates, claims and the CA over the HTTP API (real app, real catalog, real CA), and the
permissions on them: an operator issues device certificates and claims, only an admin rotates the CA."""

from __future__ import annotations

from cryptography import x509
from fastapi.testclient import TestClient

from iot2ml.auth.store import Keys
from iot2ml.core.catalog import Catalog


def test_certificates_claims_and_ca_over_http(settings):
    from iot2ml.api import create_app

    catalog = Catalog(settings.catalog)
    keys = Keys(catalog)
    operator = {"Authorization": f"Bearer {keys.add_key('ops', 'operator')}"}
    admin = {"Authorization": f"Bearer {keys.add_key('root', 'admin')}"}
    viewer = {"Authorization": f"Bearer {keys.add_key('look', 'viewer')}"}
    with TestClient(create_app(settings, catalog=catalog)) as client:
        r = client.post("/api/v1/devices", json={"device_id": "pump-3", "type": "pump", "cert": True}, headers=operator)
        assert r.status_code == 201, r.text
        body = r.json()
        assert {"device_id", "cert", "key", "ca"} <= set(body)
        cert = x509.load_pem_x509_certificate(body["cert"].encode())
        ca = x509.load_pem_x509_certificate(body["ca"].encode())
        assert cert.issuer == ca.subject
        assert body["serial"] in cert.subject.rfc4514_string() and "CN=pump-3" in cert.subject.rfc4514_string()
        again = client.post("/api/v1/devices", json={"device_id": "pump-3", "type": "pump", "cert": True},
                            headers=operator)
        assert again.status_code == 409 and "--rotate" in again.json()["detail"]

        assert client.get("/api/v1/devices/pump-3/certificates", headers=viewer).status_code == 403
        listed = client.get("/api/v1/devices/pump-3/certificates", headers=operator).json()
        assert [c["serial"] for c in listed if c["active"]] == [body["serial"]]
        assert client.delete(f"/api/v1/devices/pump-3/certificates/{body['serial']}", headers=viewer).status_code == 403
        assert client.delete(f"/api/v1/devices/pump-3/certificates/{body['serial']}", headers=operator).status_code == 204
        assert not client.get("/api/v1/devices/pump-3/certificates", headers=operator).json()[0]["active"]
        assert client.delete("/api/v1/devices/pump-3/certificates/abc", headers=operator).status_code == 404

        claim = client.post("/api/v1/provisioning/claims", json={"name": "pumps", "type": "pump"}, headers=operator)
        assert claim.status_code == 201 and {"claim_cert", "claim_key", "ca"} <= set(claim.json())
        assert client.get("/api/v1/provisioning/claims", headers=operator).json()[0]["name"] == "pumps"
        assert client.delete("/api/v1/provisioning/claims/pumps", headers=operator).status_code == 204
        assert client.delete("/api/v1/provisioning/claims/pumps", headers=operator).status_code == 404

        before = client.get("/api/v1/ca", headers=operator).json()
        assert "PRIVATE" not in str(before) and before["sha256"]
        assert client.post("/api/v1/ca/rotate", headers=operator).status_code == 403
        rotated = client.post("/api/v1/ca/rotate", headers=admin).json()
        assert rotated["sha256"] != before["sha256"] and rotated["previous"][0]["sha256"] == before["sha256"]
    catalog.close()
