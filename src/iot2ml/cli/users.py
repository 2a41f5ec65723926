"""People: users and their roles, logging in, the audit trail.

``iot2ml login`` keeps the token pair in ``<data-dir>/run/session.json`` (mode 0600), where
``iot2ml.Client.from_session`` finds it (and refreshes it when it expires); ``iot2ml logout`` ends the
session and deletes the file."""

from __future__ import annotations

import json
import sys
import time
from typing import Annotated, Any

import typer

from ..core.errors import InvalidInput
from ._common import (
    AsJson,
    CatalogUrl,
    DataDir,
    _catalog,
    _fail,
    _run,
    _settings,
    app,
    console,
)

users_app = typer.Typer(no_args_is_help=True, help="People who log in, and their roles.")
app.add_typer(users_app, name="users")

Role = Annotated[str, typer.Option("--role", help="viewer, data-scientist, operator or admin.")]
PasswordStdin = Annotated[bool, typer.Option("--password-stdin", help="Read the password from the first line "
                                             "of stdin (for scripts) instead of asking.")]


def _users(data_dir, catalog_url):
    from ..auth.users import TokenPolicy, Users

    settings, catalog = _catalog(data_dir, catalog_url)
    return settings, _run(Users, catalog, TokenPolicy.from_settings(settings))


def audit_cli(settings: Any, action: str, target: str) -> None:
    """One row of the audit table for a change made here on the catalog (no HTTP request to record it):
    who = the OS user, kind ``cli``, role admin (the data dir's owner). A lake that cannot be written
    is named on stderr; the change stands."""
    from ..auth.audit import AuditLog
    from ..lake import Lake
    from ._common import _who, err_console

    log = AuditLog(Lake(settings.lake, settings.lake_storage_options), component="cli")
    log.add({"ts": time.time(), "who": _who(), "kind": "cli", "role": "admin", "action": action,
             "target": target, "outcome": "ok", "status": 0, "address": "local"})
    if not log.flush():
        err_console.print("[yellow]warning:[/] the audit row of this change could not be written to the lake")


def _password(from_stdin: bool, *, confirm: bool = True) -> str:
    if from_stdin:
        line = sys.stdin.readline()
        if not line:
            _fail(InvalidInput("--password-stdin: stdin is empty: pipe the password in"))
        return line.rstrip("\r\n")
    return typer.prompt("password", hide_input=True, confirmation_prompt=confirm)


@users_app.command("add")
def users_add(name: str, role: Role, password_stdin: PasswordStdin = False, as_json: AsJson = False,
              data_dir: DataDir = None, catalog_url: CatalogUrl = None) -> None:
    """Add a user with a role; the password is asked for (or read from stdin), stored argon2id-hashed."""
    settings, users = _users(data_dir, catalog_url)
    _run(users.add_user, name, _password(password_stdin), role)
    audit_cli(settings, "users:admin", f"users add {name} --role {role}")
    if as_json:
        print(json.dumps({"name": name, "role": role}))
    else:
        console.print(f"user [bold]{name}[/] ({role}) added")


@users_app.command("list")
def users_list(as_json: AsJson = False, data_dir: DataDir = None, catalog_url: CatalogUrl = None) -> None:
    """List users: name, role, active, locked out."""
    rows = _run(_users(data_dir, catalog_url)[1].list_users)
    if as_json:
        print(json.dumps(rows))
        return
    from rich.table import Table

    table = Table("name", "role", "active", "locked")
    for r in rows:
        table.add_row(r["name"], r["role"], "yes" if r["active"] else "disabled", "yes" if r["locked"] else "")
    console.print(table)


@users_app.command("passwd")
def users_passwd(name: str, password_stdin: PasswordStdin = False, data_dir: DataDir = None,
                 catalog_url: CatalogUrl = None) -> None:
    """Set a new password: the user's sessions end and a lockout is lifted."""
    settings, users = _users(data_dir, catalog_url)
    _run(users.get_user, name)
    _run(users.set_password, name, _password(password_stdin))
    audit_cli(settings, "users:admin", f"users passwd {name}")
    console.print(f"password of {name} changed; their sessions ended")


@users_app.command("role")
def users_role(name: str, role: Role, data_dir: DataDir = None, catalog_url: CatalogUrl = None) -> None:
    """Give a user another role (their tokens carry it within seconds)."""
    settings, users = _users(data_dir, catalog_url)
    _run(users.set_role, name, role)
    audit_cli(settings, "users:admin", f"users role {name} --role {role}")
    console.print(f"user {name} is now {role}")


@users_app.command("disable")
def users_disable(name: str, data_dir: DataDir = None, catalog_url: CatalogUrl = None) -> None:
    """Stop a user: no more logins; their tokens stop working within 2 s."""
    settings, users = _users(data_dir, catalog_url)
    _run(users.disable, name)
    audit_cli(settings, "users:admin", f"users disable {name}")
    console.print(f"user {name} disabled")


