"""The ``iot2ml`` command: composition root of the CLI."""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from .core.config import Settings, load_settings
from .core.errors import Iot2mlError

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False, help="iot2ml: devices -> broker -> Delta lake -> SQL.")
devices_app = typer.Typer(no_args_is_help=True, help="Register, list and revoke devices.")
keys_app = typer.Typer(no_args_is_help=True, help="API keys for the HTTP API.")
types_app = typer.Typer(no_args_is_help=True, help="Device types and their declared schemas.")
app.add_typer(devices_app, name="devices")
app.add_typer(keys_app, name="keys")
app.add_typer(types_app, name="types")
models_app = typer.Typer(no_args_is_help=True, help="Registered models (MLflow registry).")
labels_app = typer.Typer(no_args_is_help=True, help="Labels (ratings, events) joined to telemetry for training.")
app.add_typer(models_app, name="models")
app.add_typer(labels_app, name="labels")
schedule_app = typer.Typer(no_args_is_help=True, help="Retraining schedules (run by 'iot2ml up').")
app.add_typer(schedule_app, name="schedule")
deployments_app = typer.Typer(no_args_is_help=True, help="Deployed models: what serves, and every change to it.")
app.add_typer(deployments_app, name="deployments")

console = Console()
err_console = Console(stderr=True)

DataDir = Annotated[Path | None, typer.Option("--data-dir", help="Data directory \\[env IOT2ML_DATA_DIR].")]
NatsPort = Annotated[int | None, typer.Option("--nats-port", help="NATS port, 0 = pick a free one.")]
MqttPort = Annotated[int | None, typer.Option("--mqtt-port", help="MQTT port, 0 = pick a free one.")]
HttpPort = Annotated[int | None, typer.Option("--http-port", help="HTTP API port, 0 = pick a free one.")]
ServePort = Annotated[int | None, typer.Option("--serve-port", help="Predictions (serving) port, 0 = pick a free one.")]
Host = Annotated[str | None, typer.Option("--host", help="Address to listen on.")]
CatalogUrl = Annotated[str | None, typer.Option("--catalog-url", help="Catalog DB URL (sqlite:///... or postgresql://...).")]
MqttUrl = Annotated[str | None, typer.Option("--mqtt-url", help="Also ingest from an external MQTT broker (mqtt://host:port).")]
AsJson = Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")]


def _settings(**overrides: Any) -> Settings:
    return load_settings(**overrides)


def _fail(err: Exception) -> None:
    err_console.print(f"[bold red]error:[/] {err}")
    raise typer.Exit(2)


def _run(fn, *args: Any, **kwargs: Any) -> Any:
    try:
        return fn(*args, **kwargs)
    except Iot2mlError as err:
        _fail(err)


# ---- platform -------------------------------------------------------------------------------
@app.command()
def up(
    data_dir: DataDir = None, nats_port: NatsPort = None, mqtt_port: MqttPort = None, http_port: HttpPort = None,
    host: Host = None, catalog_url: CatalogUrl = None, mqtt_url: MqttUrl = None, serve_port: ServePort = None,
) -> None:
    """Start the embedded broker, the ingest, the API, the scheduler and the serving runtime; Ctrl-C stops all."""
    settings = _run(_settings, data_dir=data_dir, nats_port=nats_port, mqtt_port=mqtt_port, http_port=http_port,
                    host=host, catalog_url=catalog_url, mqtt_url=mqtt_url, serve_port=serve_port)
    from .supervisor import Platform

    platform = Platform(settings)
    _serve(platform)


def _start(platform: Any) -> None:
    with console.status("starting broker, ingest, API, scheduler and serving..."):
        _run(platform.start)
    for note in platform.notes:
        console.print(f"[yellow]note:[/] {note}")
    urls = platform.urls
    console.print("[bold green]iot2ml is up[/]")
    console.print(f"  MQTT      {urls['mqtt']}   (topic devices/<id>/telemetry, user <id>, password <token>)")
    console.print(f"  HTTP API  {urls['http']}   docs {urls['docs']}")
    console.print(f"  predict   {urls['serve']}/api/v1/models/<name>/predict   (after 'iot2ml deploy <name>')")
    console.print(f"  NATS      {urls['nats']}")
    console.print(f"  metrics   {urls['metrics']}")
    console.print(f"  data dir  {platform.settings.data_dir}")
    console.print(f"  admin key {platform.admin_key}")


