"""Devices, API keys and device types."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from ._common import (
    AsJson,
    CatalogUrl,
    DataDir,
    _catalog,
    _poke_broker,
    _run,
    app,
    console,
)

devices_app = typer.Typer(no_args_is_help=True, help="Register, list and revoke devices.")

keys_app = typer.Typer(no_args_is_help=True, help="API keys for the HTTP API.")

types_app = typer.Typer(no_args_is_help=True, help="Device types and their declared schemas.")
app.add_typer(devices_app, name="devices")
app.add_typer(keys_app, name="keys")
app.add_typer(types_app, name="types")


def _devices(data_dir, catalog_url):
    from ..auth.store import Devices

    settings, catalog = _catalog(data_dir, catalog_url)
    return settings, _run(Devices, catalog)


def _keys(data_dir, catalog_url):
    from ..auth.store import Keys

    settings, catalog = _catalog(data_dir, catalog_url)
    return settings, _run(Keys, catalog)


def _certs(data_dir, catalog_url):
    from ..auth.ca import platform_ca
    from ..auth.certs import Certificates

    settings, catalog = _catalog(data_dir, catalog_url)
    return settings, _run(Certificates, catalog, platform_ca(settings))


@devices_app.command("add")
def devices_add(
    device_id: str, type: Annotated[str, typer.Option("--type", help="Device type = curated table name.")],
    rotate: Annotated[bool, typer.Option(help="Issue a new token (with --cert: a new certificate; the old "
                                         "one stops working) for an existing device.")] = False,
    cert: Annotated[bool, typer.Option("--cert", help="Issue a key and a certificate signed by the platform CA "
                                       "(log-in on the MQTTS port) instead of a token.")] = False,
    as_json: AsJson = False, data_dir: DataDir = None, catalog_url: CatalogUrl = None,
) -> None:
    """Register a device and print its token, or with --cert its key and certificate (shown once;
    only a hash of a token is stored, a key is never stored)."""
    if cert:
        settings, certs = _certs(data_dir, catalog_url)
        answer = _run(certs.issue_device, device_id, type, rotate=rotate)
        _poke_broker(settings)
        from .users import audit_cli

        audit_cli(settings, "devices:write", f"devices add {device_id} --cert (serial {answer['serial']})")
        if as_json:
            print(json.dumps(answer))
        else:
            console.print(f"device [bold]{device_id}[/] (type {type}) certificate serial {answer['serial']}")
            console.print(answer["cert"] + answer["key"], end="", markup=False, highlight=False)
            console.print("CA (trust this to check the server):", markup=False)
            console.print(answer["ca"], end="", markup=False, highlight=False)
        return
    settings, devices = _devices(data_dir, catalog_url)
    token = _run(devices.add_device, device_id, type, rotate=rotate)
    _poke_broker(settings)
    if as_json:
        print(json.dumps({"device_id": device_id, "token": token}))
    else:
        console.print(f"device [bold]{device_id}[/] (type {type}) token: {token}")


@devices_app.command("certs")
def devices_certs(device_id: Annotated[str | None, typer.Argument(help="Only this device's.")] = None,
                  as_json: AsJson = False, data_dir: DataDir = None, catalog_url: CatalogUrl = None) -> None:
    """List certificates: serial, device or claim, validity, whether it still works."""
    _, certs = _certs(data_dir, catalog_url)
    rows = _run(certs.list, device_id)
    if as_json:
        print(json.dumps(rows))
        return
    for r in rows:
        state = "active" if r["active"] else ("revoked" if r["revoked_at"] else "expired")
        console.print(f"{r['name']}\t{r['kind']}\t{r['serial']}\tuntil {r['not_after']}\t{state}")


@devices_app.command("revoke-cert")
def devices_revoke_cert(
    device_id: str,
    serial: Annotated[str | None, typer.Option(help="Only this certificate (default: all of the device's).")] = None,
    data_dir: DataDir = None, catalog_url: CatalogUrl = None,
) -> None:
    """Revoke a device's certificate(s): a device connected with one is dropped at once."""
    settings, certs = _certs(data_dir, catalog_url)
    n = _run(certs.revoke, device_id, serial=serial)
    _poke_broker(settings)
    from .users import audit_cli

    audit_cli(settings, "devices:write", f"devices revoke-cert {device_id}" + (f" --serial {serial}" if serial else ""))
    console.print(f"{n} certificate(s) of {device_id} revoked")

@devices_app.command("remove")
def devices_remove(device_id: str, data_dir: DataDir = None, catalog_url: CatalogUrl = None) -> None:
    """Revoke a device: its token stops working at once; its data stays."""
    settings, devices = _devices(data_dir, catalog_url)
    _run(devices.remove_device, device_id)
    _poke_broker(settings)
    console.print(f"device {device_id} revoked")

