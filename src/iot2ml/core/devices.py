"""The interface between modules and the device registry: devices, device types and their schemas.

``auth.store.Devices`` keeps them in the catalog; the composition roots hand it to the broker (its
users), the ingest (which device sends which type, declared columns) and serving (device types).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

from .errors import InvalidInput
from .ids import column_name

FIELD_TYPES = {
    "float": "float", "double": "float", "number": "float",
    "int": "int", "integer": "int", "bigint": "int",
    "string": "string", "text": "string", "str": "string",
    "bool": "bool", "boolean": "bool",
    "timestamp": "timestamp",
}
"""Spellings a device type's schema accepts, and the column type each stands for."""


@dataclass(frozen=True)
class Device:
    device_id: str
    type: str
    active: bool


@dataclass(frozen=True)
class DeviceType:
    name: str
    schema: dict[str, str] | None


def parse_schema(spec: str | dict[str, str] | None) -> dict[str, str] | None:
    """Parse ``"pressure:float,flow:float"`` (or a dict) into ``{column: type}``.

    >>> parse_schema("pressure:float, count:int")
    {'pressure': 'float', 'count': 'int'}
    """
    if spec is None or spec == "":
        return None
    items = spec.items() if isinstance(spec, dict) else (
        part.split(":", 1) if ":" in part else (part, "")
        for part in (p.strip() for p in spec.split(",")) if part
    )
    out: dict[str, str] = {}
    for name, kind in items:
        kind = str(kind).strip().lower()
        if kind not in FIELD_TYPES:
            raise InvalidInput(
                f"schema field {name!r} has type {kind!r}: use one of float, int, string, bool, timestamp"
            )
        out[column_name(str(name).strip())] = FIELD_TYPES[kind]
    return out


class DeviceDirectory(Protocol):
    """What the broker, the ingest and serving read about devices (``auth.store.Devices``)."""

    def version(self) -> int:
        """A counter that grows whenever devices or types change."""
        ...

    def device_types(self) -> dict[str, str]:
        """``{device_id: type}`` of every device ever registered (revoked ones too)."""
        ...

    def get_type(self, name: str) -> DeviceType:
        """The device type ``name``; ``NotFound`` if there is none."""
        ...

    def list_types(self) -> list[DeviceType]:
        ...

    def broker_users(self) -> Iterable[tuple[str, str]]:
        """``(device_id, bcrypt hash of its token)`` of every active device."""
        ...


@dataclass(frozen=True)
class BrokerIdentity:
    """A certificate the broker's TLS listener accepts: the user its subject maps to and the
    subjects that user may publish and subscribe to."""

    user: str
    publish: tuple[str, ...]
    subscribe: tuple[str, ...]


class CertificateDirectory(Protocol):
    """What the broker reads about certificates and asks of provisioning (``auth.certs.Certificates``)."""

    def version(self) -> int:
        ...

    def broker_identities(self) -> Iterable[BrokerIdentity]:
        """A user per valid certificate of an active device or claim."""
        ...

    def provision(self, claim: str, device_id: str, csr_pem: str) -> dict[str, str]:
        """``{"device_id", "cert", "ca"}`` for a CSR sent under claim ``claim``; raises ``Iot2mlError``s."""
        ...
