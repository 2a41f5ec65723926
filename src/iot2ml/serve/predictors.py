"""Request rows in, answers out: one predictor per loaded model version.

The model owns its features: a predictor checks the request envelope (a list of objects, how many,
how deeply nested), hands the instances to the model's public feature API (``matrix_from_records``,
``series_from_records``; see ``ml/base.py`` ``RowModel`` and ``SeriesModel``), which raises
``InvalidInput`` naming the instance and the field, and runs the prepared requests of several
clients in one model call (micro-batching). Nothing here knows a model's feature order, and
nothing touches pandas per request on the row path.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from ..core.errors import InvalidInput
from ..ml.jobs import prediction_columns

if TYPE_CHECKING:
    from ..ml.base import RowModel, SeriesModel

#: Fields an instance may carry besides what the model reads (the model ignores them).
CONTEXT_FIELDS = frozenset({"device_id", "ts", "request_id", "model"})
MAX_INSTANCES = 10_000
#: Deepest nesting of lists/objects inside an instance's value (the prediction log re-encodes instances).
MAX_NESTING = 32
OUTPUT_TYPES = ("mean", "quantiles")
"""What a forecast answer may hold (DeepAR's ``configuration.output_types``)."""


def _nesting(value: Any) -> int:
    """How deep lists and objects nest in ``value``, counted without recursion (stops past MAX_NESTING)."""
    deepest, level = 0, [value]
    while level and deepest <= MAX_NESTING:
        deepest += 1
        level = [v for c in level for v in (c.values() if isinstance(c, dict) else c) if isinstance(v, (list, dict))]
    return deepest


def check_instances(instances: Any) -> list[dict[str, Any]]:
    if not isinstance(instances, list):
        raise InvalidInput("'instances' must be a list of objects such as [{\"alcohol\": 12.1, ...}]")
    if not instances:
        raise InvalidInput("'instances' is empty: send at least one instance")
    if len(instances) > MAX_INSTANCES:
        raise InvalidInput(f"'instances' has {len(instances)} items: send at most {MAX_INSTANCES} per request")
    for i, item in enumerate(instances):
        if not isinstance(item, dict):
            raise InvalidInput(f"instances[{i}] must be an object of feature values, not {type(item).__name__}")
        for key, value in item.items():
            if isinstance(value, (list, dict)) and _nesting(value) > MAX_NESTING:
                raise InvalidInput(f"instances[{i}].{key} nests lists/objects deeper than {MAX_NESTING} levels: "
                                   "send numbers, strings or flat lists")
    return instances


@dataclass
class Prepared:
    """A validated request: what the model call takes and how many answers it expects."""

    rows: Any
    count: int


def split(values: list[Any], batch: list[Prepared]) -> list[list[Any]]:
    """The answers of one model call, back to the requests they came from (in order)."""
    out, start = [], 0
    for p in batch:
        out.append(values[start:start + p.count])
        start += p.count
    return out


class RowPredictor:
    """Models answering one row per instance (classify, regress, anomaly): the instances of many
    requests become one stacked matrix and one model call; streamed tables go column-wise."""

    def __init__(self, model: RowModel, task: str) -> None:
        self.model = model
        self.kind = task
        self.inputs = model.describe_inputs()
        self.allowed = frozenset(self.inputs["fields"]) | CONTEXT_FIELDS

    def describe(self) -> dict[str, Any]:
        return self.inputs

    def prepare(self, instances: list[dict[str, Any]], configuration: dict[str, Any] | None = None) -> Prepared:
        """The instances' model matrix (``configuration`` is for forecasts: not read here)."""
        return Prepared(self.model.matrix_from_records(instances, ignore=CONTEXT_FIELDS), len(instances))

    def predict_many(self, batch: list[Prepared]) -> list[list[Any]]:
        matrix = batch[0].rows if len(batch) == 1 else np.vstack([p.rows for p in batch])
        return split(self.model.answers(self.model.predict_matrix(matrix)), batch)

    # ---- columnar path (streaming deployments: rows of a lake table) ----------------------
    def prepare_table(self, table: Any) -> Prepared:
        """The model matrix of an Arrow table's rows (each row one record)."""
        return Prepared(self.model.matrix_from_arrow(table), table.num_rows)

    def score_table(self, prepared: Prepared) -> dict[str, Any]:
        """The ``predictions`` table's ``prediction``, ``label``, ``scores`` and the per-row answers to publish."""
        answers = self.model.answers(self.model.predict_matrix(prepared.rows))
        return {**prediction_columns(self.kind, answers), "answers": answers}


class SeriesPredictor:
    """Forecast models. Instances are DeepAR-style series (``start``, ``target``) or, for series the
    model knows, just the series id (``{"device_id": "s1"}``: forecast from its training history);
    ``configuration`` picks ``quantiles`` and ``output_types``."""

    def __init__(self, model: SeriesModel, task: str) -> None:
        self.model = model
        self.kind = task
        self.inputs = model.describe_inputs()
        self.allowed = frozenset(self.inputs["fields"]) | CONTEXT_FIELDS

    def describe(self) -> dict[str, Any]:
        return self.inputs

    def prepare(self, instances: list[dict[str, Any]], configuration: dict[str, Any] | None = None) -> Prepared:
        series = self.model.series_from_records(instances, ignore=CONTEXT_FIELDS)
        config = configuration or {}
        quantiles = config.get("quantiles")
        if quantiles is not None:
            try:
                quantiles = [float(q) for q in quantiles]
            except (TypeError, ValueError):
                raise InvalidInput("configuration.quantiles must be numbers such as [\"0.1\", \"0.9\"]") from None
            known = self.inputs["quantiles"]
            unknown = [q for q in quantiles if not any(abs(q - m) < 1e-9 for m in known)]
            if unknown:
                raise InvalidInput(f"configuration.quantiles {unknown[0]:g} is not one the model gives: "
                                   f"{', '.join(f'{q:g}' for q in known)}")
        types = config.get("output_types", list(OUTPUT_TYPES))
        if not isinstance(types, list) or any(t not in (*OUTPUT_TYPES, "samples") for t in types):
            raise InvalidInput("configuration.output_types must be a list of 'mean' and 'quantiles'")
        return Prepared((series, quantiles, types), len(instances))

    def predict_many(self, batch: list[Prepared]) -> list[list[Any]]:
        out = []
        for p in batch:  # each request its own call: its own configuration, and series ids may repeat
            series, quantiles, types = p.rows
            out.append(self.model.answers(self.model.forecast(series), quantiles=quantiles, output_types=types))
        return out


def predictor_for(model: Any, task: str) -> RowPredictor | SeriesPredictor:
    """The predictor of a loaded model, by the feature API it offers (rows or series)."""
    if hasattr(model, "matrix_from_records"):
        return RowPredictor(model, task)
    if hasattr(model, "series_from_records"):
        return SeriesPredictor(model, task)
    raise InvalidInput(f"{task} model {type(model).__name__} cannot be served: it offers neither "
                       "matrix_from_records nor series_from_records (see iot2ml.ml.base)")
