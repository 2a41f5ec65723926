"""Live quality of a served model, online error-stream detectors, and the ``metric`` / ``anomaly`` kinds.

:func:`live_quality` judges what a model answered against the truth that arrived later and returns
rows shaped like the ``monitor_reports`` table's quality rows (``scope`` = ``"quality"``, ``test`` =
the metric, ``statistic`` = its value, ``n_current`` = the rows judged, ``kind`` = the model's task,
``window_seconds``; no ``at``: the writer stamps it), one per version and variant and metric:

- **classify** (``accuracy``, ``f1`` = macro F1 over the classes seen in truth or answer): the
  answers captured by serving (``model_inputs``, their ``prediction`` JSON's ``"prediction"``
  field) joined on ``entity`` (``device_id`` for answers without one, as training joins labels on
  ``device_id`` for models without an entity column) with the latest label of that entity in
  ``labels`` (latest by ``ts``, then ``imported_at``; ``label_window`` models are not asof-joined).
  Only answers whose entity has a label are judged. Numbers compare as numbers (a label ``"6"``
  matches an answer ``6`` or ``6.0``), anything else as text.
- **regress** (``mae``, ``rmse``): the captured answers against the actual value of the model's
  target (its training run's ``label`` parameter): the reading of the same ``device_id`` in the
  model's table (the run's ``table`` parameter) nearest in ``ts`` within :data:`MATCH_SECONDS`
  when the target is a column of that table, else the latest label of the answer's ``entity``
  (a target that came from ``labels``). The captured ``ts`` must be the reading's time for this
  join to find the reading (streamed rows; REST/MQTT instances that carry their ``ts``). The run's
  parameters are read through ``ctx.models.params(model, version)`` or a ``"params"`` key of the
  registry description; where neither exists the rows say so in ``status`` (``"unsupported: ..."``)
  instead of a number.
- **forecast** (``mae``): the forecasts stored in ``predictions`` (``iot2ml predict``: one row per
  series and step, ``prediction`` = the mean) whose step has closed inside the window, against the
  mean of the readings of the model's ``target`` in that step (``ts`` truncated to the run's
  ``freq``) of the same series (``device_id``). Forecasts have no variant (``""``); answers given
  over REST/MQTT (``model_inputs``) are not judged yet.

Every row of a version/variant that has judged rows also gets two detector rows: ``adwin``
(``river.drift.ADWIN``) and ``page_hinkley`` (``river.drift.PageHinkley``, river's defaults) run over
the per-row error stream in time order (0/1 errors for classify, absolute errors otherwise);
``statistic`` is the number of changes detected, ``last_change`` (epoch seconds, not a column of
the table) and ``status`` (``"changed, last at <RFC 3339>"``, else ``"ok"``) say when the last was.
Status is ``"no_data"`` when nothing could be judged.

Alert kinds (see ``kinds.py``):

- ``--metric MODEL:METRIC --below X | --above X`` (:func:`define_metric`,
  :class:`MetricEvaluator`): one sample per ``version``/``variant``. The captured answers of the
  window are followed incrementally: each evaluation reads the ``model_inputs`` rows of the model
  with ``ts`` at or after the newest ``ts`` read minus :data:`SETTLE_SECONDS` (``model_inputs`` has
  no ``_seq``; the margin catches captures committed a little out of order, and re-read rows are
  dropped as duplicates), and drops rows older than the window. The truth (labels, readings,
  forecasts) is re-read on each evaluation for the window's entities/devices only, because labels
  and actuals arrive after the answers and change the verdict of answers already held.
- ``--anomaly MODEL`` (:func:`define_anomaly`, :class:`AnomalyEvaluator`): per ``device_id``, the
  rows of that model in ``predictions`` flagged ``label = "anomaly"`` whose reading ``ts`` is in the
  window; breached when > 0; a device scored in the window without flags is a sample of 0. Rows
  are followed by ``scored_at`` (the scorer's clock when it wrote them; ``predictions`` has no
  ``_seq``), re-reading :data:`SETTLE_SECONDS` behind the newest ``scored_at`` read (rows
  committed later than that after being stamped are missed until a restart) and dropping
  duplicates. Batch-scored rows (``iot2ml predict``) whose reading ``ts`` is in the window count too.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ..core.errors import InvalidInput, NotFound
from ..core.tables import LABELS, MODEL_INPUTS, PREDICTIONS
from .rules import NO_DATA, EvalError, Result, Sample

__all__ = [
    "DETECTORS",
    "MATCH_SECONDS",
    "METRICS",
    "SETTLE_SECONDS",
    "AnomalyEvaluator",
    "MetricEvaluator",
    "anomaly_evaluator",
    "define_anomaly",
    "define_metric",
    "live_quality",
    "metric_evaluator",
]

log = logging.getLogger(__name__)

METRICS: dict[str, tuple[str, ...]] = {"classify": ("accuracy", "f1"), "regress": ("mae", "rmse"),
                                       "forecast": ("mae",)}
"""The live metrics of each task (``--metric MODEL:METRIC``)."""
_ALIASES = {"macro_f1": "f1", "f1_macro": "f1"}
#: Whether a higher value of the metric is better (says which threshold flag a user likely wants).
_HIGHER_IS_BETTER = {"accuracy": True, "f1": True, "mae": False, "rmse": False}
DETECTORS = ("adwin", "page_hinkley")
"""The online change detectors run over each error stream (``test`` of their rows)."""
MATCH_SECONDS = 1.0
"""A regress answer is judged against the device's reading nearest in time within this many seconds."""
SETTLE_SECONDS = 30.0
"""How far behind the newest row read the followers re-read (rows may commit a little out of order)."""
MAX_ROWS = 1_000_000
"""The most captured / flagged rows an evaluator holds for its window (more is an ``EvalError``)."""

