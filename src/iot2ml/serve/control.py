"""The control plane of deployments: what ``iot2ml deploy`` and ``PUT /api/v1/deployments/{name}`` do.

``deploy`` checks a requested change before anything is stored: the options make sense together,
every version or alias the new spec names exists in the model registry, a stream table or device
type it binds is a device type of the catalog and no other deployment answers that device type.
Only then is the spec stored, as one audited event. The CLI and the API both call it, so they
accept and refuse the same requests with the same reasons.

The registry is passed in (an ``ml.registry.Registry``: its ``resolve`` turns a version or alias
into a version number, or raises ``NotFound`` / ``Transient``), so this module imports no MLflow.

A change is done when the serving processes say so: ``confirm`` asks each running one (found by
its run file, ``data_dir/run/serve.json`` and ``api.json``) to apply the catalog now
(``POST /api/v1/serving/refresh``, authorised by the data dir's control secret) until it answers
with the deployment's state in the catalog (its generation, its models loaded; or its absence),
and raises ``NotConfirmed`` naming each one that did not within the timeout.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..core.devices import DeviceDirectory
from ..core.errors import (
    AlreadyExists,
    InvalidInput,
    Iot2mlError,
    NotConfirmed,
    NotFound,
)
from .deployments import Deployment, Deployments, build_spec, parse_rollback_on

PREDICT_PATH = "/api/v1/models/{name}/predict"


def predict_path(name: str) -> str:
    """Where the serving runtime answers predictions of deployment ``name``."""
    return PREDICT_PATH.format(name=name)


def action_for(*, version: str | None = None, canary: float | None = None, ab: str | None = None,
               shadow: str | None = None, stream: str | None = None, devices: str | None = None) -> str:
    """The audit action of a deploy request: ``ab``, ``canary``, ``deploy``, ``shadow``, ``stream`` or ``devices``."""
    if ab:
        return "ab"
    if canary is not None:
        return "canary"
    if version:
        return "deploy"
    if shadow:
        return "shadow"
    if stream is not None:
        return "stream"
    if devices is not None:
        return "devices"
    return "deploy"


def summary(spec: Deployment, resolved: dict[str, int] | None = None) -> dict[str, Any]:
    """``spec.describe()`` plus each variant's share of requests (and the version its ref resolved to)
    and the predict path: what the CLI prints and the API answers."""
    out = spec.describe()
    taken = sum(v.weight for v in spec.variants if v.role in ("ab", "canary"))
    for item, variant in zip(out["variants"], spec.variants):
        item["share"] = (max(0.0, 100.0 - taken) if variant.role == "primary"
                         else 0.0 if variant.role == "shadow" else variant.weight)
        if resolved is not None and variant.ref in resolved:
            item["model_version"] = resolved[variant.ref]
    out["predict"] = predict_path(spec.name)
    return out


def deploy(deployments: Deployments, directory: DeviceDirectory, registry: Any, name: str, *, who: str,
           version: str | None = None, canary: float | None = None, bake_seconds: float | None = None,
           rollback_on: str | dict[str, float] | None = None, ab: str | None = None, shadow: str | None = None,
           stream: str | None = None, devices: str | None = None, reason: str = "") -> dict[str, Any]:
    """Check, build and store the deployment ``iot2ml deploy NAME ...`` asks for; the stored state's
    :func:`summary` with ``action``. ``stream=""`` / ``devices=""`` unbind; nothing is stored on error.
    ``directory`` knows the device types (``auth.store.Devices``), ``registry`` the model versions."""
    version = None if version is None else str(version).strip() or None
    shadow = None if shadow is None else str(shadow).strip() or None
    if bake_seconds is not None and not bake_seconds > 0:
        raise InvalidInput(f"bake {bake_seconds:g} s must be a positive duration such as 5m or 300")
    if isinstance(rollback_on, dict):
        try:
            thresholds: dict[str, float] | None = {str(k): float(v) for k, v in rollback_on.items()}
        except (TypeError, ValueError):
            raise InvalidInput(f"rollback thresholds {rollback_on!r} must be numbers, "
                               "e.g. {\"error_rate\": 0.01, \"p99_ms\": 50}") from None
    else:
        thresholds = None if rollback_on is None else parse_rollback_on(rollback_on)
    if (bake_seconds is not None or thresholds) and canary is None:
        raise InvalidInput("bake time and rollback thresholds judge a canary: add --canary PCT with --version")
    current = deployments.get(name)
    spec = build_spec(current, name, version=version, canary=canary, bake_seconds=bake_seconds,
                      rollback_on=thresholds, ab=ab, shadow=shadow, stream=stream, devices=devices)

    resolved = {v.ref: registry.resolve(name, v.ref) for v in spec.variants}
    for option, type_name in (("stream", stream), ("devices", devices)):
        if type_name:
            try:
                directory.get_type(type_name)
            except NotFound:
                known = ", ".join(t.name for t in directory.list_types()) or "none yet"
                raise NotFound(f"{option} {type_name!r} is not a device type (known: {known}): "
                               "see 'iot2ml types list'") from None
    if devices:
        taken = next((d.name for d in deployments.list() if d.devices == devices and d.name != name), None)
        if taken is not None:
            raise AlreadyExists(f"devices of type {devices!r} are answered by deployment {taken!r} already: "
                                f"unbind it first with 'iot2ml deploy {taken} --devices \"\"'")

    action = action_for(version=version, canary=canary, ab=ab, shadow=shadow, stream=stream, devices=devices)
    stored = deployments.put(spec, who=who, action=action, reason=reason)
    return {**summary(stored, resolved), "action": action}


# --------------------------------------------------------------------------- confirmation

SERVING_COMPONENTS = ("serve", "api")
"""Components that answer predictions, each with its own runtime (their run files name them)."""


@dataclass(frozen=True)
class Peer:
    """A serving process to confirm a change with. ``refresh(timeout)`` makes it apply the catalog
    now and answers what it serves (``GET /api/v1/serving``'s ``deployments``)."""

    label: str
    """``serve (pid 4711, http://127.0.0.1:8090)``: how messages name it."""
    log: str
    """Where to look when it does not confirm."""
    refresh: Callable[[float], list[dict[str, Any]]]


def serves(described: list[dict[str, Any]], name: str, want: Deployment | None) -> bool:
    """Whether a runtime's ``describe()`` shows ``want`` for ``name``: its generation (and time, as a
    redeployed name starts again at generation 1), or no ``name`` at all when ``want`` is ``None``."""
    item = next((d for d in described if d.get("name") == name), None)
    if want is None:
        return item is None
    return item is not None and item.get("generation") == want.generation and item.get("updated_at") == want.updated_at


def _http_peer(data_dir: Path, component: str, info: dict[str, Any]) -> Peer:
    import httpx

    from ..core.runtime import control_token, http_verify, tls_verify

    url = str(info["url"]).replace("://0.0.0.0:", "://127.0.0.1:")
    verify = http_verify(tls_verify(info))
    headers = {"Authorization": f"Bearer {control_token(data_dir)}"}

    def refresh(timeout: float) -> list[dict[str, Any]]:
        try:
            r = httpx.post(f"{url}/api/v1/serving/refresh", headers=headers, timeout=max(timeout, 0.1),
                           verify=verify)
        except httpx.HTTPError as err:
            raise NotConfirmed(f"did not answer ({type(err).__name__}: {err})") from None
        if r.status_code != 200:
            raise NotConfirmed(f"answered {r.status_code}: {r.text[:300]}")
        return r.json()["deployments"]

    log = Path(data_dir) / "run" / f"{component}.log"
    return Peer(f"{component} (pid {info.get('pid')}, {url})", f"its log ({log} under 'iot2ml up')", refresh)


def serving_peers(data_dir: Path, *, skip_pid: int | None = None) -> list[Peer]:
    """The serving processes running on ``data_dir`` (by their run files; stale files are skipped)."""
    from ..core.runtime import pid_alive, read_run_info

    peers = []
    for component in SERVING_COMPONENTS:
        try:
            info = read_run_info(data_dir, component)
        except (Iot2mlError, ValueError):
            continue
        pid = int(info.get("pid") or 0)
        if "url" not in info or pid == skip_pid or not pid_alive(pid):
            continue
        peers.append(_http_peer(data_dir, component, info))
    return peers


def confirm(peers: list[Peer], name: str, current: Callable[[], Deployment | None], *,
            timeout: float) -> list[str]:
    """Wait until every peer serves ``current()`` (the deployment's state in the catalog, re-read on
    each try, so a later change such as a canary promotion counts too); the labels of the peers.
    ``NotConfirmed`` names each peer that did not within ``timeout`` seconds and what it did instead."""
    deadline = time.monotonic() + timeout

    def one(peer: Peer) -> str | None:
        last = "never answered"
        while True:
            want = current()
            try:
                if serves(peer.refresh(max(0.1, deadline - time.monotonic())), name, want):
                    return None
                what = "still serves it" if want is None else f"does not serve generation {want.generation} yet"
                last = f"{what} (a model that does not load keeps the previous state answering)"
            except NotConfirmed as err:
                last = str(err)
            if time.monotonic() + 0.2 >= deadline:
                goal = f"stop serving {name}" if want is None else f"load generation {want.generation} of {name}"
                return (f"{peer.label} did not {goal} within {timeout:g} s: {last}; see {peer.log}")
            time.sleep(0.2)

    if not peers:
        return []
    with ThreadPoolExecutor(max_workers=len(peers), thread_name_prefix="iot2ml-confirm") as pool:
        failures = [f for f in pool.map(one, peers) if f]
    if failures:
        raise NotConfirmed("; ".join(failures) + ". The change is stored and applies when they do "
                           "(or on their next poll of the catalog)")
    return [p.label for p in peers]
