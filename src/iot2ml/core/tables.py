"""Every lake table the platform writes itself, named once, with its fixed Arrow schema.

Built-in tables (their names are reserved: no device type may take one):

- ``raw`` (``RAW_SCHEMA``): every message as it came in, partitioned by ``day``; the ingest commits it last.
- ``dead_letters`` (``DEAD_LETTERS_SCHEMA``): every bad message or reading with the reason, by ``day``.
- ``labels`` (``LABELS_SCHEMA``): what people say about entities (CSV import, the API).
- ``predictions`` (``PREDICTIONS_SCHEMA``): batch scoring and streaming deployments.
- ``prediction_log`` (``PREDICTION_LOG_SCHEMA``): every instance the serving runtime answered.
- ``alerts`` (``ALERTS_SCHEMA``): every state change of an alert instance (the monitor writes it).
- ``model_inputs`` (``MODEL_INPUTS_SCHEMA``): the inputs and answers serving saw (a bounded sample), for drift.
- ``monitor_reports`` (``MONITOR_REPORTS_SCHEMA``): drift per feature, dataset and prediction drift, live quality.
- ``audit`` (``AUDIT_SCHEMA``): every write and every denied request over HTTP (who, role, action, outcome).

One table per device type holds its readings: the ``BASE_FIELDS`` first, then one column per field.

Names cost nothing to import; the schemas need pyarrow and are built on first use
(``from iot2ml.core.tables import RAW_SCHEMA`` works as usual), so ``core.ids`` can derive the
reserved names from here without loading pyarrow.
"""

from __future__ import annotations

from typing import Any

RAW = "raw"
DEAD_LETTERS = "dead_letters"
LABELS = "labels"
PREDICTIONS = "predictions"
PREDICTION_LOG = "prediction_log"
ALERTS = "alerts"
MODEL_INPUTS = "model_inputs"
MONITOR_REPORTS = "monitor_reports"
AUDIT = "audit"

BUILT_IN = (RAW, DEAD_LETTERS, LABELS, PREDICTIONS, PREDICTION_LOG, ALERTS, MODEL_INPUTS, MONITOR_REPORTS, AUDIT)
"""The tables above, in that order."""

BASE_COLUMNS = ("device_id", "ts", "received_at", "msg_id", "_seq")
"""The first columns of every device type's table (``BASE_FIELDS`` without the types)."""

__all__ = [
    "ALERTS", "AUDIT", "AUDIT_SCHEMA", "ALERTS_SCHEMA", "BASE_COLUMNS", "BASE_FIELDS", "BUILT_IN", "DEAD_LETTERS", "DEAD_LETTERS_SCHEMA", "LABELS", "LABELS_SCHEMA",
    "MODEL_INPUTS", "MODEL_INPUTS_SCHEMA", "MONITOR_REPORTS", "MONITOR_REPORTS_SCHEMA",
    "PREDICTIONS", "PREDICTIONS_SCHEMA", "PREDICTION_LOG", "PREDICTION_LOG_SCHEMA", "RAW", "RAW_SCHEMA",
]


