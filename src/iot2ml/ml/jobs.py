"""Training jobs: read a lake table (joined to labels when the label lives there), fit a task,
log and register it. Also batch scoring into the ``predictions`` table.

The composition root hands in ``read(sql) -> pandas.DataFrame`` and ``version(table) -> int`` so
this module needs nothing but ``core``.

Tasks are found by name in ``TASKS``; a task registered there is trainable by job files and the CLI
and is run through the task contract (``ml/checks.py``) by ``tests/ml/test_task_contract.py``.
"""

from __future__ import annotations

import importlib
import time
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import pandas as pd
import pyarrow as pa

from ..core.errors import InvalidInput, NotFound
from ..core.tables import LABELS, PREDICTIONS_SCHEMA
from .base import Task, TrainResult

TASKS: dict[str, str | Callable[..., Task]] = {
    "forecast": "iot2ml.ml.forecast:ForecastTask",
    "classify": "iot2ml.ml.classify:ClassifyTask",
    "regress": "iot2ml.ml.classify:RegressTask",
    "anomaly": "iot2ml.ml.anomaly:AnomalyTask",
}
"""Training tasks by name: the task class, or ``"module:Class"`` imported on first use (so that
importing this module loads no ML library). Register a new one with ``TASKS["name"] = MyTask``."""


@dataclass
class TrainJob:
    """One training: which task, on which table, registered under which name, with which options."""

    task: str
    table: str
    name: str
    options: dict[str, Any] = field(default_factory=dict)
    where: str | None = None

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise InvalidInput(f"task {self.task!r} is not known: use one of {', '.join(TASKS)}")
        if not self.name or not all(c.isalnum() or c in "-_." for c in self.name):
            raise InvalidInput(f"model name {self.name!r} is not valid: use letters, digits, '-', '_', '.'")

    @classmethod
    def from_toml(cls, path: str | Path) -> TrainJob:
        """``task``, ``table``, ``name``, optional ``where`` and the task's options as other keys."""
        try:
            raw = tomllib.loads(Path(path).read_text())
        except (OSError, tomllib.TOMLDecodeError) as err:
            raise InvalidInput(f"job file {path}: {err}") from None
        missing = [k for k in ("task", "table", "name") if k not in raw]
        if missing:
            raise InvalidInput(f"job file {path} lacks {', '.join(missing)}: see docs/guides")
        return cls(task=raw.pop("task"), table=raw.pop("table"), name=raw.pop("name"),
                   where=raw.pop("where", None), options=raw)


def task_class(kind: str) -> Callable[..., Task]:
    """The class (factory) of task ``kind`` in ``TASKS``."""
    if kind not in TASKS:
        raise InvalidInput(f"task {kind!r} is not known: use one of {', '.join(TASKS)}")
    found = TASKS[kind]
    if isinstance(found, str):
        module, _, name = found.partition(":")
        found = getattr(importlib.import_module(module), name)
    return found


def make_task(kind: str, options: dict[str, Any]) -> Task:
    """Task ``kind`` of ``TASKS`` with ``options`` (its keyword arguments)."""
    cls = task_class(kind)
    try:
        return cls(**options)
    except TypeError as err:
        raise InvalidInput(f"{kind} does not take these options {sorted(options)}: {err}") from None


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def training_sql(job: TrainJob, tables: list[str], columns: list[str]) -> str:
    """The SELECT that feeds the task; joins the latest label per entity when the label is not a column."""
    if job.table not in tables:
        raise NotFound(f"no table {job.table!r} in the lake: tables are {', '.join(sorted(tables)) or 'none yet'}")
    where = f" WHERE {job.where}" if job.where else ""
    label = job.options.get("label")
    entity = job.options.get("entity")
    if label and label not in columns:
        if LABELS not in tables:
            raise InvalidInput(f"label {label!r} is neither a column of {job.table} nor in a labels table: "
                               "import labels with 'iot2ml labels import'")
        key = entity or "device_id"
        if key not in columns:
            raise InvalidInput(f"entity {key!r} is not a column of {job.table}: columns are {', '.join(columns)}")
        value = {"regress": "TRY_CAST(l.label AS DOUBLE)", "anomaly": "TRY_CAST(l.label AS BOOLEAN)"}.get(
            job.task, "l.label")
        window = job.options.get("label_window")
        if window is not None:
            # Each reading takes the entity's latest label given at or before it, if that label is at
            # most `label_window` seconds old (e.g. an event marked on a device for its duration).
            seconds = float(window)
            return (
                f"SELECT t.*, CASE WHEN epoch(t.ts) - epoch(l.ts) <= {seconds} THEN {value} END AS {_quote(label)} "
                f"FROM {_quote(job.table)} t ASOF LEFT JOIN (SELECT entity, ts, label FROM {LABELS}) l "
                f"ON CAST(t.{_quote(key)} AS VARCHAR) = l.entity AND t.ts >= l.ts{where}"
            )
        return (
            f"SELECT t.*, {value} AS {_quote(label)} FROM {_quote(job.table)} t JOIN ("
            f"SELECT entity, arg_max(label, ts) AS label FROM {LABELS} GROUP BY entity) l "
            f"ON CAST(t.{_quote(key)} AS VARCHAR) = l.entity{where}"
        )
    return f"SELECT * FROM {_quote(job.table)}{where}"