_EXAMPLE_METRIC = "--metric wine-quality:accuracy --below 0.8"


# ---- reading the lake --------------------------------------------------------------------------

def _stamp(seconds: float) -> Any:
    import pyarrow as pa

    return pa.scalar(math.floor(seconds * 1_000_000), type=pa.timestamp("us", tz="UTC"))


def _read(lake: Any, table: str, where: Any, columns: list[str]) -> Any:
    """Rows of ``table`` matching ``where`` as a Polars frame (empty, with ``columns``, if the table
    does not exist yet)."""
    import polars as pl

    schema = lake.schema(table)
    if schema is None:
        import pyarrow as pa

        from ..core.tables import LABELS_SCHEMA, MODEL_INPUTS_SCHEMA, PREDICTIONS_SCHEMA

        known = {MODEL_INPUTS: MODEL_INPUTS_SCHEMA, LABELS: LABELS_SCHEMA, PREDICTIONS: PREDICTIONS_SCHEMA}
        fields = known.get(table, pa.schema([]))
        rows = pa.table({c: pa.array([], fields.field(c).type if c in fields.names else pa.null()) for c in columns})
    else:
        rows = lake.dataset(table).to_table(filter=where, columns=[c for c in columns if c in schema.names])
    frame = pl.from_arrow(rows)
    assert isinstance(frame, pl.DataFrame)
    return frame


def _read_captured(lake: Any, model: str, since: float, until: float | None = None) -> Any:
    """The answers of ``model`` serving captured with ``ts`` in ``[since, until]``."""
    import pyarrow.compute as pc

    where = (pc.field("model") == model) & (pc.field("ts") >= _stamp(since)) & pc.field("prediction").is_valid()
    if until is not None:
        where = where & (pc.field("ts") <= _stamp(until))
    return _read(lake, MODEL_INPUTS, where, ["ts", "version", "variant", "device_id", "entity", "prediction"])


def _latest_labels(lake: Any, entities: list[str]) -> Any:
    """``entity``, ``actual``: the latest label of each of ``entities`` that has one."""
    import polars as pl
    import pyarrow as pa
    import pyarrow.compute as pc

    if not entities:
        return pl.DataFrame({"entity": [], "actual": []}, schema={"entity": pl.String, "actual": pl.String})
    labels = _read(lake, LABELS, pc.field("entity").isin(pa.array(entities, pa.string())),
                   ["entity", "label", "ts", "imported_at"])
    if labels.height == 0:
        return pl.DataFrame({"entity": [], "actual": []}, schema={"entity": pl.String, "actual": pl.String})
    return (labels.sort(["ts", "imported_at"]).group_by("entity")
            .agg(pl.col("label").last().alias("actual")))


