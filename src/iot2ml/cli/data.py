"""SQL over the lake, its tables, and simulated devices."""

from __future__ import annotations

import json
import sys
from typing import Annotated, Any

import typer

from ..core.config import Settings
from ..core.errors import Iot2mlError
from ._common import (
    AsJson,
    CatalogUrl,
    DataDir,
    _run,
    _settings,
    _wait_for_platform,
    app,
    console,
)


@app.command()
def query(
    sql: str,
    format: Annotated[str, typer.Option("--format", help="table, json or csv.")] = "table",
    data_dir: DataDir = None,
) -> None:
    """Run one read-only SQL query over the lake (tables: raw, dead_letters, one per device type)."""
    from ..lake import Lake
    from ..query import run_query

    settings = _run(_settings, data_dir=data_dir)
    lake = Lake(settings.lake, settings.lake_storage_options)
    result = _run(run_query, lake, sql, timeout=settings.query_timeout, max_rows=settings.query_max_rows)
    if format == "json":
        print(json.dumps({"columns": result.columns, "rows": result.rows}, default=str))
    elif format == "csv":
        import csv

        writer = csv.writer(sys.stdout, lineterminator="\n")  # Unix lines: `tail -1` gives the value
        writer.writerow(result.columns)
        writer.writerows(result.rows)
    else:
        from rich.table import Table

        table = Table(*result.columns)
        for row in result.rows:
            table.add_row(*("" if v is None else str(v) for v in row))
        console.print(table)
        if result.truncated:
            console.print(f"[yellow]only the first {settings.query_max_rows} rows are shown[/]")

@app.command()
def tables(as_json: AsJson = False, data_dir: DataDir = None) -> None:
    """List the lake's tables with their columns and sizes."""
    from ..lake import Lake
    from ..query import list_tables

    settings = _run(_settings, data_dir=data_dir)
    found = _run(list_tables, Lake(settings.lake, settings.lake_storage_options))
    if as_json:
        print(json.dumps(found, default=str))
        return
    for t in found:
        cols = ", ".join(f"{c['name']} {c['type']}" for c in t.get("columns", []))
        console.print(f"[bold]{t['name']}[/] rows={t.get('rows')} files={t.get('files')}: {cols}")

@app.command()
def simulate(
    scenario: Annotated[str, typer.Option(help="Scenario name (pollution, pump, ...).")] = "pollution",
    devices: Annotated[int, typer.Option(help="Number of simulated devices.")] = 10,
    rate: Annotated[float, typer.Option(help="Messages per second per device.")] = 1.0,
    duration: Annotated[float | None, typer.Option(help="Seconds to run (default: until Ctrl-C).")] = None,
    transport: Annotated[str, typer.Option(help="mqtt or http.")] = "mqtt",
    id_prefix: Annotated[str | None, typer.Option(help="Device id prefix (default: the scenario name).")] = None,
    backfill: Annotated[str | None, typer.Option(
        help="Send this much past history first (e.g. 7d), as fast as --rate allows, then stop.")] = None,
    step: Annotated[str, typer.Option(help="With --backfill: simulated time between readings.")] = "5m",
    data_dir: DataDir = None, catalog_url: CatalogUrl = None,
) -> None:
    """Simulate devices of a scenario sending telemetry to the running platform."""
    import math
    import time

    from ..core.timeutil import parse_duration
    from ..simulate import run_simulation

    settings = _run(_settings, data_dir=data_dir, catalog_url=catalog_url)
    _wait_for_platform(settings, "broker" if transport == "mqtt" else "api")
    start_time = step_s = None
    if backfill is not None:
        span, step_s = _run(parse_duration, backfill), _run(parse_duration, step)
        start_time = time.time() - span
        duration = math.ceil(span / step_s) / rate  # every simulated step of the span, at --rate
    stats = _run(run_simulation, settings, scenario, devices=devices, rate=rate, duration=duration,
                 transport=transport, id_prefix=id_prefix, progress=console.is_terminal, start_time=start_time, step=step_s)
    console.print(f"sent {stats.sent}, acknowledged {stats.acked}, failed {stats.failed} in {stats.elapsed:.1f} s")
    if stats.acked:
        _report_stored(settings, scenario, stats)
    if stats.failed:
        raise typer.Exit(1)


def _report_stored(settings: Settings, scenario: str, stats: Any, *, timeout: float = 30.0) -> None:
    """Wait (up to ``timeout`` s) until the ingest has written the acknowledged readings of this run
    (its ``msg_id``s hold the run id), so the next query sees them; say how many are in the lake."""
    import time

    from ..core.errors import NotFound
    from ..core.runtime import running_info
    from ..lake import Lake
    from ..query import run_query
    from ..simulate import get_scenario

    table = get_scenario(scenario).device_type
    try:
        running_info(settings.data_dir, "ingest")
    except NotFound:
        console.print(f"the ingest is not running: the readings wait in the broker for it (table {table})")
        return
    lake = Lake(settings.lake, settings.lake_storage_options)
    tag = f"%-{stats.run_id}-%"

    def count(sql: str) -> int:
        try:
            return int(run_query(lake, sql, timeout=10).rows[0][0])
        except Iot2mlError:  # not created yet
            return 0

    deadline = time.monotonic() + timeout
    while True:
        stored = count(f"SELECT count(*) FROM \"{table}\" WHERE msg_id LIKE '{tag}'")
        dead = count(f"SELECT count(*) FROM dead_letters WHERE payload LIKE '{tag}'") if stored < stats.acked else 0
        if stored + dead >= stats.acked or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    rejected = f", {dead} dead-lettered" if dead else ""
    waiting = "" if stored + dead >= stats.acked else f" so far ({stats.acked - stored - dead} not yet written)"
    console.print(f"stored {stored} in table {table}{rejected}{waiting}")
