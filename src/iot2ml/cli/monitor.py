"""Notifiers (where alerts go: an Alertmanager webhook, Slack, e-mail, any Apprise URL) and alert rules."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from ..core.errors import InvalidInput
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

notifiers_app = typer.Typer(no_args_is_help=True, help="Where alerts go: add, list, test and remove notifiers.")
app.add_typer(notifiers_app, name="notifiers")


def _notifiers(data_dir, catalog_url):
    from ..monitor.store import Notifiers

    _, catalog = _catalog(data_dir, catalog_url)
    return _run(Notifiers, catalog)


@notifiers_app.command("add")
def notifiers_add(
    name: str,
    webhook: Annotated[str | None, typer.Option(help="POST the Alertmanager webhook (v4) JSON to this URL.")] = None,
    slack: Annotated[str | None, typer.Option(help="A Slack incoming-webhook URL.")] = None,
    email: Annotated[str | None, typer.Option(help="E-mail address(es), comma separated; needs --smtp.")] = None,
    smtp: Annotated[str | None, typer.Option(help="SMTP server for --email: smtp://[user:pass@]host:25, "
                                             "smtps://host:465, smtp://host:587?starttls=1.")] = None,
    sender: Annotated[str | None, typer.Option("--from", help="From address for --email.")] = None,
    url: Annotated[str | None, typer.Option(help="Any Apprise URL (pip install 'iot2ml[apprise]').")] = None,
    data_dir: DataDir = None, catalog_url: CatalogUrl = None,
) -> None:
    """Add a notifier: exactly one of --webhook, --slack, --email (with --smtp) or --url."""
    given = {k: v for k, v in {"webhook": webhook, "slack": slack, "email": email, "apprise": url}.items() if v}
    if len(given) != 1:
        _fail_usage("give exactly one of --webhook, --slack, --email or --url")
    (kind, target), = given.items()
    if kind != "email" and (smtp or sender):
        _fail_usage("--smtp and --from go with --email")
    options = {k: v for k, v in {"smtp": smtp, "sender": sender}.items() if v}
    record = _run(_notifiers(data_dir, catalog_url).add, name, kind, target, **options)
    shown = record.masked()
    console.print(f"notifier [bold]{name}[/] ({kind}) -> {shown['target']}: try it with 'iot2ml notifiers test {name}'")


def _fail_usage(message: str) -> None:
    _fail(InvalidInput(message))


@notifiers_app.command("list")
def notifiers_list(as_json: AsJson = False, data_dir: DataDir = None, catalog_url: CatalogUrl = None) -> None:
    """List notifiers (secrets in their targets masked)."""
    rows = [r.masked() for r in _run(_notifiers(data_dir, catalog_url).list)]
    if as_json:
        print(json.dumps(rows))
        return
    from rich.table import Table

    table = Table("name", "kind", "target", "options")
    for r in rows:
        table.add_row(r["name"], r["kind"], r["target"], json.dumps(r["options"]) if r["options"] else "")
    console.print(table)


@notifiers_app.command("test")
def notifiers_test(name: str, as_json: AsJson = False, data_dir: DataDir = None,
                   catalog_url: CatalogUrl = None) -> None:
    """Send a test notification now and print the result (exit 1 if it was not delivered)."""
    from ..monitor.dispatch import deliver
    from ..monitor.notifiers import test_notification

    store = _notifiers(data_dir, catalog_url)
    notifier = _run(store.notifier, name)
    delivery = deliver(notifier, test_notification(), record=store.record)
    if as_json:
        print(json.dumps(delivery.to_dict()))
    elif delivery.ok:
        console.print(f"notifier {name}: delivered ({delivery.detail})")
    else:
        console.print(f"[bold red]notifier {name}: not delivered:[/] {delivery.error}")
    if not delivery.ok:
        raise typer.Exit(1)


@notifiers_app.command("remove")
def notifiers_remove(name: str, data_dir: DataDir = None, catalog_url: CatalogUrl = None) -> None:
    """Remove a notifier (its delivery log stays)."""
    _run(_notifiers(data_dir, catalog_url).remove, name)
    console.print(f"notifier {name} removed")


# ------------------------------------------------------------------------------------------- alerts

alerts_app = typer.Typer(no_args_is_help=True, help="Alert rules over the lake: add, list, history, ack, silence, remove.")
app.add_typer(alerts_app, name="alerts")


def _alert_rules(data_dir, catalog_url):
    from ..monitor.store import AlertRules

    settings, catalog = _catalog(data_dir, catalog_url)
    return settings, _run(AlertRules, catalog)


def _lake(settings):
    from ..lake import Lake

    return _run(Lake, settings.lake, settings.lake_storage_options)


def _seconds(flag: str, text: str) -> float:
    from ..core.timeutil import parse_duration

    try:
        return parse_duration(text)
    except InvalidInput as err:
        _fail(InvalidInput(f"{flag}: {err}"))
        raise


@alerts_app.command("add")
def alerts_add(
    name: str,
    table: Annotated[str | None, typer.Option(help="With --when: the lake table to watch (a device type's table).")] = None,
    when: Annotated[str | None, typer.Option(help="One aggregate compared with a number, e.g. 'max(pressure) > 5'.")] = None,
    by: Annotated[list[str] | None, typer.Option(help="With --when: a column whose values are separate alerts (repeatable).")] = None,
    silent: Annotated[str | None, typer.Option(help="A device of --type sent nothing for this long (e.g. 5m), or 'auto' "
                                               "(several times its usual interval).")] = None,
    stuck: Annotated[int | None, typer.Option(help="A field of a device of --type repeated one value this many readings.")] = None,
    range_: Annotated[list[str] | None, typer.Option("--range", help="FIELD=LO:HI (declared) or FIELD (learned from the "
                                                     "table's quantiles): readings outside it (repeatable).")] = None,
    dead_letter_rate: Annotated[float | None, typer.Option(help="Share of messages dead-lettered in the window "
                                                           "(by reason) above this, e.g. 0.05.")] = None,
    schema_changes: Annotated[bool, typer.Option("--schema-changes", help="New or conflicting columns in --type's data.")] = False,
    type_: Annotated[str | None, typer.Option("--type", help="The device type --silent, --stuck, --range, "
                                              "--dead-letter-rate and --schema-changes watch.")] = None,
    drift: Annotated[str | None, typer.Option(help="A deployed model whose inputs drift from its training data.")] = None,
    metric: Annotated[str | None, typer.Option(help="MODEL:METRIC of live quality, e.g. wine-quality:accuracy; "
                                               "with --below or --above.")] = None,
    below: Annotated[float | None, typer.Option(help="With --metric: fire when the metric is below this.")] = None,
    above: Annotated[float | None, typer.Option(help="With --metric: fire when the metric is above this.")] = None,
    anomaly: Annotated[str | None, typer.Option(help="A model whose streamed anomaly flags raise alerts (per device).")] = None,
    retrain: Annotated[str | None, typer.Option(help="With --drift or --metric: the training command (as after "
                                                "'iot2ml train') run when the rule fires.")] = None,
    canary: Annotated[int | None, typer.Option(help="With --retrain: percent of traffic for the retrained model.")] = None,
    bake: Annotated[str | None, typer.Option(help="With --retrain: how long the canary bakes, e.g. 10m.")] = None,
    window: Annotated[str, typer.Option(help="The sliding window the rule covers, e.g. 1m.")] = "1m",
    for_: Annotated[str, typer.Option("--for", help="How long the condition must hold before firing, e.g. 30s.")] = "0s",
    every: Annotated[str, typer.Option(help="How often the rule is evaluated, e.g. 10s.")] = "1m",
    severity: Annotated[str, typer.Option(help="critical, warning, info... (a label of the alert).")] = "warning",
    notify: Annotated[list[str] | None, typer.Option(help="A notifier to send to (repeatable); see 'iot2ml notifiers list'.")] = None,
    data_dir: DataDir = None, catalog_url: CatalogUrl = None,
) -> None:
    """Add an alert rule (one of --when, --silent, --stuck, --range, --dead-letter-rate, --schema-changes,
    --drift, --metric, --anomaly), checked now; the monitor picks it up within a second."""
    from ..monitor.kinds import rule_spec
    from ..monitor.service import define_rule
    from ..wiring import monitor_context

    settings, rules = _alert_rules(data_dir, catalog_url)
    kind, spec = _run(rule_spec, {
        "table": table, "when": when, "by": by, "silent": silent, "stuck": stuck, "range": range_,
        "dead_letter_rate": dead_letter_rate, "schema_changes": schema_changes, "type": type_, "drift": drift,
        "metric": metric, "below": below, "above": above, "anomaly": anomaly, "retrain": retrain,
        "canary": canary, "bake": None if bake is None else _seconds("--bake", bake)})
    record = _run(define_rule, monitor_context(settings, rules.catalog, _lake(settings)), name, kind=kind, spec=spec,
                  window=_seconds("--window", window), for_=_seconds("--for", for_), every=_seconds("--every", every),
                  severity=severity, notify=tuple(notify or ()))
    _run(rules.add, record)
    console.print(f"alert rule [bold]{name}[/]: {record.when} over {record.table} ({window} window, every {every})")


@alerts_app.command("list")
def alerts_list(as_json: AsJson = False, data_dir: DataDir = None, catalog_url: CatalogUrl = None) -> None:
    """List the alert rules and their firing alerts (with the ids 'alerts ack' takes)."""
    from ..monitor.store import firing_ids

    _, rules = _alert_rules(data_dir, catalog_url)
    firing = firing_ids(_run(rules.load_state))
    out = []
    for r in _run(rules.list):
        alerts = [{"id": fp, **{k: v for k, v in a.items() if k != "rule"}} for fp, a in firing.items()
                  if a["rule"] == r.name]
        out.append({**r.to_dict(), "alerts": alerts})
    if as_json:
        print(json.dumps(out))
        return
    from rich.table import Table

    table = Table("name", "kind", "watches", "when", "by", "severity", "notify", "firing")
    for r in out:
        shown = "\n".join(f"{a['id']} {a['state']} {json.dumps(a['labels'])}" for a in r["alerts"])
        table.add_row(r["name"], r["kind"], r["table"], r["when"], ",".join(r["by"]), r["severity"], ",".join(r["notify"]),
                      shown)
    console.print(table)


@alerts_app.command("history")
def alerts_history(
    rule: Annotated[str | None, typer.Option(help="Only this rule's changes.")] = None,
    limit: Annotated[int, typer.Option(help="At most this many rows.")] = 100,
    as_json: AsJson = False, data_dir: DataDir = None, catalog_url: CatalogUrl = None,
) -> None:
    """The state changes of alerts, newest first (the lake table 'alerts')."""
    from ..monitor.service import history

    settings = _run(_settings, data_dir=data_dir, catalog_url=catalog_url)
    rows = _run(history, _lake(settings), rule=rule, limit=limit)
    if as_json:
        print(json.dumps(rows))
        return
    from rich.table import Table

    table = Table("at", "rule", "state", "labels", "value")
    for r in rows:
        table.add_row(r["at"], r["rule"], r["state"], json.dumps(r["labels"]), "" if r["value"] is None else repr(r["value"]))
    console.print(table)


@alerts_app.command("ack")
def alerts_ack(id: str, data_dir: DataDir = None, catalog_url: CatalogUrl = None) -> None:
    """Stop repeats of the firing alert ID until it resolves or fires again (applied by the monitor)."""
    _, rules = _alert_rules(data_dir, catalog_url)
    _run(rules.ack, id)
    console.print(f"alert {id} acknowledged: the monitor applies it within a second")


@alerts_app.command("silence")
def alerts_silence(
    name: str,
    for_: Annotated[str, typer.Option("--for", help="How long, e.g. 1h.")] = "1h",
    data_dir: DataDir = None, catalog_url: CatalogUrl = None,
) -> None:
    """Keep rule NAME's alerts out of notifications for a while (states and history go on)."""
    import time

    _, rules = _alert_rules(data_dir, catalog_url)
    seconds = _seconds("--for", for_)
    if seconds <= 0:
        _fail(InvalidInput(f"--for {for_!r} must be > 0, e.g. 1h"))
    _run(rules.silence, name, time.time() + seconds)
    console.print(f"alert rule {name} silenced for {for_}")