def _serve(platform: Any, *, extra: Any = None) -> None:
    stopping = threading.Event()

    def on_signal(*_: Any) -> None:
        stopping.set()
        platform.stop()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    try:
        _start(platform)
        if extra is not None:
            extra(platform, stopping)
        else:
            console.print("press Ctrl-C to stop")
            platform.watch()
    finally:
        with console.status("stopping..."):
            platform.shutdown()
        console.print("stopped")


@app.command()
def demo(
    data_dir: DataDir = None, nats_port: NatsPort = None, mqtt_port: MqttPort = None, http_port: HttpPort = None,
    host: Host = None, serve_port: ServePort = None,
    duration: Annotated[float | None, typer.Option(help="Stop after this many seconds (default: until Ctrl-C).")] = None,
    devices: Annotated[int, typer.Option(help="Simulated devices per scenario.")] = 5,
    rate: Annotated[float, typer.Option(help="Messages per second per device.")] = 1.0,
) -> None:
    """`up` plus simulated pollution and pump devices; shows live counts and a sample query."""
    settings = _run(_settings, data_dir=data_dir, nats_port=nats_port, mqtt_port=mqtt_port, http_port=http_port,
                    host=host, serve_port=serve_port)
    from .demo import run_demo
    from .supervisor import Platform

    platform = Platform(settings, fallback_ports=True)
    _serve(platform, extra=lambda p, stopping: run_demo(p, stopping, console=console, duration=duration,
                                                       devices=devices, rate=rate))


@app.command()
def broker(
    data_dir: DataDir = None, nats_port: NatsPort = None, mqtt_port: MqttPort = None, host: Host = None,
    catalog_url: CatalogUrl = None,
) -> None:
    """Run only the embedded broker (NATS with MQTT and JetStream)."""
    from .components import run_broker_component
    from .core.logs import setup_logging

    setup_logging()
    settings = _run(_settings, data_dir=data_dir, nats_port=nats_port, mqtt_port=mqtt_port, host=host,
                    catalog_url=catalog_url)
    _run(run_broker_component, settings)


@app.command()
def ingest(
    data_dir: DataDir = None, catalog_url: CatalogUrl = None, mqtt_url: MqttUrl = None,
    nats_port: NatsPort = None, mqtt_port: MqttPort = None, http_port: HttpPort = None, host: Host = None,
) -> None:
    """Run only the ingest: broker stream -> Delta lake, exactly once."""
    from .components import run_ingest_component
    from .core.logs import setup_logging

    setup_logging()
    settings = _run(_settings, data_dir=data_dir, catalog_url=catalog_url, mqtt_url=mqtt_url)
    _run(run_ingest_component, settings)


@app.command()
def api(
    data_dir: DataDir = None, http_port: HttpPort = None, host: Host = None, catalog_url: CatalogUrl = None,
    nats_port: NatsPort = None, mqtt_port: MqttPort = None,
) -> None:
    """Run only the HTTP API."""
    from .components import run_api_component
    from .core.logs import setup_logging

    setup_logging()
    settings = _run(_settings, data_dir=data_dir, http_port=http_port, host=host, catalog_url=catalog_url)
    _run(run_api_component, settings)


@app.command()
def serve(
    data_dir: DataDir = None, serve_port: ServePort = None, host: Host = None, catalog_url: CatalogUrl = None,
    no_broker: Annotated[bool, typer.Option("--no-broker", help="REST only: no MQTT requests, no streaming.")] = False,
) -> None:
    """Run only the serving runtime: deployed models over REST, MQTT request/reply and streaming."""
    from .components import run_serve_component
    from .core.logs import setup_logging

    setup_logging()
    settings = _run(_settings, data_dir=data_dir, serve_port=serve_port, host=host, catalog_url=catalog_url)
    _run(run_serve_component, settings, broker=not no_broker)


# ---- devices, keys, types --------------------------------------------------------------------
def _catalog(data_dir: Path | None, catalog_url: str | None):
    from .core.catalog import Catalog

    settings = _run(_settings, data_dir=data_dir, catalog_url=catalog_url)
    return settings, _run(Catalog, settings.catalog)


