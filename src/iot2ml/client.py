"""Python SDK for the HTTP API.

>>> import iot2ml
>>> client = iot2ml.Client("http://127.0.0.1:8080", "i2m_...")   # doctest: +SKIP
>>> client.query("SELECT device_id, avg(pressure) FROM pump GROUP BY 1")   # doctest: +SKIP

``query`` gives timestamps (``ts``, ``received_at``, ``date_trunc(...)``) as UTC datetimes: the API
sends each column's type beside the rows, and timestamp columns (RFC 3339 text ending in ``Z``)
are parsed back.
"""

from __future__ import annotations

from typing import Any

import httpx

from .core.errors import AuthError, InvalidInput, Iot2mlError, NotFound, QueryError, Transient


class Client:
    """Talks to a running iot2ml API with an API key."""

    def __init__(self, url: str, key: str | None = None, *, timeout: float = 60.0) -> None:
        self.url = url.rstrip("/")
        self._http = httpx.Client(base_url=self.url, timeout=timeout,
                                  headers={"Authorization": f"Bearer {key}"} if key else {})

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, method: str, path: str, **kw: Any) -> Any:
        try:
            r = self._http.request(method, path, **kw)
        except httpx.HTTPError as err:
            raise Transient(f"iot2ml API at {self.url} is unreachable: {err}") from err
        if r.status_code < 300:
            return r.json() if r.content else None
        try:
            detail = r.json().get("detail", r.text)
        except ValueError:
            detail = r.text
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