@alerts_app.command("remove")
def alerts_remove(name: str, data_dir: DataDir = None, catalog_url: CatalogUrl = None) -> None:
    """Remove an alert rule (its firing alerts resolve; its history stays)."""
    _, rules = _alert_rules(data_dir, catalog_url)
    _run(rules.remove, name)
    console.print(f"alert rule {name} removed")


# ------------------------------------------------------------------------------------------- monitor report

def _monitor_report_app():
    from .platform import component_group

    return component_group("monitor")


@_monitor_report_app().command("report")
def monitor_report(
    name: str,
    window: Annotated[str, typer.Option(help="How far back the captured inputs go, e.g. 1h, 30m, 1d.")] = "1h",
    as_json: AsJson = False, data_dir: DataDir = None, catalog_url: CatalogUrl = None,
) -> None:
    """Drift of model NAME per version: per input feature and the prediction against its training data
    (Evidently's tests), the dataset verdict, and live quality where labels or actuals arrived."""
    from ..monitor.report import build_report, parse_window
    from ..wiring import monitor_context

    seconds = _run(parse_window, window)
    settings, catalog = _catalog(data_dir, catalog_url)
    report = _run(build_report, monitor_context(settings, catalog, _lake(settings)), name, window=seconds)
    if as_json:
        print(json.dumps(report))
        return
    from rich.table import Table

    if not report["versions"]:
        console.print(f"{name}: nothing captured in the last {window}: is it deployed and answering? "
                      "(serving keeps capture_sample of its inputs)")
    for v in report["versions"]:
        variant = f" ({v['variant']})" if v.get("variant") else ""
        if v["status"] == "no_reference":
            console.print(f"[bold]{name} v{v['version']}[/]{variant}: {v['n_current']} rows, no reference profile "
                          "(trained before profiles were logged): retrain it to check drift")
            continue
        verdict = "[bold red]dataset drift[/]" if v["dataset_drift"] else "no dataset drift"
        console.print(f"[bold]{name} v{v['version']}[/]{variant}: {v['n_current']} rows in the last {window}, "
                      f"{verdict} ({v['share_drifted']:.0%} of features drifted)")
        table = Table("feature", "test", "statistic", "p-value / distance", "threshold", "drifted", "psi", "n")
        for f in [*v["features"], *([{**v["prediction"], "feature": "(prediction)"}] if v["prediction"] else [])]:
            score = f["p_value"] if f["p_value"] is not None else f["distance"]
            table.add_row(f["feature"], f["test"], _num(f["statistic"]), _num(score), _num(f["threshold"]),
                          "yes" if f["drifted"] else ("-" if f["status"] != "ok" else "no"), _num(f["psi"]),
                          str(f["n_current"]))
        console.print(table)
    if report["quality"]:
        table = Table("quality", "version", "value", "n")
        for q in report["quality"]:
            table.add_row(str(q.get("test")), str(q.get("version", "")), _num(q.get("statistic")),
                          str(q.get("n_current", "")))
        console.print(table)


def _num(value) -> str:
    return "" if value is None else f"{value:.4g}"