def _poke_broker(settings: Settings) -> None:
    """Tell a local broker to re-read the catalog now (it also polls every second)."""
    from .core.runtime import read_run_info

    try:
        os.kill(int(read_run_info(settings.data_dir, "broker")["pid"]), signal.SIGHUP)
    except (Iot2mlError, OSError, KeyError, ValueError):
        pass


@devices_app.command("add")
def devices_add(
    device_id: str, type: Annotated[str, typer.Option("--type", help="Device type = curated table name.")],
    rotate: Annotated[bool, typer.Option(help="Issue a new token for an existing device.")] = False,
    as_json: AsJson = False, data_dir: DataDir = None, catalog_url: CatalogUrl = None,
) -> None:
    """Register a device and print its token (shown once; only a hash is stored)."""
    settings, catalog = _catalog(data_dir, catalog_url)
    token = _run(catalog.add_device, device_id, type, rotate=rotate)
    _poke_broker(settings)
    if as_json:
        print(json.dumps({"device_id": device_id, "token": token}))
    else:
        console.print(f"device [bold]{device_id}[/] (type {type}) token: {token}")


@devices_app.command("remove")
def devices_remove(device_id: str, data_dir: DataDir = None, catalog_url: CatalogUrl = None) -> None:
    """Revoke a device: its token stops working at once; its data stays."""
    settings, catalog = _catalog(data_dir, catalog_url)
    _run(catalog.remove_device, device_id)
    _poke_broker(settings)
    console.print(f"device {device_id} revoked")


@devices_app.command("list")
def devices_list(as_json: AsJson = False, data_dir: DataDir = None, catalog_url: CatalogUrl = None) -> None:
    """List devices."""
    _, catalog = _catalog(data_dir, catalog_url)
    rows = [{"device_id": d.device_id, "type": d.type, "active": d.active} for d in catalog.list_devices()]
    if as_json:
        print(json.dumps(rows))
        return
    from rich.table import Table

    table = Table("device_id", "type", "active")
    for r in rows:
        table.add_row(r["device_id"], r["type"], "yes" if r["active"] else "revoked")
    console.print(table)


@keys_app.command("add")
def keys_add(
    name: str, role: Annotated[str, typer.Option(help="admin or reader.")] = "admin",
    as_json: AsJson = False, data_dir: DataDir = None, catalog_url: CatalogUrl = None,
) -> None:
    """Create an API key for the HTTP API and print it (shown once)."""
    _, catalog = _catalog(data_dir, catalog_url)
    key = _run(catalog.add_key, name, role)
    if as_json:
        print(json.dumps({"name": name, "key": key}))
    else:
        console.print(f"API key [bold]{name}[/] ({role}): {key}")


@keys_app.command("remove")
def keys_remove(name: str, data_dir: DataDir = None, catalog_url: CatalogUrl = None) -> None:
    """Delete an API key."""
    _, catalog = _catalog(data_dir, catalog_url)
    _run(catalog.remove_key, name)
    console.print(f"API key {name} removed")


@keys_app.command("list")
def keys_list(as_json: AsJson = False, data_dir: DataDir = None, catalog_url: CatalogUrl = None) -> None:
    """List API key names and roles."""
    _, catalog = _catalog(data_dir, catalog_url)
    rows = [{"name": n, "role": r} for n, r in catalog.list_keys()]
    print(json.dumps(rows)) if as_json else [console.print(f"{r['name']}\t{r['role']}") for r in rows]


@types_app.command("add")
def types_add(
    name: str,
    schema: Annotated[str | None, typer.Option(help="Declared columns, e.g. 'pressure:float,count:int'.")] = None,
    data_dir: DataDir = None, catalog_url: CatalogUrl = None,
) -> None:
    """Create a device type, optionally declaring column types up front."""
    _, catalog = _catalog(data_dir, catalog_url)
    t = _run(catalog.add_type, name, schema, exist_ok=True)
    console.print(f"type {t.name}: {t.schema or 'columns discovered from data'}")


@types_app.command("list")
def types_list(as_json: AsJson = False, data_dir: DataDir = None, catalog_url: CatalogUrl = None) -> None:
    """List device types."""
    _, catalog = _catalog(data_dir, catalog_url)
    rows = [{"name": t.name, "schema": t.schema} for t in catalog.list_types()]
    print(json.dumps(rows)) if as_json else [console.print(f"{r['name']}\t{r['schema'] or '-'}") for r in rows]


