"""Device certificates and provisioning claims over the catalog, signed by the platform CA.

``devices add pump-9 --cert`` issues a key pair and a certificate (the key is shown once, never
stored); a claim (``provisioning add pumps --type pump``) is a certificate that may only ask, over
MQTT, for a device certificate of its type by sending a CSR, so that the device's own key never
leaves it. The broker maps each certificate to a user by its subject (``auth.ca.subject_dn``):
revoking a certificate or its device removes that user, which drops a connected device at once.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa

from ..core.catalog import Catalog
from ..core.devices import BrokerIdentity
from ..core.errors import AlreadyExists, NotFound
from ..core.ids import check_device_id, check_type_name
from .ca import CertificateAuthority, Issued, subject_dn
from .store import Devices, _certs, _claims, _devices, _iso


def _now() -> datetime:
    return datetime.now(UTC)


class Certificates:
    """Certificates of devices and claims, and provisioning by claim (``BrokerIdentities`` for the broker)."""

    def __init__(self, catalog: Catalog, ca: CertificateAuthority) -> None:
        self.catalog = catalog
        self.ca = ca
        self.devices = Devices(catalog)

    def version(self) -> int:
        return self.catalog.version()

    def _record(self, conn: sa.Connection, kind: str, name: str, issued: Issued) -> None:
        conn.execute(_certs.insert().values(serial=issued.serial, kind=kind, name=name, created_at=_now(),
                                            not_after=issued.not_after))
        self.catalog.bump(conn)

    # ---- devices ----------------------------------------------------------------------------
    def issue_device(self, device_id: str, type_name: str, *, rotate: bool = False) -> dict[str, str]:
        """A new key and certificate for ``device_id`` (registered now if it is new; a device with a
        token may get a certificate too). ``rotate`` revokes the certificates it had."""
        check_device_id(device_id)
        check_type_name(type_name)
        existing = self.devices.get_device(device_id)
        if existing is not None and existing.type != type_name:
            raise AlreadyExists(f"device {device_id!r} exists with type {existing.type!r}, not {type_name!r}")
        if existing is not None and existing.active:
            live = [c for c in self.list(device_id) if c["active"]]
            if live and not rotate:
                raise AlreadyExists(f"device {device_id!r} has a certificate: pass --rotate for a new one "
                                    f"(the old one stops working)")
        else:
            self.devices.add_device(device_id, type_name, token=False)
        issued = self.ca.issue("device", device_id)
        with self.catalog.begin() as conn:
            if rotate:
                conn.execute(_certs.update().where(_certs.c.kind == "device", _certs.c.name == device_id,
                                                   _certs.c.revoked_at.is_(None)).values(revoked_at=_now()))
            self._record(conn, "device", device_id, issued)
        return {"device_id": device_id, "serial": issued.serial, "cert": issued.cert_pem,
                "key": issued.key_pem or "", "ca": self.ca.bundle_pem}

    def revoke(self, name: str, *, serial: str | None = None) -> int:
        """Revoke the certificates of device or claim ``name`` (or only ``serial``); how many."""
        cond = [_certs.c.name == name, _certs.c.revoked_at.is_(None)]
        if serial:
            cond.append(_certs.c.serial == serial.lower())
        with self.catalog.begin() as conn:
            done = conn.execute(_certs.update().where(*cond).values(revoked_at=_now())).rowcount
            if not done:
                raise NotFound(f"no active certificate of {name!r}" + (f" with serial {serial}" if serial else "")
                               + ": see 'iot2ml devices certs'")
            self.catalog.bump(conn)
        return done

    def list(self, name: str | None = None) -> list[dict[str, Any]]:
        """Every certificate (of ``name``): serial, kind, name, created_at, not_after, active."""
        query = sa.select(_certs).order_by(_certs.c.name, _certs.c.created_at)
        if name is not None:
            query = query.where(_certs.c.name == name)
        with self.catalog.connect() as conn:
            rows = conn.execute(query).all()
        now = _now()
        return [{"serial": r.serial, "kind": r.kind, "name": r.name, "created_at": _iso(r.created_at),
                 "not_after": _iso(r.not_after), "revoked_at": _iso(r.revoked_at),
                 "active": r.revoked_at is None and _aware(r.not_after) > now} for r in rows]

    # ---- claims -----------------------------------------------------------------------------
    def add_claim(self, name: str, type_name: str) -> dict[str, str]:
        """A provisioning claim for devices of ``type_name``: its certificate and key (shown once)."""
        check_device_id(name)
        check_type_name(type_name)
        self.devices.add_type(type_name, exist_ok=True)
        with self.catalog.begin() as conn:
            row = conn.execute(sa.select(_claims).where(_claims.c.name == name)).first()
            if row is not None and row.revoked_at is None:
                raise AlreadyExists(f"claim {name!r} exists: remove it first or choose another name")
        issued = self.ca.issue("claim", name)
        with self.catalog.begin() as conn:
            conn.execute(_claims.delete().where(_claims.c.name == name))
            conn.execute(_claims.insert().values(name=name, type=type_name, created_at=_now()))
            self._record(conn, "claim", name, issued)
        return {"claim": name, "type": type_name, "serial": issued.serial, "claim_cert": issued.cert_pem,
                "claim_key": issued.key_pem or "", "ca": self.ca.bundle_pem}

    def remove_claim(self, name: str) -> None:
        """Revoke a claim: its certificate stops working; devices it provisioned keep theirs."""
        with self.catalog.begin() as conn:
            done = conn.execute(_claims.update().where(_claims.c.name == name, _claims.c.revoked_at.is_(None))
                                .values(revoked_at=_now())).rowcount
            if not done:
                raise NotFound(f"no active claim {name!r}: see 'iot2ml provisioning list'")
            conn.execute(_certs.update().where(_certs.c.kind == "claim", _certs.c.name == name,
                                               _certs.c.revoked_at.is_(None)).values(revoked_at=_now()))
            self.catalog.bump(conn)

    def list_claims(self) -> list[dict[str, Any]]:
        with self.catalog.connect() as conn:
            rows = conn.execute(sa.select(_claims).order_by(_claims.c.name)).all()
        return [{"name": r.name, "type": r.type, "created_at": _iso(r.created_at), "active": r.revoked_at is None}
                for r in rows]

    def provision(self, claim: str, device_id: str, csr_pem: str) -> dict[str, str]:
        """What a device holding claim ``claim`` gets for its CSR: a certificate for the new device
        ``device_id`` of the claim's type. ``InvalidInput``/``AlreadyExists``/``NotFound`` say why not."""
        check_device_id(device_id)
        with self.catalog.connect() as conn:
            row = conn.execute(sa.select(_claims).where(_claims.c.name == claim, _claims.c.revoked_at.is_(None))).first()
        if row is None:
            raise NotFound(f"no active claim {claim!r}")
        if self.devices.get_device(device_id) is not None:
            raise AlreadyExists(f"device {device_id!r} exists: choose another id")
        issued = self.ca.sign_csr("device", device_id, csr_pem)  # checks the CSR before anything is stored
        self.devices.add_device(device_id, row.type, token=False)
        with self.catalog.begin() as conn:
            self._record(conn, "device", device_id, issued)
        return {"device_id": device_id, "cert": issued.cert_pem, "ca": self.ca.bundle_pem}

    # ---- the broker ---------------------------------------------------------------------------
    def broker_identities(self) -> Iterator[BrokerIdentity]:
        """A user per valid certificate of an active device or claim, with what it may publish and
        subscribe to (a device: its own topics; a claim: its provisioning topics)."""
        now = _now()
        with self.catalog.connect() as conn:
            devices = conn.execute(
                sa.select(_certs.c.serial, _certs.c.name, _certs.c.not_after)
                .join(_devices, sa.and_(_devices.c.device_id == _certs.c.name, _devices.c.revoked_at.is_(None)))
                .where(_certs.c.kind == "device", _certs.c.revoked_at.is_(None)).order_by(_certs.c.name)
            ).all()
            claims = conn.execute(
                sa.select(_certs.c.serial, _certs.c.name, _certs.c.not_after)
                .join(_claims, sa.and_(_claims.c.name == _certs.c.name, _claims.c.revoked_at.is_(None)))
                .where(_certs.c.kind == "claim", _certs.c.revoked_at.is_(None)).order_by(_certs.c.name)
            ).all()
        for r in devices:
            if _aware(r.not_after) > now:
                topics = (f"devices.{r.name}.>",)
                yield BrokerIdentity(subject_dn("device", r.name, r.serial), topics, topics)
        for r in claims:
            if _aware(r.not_after) > now:
                yield BrokerIdentity(subject_dn("claim", r.name, r.serial), (f"provision.{r.name}.*.request",),
                                     (f"provision.{r.name}.*.response",))


def _aware(value: datetime) -> datetime:
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)

