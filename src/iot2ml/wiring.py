"""Composition root for the monitor: what it may do with models, handed in rather than imported.

``monitor/`` is a service like ``ml/`` and ``serve/`` and must not import them (the layers in
``pyproject.toml``). Drift and quality rules need a model's registry entry and its reference
profile; a ``--retrain`` rule trains a challenger and rolls it out as a canary. :class:`ModelOps`
does those with ``ml`` and ``serve``; :func:`monitor_context` builds the ``monitor.kinds.Context``
every composition root (the ``monitor`` component, the CLI, the API) hands to the monitor.
"""

from __future__ import annotations

import json
import logging
from typing import Any

log = logging.getLogger("iot2ml.wiring")

REFERENCE_PROFILE = "reference_profile.json"
"""The MLflow artifact (at the run's root) holding a version's reference profile (``monitor.profile``)."""


class ModelOps:
    """Registry reads, training and canary roll-outs for the monitor (``Context.models``)."""

    def __init__(self, settings: Any, catalog: Any) -> None:
        self.settings, self.catalog = settings, catalog
        self._bench: Any = None

    @property
    def bench(self) -> Any:
        if self._bench is None:
            from .ml.workbench import Workbench

            self._bench = Workbench(self.settings)
        return self._bench

    def describe(self, model: str, ref: str | int = "champion") -> dict[str, Any]:
        """The registry's description of ``model`` at ``ref`` (``NotFound`` names what exists)."""
        registry = self.bench.registry
        return registry.describe(model, str(registry.resolve(model, ref)))

    def params(self, model: str, version: int) -> dict[str, str]:
        """The training run's parameters of ``model`` version ``version`` (table, label/target, entity, freq...)."""
        described = self.describe(model, version)
        return dict(self.bench.registry.client.get_run(described["run_id"]).data.params)

    def reference_profile(self, model: str, version: int) -> Any:
        """The ``monitor.profile.Profile`` logged with ``model`` version ``version``, or None if it has none."""
        import mlflow

        from .monitor.profile import Profile

        described = self.describe(model, version)
        mlflow.set_tracking_uri(self.bench.registry.tracking_uri)
        try:
            data = mlflow.artifacts.load_dict(f"runs:/{described['run_id']}/{REFERENCE_PROFILE}")
        except Exception as err:  # noqa: BLE001 - a version trained before profiles existed has none
            log.info("%s v%s has no reference profile: %s", model, version, err)
            return None
        return Profile.from_json(json.dumps(data))

    def train(self, command: str, *, default_name: str) -> dict[str, Any]:
        """Run ``command`` (what follows ``iot2ml train``, e.g. ``"classify --table wine --label quality"``)
        and register the new version; the registry's description of it (its ``aliases`` say whether it
        became the champion)."""
        from .ml.jobs import TrainJob
        from .ml.scheduler import parse_train_args

        job = parse_train_args(command, default_name=default_name)
        return self.bench.train(TrainJob(task=job["task"], table=job["table"], name=job["name"],
                                         options=job["options"], where=job["where"]))

    def check_train(self, command: str, *, default_name: str) -> dict[str, Any]:
        """The job ``command`` stands for, checked without training (``InvalidInput`` with the reason)."""
        from .ml.scheduler import parse_train_args

        return parse_train_args(command, default_name=default_name)

    def deploy_canary(self, model: str, version: int, *, percent: float, bake_seconds: float | None,
                      who: str, reason: str) -> dict[str, Any]:
        """Send ``percent`` of ``model``'s traffic to ``version`` for the bake time, with the deployment's
        usual auto-rollback; the stored deployment's summary."""
        from .auth.store import Devices
        from .serve.control import deploy
        from .serve.deployments import Deployments

        return deploy(Deployments(self.catalog), Devices(self.catalog), self.bench.registry, model, who=who,
                      version=str(version), canary=percent, bake_seconds=bake_seconds, reason=reason)


    def pin_primary(self, model: str, *, who: str, reason: str) -> dict[str, Any] | None:
        """Pin ``model``'s deployed primary to the version its alias (``champion``) names now, keeping
        the rest of the deployment, so that moving the alias does not switch traffic (the same version
        answers). ``{"version", "alias", "generation"}``: ``alias`` is None when the primary named a
        version already (nothing stored); None when ``model`` is not deployed."""
        from dataclasses import replace

        from .core.errors import Transient
        from .serve.deployments import Deployments, Variant

        deployments = Deployments(self.catalog)
        current = deployments.get(model)
        if current is None or current.primary is None:
            return None
        alias = current.primary.ref
        if alias.isdigit():
            return {"version": int(alias), "alias": None, "generation": current.generation}
        version = self.bench.registry.resolve(model, alias)
        variants = tuple(Variant(str(version), "primary") if v.role == "primary" else v for v in current.variants)
        stored = deployments.put(replace(current, variants=variants), who=who, action="pin", reason=reason,
                                 expect_generation=current.generation)
        if stored.generation != current.generation + 1:
            raise Transient(f"deployment {model!r} changed while its primary was being pinned: retry")
        return {"version": version, "alias": alias, "generation": stored.generation}

    def unpin_primary(self, model: str, pinned: dict[str, Any], *, who: str, reason: str) -> bool:
        """Let the primary follow ``pinned["alias"]`` again, if the deployment is still the one
        :meth:`pin_primary` stored (a later change wins); whether it did."""
        from dataclasses import replace

        from .serve.deployments import Deployments, Variant

        deployments = Deployments(self.catalog)
        current = deployments.get(model)
        if current is None or current.generation != pinned["generation"] or not pinned.get("alias"):
            return False
        variants = tuple(Variant(pinned["alias"], "primary") if v.role == "primary" else v for v in current.variants)
        stored = deployments.put(replace(current, variants=variants), who=who, action="unpin", reason=reason,
                                 expect_generation=current.generation)
        return stored.generation == current.generation + 1


def monitor_context(settings: Any, catalog: Any, lake: Any) -> Any:
    """The ``monitor.kinds.Context`` for ``settings``: the lake, the catalog, :class:`ModelOps` and the devices."""
    from .auth.store import Devices
    from .monitor.kinds import Context

    return Context(lake, catalog, settings, ModelOps(settings, catalog), Devices(catalog))