# ---- SQL --------------------------------------------------------------------------------------
@app.command()
def query(
    sql: str,
    format: Annotated[str, typer.Option("--format", help="table, json or csv.")] = "table",
    data_dir: DataDir = None,
) -> None:
    """Run one read-only SQL query over the lake (tables: raw, dead_letters, one per device type)."""
    from .lake import Lake
    from .query import run_query

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
    from .lake import Lake
    from .query import list_tables

    settings = _run(_settings, data_dir=data_dir)
    found = _run(list_tables, Lake(settings.lake, settings.lake_storage_options))
    if as_json:
        print(json.dumps(found, default=str))
        return
    for t in found:
        cols = ", ".join(f"{c['name']} {c['type']}" for c in t.get("columns", []))
        console.print(f"[bold]{t['name']}[/] rows={t.get('rows')} files={t.get('files')}: {cols}")


# ---- simulation --------------------------------------------------------------------------------
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

    from .scheduler import parse_duration
    from .simulate import run_simulation

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


# ---- ML workbench --------------------------------------------------------------------------------
def _workbench(data_dir: Path | None):
    from .workbench import Workbench

    return Workbench(_run(_settings, data_dir=data_dir))


def _print_models(rows: list[dict[str, Any]], as_json: bool) -> None:
    if as_json:
        keys = ("name", "version", "aliases", "task", "metrics", "baseline_metrics", "data_versions")
        print(json.dumps([{k: r.get(k) for k in keys} for r in rows], default=str))
        return
    from rich.table import Table

    table = Table("name", "version", "aliases", "task", "metric", "model", "baseline", "data versions")
    for r in rows:
        metric = r.get("primary_metric") or next(iter(r["metrics"]), "")
        fmt = lambda v: "" if v is None else f"{v:.4g}"
        table.add_row(r["name"], str(r["version"]), ",".join(r["aliases"]), r["task"] or "", metric,
                      fmt(r["metrics"].get(metric)), fmt(r["baseline_metrics"].get(metric)),
                      json.dumps(r["data_versions"]))
    console.print(table)


@app.command()
def train(
    task: Annotated[str | None, typer.Argument(help="forecast, classify, regress or anomaly.")] = None,
    table: Annotated[str | None, typer.Option(help="Lake table to train on.")] = None,
    name: Annotated[str | None, typer.Option(help="Registered model name.")] = None,
    target: Annotated[str | None, typer.Option(help="forecast: column to forecast.")] = None,
    freq: Annotated[str | None, typer.Option(help="forecast: resampling frequency, e.g. 1h.")] = None,
    horizon: Annotated[int | None, typer.Option(help="forecast: steps ahead.")] = None,
    label: Annotated[str | None, typer.Option(help="classify/regress/anomaly: label column (or labels table).")] = None,
    entity: Annotated[str | None, typer.Option(help="Entity key, e.g. batch_id (labels join on it).")] = None,
    label_window: Annotated[str | None, typer.Option(help="Join each reading to its entity's latest label at most this old (30m, 1h).")] = None,
    features: Annotated[str | None, typer.Option(help="Comma-separated feature columns.")] = None,
    where: Annotated[str | None, typer.Option(help="SQL filter on the table.")] = None,
    config: Annotated[Path | None, typer.Option("--config", help="A job TOML file instead of options.")] = None,
    as_json: AsJson = False,
    data_dir: DataDir = None,
) -> None:
    """Train a model on a lake table, log it to MLflow and register a new version."""
    from .ml.jobs import TrainJob

    if config is not None:
        job = _run(TrainJob.from_toml, config)
    else:
        if not (task and table and name):
            _fail(Iot2mlError("give TASK, --table and --name (or --config job.toml)"))
        options: dict[str, Any] = {}
        for key, value in (("target", target), ("freq", freq), ("horizon", horizon), ("label", label),
                           ("entity", entity)):
            if value is not None:
                options[key] = value
        if features:
            options["features"] = [f.strip() for f in features.split(",") if f.strip()]
        if label_window:
            from .scheduler import parse_duration

            options["label_window"] = _run(parse_duration, label_window)
        if task == "forecast":
            options.setdefault("progress", not as_json)
        job = _run(TrainJob, task=task, table=table, name=name, options=options, where=where)
    bench = _workbench(data_dir)
    with console.status(f"training {job.task} model {job.name} on {job.table}..."):
        described = _run(bench.train, job)
    if as_json:
        _print_models([described], True)
        return
    _print_models([described], False)
    if described.get("promotion"):
        console.print(described["promotion"])


