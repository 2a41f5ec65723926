"""Provisioning by claim over MQTT (seed 003): a device holding a claim certificate publishes
``{"csr": "<PEM>"}`` on ``provision/<claim>/<new device id>/request`` (the TLS listener only lets the
claim use these topics) and gets ``{"device_id", "cert", "ca"}`` or ``{"error"}`` on
``provision/<claim>/<new device id>/response``. The new device's user is in the broker before the
answer leaves, so the device can reconnect with its certificate at once.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from collections.abc import Callable

from ..core.devices import CertificateDirectory
from ..core.errors import Iot2mlError

log = logging.getLogger("iot2ml.broker")

REQUESTS = "provision.*.*.request"


def answer(certs: CertificateDirectory, subject: str, payload: bytes) -> tuple[str, dict[str, str]]:
    """The response subject and body for one request (never raises for bad input)."""
    parts = subject.split(".")
    claim, device_id = parts[1], parts[2]
    reply = f"provision.{claim}.{device_id}.response"
    try:
        body = json.loads(payload)
        csr = body.get("csr") if isinstance(body, dict) else None
        if not isinstance(csr, str) or "CERTIFICATE REQUEST" not in csr:
            return reply, {"error": 'send {"csr": "<PEM certificate signing request>"}'}
        return reply, certs.provision(claim, device_id, csr)
    except ValueError:
        return reply, {"error": 'the request is not JSON: send {"csr": "<PEM certificate signing request>"}'}
    except Iot2mlError as err:
        return reply, {"error": str(err)}


class Provisioner:
    """Answers provisioning requests on the hub, in a thread of its own. ``applied()`` is called after
    a device was added and must return once the broker knows its certificate."""

    def __init__(self, url: str, certs: CertificateDirectory, applied: Callable[[], None]) -> None:
        self.url = url
        self.certs = certs
        self.applied = applied
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="provisioning", daemon=True)

    def start(self, timeout: float = 10.0) -> None:
        self._thread.start()
        self._ready.wait(timeout)

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(5)

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except Exception as err:  # noqa: BLE001 - the broker goes on without provisioning
            log.error("provisioning stopped: %s", err)
            self._ready.set()

    async def _main(self) -> None:
        import nats

        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        nc = await nats.connect(self.url, max_reconnect_attempts=-1, reconnect_time_wait=0.5)

        async def on_request(msg) -> None:
            reply, body = await asyncio.to_thread(self._handle, msg.subject, msg.data)
            await nc.publish(reply, json.dumps(body).encode())

        await nc.subscribe(REQUESTS, cb=on_request)
        await nc.flush()
        self._ready.set()
        try:
            await self._stop.wait()
        finally:
            await nc.drain()

    def _handle(self, subject: str, data: bytes) -> tuple[str, dict[str, str]]:
        reply, body = answer(self.certs, subject, data)
        if "error" in body:
            log.warning("provisioning %s refused: %s", subject, body["error"])
        else:
            self.applied()
            log.info("provisioned device %s", body["device_id"])
        return reply, body