def _answer_field(column: str = "prediction") -> Any:
    """The answer's ``"prediction"`` field as text (a bare JSON value is taken as the answer itself)."""
    import polars as pl

    raw = pl.col(column)
    return pl.coalesce(raw.str.json_path_match("$.prediction"), raw.str.strip_chars().str.strip_chars('"'))


def _canonical(expr: Any) -> Any:
    """A class name as compared: numbers as Float64 text (``6``, ``"6"``, ``6.0`` agree), else the text."""
    import polars as pl

    text = expr.cast(pl.String).str.strip_chars()
    return pl.coalesce(text.cast(pl.Float64, strict=False).cast(pl.String), text)


# ---- what an answer is judged against -------------------------------------------------------------

@dataclass
class _Truth:
    """Where a version's actual values come from (from its training run's parameters)."""

    table: str | None = None
    target: str | None = None
    entity: str | None = None
    series: str = "device_id"
    freq: str | None = None
    reason: str | None = None  # why the version cannot be judged


def _params(models: Any, model: str, version: int) -> dict[str, Any] | None:
    described = models.describe(model, version)
    params = described.get("params")
    if params is None and callable(getattr(models, "params", None)):
        params = models.params(model, version)
    return None if params is None else dict(params)


def _truth(ctx: Any, model: str, version: int, task: str) -> _Truth:
    if ctx.models is None:
        return _Truth(reason="no model registry is reachable from the monitor")
    try:
        params = _params(ctx.models, model, version)
    except NotFound as err:
        return _Truth(reason=str(err))
    if params is None:
        return _Truth(reason=f"the registry gives no training parameters (table, target) of {model} v{version}: "
                             "the monitor needs ModelOps.params")
    table = params.get("table")
    target = params.get("target" if task == "forecast" else "label")
    if not table or not target:
        return _Truth(reason=f"{model} v{version} was trained without a table and target to judge it by")
    entity = params.get("entity") or None
    return _Truth(table=table, target=target, entity=entity, series=params.get("series_column") or "device_id",
                  freq=params.get("freq") or "1h")


# ---- judging: one row per answer with its error ---------------------------------------------------

def _entity_key() -> Any:
    """The key an answer's label is found by: its ``entity``, else its ``device_id`` (as training joins
    the labels of a model without an entity column on ``device_id``)."""
    import polars as pl

    return pl.coalesce(pl.col("entity"), pl.col("device_id").cast(pl.String)).alias("_key")


def _join_labels(lake: Any, answers: Any) -> Any:
    """``answers`` with ``actual``, the latest label of their key; answers without a label are left out."""
    answers = answers.with_columns(_entity_key()).filter(_entity_key().is_not_null())
    latest = _latest_labels(lake, answers.get_column("_key").unique().to_list())
    return answers.join(latest.rename({"entity": "_key"}), on="_key", how="inner").drop("_key")


def _judge_classify(lake: Any, captured: Any) -> Any:
    """``ts, version, variant, predicted, actual, error`` (0/1) of the captured answers whose entity has a label."""
    import polars as pl

    joined = _join_labels(lake, captured)
    return joined.select(
        "ts", "version", pl.col("variant").fill_null(""),
        _canonical(_answer_field()).alias("predicted"), _canonical(pl.col("actual")).alias("actual"),
    ).with_columns((pl.col("predicted") != pl.col("actual")).fill_null(True).cast(pl.Float64).alias("error"))


