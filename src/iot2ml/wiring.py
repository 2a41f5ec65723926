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


def monitor_context(settings: Any, catalog: Any, lake: Any) -> Any:
    """The ``monitor.kinds.Context`` for ``settings``: the lake, the catalog, :class:`ModelOps` and the devices."""
    from .auth.store import Devices
    from .monitor.kinds import Context

    return Context(lake, catalog, settings, ModelOps(settings, catalog), Devices(catalog))
