"""The control plane of deployments: what ``iot2ml deploy`` and ``PUT /api/v1/deployments/{name}`` do.

``deploy`` checks a requested change before anything is stored: the options make sense together,
every version or alias the new spec names exists in the model registry, a stream table or device
type it binds is a device type of the catalog and no other deployment answers that device type.
Only then is the spec stored, as one audited event. The CLI and the API both call it, so they
accept and refuse the same requests with the same reasons.

The registry is passed in (anything with MLflow's ``get_registered_model``, ``get_model_version``
and ``get_model_version_by_alias``), so this module imports no MLflow; its errors are translated
here into ``NotFound`` (no such model, version or alias) or ``Transient`` (registry unreachable).
"""

from __future__ import annotations

from typing import Any

from ..core.catalog import Catalog
from ..core.errors import AlreadyExists, InvalidInput, NotFound, Transient
from .deployments import Deployment, Deployments, build_spec, parse_rollback_on

PREDICT_PATH = "/api/v1/models/{name}/predict"

#: MLflow error codes that mean "there is no such thing" (an unset alias is reported as a bad parameter).
_MISSING = ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE")


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


def _known_versions(client: Any, name: str) -> str:
    try:
        found = sorted(int(mv.version) for mv in client.search_model_versions(f"name='{name}'"))
    except Exception:  # noqa: BLE001 - only a hint in an error message
        return ""
    return f" (it has {', '.join(map(str, found))})" if found else ""


def resolve(client: Any, name: str, ref: str) -> int:
    """The version number ``ref`` (a number or an alias) stands for in the registry, now."""
    try:
        if ref.isdigit():
            return int(client.get_model_version(name, ref).version)
        return int(client.get_model_version_by_alias(name, ref).version)
    except Exception as err:  # the registry's own error types stay behind this boundary
        if getattr(err, "error_code", None) not in _MISSING:
            raise Transient(f"the model registry cannot be read: {err}") from err
        what = f"no version {ref}" if ref.isdigit() else f"no version with alias {ref!r}"
        raise NotFound(f"model {name!r} has {what}{_known_versions(client, name)}: "
                       "see 'iot2ml models list'") from None


def check_model(client: Any, name: str) -> None:
    """``NotFound`` unless ``name`` is a registered model."""
    try:
        client.get_registered_model(name)
    except Exception as err:  # see resolve
        if getattr(err, "error_code", None) not in _MISSING:
            raise Transient(f"the model registry cannot be read: {err}") from err
        raise NotFound(f"model {name!r} is not registered: train it first ('iot2ml train ... --name {name}'), "
                       "see 'iot2ml models list'") from None


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


def deploy(deployments: Deployments, catalog: Catalog, registry: Any, name: str, *, who: str,
           version: str | None = None, canary: float | None = None, bake_seconds: float | None = None,
           rollback_on: str | dict[str, float] | None = None, ab: str | None = None, shadow: str | None = None,
           stream: str | None = None, devices: str | None = None, reason: str = "") -> dict[str, Any]:
    """Check, build and store the deployment ``iot2ml deploy NAME ...`` asks for; the stored state's
    :func:`summary` with ``action``. ``stream=""`` / ``devices=""`` unbind; nothing is stored on error."""
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

    check_model(registry, name)
    resolved = {v.ref: resolve(registry, name, v.ref) for v in spec.variants}
    for option, type_name in (("stream", stream), ("devices", devices)):
        if type_name:
            try:
                catalog.get_type(type_name)
            except NotFound:
                known = ", ".join(t.name for t in catalog.list_types()) or "none yet"
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
