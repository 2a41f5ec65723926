"""Names shared by everything that talks to the broker: the stream, subjects and the service login."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from .errors import BrokerUnavailable, NotFound
from .runtime import secret, wait_for_run_info

STREAM = "TELEMETRY"
TELEMETRY_SUBJECT = "devices.*.telemetry"
SERVICE_USER = "iot2ml-service"


def telemetry_subject(device_id: str) -> str:
    """NATS subject of a device's telemetry (MQTT topic ``devices/<id>/telemetry``)."""
    return f"devices.{device_id}.telemetry"


def service_url(data_dir: Path, host: str, port: int) -> str:
    """NATS URL with the internal service credentials kept in the data dir."""
    return f"nats://{SERVICE_USER}:{secret(data_dir, 'service.password')}@{host}:{port}"


def find_broker(data_dir: Path, *, wait: float | None = 0.0, on_wait: Callable[[], None] | None = None) -> str:
    """The service URL of the broker running for ``data_dir``, waiting up to ``wait`` seconds
    (``None``: for ever) for one that is starting; ``BrokerUnavailable`` if none runs."""
    try:
        info = wait_for_run_info(data_dir, "broker", timeout=wait, on_wait=on_wait)
    except NotFound as err:
        raise BrokerUnavailable(str(err)) from None
    return service_url(data_dir, info["host"], info["nats_port"])
