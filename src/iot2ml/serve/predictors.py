"""Request rows in, answers out: one predictor per loaded model version, by task.

``prepare(instances)`` checks every instance against what the model takes and raises
``InvalidInput`` naming the instance and the field (missing, unknown, wrongly typed); it returns an
object that ``predict_many`` can run together with those of other requests (micro-batching), so
one model call answers many requests. Nothing here touches pandas per request on the tabular path.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson

from ..core.errors import InvalidInput

#: Fields an instance may carry besides the model's features.
CONTEXT_FIELDS = frozenset({"device_id", "ts", "request_id", "model"})
MAX_INSTANCES = 10_000
#: Deepest nesting of lists/objects inside an instance's value (the prediction log re-encodes instances).
MAX_NESTING = 32


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


def _number(value: Any, where: str) -> float:
    if value is None:
        return math.nan
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidInput(f"{where} must be a number, not {type(value).__name__} {str(value)[:40]!r}")
    return float(value)


@dataclass
class Prepared:
    """A validated request: rows for the model and how many answers it expects."""

    rows: Any
    count: int


class TabularPredictor:
    """Classify and regress models (``TabularModel``): features straight into a float matrix."""

    def __init__(self, model: Any) -> None:
        self.model = model
        spec = model.spec
        self.kind = model.kind
        self.numeric = list(spec.numeric)
        self.categorical = {c: {v: float(i) for i, v in enumerate(cats)} for c, cats in spec.categorical.items()}
        self.by_entity = spec.by_entity
        self.entity = spec.entity
        self.features = [*self.numeric, *self.categorical]
        self.aggregated = list(spec.columns) if self.by_entity else []
        allowed = set(self.features) | CONTEXT_FIELDS | ({self.entity} if self.entity else set())
        self.allowed = allowed | set(self.aggregated)
        self.classes = list(model.classes) if model.classes is not None else None
        self.n_columns = len(spec.columns)

    def describe(self) -> dict[str, Any]:
        return {"task": self.kind, "features": self.features,
                "numeric": self.numeric, "categorical": {c: list(v) for c, v in self.categorical.items()},
                **({"classes": self.classes} if self.classes else {})}

    def _row(self, i: int, item: dict[str, Any]) -> np.ndarray:
        extra = [k for k in item if k not in self.allowed]
        if extra:
            raise InvalidInput(f"instances[{i}] has unknown field {extra[0]!r}: the model takes "
                               f"{', '.join(self.features)}")
        if self.by_entity and self.aggregated[0] in item:  # already aggregated per entity
            return self._aggregated_row(i, item)
        missing = [f for f in self.features if f not in item]
        if missing:
            raise InvalidInput(f"instances[{i}] lacks feature {missing[0]!r}: the model takes "
                               f"{', '.join(self.features)}")
        values = [_number(item[f], f"instances[{i}].{f}") for f in self.numeric]
        cats = []
        for c, codes in self.categorical.items():
            value = item[c]
            if value is not None and not isinstance(value, (str, int, float)) or isinstance(value, bool):
                raise InvalidInput(f"instances[{i}].{c} must be a string, not {type(value).__name__}")
            cats.append(codes.get(str(value), math.nan) if value is not None else math.nan)
        if not self.by_entity:
            return np.array([*values, *cats], dtype=float)
        # One reading of one entity: mean = min = max = last = the value, no spread, one reading.
        row: list[float] = []
        for v in values:
            row += [v, v, v, math.nan, v]
        return np.array([*row, *cats, 1.0], dtype=float)

    def _aggregated_row(self, i: int, item: dict[str, Any]) -> np.ndarray:
        missing = [c for c in self.aggregated if c not in item]
        if missing:
            raise InvalidInput(f"instances[{i}] lacks aggregated column {missing[0]!r}: send all of "
                               f"{', '.join(self.aggregated)} or the raw features {', '.join(self.features)}")
        out = []
        for col in self.aggregated:
            source = col.removesuffix("__last")
            if col.endswith("__last") and source in self.categorical:
                value = item[col]
                out.append(self.categorical[source].get(str(value), math.nan) if value is not None else math.nan)
            else:
                out.append(_number(item[col], f"instances[{i}].{col}"))
        return np.array(out, dtype=float)

    def prepare(self, instances: list[dict[str, Any]]) -> Prepared:
        matrix = np.empty((len(instances), self.n_columns), dtype=float)
        for i, item in enumerate(instances):
            matrix[i] = self._row(i, item)
        return Prepared(matrix, len(instances))

    def _raw(self, matrix: np.ndarray) -> np.ndarray:
        """Regress: the values; classify: the (rows, classes) probabilities."""
        estimator = self.model.estimator
        booster, params = _lightgbm_booster(estimator)
        if booster is not None and len(matrix) >= 2_000:  # a streamed batch: every core's worth
            params = {**params, "num_threads": os.cpu_count() or 1}
        if self.kind == "regress":
            return np.asarray(estimator.predict(matrix) if booster is None else booster.predict(matrix, **params))
        if booster is None:
            return np.asarray(estimator.predict_proba(matrix))
        proba = booster.predict(matrix, **params)
        return proba if proba.ndim == 2 else np.column_stack([1.0 - proba, proba])  # binary: P(class 1)

    def _answers(self, raw: np.ndarray) -> list[dict[str, Any]]:
        if self.kind == "regress":
            return [{"prediction": float(v)} for v in raw]
        classes = self.classes or []
        return [{"prediction": _plain(classes[int(k)]),
                 "probabilities": {str(c): round(float(p), 6) for c, p in zip(classes, row)}}
                for k, row in zip(raw.argmax(axis=1), raw)]

    def predict_many(self, batch: list[Prepared]) -> list[list[Any]]:
        matrix = batch[0].rows if len(batch) == 1 else np.vstack([p.rows for p in batch])
        return split(self._answers(self._raw(matrix)), batch)

    # ---- columnar path (streaming deployments: rows of a lake table) ----------------------
    def prepare_table(self, table: Any) -> Prepared:
        """The model matrix straight from Arrow columns (one reading per row)."""
        missing = [f for f in self.features if f not in table.column_names]
        if missing:
            raise InvalidInput(f"table lacks feature {missing[0]!r}: the model takes {', '.join(self.features)}")
        n = table.num_rows
        values = [_float_column(table, f) for f in self.numeric]
        cats = [_codes_column(table, c, codes) for c, codes in self.categorical.items()]
        if not self.by_entity:
            return Prepared(np.column_stack([*values, *cats]) if n else np.empty((0, self.n_columns)), n)
        spread = np.full(n, np.nan)
        parts = [col for v in values for col in (v, v, v, spread, v)]
        return Prepared(np.column_stack([*parts, *cats, np.ones(n)]) if n else np.empty((0, self.n_columns)), n)

    def score_table(self, prepared: Prepared) -> dict[str, Any]:
        """Columns for the ``predictions`` table and the per-row answers to publish."""
        raw = self._raw(prepared.rows) if prepared.count else np.empty((0,))
        answers = self._answers(raw) if prepared.count else []
        if self.kind == "regress":
            return {"prediction": raw.astype(float), "label": None, "scores": None, "answers": answers}
        best = raw.max(axis=1) if prepared.count else np.empty(0)
        scores = [orjson.dumps(a["probabilities"]).decode() for a in answers]
        return {"prediction": best, "label": [str(a["prediction"]) for a in answers], "scores": scores,
                "answers": answers}


def split(values: list[Any], batch: list[Prepared]) -> list[list[Any]]:
    """The answers of one model call, back to the requests they came from (in order)."""
    out, start = [], 0
    for p in batch:
        out.append(values[start:start + p.count])
        start += p.count
    return out


def _float_column(table: Any, name: str) -> np.ndarray:
    import pyarrow as pa
    import pyarrow.compute as pc

    column = table.column(name)
    if not (pa.types.is_floating(column.type) or pa.types.is_integer(column.type) or pa.types.is_null(column.type)):
        raise InvalidInput(f"column {name!r} is {column.type}, not numeric: the model reads it as a number")
    return pc.cast(column, pa.float64()).to_numpy(zero_copy_only=False).astype(float, copy=False)


def _codes_column(table: Any, name: str, codes: dict[str, float]) -> np.ndarray:
    values = table.column(name).to_pylist()
    return np.array([codes.get(str(v), math.nan) if v is not None else math.nan for v in values], dtype=float)


def _lightgbm_booster(estimator: Any) -> tuple[Any, dict[str, Any]]:
    """A LightGBM estimator's booster and its predict threads, else ``(None, {})``.

    LightGBM's scikit-learn wrapper re-reads (``inspect.signature``) and deep-copies every parameter
    and re-validates the input on each call: ~0.3 ms, several times one row's prediction. The booster
    gives the same probabilities (and values) without it.
    """
    if not type(estimator).__module__.startswith("lightgbm") or callable(getattr(estimator, "objective", None)):
        return None, {}
    n_jobs = getattr(estimator, "n_jobs", None)
    threads = 0 if n_jobs is None else n_jobs if n_jobs >= 0 else max(1, (os.cpu_count() or 1) + 1 + n_jobs)
    return estimator.booster_, {"num_threads": threads}


def _plain(value: Any) -> Any:
    return value.item() if hasattr(value, "item") else value


class AnomalyPredictor:
    """Anomaly models: one score and flag per reading (per-device scaling as in training)."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.kind = "anomaly"
        self.features = list(model.features)
        self.entity = model.entity
        self.allowed = set(self.features) | CONTEXT_FIELDS | {self.entity}

    def describe(self) -> dict[str, Any]:
        return {"task": "anomaly", "features": self.features, "entity": self.entity}

    def prepare(self, instances: list[dict[str, Any]]) -> Prepared:
        keys, matrix = [], np.empty((len(instances), len(self.features)), dtype=float)
        for i, item in enumerate(instances):
            extra = [k for k in item if k not in self.allowed]
            if extra:
                raise InvalidInput(f"instances[{i}] has unknown field {extra[0]!r}: the model takes "
                                   f"{', '.join(self.features)} and {self.entity!r}")
            missing = [f for f in (*self.features, self.entity) if f not in item]
            if missing:
                raise InvalidInput(f"instances[{i}] lacks field {missing[0]!r}: the model takes "
                                   f"{', '.join(self.features)} and {self.entity!r}")
            keys.append(str(item[self.entity]))
            matrix[i] = [_number(item[f], f"instances[{i}].{f}") for f in self.features]
        return Prepared((keys, matrix), len(instances))

    def predict_many(self, batch: list[Prepared]) -> list[list[Any]]:
        keys = np.array([k for p in batch for k in p.rows[0]], dtype=object)
        matrix = np.vstack([p.rows[1] for p in batch])
        z = self.model.scaler.transform(keys, matrix)
        scores = -self.model.forest.score_samples(z)
        return split([{"prediction": bool(s > self.model.threshold), "score": round(float(s), 6)} for s in scores], batch)

    def prepare_table(self, table: Any) -> Prepared:
        missing = [f for f in (*self.features, self.entity) if f not in table.column_names]
        if missing:
            raise InvalidInput(f"table lacks column {missing[0]!r}: the model takes {', '.join(self.features)} "
                               f"and {self.entity!r}")
        keys = [str(k) for k in table.column(self.entity).to_pylist()]
        matrix = np.column_stack([_float_column(table, f) for f in self.features]) if table.num_rows \
            else np.empty((0, len(self.features)))
        return Prepared((keys, matrix), table.num_rows)

    def score_table(self, prepared: Prepared) -> dict[str, Any]:
        keys, matrix = prepared.rows
        if not prepared.count:
            return {"prediction": np.empty(0), "label": [], "scores": None, "answers": []}
        scores = -self.model.forest.score_samples(self.model.scaler.transform(np.array(keys, dtype=object), matrix))
        flags = scores > self.model.threshold
        answers = [{"prediction": bool(f), "score": round(float(v), 6)} for f, v in zip(flags, scores)]
        return {"prediction": scores, "label": ["anomaly" if f else "normal" for f in flags], "scores": None,
                "answers": answers}