def _judge_regress(ctx: Any, model: str, captured: Any, truths: dict[int, _Truth]) -> tuple[Any, list[str]]:
    """``ts, version, variant, predicted, actual, error`` (absolute) and why some versions could not be judged."""
    import datetime as dt

    import polars as pl
    import pyarrow as pa
    import pyarrow.compute as pc

    answers = captured.select("ts", "version", pl.col("variant").fill_null(""), "device_id", "entity",
                              _answer_field().cast(pl.Float64, strict=False).alias("predicted"))
    parts, reasons = [], []
    for version in sorted(answers.get_column("version").drop_nulls().unique().to_list()):
        truth = truths.setdefault(version, _truth(ctx, model, version, "regress"))
        rows = answers.filter(pl.col("version") == version)
        if truth.reason:
            reasons.append(truth.reason)
            continue
        schema = ctx.lake.schema(truth.table)
        if schema is not None and truth.target in schema.names:
            rows = rows.filter(pl.col("device_id").is_not_null()).sort("ts")
            if rows.height == 0:
                continue
            pad = MATCH_SECONDS
            lo = rows.get_column("ts").min().timestamp() - pad
            hi = rows.get_column("ts").max().timestamp() + pad
            devices = pa.array(rows.get_column("device_id").unique().to_list(), pa.string())
            where = ((pc.field("ts") >= _stamp(lo)) & (pc.field("ts") <= _stamp(hi))
                     & pc.field("device_id").isin(devices) & pc.field(truth.target).is_valid())
            readings = _read(ctx.lake, truth.table, where, ["device_id", "ts", truth.target])
            readings = readings.select(pl.col("device_id").cast(pl.String), pl.col("ts").alias("_actual_ts"),
                                       pl.col(truth.target).cast(pl.Float64).alias("actual")).sort("_actual_ts")
            joined = rows.join_asof(readings, left_on="ts", right_on="_actual_ts", by="device_id",
                                    strategy="nearest", tolerance=dt.timedelta(seconds=MATCH_SECONDS),
                                    check_sortedness=False)  # both sorted by ts above
        else:  # the target came from labels (per entity, else per device) when the model was trained
            joined = _join_labels(ctx.lake, rows).with_columns(pl.col("actual").cast(pl.Float64, strict=False))
        parts.append(joined.filter(pl.col("actual").is_not_null() & pl.col("predicted").is_not_null())
                     .select("ts", "version", "variant", "predicted", "actual"))
    judged = pl.concat(parts) if parts else _empty_judged()
    return judged.with_columns((pl.col("predicted") - pl.col("actual")).abs().alias("error")), reasons


def _judge_forecast(ctx: Any, model: str, since: float, until: float,
                    truths: dict[int, _Truth]) -> tuple[Any, list[str]]:
    """Stored forecasts whose step closed in ``[since, until]`` against the mean reading of that step."""
    import polars as pl
    import pyarrow as pa
    import pyarrow.compute as pc

    where = ((pc.field("model") == model) & (pc.field("ts") >= _stamp(since)) & (pc.field("ts") <= _stamp(until))
             & pc.field("prediction").is_valid())
    stored = _read(ctx.lake, PREDICTIONS, where, ["device_id", "ts", "version", "prediction"])
    parts, reasons = [], []
    for version in sorted(stored.get_column("version").drop_nulls().unique().to_list()):
        truth = truths.setdefault(version, _truth(ctx, model, version, "forecast"))
        if truth.reason:
            reasons.append(truth.reason)
            continue
        step = _duration(truth.freq or "")
        if step is None:
            reasons.append(f"{model} v{version}'s freq {truth.freq!r} is not a fixed duration")
            continue
        if truth.series != "device_id":
            reasons.append(f"{model} v{version} forecasts series of {truth.series!r}, which predictions do not keep")
            continue
        rows = stored.filter((pl.col("version") == version) & pl.col("device_id").is_not_null()
                             & (pl.col("ts").dt.epoch("us") + int(step * 1_000_000) <= int(until * 1_000_000)))
        if rows.height == 0:
            continue
        devices = pa.array(rows.get_column("device_id").unique().to_list(), pa.string())
        lo, hi = rows.get_column("ts").min().timestamp(), rows.get_column("ts").max().timestamp() + step
        where = ((pc.field("ts") >= _stamp(lo)) & (pc.field("ts") < _stamp(hi)) & pc.field("device_id").isin(devices)
                 & pc.field(truth.target).is_valid())
        readings = _read(ctx.lake, truth.table, where, ["device_id", "ts", truth.target])
        every = f"{round(step * 1_000_000)}us"
        actual = (readings.group_by(pl.col("device_id").cast(pl.String), pl.col("ts").dt.truncate(every))
                  .agg(pl.col(truth.target).cast(pl.Float64).mean().alias("actual")))
        joined = rows.join(actual, on=["device_id", "ts"], how="inner")
        parts.append(joined.select("ts", "version", pl.lit("").alias("variant"),
                                   pl.col("prediction").alias("predicted"), "actual"))
    judged = pl.concat(parts) if parts else _empty_judged()
    return judged.with_columns((pl.col("predicted") - pl.col("actual")).abs().alias("error")), reasons


