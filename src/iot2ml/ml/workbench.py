"""Composition of the ML workbench (the lake and SQL are its only edges out of ``ml``): lake reads for training, MLflow registry, labels, batch scoring."""

from __future__ import annotations

from typing import Any

from ..core.config import Settings


class Workbench:
    """Everything ``iot2ml train / models / labels / predict`` needs, built from the settings."""

    def __init__(self, settings: Settings) -> None:
        from ..lake import Lake

        self.settings = settings
        self.lake = Lake(settings.lake, settings.lake_storage_options)
        self._registry = None

    @property
    def registry(self) -> Any:
        if self._registry is None:
            from .registry import Registry, tracking_uri_for

            self._registry = Registry(tracking_uri_for(self.settings.data_dir, self.settings.mlflow_tracking_uri),
                                      artifact_root=self.settings.mlflow_artifact_root
                                      or str((self.settings.data_dir / "mlartifacts").absolute()))
        return self._registry

    def read(self, sql: str) -> Any:
        import pandas as pd

        from ..query import query_arrow

        frame = query_arrow(self.lake, sql, timeout=max(self.settings.query_timeout, 600)).to_pandas()
        for col in frame.columns:  # one spelling of UTC ("Etc/UTC" and "UTC" do not concatenate)
            if isinstance(frame[col].dtype, pd.DatetimeTZDtype):
                frame[col] = frame[col].dt.tz_convert("UTC")
        return frame

    def columns(self, table: str) -> list[str]:
        schema = self.lake.schema(table)
        return [] if schema is None else list(schema.names)

    def version(self, table: str) -> int:
        return int(self.lake.open(table).version())

    def train(self, job: Any) -> dict[str, Any]:
        from .jobs import run_training

        return run_training(job, read=self.read, tables=self.lake.tables, columns=self.columns,
                            version=self.version, registry=self.registry)

    def models(self) -> list[dict[str, Any]]:
        return self.registry.list_models()

    def import_labels(self, rows: list[dict], *, entity_column: str, label_column: str, table: str | None,
                      source: str, who: str, time_column: str | None = None) -> int:
        from .labels import append_labels, known_entities, validate_labels

        known = known_entities(self.lake, table, entity_column) if table else None
        validated = validate_labels(rows, entity_column=entity_column, label_column=label_column,
                                    allowed_labels=None, known_entities=known, source=source, who=who,
                                    time_column=time_column)
        append_labels(self.lake, validated)
        return validated.num_rows

    def predict(self, name: str, *, table: str, where: str | None = None, ref: str = "champion") -> dict[str, Any]:
        """Score rows of ``table`` with ``name@ref`` into the ``predictions`` table."""
        import time

        from ..core.tables import PREDICTIONS
        from .jobs import entity_column, score

        version = self.registry.resolve(name, ref)
        described = self.registry.describe(name, str(version))
        model = self.registry.load(name, str(version), unwrap=True)
        sql = f'SELECT * FROM "{table}"' + (f" WHERE {where}" if where else "")
        frame = self.read(sql)
        rows = score(name, model=model, version=version, task=described["task"], frame=frame,
                     entity=entity_column(model))
        if rows.num_rows:
            self.lake.append(PREDICTIONS, rows, app_id=f"iot2ml-predict-{name}", version=int(time.time() * 1000))
        return {"model": name, "version": version, "rows": rows.num_rows, "table": PREDICTIONS}
