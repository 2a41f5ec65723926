"""Deployments: which model versions answer for a model name, with what share of traffic.

A deployment is a list of variants. A variant names a version (``"7"``) or follows an alias
(``"champion"``: a new champion answers without a restart) and has a role:

- ``primary``: answers whatever no other variant takes (blue/green: switch it, roll back instantly);
- ``canary``: takes ``weight`` % of requests during ``bake_seconds``; promoted to primary when the
  bake ends within the ``rollback_on`` thresholds, rolled back as soon as one is crossed;
- ``ab``: variants split traffic by weight, sticky per device (or per client key);
- ``shadow``: gets a copy of every request; its answer is logged, never returned.

State lives in the catalog database (tables ``deployments`` and ``deployment_events``), so it
survives restarts and every serving process sees the same; every change is an event (who, when,
what, the whole spec), and ``rollback`` restores the spec before the last change.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError

from ..core.catalog import Catalog, metadata
from ..core.errors import InvalidInput, NotFound, Transient

ROLES = ("primary", "canary", "ab", "shadow")
THRESHOLDS = ("error_rate", "p99_ms", "p50_ms")

_deployments = sa.Table(
    "deployments", metadata,
    sa.Column("name", sa.String(128), primary_key=True),
    sa.Column("spec_json", sa.Text, nullable=False),
    sa.Column("generation", sa.Integer, nullable=False),
    sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
)
_events = sa.Table(
    "deployment_events", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("name", sa.String(128), nullable=False, index=True),
    sa.Column("generation", sa.Integer, nullable=False),
    sa.Column("at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("action", sa.String(32), nullable=False),
    sa.Column("who", sa.String(128), nullable=False),
    sa.Column("reason", sa.Text, nullable=True),
    sa.Column("spec_json", sa.Text, nullable=True),  # the spec after the change (None: removed)
)


@dataclass(frozen=True)
class Variant:
    ref: str  # a version number or an alias such as "champion"
    role: str = "primary"
    weight: float = 100.0  # % of requests (primary: the rest)

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise InvalidInput(f"variant role {self.role!r} is not one of {', '.join(ROLES)}")
        if not self.ref or not (self.ref.isdigit() or re.fullmatch(r"[A-Za-z][\w-]*", self.ref)):
            raise InvalidInput(f"version {self.ref!r} is neither a number nor an alias such as 'champion'")
        if not 0.0 <= float(self.weight) <= 100.0:
            raise InvalidInput(f"weight {self.weight} of version {self.ref} must be between 0 and 100")

    @property
    def label(self) -> str:
        """How responses and logs name the variant: ``primary``, ``canary``, ``ab-7``, ``shadow``."""
        return f"ab-{self.ref}" if self.role == "ab" else self.role


@dataclass(frozen=True)
class Deployment:
    name: str
    variants: tuple[Variant, ...]
    stream: str | None = None  # table / device type whose arriving rows are scored
    devices: str | None = None  # device type whose MQTT requests without 'model' this answers
    bake_seconds: float | None = None
    rollback_on: dict[str, float] = field(default_factory=dict)
    canary_since: str | None = None  # ISO time the canary started taking traffic
    generation: int = 0
    updated_at: str | None = None

    def __post_init__(self) -> None:
        roles = [v.role for v in self.variants]
        answering = [v for v in self.variants if v.role != "shadow"]
        if not answering:
            raise InvalidInput(f"deployment {self.name!r} has no variant that answers: add a primary or A/B variants")
        if "ab" in roles and ("primary" in roles or "canary" in roles):
            raise InvalidInput("an A/B deployment splits all traffic by weight: it has no primary or canary")
        if "ab" in roles:
            total = sum(v.weight for v in self.variants if v.role == "ab")
            if abs(total - 100.0) > 1e-6:
                raise InvalidInput(f"A/B weights add up to {total:g}, not 100: e.g. --ab 6:50,7:50")
        elif roles.count("primary") != 1:
            raise InvalidInput(f"deployment {self.name!r} needs exactly one primary variant")
        if roles.count("canary") > 1 or roles.count("shadow") > 1:
            raise InvalidInput("at most one canary and one shadow variant")
        unknown = [k for k in self.rollback_on if k not in THRESHOLDS]
        if unknown:
            raise InvalidInput(f"rollback threshold {unknown[0]!r} is not known: use {', '.join(THRESHOLDS)}")

    @property
    def primary(self) -> Variant | None:
        return next((v for v in self.variants if v.role == "primary"), None)

    @property
    def canary(self) -> Variant | None:
        return next((v for v in self.variants if v.role == "canary"), None)

    @property
    def shadow(self) -> Variant | None:
        return next((v for v in self.variants if v.role == "shadow"), None)

    def route(self, key: str | None, draw: float) -> Variant:
        """The variant that answers. ``key`` (a device id) makes the choice sticky; else ``draw`` in [0, 1)."""
        point = _bucket(self.name, key) if key else draw * 100.0
        answering = [v for v in self.variants if v.role in ("ab", "canary")]
        edge = 0.0
        for variant in answering:
            edge += variant.weight
            if point < edge:
                return variant
        primary = self.primary
        return primary if primary is not None else answering[-1]

    def to_json(self) -> str:
        data = asdict(self)
        data.pop("generation", None)
        data.pop("updated_at", None)
        return json.dumps(data, sort_keys=True)

    @classmethod
    def from_json(cls, text: str, *, generation: int = 0, updated_at: str | None = None) -> Deployment:
        data = json.loads(text)
        variants = tuple(Variant(**v) for v in data.pop("variants"))
        return cls(variants=variants, generation=generation, updated_at=updated_at, **data)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "generation": self.generation, "updated_at": self.updated_at,
                "variants": [{"version": v.ref, "role": v.role, "weight": v.weight, "variant": v.label}
                             for v in self.variants],
                "stream": self.stream, "devices": self.devices, "bake_seconds": self.bake_seconds,
                "rollback_on": self.rollback_on, "canary_since": self.canary_since}


def _bucket(name: str, key: str) -> float:
    """A stable point in [0, 100) per (deployment, key): the same device always lands on the same side."""
    digest = hashlib.blake2b(f"{name}\0{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % 10_000 / 100.0


def parse_rollback_on(text: str | None) -> dict[str, float]:
    """``"error_rate>0.01,p99_ms>50"`` -> ``{"error_rate": 0.01, "p99_ms": 50.0}``."""
    out: dict[str, float] = {}
    for part in (text or "").split(","):
        part = part.strip()
        if not part:
            continue
        match = re.fullmatch(r"([a-z0-9_]+)\s*>\s*([0-9.eE+-]+)", part)
        try:
            limit = float(match.group(2)) if match and match.group(1) in THRESHOLDS else None
        except ValueError:  # e.g. "p99_ms>1.2.3"
            limit = None
        if limit is None:
            raise InvalidInput(f"rollback condition {part!r} is not understood: use e.g. "
                               "'error_rate>0.01,p99_ms>50' with " + ", ".join(THRESHOLDS))
        out[match.group(1)] = limit
    return out


def parse_ab(text: str) -> tuple[Variant, ...]:
    """``"6:50,7:50"`` -> two A/B variants."""
    variants = []
    for part in text.split(","):
        ref, _, weight = part.strip().partition(":")
        try:
            variants.append(Variant(ref=ref.strip(), role="ab", weight=float(weight)))
        except ValueError:
            raise InvalidInput(f"A/B part {part!r} must be VERSION:WEIGHT, e.g. --ab 6:50,7:50") from None
    if len(variants) < 2:
        raise InvalidInput("an A/B test needs at least two versions, e.g. --ab 6:50,7:50")
    return tuple(variants)


def _now() -> datetime:
    return datetime.now(UTC)


class _Raced(Exception):
    """Another writer changed a deployment between our read and our write."""


class Deployments:
    """Deployment specs and their audit trail in the catalog database."""

    def __init__(self, catalog: Catalog) -> None:
        self.catalog = catalog
        catalog.register(_deployments, _events)

    def get(self, name: str) -> Deployment | None:
        with self.catalog.connect() as conn:
            row = conn.execute(sa.select(_deployments).where(_deployments.c.name == name)).first()
        return None if row is None else self._from_row(row)

    def list(self) -> list[Deployment]:
        with self.catalog.connect() as conn:
            rows = conn.execute(sa.select(_deployments).order_by(_deployments.c.name)).all()
        return [self._from_row(r) for r in rows]

    def stamp(self) -> tuple[tuple[str, int], ...]:
        """Cheap change detector: (name, generation) of every deployment."""
        with self.catalog.connect() as conn:
            rows = conn.execute(sa.select(_deployments.c.name, _deployments.c.generation)).all()
        return tuple(sorted((r.name, int(r.generation)) for r in rows))

    @staticmethod
    def _from_row(row: Any) -> Deployment:
        at = row.updated_at
        if at is not None and at.tzinfo is None:
            at = at.replace(tzinfo=UTC)
        return Deployment.from_json(row.spec_json, generation=int(row.generation),
                                    updated_at=at.isoformat() if at else None)

    def put(self, spec: Deployment, *, who: str, action: str, reason: str = "",
            expect_generation: int | None = None) -> Deployment:
        """Store ``spec`` as the new state of its deployment (one event). With ``expect_generation``
        the change applies only if nobody changed the deployment since; else nothing is stored and
        the state in force is returned (its generation is not ``expect_generation + 1``)."""
        for _ in range(5):
            now = _now()
            try:
                with self.catalog.begin() as conn:
                    row = conn.execute(sa.select(_deployments).where(_deployments.c.name == spec.name)
                                       .with_for_update()).first()
                    current = int(row.generation) if row is not None else 0
                    if expect_generation is not None and current != expect_generation:
                        return self._from_row(row) if row is not None else spec
                    # Generations only grow, across an undeploy too: a process that served generation 3
                    # before the undeploy must not take a redeploy's generation 1 for old news.
                    last = current if row is not None else int(conn.execute(
                        sa.select(sa.func.coalesce(sa.func.max(_events.c.generation), 0))
                        .where(_events.c.name == spec.name)).scalar_one())
                    generation = last + 1
                    text = spec.to_json()
                    if row is None:
                        conn.execute(_deployments.insert().values(name=spec.name, spec_json=text,
                                                                  generation=generation, updated_at=now))
                    elif conn.execute(_deployments.update().where(  # SQLite has no row lock: compare and set
                            _deployments.c.name == spec.name, _deployments.c.generation == current).values(
                            spec_json=text, generation=generation, updated_at=now)).rowcount != 1:
                        raise _Raced()
                    conn.execute(_events.insert().values(name=spec.name, generation=generation, at=now,
                                                         action=action, who=who, reason=reason or None,
                                                         spec_json=text))
                return replace(spec, generation=generation, updated_at=now.isoformat())
            except (_Raced, IntegrityError):  # another process changed it between our read and write
                continue
        raise Transient(f"deployment {spec.name!r} keeps changing under this {action}: retry")

    def remove(self, name: str, *, who: str, reason: str = "") -> None:
        now = _now()
        with self.catalog.begin() as conn:
            row = conn.execute(sa.select(_deployments).where(_deployments.c.name == name)).first()
            if row is None:
                raise NotFound(f"model {name!r} is not deployed: see 'iot2ml deployments list'")
            conn.execute(_deployments.delete().where(_deployments.c.name == name))
            conn.execute(_events.insert().values(name=name, generation=int(row.generation) + 1, at=now,
                                                 action="undeploy", who=who, reason=reason or None, spec_json=None))

    def previous(self, name: str) -> Deployment | None:
        """The spec in force before the current one (what ``rollback`` restores)."""
        current = self.get(name)
        if current is None:
            raise NotFound(f"model {name!r} is not deployed: see 'iot2ml deployments list'")
        with self.catalog.connect() as conn:
            rows = conn.execute(sa.select(_events.c.spec_json).where(
                _events.c.name == name, _events.c.spec_json.is_not(None)).order_by(_events.c.id.desc())).all()
        target = current.to_json()
        for r in rows:  # the newest spec that differs from the current one
            if r.spec_json != target:
                return Deployment.from_json(r.spec_json)
        return None

    def rollback(self, name: str, *, who: str, reason: str = "", action: str = "rollback",
                 expect_generation: int | None = None) -> Deployment:
        before = self.previous(name)
        if before is None:
            raise NotFound(f"deployment {name!r} has no earlier state to roll back to")
        since = _now().isoformat() if before.canary is not None else None  # a restored canary bakes anew
        return self.put(replace(before, canary_since=since), who=who, action=action, reason=reason, expect_generation=expect_generation)

    def events(self, name: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
        query = sa.select(_events).order_by(_events.c.id.desc()).limit(limit)
        if name:
            query = query.where(_events.c.name == name)
        with self.catalog.connect() as conn:
            rows = conn.execute(query).all()
        out = []
        for r in rows:
            item = {k: v for k, v in r._mapping.items() if k != "spec_json"}
            at = item["at"]
            item["at"] = (at if at.tzinfo else at.replace(tzinfo=UTC)).isoformat()
            item["spec"] = json.loads(r.spec_json) if r.spec_json else None
            out.append(item)
        return out


def build_spec(current: Deployment | None, name: str, *, version: str | None = None, canary: float | None = None,
               bake_seconds: float | None = None, rollback_on: dict[str, float] | None = None,
               ab: str | None = None, shadow: str | None = None, stream: str | None = None,
               devices: str | None = None) -> Deployment:
    """The spec ``iot2ml deploy`` asks for, starting from the current one (stream and device binding stay)."""
    keep_stream = stream if stream is not None else (current.stream if current else None)
    keep_devices = devices if devices is not None else (current.devices if current else None)
    if ab and (version or canary is not None):
        raise InvalidInput("--ab names its versions itself: do not combine it with --version or --canary")
    base_primary = (current.primary if current and current.primary else None) or Variant("champion")
    since = None
    if ab:
        variants: tuple[Variant, ...] = parse_ab(ab)
    elif canary is not None:
        if not version:
            raise InvalidInput("--canary needs --version: the version that takes the canary share")
        if not 0 < canary < 100:
            raise InvalidInput(f"--canary {canary:g} must be a share between 0 and 100 (per cent)")
        variants = (Variant(base_primary.ref, "primary"), Variant(version, "canary", canary))
        since = _now().isoformat()
    elif version:
        variants = (Variant(version, "primary"),)
    elif current is not None and (shadow or stream is not None or devices is not None):
        variants = current.variants  # a new --shadow replaces the current one below
        since = current.canary_since
    else:
        variants = (Variant("champion", "primary"),)
    if shadow:
        variants = (*[v for v in variants if v.role != "shadow"], Variant(shadow, "shadow", 0.0))
    thresholds = rollback_on if rollback_on is not None else (
        {"error_rate": 0.01} if canary is not None else (current.rollback_on if current and since else {}))
    bake = bake_seconds if bake_seconds is not None else (
        300.0 if canary is not None else (current.bake_seconds if current and since else None))
    return Deployment(name=name, variants=variants, stream=keep_stream or None, devices=keep_devices or None,
                      bake_seconds=bake, rollback_on=thresholds, canary_since=since)
