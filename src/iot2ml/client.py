"""Python SDK for the HTTP API.

>>> import iot2ml
>>> client = iot2ml.Client("http://127.0.0.1:8080", "i2m_...")   # doctest: +SKIP
>>> client.query("SELECT device_id, avg(pressure) FROM pump GROUP BY 1")   # doctest: +SKIP

``query`` gives timestamps (``ts``, ``received_at``, ``date_trunc(...)``) as UTC datetimes: the API
sends each column's type beside the rows, and timestamp columns (RFC 3339 text ending in ``Z``)
are parsed back.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import httpx

from .core.errors import (
    AuthError,
    InvalidInput,
    Iot2mlError,
    NotFound,
    QueryError,
    RateLimited,
    Transient,
)
from .core.runtime import http_verify


def session_path(data_dir: Path) -> Path:
    """Where ``iot2ml login`` keeps a user's tokens for later commands and ``Client.from_session``."""
    return Path(data_dir) / "run" / "session.json"


def save_session(path: Path, data: dict[str, Any]) -> None:
    """Write the session file atomically, readable by its owner only (0600)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(json.dumps(data))
    os.replace(tmp, path)


class Client:
    """Talks to a running iot2ml API with an API key, or as a user (``Client.login``, or
    ``Client.from_session`` after ``iot2ml login``): the access token is refreshed when it expires."""

    def __init__(self, url: str, key: str | None = None, *, timeout: float = 60.0, verify: bool | str = True) -> None:
        """``verify``: what to trust for an ``https://`` URL (a CA bundle file such as the platform's
        ``<data_dir>/ca/bundle.pem``, ``True`` for the system's)."""
        self.url = url.rstrip("/")
        self._http = httpx.Client(base_url=self.url, timeout=timeout, verify=http_verify(verify),
                                  headers={"Authorization": f"Bearer {key}"} if key else {})
        self._refresh: str | None = None
        self._session_file: Path | None = None

    @classmethod
    def login(cls, url: str, username: str, password: str, *, timeout: float = 60.0,
              verify: bool | str = True) -> Client:
        """A client acting as ``username`` (``POST /api/v1/auth/login``)."""
        client = cls(url, timeout=timeout, verify=verify)
        client._use(client._call("POST", "/api/v1/auth/login", json={"username": username, "password": password}))
        return client

    @classmethod
    def from_session(cls, data_dir: str | Path = "./data", *, timeout: float = 60.0) -> Client:
        """A client with the tokens ``iot2ml login`` kept in ``<data_dir>/run/session.json``."""
        path = session_path(Path(data_dir).expanduser())
        try:
            saved = json.loads(path.read_text())
        except FileNotFoundError:
            raise AuthError(f"no login kept under {data_dir}: run 'iot2ml login --user NAME'") from None
        client = cls(saved["url"], saved["access_token"], timeout=timeout, verify=saved.get("verify", True))
        client._refresh, client._session_file = saved["refresh_token"], path
        return client

    def logout(self) -> None:
        """End this client's session (user logins only)."""
        if self._refresh:
            self._call("POST", "/api/v1/auth/logout", json={"refresh_token": self._refresh})
            self._refresh = None

    def _use(self, pair: dict[str, Any]) -> None:
        self._http.headers["Authorization"] = f"Bearer {pair['access_token']}"
        self._refresh = pair["refresh_token"]
        if self._session_file is not None and self._session_file.exists():
            saved = json.loads(self._session_file.read_text())
            saved.update(access_token=pair["access_token"], refresh_token=pair["refresh_token"],
                         expires_at=time.time() + pair["expires_in"])
            save_session(self._session_file, saved)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, method: str, path: str, **kw: Any) -> Any:
        try:
            r = self._http.request(method, path, **kw)
            if r.status_code == 401 and self._refresh and "expired" in r.text and "headers" not in kw:
                refresh = self._http.post("/api/v1/auth/refresh", json={"refresh_token": self._refresh})
                if refresh.status_code == 200:
                    self._use(refresh.json())
                    r = self._http.request(method, path, **kw)
        except httpx.HTTPError as err:
            raise Transient(f"iot2ml API at {self.url} is unreachable: {err}") from err
        if r.status_code < 300:
            return r.json() if r.content else None
        try:
            detail = r.json().get("detail", r.text)
        except ValueError:
            detail = r.text
        if r.status_code == 429:  # over a rate limit: the caller may wait Retry-After seconds and retry
            raise RateLimited(f"{method} {path} -> 429: {detail}", int(r.headers.get("retry-after") or 1))
        kind = {401: AuthError, 403: AuthError, 404: NotFound}.get(r.status_code, Iot2mlError)
        if r.status_code == 400 and path.endswith("/query"):
            kind = QueryError
        elif r.status_code in (400, 413, 422):
            kind = InvalidInput
        elif r.status_code >= 500:
            kind = Transient
        raise kind(f"{method} {path} -> {r.status_code}: {detail}")

    def query(self, sql: str) -> Any:
        """Run one read-only SELECT; returns a ``polars.DataFrame``."""
        import polars as pl

        body = self._call("POST", "/api/v1/query", json={"sql": sql})
        columns = body["columns"]
        if not columns:
            return pl.DataFrame()
        frame = pl.DataFrame({c: [row[i] for row in body["rows"]] for i, c in enumerate(columns)}, strict=False)
        types = body.get("types") or []
        timestamps = [c for c, t in zip(columns, types) if t.startswith("timestamp") and frame[c].dtype == pl.String]
        return frame.with_columns(
            pl.col(c).str.to_datetime(format="%Y-%m-%dT%H:%M:%S%.fZ", time_unit="us", time_zone="UTC")
            for c in timestamps
        )

    def tables(self) -> list[dict[str, Any]]:
        return self._call("GET", "/api/v1/tables")

    def add_device(self, device_id: str, type: str, *, rotate: bool = False) -> str:  # noqa: A002
        """Register a device; returns its token."""
        return self._call("POST", "/api/v1/devices", json={"device_id": device_id, "type": type,
                                                           "rotate": rotate})["token"]

    def send(self, device_id: str, token: str, readings: dict[str, Any] | list[dict[str, Any]]) -> int:
        """Send readings as a device; returns how many were accepted."""
        r = self._call("POST", f"/api/v1/devices/{device_id}/telemetry", json=readings,
                       headers={"Authorization": f"Bearer {token}"})
        return int(r["accepted"])


    # -- monitoring: notifiers, alert rules, drift reports (the CLI's `notifiers`, `alerts`, `monitor report`)
    def notifiers(self) -> list[dict[str, Any]]:
        """Every notifier, secrets masked."""
        return self._call("GET", "/api/v1/notifiers")

    def add_notifier(self, name: str, *, webhook: str | None = None, slack: str | None = None,
                     email: str | None = None, smtp: str | None = None, sender: str | None = None,
                     url: str | None = None) -> dict[str, Any]:
        """Add a notifier: exactly one of ``webhook`` (Alertmanager v4 body), ``slack``, ``email``
        (with ``smtp``) or ``url`` (an Apprise URL)."""
        given = {k: v for k, v in {"webhook": webhook, "slack": slack, "email": email, "apprise": url}.items() if v}
        if len(given) != 1:
            raise InvalidInput("give exactly one of webhook=, slack=, email= or url=")
        (kind, target), = given.items()
        options = {k: v for k, v in {"smtp": smtp, "sender": sender}.items() if v}
        return self._call("POST", "/api/v1/notifiers", json={"name": name, "kind": kind, "target": target,
                                                             "options": options})

    def test_notifier(self, name: str) -> dict[str, Any]:
        """Send a test notification now; the delivery (``status`` ok or failed, ``error``)."""
        return self._call("POST", f"/api/v1/notifiers/{name}/test")

    def remove_notifier(self, name: str) -> None:
        self._call("DELETE", f"/api/v1/notifiers/{name}")

    def alerts(self) -> list[dict[str, Any]]:
        """Every alert rule with its firing alerts (their ``id`` is what ``ack_alert`` takes)."""
        return self._call("GET", "/api/v1/alerts")

    def add_alert(self, name: str, **rule: Any) -> dict[str, Any]:
        """Add an alert rule: the CLI's flags as keywords (``-`` as ``_``; ``for_`` for ``--for``), e.g.
        ``add_alert("hp", table="pump", when="max(pressure) > 5", by=["device_id"], notify=["ops"])`` or
        ``add_alert("quiet", silent="5m", type="pump")``. Durations are text such as ``"1m"``."""
        body = {("for" if k == "for_" else k): v for k, v in rule.items() if v is not None}
        return self._call("POST", "/api/v1/alerts", json={"name": name, **body})

    def alert_history(self, *, rule: str | None = None, limit: int = 1000) -> list[dict[str, Any]]:
        """State changes, newest first: ``{"rule", "state", "labels", "value", "at"}``."""
        params: dict[str, Any] = {"limit": limit}
        if rule is not None:
            params["rule"] = rule
        return self._call("GET", "/api/v1/alerts/history", params=params)

    def ack_alert(self, id: str) -> dict[str, Any]:  # noqa: A002 - the alert's id, as the API names it
        return self._call("POST", f"/api/v1/alerts/{id}/ack")

    def silence_alert(self, name: str, *, for_: str = "1h") -> dict[str, Any]:
        return self._call("POST", f"/api/v1/alerts/{name}/silence", json={"for": for_})

    def remove_alert(self, name: str) -> None:
        self._call("DELETE", f"/api/v1/alerts/{name}")

    def monitor_report(self, model: str, *, window: str = "1h") -> dict[str, Any]:
        """Drift per feature, prediction and dataset, and live quality of ``model`` over ``window``."""
        return self._call("GET", f"/api/v1/monitor/{model}", params={"window": window})
