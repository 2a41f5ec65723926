"""Drift reports of a model: what serving captured in a window against each version's reference profile.

``build_report(ctx, model, window=3600)`` reads the ``model_inputs`` rows of ``model`` with ``ts`` in
``(now - window, now]`` (the filter on ``model`` and ``ts`` is pushed down to the Parquet files),
decodes their ``inputs`` and ``prediction`` JSON column-wise (pyarrow's JSON reader; a column whose
values disagree in type falls back to Polars per field), and per version seen runs
``drift.detect_drift`` against that version's reference profile (``ctx.models.reference_profile``,
logged at training by ``ml.jobs``): every profiled input field, and the ``prediction`` (an answer's
``score`` if it has one (anomaly), its ``mean`` values (forecast), else its ``prediction``: the class
or the value). Rows of a version without a profile are reported with ``status`` ``no_reference``.
Live quality (``monitor.live.live_quality``), when that module is there, joins as ``scope`` quality.

The report is returned as a JSON-able dict, appended to ``monitor_reports`` (``write=True``) and set
as gauges in ``/metrics`` of the process that built it. The ``drift`` kind of alert rule
(``--drift MODEL``, see ``kinds.py``) evaluates through it: one sample per version, its value the
share of drifted features, breached on dataset drift.
"""

from __future__ import annotations

import functools
import importlib
import logging
import math
import threading
import time
import uuid
from typing import Any

from ..core.errors import InvalidInput, NotFound
from ..core.tables import MODEL_INPUTS, MONITOR_REPORTS
from .rules import NO_DATA, EvalError, Result, Sample

__all__ = ["MAX_WINDOW", "build_report", "define_drift", "drift_evaluator", "parse_window"]

log = logging.getLogger("iot2ml.monitor")

PREDICTION = "prediction"
"""The reference profile's column of the model's answers (``ml.jobs.PREDICTION``)."""
MAX_WINDOW = 366 * 86400.0
"""Longest report window, in seconds (a year)."""
_APP_ID = f"iot2ml-report-{uuid.uuid4().hex[:12]}"
_written = [0]
_write_lock = threading.Lock()


def parse_window(text: str) -> float:
    """``1h``, ``30m``, ``90s``... as seconds in ``(0, MAX_WINDOW]``; else ``InvalidInput`` saying so."""
    from ..core.timeutil import parse_duration

    seconds = parse_duration(text)
    if not (math.isfinite(seconds) and 0 < seconds <= MAX_WINDOW):
        raise InvalidInput(f"window {text!r} must be a duration > 0 and at most 366d, e.g. 1h")
    return seconds


# --------------------------------------------------------------------------- the report


def build_report(ctx: Any, model: str, *, window: float, now: float | None = None, version: int | None = None,
                 write: bool = True) -> dict[str, Any]:
    """The drift (and live quality) of ``model`` over the last ``window`` seconds; see the module docstring.

    ``NotFound`` when ``ctx.models`` does not know ``model``; ``version`` restricts the report to it."""
    if not (isinstance(window, (int, float)) and math.isfinite(window) and 0 < window <= MAX_WINDOW):
        raise InvalidInput(f"window {window!r} must be > 0 seconds and at most {MAX_WINDOW:g}, e.g. 3600")
    if not model or len(model) > 256 or not all(c.isalnum() or c in "-_." for c in model):
        raise NotFound(f"no model {model[:80]!r}: model names have letters, digits, '-', '_' and '.'")
    if ctx.models is not None:
        ctx.models.describe(model)  # NotFound names the models there are
    now = time.time() if now is None else float(now)
    since = now - window
    rows = _captured(ctx.lake, model, since, now, version)
    at = _utc(now)
    context = {"at": at, "model": model, "window_seconds": float(window)}
    versions: list[dict[str, Any]] = []
    report_rows: list[dict[str, Any]] = []
    if rows.num_rows:
        import pyarrow.compute as pc

        for v in sorted(pc.unique(rows.column("version")).drop_null().to_pylist()):
            part = rows.filter(pc.equal(rows.column("version"), v))
            variants = sorted(set(part.column("variant").drop_null().to_pylist()))
            variant = ",".join(variants) or None
            entry, entry_rows = _version_report(ctx, model, int(v), variant, part, context)
            versions.append(entry)
            report_rows.extend(entry_rows)
    quality = _quality(ctx, model, since, now)
    report_rows.extend({**context, "scope": "quality", **q} for q in quality)
    if write and report_rows:
        _append(ctx.lake, report_rows)
    _set_gauges(model, versions)
    return {"model": model, "window_seconds": float(window), "at": at.isoformat().replace("+00:00", "Z"),
            "versions": versions, "quality": _clean(quality)}


