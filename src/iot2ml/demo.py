"""``iot2ml demo``: the platform plus simulated devices, with live counts and a sample query."""

from __future__ import annotations

import threading
import time
from typing import Any

from rich.console import Console
from rich.live import Live
from rich.table import Table

SCENARIOS = ("pollution", "pump")
SAMPLE_QUERY = (
    "SELECT device_id, count(*) AS readings, round(avg(ozone), 1) AS avg_ozone, round(max(pm25), 1) AS max_pm25 "
    "FROM pollution GROUP BY 1 ORDER BY 1 LIMIT 5"
)


def _counts(lake: Any) -> dict[str, int]:
    from .query import run_query

    out = {}
    for name in lake.tables():
        try:
            out[name] = int(run_query(lake, f'SELECT count(*) FROM "{name}"', timeout=10).rows[0][0])
        except Exception:  # noqa: BLE001 - a table mid-creation: show it next tick
            continue
    return out


def _view(counts: dict[str, int], rates: dict[str, float], elapsed: float) -> Table:
    table = Table(title=f"iot2ml demo - {elapsed:.0f} s (Ctrl-C to stop)")
    table.add_column("table")
    table.add_column("rows", justify="right")
    table.add_column("rows/s", justify="right")
    for name in sorted(counts):
        table.add_row(name, f"{counts[name]:,}", f"{rates.get(name, 0.0):,.1f}")
    return table


def run_demo(platform: Any, stopping: threading.Event, *, console: Console, duration: float | None,
             devices: int, rate: float) -> None:
    from .lake import Lake
    from .query import run_query
    from .simulate import run_simulation

    settings = platform.settings
    lake = Lake(settings.lake, settings.lake_storage_options)
    threads = []
    errors: list[BaseException] = []

    def simulate(name: str) -> None:
        try:
            run_simulation(settings, name, devices=devices, rate=rate, duration=None, transport="mqtt",
                           progress=False, stop=stopping)
        except BaseException as err:  # noqa: BLE001 - reported below
            errors.append(err)

    for name in SCENARIOS:
        t = threading.Thread(target=simulate, args=(name,), name=f"sim-{name}", daemon=True)
        t.start()
        threads.append(t)
    console.print(f"simulating {devices} pollution and {devices} pump devices at {rate:g} msg/s each over MQTT")

    started = time.monotonic()
    previous: dict[str, int] = {}
    previous_at = started
    with Live(_view({}, {}, 0), console=console, refresh_per_second=2, transient=False) as live:
        while not stopping.is_set():
            if duration is not None and time.monotonic() - started >= duration:
                break
            stopping.wait(2.0)
            now = time.monotonic()
            counts = _counts(lake)
            rates = {k: (v - previous.get(k, 0)) / max(1e-6, now - previous_at) for k, v in counts.items()}
            previous, previous_at = counts, now
            live.update(_view(counts, rates, now - started))
            if errors:
                break
    stopping.set()
    for t in threads:
        t.join(timeout=15)
    for err in errors:
        console.print(f"[red]simulator failed:[/] {err}")
    console.print(f"[bold]sample query:[/] {SAMPLE_QUERY}")
    try:
        result = run_query(lake, SAMPLE_QUERY, timeout=10)
        table = Table(*result.columns)
        for row in result.rows:
            table.add_row(*("" if v is None else str(v) for v in row))
        console.print(table)
    except Exception as err:  # noqa: BLE001
        console.print(f"[yellow]sample query not ready yet:[/] {err}")
    console.print(f"try: iot2ml query \"SELECT * FROM pump LIMIT 5\" --data-dir {settings.data_dir}")