def _duration(freq: str) -> float | None:
    """Seconds of a fixed pandas frequency (``1h``, ``15min``), else None (``1M`` has no fixed length)."""
    import pandas as pd

    try:
        return pd.Timedelta(pd.tseries.frequencies.to_offset(freq)).total_seconds()
    except (ValueError, TypeError):
        return None


def _empty_judged() -> Any:
    import polars as pl

    return pl.DataFrame(schema={"ts": pl.Datetime("us", "UTC"), "version": pl.Int64, "variant": pl.String,
                                "predicted": pl.Float64, "actual": pl.Float64})


# ---- metrics and detectors ---------------------------------------------------------------------

def _classify_metrics(judged: Any) -> Any:
    """``version, variant, test, statistic, n``: accuracy and macro F1 per version and variant."""
    import polars as pl

    keys = ["version", "variant"]
    accuracy = judged.group_by(keys).agg((1.0 - pl.col("error").mean()).alias("statistic"), pl.len().alias("n"))
    truth = judged.group_by([*keys, pl.col("actual").alias("cls")]).agg(
        pl.len().alias("n_true"), (pl.col("error") == 0).sum().alias("tp"))
    answered = judged.group_by([*keys, pl.col("predicted").alias("cls")]).agg(pl.len().alias("n_pred"))
    per_class = truth.join(answered, on=[*keys, "cls"], how="full", coalesce=True).fill_null(0)
    f1 = per_class.group_by(keys).agg(
        (2 * pl.col("tp") / (pl.col("n_true") + pl.col("n_pred"))).mean().alias("statistic"))
    f1 = f1.join(accuracy.select(*keys, "n"), on=keys)
    return pl.concat([accuracy.with_columns(pl.lit("accuracy").alias("test")),
                      f1.with_columns(pl.lit("f1").alias("test"))], how="diagonal")


def _error_metrics(judged: Any) -> Any:
    import polars as pl

    keys = ["version", "variant"]
    out = judged.group_by(keys).agg(pl.col("error").mean().alias("mae"), (pl.col("error") ** 2).mean().sqrt()
                                    .alias("rmse"), pl.len().alias("n"))
    return out.unpivot(index=[*keys, "n"], on=["mae", "rmse"], variable_name="test", value_name="statistic")


def _detect(errors: list[float], stamps: list[Any]) -> dict[str, tuple[int, float | None]]:
    """``{detector: (changes detected, epoch seconds of the last)}`` over one error stream in time order."""
    from river import drift

    out = {}
    for name, detector in (("adwin", drift.ADWIN()), ("page_hinkley", drift.PageHinkley())):
        changes, last = 0, None
        for value, at in zip(errors, stamps):
            detector.update(value)
            if detector.drift_detected:
                changes, last = changes + 1, at
        out[name] = (changes, None if last is None else last.timestamp())
    return out


def _rows(model: str, task: str, judged: Any, metrics: Any, window: float) -> list[dict[str, Any]]:
    from .rules import rfc3339

    base = {"model": model, "scope": "quality", "kind": task, "window_seconds": window}
    rows = []
    for m in metrics.sort(["version", "variant", "test"]).iter_rows(named=True):
        rows.append({**base, "version": m["version"], "variant": m["variant"], "test": m["test"],
                     "statistic": m["statistic"], "n_current": m["n"], "status": "ok"})
    for (version, variant), group in judged.sort("ts").group_by(["version", "variant"], maintain_order=True):
        found = _detect(group.get_column("error").to_list(), group.get_column("ts").to_list())
        for name in DETECTORS:
            changes, last = found[name]
            rows.append({**base, "version": version, "variant": variant, "test": name, "statistic": float(changes),
                         "n_current": group.height, "last_change": last,
                         "status": "ok" if last is None else f"changed, last at {rfc3339(last)}"})
    return rows


def _missing_rows(model: str, task: str | None, status: str, window: float, captured: Any = None) -> list[dict[str, Any]]:
    """One row per metric saying why there is no number (per captured version/variant, if any)."""
    import polars as pl

    groups: list[tuple[Any, Any]] = [(None, None)]
    if captured is not None and captured.height:
        keyed = captured.select("version", pl.col("variant").fill_null("")).unique().sort(["version", "variant"])
        groups = list(keyed.iter_rows())
    return [{"model": model, "scope": "quality", "kind": task, "window_seconds": window, "version": version,
             "variant": variant, "test": test, "statistic": None, "n_current": 0, "status": status}
            for version, variant in groups for test in METRICS.get(task or "", ("quality",))]