class ForecastPredictor:
    """Forecast models. Instances are DeepAR-style series (``start``, ``target``) or, for series the
    model knows, just the series id (``{"device_id": "s1"}``: forecast from its training history)."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.kind = "forecast"
        self.series_column = model.series_column

    def describe(self) -> dict[str, Any]:
        return {"task": "forecast", "horizon": self.model.horizon, "freq": self.model.freq,
                "context": self.model.context, "quantiles": list(self.model.quantiles),
                "series_column": self.series_column}

    def prepare(self, instances: list[dict[str, Any]], configuration: dict[str, Any] | None = None) -> Prepared:
        import pandas as pd

        allowed = {"start", "target", "dynamic_feat", "cat", self.series_column, "ts", "request_id", "model"}
        series: dict[str, Any] = {}
        for i, item in enumerate(instances):
            extra = [k for k in item if k not in allowed]
            if extra:
                raise InvalidInput(f"instances[{i}] has unknown field {extra[0]!r}: send 'start' and 'target' "
                                   f"(and optionally {self.series_column!r})")
            key = str(item.get(self.series_column, f"instance-{i}"))
            if "target" not in item:
                if key not in self.model.history:
                    raise InvalidInput(f"instances[{i}] lacks 'target' and series {key!r} is not one the model "
                                       "was trained on: send 'start' and 'target' (the last points)")
                series[f"{i}\0{key}"] = self.model.history[key]
                continue
            target = item["target"]
            if not isinstance(target, list) or not target:
                raise InvalidInput(f"instances[{i}].target must be a non-empty list of numbers")
            values = [_number(v, f"instances[{i}].target[{j}]") for j, v in enumerate(target)]
            if "start" not in item or not isinstance(item["start"], str):
                raise InvalidInput(f"instances[{i}].start must be a timestamp string such as '2026-01-01 00:00:00'")
            try:
                start = pd.Timestamp(item["start"])
            except (ValueError, TypeError):
                raise InvalidInput(f"instances[{i}].start {item['start']!r} is not a timestamp") from None
            start = start.tz_localize("UTC") if start.tzinfo is None else start.tz_convert("UTC")
            index = pd.date_range(start, periods=len(values), freq=self.model.freq)
            series[f"{i}\0{key}"] = pd.Series(values, index=index, dtype=float)
        config = configuration or {}
        quantiles = config.get("quantiles")
        if quantiles is not None:
            try:
                quantiles = [float(q) for q in quantiles]
            except (TypeError, ValueError):
                raise InvalidInput("configuration.quantiles must be numbers such as [\"0.1\", \"0.9\"]") from None
            unknown = [q for q in quantiles if not any(abs(q - m) < 1e-9 for m in self.model.quantiles)]
            if unknown:
                raise InvalidInput(f"configuration.quantiles {unknown[0]:g} is not one the model gives: "
                                   f"{', '.join(f'{q:g}' for q in self.model.quantiles)}")
        types = config.get("output_types", ["mean", "quantiles"])
        if not isinstance(types, list) or any(t not in ("mean", "quantiles", "samples") for t in types):
            raise InvalidInput("configuration.output_types must be a list of 'mean' and 'quantiles'")
        return Prepared((series, quantiles, types), len(instances))

    def predict_many(self, batch: list[Prepared]) -> list[list[Any]]:
        out = []
        for p in batch:
            series, quantiles, types = p.rows
            frame = self.model.predict_series(series)
            answers = []
            for key, group in frame.groupby(self.series_column, sort=False):
                answer: dict[str, Any] = {"start": group["ts"].iloc[0].isoformat()}
                if "mean" in types:
                    answer["mean"] = [round(float(v), 6) for v in group["mean"]]
                if "quantiles" in types:
                    wanted = quantiles or list(self.model.quantiles)
                    answer["quantiles"] = {f"{q:g}": [round(float(v), 6) for v in group[f"q{q:g}"]] for q in wanted}
                answers.append((key, answer))
            order = {k: i for i, k in enumerate(series)}
            answers.sort(key=lambda kv: order.get(kv[0], 0))
            out.append([a for _, a in answers])
        return out


def predictor_for(model: Any, task: str) -> Any:
    if task in ("classify", "regress"):
        return TabularPredictor(model)
    if task == "anomaly":
        return AnomalyPredictor(model)
    if task == "forecast":
        return ForecastPredictor(model)
    raise InvalidInput(f"task {task!r} cannot be served")
