"""Prometheus metrics of the ingest (multiprocess-safe when PROMETHEUS_MULTIPROC_DIR is set)."""

from __future__ import annotations

from functools import lru_cache
from types import SimpleNamespace


@lru_cache(maxsize=1)
def metrics() -> SimpleNamespace:
    from prometheus_client import Counter, Gauge, Histogram

    return SimpleNamespace(
        received=Counter("iot2ml_ingest_messages_received", "Messages read from the broker"),
        readings=Counter("iot2ml_ingest_readings_written", "Readings written to curated tables"),
        rows=Counter("iot2ml_ingest_rows_written", "Rows written, by table", ["table"]),
        dead=Counter("iot2ml_ingest_dead_letters", "Rows written to dead_letters"),
        duplicates=Counter("iot2ml_ingest_duplicates", "Readings dropped as resends (same device_id, msg_id)"),
        write_seconds=Histogram(
            "iot2ml_ingest_write_seconds", "Time to decode and commit one batch to the lake",
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10),
        ),
        freshness_seconds=Histogram(
            "iot2ml_ingest_freshness_seconds", "Broker receive to lake commit, oldest message of each batch",
            buckets=(0.1, 0.25, 0.5, 1, 1.5, 2, 3, 5, 10, 30),
        ),
        lag=Gauge("iot2ml_ingest_consumer_lag", "Messages in the broker not yet committed to the lake",
                  multiprocess_mode="max"),
        committed=Gauge("iot2ml_ingest_committed_sequence", "Last broker sequence committed to the lake",
                        multiprocess_mode="max"),
    )
