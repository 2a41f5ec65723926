"""The web UI: a Plotly Dash app the API mounts at ``/ui`` (same port, same users, same permissions).

Sign-in takes the platform's users (``POST /api/v1/auth/login``'s logic, handed in as ``UIDeps.login``)
and keeps the access token in a cookie: HttpOnly (no script reads it), SameSite=Strict (no other site
sends it), Secure under HTTPS, and expiring with the token. Every callback resolves the cookie to a
caller and checks the permission of what it shows (``UIDeps.authorize``), as the API's routes do.
Dash callbacks are JSON POSTs, which a cross-site form cannot send, and the cookie never leaves this
site: no CSRF token is needed on top.

Pages so far: sign-in and the fleet (devices, type, status; server-side paging). The issue's device,
models, monitoring, explore and rate pages plug in as further entries of ``PAGES``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

COOKIE = "iot2ml_session"
PAGE_SIZE = 50


@dataclass
class UIDeps:
    """What the UI needs from the platform, handed in by the composition root (``api/app.py``)."""

    login: Callable[[str, str, str | None], dict[str, Any]]
    """``(username, password, address)`` -> the token pair; raises ``AuthError`` (shown as is)."""
    authorize: Callable[[str | None, str], Any]
    """``(access token, permission)`` -> the caller; raises ``AuthError``/``Forbidden``."""
    devices: Callable[[], list[dict[str, Any]]]
    """Every device: ``device_id``, ``type``, ``active``."""
    secure: bool = False
    """Mark the cookie Secure (the API serves HTTPS)."""


def create_ui(deps: UIDeps) -> Any:
    """The Dash app; mount its ``.server`` (Flask, WSGI) at ``/ui``."""
    import dash
    import flask
    from dash import Dash, Input, Output, State, dash_table, dcc, html

    from ..core.errors import Iot2mlError

    app = Dash(__name__, requests_pathname_prefix="/ui/", routes_pathname_prefix="/", title="iot2ml",
               suppress_callback_exceptions=True, update_title=None)

    def caller(permission: str) -> Any:
        return deps.authorize(flask.request.cookies.get(COOKIE), permission)

    sign_in = html.Form([
        html.H2("Sign in"),
        html.Label("Username", htmlFor="username"), dcc.Input(id="username", type="text", autoComplete="username"),
        html.Label("Password", htmlFor="password"),
        dcc.Input(id="password", type="password", autoComplete="current-password"),
        html.Button("Sign in", id="sign-in", type="button"),
        html.Div(id="sign-in-message", role="alert"),
    ], id="sign-in-form", style={"display": "grid", "maxWidth": "22rem", "gap": "0.4rem"})

    def fleet_page() -> Any:
        return html.Div([
            html.H2("Fleet"),
            html.Label("Search", htmlFor="fleet-search"),
            dcc.Input(id="fleet-search", type="search", debounce=True, placeholder="device id or type"),
            html.Div(id="fleet-counts"),
            dash_table.DataTable(id="fleet-table", columns=[{"name": c, "id": c} for c in ("device_id", "type", "status")],
                                 page_current=0, page_size=PAGE_SIZE, page_action="custom", sort_action="none"),
        ])

    app.layout = html.Div([
        dcc.Location(id="url"),
        html.Header([html.Strong("iot2ml"), html.Span(id="who", style={"marginLeft": "1rem"})]),
        html.Main(id="page"),
    ], style={"fontFamily": "system-ui, sans-serif", "margin": "1rem"})

    @app.callback(Output("page", "children"), Output("who", "children"), Input("url", "pathname"))
    def route(_path: str | None) -> tuple[Any, str]:
        try:
            who = caller("data:read")
        except Iot2mlError:
            return sign_in, ""
        return fleet_page(), f"{who.name} ({who.role})"

    @app.callback(Output("sign-in-message", "children"), Output("url", "pathname"),
                  Input("sign-in", "n_clicks"), State("username", "value"), State("password", "value"),
                  prevent_initial_call=True)
    def do_sign_in(_clicks: int, username: str | None, password: str | None) -> tuple[str, Any]:
        try:
            pair = deps.login(username or "", password or "", flask.request.remote_addr)
        except Iot2mlError as err:
            return str(err), dash.no_update
        dash.callback_context.response.set_cookie(
            COOKIE, pair["access_token"], max_age=int(pair["expires_in"]), httponly=True, samesite="Strict",
            secure=deps.secure, path="/ui")
        return "", "/ui/fleet"

    @app.callback(Output("fleet-table", "data"), Output("fleet-table", "page_count"), Output("fleet-counts", "children"),
                  Input("fleet-table", "page_current"), Input("fleet-search", "value"))
    def fleet(page: int | None, search: str | None) -> tuple[list[dict[str, Any]], int, str]:
        caller("data:read")
        rows = [{"device_id": d["device_id"], "type": d["type"], "status": "live" if d["active"] else "revoked"}
                for d in deps.devices()]
        if search:
            needle = search.lower()
            rows = [r for r in rows if needle in r["device_id"].lower() or needle in r["type"].lower()]
        per_type: dict[str, int] = {}
        for r in rows:
            per_type[r["type"]] = per_type.get(r["type"], 0) + 1
        counts = ", ".join(f"{t}: {n}" for t, n in sorted(per_type.items())) or "no devices yet"
        page = page or 0
        pages = max(1, -(-len(rows) // PAGE_SIZE))
        return rows[page * PAGE_SIZE:(page + 1) * PAGE_SIZE], pages, f"{len(rows)} devices ({counts})"

    return app