def _utc(seconds: float) -> Any:
    from datetime import UTC, datetime

    return datetime.fromtimestamp(seconds, UTC)


def _captured(lake: Any, model: str, since: float, until: float, version: int | None) -> Any:
    """The ``model_inputs`` rows of ``model`` with ``since < ts <= until`` (pushed-down filter)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    columns = ["version", "variant", "inputs", "prediction"]
    if lake.schema(MODEL_INPUTS) is None:
        return pa.table({c: pa.array([], pa.int64() if c == "version" else pa.string()) for c in columns})
    ts = pa.timestamp("us", tz="UTC")
    where = ((pc.field("model") == model) & (pc.field("ts") > pa.scalar(int(since * 1e6), ts))
             & (pc.field("ts") <= pa.scalar(int(until * 1e6), ts)))
    if version is not None:
        where = where & (pc.field("version") == int(version))
    return lake.dataset(MODEL_INPUTS).to_table(filter=where, columns=columns)


def _version_report(ctx: Any, model: str, version: int, variant: str | None, part: Any,
                    context: dict[str, Any]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    from .drift import detect_drift

    n = part.num_rows
    reference = _reference(ctx, model, version)
    base = {"version": version, **({"variant": variant} if variant else {}), "n_current": n}
    row_context = {**context, "version": version, "variant": variant}
    if reference is None:
        entry = {**base, "status": "no_reference", "dataset_drift": None, "share_drifted": None, "features": [],
                 "prediction": None}
        row = {**row_context, "scope": "dataset", "test": "share_drifted", "n_current": n, "status": "no_reference"}
        return entry, [row]
    current = decode(part, reference)
    features = [c for c in reference.columns if c != PREDICTION]
    report = detect_drift(reference, current, features=features,
                          prediction=PREDICTION if PREDICTION in reference.columns else None)
    rows = report.to_rows(**row_context)
    features_out = [_clean(r) for r in rows if r["scope"] == "feature"]
    prediction = next((_clean(r) for r in rows if r["scope"] == "prediction"), None)
    for r in [*features_out, *([prediction] if prediction else [])]:
        for key in ("at", "model", "version", "variant", "window_seconds", "scope"):
            r.pop(key, None)
    entry = {**base, "status": report.status, "dataset_drift": report.dataset_drift,
             "share_drifted": report.share_drifted, "features": features_out, "prediction": prediction}
    return entry, rows


@functools.lru_cache(maxsize=256)
def _cached_reference(models: Any, model: str, version: int) -> Any:
    found = models.reference_profile(model, version)
    if found is None:
        raise LookupError  # not cached: a profile may yet be readable (e.g. the registry was down)
    return found


def _reference(ctx: Any, model: str, version: int) -> Any:
    """The version's reference profile (cached: a version's artifacts never change), or None."""
    if ctx.models is None:
        return None
    try:
        return _cached_reference(ctx.models, model, version)
    except LookupError:
        return None
    except NotFound:  # the version was deleted from the registry
        return None


# --------------------------------------------------------------------------- decoding


def decode(part: Any, reference: Any) -> Any:
    """The captured rows as a table of the reference's columns: each profiled input field (a list, such
    as a forecast's ``target``, contributes its values) and ``prediction`` (see the module docstring),
    typed as the profile has them (numbers as float64, categories as text)."""
    import pyarrow as pa

    inputs = _json_table(part.column("inputs"))
    answers = _json_table(part.column("prediction"))
    out: dict[str, Any] = {}
    for name, col in reference.columns.items():
        if name == PREDICTION:
            values = _answer_values(answers)
        else:
            values = inputs.column(name) if inputs is not None and name in inputs.column_names else None
        out[name] = _typed(values, col.kind)
    return pa.table(out) if out else pa.table({})


def _json_table(column: Any) -> Any:
    """Objects of a JSON text column as an Arrow table (one row each), or None when none parse."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.json as pj

    texts = pc.drop_null(column)
    if len(texts) == 0:
        return None
    if isinstance(texts, pa.ChunkedArray):
        texts = texts.combine_chunks()
    longest = pc.max(pc.binary_length(texts)).as_py() or 0
    lines = pc.cast(pc.binary_join_element_wise(texts, "", "\n"), pa.large_string())  # each text + "\n"
    offsets = lines.buffers()[1]
    first, last = (int.from_bytes(offsets[8 * i:8 * i + 8], "little")
                   for i in (lines.offset, lines.offset + len(lines)))
    data = lines.buffers()[2][first:last]  # the lines back to back, never as Python strings
    try:
        return pj.read_json(pa.BufferReader(data),
                            read_options=pj.ReadOptions(block_size=max(1 << 20, 2 * longest + 2)))
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        return _json_by_field(texts)


