"""Users, sessions and keys in the catalog, on SQLite and on the machine's PostgreSQL."""

from __future__ import annotations

import time

import pytest
import sqlalchemy as sa

from iot2ml.auth.store import Keys
from iot2ml.auth.users import TokenPolicy, Users
from iot2ml.core.catalog import Catalog
from iot2ml.core.errors import AlreadyExists, AuthError, InvalidInput, NotFound


def test_users_round_trip_with_argon2id_hashes(catalog_url):
    catalog = Catalog(catalog_url)
    users = Users(catalog)
    users.add_user("alice", "correct horse", "data-scientist")
    with pytest.raises(AlreadyExists, match="user 'alice' exists"):
        users.add_user("alice", "another one", "viewer")
    with pytest.raises(InvalidInput, match="role 'root' is not known: use one of viewer, data-scientist"):
        users.add_user("bob", "correct horse", "root")
    with pytest.raises(InvalidInput, match="too short"):
        users.add_user("bob", "short", "viewer")
    with pytest.raises(InvalidInput, match="user name 'a b' is not allowed"):
        users.add_user("a b", "correct horse", "viewer")
    with catalog.connect() as conn:
        stored = conn.execute(sa.text("SELECT password_hash FROM users WHERE name = 'alice'")).scalar_one()
    assert stored.startswith("$argon2id$") and "correct horse" not in stored
    assert users.list_users() == [{"name": "alice", "role": "data-scientist", "active": True, "locked": False,
                                   "failed_logins": 0}]
    pair = users.login("alice", "correct horse", address="10.0.0.1")
    claims = users.decode(pair["access_token"])
    assert claims["sub"] == "alice" and users.session("alice", claims["sid"]).role == "data-scientist"

    users.set_password("alice", "a new password")  # ends her sessions
    assert users.session("alice", claims["sid"]) is None
    with pytest.raises(AuthError, match="wrong user name or password"):
        users.login("alice", "correct horse")
    pair = users.login("alice", "a new password")
    users.disable("alice")
    with pytest.raises(AuthError, match="disabled"):
        users.login("alice", "a new password")
    with pytest.raises(AuthError):
        users.refresh(pair["refresh_token"])
    users.enable("alice")
    users.login("alice", "a new password")
    users.remove("alice")
    with pytest.raises(NotFound, match="no user 'alice'"):
        users.remove("alice")
    assert users.list_users() == []
    catalog.close()


def test_refresh_rotation_and_reuse_on_the_catalog(catalog_url):
    catalog = Catalog(catalog_url)
    users = Users(catalog)
    users.add_user("carol", "correct horse", "operator")
    first = users.login("carol", "correct horse")
    second = users.refresh(first["refresh_token"])
    sid = users.decode(second["access_token"])["sid"]
    assert sid == users.decode(first["access_token"])["sid"]  # one family
    with pytest.raises(AuthError, match="already used"):
        users.refresh(first["refresh_token"])
    assert users.session("carol", sid) is None
    with pytest.raises(AuthError, match="session was ended"):
        users.refresh(second["refresh_token"])
    catalog.close()


def test_a_second_process_shares_the_signing_key_and_the_lockout(catalog_url):
    policy = TokenPolicy(max_failures=2, lockout=60)
    one, two = Users(Catalog(catalog_url), policy), Users(Catalog(catalog_url), policy)
    one.add_user("dave", "correct horse", "viewer")
    pair = one.login("dave", "correct horse")
    assert two.decode(pair["access_token"])["sub"] == "dave"
    for _ in range(2):
        with pytest.raises(AuthError, match="wrong"):
            one.login("dave", "wrong password")
    with pytest.raises(AuthError, match="too many failed logins for 'dave'"):
        two.login("dave", "correct horse")
    assert two.list_users()[0]["locked"] is True
    two.set_password("dave", "correct horse 2")  # an admin lifts it
    two.login("dave", "correct horse 2")


def test_keys_take_roles_and_expire(catalog_url):
    keys = Keys(Catalog(catalog_url))
    ops = keys.add_key("ci", "operator", expires=30 * 86400)
    old = keys.add_key("dash", "reader")  # the role of keys made before roles: still accepted
    soon = keys.add_key("soon", "viewer", expires=0.5)
    assert keys.key_role(ops) == ("ci", "operator") and keys.key_role(old) == ("dash", "reader")
    assert keys.add_key("plain")  # admin by default, as before
    with pytest.raises(InvalidInput, match="role 'root' is not known"):
        keys.add_key("bad", "root")
    time.sleep(0.6)
    assert keys.key_role(soon) is None
    listed = {k["name"]: k for k in keys.describe_keys()}
    assert listed["soon"]["expired"] is True and listed["ci"]["expires_at"].endswith("Z")
    assert listed["dash"]["expires_at"] is None and listed["plain"]["role"] == "admin"


def test_a_catalog_of_an_older_release_keeps_its_keys(tmp_path):
    url = f"sqlite:///{tmp_path / 'old.db'}"
    engine = sa.create_engine(url)
    with engine.begin() as conn:  # api_keys as it was before roles and expiry
        conn.execute(sa.text("CREATE TABLE api_keys (name VARCHAR(128) PRIMARY KEY, key_sha256 VARCHAR(64) NOT NULL "
                             "UNIQUE, role VARCHAR(16) NOT NULL, created_at DATETIME NOT NULL)"))
        from iot2ml.auth.store import sha256

        conn.execute(sa.text("INSERT INTO api_keys VALUES ('dash', :h, 'reader', '2026-01-01 00:00:00')"),
                     {"h": sha256("i2m_old")})
    engine.dispose()
    keys = Keys(Catalog(url))
    assert keys.key_role("i2m_old") == ("dash", "reader")
    assert keys.describe_keys()[0]["expires_at"] is None
