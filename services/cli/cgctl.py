"""cgctl: the administrator's tool (tokens, status; users, roles, locks, audit)."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import time
from pathlib import Path
from typing import Optional

import grpc
import typer
import yaml

from cachegate.auth.v1 import (
    audit_service_pb2, cluster_service_pb2, lock_service_pb2, role_service_pb2, token_service_pb2, user_service_pb2,
)
from cachegate.types.v1 import types_pb2
from services.cli.admin_conn import resolve

from services.cli.common import (
    CLIError, Format, dev_dir, duration_flag, emit, err_console, fail, fmt_time, grpc_message, out_console,
    read_json, rpc, run, table,
)
from services.common.config import DEFAULT_AUTH_PORT, split_hostport
from services.common import identity as idmod
from services.common.authclient import AuthClient
from services.common import rbac
from services.common.durations import format_duration, parse_duration
from services.common.grpcutil import dur, from_ts, ts
from services.common.roleproto import role_document, role_to_proto

app = typer.Typer(help="Administer a Cachegate cluster.", no_args_is_help=True, add_completion=False,
                  pretty_exceptions_enable=False)
tokens_app = typer.Typer(help="Join tokens for new service hosts.", no_args_is_help=True)
app.add_typer(tokens_app, name="tokens")
users_app = typer.Typer(help="Users: add, list, update, remove, reset.", no_args_is_help=True)
app.add_typer(users_app, name="users")
audit_app = typer.Typer(help="The audit log.", no_args_is_help=True)
app.add_typer(audit_app, name="audit")
sessions_app = typer.Typer(help="Live database sessions on a dbproxy.", no_args_is_help=True)
app.add_typer(sessions_app, name="sessions")

_opts: dict = {}


@app.callback()
def main_options(
    auth_server: Optional[str] = typer.Option(None, "--auth-server", help="host:port of the auth service (mesh port); several: a:3025,b:3025."),
    identity: Optional[str] = typer.Option(None, "--identity", "-i", help="Identity file (certificate, key, CA)."),
    config: Optional[str] = typer.Option(None, "--config", "-c", help="A cachegate.yaml with an auth_service section."),
):
    _opts.update(auth_server=auth_server, identity=identity, config=config)


def connect() -> AuthClient:
    conn = resolve(_opts.get("auth_server"), _opts.get("identity"), _opts.get("config"))
    _opts["conn"] = conn
    return AuthClient(conn.auth_server, conn.creds)


async def call(client: AuthClient, method, request, what: str = "auth service"):
    try:
        return await method(request, timeout=15)
    except grpc.aio.AioRpcError as exc:
        if exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNIMPLEMENTED):
            # Another port of the cluster (the proxy's, auth's join port, ...) is named as such.
            from services.cli.portprobe import auth_port_hint

            hint = await asyncio.to_thread(auth_port_hint, *split_hostport(client.addr, DEFAULT_AUTH_PORT))
            if hint:
                raise CLIError(hint) from None
        raise CLIError(grpc_message(exc, client.addr, what)) from None


async def discovery_leaders(c: AuthClient) -> dict[str, str]:
    """The discovery host that reconciles each group (holds its lease): {group: host id}."""
    import grpc

    try:
        resp = await c.cluster.ListLeases(cluster_service_pb2.ListLeasesRequest(page_size=1000), timeout=15)
    except grpc.aio.AioRpcError:  # an older auth without leases
        return {}
    return {x.name.removeprefix("discovery/"): x.holder for x in resp.leases if x.name.startswith("discovery/")}


@app.command()
@run
async def status(fmt: Format = typer.Option(Format.text, "--format", help="text, json or yaml.")):
    """Cluster name, version and CA pin; each discovery fetcher's last success, last error and finds."""
    from cachegate.auth.v1 import database_service_pb2
    from services.cli import cgctl_db

    async with connect() as c:
        info = await call(c, c.cluster.GetClusterInfo, cluster_service_pb2.GetClusterInfoRequest())
        hosts = await list_all(c.databases.ListFetcherStatuses, database_service_pb2.ListFetcherStatusesRequest,
                               "hosts", c)
        leaders = await discovery_leaders(c)
        proxies = await list_all(c.databases.ListProxyStatuses, database_service_pb2.ListProxyStatusesRequest,
                                 "proxies", c)
    now = time.time()
    proxies, proxies_dropped = cgctl_db.live_hosts(proxies, lambda p: from_ts(p.heartbeat_time) or 0.0, now)
    hosts, hosts_dropped = cgctl_db.live_hosts(hosts, cgctl_db.host_seen, now)
    conn = _opts["conn"]
    data = {"cluster": info.cluster_name, "version": info.server_version, "ca_pin": info.ca_pin,
            "auth_server": conn.auth_server, "identity": conn.source, "discovery_leaders": leaders,
            "proxies": cgctl_db.proxy_statuses_to_list(proxies, now),
            "discovery": cgctl_db.fetcher_statuses_to_list(hosts, now)}

    def text():
        lead = ", ".join(f"discovery {h} (group {g})" for g, h in leaders.items()) or "none"
        out_console.print(f"Cluster  {info.cluster_name}\nVersion  {info.server_version}\nCA pin   {info.ca_pin}\n"
                          f"Auth     {conn.auth_server}\nIdentity {conn.source}\nLeader   {lead}\n", markup=False)
        cgctl_db.print_proxy_statuses(proxies, proxies_dropped, now)
        cgctl_db.print_fetcher_statuses(hosts, "text")
        if hosts_dropped:
            out_console.print(f"({hosts_dropped} discovery host(s) not heard from for over 1h are not shown)",
                              markup=False)

    emit(data, fmt, text)


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
    seconds = duration_flag(ttl)
    async with connect() as c:
        resp = await call(c, c.tokens.CreateToken, token_service_pb2.CreateTokenRequest(
            roles=sorted(set(roles)), ttl=dur(seconds), reusable=reusable))
    data = {"token": resp.token, "id": resp.info.id, "ca_pin": resp.ca_pin,
            "roles": [idmod.role_name(r) for r in resp.info.roles], "expires": fmt_time(resp.info.expire_time),
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
    data = [{"id": t.id, "roles": [idmod.role_name(r) for r in t.roles], "expires": fmt_time(t.expire_time),
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


def split_list(value: Optional[str]) -> list[str]:
    return [v.strip() for v in (value or "").split(",") if v.strip()]


async def list_all(method, request_cls, field: str, client: AuthClient, **kw) -> list:
    """Every page of a List RPC."""
    out, page = [], ""
    while True:
        resp = await call(client, method, request_cls(page_token=page, **kw))
        out.extend(getattr(resp, field))
        page = resp.next_page_token
        if not page:
            return out


def proxy_hint() -> str:
    """The proxy address users log in through, when cgctl can know it (dev cluster), else a placeholder."""
    return read_json(dev_dir() / "cluster.json").get("proxy") or "PROXY:3080"


def print_invite(user: str, invite, verb: str) -> None:
    left = max(0.0, (from_ts(invite.expire_time) or 0) - dt.datetime.now(dt.timezone.utc).timestamp())
    out_console.print(
        f'User "{user}" has been {verb} but requires a password. Share this command with the user to set it:\n\n'
        f"cgate login --proxy={proxy_hint()} --invite={invite.token}\n\n"
        f"The invite can be used once and expires in {format_duration(round(left))}.", markup=False)


def user_dict(u: types_pb2.User) -> dict:
    return {"name": u.name, "roles": list(u.roles), "db_users": list(u.db_users), "db_names": list(u.db_names),
            "created": fmt_time(u.create_time), "has_password": u.has_password, "totp": u.totp_enabled}


# --------------------------------------------------------------------------------------------
# users


@users_app.command("add")
@run
async def users_add(
    name: str = typer.Argument(..., help="User name."),
    roles: str = typer.Option("access", "--roles", help="Comma-separated roles (access, editor, auditor, ...)."),
    db_users: Optional[str] = typer.Option(None, "--db-users", help="Redis ACL users this user may connect as."),
    db_names: Optional[str] = typer.Option(None, "--db-names", help="Redis logical databases (0, 1, ...)."),
    fmt: Format = typer.Option(Format.text, "--format"),
):
    """Create a user; prints a one-time invite to set the password."""
    user = types_pb2.User(name=name, roles=split_list(roles), db_users=split_list(db_users),
                          db_names=split_list(db_names))
    async with connect() as c:
        resp = await call(c, c.users.CreateUser, user_service_pb2.CreateUserRequest(user=user))
    data = user_dict(resp.user) | {"invite": resp.invite.token, "invite_expires": fmt_time(resp.invite.expire_time),
                                   "login_command": f"cgate login --proxy={proxy_hint()} --invite={resp.invite.token}"}
    emit(data, fmt, lambda: print_invite(name, resp.invite, "created"))


@users_app.command("ls")
@run
async def users_ls(fmt: Format = typer.Option(Format.text, "--format")):
    """List users and their traits."""
    async with connect() as c:
        users = await list_all(c.users.ListUsers, user_service_pb2.ListUsersRequest, "users", c)
    data = [user_dict(u) for u in users]
    emit(data, fmt, lambda: table(["User", "Roles", "DB Users", "DB Names", "Password"], [
        [d["name"], ",".join(d["roles"]), ",".join(d["db_users"]), ",".join(d["db_names"]),
         ("set" if d["has_password"] else "invited") + (" +totp" if d["totp"] else "")] for d in data]))


@users_app.command("update")
@run
async def users_update(
    name: str = typer.Argument(...),
    roles: Optional[str] = typer.Option(None, "--roles", "--set-roles", help="Replace the roles."),
    db_users: Optional[str] = typer.Option(None, "--db-users", "--set-db-users", help="Replace the db users."),
    db_names: Optional[str] = typer.Option(None, "--db-names", "--set-db-names", help="Replace the db names."),
):
    """Change a user's roles or database traits (live sessions follow within seconds)."""
    mask, user = [], types_pb2.User(name=name)
    for field, value in (("roles", roles), ("db_users", db_users), ("db_names", db_names)):
        if value is not None:
            mask.append(field)
            getattr(user, field).extend(split_list(value))
    if not mask:
        fail("nothing to change: pass --roles, --db-users or --db-names")
    async with connect() as c:
        await call(c, c.users.UpdateUser, user_service_pb2.UpdateUserRequest(user=user, update_mask=mask))
    out_console.print(f'User "{name}" has been updated.', markup=False)


@users_app.command("rm")
@run
async def users_rm(name: str = typer.Argument(...)):
    """Delete a user."""
    async with connect() as c:
        await call(c, c.users.DeleteUser, user_service_pb2.DeleteUserRequest(name=name))
    out_console.print(f'User "{name}" has been deleted.', markup=False)


@users_app.command("reset")
@run
async def users_reset(name: str = typer.Argument(...), fmt: Format = typer.Option(Format.text, "--format")):
    """Clear a user's password and second factor; prints a new one-time invite."""
    async with connect() as c:
        resp = await call(c, c.users.ResetUser, user_service_pb2.ResetUserRequest(name=name))
    emit({"name": name, "invite": resp.invite.token, "invite_expires": fmt_time(resp.invite.expire_time)}, fmt,
         lambda: print_invite(name, resp.invite, "reset"))


# --------------------------------------------------------------------------------------------
# resources: create -f, get, rm


def load_documents(path: str) -> list[dict]:
    try:
        text = Path(path).read_text() if path != "-" else typer.get_text_stream("stdin").read()
    except OSError as exc:
        fail(f"cannot read {path}: {exc.strerror}")
    try:
        docs = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as exc:
        fail(f"{path} is not valid YAML: {getattr(exc, 'problem', exc)}")
    if not docs:
        fail(f"{path} holds no document")
    return docs


@app.command()
@run
async def create(filename: str = typer.Option(..., "-f", "--filename", help="YAML file (- for stdin): role or db.")):
    """Create or replace resources from a YAML file (kind: role, kind: db)."""
    from services.cli import cgctl_db

    docs = load_documents(filename)
    async with connect() as c:
        for doc in docs:
            kind = str(doc.get("kind", "")).lower() if isinstance(doc, dict) else ""
            if kind == "role":
                try:
                    role = rbac.Role.from_dict(doc)
                except rbac.RoleError as exc:
                    fail(f"{filename}: {exc}")
                await call(c, c.roles.UpsertRole, role_service_pb2.UpsertRoleRequest(role=role_to_proto(role)))
                out_console.print(f'role "{role.name}" has been created', markup=False)
            elif cgctl_db.is_db_document(doc):
                try:
                    db = cgctl_db.db_from_yaml(doc, Path(filename).parent)
                except cgctl_db.DbDocumentError as exc:
                    fail(f"{filename}: {exc}")
                from cachegate.auth.v1 import database_service_pb2

                await call(c, c.databases.UpsertDatabase, database_service_pb2.UpsertDatabaseRequest(database=db))
                out_console.print(f'database "{db.name}" has been created', markup=False)
            else:
                fail(f"{filename}: unknown kind {doc.get('kind') if isinstance(doc, dict) else doc!r}: "
                     "cgctl create takes kind: role or kind: db")


def _normalize_kind(kind: str) -> str:
    k = kind.lower().rstrip("s")
    aliases = {"role": "role", "lock": "lock", "db": "db", "database": "db", "user": "user", "token": "token"}
    if k not in aliases:
        fail(f"unknown resource {kind!r}: use roles, locks, dbs or users")
    return aliases[k]


@app.command()
@run
async def get(
    kind: str = typer.Argument(..., help="roles, locks, dbs or users."),
    name: Optional[str] = typer.Argument(None, help="One resource by name."),
    fmt: Format = typer.Option(Format.text, "--format", help="text, yaml or json."),
):
    """Show resources: `cgctl get roles [NAME] --format yaml`."""
    from services.cli import cgctl_db

    k = _normalize_kind(kind)
    async with connect() as c:
        if k == "role":
            if name:
                roles = [(await call(c, c.roles.GetRole, role_service_pb2.GetRoleRequest(name=name))).role]
            else:
                roles = await list_all(c.roles.ListRoles, role_service_pb2.ListRolesRequest, "roles", c)
            docs = [role_document(r) for r in roles]
            if fmt == Format.text:
                table(["Role", "Description", "Built In"],
                      [[r.name, r.description, "yes" if r.builtin else ""] for r in roles])
            else:
                emit(docs[0] if name else docs, fmt, lambda: None)
        elif k == "lock":
            locks = await list_all(c.locks.ListLocks, lock_service_pb2.ListLocksRequest, "locks", c)
            if name:
                locks = [x for x in locks if x.id == name]
                if not locks:
                    fail(f"no lock {name!r}: see `cgctl get locks`")
            data = [lock_dict(x) for x in locks]
            emit(data, fmt, lambda: table(["ID", "Target", "Message", "Expires", "Created By"], [
                [d["id"], d["target"], d["message"], d["expires"], d["created_by"]] for d in data]))
        elif k == "db":
            from cachegate.auth.v1 import database_service_pb2

            if name:
                dbs = [(await call(c, c.databases.GetDatabase,
                                   database_service_pb2.GetDatabaseRequest(name=name))).database]
            else:
                dbs = await list_all(c.databases.ListDatabases, database_service_pb2.ListDatabasesRequest,
                                     "databases", c)
            cgctl_db.print_dbs(dbs, fmt.value)
        elif k == "user":
            if name:
                users = [(await call(c, c.users.GetUser, user_service_pb2.GetUserRequest(name=name))).user]
            else:
                users = await list_all(c.users.ListUsers, user_service_pb2.ListUsersRequest, "users", c)
            data = [user_dict(u) for u in users]
            emit(data, fmt, lambda: table(["User", "Roles", "DB Users", "DB Names"], [
                [d["name"], ",".join(d["roles"]), ",".join(d["db_users"]), ",".join(d["db_names"])] for d in data]))
        else:
            fail("tokens are listed with `cgctl tokens ls`")


@app.command()
@run
async def rm(ref: str = typer.Argument(..., help="KIND/NAME: role/NAME, lock/ID, db/NAME or user/NAME.")):
    """Delete a resource: `cgctl rm role/auditor-lite`, `cgctl rm lock/ID`, `cgctl rm db/NAME`."""
    kind, sep, name = ref.partition("/")
    if not sep or not name:
        fail(f"{ref!r}: use KIND/NAME, e.g. role/dev or lock/<id>")
    k = _normalize_kind(kind)
    async with connect() as c:
        if k == "role":
            await call(c, c.roles.DeleteRole, role_service_pb2.DeleteRoleRequest(name=name))
        elif k == "lock":
            await call(c, c.locks.DeleteLock, lock_service_pb2.DeleteLockRequest(id=name))
        elif k == "db":
            from cachegate.auth.v1 import database_service_pb2

            await call(c, c.databases.DeleteDatabase, database_service_pb2.DeleteDatabaseRequest(name=name))
        elif k == "user":
            await call(c, c.users.DeleteUser, user_service_pb2.DeleteUserRequest(name=name))
        else:
            fail("tokens are removed with `cgctl tokens rm ID`")
    out_console.print(f"{k} {name!r} has been deleted", markup=False)


# --------------------------------------------------------------------------------------------
# locks


def lock_dict(x: types_pb2.Lock) -> dict:
    return {"id": x.id, "target": f"user={x.user}" if x.user else f"role={x.role}", "user": x.user, "role": x.role,
            "message": x.message, "expires": fmt_time(x.expire_time), "created": fmt_time(x.create_time),
            "created_by": x.created_by}


@app.command()
@run
async def lock(
    user: Optional[str] = typer.Option(None, "--user", help="Lock this user."),
    role: Optional[str] = typer.Option(None, "--role", help="Lock every user with this role."),
    ttl: Optional[str] = typer.Option(None, "--ttl", help="Lift the lock after this long (default: never)."),
    message: str = typer.Option("", "--message", help="Shown to the locked user."),
    fmt: Format = typer.Option(Format.text, "--format"),
):
    """Lock a user or a role: no login, no certificates, live sessions end."""
    if bool(user) == bool(role):
        fail("pass exactly one of --user or --role")
    req = lock_service_pb2.CreateLockRequest(user=user or "", role=role or "", message=message)
    if ttl:
        req.ttl.CopyFrom(dur(duration_flag(ttl)))
    async with connect() as c:
        resp = await call(c, c.locks.CreateLock, req)
    d = lock_dict(resp.lock)
    emit(d, fmt, lambda: out_console.print(f"Created a lock with ID {d['id']!r} on {d['target']} "
                                           f"(expires: {d['expires']}).", markup=False))


# --------------------------------------------------------------------------------------------
# audit


def parse_when(value: Optional[str], flag: str) -> Optional[float]:
    """An absolute time (2026-11-25, 2026-11-25T10:00:00Z) or a duration ago (1h, 30m)."""
    if not value:
        return None
    try:
        return dt.datetime.now(dt.timezone.utc).timestamp() - parse_duration(value)
    except ValueError:
        pass
    try:
        t = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        fail(f"{flag}: {value!r} is neither a time (2026-11-25T10:00:00Z) nor a duration ago (1h, 30m)")
    if t.tzinfo is None:
        t = t.replace(tzinfo=dt.timezone.utc)
    return t.timestamp()


def event_dict(e: types_pb2.AuditEvent) -> dict:
    from google.protobuf.json_format import MessageToDict

    return {"id": e.id, "time": fmt_time(e.time), "type": e.type, "code": e.code, "actor": e.actor,
            "source_addr": e.source_addr, "success": e.success, "error": e.error,
            "fields": MessageToDict(e.fields) if e.HasField("fields") else {}}


@audit_app.command("search")
@run
async def audit_search(
    since: Optional[str] = typer.Option(None, "--since", help="From this time, or this long ago (default 24h)."),
    until: Optional[str] = typer.Option(None, "--until", help="Up to this time, or this long ago (default now)."),
    type_: Optional[list[str]] = typer.Option(None, "--type", help="Event types (repeat or comma-separate), "
                                                                    "e.g. user.login; a prefix ending in * matches many."),
    user: Optional[str] = typer.Option(None, "--user", help="Events by or about this user."),
    limit: int = typer.Option(1000, "--limit", min=1, help="At most this many events (a page)."),
    oldest_first: bool = typer.Option(False, "--oldest-first", help="Oldest first (default: newest first)."),
    page_token: Optional[str] = typer.Option(None, "--page-token", help="The next page, as the last search printed."),
    fmt: Format = typer.Option(Format.text, "--format", help="text, json or yaml."),
):
    """Search the audit log, newest first; says how to get the next page when more events match."""
    req = audit_service_pb2.SearchAuditEventsRequest(
        types=[t for v in (type_ or []) for t in split_list(v)], user=user or "",
        page_size=min(limit, 500), newest_first=not oldest_first, page_token=page_token or "")
    start = parse_when(since or "24h", "--since")
    req.since.CopyFrom(ts(start))
    end = parse_when(until, "--until")
    if end:
        req.until.CopyFrom(ts(end))
    events: list = []
    more = ""
    async with connect() as c:
        while True:
            req.page_size = min(limit - len(events), 500)
            resp = await call(c, c.audit.SearchAuditEvents, req)
            events.extend(resp.events)
            more = resp.next_page_token
            if not more or len(events) >= limit:
                break
            req.page_token = more
    data = [event_dict(e) for e in events]
    if more:
        args = [f"--since={since}" if since else "", f"--until={until}" if until else "",
                *(f"--type={t}" for t in req.types), f"--user={user}" if user else "",
                f"--limit={limit}" if limit != 1000 else "", "--oldest-first" if oldest_first else ""]
        err_console.print(f"{len(data)} events shown ({'oldest' if oldest_first else 'newest'} first); more match. "
                          f"Next page: cgctl audit search {' '.join(a for a in args if a)} --page-token={more}".replace(
                              "  ", " "), markup=False)
    elif not data:
        err_console.print("No events match"
                          + (f" between {fmt_time(start)} and {fmt_time(end) if end else 'now'}")
                          + ": widen --since, or check --type and --user.", markup=False)

    def text():
        table(["Time", "Type", "Actor", "Source", "Result", "Details"], [
            [d["time"], d["type"], d["actor"], d["source_addr"], "ok" if d["success"] else f"failed: {d['error']}",
             json.dumps(d["fields"], separators=(",", ":"), sort_keys=True)[:120]] for d in data])

    emit(data, fmt, text)


# --------------------------------------------------------------------------------------------
# sessions (on a dbproxy's API port)


def proxy_api(addr: Optional[str]) -> str:
    import os

    addr = addr or os.environ.get("CACHEGATE_PROXY_API") or read_json(dev_dir() / "cluster.json").get("proxy_api")
    if not addr:
        fail("which dbproxy? pass --proxy-api=HOST:PORT (its api_listen_addr, port 3082 by default)")
    return addr


def sessions_stub(addr: str):
    from cachegate.dbproxy.v1 import proxy_service_pb2_grpc
    from services.common.creds import secure_channel

    conn = resolve(_opts.get("auth_server"), _opts.get("identity"), _opts.get("config"))
    channel = secure_channel(addr, conn.creds.channel_credentials(), "dbproxy")
    return channel, proxy_service_pb2_grpc.SessionServiceStub(channel)


@sessions_app.command("ls")
@run
async def sessions_ls(
    proxy: Optional[str] = typer.Option(None, "--proxy-api", help="dbproxy API address (HOST:3082)."),
    fmt: Format = typer.Option(Format.text, "--format"),
):
    """Live RESP sessions: who, which database, how long, how much."""
    from cachegate.dbproxy.v1 import proxy_service_pb2

    addr = proxy_api(proxy)
    channel, stub = sessions_stub(addr)
    out, page = [], ""
    async with channel:
        while True:
            resp = await rpc(stub.ListSessions, proxy_service_pb2.ListSessionsRequest(page_token=page), addr,
                             "dbproxy", timeout=15)
            out.extend(resp.sessions)
            page = resp.next_page_token
            if not page:
                break
    data = [{"id": s.id, "user": s.user, "database": s.database, "db_user": s.db_user, "db_name": s.db_name,
             "client": s.client_addr, "started": fmt_time(s.start_time), "commands": s.commands,
             "bytes_in": s.bytes_in, "bytes_out": s.bytes_out} for s in out]
    emit(data, fmt, lambda: table(["ID", "User", "Database", "DB User", "DB Name", "Client", "Started", "Commands"], [
        [d["id"], d["user"], d["database"], d["db_user"], d["db_name"], d["client"], d["started"], d["commands"]]
        for d in data]))


@sessions_app.command("kill")
@run
async def sessions_kill(
    session_id: str = typer.Argument(..., help="Session id from `cgctl sessions ls`."),
    proxy: Optional[str] = typer.Option(None, "--proxy-api", help="dbproxy API address (HOST:3082)."),
):
    """End a live session now (the client is told why; the end is audited)."""
    from cachegate.dbproxy.v1 import proxy_service_pb2

    addr = proxy_api(proxy)
    channel, stub = sessions_stub(addr)
    async with channel:
        await rpc(stub.TerminateSession, proxy_service_pb2.TerminateSessionRequest(id=session_id), addr, "dbproxy",
                  timeout=15)
    out_console.print(f"Session {session_id} has been ended.", markup=False)


# --------------------------------------------------------------------------------------------
# db check (from a dbproxy's side)

db_app = typer.Typer(help="Databases as a dbproxy reaches them.", no_args_is_help=True)
app.add_typer(db_app, name="db")


@db_app.command("check")
@run
async def db_check(
    name: str = typer.Argument(..., help="Database name (see `cgctl get dbs`)."),
    proxy: Optional[str] = typer.Option(None, "--proxy-api", help="dbproxy API address (HOST:3082)."),
    fmt: Format = typer.Option(Format.text, "--format"),
):
    """TCP, TLS, AUTH and PING to a database from the proxy's side (the guide's `nc -zv` step)."""
    from cachegate.dbproxy.v1 import proxy_service_pb2
    from services.common.grpcutil import from_dur

    addr = proxy_api(proxy)
    channel, stub = sessions_stub(addr)
    async with channel:
        resp = await rpc(stub.CheckDatabase, proxy_service_pb2.CheckDatabaseRequest(name=name), addr, "dbproxy",
                         timeout=60)
    steps = [{"step": st.name, "ok": st.ok, "ms": round(from_dur(st.duration) * 1000, 1), "detail": st.detail}
             for st in resp.steps]
    data = {"database": resp.name, "address": resp.address, "proxy": addr, "ok": resp.ok, "steps": steps}

    def text():
        out_console.print(f'Checking database "{resp.name}" at {resp.address} from the dbproxy at {addr}',
                          markup=False)
        for st in steps:
            out_console.print(f"  {st['step']:<5} {'ok' if st['ok'] else 'FAILED':<6} {st['ms']:>8.1f} ms  "
                              f"{st['detail']}", markup=False)
        if resp.ok:
            out_console.print(f'Database "{resp.name}" is reachable from the proxy.', markup=False)

    emit(data, fmt, text)
    if not resp.ok:
        failed = next((st for st in steps if not st["ok"]), None)
        err_console.print(f"ERROR: {failed['detail'] if failed else 'the check failed'}", markup=False)
        raise typer.Exit(1)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
