"""Classify and regress on telemetry: LightGBM on tabular features, cross-validated against a baseline.

The frame is the telemetry of one device type joined with labels. With ``entity`` (seed 004: a wine
``batch_id``, one cask sample measured several times) and ``aggregate=True`` every entity becomes one
row: per numeric feature its ``mean``, ``min``, ``max``, ``std`` and ``last`` reading (by ``ts``),
named ``<feature>__<stat>``, plus ``n_readings``; a string feature contributes its last value. Without
an entity, or with ``aggregate=False``, every reading is a row.

Figures are out-of-fold: K-fold cross-validation (stratified for classes; grouped by entity when
readings of one entity are separate rows, so no entity sits on both sides), the baseline predicted
on the same folds from the same training part: the majority class, or the mean. The out-of-fold
predictions stay in ``artifacts["holdout_predictions"]`` (unit, its first ``ts``, truth, prediction);
for promotion, ``compare`` scores them and the champion's predictions on the units newer than the
champion's training data (at least ``min_holdout`` of them, default 20).

The number of boosting rounds comes from early stopping inside each fold's training part: a seventh
of it (stratified for classes, by entity when readings are rows, like the folds) is set aside, a
model fitted on the rest stops 30 rounds after its loss on that seventh last improved (at most 1000),
and its best iteration is the fold's; the fold's model is then fitted on the whole training part with
that many rounds (at least 10). The fold's test part plays no role. The returned model is refit on
every labelled row with the median of the folds' best iterations (at least 10). A fold whose training
part cannot spare a seventh (under 30 units, or a class with fewer than 7) trains 100 rounds; the
params say what happened (``lgbm_n_estimators``, ``lgbm_best_iterations``, ``lgbm_early_stopping``).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math
import os
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from lightgbm import LGBMClassifier, LGBMRegressor, early_stopping
from sklearn.metrics import (
    accuracy_score,
    confusion_matrix,
    f1_score,
    mean_absolute_error,
    mean_squared_error,
    precision_recall_fscore_support,
    r2_score,
)
from sklearn.model_selection import (
    GroupKFold,
    KFold,
    StratifiedGroupKFold,
    StratifiedKFold,
)

from iot2ml.core.errors import InvalidInput
from iot2ml.core.tables import BASE_COLUMNS

from .base import (
    HOLDOUT_PREDICTIONS,
    NoFairHoldout,
    Records,
    TrainResult,
    arrow_floats,
    check_record,
    iso,
    newer_than,
    record_number,
    require_arrow_columns,
    too_few,
)
from .base import require_columns as _missing

__all__ = ["ClassifyTask", "RegressTask", "TabularModel"]

RESERVED = frozenset(BASE_COLUMNS)
"""Columns the lake adds to every row: never features by default."""
STATS = ("mean", "min", "max", "std", "last")
"""Aggregations of each numeric feature per entity."""
COUNT = "n_readings"
"""Aggregated column: how many readings the entity has."""
MAX_ROUNDS = 1000
"""Boosting rounds a fold may train before early stopping ends it."""
PATIENCE = 30
"""Rounds without improvement on the stopping part after which a fold stops."""
STOPPING_PARTS = 7
"""A fold's training part is cut in this many (stratified, grouped) parts; one is the stopping part."""
MIN_STOPPING_UNITS = 30
"""Fewer units (rows, or entities when readings are rows) in a fold's training part: no early stopping."""
FALLBACK_ROUNDS = 100
"""Rounds of a fold that cannot stop early, and of the refit when no fold could."""
MIN_ROUNDS = 10
"""Fewest rounds of a fitted model (a fold's or the final one) when early stopping chose them."""
_EVAL_XY = "eval_X" in inspect.signature(LGBMClassifier.fit).parameters  # lightgbm >= 4.7 deprecates eval_set


def _as_float(series: pd.Series) -> np.ndarray:
    try:
        if pd.api.types.is_bool_dtype(series) or pd.api.types.is_extension_array_dtype(series):
            return series.astype("Float64").to_numpy(dtype=float, na_value=np.nan)
        return series.to_numpy(dtype=float)
    except (TypeError, ValueError) as err:
        raise InvalidInput(f"feature {series.name!r} has a non-numeric value ({err}): send numbers") from None


def _codes(series: pd.Series, categories: list[str]) -> np.ndarray:
    """Category codes as floats; missing and unseen values become NaN (LightGBM's missing)."""
    codes = pd.Categorical(series.astype("string"), categories=categories).codes.astype(float)
    codes[codes < 0] = np.nan
    return codes


Column = Callable[[str], np.ndarray]
"""``value(column)``: a float column of the input."""
Codes = Callable[[str, str], np.ndarray]
"""``code(column, feature)``: the input's ``column`` as category codes of the categorical ``feature``."""