@users_app.command("enable")
def users_enable(name: str, data_dir: DataDir = None, catalog_url: CatalogUrl = None) -> None:
    """Let a disabled user log in again."""
    settings, users = _users(data_dir, catalog_url)
    _run(users.enable, name)
    audit_cli(settings, "users:admin", f"users enable {name}")
    console.print(f"user {name} enabled")


@users_app.command("remove")
def users_remove(name: str, data_dir: DataDir = None, catalog_url: CatalogUrl = None) -> None:
    """Remove a user; their sessions end."""
    settings, users = _users(data_dir, catalog_url)
    _run(users.remove, name)
    audit_cli(settings, "users:admin", f"users remove {name}")
    console.print(f"user {name} removed")


# --------------------------------------------------------------------------- login


def _api_url(settings: Any, url: str | None) -> tuple[str, str | bool]:
    """The API's URL and what to trust for its HTTPS certificate."""
    from ..core.runtime import running_info, tls_verify

    if url:
        return url.rstrip("/"), True
    info = _run(running_info, settings.data_dir, "api")
    return str(info["url"]).replace("://0.0.0.0:", "://127.0.0.1:"), tls_verify(info)


@app.command()
def login(
    user: Annotated[str, typer.Option("--user", help="Your user name.")],
    password_stdin: PasswordStdin = False,
    url: Annotated[str | None, typer.Option("--url", help="The API (default: the one running on the data dir).")] = None,
    as_json: AsJson = False, data_dir: DataDir = None,
) -> None:
    """Log in to the API; the tokens are kept in <data-dir>/run/session.json (0600) for later commands
    and iot2ml.Client.from_session()."""
    import httpx

    from ..client import save_session, session_path
    from ..core.runtime import http_verify

    settings = _run(_settings, data_dir=data_dir)
    base, verify = _api_url(settings, url)
    password = _password(password_stdin, confirm=False)
    try:
        r = httpx.post(f"{base}/api/v1/auth/login", json={"username": user, "password": password}, timeout=30,
                       verify=http_verify(verify))
    except httpx.HTTPError as err:
        _fail(InvalidInput(f"the API at {base} is unreachable: {err}"))
    if r.status_code != 200:
        detail = r.json().get("detail", r.text) if r.headers.get("content-type", "").startswith("application/json") else r.text
        _fail(InvalidInput(f"login refused ({r.status_code}): {detail}"))
    pair = r.json()
    path = session_path(settings.data_dir)
    save_session(path, {"url": base, "user": user, **pair, "expires_at": time.time() + pair["expires_in"],
                        "verify": verify})
    if as_json:
        print(json.dumps({"user": user, "url": base, "expires_in": pair["expires_in"], "session": str(path)}))
    else:
        console.print(f"logged in as [bold]{user}[/] at {base}; token kept in {path} "
                      f"(valid {pair['expires_in'] // 60} min, refreshed by the SDK)")


@app.command()
def logout(data_dir: DataDir = None) -> None:
    """End the session of 'iot2ml login' and forget its tokens."""
    import httpx

    from ..client import session_path
    from ..core.runtime import http_verify

    settings = _run(_settings, data_dir=data_dir)
    path = session_path(settings.data_dir)
    try:
        saved = json.loads(path.read_text())
    except FileNotFoundError:
        console.print("not logged in")
        return
    try:
        httpx.post(f"{saved['url']}/api/v1/auth/logout", json={"refresh_token": saved["refresh_token"]}, timeout=10,
                   verify=http_verify(saved.get("verify", True)))
    except httpx.HTTPError:
        pass  # the tokens are forgotten here anyway; the refresh token expires on its own
    path.unlink(missing_ok=True)
    console.print(f"logged out {saved.get('user', '')}")


# --------------------------------------------------------------------------- audit


@app.command()
def audit(
    since: Annotated[str, typer.Option("--since", help="How far back: 1h, 1d, 30d.")] = "1d",
    limit: Annotated[int, typer.Option("--limit", help="Most rows, newest first.")] = 1000,
    as_json: AsJson = False, data_dir: DataDir = None,
) -> None:
    """Who did what, when, from where, allowed or denied (the audit lake table)."""
    from ..auth.audit import read_audit
    from ..core.timeutil import parse_duration
    from ..lake import Lake

    settings = _run(_settings, data_dir=data_dir)
    seconds = _run(parse_duration, since)
    if not 0 <= seconds <= 100 * 365 * 86400:
        _fail(InvalidInput(f"--since {since!r} must be a duration up to 100 years, e.g. 1h or 30d"))
    rows = _run(read_audit, Lake(settings.lake, settings.lake_storage_options), time.time() - seconds, limit)
    if as_json:
        print(json.dumps(rows))
        return
    from rich.table import Table

    table = Table("time", "who", "role", "action", "target", "outcome", "address")
    for r in rows:
        who = r["who"] or "-"
        table.add_row(r["ts"], f"{who} ({r['kind']})" if r["kind"] else who, r["role"] or "", r["action"] or "",
                      r["target"], f"{r['outcome']} {r['status']}", r["address"] or "")
    console.print(table)
