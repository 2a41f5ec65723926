"""Notifiers: where alerts go (an Alertmanager webhook, Slack, e-mail, any Apprise URL)."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from ..core.errors import InvalidInput
from ._common import AsJson, CatalogUrl, DataDir, _catalog, _fail, _run, app, console

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
