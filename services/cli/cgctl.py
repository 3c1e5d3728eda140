"""cgctl: the administrator's tool (tokens, status; users, roles, locks, audit)."""

from __future__ import annotations

import datetime as dt
from typing import Optional

import grpc
import typer

from cachegate.auth.v1 import cluster_service_pb2, token_service_pb2
from services.cli.admin_conn import resolve
from services.cli.common import CLIError, Format, emit, err_console, fail, grpc_message, out_console, run, table
from services.common import identity as idmod
from services.common.authclient import AuthClient
from services.common.config import format_duration, parse_duration
from services.common.grpcutil import dur, from_ts

app = typer.Typer(help="Administer a Cachegate cluster.", no_args_is_help=True, add_completion=False,
                  pretty_exceptions_enable=False)
tokens_app = typer.Typer(help="Join tokens for new service hosts.", no_args_is_help=True)
app.add_typer(tokens_app, name="tokens")

_opts: dict = {}


@app.callback()
def main_options(
    auth_server: Optional[str] = typer.Option(None, "--auth-server", help="host:port of the auth service (mesh port)."),
    identity: Optional[str] = typer.Option(None, "--identity", "-i", help="Identity file (certificate, key, CA)."),
    config: Optional[str] = typer.Option(None, "--config", "-c", help="A cachegate.yaml with an auth_service section."),
):
    _opts.update(auth_server=auth_server, identity=identity, config=config)


def connect() -> AuthClient:
    conn = resolve(_opts.get("auth_server"), _opts.get("identity"), _opts.get("config"))
    return AuthClient(conn.auth_server, conn.creds)


async def call(client: AuthClient, method, request, what: str = "auth service"):
    try:
        return await method(request, timeout=15)
    except grpc.aio.AioRpcError as exc:
        raise CLIError(grpc_message(exc, client.addr, what)) from None


def when(t) -> str:
    v = from_ts(t)
    return dt.datetime.fromtimestamp(v, dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC") if v else "never"


@app.command()
@run
async def status(fmt: Format = typer.Option(Format.text, "--format", help="text, json or yaml.")):
    """Cluster name, version and CA pin."""
    async with connect() as c:
        info = await call(c, c.cluster.GetClusterInfo, cluster_service_pb2.GetClusterInfoRequest())
    data = {"cluster": info.cluster_name, "version": info.server_version, "ca_pin": info.ca_pin}
    emit(data, fmt, lambda: out_console.print(
        f"Cluster  {info.cluster_name}\nVersion  {info.server_version}\nCA pin   {info.ca_pin}", markup=False))


@tokens_app.command("add")
@run
async def tokens_add(
    type_: str = typer.Option(..., "--type", help="db (discovery and dbproxy), discovery or proxy."),
    ttl: str = typer.Option("30m", "--ttl", help="How long the token is valid (e.g. 30m, 2h)."),
    reusable: bool = typer.Option(False, "--reusable", help="Allow several hosts to join until it expires."),
    fmt: Format = typer.Option(Format.text, "--format", help="text (the token alone), json or yaml."),
):
    """Create a join token. Text output is the token alone (`> /tmp/token`); the CA pin goes to stderr."""
    roles = []
    for t in type_.split(","):
        if t.strip() not in idmod.TOKEN_TYPES:
            fail(f"unknown token type {t!r}: use --type=db, discovery or proxy")
        roles += idmod.TOKEN_TYPES[t.strip()]
    try:
        seconds = parse_duration(ttl)
    except ValueError as exc:
        fail(f"--ttl: {exc}")
    async with connect() as c:
        resp = await call(c, c.tokens.CreateToken, token_service_pb2.CreateTokenRequest(
            roles=sorted(set(roles)), ttl=dur(seconds), reusable=reusable))
    data = {"token": resp.token, "id": resp.info.id, "ca_pin": resp.ca_pin,
            "roles": [idmod.role_name(r) for r in resp.info.roles], "expires": when(resp.info.expire_time),
            "single_use": resp.info.single_use}

    def text():
        print(resp.token)
        err_console.print(f"The token expires in {format_duration(seconds)} ({data['expires']}); "
                          f"{'single use' if resp.info.single_use else 'reusable'}.\n"
                          f"Start the service with --token=<file or token> --ca-pin={resp.ca_pin}", markup=False)

    emit(data, fmt, text)


@tokens_app.command("ls")
@run
async def tokens_ls(fmt: Format = typer.Option(Format.text, "--format")):
    """List join tokens that can still be used (ids only, never the secret)."""
    out, page = [], ""
    async with connect() as c:
        while True:
            resp = await call(c, c.tokens.ListTokens, token_service_pb2.ListTokensRequest(page_token=page))
            out.extend(resp.tokens)
            page = resp.next_page_token
            if not page:
                break
    data = [{"id": t.id, "roles": [idmod.role_name(r) for r in t.roles], "expires": when(t.expire_time),
             "single_use": t.single_use, "created_by": t.created_by} for t in out]
    emit(data, fmt, lambda: table(["Id", "Type", "Expires", "Use", "Created By"], [
        [d["id"], ",".join(d["roles"]), d["expires"], "single" if d["single_use"] else "reusable", d["created_by"]]
        for d in data]))


@tokens_app.command("rm")
@run
async def tokens_rm(token_id: str = typer.Argument(..., help="Token id (from `cgctl tokens ls`) or the token.")):
    """Delete a join token."""
    async with connect() as c:
        await call(c, c.tokens.DeleteToken, token_service_pb2.DeleteTokenRequest(id=token_id))
    out_console.print(f"Token {token_id} has been deleted.", markup=False)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
