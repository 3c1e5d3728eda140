"""`cachegate db configure`: write a config for a database host, print the Azure role.

    cachegate db configure create -o file --proxy=proxy.example.com:3080 --token=/tmp/token \\
        --azure-redis-discovery=eastus [--azure-subscription=ID] [--azure-resource-group=RG] \\
        [--labels=env=prod] [--ca-pin=sha256:...] [--force]
    cachegate db configure azure-role --subscription=ID [--service discovery|dbproxy|all]

The config written runs discovery (Azure Cache for Redis in the chosen regions) and dbproxy,
joined to the cluster with the token.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer
import yaml

from services.cli.common import err_console, out_console
from services.common.config import (
    DEFAULT_AUTH_PORT, DEFAULT_JOIN_PORT, DEFAULT_PROXY_PORT, SYSTEM_CONFIG, ConfigError, join_hostport,
    load_config, split_hostport, system_config_path,
)

# Where `-o file` writes: the host's config, which cgctl and the services' entrypoints read
# too (system_config_path(): $CACHEGATE_SYSTEM_CONFIG moves it, e.g. in tests).
DEFAULT_OUTPUT = Path(SYSTEM_CONFIG)

app = typer.Typer(help="Generate configuration for a database host (discovery and dbproxy).",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)


def _fail(message: str) -> None:
    err_console.print(f"ERROR: {message}", markup=False)
    raise typer.Exit(1)


def _split(values: Optional[list[str]]) -> list[str]:
    out: list[str] = []
    for v in values or []:
        out += [p.strip() for p in v.split(",") if p.strip()]
    return out


def parse_labels(text: str) -> dict[str, str]:
    """``env=prod,team=cache`` -> {"env": "prod", "team": "cache"} (values may be globs)."""
    out: dict[str, str] = {}
    for part in (p.strip() for p in (text or "").split(",")):
        if not part:
            continue
        key, sep, value = part.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--labels: {part!r} is not key=value")
        out[key.strip()] = value.strip()
    return out


def build_config(*, proxy: str, token: str, regions: list[str], subscriptions: list[str],
                 resource_groups: list[str], labels: dict[str, str], ca_pin: str = "",
                 auth_server: str = "", data_dir: str = "", azure_resource_manager: str = "",
                 azure_authority_host: str = "", azure_ca_file: str = "") -> dict:
    """The config document (a dict) that ``create`` writes; validated by the config loader."""
    proxy = proxy.strip()
    if not proxy:
        raise ValueError("--proxy is required: the host:port users reach the cluster on, e.g. proxy.example.com:3080")
    proxy_host, proxy_port = split_hostport(proxy, DEFAULT_PROXY_PORT)
    if auth_server:
        auth_host, auth_port = split_hostport(auth_server, DEFAULT_AUTH_PORT)
    else:
        auth_host, auth_port = proxy_host, DEFAULT_AUTH_PORT
    doc: dict = {"version": "v1"}
    if data_dir:
        doc["data_dir"] = data_dir
    doc["auth_server"] = join_hostport(auth_host, auth_port)
    doc["join_server"] = join_hostport(auth_host, DEFAULT_JOIN_PORT)
    doc["join"] = {"token": token, "ca_pin": ca_pin}
    matcher: dict = {"types": ["redis"], "regions": regions or ["*"],
                     "subscriptions": subscriptions or ["*"], "resource_groups": resource_groups or ["*"],
                     "tags": labels or {"*": "*"}}
    discovery: dict = {"enabled": True, "azure": [matcher]}
    endpoints = {k: v for k, v in (("resource_manager", azure_resource_manager),
                                   ("authority_host", azure_authority_host), ("ca_file", azure_ca_file)) if v}
    if endpoints:
        discovery["azure_endpoints"] = endpoints
    doc["discovery_service"] = discovery
    dbproxy: dict = {"enabled": True, "public_addr": join_hostport(proxy_host, proxy_port)}
    if endpoints:
        dbproxy["azure_endpoints"] = endpoints
    doc["dbproxy_service"] = dbproxy
    return doc


HEADER = """\
# Cachegate database host: Azure Cache for Redis discovery and the database proxy.
# Written by `cachegate db configure create`. Start it with:
#   cachegate start -c {path}
# Azure credentials come from the environment (managed identity, AZURE_TENANT_ID /
# AZURE_CLIENT_ID / AZURE_CLIENT_SECRET, workload identity, or `az login`); the identity
# needs the role printed by `cachegate db configure azure-role --subscription=<id>`.
"""


def _inline_token(token: str) -> str:
    """The token itself when ``token`` names a readable file (the guide's /tmp/token): the
    config (0600) then needs no other file, and services that run with a private /tmp
    (systemd's PrivateTmp) or as another user still find it."""
    path = Path(token)
    try:
        if "/" in token and path.is_file():
            value = path.read_text().strip()
            if value:
                return value
    except OSError:
        pass
    return token


@app.command()
def create(
    output: str = typer.Option("file", "-o", "--output",
                               help="file (/etc/cachegate.yaml, or $CACHEGATE_SYSTEM_CONFIG), file:///path, a path, or stdout."),
    proxy: str = typer.Option(..., "--proxy", help="host:port of the cluster's proxy (users connect here)."),
    token: str = typer.Option(..., "--token", help="Join token, or the file holding it (from `cgctl tokens add --type=db`)."),
    azure_redis_discovery: Optional[list[str]] = typer.Option(
        None, "--azure-redis-discovery", help="Regions to discover Azure Cache for Redis in (eastus,westus or '*')."),
    azure_subscription: Optional[list[str]] = typer.Option(
        None, "--azure-subscription", help="Subscription id(s) to search (default: every one the identity sees)."),
    azure_resource_group: Optional[list[str]] = typer.Option(
        None, "--azure-resource-group", help="Resource group(s) to search (default: all)."),
    labels: str = typer.Option("", "--labels", help="Only resources with these Azure tags: k=v,k2=v2 (globs allowed)."),
    ca_pin: str = typer.Option("", "--ca-pin", help="CA pin of the cluster (printed by `cgctl tokens add`)."),
    auth_server: str = typer.Option("", "--auth-server", help="host:port of auth's mesh port (default: the proxy's host, port 3025)."),
    data_dir: str = typer.Option("", "--data-dir", help="Where the services keep their state (default /var/lib/cachegate)."),
    azure_resource_manager: str = typer.Option("", "--azure-resource-manager", help="Resource Manager URL (sovereign clouds)."),
    azure_authority_host: str = typer.Option("", "--azure-authority-host", help="Entra ID authority host (sovereign clouds)."),
    azure_ca_file: str = typer.Option("", "--azure-ca-file", help="CA bundle to trust for the two Azure endpoints."),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing file."),
):
    """Write a config that runs Azure Redis discovery and dbproxy on this host."""
    regions = _split(azure_redis_discovery)
    if not regions:
        _fail("--azure-redis-discovery is required: the regions to search, e.g. eastus, eastus,westus or '*'")
    if "*" in regions:
        regions = ["*"]
    token = _inline_token(token)
    try:
        doc = build_config(proxy=proxy, token=token, regions=regions, subscriptions=_split(azure_subscription),
                           resource_groups=_split(azure_resource_group), labels=parse_labels(labels),
                           ca_pin=ca_pin, auth_server=auth_server, data_dir=data_dir,
                           azure_resource_manager=azure_resource_manager,
                           azure_authority_host=azure_authority_host, azure_ca_file=azure_ca_file)
        load_config(data=yaml.safe_load(yaml.safe_dump(doc)), environ={})  # what we write must load
    except (ValueError, ConfigError) as exc:
        _fail(str(exc))
    body = yaml.safe_dump(doc, sort_keys=False)
    if output == "stdout":
        sys.stdout.write(HEADER.format(path="cachegate.yaml") + body)
        return
    if output == "file":
        path = system_config_path()
    elif output.startswith("file://"):
        path = Path(output[len("file://"):])
    else:
        path = Path(output)
    if path.exists() and not force:
        _fail(f"{path} already exists: pass --force to overwrite it, or -o with another path")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # The join token may be in the file: readable by its owner only.
        path.touch(mode=0o600, exist_ok=True)
        path.chmod(0o600)
        path.write_text(HEADER.format(path=path) + body)
    except OSError as exc:
        _fail(f"cannot write {path}: {exc.strerror} (run as root for /etc, or use -o with another path)")
    region_text = "all regions" if regions == ["*"] else ", ".join(regions)
    out_console.print(f"Wrote the config to {path}: Azure Cache for Redis discovery in {region_text}, "
                      f"and the database proxy.\nStart it with: cachegate start -c {path}"
                      + ("" if ca_pin else " --ca-pin=<pin from `cgctl tokens add`>"), markup=False)


@app.command("azure-role")
def azure_role(
    subscription: str = typer.Option(..., "--subscription", help="Subscription id the role may be assigned in."),
    service: str = typer.Option("all", "--service", help="all (the guide's role), discovery (read only) or dbproxy (listKeys only)."),
    resource_group: str = typer.Option("", "--resource-group", help="Limit assignable scopes to this resource group."),
    role_name: str = typer.Option("", "--role-name", help="Role name (default by service)."),
):
    """Print the Azure custom role definition (JSON) the services need."""
    from services.discovery.azure_role import role_definition_json

    try:
        text = role_definition_json(subscription, service, resource_group=resource_group or None,
                                    role_name=role_name or None)
    except ValueError as exc:
        _fail(str(exc))
    sys.stdout.write(text + "\n")
    if service in ("all", "dbproxy"):
        from services.discovery.azure_role import entra_access_instructions

        # After the JSON, on stderr, so that `... > role.json` keeps a file Azure accepts.
        sys.stderr.write("\n" + entra_access_instructions(subscription, resource_group or None))