@models_app.command("list")
def models_list(as_json: AsJson = False, data_dir: DataDir = None) -> None:
    """Names, versions, aliases, metrics vs baseline, data versions."""
    _print_models(_run(_workbench(data_dir).models), as_json)


@labels_app.command("import")
def labels_import(
    path: Path,
    entity_column: Annotated[str, typer.Option(help="Column with the entity key, e.g. batch_id.")],
    label_column: Annotated[str, typer.Option(help="Column with the label, e.g. quality.")],
    table: Annotated[str | None, typer.Option(help="Check entities exist in this table.")] = None,
    time_column: Annotated[str | None, typer.Option(help="Column with the time of each label (else now).")] = None,
    source: Annotated[str, typer.Option(help="Where the labels come from (taster, user, ...).")] = "import",
    who: Annotated[str, typer.Option(help="Who gave them.")] = os.environ.get("USER", "unknown"),
    data_dir: DataDir = None,
) -> None:
    """Import labels from a CSV file into the labels table (all rows or none)."""
    from .ml.labels import read_labels_csv

    bench = _workbench(data_dir)
    rows = _run(read_labels_csv, path, entity_column=entity_column, label_column=label_column,
                time_column=time_column)
    n = _run(bench.import_labels, rows, entity_column=entity_column, label_column=label_column, table=table,
             source=source, who=who, time_column=time_column)
    console.print(f"imported {n} labels")


@app.command()
def predict(
    name: str,
    table: Annotated[str, typer.Option(help="Table whose rows to score.")],
    where: Annotated[str | None, typer.Option(help="SQL filter, e.g. \"ts > now() - interval 1 day\".")] = None,
    version: Annotated[str, typer.Option(help="Version number or alias.")] = "champion",
    data_dir: DataDir = None,
) -> None:
    """Batch scoring: write predictions of a registered model into the predictions table."""
    out = _run(_workbench(data_dir).predict, name, table=table, where=where, ref=version)
    console.print(f"{out['rows']} predictions of {out['model']} v{out['version']} written to {out['table']}")


@schedule_app.command("add")
def schedule_add(
    name: str,
    train: Annotated[str, typer.Option("--train", help="What to train, as for 'iot2ml train', e.g. \"forecast --table pollution --target ozone\".")],
    every: Annotated[str | None, typer.Option(help="Retrain this often: 30m, 1h, 1d.")] = None,
    min_new_rows: Annotated[int | None, typer.Option(help="Retrain once this many rows arrived since the last run.")] = None,
    on_labels: Annotated[bool, typer.Option(help="Retrain when new labels land.")] = False,
    replace: Annotated[bool, typer.Option(help="Replace a schedule of the same name.")] = False,
    data_dir: DataDir = None, catalog_url: CatalogUrl = None,
) -> None:
    """Add a retraining schedule (the model is named by --name in --train, else by the schedule)."""
    from .core.catalog import Schedules
    from .scheduler import parse_duration, parse_train_args

    _, catalog = _catalog(data_dir, catalog_url)
    job = _run(parse_train_args, train, default_name=name)
    seconds = _run(parse_duration, every) if every else None
    _run(Schedules(catalog).add, name, job, every_seconds=seconds, min_new_rows=min_new_rows,
         on_labels=on_labels, replace=replace)
    console.print(f"schedule {name}: {job['task']} on {job['table']} as model {job['name']}")


@schedule_app.command("list")
def schedule_list(as_json: AsJson = False, data_dir: DataDir = None, catalog_url: CatalogUrl = None) -> None:
    """List schedules."""
    from .core.catalog import Schedules

    _, catalog = _catalog(data_dir, catalog_url)
    rows = [{"name": s.name, "job": s.job, "every_seconds": s.every_seconds, "min_new_rows": s.min_new_rows,
             "on_labels": s.on_labels} for s in Schedules(catalog).list()]
    print(json.dumps(rows)) if as_json else [console.print(r) for r in rows]


