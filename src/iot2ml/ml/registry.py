"""Tracking and registry on MLflow: every training is a run, every model a registered version.

Tracking lives under the data dir by default (``sqlite:///<data_dir>/mlflow.db``, artifacts in
``<data_dir>/mlartifacts``), so ``mlflow ui --backend-store-uri sqlite:///<data_dir>/mlflow.db``
shows our runs; a PostgreSQL URL works the same. MLflow is imported only here, and only when used.

Promotion: a new version gets alias ``challenger``; it becomes ``champion`` only if it beats the
current champion on the same holdout (the champion is re-scored on the new training's holdout when
the task can do that, else their logged scores are compared and the run says so). The decision and
both scores are logged as tags of the run.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from ..core.errors import NotFound, Transient
from .base import TrainResult

log = logging.getLogger("iot2ml.ml")

CHAMPION = "champion"
CHALLENGER = "challenger"


def tracking_uri_for(data_dir: Path, configured: str | None = None) -> str:
    """The configured tracking URI (``postgresql://`` goes through psycopg 3), else sqlite in the data dir."""
    if configured:
        from ..core.catalog import normalise_url

        return normalise_url(configured)
    return f"sqlite:///{(Path(data_dir) / 'mlflow.db').absolute()}"


class Registry:
    """Runs and model versions in MLflow."""

    def __init__(self, tracking_uri: str, *, artifact_root: str | None = None) -> None:
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")
        import warnings

        warnings.filterwarnings("ignore", module=r"mlflow(\..*)?")
        logging.getLogger("mlflow").setLevel(logging.ERROR)
        import mlflow
        from mlflow import MlflowClient

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
        rescore: Any = None,
    ) -> dict[str, Any]:
        """Log a run, register the model as a new version of ``name``, decide champion/challenger.

        ``rescore(model) -> dict`` scores another model on this training's holdout (optional).
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
            info = mlflow.pyfunc.log_model(
                name="model",
                python_model=TaskModel(result.model, result.task),
                signature=signature,
                input_example=example,
                registered_model_name=name,
            )
            version = str(info.registered_model_version)
            decision = self._promote(name, version, result, rescore)
            mlflow.set_tags({f"iot2ml.promotion.{k}": str(v) for k, v in decision.items()})
            self.client.set_model_version_tag(name, version, "iot2ml.task", result.task)
            self.client.set_model_version_tag(name, version, "iot2ml.data_versions", json.dumps(data_versions))
            log.info("registered %s version %s (run %s): %s", name, version, run.info.run_id, decision["reason"])
        return self.describe(name, version)

    def _promote(self, name: str, version: str, result: TrainResult, rescore: Any) -> dict[str, Any]:
        metric = result.primary_metric
        mine = float(result.metrics[metric])
        self.client.set_registered_model_alias(name, CHALLENGER, version)
        try:
            champ = self.client.get_model_version_by_alias(name, CHAMPION)
        except Exception:  # noqa: BLE001 - MLflow raises its own error when the alias is unset
            champ = None
        if champ is None:
            self.client.set_registered_model_alias(name, CHAMPION, version)
            return {"champion": version, "metric": metric, "new_score": mine, "champion_score": "",
                    "reason": "first version: champion"}
        champ_score, how = None, "rescored on this holdout"
        if rescore is not None:
            try:
                champ_model = self.load(name, CHAMPION, unwrap=True)
                champ_score = float(rescore(champ_model)[metric])
            except Exception as err:  # noqa: BLE001 - fall back to the logged score
                log.warning("could not rescore the champion of %s: %s", name, err)
        if champ_score is None:
            run = self.client.get_run(champ.run_id)
            champ_score = run.data.metrics.get(metric)
            how = "logged score of its own holdout"
        better = champ_score is None or (mine > champ_score if result.greater_is_better else mine < champ_score)
        if better:
            self.client.set_registered_model_alias(name, CHAMPION, version)
        return {
            "champion": version if better else champ.version,
            "metric": metric,
            "new_score": mine,
            "champion_score": champ_score,
            "compared_by": how,
            "reason": (f"version {version} {metric}={mine:.4g} "
                       f"{'beats' if better else 'does not beat'} champion v{champ.version} {metric}={champ_score:.4g}"
                       if champ_score is not None else "champion had no score"),
        }

    def load(self, name: str, ref: str = CHAMPION, *, unwrap: bool = False) -> Any:
        """The model ``name@alias`` or ``name/version``; ``unwrap`` gives the task's own model object."""
        import mlflow

        uri = f"models:/{name}/{ref}" if str(ref).isdigit() else f"models:/{name}@{ref}"
        try:
            model = mlflow.pyfunc.load_model(uri)
        except Exception as err:  # noqa: BLE001
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
            "run_id": mv.run_id,
        }

    def list_models(self) -> list[dict[str, Any]]:
        out = []
        try:
            models = self.client.search_registered_models()
        except Exception as err:  # noqa: BLE001
            raise Transient(f"MLflow tracking store {self.tracking_uri} cannot be read: {err}") from err
        for rm in models:
            for mv in self.client.search_model_versions(f"name='{rm.name}'"):
                out.append(self.describe(rm.name, mv.version))
        return sorted(out, key=lambda m: (m["name"], m["version"]))


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _param(v: Any) -> str:
    text = v if isinstance(v, str) else json.dumps(v, default=str)
    return text[:500]


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))
