"""The ML workbench: train, models, labels, batch predict, retraining schedules."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Any

import typer

from ..core.errors import Iot2mlError
from ._common import (
    AsJson,
    CatalogUrl,
    DataDir,
    _catalog,
    _fail,
    _run,
    _settings,
    app,
    console,
)

models_app = typer.Typer(no_args_is_help=True, help="Registered models (MLflow registry).")

labels_app = typer.Typer(no_args_is_help=True, help="Labels (ratings, events) joined to telemetry for training.")

schedule_app = typer.Typer(no_args_is_help=True, help="Retraining schedules (run by 'iot2ml up').")
app.add_typer(models_app, name="models")
app.add_typer(labels_app, name="labels")
app.add_typer(schedule_app, name="schedule")


def _workbench(data_dir: Path | None):
    from ..ml.workbench import Workbench

    return Workbench(_run(_settings, data_dir=data_dir))

def _print_models(rows: list[dict[str, Any]], as_json: bool) -> None:
    if as_json:
        keys = ("name", "version", "aliases", "task", "metrics", "baseline_metrics", "data_versions", "method")
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
    from ..ml.jobs import TrainJob

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
            from ..core.timeutil import parse_duration

            options["label_window"] = _run(parse_duration, label_window)
        if task == "forecast":
            options.setdefault("progress", console.is_terminal and not as_json)  # no bars in logs and pipes
        job = _run(TrainJob, task=task, table=table, name=name, options=options, where=where)
    bench = _workbench(data_dir)
    with console.status(f"training {job.task} model {job.name} on {job.table}..."):
        described = _run(bench.train, job)
    if as_json:
        _print_models([described], True)
        return
    _print_models([described], False)
    method = described.get("method")
    if method:  # an anomaly model: which method scores, and from what on a reading is flagged
        extra = ", ".join(f"{k} {method[k]}" for k in ("window", "period", "cycles")
                          if k in method and method["method"] != "point")  # point reads no window
        console.print(f"method {method['method']}" + (f" ({extra})" if extra else "")
                      + f": a reading is flagged when its score exceeds {float(method['threshold']):.4g}"
                      + (f" (chosen by {method['selection']})" if "selection" in method else ""))
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
    from ..ml.labels import read_labels_csv

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
    from ..ml.schedules import Schedules
    from ..core.timeutil import parse_duration
    from ..ml.scheduler import parse_train_args

    _, catalog = _catalog(data_dir, catalog_url)
    job = _run(parse_train_args, train, default_name=name)
    seconds = _run(parse_duration, every) if every else None
    _run(Schedules(catalog).add, name, job, every_seconds=seconds, min_new_rows=min_new_rows,
         on_labels=on_labels, replace=replace)
    console.print(f"schedule {name}: {job['task']} on {job['table']} as model {job['name']}")

@schedule_app.command("list")
def schedule_list(as_json: AsJson = False, data_dir: DataDir = None, catalog_url: CatalogUrl = None) -> None:
    """List schedules."""
    from ..ml.schedules import Schedules

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
    from ..ml.schedules import Schedules

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
    from ..ml.schedules import Schedules

    _, catalog = _catalog(data_dir, catalog_url)
    _run(Schedules(catalog).remove, name)
    console.print(f"schedule {name} removed")