def _quality(ctx: Any, model: str, task: str, captured: Any, since: float, until: float,
             truths: dict[int, _Truth]) -> list[dict[str, Any]]:
    window = until - since
    if task not in METRICS:
        return _missing_rows(model, task, f"unsupported: {task} models have no live quality metric "
                                          "(alert on anomaly flags with --anomaly)", window)
    reasons: list[str] = []
    if task == "classify":
        judged = _judge_classify(ctx.lake, captured)
    elif task == "regress":
        judged, reasons = _judge_regress(ctx, model, captured, truths)
    else:
        judged, reasons = _judge_forecast(ctx, model, since, until, truths)
    if judged.height == 0:
        status = f"unsupported: {'; '.join(dict.fromkeys(reasons))}" if reasons else "no_data"
        return _missing_rows(model, task, status, window, captured if task != "forecast" else None)
    metrics = _classify_metrics(judged) if task == "classify" else _error_metrics(judged)
    if task == "forecast":
        metrics = metrics.filter(metrics["test"] == "mae")
    return _rows(model, task, judged, metrics, window)


def live_quality(ctx: Any, model: str, since: float, until: float) -> list[dict[str, Any]]:
    """Live quality of ``model``'s answers with ``ts`` in ``[since, until]`` (epoch seconds); see the
    module docstring. Rows have the ``monitor_reports`` columns but ``at`` (the writer stamps it)."""
    window = until - since
    if ctx.models is None:
        return _missing_rows(model, None, "unsupported: no model registry is reachable from the monitor", window)
    try:
        task = ctx.models.describe(model)["task"]
    except NotFound as err:
        return _missing_rows(model, None, f"unsupported: {err}", window)
    captured = _read_captured(ctx.lake, model, since, until) if task in ("classify", "regress") else None
    return _quality(ctx, model, task, captured, since, until, {})


# ---- the "metric" kind of alert rule -------------------------------------------------------------

def _describe(ctx: Any, model: str, flag: str, example: str) -> dict[str, Any]:
    if ctx.models is None:
        raise InvalidInput(f"{flag} {model!r}: no model registry is reachable here to check the model")
    try:
        return ctx.models.describe(model)
    except NotFound as err:
        raise InvalidInput(f"{flag} {model!r}: {err}; e.g. {example}") from None


def _threshold(spec: Mapping[str, Any]) -> tuple[str, float]:
    given = [k for k in ("below", "above") if spec.get(k) is not None]
    if len(given) != 1:
        what = "both --below and --above" if given else "neither --below nor --above"
        raise InvalidInput(f"--metric takes exactly one of --below or --above, got {what}: e.g. {_EXAMPLE_METRIC}")
    key = given[0]
    value = spec[key]
    try:
        number = float(value)
        if isinstance(value, bool) or not math.isfinite(number):
            raise ValueError
    except (TypeError, ValueError):
        raise InvalidInput(f"--{key} {value!r} is not a number: e.g. {_EXAMPLE_METRIC}") from None
    return key, number


def define_metric(spec: dict[str, Any], ctx: Any, window: float) -> Any:
    """``--metric MODEL:METRIC --below X | --above X``: the model exists and has that live metric."""
    from .kinds import Definition, refuse_extra

    refuse_extra("--metric", spec, ("metric", "below", "above"))
    text = spec.get("metric")
    model, sep, metric = str(text or "").rpartition(":")
    if not isinstance(text, str) or not sep or not model or not metric:
        raise InvalidInput(f"--metric {text!r} must be MODEL:METRIC, e.g. {_EXAMPLE_METRIC}")
    metric = _ALIASES.get(metric.strip().lower(), metric.strip().lower())
    key, number = _threshold(spec)
    task = _describe(ctx, model, "--metric", _EXAMPLE_METRIC).get("task")
    known = METRICS.get(task or "")
    if not known:
        hint = f"; alert on its flags with --anomaly {model}" if task == "anomaly" else ""
        raise InvalidInput(f"--metric {text!r}: {model} is a {task} model, which has no live metric{hint}")
    if metric not in known:
        raise InvalidInput(f"--metric {text!r}: {metric!r} is not a live metric of {task} model {model}: "
                           f"use one of {', '.join(known)}, e.g. --metric {model}:{known[0]} "
                           f"--{'below' if _HIGHER_IS_BETTER[known[0]] else 'above'} ...")
    if not (isinstance(window, (int, float)) and math.isfinite(window) and window > 0):
        raise InvalidInput(f"--window {window!r} must be a duration > 0, e.g. 1d")
    op = "<" if key == "below" else ">"
    return Definition(table=model, what=f"{metric} {op} {number:g}", by=("version", "variant"),
                      spec={"metric": f"{model}:{metric}", key: number})