def _json_by_field(texts: Any) -> Any:
    """Fallback for values of mixed types: each top-level field read as text by Polars, then typed."""
    import polars as pl
    import pyarrow as pa

    series = pl.Series(texts.to_pylist(), dtype=pl.String)
    keys = series.head(1000).str.json_decode(infer_schema_length=None)
    names = [f.name for f in keys.dtype.fields] if isinstance(keys.dtype, pl.Struct) else []
    cols = {}
    for name in names:
        raw = series.str.json_path_match(f"$['{name}']") if "'" not in name else pl.Series([None] * len(series),
                                                                                          dtype=pl.String)
        cols[name] = raw.to_arrow()
    return pa.table(cols) if cols else None


def _answer_values(answers: Any) -> Any:
    if answers is None:
        return None
    for key in ("score", "mean", "prediction"):
        if key in answers.column_names:
            return answers.column(key)
    return None


def _typed(values: Any, kind: str) -> Any:
    """``values`` flattened (lists) and cast to float64 (numeric) or text (categorical); unparsable → null."""
    import pyarrow as pa
    import pyarrow.compute as pc

    target = pa.float64() if kind == "numeric" else pa.string()
    if values is None:
        return pa.array([], target)
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    if pa.types.is_list(values.type) or pa.types.is_large_list(values.type):
        values = pc.list_flatten(values)
    if pa.types.is_struct(values.type) or pa.types.is_null(values.type):
        return pa.nulls(len(values), target)
    if values.type == target:
        return values
    try:
        return pc.cast(values, target)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        import polars as pl

        series = pl.from_arrow(values).cast(pl.String, strict=False)
        cast = series.cast(pl.Float64, strict=False) if kind == "numeric" else series
        return cast.to_arrow().cast(target)


# --------------------------------------------------------------------------- quality, rows, gauges


def _quality(ctx: Any, model: str, since: float, until: float) -> list[dict[str, Any]]:
    """Rows of ``monitor.live.live_quality`` when that module is there (else none); a failure is logged."""
    try:
        live = importlib.import_module("iot2ml.monitor.live")
    except ImportError:
        return []
    quality = getattr(live, "live_quality", None)
    if quality is None:
        return []
    try:
        return [dict(r) for r in quality(ctx, model, since, until)]
    except Exception as err:  # noqa: BLE001 - drift is reported without live quality
        log.warning("live quality of %s failed: %s: %s", model, type(err).__name__, err)
        return []


def _clean(value: Any) -> Any:
    """JSON-able: NaN and infinities become None, datetimes ISO text."""
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if hasattr(value, "isoformat"):
        return value.isoformat()
    return value


def _append(lake: Any, rows: list[dict[str, Any]]) -> None:
    import pyarrow as pa

    from ..core.tables import MONITOR_REPORTS_SCHEMA

    columns = {}
    for f in MONITOR_REPORTS_SCHEMA:
        values = [r.get(f.name) for r in rows]
        if pa.types.is_floating(f.type) or pa.types.is_integer(f.type):
            values = [None if v is None or (isinstance(v, float) and math.isnan(v)) else v for v in values]
        columns[f.name] = pa.array(values, f.type)
    table = pa.table(columns, schema=MONITOR_REPORTS_SCHEMA)
    with _write_lock:
        _written[0] += 1
        lake.append(MONITOR_REPORTS, table, app_id=_APP_ID, version=_written[0])


_GAUGES: Any = None


