"""Logging in over HTTP: the token pair, rotation and reuse, logout, lockout, disabled users and
revoked keys stopping at once, and forged or stale JWTs refused (401) — on the real API app."""

from __future__ import annotations

import base64
import json
import time

import jwt
import pytest
from fastapi.testclient import TestClient

from iot2ml.auth.store import Keys
from iot2ml.auth.users import Users
from iot2ml.core.catalog import Catalog
from iot2ml.core.http import Credentials

PASSWORD = "correct horse battery"


@pytest.fixture
def api(settings):
    from iot2ml.api import create_app

    settings = settings.model_copy(update={"auth_max_failures": 3, "auth_lockout": 1.0,
                                           "auth_max_failures_per_address": 6})
    app = create_app(settings)
    with TestClient(app) as client:
        client.guard = app.state.provided[Credentials]
        client.users = client.guard.users
        client.catalog = Catalog(settings.catalog)
        client.users.add_user("alice", PASSWORD, "viewer")
        yield client


def login(client: TestClient, user: str = "alice", password: str = PASSWORD) -> dict:
    return client.post("/api/v1/auth/login", json={"username": user, "password": password})


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def tables(client: TestClient, token: str) -> int:
    return client.get("/api/v1/tables", headers=auth(token)).status_code


def test_login_answers_a_short_lived_jwt_with_the_audience_and_a_refresh_token(api):
    r = login(api)
    assert r.status_code == 200
    body = r.json()
    assert set(body) == {"access_token", "refresh_token", "token_type", "expires_in"}
    assert body["token_type"] == "bearer" and body["expires_in"] == 900  # 15 min by default
    header = jwt.get_unverified_header(body["access_token"])
    claims = jwt.decode(body["access_token"], options={"verify_signature": False})
    assert header["alg"] == "HS256"
    assert claims["sub"] == "alice" and claims["aud"] == "iot2ml"
    assert claims["exp"] - claims["iat"] in (900, 901)  # at least the 15 min, in whole seconds
    assert tables(api, body["access_token"]) == 200
    assert tables(api, body["refresh_token"]) == 401  # a refresh token is no access token


def test_wrong_password_and_unknown_user_get_the_same_answer(api):
    a, b = login(api, password="wrong password"), login(api, user="nobody")
    assert a.status_code == b.status_code == 401
    assert a.json() == b.json() == {"detail": "wrong user name or password"}


def test_refresh_rotates_and_reusing_a_used_token_revokes_the_whole_family(api):
    first = login(api).json()
    second = api.post("/api/v1/auth/refresh", json={"refresh_token": first["refresh_token"]})
    assert second.status_code == 200
    second = second.json()
    assert second["refresh_token"] != first["refresh_token"]
    assert tables(api, second["access_token"]) == 200
    # someone replays the first refresh token: the family is revoked, the holder's tokens included
    r = api.post("/api/v1/auth/refresh", json={"refresh_token": first["refresh_token"]})
    assert r.status_code == 401 and "already used" in r.json()["detail"]
    assert tables(api, second["access_token"]) == 401
    r = api.post("/api/v1/auth/refresh", json={"refresh_token": second["refresh_token"]})
    assert r.status_code == 401
    # another session of the same user is not touched
    other = login(api).json()
    assert tables(api, other["access_token"]) == 200


def test_logout_ends_the_session_at_once(api):
    pair = login(api).json()
    assert api.post("/api/v1/auth/logout", json={"refresh_token": pair["refresh_token"]}).status_code == 204
    assert tables(api, pair["access_token"]) == 401
    assert api.post("/api/v1/auth/refresh", json={"refresh_token": pair["refresh_token"]}).status_code == 401
    pair = login(api).json()  # or with the access token alone
    assert api.post("/api/v1/auth/logout", headers=auth(pair["access_token"])).status_code == 204
    assert tables(api, pair["access_token"]) == 401


def test_failed_logins_lock_the_user_with_a_growing_delay(api):
    for _ in range(3):
        assert login(api, password="nope-nope").status_code == 401
    r = login(api)  # the right password, but locked
    assert r.status_code == 401 and "too many failed logins for 'alice'" in r.json()["detail"]
    time.sleep(1.1)
    assert login(api, password="nope-nope").status_code == 401  # 4th failure: locked for 2 s now
    time.sleep(1.1)
    assert "too many failed logins" in login(api).json()["detail"]
    time.sleep(1.0)
    assert login(api).status_code == 200  # and a success resets the count
    assert api.users.get_user("alice")["failed_logins"] == 0


def test_failed_logins_from_one_address_lock_that_address_across_users(api):
    for i in range(6):  # password spraying: one try per user name
        assert login(api, user=f"user{i}", password="Winter2026!").status_code == 401
    r = login(api)
    assert r.status_code == 401 and "too many failed logins from" in r.json()["detail"]


def test_disabled_users_and_revoked_keys_stop_at_once(api):
    api.users.add_user("root", PASSWORD, "admin")
    admin = login(api, "root").json()["access_token"]
    alice = login(api).json()["access_token"]
    assert tables(api, alice) == 200
    r = api.patch("/api/v1/users/alice", headers=auth(admin), json={"active": False})
    assert r.status_code == 200 and r.json()["active"] is False
    assert tables(api, alice) == 401  # no wait: this process dropped its cache
    assert login(api).status_code == 401
    key = api.post("/api/v1/keys", headers=auth(admin), json={"name": "ci", "role": "operator"}).json()["key"]
    assert tables(api, key) == 200
    assert api.delete("/api/v1/keys/ci", headers=auth(admin)).status_code == 204
    assert tables(api, key) == 401