@dataclass
class MetricEvaluator:
    """Evaluates a ``--metric`` rule; see the module docstring for how it follows the captures."""

    ctx: Any
    model: str
    metric: str
    op: str  # "below" or "above"
    threshold: float
    window: float
    max_rows: int = MAX_ROWS
    task: str | None = None
    rows_read: int = 0
    mark: Any = None  # the newest captured ts read (a UTC datetime)
    _buffer: Any = None
    _truths: dict[int, _Truth] = field(default_factory=dict)

    def evaluate(self, now: float) -> Result:
        """One sample per version/variant with the metric over ``[now - window, now]``; never raises."""
        try:
            return self._evaluate(now)
        except Exception as err:  # noqa: BLE001 - an evaluation reports its failure, the engine decides
            log.warning("live %s of %s failed: %s", self.metric, self.model, err)
            return EvalError(f"live {self.metric} of model {self.model!r} failed: {type(err).__name__}: {err}")

    def _evaluate(self, now: float) -> Result:
        cutoff = now - self.window
        if self.task is None:
            if self.ctx.models is None:
                return EvalError(f"no model registry is reachable to judge model {self.model!r}")
            self.task = self.ctx.models.describe(self.model)["task"]
        captured = None
        if self.task in ("classify", "regress"):
            self._follow(cutoff, now)
            captured = self._buffer
            if captured.height > self.max_rows:
                return EvalError(f"model {self.model!r} has more than {self.max_rows} captured answers in the "
                                 "window: shorten --window or capture a smaller sample")
        rows = _quality(self.ctx, self.model, self.task, captured, cutoff, now, self._truths)
        judged = [r for r in rows if r["test"] == self.metric]
        if all(r["statistic"] is None for r in judged):
            status = (judged or rows)[0]["status"] if (judged or rows) else "no_data"
            return NO_DATA if status == "no_data" else EvalError(f"model {self.model!r}: {status}")
        samples = []
        for r in judged:
            value = r["statistic"]
            if value is None:
                continue
            breached = value < self.threshold if self.op == "below" else value > self.threshold
            samples.append(Sample(labels={"version": str(r["version"]), "variant": r["variant"] or ""},
                                  value=float(value), breached=bool(breached)))
        return samples

    def _follow(self, cutoff: float, now: float) -> None:
        """Add the captures newer than the mark (minus the settle margin), drop those out of the window."""
        import polars as pl

        since = cutoff if self.mark is None else max(cutoff, self.mark.timestamp() - SETTLE_SECONDS)
        new = _read_captured(self.ctx.lake, self.model, since)
        self.rows_read += new.height
        if self._buffer is not None and self._buffer.height and self.mark is not None and new.height:
            # rows at or before the old mark may have been read before: keep those not held already
            edge = _stamp(since).as_py()
            overlap = new.filter(pl.col("ts") <= self.mark).join(
                self._buffer.filter(pl.col("ts") >= edge), on=new.columns, how="anti", nulls_equal=True)
            new = pl.concat([overlap, new.filter(pl.col("ts") > self.mark)], how="vertical_relaxed")
        if new.height:
            newest = new.get_column("ts").max()
            self.mark = newest if self.mark is None else max(self.mark, newest)
        frames = [f for f in (self._buffer, new) if f is not None and f.height]
        buffer = pl.concat(frames, how="vertical_relaxed") if frames else new
        self._buffer = buffer.filter(pl.col("ts") >= _stamp(cutoff).as_py())


def metric_evaluator(record: Any, ctx: Any) -> MetricEvaluator:
    spec = record.spec
    model, _, metric = spec["metric"].rpartition(":")
    op = "below" if spec.get("below") is not None else "above"
    return MetricEvaluator(ctx, model, metric, op, float(spec[op]), float(record.window))


