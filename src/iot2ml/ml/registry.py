"""Tracking and registry on MLflow: every training is a run, every model a registered version.

Tracking lives under the data dir by default (``sqlite:///<data_dir>/mlflow.db``, artifacts in
``<data_dir>/mlartifacts``), so ``mlflow ui --backend-store-uri sqlite:///<data_dir>/mlflow.db``
shows our runs; a PostgreSQL URL works the same. MLflow is imported only here, and only when used.

Every run records the newest reading it was trained on (tag ``iot2ml.trained_until``).

Promotion: a new version gets alias ``challenger``; it becomes ``champion`` only if it strictly
beats the current champion on the same holdout of data neither was trained on: the units of the
new training's data newer than the champion's ``trained_until`` (``compare``, from the task). The
new version is scored by predictions of a model that did not train on those units, the champion
by predicting them. Without such a holdout (no newer data, too little, or a champion that cannot
score it) the champion is kept and the reason says so. The decision, metric, both scores and the
holdout are tags of the run (``iot2ml.promotion.*``). The first version is champion.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..core.errors import NotFound, Transient
from .base import NoFairHoldout, TrainResult, iso, newer_than, utc

log = logging.getLogger("iot2ml.ml")

CHAMPION = "champion"
CHALLENGER = "challenger"
TRAINED_UNTIL = "iot2ml.trained_until"
"""Run tag: the newest reading (ISO 8601, UTC) the version was trained on."""

Compare = Callable[[Any, Any], dict[str, Any]]
"""``compare(champion_model, since) -> {"new", "champion", "units", "holdout"}``; see ``Task.compare``."""

_MISSING = ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE")
"""MLflow error codes that mean "there is no such thing" (an unset alias is reported as a bad parameter)."""


def tracking_uri_for(data_dir: Path, configured: str | None = None) -> str:
    """The configured tracking URI (``postgresql://`` goes through psycopg 3), else sqlite in the data dir."""
    if configured:
        from ..core.catalog import normalise_url

        return normalise_url(configured)
    return f"sqlite:///{(Path(data_dir) / 'mlflow.db').absolute()}"


def _method(params: dict[str, str]) -> dict[str, Any] | None:
    """What an anomaly training chose (its ``method``, ``window``, ``threshold`` and how it chose), from
    the run's parameters; None for tasks without a method choice."""
    if "method" not in params:
        return None
    keys = ("method", "window", "period", "cycles", "threshold", "selection")
    return {k: params[k] for k in keys if params.get(k) not in (None, "None", "null", "")}


class Registry:
    """Runs and model versions in MLflow."""

    def __init__(self, tracking_uri: str, *, artifact_root: str | None = None) -> None:
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")
        # MLflow 3 reports usage to config.mlflow-telemetry.io unless told not to: a platform that runs
        # on a user's machine does not phone home on their behalf (set it to "false" to opt in).
        os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
        import warnings

        warnings.filterwarnings("ignore", module=r"mlflow(\..*)?")
        logging.getLogger("mlflow").setLevel(logging.ERROR)
        import mlflow
        from mlflow import MlflowClient

        # MLflow configures its own logger on import; keep only its errors, and drop the advice to
        # type-hint predict (our pyfunc takes whatever frame the task takes).
        logging.getLogger("mlflow").setLevel(logging.ERROR)
        warnings.filterwarnings("ignore", message=r".*type hints to the `predict` method.*")
        if artifact_root and artifact_root.startswith("s3://"):
            import importlib.util

            if importlib.util.find_spec("boto3") is None:
                from ..core.errors import ConfigError

                raise ConfigError(f"mlflow_artifact_root {artifact_root!r} needs boto3: pip install 'iot2ml[s3]'")
        self.tracking_uri = tracking_uri
        self.artifact_root = artifact_root
        self._mlflow = mlflow
        mlflow.set_tracking_uri(tracking_uri)
        mlflow.set_registry_uri(tracking_uri)
        self.client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)

    def _experiment(self, name: str) -> str:
        exp_name = f"iot2ml/{name}"
        found = self.client.get_experiment_by_name(exp_name)
        if found is not None:
            return found.experiment_id
        return self.client.create_experiment(exp_name, artifact_location=(
            f"{self.artifact_root.rstrip('/')}/{name}" if self.artifact_root else None))

    def log_training(
        self,
        name: str,
        result: TrainResult,
        *,
        data_versions: dict[str, int],
        params: dict[str, Any] | None = None,
        trained_until: Any = None,
        compare: Compare | None = None,
    ) -> dict[str, Any]:
        """Log a run, register the model as a new version of ``name``, decide champion/challenger.

        ``trained_until``: the newest reading of the training data (a timestamp, stored in UTC).
        ``compare(champion_model, since)`` scores this version and the champion on this training's
        data newer than ``since`` (the champion's ``trained_until``); without it the champion stays.
        """
        import mlflow
        import pandas as pd
        from mlflow.models import infer_signature

        from .pyfunc import TaskModel, utc_aware, utc_naive

        mlflow.set_tracking_uri(self.tracking_uri)
        experiment_id = self._experiment(name)
        with mlflow.start_run(experiment_id=experiment_id, run_name=f"{name}-{result.task}") as run:
            mlflow.log_params({k: _param(v) for k, v in {**(params or {}), **result.params}.items()})
            mlflow.log_metrics({k: float(v) for k, v in result.metrics.items() if _is_number(v)})
            mlflow.log_metrics({f"baseline_{k}": float(v) for k, v in result.baseline_metrics.items() if _is_number(v)})
            mlflow.set_tags({
                "iot2ml.task": result.task,
                "iot2ml.primary_metric": result.primary_metric,
                "iot2ml.greater_is_better": str(result.greater_is_better),
                "iot2ml.data_versions": json.dumps(data_versions),
                "iot2ml.features": json.dumps(result.features),
            })
            if trained_until is not None:
                mlflow.set_tag(TRAINED_UNTIL, utc(trained_until).isoformat())
            for key, value in result.artifacts.items():
                if isinstance(value, pd.DataFrame):
                    continue
                mlflow.log_dict(_jsonable(value), f"{key}.json")
            example = utc_naive(result.input_example)
            signature = None
            if example is not None:
                try:
                    signature = infer_signature(example, utc_naive(result.model.predict(utc_aware(example))))
                except Exception as err:  # noqa: BLE001 - a model without signature still serves
                    log.warning("no signature for %s: %s", name, err)
            with _quiet_stderr():  # "Successfully registered model ..." is printed, not logged
                info = mlflow.pyfunc.log_model(
                    name="model",
                    python_model=TaskModel(result.model, result.task),
                    signature=signature,
                    input_example=example,
                    registered_model_name=name,
                    pip_requirements=_requirements(),
                )
            version = str(info.registered_model_version)
            decision = self._promote(name, version, result, compare)
            mlflow.set_tags({f"iot2ml.promotion.{k}": str(v) for k, v in decision.items()})
            self.client.set_model_version_tag(name, version, "iot2ml.task", result.task)
            self.client.set_model_version_tag(name, version, "iot2ml.data_versions", json.dumps(data_versions))
            log.info("registered %s version %s (run %s): %s", name, version, run.info.run_id, decision["reason"])
        return self.describe(name, version)

    def _promote(self, name: str, version: str, result: TrainResult, compare: Compare | None) -> dict[str, Any]:
        metric = result.primary_metric
        self.client.set_registered_model_alias(name, CHALLENGER, version)
        try:
            champ = self.client.get_model_version_by_alias(name, CHAMPION)
        except Exception:  # noqa: BLE001 - MLflow raises its own error when the alias is unset
            champ = None
        if champ is None:
            self.client.set_registered_model_alias(name, CHAMPION, version)
            return {"champion": version, "metric": metric, "new_score": float(result.metrics[metric]),
                    "champion_score": "", "reason": "first version: champion"}
        since = self.client.get_run(champ.run_id).data.tags.get(TRAINED_UNTIL)
        kept = {"champion": champ.version, "metric": metric, "new_score": "", "champion_score": "",
                "compared_by": "not compared"}
        override = f"champion v{champ.version} kept; deploy version {version} explicitly to override"
        try:
            if compare is None:
                raise NoFairHoldout("this training passed no way to score the champion")
            since = newer_than(since)  # raises when the champion did not record it
            champion_model = self.load(name, CHAMPION, unwrap=True)
            duel = compare(champion_model, since)
            mine, theirs = float(duel["new"]), float(duel["champion"])
            if not (math.isfinite(mine) and math.isfinite(theirs)):
                raise NoFairHoldout(f"{metric} is not a number on {duel['holdout']} "
                                    f"(this version {mine}, the champion {theirs})")
        except NoFairHoldout as err:
            return {**kept, "reason": f"{err}: {override}"}
        except Exception as err:  # noqa: BLE001 - a failed comparison must not fail the training
            log.warning("could not compare %s version %s with champion v%s: %s", name, version, champ.version, err)
            return {**kept, "reason": f"comparison with the champion failed ({type(err).__name__}: {err}): {override}"}
        better = mine > theirs if result.greater_is_better else mine < theirs
        if better:
            self.client.set_registered_model_alias(name, CHAMPION, version)
        return {
            "champion": version if better else champ.version,
            "metric": metric,
            "new_score": mine,
            "champion_score": theirs,
            "holdout_units": int(duel["units"]),
            "holdout": duel["holdout"],
            "compared_by": f"same holdout: {int(duel['units'])} units newer than champion's data "
                           f"({iso(since)})",
            "reason": (f"version {version} {metric}={mine:.4g} {'beats' if better else 'does not beat'} "
                       f"champion v{champ.version} {metric}={theirs:.4g} on {duel['holdout']}"),
        }

    def resolve(self, name: str, ref: str | int) -> int:
        """The version number ``ref`` (a version number such as ``"7"`` or an alias such as
        ``"champion"``) stands for in the registry, now.

        ``NotFound`` names the versions and aliases the model has (or says it is not registered);
        ``Transient`` when the registry cannot be read. MLflow's own errors stay behind this method.
        """
        ref = str(ref).strip()
        try:
            found = (self.client.get_model_version(name, ref) if ref.isdigit()
                     else self.client.get_model_version_by_alias(name, ref))
            return int(found.version)
        except Exception as err:  # noqa: BLE001 - translated here, at the registry's boundary
            if getattr(err, "error_code", None) not in _MISSING:
                raise Transient(f"the model registry {self.tracking_uri} cannot be read: {err}") from err
        raise NotFound(self._missing(name, ref))

    def _missing(self, name: str, ref: str) -> str:
        """Why ``name``/``ref`` resolves to nothing, with what the model has instead."""
        try:
            model = self.client.get_registered_model(name)
            versions = sorted(int(mv.version) for mv in self.client.search_model_versions(f"name='{name}'"))
        except Exception as err:  # noqa: BLE001 - only the hint of an error message
            if getattr(err, "error_code", None) in _MISSING:
                return (f"model {name!r} is not registered: train it first ('iot2ml train ... --name {name}'), "
                        "see 'iot2ml models list'")
            versions, model = [], None
        aliases = dict(getattr(model, "aliases", None) or {})
        has = ", ".join(map(str, versions))
        if aliases:
            has += "; aliases " + ", ".join(f"{a} -> {v}" for a, v in sorted(aliases.items()))
        what = f"no version {ref}" if ref.isdigit() else f"no version with alias {ref!r}"
        return f"model {name!r} has {what}{f' (it has {has})' if has else ''}: see 'iot2ml models list'"

    def load(self, name: str, ref: str = CHAMPION, *, unwrap: bool = False) -> Any:
        """The model ``name@alias`` or ``name/version``; ``unwrap`` gives the task's own model object."""
        import mlflow

        uri = f"models:/{name}/{ref}" if str(ref).isdigit() else f"models:/{name}@{ref}"
        try:
            model = mlflow.pyfunc.load_model(uri)
        except Exception as err:
            raise NotFound(f"no model {uri}: see 'iot2ml models list'") from err
        return model.unwrap_python_model().model if unwrap else model

    def describe(self, name: str, version: str) -> dict[str, Any]:
        mv = self.client.get_model_version(name, version)
        run = self.client.get_run(mv.run_id)
        metrics = {k: v for k, v in run.data.metrics.items() if not k.startswith("baseline_")}
        baseline = {k.removeprefix("baseline_"): v for k, v in run.data.metrics.items() if k.startswith("baseline_")}
        aliases = sorted(getattr(mv, "aliases", []) or [])
        return {
            "name": name,
            "version": int(mv.version),
            "aliases": aliases,
            "task": run.data.tags.get("iot2ml.task"),
            "metrics": metrics,
            "baseline_metrics": baseline,
            "data_versions": json.loads(run.data.tags.get("iot2ml.data_versions", "{}")),
            "primary_metric": run.data.tags.get("iot2ml.primary_metric"),
            "promotion": run.data.tags.get("iot2ml.promotion.reason"),
            "compared_by": run.data.tags.get("iot2ml.promotion.compared_by"),
            "trained_until": run.data.tags.get(TRAINED_UNTIL),
            "method": _method(run.data.params),
            "run_id": mv.run_id,
        }

    def list_models(self) -> list[dict[str, Any]]:
        out = []
        try:
            models = self.client.search_registered_models()
        except Exception as err:
            raise Transient(f"MLflow tracking store {self.tracking_uri} cannot be read: {err}") from err
        for rm in models:
            for mv in self.client.search_model_versions(f"name='{rm.name}'"):
                out.append(self.describe(rm.name, mv.version))
        return sorted(out, key=lambda m: (m["name"], m["version"]))


@contextlib.contextmanager
def _quiet_stderr() -> Any:
    """Capture what MLflow prints to stderr; log it at debug level."""
    buffer = io.StringIO()
    with contextlib.redirect_stderr(buffer):
        yield
    if buffer.getvalue().strip():
        log.debug("mlflow: %s", buffer.getvalue().strip())


_PACKAGES = ("iot2ml", "mlflow", "pandas", "numpy", "pyarrow", "scikit-learn", "lightgbm", "statsforecast",
             "river", "cloudpickle")


def _requirements() -> list[str]:
    """What a model needs to load: the installed versions of our ML stack. Given explicitly, MLflow
    does not infer them by importing the model in a subprocess (3-7 s per training)."""
    from importlib.metadata import PackageNotFoundError, version

    out = []
    for package in _PACKAGES:
        try:
            out.append(f"{package}=={version(package)}")
        except PackageNotFoundError:
            continue
    return out


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _param(v: Any) -> str:
    text = v if isinstance(v, str) else json.dumps(v, default=str)
    return text[:500]


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))