def run_training(
    job: TrainJob,
    *,
    read: Callable[[str], pd.DataFrame],
    tables: Callable[[], list[str]],
    columns: Callable[[str], list[str]],
    version: Callable[[str], int],
    registry: Any,
) -> dict[str, Any]:
    """Fit ``job`` on the lake and register the model; returns the registry's description of the version.

    The run records the newest reading it read (``trained_until``); the registry promotes the new
    version only if it beats the champion on data newer than the champion's (the task's ``compare``).
    """
    started = time.monotonic()
    names = tables()
    sql = training_sql(job, names, columns(job.table) if job.table in names else [])
    frame = read(sql)
    if frame.empty:
        raise InvalidInput(f"no rows to train on from {job.table}" + (f" where {job.where}" if job.where else ""))
    data_versions = {job.table: version(job.table)}
    if LABELS in names and "JOIN" in sql:
        data_versions[LABELS] = version(LABELS)
    task = make_task(job.task, {k: v for k, v in job.options.items() if k != "label_window"})
    result: TrainResult = task.fit(frame)
    profile = reference_profile(result.model, job.task, frame)
    if profile is not None:
        result.artifacts[REFERENCE_PROFILE] = profile

    def compare(champion: Any, since: pd.Timestamp | None) -> dict[str, Any]:
        return task.compare(champion, frame, result, since)

    described = registry.log_training(
        job.name, result, data_versions=data_versions,
        params={"table": job.table, "where": job.where or "", **job.options, "rows": len(frame),
                "train_seconds": round(time.monotonic() - started, 2)},
        trained_until=trained_until(frame, job.options.get("time_column", "ts")),
        compare=compare,
    )
    return described


REFERENCE_PROFILE = "reference_profile"
"""``TrainResult.artifacts`` key of the reference profile (logged as ``reference_profile.json``)."""
PREDICTION = "prediction"
"""The profile's column of the model's answers (one number or class per answer, see ``answer_value``)."""
REFERENCE_ROWS = 10_000
"""Training rows profiled at most (a seeded sample of them beyond that)."""


def answer_value(task: str, answer: dict[str, Any]) -> Any:
    """The one value of an online answer that drift follows: the class (as text) for classify, the
    score for anomaly, the value for regress. ``monitor.report`` reads captured answers the same way
    (``score`` if the answer has one, else ``prediction``; forecast: the ``mean`` values)."""
    if "score" in answer:
        return float(answer["score"])
    value = answer.get("prediction")
    if task == "classify":
        return None if value is None else str(value)
    return None if value is None else float(value)


def reference_profile(model: Any, task: str, frame: pd.DataFrame, *, max_rows: int = REFERENCE_ROWS,
                      seed: int = 0) -> dict[str, Any] | None:
    """The ``monitor.profile`` of what the model receives online, JSON-able; None if it cannot be built.

    Row models (classify, regress, anomaly): the raw input fields a REST, MQTT or streamed instance
    carries (``describe_inputs()["features"]``, never the aggregated matrix of a per-entity model) over
    the training rows (a seeded sample of ``max_rows``), plus ``prediction``: the fitted model's answers
    on those rows, each row one record as serving sees it (``answer_value``); a model that scores a
    reading in its device's context picks the rows and answers itself (``reference_sample``). Forecast: ``target`` and
    ``prediction`` are both the target series' values (a forecast should look like the series).
    Training never fails for want of a profile: a failure is logged and the run has none."""
    import logging

    from ..monitor.profile import build_profile

    try:
        in_context = getattr(model, "reference_sample", None)  # models that score a reading in its context
        if in_context is not None:
            frame, answers = in_context(frame, max_rows)
        elif len(frame) > max_rows:
            frame = frame.sample(n=max_rows, random_state=seed)
        inputs = model.describe_inputs() if hasattr(model, "describe_inputs") else {}
        if hasattr(model, "matrix_from_arrow"):
            features = [f for f in inputs.get("features", []) if f != PREDICTION]
            read = list(dict.fromkeys([*features, *[f for f in inputs.get("fields", []) if f in frame.columns]]))
            table = pa.Table.from_pandas(frame[read], preserve_index=False)
            if in_context is None:
                answers = model.answers(model.predict_matrix(model.matrix_from_arrow(table)))
            values = [answer_value(task, a) for a in answers]
            data = {f: table.column(f) for f in features}
            data[PREDICTION] = pa.array(values, pa.string() if task == "classify" else pa.float64())
        elif getattr(model, "target", None) in frame.columns:
            target = pd.to_numeric(frame[model.target], errors="coerce").to_numpy(dtype=float)
            data = {"target": target, PREDICTION: target}
        else:
            return None
        return orjson.loads(build_profile(data, seed=seed).to_json())
    except Exception as err:  # noqa: BLE001 - drift checks lose their reference, training goes on
        logging.getLogger("iot2ml.ml").warning("no reference profile for this run: %s: %s", type(err).__name__, err)
        return None