def _gauges() -> Any:
    global _GAUGES
    if _GAUGES is None:
        from types import SimpleNamespace

        from prometheus_client import Gauge

        mode = {"multiprocess_mode": "mostrecent"}
        _GAUGES = SimpleNamespace(
            feature=Gauge("iot2ml_model_feature_drift", "Drift score of a model input in the last report "
                          "(p-value of KS/chi-squared/z: drift below 0.05; else Wasserstein/Jensen-Shannon "
                          "distance: drift from 0.1)", ["model", "version", "feature"], **mode),
            dataset=Gauge("iot2ml_model_dataset_drift", "1 when the last report found dataset drift, else 0",
                          ["model", "version"], **mode),
            share=Gauge("iot2ml_model_drift_share", "Share of a model's input features that drifted in the last "
                        "report", ["model", "version"], **mode),
        )
    return _GAUGES


def _set_gauges(model: str, versions: list[dict[str, Any]]) -> None:
    try:
        g = _gauges()
        for v in versions:
            if v.get("dataset_drift") is None:
                continue
            version = str(v["version"])
            g.dataset.labels(model, version).set(1.0 if v["dataset_drift"] else 0.0)
            g.share.labels(model, version).set(float(v["share_drifted"]))
            for f in v["features"]:
                score = f["p_value"] if f["p_value"] is not None else f["distance"]
                if score is not None:
                    g.feature.labels(model, version, f["feature"]).set(float(score))
    except Exception as err:  # noqa: BLE001 - metrics never fail a report
        log.debug("drift gauges of %s not set: %s", model, err)


# --------------------------------------------------------------------------- the drift kind of rule


def define_drift(spec: dict[str, Any], ctx: Any, window: float) -> Any:
    """``--drift MODEL``: a model of the registry (refused with the reason when it is not there)."""
    from .kinds import Definition, refuse_extra

    refuse_extra("--drift", spec, ("drift",))
    model = spec.get("drift")
    if not isinstance(model, str) or not model.strip():
        raise InvalidInput("--drift needs a model name, e.g. --drift wine-quality")
    if ctx.models is None:
        raise InvalidInput(f"--drift {model}: the model registry is not reachable here, so the model cannot be "
                           "checked: add the rule through the CLI or the API of a running platform")
    try:
        ctx.models.describe(model)
    except NotFound as err:
        raise InvalidInput(f"--drift {model}: {err}") from None
    return Definition(table=model, what=f"dataset drift of {model}'s inputs (>= 50% of features drifted)",
                      by=("model", "version"), spec={"drift": model})


class DriftEvaluator:
    """Builds the rule's drift report at most once per ``min_interval`` seconds (the window's 1/60th,
    between 1 s and 60 s); evaluations in between answer the last result. Never raises."""

    def __init__(self, ctx: Any, model: str, window: float) -> None:
        self.ctx, self.model, self.window = ctx, model, float(window)
        self.min_interval = min(60.0, max(1.0, self.window / 60.0))
        self.builds = 0
        self._last: tuple[float, Result] | None = None

    def evaluate(self, now: float) -> Result:
        if self._last is not None and 0 <= now - self._last[0] < self.min_interval:
            return self._last[1]
        result = self._evaluate(now)
        self._last = (now, result)
        return result

    def _evaluate(self, now: float) -> Result:
        try:
            if self.ctx.models is None:
                return EvalError(f"drift of {self.model}: the model registry is not reachable from the monitor")
            report = build_report(self.ctx, self.model, window=self.window, now=now)
            self.builds += 1
        except Exception as err:  # noqa: BLE001 - an evaluation reports its failure, the engine decides
            log.warning("drift report of %s failed: %s: %s", self.model, type(err).__name__, err)
            return EvalError(f"drift report of {self.model} failed: {type(err).__name__}: {err}")
        if not report["versions"]:
            return NO_DATA
        samples = [Sample({"model": self.model, "version": str(v["version"])}, float(v["share_drifted"]),
                          bool(v["dataset_drift"]))
                   for v in report["versions"] if v["dataset_drift"] is not None and v["status"] == "ok"]
        if samples:
            return samples
        missing = [str(v["version"]) for v in report["versions"] if v["status"] == "no_reference"]
        if missing:
            return EvalError(f"{self.model} v{', v'.join(missing)} has no reference profile (trained before "
                             "profiles were logged): retrain it to check its drift")
        return NO_DATA


def drift_evaluator(record: Any, ctx: Any) -> DriftEvaluator:
    return DriftEvaluator(ctx, record.spec.get("drift", record.table), record.window)
