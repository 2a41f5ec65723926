"""Every lake table the platform writes itself, named once, with its fixed Arrow schema.

Built-in tables (their names are reserved: no device type may take one):

- ``raw`` (``RAW_SCHEMA``): every message as it came in, partitioned by ``day``; the ingest commits it last.
- ``dead_letters`` (``DEAD_LETTERS_SCHEMA``): every bad message or reading with the reason, by ``day``.
- ``labels`` (``LABELS_SCHEMA``): what people say about entities (CSV import, the API).
- ``predictions`` (``PREDICTIONS_SCHEMA``): batch scoring and streaming deployments.
- ``prediction_log`` (``PREDICTION_LOG_SCHEMA``): every instance the serving runtime answered.
- ``alerts`` (``ALERTS_SCHEMA``): every state change of an alert instance (the monitor writes it).

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

BUILT_IN = (RAW, DEAD_LETTERS, LABELS, PREDICTIONS, PREDICTION_LOG, ALERTS)
"""The tables above, in that order."""

BASE_COLUMNS = ("device_id", "ts", "received_at", "msg_id", "_seq")
"""The first columns of every device type's table (``BASE_FIELDS`` without the types)."""

__all__ = [
    "ALERTS", "ALERTS_SCHEMA", "BASE_COLUMNS", "BASE_FIELDS", "BUILT_IN", "DEAD_LETTERS", "DEAD_LETTERS_SCHEMA", "LABELS", "LABELS_SCHEMA",
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
    }


_LAZY = frozenset({"BASE_FIELDS", "RAW_SCHEMA", "DEAD_LETTERS_SCHEMA", "LABELS_SCHEMA", "PREDICTIONS_SCHEMA",
                   "PREDICTION_LOG_SCHEMA", "ALERTS_SCHEMA"})


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals().update(_schemas())
    return globals()[name]