@schedule_app.command("runs")
def schedule_runs(
    name: Annotated[str | None, typer.Argument(help="Only this schedule.")] = None,
    as_json: AsJson = False, data_dir: DataDir = None, catalog_url: CatalogUrl = None,
) -> None:
    """History of scheduled runs: trigger, status, duration, error, model version."""
    from .core.catalog import Schedules

    _, catalog = _catalog(data_dir, catalog_url)
    rows = Schedules(catalog).runs(name)
    if as_json:
        print(json.dumps(rows, default=str))
        return
    from rich.table import Table

    table = Table("id", "schedule", "trigger", "started", "status", "seconds", "version", "error")
    for r in rows:
        table.add_row(str(r["id"]), r["schedule"], r["trigger"], str(r["started_at"])[:19], r["status"],
                      f"{r['duration_s'] or 0:.1f}", str(r["model_version"] or ""), (r["error"] or "")[:60])
    console.print(table)


@schedule_app.command("remove")
def schedule_remove(name: str, data_dir: DataDir = None, catalog_url: CatalogUrl = None) -> None:
    """Delete a schedule (its run history stays)."""
    from .core.catalog import Schedules

    _, catalog = _catalog(data_dir, catalog_url)
    _run(Schedules(catalog).remove, name)
    console.print(f"schedule {name} removed")


@app.command()
def scheduler(data_dir: DataDir = None, catalog_url: CatalogUrl = None,
              nats_port: NatsPort = None, mqtt_port: MqttPort = None, http_port: HttpPort = None,
              host: Host = None) -> None:
    """Run only the retraining scheduler."""
    from .core.logs import setup_logging
    from .scheduler import run_scheduler_component

    setup_logging()
    _run(run_scheduler_component, _run(_settings, data_dir=data_dir, catalog_url=catalog_url))


# ---- deployments -----------------------------------------------------------------------------
Reason = Annotated[str, typer.Option(help="Why: kept in the audit trail ('iot2ml deployments history').")]


def _who() -> str:
    """Who changes a deployment from this shell: the OS user, else ``cli``."""
    import getpass

    try:
        return getpass.getuser() or "cli"
    except (KeyError, OSError):
        return "cli"


def _deployments(data_dir: Path | None, catalog_url: str | None):
    from .serve.deployments import Deployments

    settings, catalog = _catalog(data_dir, catalog_url)
    return settings, catalog, _run(Deployments, catalog)


def _print_deployment(info: dict[str, Any]) -> None:
    from rich.table import Table

    head = f"[bold]{info['name']}[/] generation {info['generation']}"
    console.print(head + (f" ({info['action']})" if info.get("action") else ""))
    table = Table("variant", "version", "share", box=None, pad_edge=False)
    for v in info["variants"]:
        version = str(v["version"])
        if "model_version" in v and str(v["model_version"]) != version:
            version += f" (v{v['model_version']})"
        share = "copy of every request, never answers" if v["role"] == "shadow" else f"{v['share']:g}%"
        table.add_row(v["variant"], version, share)
    console.print(table)
    if any(v["role"] == "canary" for v in info["variants"]):
        limits = ", ".join(f"{k}>{x:g}" for k, x in info["rollback_on"].items()) or "none"
        console.print(f"  canary bakes {info['bake_seconds'] or 0:g} s, rolled back on {limits}")
    console.print(f"  stream   {info['stream'] or '-'}    devices  {info['devices'] or '-'}")
    console.print(f"  predict  POST {info['predict']}")


