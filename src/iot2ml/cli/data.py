"""SQL over the lake, its tables, and simulated devices."""

from __future__ import annotations

import json
import sys
from typing import Annotated

import typer

from ._common import (
    AsJson,
    CatalogUrl,
    DataDir,
    _run,
    _settings,
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

        writer = csv.writer(sys.stdout)
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
    start_time = step_s = None
    if backfill is not None:
        span, step_s = _run(parse_duration, backfill), _run(parse_duration, step)
        start_time = time.time() - span
        duration = math.ceil(span / step_s) / rate  # every simulated step of the span, at --rate
    stats = _run(run_simulation, settings, scenario, devices=devices, rate=rate, duration=duration,
                 transport=transport, id_prefix=id_prefix, progress=True, start_time=start_time, step=step_s)
    console.print(f"sent {stats.sent}, acknowledged {stats.acked}, failed {stats.failed} in {stats.elapsed:.1f} s")
    if stats.failed:
        raise typer.Exit(1)
