"""The platform CA (``iot2ml ca``) and provisioning claims (``iot2ml provisioning``)."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from ._common import AsJson, CatalogUrl, DataDir, _poke_broker, _run, app, console
from .devices import _certs
from .users import audit_cli

ca_app = typer.Typer(no_args_is_help=True, help="The platform's certificate authority (device certificates).")
provisioning_app = typer.Typer(no_args_is_help=True, help="Provisioning claims: devices get their own "
                               "certificate over MQTT by sending a CSR.")
app.add_typer(ca_app, name="ca")
app.add_typer(provisioning_app, name="provisioning")


@ca_app.command("show")
def ca_show(as_json: AsJson = False, data_dir: DataDir = None, catalog_url: CatalogUrl = None) -> None:
    """The CA certificate (PEM), its fingerprint and validity, and older CAs still trusted."""
    _, certs = _certs(data_dir, catalog_url)
    info = _run(certs.ca.info)
    if as_json:
        print(json.dumps(info))
        return
    console.print(f"CA {info['subject']}  sha256 {info['sha256']}  until {info['not_after']}", markup=False)
    console.print(f"file {info['cert_file']}" + ("  (your own)" if info["own"] else ""), markup=False)
    for old in info["previous"]:
        console.print(f"still trusted: {old['subject']}  until {old['not_after']}", markup=False)
    console.print(info["cert"], end="", markup=False, highlight=False)


@ca_app.command("rotate")
def ca_rotate(as_json: AsJson = False, data_dir: DataDir = None, catalog_url: CatalogUrl = None) -> None:
    """Make a new CA for new certificates; those the old one signed keep working until they end or
    are revoked (re-issue them with 'devices add ID --cert --rotate')."""
    settings, certs = _certs(data_dir, catalog_url)
    info = _run(certs.ca.rotate)
    _poke_broker(settings)
    audit_cli(settings, "ca:admin", "ca rotate")
    if as_json:
        print(json.dumps(info))
    else:
        console.print(f"new CA {info['subject']}  sha256 {info['sha256']}; {len(info['previous'])} older CA(s) "
                      f"still trusted", markup=False)


@provisioning_app.command("add")
def provisioning_add(
    name: str, type: Annotated[str, typer.Option("--type", help="The device type the claim provisions.")],
    as_json: AsJson = False, data_dir: DataDir = None, catalog_url: CatalogUrl = None,
) -> None:
    """A claim: a certificate (and key, shown once) to put on devices of a type at the factory; each
    device then asks for its own certificate on provision/NAME/<its id>/request."""
    settings, certs = _certs(data_dir, catalog_url)
    answer = _run(certs.add_claim, name, type)
    _poke_broker(settings)
    audit_cli(settings, "devices:write", f"provisioning add {name} --type {type} (serial {answer['serial']})")
    if as_json:
        print(json.dumps(answer))
    else:
        console.print(f"claim [bold]{name}[/] for type {type}: publish {{\"csr\": ...}} on "
                      f"provision/{name}/<device id>/request over MQTTS with this certificate")
        console.print(answer["claim_cert"] + answer["claim_key"] + answer["ca"], end="", markup=False,
                      highlight=False)


@provisioning_app.command("list")
def provisioning_list(as_json: AsJson = False, data_dir: DataDir = None, catalog_url: CatalogUrl = None) -> None:
    """List claims: name, device type, active."""
    _, certs = _certs(data_dir, catalog_url)
    rows = _run(certs.list_claims)
    print(json.dumps(rows)) if as_json else [
        console.print(f"{r['name']}\t{r['type']}\t{'active' if r['active'] else 'revoked'}") for r in rows]


@provisioning_app.command("remove")
def provisioning_remove(name: str, data_dir: DataDir = None, catalog_url: CatalogUrl = None) -> None:
    """Revoke a claim: its certificate stops working; devices it provisioned keep theirs."""
    settings, certs = _certs(data_dir, catalog_url)
    _run(certs.remove_claim, name)
    _poke_broker(settings)
    audit_cli(settings, "devices:write", f"provisioning remove {name}")
    console.print(f"claim {name} revoked")