def test_a_user_disabled_by_another_process_stops_within_the_cache_time(api):
    alice = login(api).json()["access_token"]
    assert tables(api, alice) == 200
    Users(api.catalog).disable("alice")  # as 'iot2ml users disable alice' does
    time.sleep(api.guard.ttl + 0.1)
    assert tables(api, alice) == 401


def test_role_changes_apply_to_tokens_already_issued(api):
    api.users.add_user("root", PASSWORD, "admin")
    admin = login(api, "root").json()["access_token"]
    alice = login(api).json()["access_token"]
    assert api.get("/api/v1/devices", headers=auth(alice)).status_code == 403
    api.patch("/api/v1/users/alice", headers=auth(admin), json={"role": "operator"})
    assert api.get("/api/v1/devices", headers=auth(alice)).status_code == 200


def test_keys_take_the_new_roles_an_expiry_and_old_reader_keys_keep_working(api):
    keys = Keys(api.catalog)
    short = keys.add_key("short", "data-scientist", expires=1.0)
    old = keys.add_key("old", "reader")
    assert tables(api, short) == 200 and tables(api, old) == 200
    time.sleep(api.guard.ttl + 0.1)
    assert tables(api, short) == 401
    assert tables(api, old) == 200
    assert api.get("/api/v1/devices", headers=auth(old)).status_code == 403  # reader: viewer (+ predict)


# --------------------------------------------------------------------------- forged and stale tokens


def _b64(data: dict) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


def _claims(api) -> dict:
    token = login(api).json()["access_token"]
    return jwt.decode(token, options={"verify_signature": False})


def test_alg_none_is_refused(api):
    claims = _claims(api)
    forged = f"{_b64({'alg': 'none', 'typ': 'JWT'})}.{_b64({**claims, 'role': 'admin'})}."
    r = api.get("/api/v1/tables", headers=auth(forged))
    assert r.status_code == 401 and "invalid access token" in r.json()["detail"]


def test_a_token_signed_with_another_key_is_refused(api):
    forged = jwt.encode(_claims(api), "another-key-of-at-least-32-bytes-long!!", algorithm="HS256")
    assert tables(api, forged) == 401


def test_a_tampered_payload_is_refused(api):
    header, _payload, signature = login(api).json()["access_token"].split(".")
    claims = _claims(api)
    tampered = f"{header}.{_b64({**claims, 'sub': 'root', 'role': 'admin'})}.{signature}"
    assert tables(api, tampered) == 401


def test_an_expired_token_is_refused(api):
    key = api.users.signing_key()
    claims = {**_claims(api), "iat": int(time.time()) - 1000, "exp": int(time.time()) - 10}
    r = api.get("/api/v1/tables", headers=auth(jwt.encode(claims, key, algorithm="HS256")))
    assert r.status_code == 401 and "expired" in r.json()["detail"]


def test_a_token_for_another_audience_is_refused(api):
    key = api.users.signing_key()
    claims = {**_claims(api), "aud": "another-service"}
    r = api.get("/api/v1/tables", headers=auth(jwt.encode(claims, key, algorithm="HS256")))
    assert r.status_code == 401 and "audience" in r.json()["detail"]
    good = jwt.encode(_claims(api), key, algorithm="HS256")  # the same key and claims otherwise: accepted
    assert tables(api, good) == 200


def test_secrets_never_reach_the_logs(api, caplog):
    caplog.set_level("DEBUG")
    pair = login(api).json()
    login(api, password="my-secret-guess")
    api.post("/api/v1/auth/refresh", json={"refresh_token": pair["refresh_token"]})
    text = caplog.text
    for secret in (PASSWORD, "my-secret-guess", pair["access_token"], pair["refresh_token"]):
        assert secret not in text


def test_the_audit_table_is_hidden_from_sql_without_audit_read(api, settings):
    """A viewer's SQL does not see the audit trail (its table is not there for them); an admin's does."""
    admin = Keys(api.catalog).add_key("auditor", "admin")
    assert api.get("/api/v1/tables", headers=auth("not-a-token")).status_code == 401  # a denial: an audit row
    deadline = time.monotonic() + 10
    while "audit" not in {t["name"] for t in api.get("/api/v1/tables", headers=auth(admin)).json()}:
        assert time.monotonic() < deadline, "the audit rows were not written"
        time.sleep(0.2)
    viewer = login(api).json()["access_token"]
    assert "audit" not in {t["name"] for t in api.get("/api/v1/tables", headers=auth(viewer)).json()}
    r = api.post("/api/v1/query", json={"sql": "SELECT count(*) FROM audit"}, headers=auth(viewer))
    assert r.status_code == 400 and "no table 'audit'" in r.json()["detail"]
    r = api.post("/api/v1/query", json={"sql": "SELECT count(*) AS n FROM audit"}, headers=auth(admin))
    assert r.status_code == 200 and r.json()["rows"][0][0] >= 1