# ---- the "anomaly" kind of alert rule ----------------------------------------------------------

def define_anomaly(spec: dict[str, Any], ctx: Any, window: float) -> Any:
    """``--anomaly MODEL``: the model exists and is an anomaly model."""
    from .kinds import Definition, refuse_extra

    refuse_extra("--anomaly", spec, ("anomaly",))
    model = spec.get("anomaly")
    if not isinstance(model, str) or not model.strip():
        raise InvalidInput(f"--anomaly {model!r} must name an anomaly model, e.g. --anomaly pump-blockage")
    model = model.strip()
    task = _describe(ctx, model, "--anomaly", "--anomaly pump-blockage").get("task")
    if task != "anomaly":
        hint = f": watch its quality with --metric {model}:{METRICS[task][0]}" if task in METRICS else ""
        raise InvalidInput(f"--anomaly {model!r} is a {task} model, not an anomaly model{hint}")
    if not (isinstance(window, (int, float)) and math.isfinite(window) and window > 0):
        raise InvalidInput(f"--window {window!r} must be a duration > 0, e.g. 5m")
    return Definition(table=model, what="anomalies > 0", by=("device_id",), spec={"anomaly": model})


@dataclass
class AnomalyEvaluator:
    """Counts a model's streamed anomaly flags per device; see the module docstring."""

    lake: Any
    model: str
    window: float
    max_rows: int = MAX_ROWS
    rows_read: int = 0
    mark: float | None = None  # the newest scored_at read (epoch seconds)
    _flagged: Any = None  # device_id, ts, scored_at, version of the flagged rows in the window
    _seen: dict[str, float] = field(default_factory=dict)  # device -> newest reading ts scored

    def evaluate(self, now: float) -> Result:
        """Flagged rows per device over readings with ``ts`` in ``[now - window, now]``; never raises."""
        try:
            return self._evaluate(now)
        except Exception as err:  # noqa: BLE001 - an evaluation reports its failure, the engine decides
            log.warning("anomaly flags of %s failed: %s", self.model, err)
            return EvalError(f"reading the anomaly flags of model {self.model!r} failed: {type(err).__name__}: {err}")

    def _evaluate(self, now: float) -> Result:
        import polars as pl
        import pyarrow.compute as pc

        cutoff = now - self.window
        where = (pc.field("model") == self.model) & (pc.field("ts") >= _stamp(cutoff))
        if self.mark is not None:
            where = where & (pc.field("scored_at") >= _stamp(self.mark - SETTLE_SECONDS))
        new = _read(self.lake, PREDICTIONS, where, ["device_id", "ts", "scored_at", "version", "label"])
        self.rows_read += new.height
        new = new.filter(pl.col("device_id").is_not_null())
        if new.height:
            newest = new.get_column("scored_at").max()
            if newest is not None:
                self.mark = newest.timestamp() if self.mark is None else max(self.mark, newest.timestamp())
            seen = new.group_by("device_id").agg(pl.col("ts").max())
            for device, ts in seen.iter_rows():
                self._seen[device] = max(self._seen.get(device, -math.inf), ts.timestamp())
            flagged = new.filter(pl.col("label") == "anomaly").drop("label")
            frames = [f for f in (self._flagged, flagged) if f is not None and f.height]
            self._flagged = pl.concat(frames, how="vertical_relaxed").unique() if frames else flagged
        self._seen = {d: t for d, t in self._seen.items() if t >= cutoff}
        if self._flagged is not None:
            self._flagged = self._flagged.filter(pl.col("ts") >= _stamp(cutoff).as_py())
            if self._flagged.height > self.max_rows:
                return EvalError(f"model {self.model!r} flagged more than {self.max_rows} readings in the window: "
                                 "shorten --window")
        if not self._seen:
            return NO_DATA
        counts: dict[str, int] = {}
        if self._flagged is not None and self._flagged.height:
            counts = dict(self._flagged.group_by("device_id").len().iter_rows())
        return [Sample(labels={"device_id": device}, value=float(counts.get(device, 0)),
                       breached=counts.get(device, 0) > 0) for device in sorted(self._seen)]


def anomaly_evaluator(record: Any, ctx: Any) -> AnomalyEvaluator:
    return AnomalyEvaluator(ctx.lake, record.spec.get("anomaly") or record.table, float(record.window))