@devices_app.command("list")
def devices_list(as_json: AsJson = False, data_dir: DataDir = None, catalog_url: CatalogUrl = None) -> None:
    """List devices."""
    _, devices = _devices(data_dir, catalog_url)
    rows = [{"device_id": d.device_id, "type": d.type, "active": d.active} for d in devices.list_devices()]
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
    name: str,
    role: Annotated[str, typer.Option(help="viewer, data-scientist, operator or admin (reader: viewer + "
                                      "predict, as keys made before roles).")] = "admin",
    expires: Annotated[str | None, typer.Option(help="Valid for this long, e.g. 30d or 12h (default: until "
                                                "removed).")] = None,
    as_json: AsJson = False, data_dir: DataDir = None, catalog_url: CatalogUrl = None,
) -> None:
    """Create an API key for the HTTP API and print it (shown once)."""
    from ..core.timeutil import parse_duration

    seconds = _run(parse_duration, expires) if expires else None
    settings, keys = _keys(data_dir, catalog_url)
    key = _run(keys.add_key, name, role, expires=seconds)
    from .users import audit_cli

    audit_cli(settings, "keys:admin", f"keys add {name} --role {role}" + (f" --expires {expires}" if expires else ""))
    if as_json:
        print(json.dumps({"name": name, "key": key, "role": role,
                          "expires_at": next(k["expires_at"] for k in keys.describe_keys() if k["name"] == name)}))
    else:
        until = f", expires in {expires}" if expires else ""
        console.print(f"API key [bold]{name}[/] ({role}{until}): {key}")

@keys_app.command("rotate-admin")
def keys_rotate_admin(as_json: AsJson = False, data_dir: DataDir = None, catalog_url: CatalogUrl = None) -> None:
    """Replace the admin key 'iot2ml up' prints (data dir's secrets/admin.key): the old one stops
    working within 2 s; 'up' prints the new one from now on."""
    import os
    import secrets

    settings, keys = _keys(data_dir, catalog_url)
    key = "i2m_" + secrets.token_urlsafe(32)
    folder = settings.data_dir / "secrets"
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = folder / "admin.key.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(key)
    _run(keys.set_key, "admin", key, "admin")
    os.replace(tmp, folder / "admin.key")
    from .users import audit_cli

    audit_cli(settings, "keys:admin", "keys rotate-admin")
    if as_json:
        print(json.dumps({"name": "admin", "key": key}))
    else:
        console.print(f"admin key rotated: {key}")

@keys_app.command("remove")
def keys_remove(name: str, data_dir: DataDir = None, catalog_url: CatalogUrl = None) -> None:
    """Delete an API key: it stops working at once on this process's API (within 2 s elsewhere)."""
    settings, keys = _keys(data_dir, catalog_url)
    _run(keys.remove_key, name)
    from .users import audit_cli

    audit_cli(settings, "keys:admin", f"keys remove {name}")
    console.print(f"API key {name} removed")

@keys_app.command("list")
def keys_list(as_json: AsJson = False, data_dir: DataDir = None, catalog_url: CatalogUrl = None) -> None:
    """List API key names, roles and expiry (never the keys)."""
    _, keys = _keys(data_dir, catalog_url)
    rows = [{"name": k["name"], "role": k["role"], "expires_at": k["expires_at"]} for k in keys.describe_keys()]
    print(json.dumps(rows)) if as_json else [
        console.print(f"{r['name']}\t{r['role']}" + (f"\texpires {r['expires_at']}" if r["expires_at"] else ""))
        for r in rows]

@types_app.command("add")
def types_add(
    name: str,
    schema: Annotated[str | None, typer.Option(help="Declared columns, e.g. 'pressure:float,count:int'.")] = None,
    data_dir: DataDir = None, catalog_url: CatalogUrl = None,
) -> None:
    """Create a device type, optionally declaring column types up front."""
    _, devices = _devices(data_dir, catalog_url)
    t = _run(devices.add_type, name, schema, exist_ok=True)
    console.print(f"type {t.name}: {t.schema or 'columns discovered from data'}")

@types_app.command("list")
def types_list(as_json: AsJson = False, data_dir: DataDir = None, catalog_url: CatalogUrl = None) -> None:
    """List device types."""
    _, devices = _devices(data_dir, catalog_url)
    rows = [{"name": t.name, "schema": t.schema} for t in devices.list_types()]
    print(json.dumps(rows)) if as_json else [console.print(f"{r['name']}\t{r['schema'] or '-'}") for r in rows]