def _schemas() -> dict[str, Any]:
    import pyarrow as pa

    ts = pa.timestamp("us", tz="UTC")
    return {
        "BASE_FIELDS": list(zip(BASE_COLUMNS, (pa.string(), ts, ts, pa.string(), pa.int64()))),
        "RAW_SCHEMA": pa.schema([
            ("_seq", pa.int64()), ("topic", pa.string()), ("device_id", pa.string()),
            ("received_at", ts), ("payload", pa.string()), ("day", pa.string()),
        ]),
        "DEAD_LETTERS_SCHEMA": pa.schema([
            ("_seq", pa.int64()), ("device_id", pa.string()), ("topic", pa.string()), ("received_at", ts),
            ("reason", pa.string()), ("payload", pa.string()), ("day", pa.string()),
        ]),
        # ``ts``: when the label was given; ``imported_at``: when it came in.
        "LABELS_SCHEMA": pa.schema([
            pa.field("entity", pa.string(), nullable=False),
            pa.field("label", pa.string(), nullable=False),
            pa.field("ts", ts, nullable=False),
            pa.field("source", pa.string(), nullable=False),
            pa.field("who", pa.string(), nullable=False),
            pa.field("imported_at", ts, nullable=False),
        ]),
        "PREDICTIONS_SCHEMA": pa.schema([
            ("device_id", pa.string()), ("entity", pa.string()), ("ts", ts),
            ("model", pa.string()), ("version", pa.int64()), ("task", pa.string()),
            ("prediction", pa.float64()), ("label", pa.string()), ("scores", pa.string()),
            ("scored_at", ts),
        ]),
        "PREDICTION_LOG_SCHEMA": pa.schema([
            ("ts", ts), ("request_id", pa.string()), ("model", pa.string()), ("version", pa.int64()),
            ("variant", pa.string()), ("source", pa.string()), ("device_id", pa.string()),
            ("latency_ms", pa.float64()), ("inputs_hash", pa.string()), ("prediction", pa.string()),
            ("ok", pa.bool_()), ("error", pa.string()),
        ]),
        # ``labels``: the instance's labels as a JSON object; ``value``: the aggregate (null for NoData/Error).
        "ALERTS_SCHEMA": pa.schema([
            ("rule", pa.string()), ("state", pa.string()), ("labels", pa.string()), ("value", pa.float64()),
            ("at", ts), ("fingerprint", pa.string()), ("severity", pa.string()),
        ]),
        # One row per captured instance. ``source``: rest, mqtt or stream; ``entity``: the value of the
        # model's entity column (per-entity models), else null; ``inputs``: the instance's input fields as
        # a JSON object; ``prediction``: the answer as JSON (null when it failed).
        "MODEL_INPUTS_SCHEMA": pa.schema([
            ("ts", ts), ("model", pa.string()), ("version", pa.int64()), ("variant", pa.string()),
            ("source", pa.string()), ("device_id", pa.string()), ("entity", pa.string()),
            ("request_id", pa.string()), ("inputs", pa.string()), ("prediction", pa.string()),
        ]),
        # One row per feature, the prediction, the dataset verdict (``scope`` feature / prediction /
        # dataset, as ``monitor.drift.DriftReport.to_rows``) and each live-quality metric (``scope``
        # quality: ``test`` = the metric's name, ``statistic`` = its value, ``n_current`` = rows judged).
        "MONITOR_REPORTS_SCHEMA": pa.schema([
            ("at", ts), ("model", pa.string()), ("version", pa.int64()), ("variant", pa.string()),
            ("window_seconds", pa.float64()), ("scope", pa.string()), ("feature", pa.string()),
            ("kind", pa.string()), ("test", pa.string()), ("statistic", pa.float64()), ("p_value", pa.float64()),
            ("distance", pa.float64()), ("threshold", pa.float64()), ("drifted", pa.bool_()), ("psi", pa.float64()),
            ("n_reference", pa.int64()), ("n_current", pa.int64()), ("status", pa.string()),
        ]),
        # One row per write or denied request. ``who``: the user, key or device name (null: no or unknown
        # credentials); ``kind``: user, key, device; ``action``: the route's permission; ``target``:
        # method and path; ``outcome``: ok, failed (4xx/5xx other than 401/403) or denied; never a secret.
        "AUDIT_SCHEMA": pa.schema([
            ("ts", ts), ("who", pa.string()), ("kind", pa.string()), ("role", pa.string()),
            ("action", pa.string()), ("target", pa.string()), ("outcome", pa.string()), ("status", pa.int32()),
            ("address", pa.string()), ("component", pa.string()),
        ]),
    }


_LAZY = frozenset({"BASE_FIELDS", "RAW_SCHEMA", "DEAD_LETTERS_SCHEMA", "LABELS_SCHEMA", "PREDICTIONS_SCHEMA",
                   "PREDICTION_LOG_SCHEMA", "ALERTS_SCHEMA", "MODEL_INPUTS_SCHEMA", "MONITOR_REPORTS_SCHEMA", "AUDIT_SCHEMA"})


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals().update(_schemas())
    return globals()[name]