@dataclass
class _Features:
    """How input becomes the model's matrix: chosen and fitted by ``fit``, replayed by every channel.

    One layout (``_layout``, in ``columns`` order) serves frames, records and Arrow tables; only
    reading a column differs. With per-entity aggregation a frame of raw readings is aggregated per
    entity, while a record or table row of raw features is ONE reading of its own entity
    (``one_reading``): mean = min = max = last = the value, std missing (the sample std of one value,
    as aggregating a one-reading entity gives), ``n_readings`` 1, a string feature's last value its
    value. Rows holding the aggregated columns (``<feature>__<stat>``) are taken as they are.
    """

    entity: str | None
    aggregate: bool
    numeric: list[str]
    categorical: dict[str, list[str]]  # column -> categories seen in training

    @property
    def by_entity(self) -> bool:
        return self.entity is not None and self.aggregate

    @property
    def raw(self) -> list[str]:
        return [*self.numeric, *self.categorical]

    @property
    def columns(self) -> list[str]:
        """Columns of the model matrix, in order."""
        if not self.by_entity:
            return self.raw
        return [*(f"{c}__{s}" for c in self.numeric for s in STATS),
                *(f"{c}__last" for c in self.categorical), COUNT]

    @property
    def aggregated(self) -> list[str]:
        """The aggregated columns a per-entity model may be given instead of raw features (else none)."""
        return self.columns if self.by_entity else []

    @property
    def categorical_index(self) -> list[int]:
        names = set(self.categorical) if not self.by_entity else {f"{c}__last" for c in self.categorical}
        return [i for i, c in enumerate(self.columns) if c in names]

    # Lookups built on first use per loaded model; a pickle holds only the fitted choices (the fields),
    # so a model saved by one version of this code never brings another version's lookups along.
    def __getstate__(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @functools.cached_property
    def _code_maps(self) -> dict[str, dict[str, float]]:
        return {c: {v: float(i) for i, v in enumerate(cats)} for c, cats in self.categorical.items()}

    @functools.cached_property
    def _accepted(self) -> frozenset[str]:
        return frozenset([*self.raw, *self.aggregated, *([self.entity] if self.entity else [])])

    @functools.cached_property
    def _aggregated_only(self) -> frozenset[str]:
        return frozenset(self.aggregated) - frozenset(self.raw)

    @functools.cached_property
    def _plans(self) -> dict[bool, tuple[list[tuple[str, str, str]], np.ndarray]]:
        """Per ``one_reading``: the input columns to read and, per matrix column, which of them it is."""
        plans = {}
        for one_reading in (False, True):
            plan = self._plan(one_reading=one_reading)
            sources = list(dict.fromkeys(plan))
            plans[one_reading] = (sources, np.array([sources.index(p) for p in plan], dtype=np.intp))
        return plans

    def _plan(self, *, one_reading: bool) -> list[tuple[str, str, str]]:
        """Per matrix column ``(how, input column, feature)``; how: value, code, nan or one."""
        plan = []
        for col in self.columns:
            if not self.by_entity:
                plan.append(("code" if col in self.categorical else "value", col, col))
            elif col == COUNT:
                plan.append(("one", "", "") if one_reading else ("value", col, col))
            else:
                feature, stat = col.rsplit("__", 1)
                if feature in self.categorical:
                    plan.append(("code", feature if one_reading else col, feature))
                elif not one_reading:
                    plan.append(("value", col, col))
                else:  # one reading: every statistic is the reading itself but the spread, which is missing
                    plan.append(("nan", "", "") if stat == "std" else ("value", feature, feature))
        return plan

    def _layout(self, n: int, value: Column, code: Codes, *, one_reading: bool) -> np.ndarray:
        """The ``(n, len(columns))`` float matrix from the input's columns (see the class docstring)."""
        sources, index = self._plans[one_reading]
        read = [value(name) if how == "value" else code(name, feature) if how == "code"
                else np.full(n, np.nan if how == "nan" else 1.0) for how, name, feature in sources]
        if not read:
            return np.empty((n, 0))
        return np.column_stack(read)[:, index] if n else np.empty((0, len(index)))

    @functools.cached_property
    def _takes(self) -> dict[bool, str]:
        """What the model takes, for error messages: raw features (False) or aggregated columns (True)."""
        stats = "{" + ",".join(STATS) + "}"
        aggregated = "the aggregated columns " + ", ".join(
            [*(f"{c}__{stats}" for c in self.numeric), *(f"{c}__last" for c in self.categorical), COUNT])
        return {False: ", ".join(self.raw) + (f" (or {aggregated})" if self.by_entity else ""), True: aggregated}

    # ---- frames (training, evaluation, batch scoring) ---------------------------------------
    def matrix(self, frame: pd.DataFrame) -> tuple[np.ndarray, pd.Index, pd.Series | None]:
        """``(X, index, keys)``: the float matrix, the index of its rows and their entity (or None).

        With per-entity aggregation ``frame`` may hold raw readings (aggregated here) or rows already
        aggregated (every column of ``self.columns`` present).
        """
        if self.by_entity and all(c in frame.columns for c in self.columns):
            keys = frame[self.entity] if self.entity in frame.columns else None
            return self._frame_matrix(frame), frame.index, keys
        _missing(frame, self.raw, "feature")
        if not self.by_entity:
            keys = frame[self.entity] if self.entity is not None and self.entity in frame.columns else None
            return self._frame_matrix(frame), frame.index, keys
        _missing(frame, [self.entity], "entity")
        rows = self.aggregate_rows(frame)
        return self._frame_matrix(rows), rows.index, rows[self.entity]

    def _frame_matrix(self, frame: pd.DataFrame) -> np.ndarray:
        return self._layout(len(frame), lambda c: _as_float(frame[c]),
                            lambda c, f: _codes(frame[c], self.categorical[f]), one_reading=False)

    def aggregate_rows(self, frame: pd.DataFrame) -> pd.DataFrame:
        """One row per entity (sorted by entity) with the aggregated columns."""
        if "ts" in frame.columns:
            frame = frame.sort_values("ts", kind="stable")
        keys = frame[self.entity]
        parts: list[pd.DataFrame | pd.Series] = []
        if self.numeric:
            values = pd.DataFrame({c: _as_float(frame[c]) for c in self.numeric}, index=frame.index)
            stats = values.groupby(keys, sort=True).agg(list(STATS))
            stats.columns = [f"{c}__{s}" for c, s in stats.columns]
            parts.append(stats)
        for c in self.categorical:
            parts.append(frame[c].groupby(keys, sort=True).last().rename(f"{c}__last"))
        parts.append(keys.groupby(keys, sort=True).size().rename(COUNT))
        rows = pd.concat(parts, axis=1)
        rows.index.name = None
        return rows.rename_axis("_entity").reset_index().rename(columns={"_entity": self.entity})

    # ---- records (REST, MQTT request/reply) -------------------------------------------------
    def records_matrix(self, records: Records, ignore: Collection[str]) -> np.ndarray:
        """The matrix of JSON records, one row each (see the class docstring); errors name ``instances[i].field``."""
        whole: list[int] = []  # records holding the aggregated columns of a per-entity model
        for i, record in enumerate(records):
            if self._aggregated_only and not self._aggregated_only.isdisjoint(record):
                check_record(i, record, self._accepted, ignore, self.aggregated, self._takes[True])
                whole.append(i)
            else:
                check_record(i, record, self._accepted, ignore, self.raw, self._takes[False])
        if not whole:
            return self._records_matrix(records, range(len(records)), one_reading=self.by_entity)
        out = np.empty((len(records), len(self.columns)), dtype=float)
        single = sorted(set(range(len(records))) - set(whole))
        out[whole] = self._records_matrix(records, whole, one_reading=False)
        if single:
            out[single] = self._records_matrix(records, single, one_reading=True)
        return out

    @functools.cached_property
    def _value_names(self) -> dict[bool, dict[str, int]]:
        """Per ``one_reading``: the input columns read as numbers, and their position."""
        return {mode: {name: k for k, name in enumerate(n for how, n, _ in sources if how == "value")}
                for mode, (sources, _) in self._plans.items()}

    def _records_matrix(self, records: Records, rows: Sequence[int], *, one_reading: bool) -> np.ndarray:
        names = self._value_names[one_reading]
        values = np.array([[record_number(records[i][name], i, name) for name in names] for i in rows],
                          dtype=float).reshape(len(rows), len(names))

        def value(name: str) -> np.ndarray:
            return values[:, names[name]]

        def code(name: str, feature: str) -> np.ndarray:
            return np.array([self._code(records[i][name], feature, i, name) for i in rows], dtype=float)

        return self._layout(len(rows), value, code, one_reading=one_reading)

    def _code(self, value: Any, feature: str, i: int, name: str) -> float:
        if value is None:
            return math.nan
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise InvalidInput(f"instances[{i}].{name} must be a string, not {type(value).__name__}")
        return self._code_maps[feature].get(str(value), math.nan)

    # ---- Arrow tables (streaming deployments) ----------------------------------------------
    def arrow_matrix(self, table: Any) -> np.ndarray:
        """The matrix of an Arrow table's rows: raw readings (each one reading of its entity) or,
        for a per-entity model, rows holding every aggregated column."""
        whole = self.by_entity and all(c in table.column_names for c in self.columns)
        if not whole:
            require_arrow_columns(table, self.raw, self._takes[False])

        def code(name: str, feature: str) -> np.ndarray:
            codes = self._code_maps[feature]
            return np.array([math.nan if v is None else codes.get(str(v), math.nan)
                             for v in table.column(name).to_pylist()], dtype=float)

        return self._layout(table.num_rows, lambda c: arrow_floats(table, c), code,
                            one_reading=self.by_entity and not whole)


def _choose_features(frame: pd.DataFrame, *, label: str, entity: str | None, aggregate: bool,
                     features: list[str] | None) -> _Features:
    skip = RESERVED | {label} | ({entity} if entity else set())
    if features is None:
        chosen = [c for c in frame.columns if c not in skip and pd.api.types.is_numeric_dtype(frame[c])]
        if not chosen:
            raise InvalidInput(f"no numeric feature columns besides {sorted(skip)}: pass features=[...]")
    else:
        _missing(frame, list(features), "feature")
        bad = [c for c in features if c in {label, entity}]
        if bad:
            raise InvalidInput(f"feature {bad[0]!r} is the label or the entity: remove it from features")
        chosen = list(dict.fromkeys(features))
    numeric = [c for c in chosen if pd.api.types.is_numeric_dtype(frame[c])]
    categorical = {c: sorted(frame[c].dropna().astype(str).unique().tolist()) for c in chosen if c not in numeric}
    return _Features(entity=entity, aggregate=aggregate, numeric=numeric, categorical=categorical)


def _times(frame: pd.DataFrame) -> pd.Series:
    """The frame's ``ts`` in UTC (all NaT without a ``ts`` column)."""
    if "ts" not in frame.columns:
        return pd.Series(pd.NaT, index=frame.index, dtype="datetime64[ns, UTC]")
    return pd.to_datetime(frame["ts"], utc=True)


def _training_rows(frame: pd.DataFrame, spec: _Features, label: str, *, numeric_label: bool
                   ) -> tuple[np.ndarray, pd.Series, np.ndarray | None, pd.DataFrame]:
    """``(X, y, groups, units)`` of the labelled rows; groups are entities when readings are rows.

    ``units`` has per row of X its ``unit`` (the entity, or the row's position in ``frame``) and
    ``first_ts`` (the entity's first reading, or the row's ``ts``).
    """
    has_label = frame[label].notna().to_numpy()
    labelled = frame[has_label]
    if labelled.empty:
        raise InvalidInput(f"no rows with a value in label column {label!r}: import labels first")
    if numeric_label and not pd.api.types.is_numeric_dtype(labelled[label]):
        raise InvalidInput(f"label {label!r} has non-numeric values such as {labelled[label].iloc[0]!r}: "
                           "use the classify task for categories")
    if not spec.by_entity:
        x, _, keys = spec.matrix(labelled)
        groups = keys.to_numpy() if keys is not None else None
        units = pd.DataFrame({"unit": np.flatnonzero(has_label), "first_ts": _times(labelled).to_numpy()})
        return x, labelled[label].reset_index(drop=True), groups, units
    _missing(frame, [spec.entity], "entity")
    if numeric_label:
        target = labelled[label].astype(float).groupby(labelled[spec.entity], sort=True).mean()
    else:  # the most frequent label of the entity (ties: the first in sort order)
        counts = labelled.groupby([spec.entity, label], sort=True).size().rename("n").reset_index()
        counts = counts.sort_values("n", ascending=False, kind="stable").drop_duplicates(spec.entity)
        target = counts.set_index(spec.entity)[label].sort_index()
    rows = frame[frame[spec.entity].isin(target.index)]
    x, _, keys = spec.matrix(rows)
    first = _times(rows).groupby(rows[spec.entity], sort=True).min()
    units = pd.DataFrame({"unit": keys.to_numpy(), "first_ts": first.reindex(keys.to_numpy()).to_numpy()})
    return x, target.reindex(keys.to_numpy()).reset_index(drop=True), None, units


def _lgbm_params(n_rows: int, seed: int) -> dict[str, Any]:
    """Settings that work from a few hundred rows (wine batches) to millions of readings; the number of
    rounds (``n_estimators``) is left to early stopping."""
    return {
        "learning_rate": 0.05,
        "num_leaves": 15,
        "min_child_samples": max(3, min(20, n_rows // 25)),
        "min_data_per_group": max(3, min(100, n_rows // 25)),
        "subsample": 0.9,
        "subsample_freq": 1,
        "colsample_bytree": 0.8,
        "reg_lambda": 1.0,
        "random_state": seed,
        "n_jobs": 1 if n_rows < 50_000 else 0,
        "verbose": -1,
    }


def _splitter(n_splits: int, seed: int, *, stratify: bool, grouped: bool) -> Any:
    """The K-fold splitter of the folds and of each fold's stopping part; call ``.split(x, y, groups)``."""
    if stratify:
        kind = StratifiedGroupKFold if grouped else StratifiedKFold
    else:
        kind = GroupKFold if grouped else KFold
    return kind(n_splits, shuffle=True, random_state=seed)


def _stopping_split(train: np.ndarray, y: np.ndarray, groups: np.ndarray | None, seed: int, *, stratify: bool
                    ) -> tuple[np.ndarray, np.ndarray] | str:
    """``(fit, stop)``: the fold's training rows ``train`` less one part of ``STOPPING_PARTS``, and that
    part (the stopping part); or why the fold cannot spare one."""
    unit_of = groups[train] if groups is not None else train
    units = len(np.unique(unit_of))
    what = "entities" if groups is not None else "rows"
    if units < MIN_STOPPING_UNITS:
        return f"{units} {what} in a fold's training part, fewer than {MIN_STOPPING_UNITS}"
    if stratify:
        per_class = pd.Series(unit_of).groupby(y[train]).nunique()
        if per_class.min() < STOPPING_PARTS:
            return (f"a class with {int(per_class.min())} {what} in a fold's training part, "
                    f"fewer than {STOPPING_PARTS}")
    fit, stop = next(_splitter(STOPPING_PARTS, seed, stratify=stratify, grouped=groups is not None)
                     .split(train, y[train], None if groups is None else groups[train]))
    if stratify and not np.isin(y[train][stop], y[train][fit]).all():
        return "a class of a fold's stopping part is missing from the rest of its training part"
    return train[fit], train[stop]


def _fit_fold(make: Callable[[int], Any], x: np.ndarray, y: np.ndarray, train: np.ndarray,
              groups: np.ndarray | None, seed: int, *, stratify: bool, cat: list[int]) -> tuple[Any, int | str]:
    """``(model, best)``: the fold's model, fitted on all its training rows ``train`` the way the final
    model is fitted on all rows, and ``best``, the iteration at which a fit on ``train`` less its
    stopping part did best on that part (the model's rounds, at least ``MIN_ROUNDS``); or ``best`` says
    why the fold has no stopping part and the model trained ``FALLBACK_ROUNDS``."""
    split = _stopping_split(train, y, groups, seed, stratify=stratify)
    if isinstance(split, str):
        best: int | str = split
        rounds = FALLBACK_ROUNDS
    else:
        fit, stop = split
        probe = make(MAX_ROUNDS)
        # The stopping part's loss is unweighted: class weights on a few dozen rows made it stop too early.
        held = {"eval_X": (x[stop],), "eval_y": (y[stop],)} if _EVAL_XY else {"eval_set": [(x[stop], y[stop])]}
        probe.fit(x[fit], y[fit], categorical_feature=cat or "auto", **held,
                  callbacks=[early_stopping(PATIENCE, verbose=False)])
        best = int(probe.best_iteration_)
        rounds = max(MIN_ROUNDS, best)
    # Refit on the whole training part, as the final model is on all rows: out-of-fold predictions of
    # the probe (a seventh fewer rows) scored ~0.015 macro F1 lower on 60-250 wine batches.
    model = make(rounds)
    model.fit(x[train], y[train], categorical_feature=cat or "auto")
    return model, best


def _final_rounds(best: list[int | str]) -> tuple[int, dict[str, Any]]:
    """Rounds of the refit on all rows, and the params that tell how they were chosen."""
    stopped = [b for b in best if isinstance(b, int)]
    rounds = max(MIN_ROUNDS, round(float(np.median(stopped)))) if stopped else FALLBACK_ROUNDS
    skipped = {k: b for k, b in enumerate(best) if isinstance(b, str)}
    if not skipped:
        how = f"every fold: patience {PATIENCE} on 1/{STOPPING_PARTS} of its training part, refit with the median"
    elif stopped:
        how = (f"folds {sorted(skipped)} trained {FALLBACK_ROUNDS} rounds ({next(iter(skipped.values()))}); "
               "refit with the median of the others")
    else:
        how = f"off: {next(iter(skipped.values()))}; {FALLBACK_ROUNDS} rounds"
    return rounds, {"lgbm_best_iterations": [b if isinstance(b, int) else None for b in best],
                    "lgbm_max_rounds": MAX_ROUNDS, "lgbm_early_stopping": how}


def _sorted_classes(values: pd.Series) -> list[Any]:
    unique = [v.item() if hasattr(v, "item") else v for v in values.unique()]
    try:
        return sorted(unique)
    except TypeError:
        return sorted(unique, key=str)


@dataclass
class TabularModel:
    """A fitted classifier or regressor that predicts from raw readings or aggregated rows.

    Every channel builds the model matrix here: ``predict(frame)`` (evaluation, batch scoring),
    ``matrix_from_records`` (REST, MQTT) and ``matrix_from_arrow`` (streaming), then
    ``predict_matrix`` and ``answers``. A per-entity model takes, per record or table row, either
    one raw reading (an entity with that one reading, see ``_Features``) or the aggregated columns
    (``aggregate(frame)`` gives them for an entity's whole history).
    """

    kind: str  # "classify" or "regress"
    spec: _Features
    estimator: Any
    classes: list[Any] | None = None

    @property
    def features(self) -> list[str]:
        return self.spec.raw

    @property
    def entity(self) -> str | None:
        """The entity column (e.g. a wine ``batch_id``), or None."""
        return self.spec.entity

    def describe_inputs(self) -> dict[str, Any]:
        """``task``, ``fields`` a record may hold, ``features`` (``numeric``, ``categorical`` with their
        categories), ``classes``, the ``entity`` column if any and, per-entity, the ``aggregated`` columns."""
        spec = self.spec
        out: dict[str, Any] = {"task": self.kind, "fields": sorted(spec._accepted), "features": spec.raw,
                               "numeric": list(spec.numeric),
                               "categorical": {c: list(v) for c, v in spec.categorical.items()}}
        if self.classes is not None:
            out["classes"] = list(self.classes)
        if spec.entity is not None:
            out["entity"] = spec.entity
        if spec.by_entity:
            out["aggregated"] = spec.aggregated
        return out

    def aggregate(self, frame: pd.DataFrame) -> pd.DataFrame:
        """The rows the model sees: one per entity (``<feature>__<stat>`` columns) when it aggregates,
        else ``frame`` unchanged. ``predict`` accepts either."""
        if not self.spec.by_entity:
            return frame
        _missing(frame, [*self.spec.raw, self.spec.entity], "feature")
        return self.spec.aggregate_rows(frame)

    def matrix_from_records(self, records: Records, *, ignore: Collection[str] = ()) -> np.ndarray:
        """The model matrix of JSON records (one row each, no pandas); ``ignore``: fields a record
        may carry that the model does not read. Errors name ``instances[i].field``."""
        return self.spec.records_matrix(records, ignore)

    def matrix_from_arrow(self, table: Any) -> np.ndarray:
        """The model matrix of an Arrow table, one row per table row (columns it does not read are ignored)."""
        return self.spec.arrow_matrix(table)

    def predict_matrix(self, matrix: np.ndarray) -> np.ndarray:
        """Regress: the values; classify: the ``(rows, classes)`` probabilities."""
        if not len(matrix):
            return np.empty(0) if self.kind == "regress" else np.empty((0, len(self.classes or [])))
        estimator = self.estimator
        booster, params = _lightgbm_booster(estimator)
        if booster is not None and len(matrix) >= 2_000:  # a streamed batch: every core's worth
            params = {**params, "num_threads": os.cpu_count() or 1}
        if self.kind == "regress":
            return np.asarray(estimator.predict(matrix) if booster is None else booster.predict(matrix, **params))
        if booster is None:
            return np.asarray(estimator.predict_proba(matrix))
        proba = booster.predict(matrix, **params)
        return proba if proba.ndim == 2 else np.column_stack([1.0 - proba, proba])  # binary: P(class 1)

    def answers(self, raw: np.ndarray) -> list[dict[str, Any]]:
        """Regress: ``{"prediction": value}``; classify: ``{"prediction": class, "probabilities": {class: p}}``."""
        if self.kind == "regress":
            return [{"prediction": v} for v in np.asarray(raw, dtype=float).tolist()]
        classes = [_plain(c) for c in self.classes or []]
        names = [str(c) for c in self.classes or []]
        raw = np.asarray(raw, dtype=float)  # ``tolist``: Python floats for a whole batch at once
        return [{"prediction": classes[k], "probabilities": dict(zip(names, row))}
                for k, row in zip(raw.argmax(axis=1).tolist(), raw.tolist())]

    def predict_records(self, records: Records, *, ignore: Collection[str] = ()) -> list[dict[str, Any]]:
        """One answer per record: ``answers(predict_matrix(matrix_from_records(records)))``."""
        return self.answers(self.predict_matrix(self.matrix_from_records(records, ignore=ignore)))

    def predict(self, frame: pd.DataFrame) -> pd.DataFrame:
        """One row per entity (aggregating raw readings) or per input row: ``prediction`` and, for
        classification, ``proba_<class>`` per class. Raises ``InvalidInput`` for a missing column."""
        x, index, keys = self.spec.matrix(frame)
        raw = self.predict_matrix(x)
        out = pd.DataFrame(index=index)
        if keys is not None:
            out[self.spec.entity] = keys.to_numpy()
        if self.kind == "regress":
            out["prediction"] = raw
            return out
        assert self.classes is not None
        out["prediction"] = np.asarray(self.classes)[raw.argmax(axis=1)] if len(x) else np.asarray(self.classes)[:0]
        for i, cls in enumerate(self.classes):
            out[f"proba_{cls}"] = raw[:, i]
        return out


def _plain(value: Any) -> Any:
    """A NumPy scalar as the Python value (JSON-able); other values unchanged."""
    return value.item() if hasattr(value, "item") else value


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


class _TabularTask:
    name = ""

    def __init__(self, *, label: str, entity: str | None = None, features: list[str] | None = None,
                 aggregate: bool = True, folds: int = 5, seed: int = 0, min_holdout: int = 20) -> None:
        if folds < 2:
            raise InvalidInput(f"folds={folds}: cross-validation needs 2 or more")
        if min_holdout < 1:
            raise InvalidInput(f"min_holdout={min_holdout}: the comparison with the champion needs 1 or more units")
        self.label, self.entity, self.features = label, entity, features
        self.aggregate, self.folds, self.seed, self.min_holdout = aggregate, folds, seed, int(min_holdout)

    def _prepare(self, frame: pd.DataFrame, *, numeric_label: bool
                 ) -> tuple[_Features, np.ndarray, pd.Series, np.ndarray | None, pd.DataFrame]:
        _missing(frame, [self.label], "label")
        if self.entity is not None:
            _missing(frame, [self.entity], "entity")
        spec = _choose_features(frame, label=self.label, entity=self.entity, aggregate=self.aggregate,
                                features=self.features)
        x, y, groups, units = _training_rows(frame, spec, self.label, numeric_label=numeric_label)
        return spec, x, y, groups, units

    def compare(self, champion: Any, frame: pd.DataFrame, result: TrainResult, since: pd.Timestamp | None
                ) -> dict[str, Any]:
        """Score this training's out-of-fold predictions and ``champion``'s on the units of ``frame``
        newer than ``since``: entities whose first reading is after it (per-entity models), else
        labelled readings after it. Raises ``NoFairHoldout`` with fewer than ``min_holdout`` units or
        when the champion cannot predict them."""
        since = newer_than(since)
        table = result.artifacts.get(HOLDOUT_PREDICTIONS)
        if not isinstance(table, pd.DataFrame):
            raise NoFairHoldout("this training kept no out-of-fold predictions to compare with")
        if table["first_ts"].isna().all():
            raise NoFairHoldout("the training data has no 'ts' column: cannot tell which rows are newer "
                                "than the champion's")
        spec: _Features = result.model.spec
        what = "labelled entities" if spec.by_entity else "labelled readings"
        new = table[table["first_ts"] > since]
        problem = too_few(len(new), what, since, self.min_holdout)
        if problem is not None:
            raise problem
        kind = getattr(champion, "kind", type(champion).__name__)
        if not isinstance(champion, TabularModel) or kind != self.name:
            raise NoFairHoldout(f"the champion is a {kind} model, this version {self.name}: compare them by hand")
        def unit(s: _Features) -> str:
            return f"per entity {s.entity!r}" if s.by_entity else "per reading"

        if unit(champion.spec) != unit(spec):
            raise NoFairHoldout(f"the champion predicts {unit(champion.spec)}, this version {unit(spec)}: "
                                "compare them by hand")
        try:
            if spec.by_entity:
                out = champion.predict(frame[frame[spec.entity].isin(new["unit"])])
                theirs_pred = out.set_index(spec.entity)["prediction"].reindex(new["unit"]).to_numpy()
            else:
                theirs_pred = champion.predict(frame.iloc[new["unit"].to_numpy()])["prediction"].to_numpy()
        except InvalidInput as err:
            raise NoFairHoldout(f"the champion cannot score the holdout: {err}") from None
        mine_score, theirs_score = self._duel(new["truth"].to_numpy(), new["prediction"].to_numpy(), theirs_pred)
        holdout = f"{len(new)} {what} {'whose first reading is after' if spec.by_entity else 'after'} {iso(since)}"
        return {"new": mine_score, "champion": theirs_score, "units": len(new), "holdout": holdout}

    @staticmethod
    def _duel(truth: np.ndarray, mine: np.ndarray, theirs: np.ndarray) -> tuple[float, float]:
        raise NotImplementedError

    @staticmethod
    def _holdout_table(units: pd.DataFrame, truth: Any, prediction: Any) -> pd.DataFrame:
        return units.assign(truth=np.asarray(truth), prediction=np.asarray(prediction))

    def _example(self, frame: pd.DataFrame, spec: _Features) -> pd.DataFrame:
        cols = [c for c in (spec.entity, "ts") if c is not None and c in frame.columns] + spec.raw
        return frame[list(dict.fromkeys(cols))].head(10).reset_index(drop=True)

    def _params(self, spec: _Features, lgbm: dict[str, Any], n_rows: int, n_splits: int) -> dict[str, Any]:
        return {"label": self.label, "entity": self.entity, "aggregate": spec.by_entity, "folds": n_splits,
                "seed": self.seed, "rows": n_rows, **{f"lgbm_{k}": v for k, v in lgbm.items()}}

    @staticmethod
    def _importance(estimator: Any, spec: _Features, top: int = 20) -> dict[str, float]:
        gains = estimator.booster_.feature_importance(importance_type="gain")
        order = np.argsort(gains)[::-1][:top]
        return {spec.columns[i]: round(float(gains[i]), 4) for i in order if gains[i] > 0}


class ClassifyTask(_TabularTask):
    """LightGBM with balanced class weights; stratified K-fold; baseline = the majority class.

    Metrics (out-of-fold, pooled): ``accuracy`` and ``macro_f1`` (primary, greater is better);
    ``artifacts`` holds the ``confusion_matrix`` (rows = true, columns = predicted), the per-class
    ``report`` and per-fold figures. Folds are capped by the smallest class; a class with fewer than
    two examples raises ``InvalidInput``.
    """

    name = "classify"

    def fit(self, frame: pd.DataFrame) -> TrainResult:
        spec, x, y, groups, unit_rows = self._prepare(frame, numeric_label=False)
        classes = _sorted_classes(y)
        if len(classes) < 2:
            raise InvalidInput(f"label {self.label!r} has the single class {classes[0]!r}: "
                               "need examples of at least two classes")
        y_code = y.map({c: i for i, c in enumerate(classes)}).to_numpy(dtype=int)
        per_class = (pd.Series(groups).groupby(y_code).nunique() if groups is not None
                     else pd.Series(y_code).value_counts()).reindex(range(len(classes)), fill_value=0)
        smallest = int(per_class.idxmin())
        if per_class[smallest] < 2:
            unit = "entities" if groups is not None or spec.by_entity else "examples"
            raise InvalidInput(f"class {classes[smallest]!r} of label {self.label!r} has "
                               f"{int(per_class[smallest])} {unit}: need at least 2 per class to cross-validate")
        n_splits = min(self.folds, int(per_class.min()))
        lgbm = _lgbm_params(len(y_code), self.seed)
        cat = spec.categorical_index

        def make(rounds: int) -> LGBMClassifier:
            return LGBMClassifier(class_weight="balanced", **{**lgbm, "n_estimators": rounds})

        splits = _splitter(n_splits, self.seed, stratify=True, grouped=groups is not None).split(x, y_code, groups)
        oof, base = np.zeros(len(y_code), dtype=int), np.zeros(len(y_code), dtype=int)
        per_fold, best = [], []
        labels = list(range(len(classes)))
        for k, (train, test) in enumerate(splits):
            model, stopped = _fit_fold(make, x, y_code, train, groups, self.seed, stratify=True, cat=cat)
            best.append(stopped)
            oof[test] = self._codes(model, x[test])
            base[test] = np.bincount(y_code[train], minlength=len(classes)).argmax()
            per_fold.append({"fold": k, "rows": len(test),
                             "best_iteration": stopped if isinstance(stopped, int) else None,
                             "macro_f1": float(f1_score(y_code[test], oof[test], average="macro",
                                                        labels=labels, zero_division=0)),
                             "baseline_macro_f1": float(f1_score(y_code[test], base[test], average="macro",
                                                                 labels=labels, zero_division=0))})

        rounds, stopping = _final_rounds(best)
        final = make(rounds)
        final.fit(x, y_code, categorical_feature=cat or "auto")
        precision, recall, f1, support = precision_recall_fscore_support(y_code, oof, labels=labels,
                                                                         zero_division=0)
        return TrainResult(
            model=TabularModel(kind="classify", spec=spec, estimator=final, classes=classes),
            task=self.name,
            metrics=self._scores(y_code, oof, labels),
            baseline_metrics=self._scores(y_code, base, labels),
            primary_metric="macro_f1",
            greater_is_better=True,
            params={**self._params(spec, {**lgbm, "n_estimators": rounds}, len(y_code), n_splits), **stopping,
                    "classes": classes},
            features=spec.raw,
            input_example=self._example(frame, spec),
            artifacts={
                "confusion_matrix": {"labels": classes,
                                     "matrix": confusion_matrix(y_code, oof, labels=labels).tolist()},
                "report": {str(c): {"precision": float(precision[i]), "recall": float(recall[i]),
                                    "f1": float(f1[i]), "support": int(support[i])}
                           for i, c in enumerate(classes)},
                "folds": per_fold,
                "feature_importance": self._importance(final, spec),
                HOLDOUT_PREDICTIONS: self._holdout_table(unit_rows, y.to_numpy(), np.asarray(classes, dtype=object)[oof]),
            },
        )

    @staticmethod
    def _codes(model: LGBMClassifier, x: np.ndarray) -> np.ndarray:
        # A training fold may miss a class of the whole set only with groups; map back to full codes.
        return np.asarray(model.classes_)[model.predict_proba(x).argmax(axis=1)]

    @staticmethod
    def _duel(truth: np.ndarray, mine: np.ndarray, theirs: np.ndarray) -> tuple[float, float]:
        """Macro F1 of both, over the union of the classes in truth and in either's predictions."""
        truth, mine, theirs = (np.asarray([str(v) for v in a], dtype=object) for a in (truth, mine, theirs))
        labels = sorted({*truth, *mine, *theirs})
        return tuple(float(f1_score(truth, p, average="macro", labels=labels, zero_division=0))  # type: ignore[return-value]
                     for p in (mine, theirs))

    @staticmethod
    def _scores(y: np.ndarray, pred: np.ndarray, labels: list[int]) -> dict[str, float]:
        return {"accuracy": float(accuracy_score(y, pred)),
                "macro_f1": float(f1_score(y, pred, average="macro", labels=labels, zero_division=0))}


class RegressTask(_TabularTask):
    """LightGBM regression; K-fold; baseline = the training folds' mean.

    Metrics (out-of-fold, pooled): ``mae`` (primary, lower is better), ``rmse`` and ``r2``.
    """

    name = "regress"

    def fit(self, frame: pd.DataFrame) -> TrainResult:
        spec, x, y, groups, unit_rows = self._prepare(frame, numeric_label=True)
        target = y.to_numpy(dtype=float)
        units = len(np.unique(groups)) if groups is not None else len(target)
        if units < 2:
            raise InvalidInput(f"label {self.label!r} has {units} labelled row(s): need at least 2 to cross-validate")
        n_splits = min(self.folds, units)
        lgbm = _lgbm_params(len(target), self.seed)
        cat = spec.categorical_index

        def make(rounds: int) -> LGBMRegressor:
            return LGBMRegressor(**{**lgbm, "n_estimators": rounds})

        splits = _splitter(n_splits, self.seed, stratify=False, grouped=groups is not None).split(x, target, groups)
        oof, base = np.zeros(len(target)), np.zeros(len(target))
        per_fold, best = [], []
        for k, (train, test) in enumerate(splits):
            model, stopped = _fit_fold(make, x, target, train, groups, self.seed, stratify=False, cat=cat)
            best.append(stopped)
            oof[test] = model.predict(x[test])
            base[test] = target[train].mean()
            per_fold.append({"fold": k, "rows": len(test),
                             "best_iteration": stopped if isinstance(stopped, int) else None,
                             "mae": float(mean_absolute_error(target[test], oof[test])),
                             "baseline_mae": float(mean_absolute_error(target[test], base[test]))})
        rounds, stopping = _final_rounds(best)
        final = make(rounds)
        final.fit(x, target, categorical_feature=cat or "auto")
        return TrainResult(
            model=TabularModel(kind="regress", spec=spec, estimator=final),
            task=self.name,
            metrics=self._scores(target, oof),
            baseline_metrics=self._scores(target, base),
            primary_metric="mae",
            greater_is_better=False,
            params={**self._params(spec, {**lgbm, "n_estimators": rounds}, len(target), n_splits), **stopping},
            features=spec.raw,
            input_example=self._example(frame, spec),
            artifacts={"folds": per_fold, "feature_importance": self._importance(final, spec),
                       HOLDOUT_PREDICTIONS: self._holdout_table(unit_rows, target, oof)},
        )

    @staticmethod
    def _duel(truth: np.ndarray, mine: np.ndarray, theirs: np.ndarray) -> tuple[float, float]:
        truth = truth.astype(float)
        return (float(mean_absolute_error(truth, mine.astype(float))),
                float(mean_absolute_error(truth, theirs.astype(float))))

    @staticmethod
    def _scores(y: np.ndarray, pred: np.ndarray) -> dict[str, float]:
        return {"mae": float(mean_absolute_error(y, pred)),
                "rmse": math.sqrt(float(mean_squared_error(y, pred))),
                "r2": float(r2_score(y, pred))}
