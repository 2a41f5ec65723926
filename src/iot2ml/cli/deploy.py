"""Deployments: deploy, rollback, undeploy, and their history.

A change returns once every running serving process (``iot2ml serve``, and the API's own runtime)
serves it: the deployment's new generation with its models loaded, or its absence after
``undeploy`` (``serve.control.confirm``). ``--no-wait`` returns as soon as it is stored; past
``--wait-timeout`` the command says which process did not apply it and exits with code 3 (the
change stays stored and applies when that process catches up)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from ..core.errors import Iot2mlError
from ._common import (
    AsJson,
    CatalogUrl,
    DataDir,
    Reason,
    _catalog,
    _fail,
    _run,
    _who,
    app,
    console,
    err_console,
)

deployments_app = typer.Typer(no_args_is_help=True, help="Deployed models: what serves, and every change to it.")
app.add_typer(deployments_app, name="deployments")


NoWait = Annotated[bool, typer.Option("--no-wait", help="Return once the change is stored, without waiting for "
                                                          "the serving processes to apply it.")]
WaitTimeout = Annotated[float, typer.Option("--wait-timeout", min=0.1, help="Seconds the serving processes may "
                                            "take to apply the change; past them exit code 3 (it stays stored).")]
NOT_CONFIRMED_EXIT = 3


def _finish(settings: Any, store: Any, name: str, info: dict[str, Any], *, no_wait: bool, timeout: float,
            as_json: bool, show: Any) -> None:
    """Wait for the serving processes to serve ``name`` as the catalog has it now, then print ``info``
    (``show(info)`` unless ``--json``); exit 3 naming what did not confirm in time."""
    from ..core.errors import NotConfirmed
    from ..serve.control import confirm, serving_peers

    failure = None
    if not no_wait:
        try:
            info["confirmed_by"] = confirm(serving_peers(settings.data_dir), name, lambda: store.get(name),
                                           timeout=timeout)
        except NotConfirmed as err:
            failure = err
    if as_json:
        print(json.dumps(info))
    else:
        show(info)
        if "confirmed_by" in info:
            console.print("  applied by " + (", ".join(info["confirmed_by"]) or
                                             "no serving process (none is running: it applies when one starts)"))
    if failure is not None:
        err_console.print(f"[bold red]not confirmed:[/] {failure}")
        raise typer.Exit(NOT_CONFIRMED_EXIT)


def _deployments(data_dir: Path | None, catalog_url: str | None):
    from ..serve.deployments import Deployments

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
    reason: Reason = "", no_wait: NoWait = False, wait_timeout: WaitTimeout = 30.0,
    as_json: AsJson = False, data_dir: DataDir = None, catalog_url: CatalogUrl = None,
) -> None:
    """Serve a registered model on /api/v1/models/NAME/predict: champion, a version, a canary, an A/B test."""
    from ..auth.store import Devices
    from ..ml.workbench import Workbench
    from ..serve.control import deploy as apply

    settings, catalog, store = _deployments(data_dir, catalog_url)
    bake_seconds = None
    if bake is not None:
        from ..core.timeutil import parse_duration

        bake_seconds = _run(parse_duration, bake)
    registry = _run(lambda: Workbench(settings).registry)
    info = _run(apply, store, Devices(catalog), registry, name, who=_who(), version=version, canary=canary,
                bake_seconds=bake_seconds, rollback_on=rollback_on, ab=ab, shadow=shadow, stream=stream,
                devices=devices, reason=reason)
    _finish(settings, store, name, info, no_wait=no_wait, timeout=wait_timeout, as_json=as_json,
            show=_print_deployment)

@deployments_app.command("list")
def deployments_list(as_json: AsJson = False, data_dir: DataDir = None, catalog_url: CatalogUrl = None) -> None:
    """Every deployment with its variants, shares, stream and device binding."""
    from ..serve.control import summary

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
    name: str, reason: Reason = "", no_wait: NoWait = False, wait_timeout: WaitTimeout = 30.0,
    as_json: AsJson = False, data_dir: DataDir = None, catalog_url: CatalogUrl = None,
) -> None:
    """Restore the deployment as it was before its last change (a restored canary bakes anew)."""
    from ..serve.control import summary

    settings, _, store = _deployments(data_dir, catalog_url)
    restored = _run(store.rollback, name, who=_who(), reason=reason)
    info = {**summary(restored), "action": "rollback"}
    _finish(settings, store, name, info, no_wait=no_wait, timeout=wait_timeout, as_json=as_json,
            show=_print_deployment)

@app.command()
def undeploy(
    name: str, reason: Reason = "", no_wait: NoWait = False, wait_timeout: WaitTimeout = 30.0,
    as_json: AsJson = False, data_dir: DataDir = None, catalog_url: CatalogUrl = None,
) -> None:
    """Stop serving a model (its history stays; 'iot2ml deploy NAME' serves it again)."""
    settings, _, store = _deployments(data_dir, catalog_url)
    _run(store.remove, name, who=_who(), reason=reason)
    _finish(settings, store, name, {"name": name, "deployed": False}, no_wait=no_wait, timeout=wait_timeout,
            as_json=as_json, show=lambda _info: console.print(f"{name} is no longer served"))