@app.command()
def deploy(
    name: Annotated[str, typer.Argument(help="Registered model name.")],
    version: Annotated[str | None, typer.Option(help="Version number or alias to serve (default: champion).")] = None,
    canary: Annotated[float | None, typer.Option(help="Send this % of requests to --version, the rest to the current primary.")] = None,
    bake: Annotated[str | None, typer.Option(help="Canary: promote after this long within the thresholds (5m, 1h; default 5m).")] = None,
    rollback_on: Annotated[str | None, typer.Option(help="Canary: roll back when crossed, e.g. 'error_rate>0.01,p99_ms>50'.")] = None,
    ab: Annotated[str | None, typer.Option(help="A/B test by weight, sticky per device, e.g. '6:50,7:50'.")] = None,
    shadow: Annotated[str | None, typer.Option(help="Mirror every request to this version; its answers are only logged.")] = None,
    stream: Annotated[str | None, typer.Option(help="Score every arriving row of this device type ('' stops).")] = None,
    devices: Annotated[str | None, typer.Option(help="Answer MQTT requests without 'model' of devices of this type ('' stops).")] = None,
    reason: Reason = "",
    as_json: AsJson = False, data_dir: DataDir = None, catalog_url: CatalogUrl = None,
) -> None:
    """Serve a registered model on /api/v1/models/NAME/predict: champion, a version, a canary, an A/B test."""
    from .serve.control import deploy as apply
    from .workbench import Workbench

    settings, catalog, store = _deployments(data_dir, catalog_url)
    bake_seconds = None
    if bake is not None:
        from .scheduler import parse_duration

        bake_seconds = _run(parse_duration, bake)
    registry = _run(lambda: Workbench(settings).registry.client)
    info = _run(apply, store, catalog, registry, name, who=_who(), version=version, canary=canary,
                bake_seconds=bake_seconds, rollback_on=rollback_on, ab=ab, shadow=shadow, stream=stream,
                devices=devices, reason=reason)
    if as_json:
        print(json.dumps(info))
        return
    _print_deployment(info)


@deployments_app.command("list")
def deployments_list(as_json: AsJson = False, data_dir: DataDir = None, catalog_url: CatalogUrl = None) -> None:
    """Every deployment with its variants, shares, stream and device binding."""
    from .serve.control import summary

    _, _, store = _deployments(data_dir, catalog_url)
    rows = [summary(d) for d in _run(store.list)]
    if as_json:
        print(json.dumps(rows))
        return
    from rich.table import Table

    table = Table("name", "generation", "variants", "stream", "devices", "updated")
    for r in rows:
        variants = ", ".join(f"{v['variant']}={v['version']}" + ("" if v["role"] == "shadow" else f" {v['share']:g}%")
                             for v in r["variants"])
        table.add_row(r["name"], str(r["generation"]), variants, r["stream"] or "", r["devices"] or "",
                      str(r["updated_at"] or "")[:19])
    console.print(table)


@deployments_app.command("history")
def deployments_history(
    name: str,
    limit: Annotated[int, typer.Option(help="Most recent events to show.")] = 50,
    as_json: AsJson = False, data_dir: DataDir = None, catalog_url: CatalogUrl = None,
) -> None:
    """The audit trail of a deployment, newest first: when, what, who, why."""
    _, _, store = _deployments(data_dir, catalog_url)
    events = _run(store.events, name, limit=limit)
    if not events:
        _fail(Iot2mlError(f"model {name!r} was never deployed: see 'iot2ml deployments list'"))
    if as_json:
        print(json.dumps(events))
        return
    from rich.table import Table

    table = Table("at", "generation", "action", "who", "variants", "reason")
    for e in events:
        variants = ", ".join(f"{v['role']}={v['ref']}" for v in e["spec"]["variants"]) if e["spec"] else "-"
        table.add_row(e["at"][:19], str(e["generation"]), e["action"], e["who"], variants, e["reason"] or "")
    console.print(table)


@app.command()
def rollback(
    name: str, reason: Reason = "",
    as_json: AsJson = False, data_dir: DataDir = None, catalog_url: CatalogUrl = None,
) -> None:
    """Restore the deployment as it was before its last change (a restored canary bakes anew)."""
    from .serve.control import summary

    _, _, store = _deployments(data_dir, catalog_url)
    restored = _run(store.rollback, name, who=_who(), reason=reason)
    info = {**summary(restored), "action": "rollback"}
    if as_json:
        print(json.dumps(info))
        return
    _print_deployment(info)


@app.command()
def undeploy(
    name: str, reason: Reason = "",
    as_json: AsJson = False, data_dir: DataDir = None, catalog_url: CatalogUrl = None,
) -> None:
    """Stop serving a model (its history stays; 'iot2ml deploy NAME' serves it again)."""
    _, _, store = _deployments(data_dir, catalog_url)
    _run(store.remove, name, who=_who(), reason=reason)
    if as_json:
        print(json.dumps({"name": name, "deployed": False}))
    else:
        console.print(f"{name} is no longer served")


def main() -> None:
    try:
        app()
    except Iot2mlError as err:
        err_console.print(f"[bold red]error:[/] {err}")
        sys.exit(2)


if __name__ == "__main__":
    main()
