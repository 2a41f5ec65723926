"""Small files under a steady writer, with and without upkeep, in compressed time.

One simulated second = one append of 1,000 pump readings (the ingest commits about once a
second). The Maintainer runs on its own thread, woken every ``--interval`` simulated seconds
(the ``compact_interval``), while the writer keeps appending. Every 5 simulated minutes:

  files      data files the current version refers to (sampled just before a pass is due,
             so at the peak of an interval)
  on_disk    parquet files in the table folder (what vacuum keeps bounded)
  query_ms   median of 3 runs of the fixed query through ``run_query``

The reference is the same query on one fully compacted copy of the same rows, measured in the
same run. The vacuum retention is 0 hours here: delta-rs takes whole hours and a simulated hour
lasts a few real minutes, so with 1 hour nothing would be vacuumed during the run (queries and
passes are serialised so that a query never loses a file it is reading).

Prints one JSON line.

    python benchmarks/compaction.py [--minutes 60] [--rows 1000] [--interval 60] [--no-maintenance]

About 3 minutes on 2 cores; the --no-maintenance baseline takes about 12 (its queries and appends
slow down with every file).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import shutil
import statistics
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

from iot2ml.core.config import load_settings
from iot2ml.lake import Lake
from iot2ml.lake.maintenance import Maintainer
from iot2ml.query import run_query

QUERY = "SELECT device_id, avg(pressure) FROM pump GROUP BY 1"
DEVICES = 100
T0 = dt.datetime(2026, 3, 1, tzinfo=dt.timezone.utc)


def batch(second: int, rows: int, rng: np.random.Generator) -> pa.Table:
    seq = np.arange(second * rows, (second + 1) * rows, dtype=np.int64)
    ts_us = int(T0.timestamp() * 1e6) + second * 1_000_000 + (np.arange(rows) * (1_000_000 // rows))
    return pa.table(
        {
            "device_id": pa.array([f"pump-{i % DEVICES:03d}" for i in range(rows)]),
            "ts": pa.array(ts_us, pa.timestamp("us", tz="UTC")),
            "received_at": pa.array(ts_us + 40_000, pa.timestamp("us", tz="UTC")),
            "msg_id": pa.array([f"m-{s}" for s in seq]),
            "_seq": pa.array(seq),
            "pressure": pa.array(np.round(rng.normal(4.5, 0.3, rows), 3)),
            "flow": pa.array(np.round(rng.normal(60.0, 5.0, rows), 2)),
            "vibration": pa.array(np.round(rng.lognormal(0.7, 0.1, rows), 3)),
        }
    )


def on_disk(lake: Lake, table: str) -> int:
    return sum(1 for p in Path(lake.uri(table)).rglob("*.parquet") if "_delta_log" not in p.parts)


def query_ms(lake: Lake, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        result = run_query(lake, QUERY, timeout=120)
        times.append((time.perf_counter() - started) * 1000)
        assert len(result.rows) == DEVICES
    return round(statistics.median(times), 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=int, default=60, help="simulated minutes (one append per second)")
    parser.add_argument("--rows", type=int, default=1000, help="rows per append (msg/s)")
    parser.add_argument("--interval", type=int, default=60, help="simulated seconds between maintenance passes")
    parser.add_argument("--sample", type=int, default=5, help="simulated minutes between samples")
    parser.add_argument("--no-maintenance", action="store_true", help="baseline: no compaction at all")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="iot2ml-bench-compaction-"))
    try:
        run(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def run(args: argparse.Namespace, work: Path) -> None:
    rng = np.random.default_rng(7)
    lake = Lake(str(work / "lake"))
    settings = load_settings(
        data_dir=work, compact_interval=args.interval, compact_min_files=16, vacuum_retention_hours=0
    )
    maintainer = Maintainer(lake, settings)
    lock = threading.Lock()  # a pass and a sample query never overlap (retention 0, see above)
    wake = threading.Event()
    done = threading.Event()
    passes: list[float] = []
    errors: list[str] = []

    def upkeep() -> None:
        while True:
            wake.wait()
            wake.clear()
            if done.is_set():
                return
            with lock:
                started = time.perf_counter()
                figures = maintainer.run_once()
                passes.append(time.perf_counter() - started)
                errors.extend(e for t in figures["tables"].values() for e in t.get("errors", []))

    thread = threading.Thread(target=upkeep, daemon=True)
    if not args.no_maintenance:
        thread.start()

    seconds = args.minutes * 60
    series: list[dict] = []
    append_s = 0.0
    started = time.perf_counter()
    for second in range(seconds):
        data = batch(second, args.rows, rng)
        t = time.perf_counter()
        lake.append("pump", data, app_id="bench", version=second)
        append_s += time.perf_counter() - t
        done_s = second + 1
        if done_s % (args.sample * 60) == 0:  # sampled before the pass due now: the peak file count
            with lock:
                series.append(
                    {
                        "minute": done_s // 60,
                        "files": len(lake.open("pump").file_uris()),
                        "on_disk": on_disk(lake, "pump"),
                        "query_ms": query_ms(lake),
                    }
                )
        if not args.no_maintenance and done_s % args.interval == 0:
            wake.set()
    wall = time.perf_counter() - started
    done.set()
    wake.set()
    if thread.is_alive():
        thread.join()

    # final pass so the last figures show a steady state, then the reference
    final_pass = maintainer.run_once() if not args.no_maintenance else None
    final = {
        "files": len(lake.open("pump").file_uris()),
        "on_disk": on_disk(lake, "pump"),
        "query_ms": query_ms(lake, 5),
        "rows": run_query(lake, "SELECT count(*) FROM pump").rows[0][0],
    }
    reference = Lake(str(work / "reference"))
    everything = lake.open("pump").to_pyarrow_table().sort_by("_seq")
    reference.append("pump", everything, app_id="bench", version=0)
    maintainer_ref = Maintainer(reference, load_settings(data_dir=work, compact_min_files=2))
    maintainer_ref.run_once()  # one table, fully compacted
    ref = {"files": len(reference.open("pump").file_uris()), "query_ms": query_ms(reference, 5), "rows": everything.num_rows}

    print(
        json.dumps(
            {
                "benchmark": "compaction",
                "simulated_minutes": args.minutes,
                "rows_per_append": args.rows,
                "appends": seconds,
                "maintenance": not args.no_maintenance,
                "interval_s": args.interval,
                "series": series,
                "final": final,
                "reference_compacted": ref,
                "query_vs_reference": round(final["query_ms"] / ref["query_ms"], 2),
                "passes": len(passes) + (1 if final_pass else 0),
                "pass_s_median": round(statistics.median(passes), 2) if passes else None,
                "pass_s_max": round(max(passes), 2) if passes else None,
                "maintenance_errors": errors[:5],
                "append_ms_mean": round(append_s / seconds * 1000, 1),
                "wall_s": round(wall, 1),
                "query": QUERY,
            }
        )
    )


if __name__ == "__main__":
    main()
