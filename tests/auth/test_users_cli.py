"""The commands people use: users, keys with roles and expiry, login (kept for the SDK), the audit
trail, against a real API served by uvicorn on a free port."""

from __future__ import annotations

import json
import stat
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from apiserver import serving
from typer.testing import CliRunner

from iot2ml import Client
from iot2ml.cli import app
from iot2ml.core.errors import AuthError

PASSWORD = "correct horse battery"


def cli(data_dir: Path, *args: str, input: str | None = None) -> Any:
    result = CliRunner().invoke(app, [*args, "--data-dir", str(data_dir)], input=input)
    assert result.exit_code == 0, result.output
    return result


@pytest.fixture
def api(settings) -> Iterator[str]:
    with serving(settings) as url:
        yield url


def test_users_and_scoped_keys_from_the_cli(settings):
    d = settings.data_dir
    out = cli(d, "users", "add", "alice", "--role", "data-scientist", "--password-stdin", "--json",
              input=PASSWORD + "\n")
    assert json.loads(out.stdout) == {"name": "alice", "role": "data-scientist"}
    result = CliRunner().invoke(app, ["users", "add", "bob", "--role", "root", "--password-stdin",
                                      "--data-dir", str(d)], input=PASSWORD + "\n")
    assert result.exit_code == 2 and "role 'root' is not known" in result.output
    assert json.loads(cli(d, "users", "list", "--json").stdout) == [
        {"name": "alice", "role": "data-scientist", "active": True, "locked": False, "failed_logins": 0}]
    cli(d, "users", "disable", "alice")
    assert json.loads(cli(d, "users", "list", "--json").stdout)[0]["active"] is False
    cli(d, "users", "passwd", "alice", "--password-stdin", input="another password\n")
    cli(d, "users", "remove", "alice")
    assert json.loads(cli(d, "users", "list", "--json").stdout) == []

    key = json.loads(cli(d, "keys", "add", "ci", "--role", "operator", "--expires", "30d", "--json").stdout)
    assert key["role"] == "operator" and key["key"].startswith("i2m_") and key["expires_at"].endswith("Z")
    plain = json.loads(cli(d, "keys", "add", "old-style", "--json").stdout)  # as before: admin, no expiry
    assert plain["role"] == "admin" and plain["expires_at"] is None
    listed = json.loads(cli(d, "keys", "list", "--json").stdout)
    assert [(k["name"], k["role"]) for k in listed] == [("ci", "operator"), ("old-style", "admin")]
    assert key["key"] not in json.dumps(listed)

    rows = json.loads(cli(d, "audit", "--json").stdout)  # changes made here are audited too
    assert [(r["kind"], r["action"], r["target"]) for r in reversed(rows)] == [
        ("cli", "users:admin", "users add alice --role data-scientist"),
        ("cli", "users:admin", "users disable alice"),
        ("cli", "users:admin", "users passwd alice"),
        ("cli", "users:admin", "users remove alice"),
        ("cli", "keys:admin", "keys add ci --role operator --expires 30d"),
        ("cli", "keys:admin", "keys add old-style --role admin"),
    ]
    assert PASSWORD not in json.dumps(rows) and key["key"] not in json.dumps(rows)


def test_the_admin_key_of_up_can_be_rotated(settings):
    from iot2ml.auth.store import Keys
    from iot2ml.core.catalog import Catalog
    from iot2ml.core.runtime import secret

    d = settings.data_dir
    keys = Keys(Catalog(settings.catalog))
    old = secret(d, "admin.key")  # what 'iot2ml up' does on first start
    keys.set_key("admin", old, "admin")
    new = json.loads(cli(d, "keys", "rotate-admin", "--json").stdout)["key"]
    assert new != old and keys.key_role(new) == ("admin", "admin") and keys.key_role(old) is None
    assert secret(d, "admin.key") == new  # 'up' prints this one from now on
    assert stat.S_IMODE((d / "secrets" / "admin.key").stat().st_mode) == 0o600


def test_login_keeps_a_session_for_the_sdk_and_the_audit_says_who_did_what(settings, api):
    d = settings.data_dir
    cli(d, "users", "add", "alice", "--role", "operator", "--password-stdin", input=PASSWORD + "\n")
    result = CliRunner().invoke(app, ["login", "--user", "alice", "--password-stdin", "--url", api,
                                      "--data-dir", str(d)], input="wrong password\n")
    assert result.exit_code == 2 and "login refused (401)" in result.output
    out = cli(d, "login", "--user", "alice", "--password-stdin", "--url", api, "--json", input=PASSWORD + "\n")
    session = Path(json.loads(out.stdout)["session"])
    assert session == d / "run" / "session.json"
    assert stat.S_IMODE(session.stat().st_mode) == 0o600

    client = Client.from_session(d)
    assert {t["name"] for t in client.tables()} <= {"audit"}  # viewer-level read works
    token = client.add_device("pump-9", "pump")  # operator: devices
    with pytest.raises(AuthError, match="403"):
        client._call("GET", "/api/v1/users")  # admin only
    cli(d, "users", "disable", "alice")  # another process: within the guard's 2 s
    time.sleep(2.2)
    with pytest.raises(AuthError, match="401"):
        client.tables()
    cli(d, "logout")
    assert not session.exists()

    time.sleep(1.5)  # the API appends its audit rows every second
    rows = json.loads(cli(d, "audit", "--since", "1h", "--json").stdout)
    seen = {(r["who"], r["action"], r["outcome"]) for r in rows}
    assert (None, "public", "denied") in seen  # the wrong password
    assert ("alice", "devices:write", "ok") in seen
    assert ("alice", "users:admin", "denied") in seen
    assert any(r["outcome"] == "denied" and r["status"] == 401 and r["action"] == "data:read" for r in rows)
    api_rows = [r for r in rows if r["component"] == "api"]
    assert api_rows and all(r["address"] == "127.0.0.1" for r in api_rows)
    assert {r["target"] for r in rows if r["component"] == "cli"} == {"users add alice --role operator",
                                                                      "users disable alice"}
    text = json.dumps(rows)
    for secret in (PASSWORD, "wrong password", token):
        assert secret not in text
    assert "alice" in cli(d, "audit").stdout


def test_the_sdk_logs_in_and_refreshes_an_expired_access_token(settings):
    from iot2ml.auth.users import Users
    from iot2ml.core.catalog import Catalog

    settings = settings.model_copy(update={"auth_access_ttl": 1.0})
    Users(Catalog(settings.catalog)).add_user("erin", PASSWORD, "viewer")
    with serving(settings) as url:
        with pytest.raises(AuthError, match="401"):
            Client.login(url, "erin", "not her password")
        client = Client.login(url, "erin", PASSWORD)
        first = client._http.headers["Authorization"]
        assert isinstance(client.tables(), list)
        time.sleep(2.1)  # the access token expired: the client refreshes it once and retries
        assert isinstance(client.tables(), list)
        assert client._http.headers["Authorization"] != first
        client.logout()
        with pytest.raises(AuthError, match="401"):
            client.tables()