def trained_until(frame: pd.DataFrame, column: str = "ts") -> pd.Timestamp | None:
    """The newest timestamp in ``frame[column]`` (UTC), or None without that column or any value."""
    if column not in frame.columns:
        return None
    try:
        newest = pd.to_datetime(frame[column], utc=True).max()
    except (TypeError, ValueError):
        return None
    return None if pd.isna(newest) else newest


def entity_column(model: Any) -> str | None:
    """The model's entity column for the ``predictions`` table's ``entity`` (e.g. a wine ``batch_id``),
    or None: without one, or when it is ``device_id`` (which has its own column)."""
    entity = getattr(model, "entity", None)
    return entity if entity and entity != "device_id" else None


def score(
    name: str,
    *,
    model: Any,
    version: int,
    task: str,
    frame: pd.DataFrame,
    entity: str | None = None,
) -> pa.Table:
    """Run a registered model over ``frame``; rows for the ``predictions`` table.

    ``prediction``, ``label`` and ``scores`` are those ``prediction_columns`` gives for the answers
    of the online channels on the same rows."""
    out = model.predict(frame)
    if not isinstance(out, pd.DataFrame):
        out = pd.DataFrame({"prediction": list(out)})
    now = pd.Timestamp.now(tz="UTC")
    n = len(out)

    def col(name_: str, default: Any = None) -> list[Any]:
        return out[name_].tolist() if name_ in out.columns else [default] * n

    prediction: list[Any]
    label: list[Any] = [None] * n
    scores: list[Any] = [None] * n
    quantile_cols = [c for c in out.columns if c.startswith("q") and c[1:].replace(".", "", 1).isdigit()]
    proba_cols = [c for c in out.columns if c.startswith("proba_")]
    if task == "forecast":
        prediction = col("mean")
        scores = [_json({c: float(v) for c, v in zip(quantile_cols, row)})
                  for row in out[quantile_cols].itertuples(index=False)]
    elif task == "classify":
        label = [str(v) for v in col("prediction")]
        prediction = [float(max(row)) for row in out[proba_cols].itertuples(index=False)] if proba_cols else [None] * n
        scores = [_json({c.removeprefix("proba_"): float(v) for c, v in zip(proba_cols, row)})
                  for row in out[proba_cols].itertuples(index=False)] if proba_cols else [None] * n
    elif task == "anomaly":
        prediction = col("score")
        label = ["anomaly" if bool(v) else "normal" for v in col("is_anomaly", False)]
    else:
        prediction = col("prediction")
    ts = out["ts"] if "ts" in out.columns else pd.Series([now] * n)
    ts = pd.to_datetime(ts, utc=True)
    device = col("device_id")
    ent = col(entity) if entity else [None] * n
    return pa.table({
        "device_id": pa.array([None if v is None else str(v) for v in device], pa.string()),
        "entity": pa.array([None if v is None else str(v) for v in ent], pa.string()),
        "ts": pa.array(ts.astype("datetime64[us, UTC]")),
        "model": pa.array([name] * n, pa.string()),
        "version": pa.array([int(version)] * n, pa.int64()),
        "task": pa.array([task] * n, pa.string()),
        "prediction": pa.array([None if v is None else float(v) for v in prediction], pa.float64()),
        "label": pa.array(label, pa.string()),
        "scores": pa.array(scores, pa.string()),
        "scored_at": pa.array([now] * n, pa.timestamp("us", tz="UTC")),
    }, schema=PREDICTIONS_SCHEMA)


def prediction_columns(task: str, answers: list[dict[str, Any]]) -> dict[str, list[Any]]:
    """The ``predictions`` table's ``prediction``, ``label`` and ``scores`` for online answers
    (``model.answers``), as ``score`` writes them for the same rows: classify: the top probability,
    the class and the probabilities as JSON; anomaly: the score and ``anomaly``/``normal``; forecast:
    one row per answer and step (the mean, the quantiles as JSON, ``q<quantile>`` keys); else the
    prediction."""
    if task == "forecast":
        rows = [(mean, {f"q{q}": values[k] for q, values in a.get("quantiles", {}).items()})
                for a in answers for k, mean in enumerate(a["mean"])]
        return {"prediction": [float(m) for m, _ in rows], "label": [None] * len(rows),
                "scores": [_json(q) for _, q in rows]}
    if task == "classify":
        return {"prediction": [max(a["probabilities"].values()) for a in answers],
                "label": [str(a["prediction"]) for a in answers],
                "scores": [_json(a["probabilities"]) for a in answers]}
    if task == "anomaly":
        return {"prediction": [a["score"] for a in answers],
                "label": ["anomaly" if a["prediction"] else "normal" for a in answers], "scores": [None] * len(answers)}
    return {"prediction": [None if a["prediction"] is None else float(a["prediction"]) for a in answers],
            "label": [None] * len(answers), "scores": [None] * len(answers)}


def _json(value: dict[str, float]) -> str:
    return orjson.dumps(value).decode()
