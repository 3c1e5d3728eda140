"""cgate db ... and cgate proxy db --tunnel: the user's side of the RESP data plane.

    cgate db ls [--format text|json|yaml] [-v] [key=value ...]
    cgate db login NAME [--db-user=USER] [--db-name=N]
    cgate db connect NAME [--db-user=USER] [--db-name=N] [-- REDIS-CLI-ARGS...]
    cgate db config NAME [--format text|json|cmd]
    cgate db logout [NAME]
    cgate proxy db --tunnel NAME [--port N] [--db-user=USER] [--db-name=N]

A database certificate is the session certificate's identity plus a route (database, db
user, logical database). It is issued for the profile's own key (a CSR is sent; the key
never leaves this machine) and kept in ``<profile>/db/<NAME>.crt`` with
``<NAME>.json`` beside it (db user, db name); files 0600, folders 0700.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import hashlib
import json
import os
import re
import shlex
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

import grpc
import typer
from cachegate.auth.v1 import user_service_pb2
from cachegate.dbproxy.v1 import proxy_service_pb2, proxy_service_pb2_grpc
from cachegate.types.v1 import types_pb2
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from services.cli.common import (
    CLIError,
    Format,
    duration_flag,
    fmt_time,
    emit,
    err_console,
    fail,
    grpc_message,
    run,
    table,
    terminal_width,
)
from services.cli.profile import Profile, current_profile
from services.common.config import split_hostport
from services.common.creds import internal_name, private_dir, write_private
from services.common.grpcutil import dur
from services.common.pki import cert_from_pem, key_from_pem, make_csr

db_app = typer.Typer(help="List Redis databases, get database certificates, connect.", no_args_is_help=True,
                     add_completion=False, pretty_exceptions_enable=False)
proxy_app = typer.Typer(help="Local proxies for clients that cannot present certificates.", no_args_is_help=True,
                        add_completion=False, pretty_exceptions_enable=False)

__all__ = ["db_app", "proxy_app"]

WILDCARD = "*"
MIN_REDIS_CLI = (6, 2)
REDIS_CLI_HINT = ("redis-cli 6.2 or newer is needed for TLS client certificates: install it "
                  "(Debian/Ubuntu: apt-get install redis-tools; macOS: brew install redis)")
# A database certificate this close to its end is not reused for a new connection.
REUSE_MARGIN = dt.timedelta(seconds=60)
MAX_PAGES = 1000

PROXY_OPT = typer.Option(None, "--proxy", envvar="CACHEGATE_PROXY", help="Use this proxy's profile (default: current).")
DB_USER_OPT = typer.Option(None, "--db-user", help="Database user to connect as (default: the only one your roles "
                                                   "allow, else 'default').")
DB_NAME_OPT = typer.Option(None, "--db-name", help="Logical database number (default: the only one your roles "
                                                   "allow, else 0).")


# --------------------------------------------------------------------------------------------
# Database certificates on disk


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def db_dir(prof: Profile) -> Path:
    return prof.folder / "db"


def _stem(name: str) -> str:
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", name).lstrip(".") or "_"
    if safe != name:  # keep different names apart after the substitution
        safe += "-" + hashlib.sha256(name.encode()).hexdigest()[:8]
    return safe


def _same_key(cert: x509.Certificate, key_pem: bytes) -> bool:
    fmt = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    try:
        return cert.public_key().public_bytes(*fmt) == key_from_pem(key_pem).public_key().public_bytes(*fmt)
    except (ValueError, TypeError):
        return False


@dataclass
class DbLogin:
    """A saved database certificate and its route."""

    name: str
    db_user: str
    db_name: str
    cert_path: Path
    cert: x509.Certificate

    @property
    def expires(self) -> dt.datetime:
        return self.cert.not_valid_after_utc

    def valid(self, margin: dt.timedelta = dt.timedelta(0)) -> bool:
        return self.expires - margin > _now()

    def matches(self, db_user: str | None, db_name: str | None) -> bool:
        return (db_user is None or db_user == self.db_user) and (db_name is None or _norm_name(db_name) == self.db_name)


def _norm_name(db_name: str) -> str:
    db_name = db_name.strip()
    return str(int(db_name)) if db_name.isdigit() else db_name


def load_login(prof: Profile, name: str) -> DbLogin | None:
    """The saved certificate for ``name``, if it is there and fits the profile's current key."""
    stem = db_dir(prof) / _stem(name)
    cert_path, meta_path = stem.with_suffix(".crt"), stem.with_suffix(".json")
    try:
        meta = json.loads(meta_path.read_text())
        cert = cert_from_pem(cert_path.read_bytes())
        key_pem = prof.key_pem
    except (OSError, ValueError):
        return None
    if meta.get("name") != name or not _same_key(cert, key_pem):
        return None  # another database's file, or issued before the last `cgate login` (new key)
    return DbLogin(name, str(meta.get("db_user", "")), str(meta.get("db_name", "")), cert_path, cert)


def save_login(prof: Profile, name: str, db_user: str, db_name: str, cert_pem: bytes) -> DbLogin:
    folder = private_dir(db_dir(prof))
    stem = folder / _stem(name)
    write_private(stem.with_suffix(".crt"), cert_pem)
    write_private(stem.with_suffix(".json"), json.dumps(
        {"name": name, "db_user": db_user, "db_name": db_name}, indent=2).encode())
    return DbLogin(name, db_user, db_name, stem.with_suffix(".crt"), cert_from_pem(cert_pem))


def all_logins(prof: Profile) -> list[DbLogin]:
    folder = db_dir(prof)
    if not folder.is_dir():
        return []
    out = []
    for meta_path in sorted(folder.glob("*.json")):
        try:
            name = json.loads(meta_path.read_text()).get("name")
        except (OSError, ValueError):
            continue
        if isinstance(name, str) and (lg := load_login(prof, name)) is not None:
            out.append(lg)
    return out


def saved_names(prof: Profile) -> list[str]:
    """Names of all saved database logins, valid or not."""
    folder = db_dir(prof)
    names = []
    for meta_path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        try:
            name = json.loads(meta_path.read_text()).get("name")
        except (OSError, ValueError):
            continue
        if isinstance(name, str):
            names.append(name)
    return names


def remove_login(prof: Profile, name: str) -> bool:
    stem = db_dir(prof) / _stem(name)
    found = False
    for p in (stem.with_suffix(".crt"), stem.with_suffix(".json")):
        if p.exists():
            p.unlink()
            found = True
    return found


# --------------------------------------------------------------------------------------------
# Choosing the route: db user and logical database


def fmt_list(values: Iterable[str]) -> str:
    """``[a b]``, the way the reference prints lists."""
    return "[" + " ".join(values) + "]"


def users_cell(allowed: Iterable[str], denied: Iterable[str]) -> str:
    allowed, denied = list(allowed), list(denied)
    text = fmt_list(allowed)
    if allowed and denied:
        text += f", except: {fmt_list(denied)}"
    return text


def _allows(value: str, allowed: list[str], denied: list[str]) -> bool:
    if WILDCARD in denied or value in denied:
        return False
    return WILDCARD in allowed or value in allowed


def choose_db_user(db: str, allowed: list[str], denied: list[str], given: str | None) -> str:
    """``--db-user`` if given; else the only allowed one; else "default" if allowed."""
    if given is not None:
        given = given.strip()
        if not given:
            fail("--db-user is empty: name a database user")
        return given
    concrete = [u for u in allowed if u != WILDCARD and u not in denied]
    if WILDCARD not in allowed and len(concrete) == 1:
        return concrete[0]
    if _allows("default", allowed, denied):
        return "default"
    if not allowed or WILDCARD in denied:
        fail(f'your roles allow no database user on "{db}": ask an administrator '
             "(`cgctl users update --db-users=...`)")
    fail(f'several database users are allowed on "{db}" ({users_cell(allowed, denied)}): '
         "choose one with --db-user")
    raise AssertionError  # unreachable


def choose_db_name(db: str, allowed: list[str], denied: list[str], given: str | None) -> str:
    """``--db-name`` if given; else the only allowed one; else 0 if allowed; "" if none is listed."""
    if given is not None:
        given = given.strip()
        if not given.isdigit():
            fail(f"--db-name {given!r}: Redis logical databases are numbers (0, 1, ...)")
        return str(int(given))
    concrete = [n for n in allowed if n != WILDCARD and n not in denied]
    if WILDCARD not in allowed and len(concrete) == 1:
        return concrete[0]
    if _allows("0", allowed, denied):
        return "0"
    if not allowed:
        return ""  # no db_names rules: the proxy connects to database 0
    fail(f'several logical databases are allowed on "{db}" ({users_cell(allowed, denied)}): '
         "choose one with --db-name")
    raise AssertionError  # unreachable


# --------------------------------------------------------------------------------------------
# Calls to the proxy


class Unimplemented(Exception):
    pass


async def _call(prof: Profile, method, request, timeout: float = 30):
    try:
        return await method(request, timeout=timeout)
    except grpc.aio.AioRpcError as exc:
        if exc.code() == grpc.StatusCode.UNIMPLEMENTED:
            raise Unimplemented(exc.details() or "not implemented") from None
        raise CLIError(grpc_message(exc, prof.meta.get("api_addr") or prof.proxy, "proxy")) from None


async def list_databases(prof: Profile, selector: dict[str, str] | None = None) -> list:
    """Every database the caller's roles allow (AllowedDatabase messages), all pages."""
    out: list = []
    token = ""
    async with prof.api_channel() as ch:
        stub = proxy_service_pb2_grpc.ProxyServiceStub(ch)
        for _ in range(MAX_PAGES):
            req = proxy_service_pb2.ListDatabasesRequest(page_size=500, page_token=token,
                                                         label_selector=selector or {})
            resp = await _call(prof, stub.ListDatabases, req)
            out.extend(resp.databases)
            token = resp.next_page_token
            if not token:
                break
    return out


async def find_database(prof: Profile, name: str):
    """The AllowedDatabase called ``name``; None when the proxy cannot list databases."""
    try:
        dbs = await list_databases(prof)
    except Unimplemented:
        return None
    for a in dbs:
        if a.database.name == name:
            return a
    fail(f'database "{name}" not found, or your roles do not allow it: run `cgate db ls` to see the '
         "databases you can reach")


async def resolve_route(prof: Profile, name: str, db_user: str | None, db_name: str | None) -> tuple[str, str]:
    if db_user is not None and db_name is not None:  # check the flags before any call
        choose_db_user(name, [], [], db_user), choose_db_name(name, [], [], db_name)
    allowed = await find_database(prof, name)  # also: does it exist (auth does not know)
    if allowed is not None:
        users = (list(allowed.allowed_db_users), list(allowed.denied_db_users))
        names = (list(allowed.allowed_db_names), list(allowed.denied_db_names))
    else:  # an older proxy: the session's traits are the best guess, the proxy decides
        ident = prof.identity
        users = (list(ident.db_users) if ident else [], [])
        names = (list(ident.db_names) if ident else [], [])
        if not users[0]:
            users = (["default"], [])
    return choose_db_user(name, *users, db_user), choose_db_name(name, *names, db_name)


async def issue_cert(prof: Profile, name: str, db_user: str, db_name: str,
                     ttl: float = 0.0) -> tuple[bytes, bytes]:
    """A database certificate for the profile's key: (cert PEM, the key PEM it belongs to)."""
    prof.require_session()
    key_pem = prof.key_pem
    ident = prof.identity
    csr = make_csr(key_from_pem(key_pem), ident.name if ident else prof.meta.get("user", "user"))
    req = user_service_pb2.GenerateDatabaseCertRequest(
        csr_pem=csr.decode(),
        route=types_pb2.RouteToDatabase(service_name=name, protocol="redis", db_user=db_user, db_name=db_name))
    if ttl:
        req.ttl.CopyFrom(dur(ttl))
    async with prof.api_channel() as ch:
        stub = proxy_service_pb2_grpc.ProxyServiceStub(ch)
        try:
            resp = await _call(prof, stub.GenerateDatabaseCert, req)
        except Unimplemented as exc:
            fail(f"the proxy at {prof.proxy} cannot issue database certificates ({exc}): upgrade dbproxy")
    return resp.cert_pem.encode(), key_pem


async def obtain_login(prof: Profile, name: str, db_user: str | None, db_name: str | None,
                       ttl: float = 0.0) -> DbLogin:
    user, dbn = await resolve_route(prof, name, db_user, db_name)
    cert_pem, _ = await issue_cert(prof, name, user, dbn, ttl)
    if not _same_key(cert_from_pem(cert_pem), prof.key_pem):
        fail("you logged in again while the certificate was being issued: run the command again")
    return save_login(prof, name, user, dbn, cert_pem)


def redis_endpoint(prof: Profile) -> tuple[str, int]:
    addr = prof.meta.get("redis_addr")
    if not addr:
        fail(f"the profile for {prof.proxy} does not know the proxy's Redis address: "
             f"log in again with `{prof.login_hint()}`")
    try:
        return split_hostport(addr, 3081)
    except ValueError as exc:
        fail(f"bad Redis address {addr!r} in the profile ({exc}): log in again with `{prof.login_hint()}`")
    raise AssertionError  # unreachable


def _parse_labels(args: list[str] | None) -> dict[str, str]:
    out: dict[str, str] = {}
    for arg in args or []:
        for part in arg.split(","):
            part = part.strip()
            if not part:
                continue
            k, sep, v = part.partition("=")
            if not sep or not k.strip():
                fail(f"label filter {part!r}: write key=value (e.g. env=prod)")
            out[k.strip()] = v.strip()
    return out


# --------------------------------------------------------------------------------------------
# db ls


def db_type(db) -> str:
    kind = db.azure.kind if db.HasField("azure") else ""
    if kind == "redis":
        return "Azure Cache for Redis"
    if kind == "redis-enterprise":
        return "Azure Redis Enterprise"
    if kind:
        return f"Azure {kind}"
    return "self-hosted"


def labels_cell(labels) -> str:
    return ",".join(f"{k}={labels[k]}" for k in sorted(labels))


def connect_cmd(name: str) -> str:
    return f"cgate db connect {shlex.quote(name)}"


def health_cell(h) -> str:
    """How the proxy last found the database: ok, unknown (not tried yet) or down (why, since)."""
    if h is None or not h.state:
        return "unknown"
    if h.state == 1:
        return "ok"
    return f"down ({h.last_error_kind or 'error'} since {fmt_time(h.last_failure_time)})"


def db_record(a, active: DbLogin | None) -> dict[str, Any]:
    db = a.database
    return {
        "name": db.name, "description": db.description, "protocol": db.protocol or "redis", "type": db_type(db),
        "uri": db.uri, "labels": dict(sorted(db.labels.items())),
        "allowed_users": list(a.allowed_db_users), "denied_users": list(a.denied_db_users),
        "allowed_db_names": list(a.allowed_db_names), "denied_db_names": list(a.denied_db_names),
        "connect": connect_cmd(db.name),
        "health": health_cell(a.health if a.HasField("health") else None),
        "logged_in": None if active is None else {
            "db_user": active.db_user, "db_name": active.db_name, "expires": fmt_time(active.expires)},
    }


def db_auth(db) -> str:
    """How the proxy signs in to the database for you: entra (Entra ID), access_key or -."""
    a = db.azure if db.HasField("azure") else None
    auth = (a.auth if a is not None else "") or db.labels.get("auth", "")
    if not auth and a is not None and a.resource_id:
        auth = "entra" if a.access_key_auth_disabled else "access_key"
    return auth or "-"


def db_table(dbs: list, verbose: bool, active: dict[str, DbLogin]) -> tuple[list[str], list[list[str]]]:
    """Columns and rows of `cgate db ls`; logged-in databases are marked with ``>``."""
    cols = ["Name", "Description"]
    if verbose:
        cols += ["Protocol", "Type", "Auth", "URI", "Health"]
    cols += ["Allowed Users", "Labels", "Connect"]
    rows = []
    for a in sorted(dbs, key=lambda a: a.database.name):
        db = a.database
        row = [("> " if db.name in active else "") + db.name, db.description]
        if verbose:
            row += [db.protocol or "redis", db_type(db), db_auth(db), db.uri,
                    health_cell(a.health if a.HasField("health") else None)]
        row += [users_cell(a.allowed_db_users, a.denied_db_users), labels_cell(db.labels), connect_cmd(db.name)]
        rows.append(row)
    return cols, rows


@db_app.command("ls")
@run
async def db_ls(
    labels: list[str] | None = typer.Argument(None, metavar="[KEY=VALUE]...", help="Only databases with these labels."),
    fmt: Format = typer.Option(Format.text, "--format", help="text, json or yaml."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Also show protocol, type, auth, URI and health (as the proxy last found it), and whole labels."),
    proxy: str | None = PROXY_OPT,
):
    """The databases your roles allow, with the database users you may connect as."""
    selector = _parse_labels(labels)
    prof = current_profile(proxy).require_session()
    try:
        dbs = await list_databases(prof, selector)
    except Unimplemented:
        fail(f"the proxy at {prof.proxy} cannot list databases yet (server v{prof.meta.get('server_version', '?')}): "
             "upgrade dbproxy")
    # The proxy filters; so does this (an older proxy may ignore the selector).
    dbs = [a for a in dbs if all(a.database.labels.get(k) == v for k, v in selector.items())]
    active = {lg.name: lg for lg in all_logins(prof) if lg.valid()}
    data = [db_record(a, active.get(a.database.name)) for a in sorted(dbs, key=lambda a: a.database.name)]

    def text():
        # As the reference: Labels cut to the terminal's width (whole with -v or --format).
        table(*db_table(dbs, verbose, active), truncate=None if verbose else "Labels",
              width=None if verbose else terminal_width())

    emit(data, fmt, text)


# --------------------------------------------------------------------------------------------
# db login / logout / config


@db_app.command("login")
@run
async def db_login(
    name: str = typer.Argument(..., help="Database name (see `cgate db ls`)."),
    db_user: str | None = DB_USER_OPT,
    db_name: str | None = DB_NAME_OPT,
    ttl: str | None = typer.Option(None, "--ttl", help="Certificate lifetime, e.g. 1h (at most your session's)."),
    proxy: str | None = PROXY_OPT,
):
    """Get a certificate for a database (saved in your profile)."""
    seconds = duration_flag(ttl)
    prof = current_profile(proxy).require_session()
    lg = await obtain_login(prof, name, db_user, db_name, seconds)
    q = shlex.quote(name)
    sys.stdout.write(
        f'Connection information for database "{name}" has been saved '
        f"(db user {lg.db_user}{', logical database ' + lg.db_name if lg.db_name else ''}, "
        f"valid until {fmt_time(lg.expires)}).\n\n"
        "You can now connect to it using the following command:\n\n"
        f"  cgate db connect {q}\n\n"
        "Or view the connect command for the native database CLI client:\n\n"
        f"  cgate db config --format=cmd {q}\n\n")


@db_app.command("logout")
@run
async def db_logout(
    name: str | None = typer.Argument(None, help="Database to log out of (default: all)."),
    proxy: str | None = PROXY_OPT,
):
    """Remove database certificates from your profile."""
    prof = current_profile(proxy)
    names = [name] if name else saved_names(prof)
    if name and name not in saved_names(prof):
        fail(f'not logged in to database "{name}"')
    if not names:
        sys.stdout.write("You are not logged in to any database.\n")
        return
    for n in names:
        remove_login(prof, n)
        sys.stdout.write(f'Logged out of database "{n}".\n')


class CfgFormat(str, Enum):
    text = "text"
    json = "json"
    cmd = "cmd"


def config_data(prof: Profile, lg: DbLogin) -> dict[str, Any]:
    host, port = redis_endpoint(prof)
    return {
        "name": lg.name, "host": host, "port": port, "db_user": lg.db_user, "db_name": lg.db_name,
        "ca": str(prof.folder / "cas.pem"), "cert": str(lg.cert_path), "key": str(prof.folder / "key.pem"),
        "expires": fmt_time(lg.expires),
    }


def redis_cli_args(cfg: dict[str, Any], program: str = "redis-cli") -> list[str]:
    args = [program, "-h", cfg["host"], "-p", str(cfg["port"]), "--tls", "--cacert", cfg["ca"],
            "--cert", cfg["cert"], "--key", cfg["key"]]
    if cfg["db_name"]:
        args += ["-n", cfg["db_name"]]
    return args


@db_app.command("config")
@run
async def db_config(
    name: str = typer.Argument(..., help="Database name."),
    fmt: CfgFormat = typer.Option(CfgFormat.text, "--format", help="text, json or cmd (a redis-cli command)."),
    proxy: str | None = PROXY_OPT,
):
    """Where to connect and which certificate files to use, for applications."""
    prof = current_profile(proxy)
    lg = load_login(prof, name)
    if lg is None:
        fail(f'not logged in to database "{name}": run `cgate db login {shlex.quote(name)}` first')
    if not lg.valid():
        fail(f'the certificate for database "{name}" expired at {fmt_time(lg.expires)}: '
             f"run `cgate db login {shlex.quote(name)}` again")
    cfg = config_data(prof, lg)
    if fmt == CfgFormat.json:
        sys.stdout.write(json.dumps(cfg, indent=2) + "\n")
    elif fmt == CfgFormat.cmd:
        sys.stdout.write(shlex.join(redis_cli_args(cfg)) + "\n")
    else:
        rows = [("Name", cfg["name"]), ("Host", cfg["host"]), ("Port", cfg["port"]), ("User", cfg["db_user"]),
                ("Database", cfg["db_name"] or "0"), ("CA", cfg["ca"]), ("Cert", cfg["cert"]), ("Key", cfg["key"]),
                ("Expires", cfg["expires"])]
        sys.stdout.write("".join(f"{k + ':':<10} {v}\n" for k, v in rows))


# --------------------------------------------------------------------------------------------
# db connect


def parse_redis_cli_version(text: str) -> tuple[int, ...] | None:
    m = re.search(r"redis-cli\s+v?(\d+)\.(\d+)(?:\.(\d+))?", text or "")
    if not m:
        return None
    return tuple(int(x) for x in m.groups() if x is not None)


def check_redis_cli() -> str:
    """Path of a redis-cli that can present TLS client certificates, or a clear error."""
    path = shutil.which("redis-cli")
    if not path:
        fail(f"redis-cli was not found on PATH; {REDIS_CLI_HINT}")
    try:
        res = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=15,
                             stdin=subprocess.DEVNULL, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        fail(f"cannot run {path} ({exc}); {REDIS_CLI_HINT}")
    out = (res.stdout + res.stderr).strip()
    version = parse_redis_cli_version(out)
    if version is None:
        fail(f"cannot tell the version of {path} (`redis-cli --version` printed {out[:80]!r}); {REDIS_CLI_HINT}")
    if version[:2] < MIN_REDIS_CLI:
        fail(f"{path} is redis-cli {'.'.join(map(str, version))}; {REDIS_CLI_HINT}")
    return path


@db_app.command("connect", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def db_connect(
    ctx: typer.Context,
    name: str = typer.Argument(..., help="Database name (see `cgate db ls`)."),
    db_user: str | None = DB_USER_OPT,
    db_name: str | None = DB_NAME_OPT,
    proxy: str | None = PROXY_OPT,
):
    """Open redis-cli on a database (no AUTH needed). Arguments after `--` go to redis-cli."""
    extra = list(ctx.args)
    argv = _prepare_connect(name, db_user, db_name, proxy, extra)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(argv[0], argv)


@run
async def _prepare_connect(name: str, db_user: str | None, db_name: str | None, proxy: str | None,
                           extra: list[str]) -> list[str]:
    program = check_redis_cli()
    prof = current_profile(proxy).require_session()
    lg = load_login(prof, name)
    if lg is None or not lg.valid(REUSE_MARGIN) or not lg.matches(db_user, db_name):
        lg = await obtain_login(prof, name, db_user, db_name)
    return redis_cli_args(config_data(prof, lg), program) + extra


# --------------------------------------------------------------------------------------------
# proxy db --tunnel


_QUIT = b"*1\r\n$4\r\nQUIT\r\n"
_QUIT_OK = b"+OK\r\n"


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop]:
    try:
        import uvloop

        return uvloop.new_event_loop
    except ImportError:  # pragma: no cover (uvloop is a dependency on POSIX)
        return asyncio.new_event_loop


def _run_fast(coro) -> None:
    """Like common.run, on uvloop when it is there."""
    try:
        with asyncio.Runner(loop_factory=_loop_factory()) as runner:
            runner.run(coro)
    except CLIError as exc:
        err_console.print(f"ERROR: {exc}", markup=False)
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        raise typer.Exit(130) from None


def _say(msg: str) -> None:
    err_console.print(msg, markup=False)


class Tunnel:
    """127.0.0.1:PORT (plaintext) -> dbproxy's RESP listener (TLS with a database certificate).

    The certificate is renewed at 2/3 of its life; new connections use the newest one.

    Closes pass through at once. When the database side closes, the local connection
    closes. When the local client closes (or half-closes) its side, TLS cannot carry a
    half-close, so the tunnel sends the proxy QUIT: the proxy delivers the replies of the
    commands already sent, answers the QUIT and ends the session, and the tunnel passes
    everything but that last +OK on. A client that closes ends its proxy session within
    a round trip, not after a grace period.
    """

    PIPE_CHUNK = 256 * 1024
    CONNECT_TIMEOUT = 15.0
    QUIT_GRACE = 5.0  # the most the proxy may take to deliver what was pending

    def __init__(self, prof: Profile, name: str, db_user: str, db_name: str, *, max_conns: int = 512,
                 ttl: float = 0.0) -> None:
        self.prof = prof
        self.name = name
        self.db_user = db_user
        self.db_name = db_name
        self.max_conns = max_conns
        self.ttl = ttl
        self.host, self.port = redis_endpoint(prof)
        self.ssl: ssl.SSLContext | None = None
        self.expires: dt.datetime | None = None
        self.issued: dt.datetime | None = None
        self.server: asyncio.base_events.Server | None = None
        self.conns: set[asyncio.Task] = set()
        self.renewer: asyncio.Task | None = None
        self.renewals = 0
        self._warned = 0.0

    # --- certificate ---------------------------------------------------------------------
    async def renew(self) -> None:
        cert_pem, key_pem = await issue_cert(self.prof, self.name, self.db_user, self.db_name, self.ttl)
        cert = cert_from_pem(cert_pem)
        self.ssl = self._context(cert_pem, key_pem)
        self.issued, self.expires = _now(), cert.not_valid_after_utc
        self.renewals += 1

    def _context(self, cert_pem: bytes, key_pem: bytes) -> ssl.SSLContext:
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cadata=self.prof.host_ca_pem.decode())
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        folder = private_dir(db_dir(self.prof))
        fd, path = tempfile.mkstemp(prefix=".tunnel-", suffix=".pem", dir=folder)  # 0600
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(cert_pem + key_pem)
            ctx.load_cert_chain(path)
        finally:
            os.unlink(path)
        return ctx

    def next_renewal(self) -> float:
        """Seconds until 2/3 of the certificate's life."""
        assert self.issued and self.expires
        life = (self.expires - self.issued).total_seconds()
        at = self.issued + dt.timedelta(seconds=life * 2 / 3)
        return max((at - _now()).total_seconds(), 1.0)

    async def _renew_loop(self) -> None:
        delay = self.next_renewal()
        while True:
            await asyncio.sleep(delay)
            try:
                await self.renew()
                _say(f"Renewed the certificate for database \"{self.name}\" (valid until {fmt_time(self.expires)}).")
                delay = self.next_renewal()
            except CLIError as exc:
                left = (self.expires - _now()).total_seconds() if self.expires else 0
                _say(f"WARNING: cannot renew the certificate for database \"{self.name}\": {exc}"
                     + ("" if left > 0 else "; new connections fail until this works"))
                delay = min(30.0, max(left / 4, 2.0)) if left > 0 else 30.0

    # --- connections ---------------------------------------------------------------------
    async def start(self, port: int) -> int:
        try:
            self.server = await asyncio.start_server(self._accept, "127.0.0.1", port, limit=self.PIPE_CHUNK)
        except OSError as exc:
            fail(f"cannot listen on 127.0.0.1:{port}: {exc.strerror or exc}; choose another --port")
        self.renewer = asyncio.create_task(self._renew_loop())
        return self.server.sockets[0].getsockname()[1]

    def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if len(self.conns) >= self.max_conns:
            writer.write(b"-ERR cachegate tunnel: too many connections\r\n")
            writer.close()
            return
        task = asyncio.create_task(self._serve(reader, writer))
        self.conns.add(task)
        task.add_done_callback(self.conns.discard)

    def _warn(self, msg: str) -> None:
        now = time.monotonic()
        if now - self._warned > 5:  # a failing upstream would otherwise flood the terminal
            self._warned = now
            _say(f"WARNING: {msg}")

    async def _serve(self, lreader: asyncio.StreamReader, lwriter: asyncio.StreamWriter) -> None:
        uwriter = None
        try:
            ctx = self.ssl
            if ctx is None or (self.expires and self.expires <= _now()):
                msg = (f"the certificate for database \"{self.name}\" expired; log in again with "
                       f"`{self.prof.login_hint()}`")
                self._warn(msg)
                lwriter.write(f"-ERR cachegate tunnel: {msg}\r\n".encode())
                await lwriter.drain()
                return
            try:
                ureader, uwriter = await asyncio.wait_for(asyncio.open_connection(
                    self.host, self.port, ssl=ctx, server_hostname=internal_name("dbproxy"),
                    ssl_handshake_timeout=self.CONNECT_TIMEOUT, limit=self.PIPE_CHUNK), self.CONNECT_TIMEOUT)
            except (TimeoutError, OSError, ssl.SSLError) as exc:
                msg = f"cannot reach the proxy at {self.host}:{self.port}: {str(exc) or type(exc).__name__}"
                self._warn(msg)
                lwriter.write(f"-ERR cachegate tunnel: {msg}\r\n".encode())
                await lwriter.drain()
                return
            quitting = asyncio.Event()
            up = asyncio.create_task(self._pump_up(lreader, uwriter, quitting))
            down = asyncio.create_task(self._pump_down(ureader, lwriter, quitting))
            try:
                done, _ = await asyncio.wait({up, down}, return_when=asyncio.FIRST_COMPLETED)
                if up in done and down not in done and quitting.is_set():
                    # The client closed: the proxy ends the session after the pending replies.
                    await asyncio.wait({down}, timeout=self.QUIT_GRACE)
            finally:
                for t in (up, down):
                    t.cancel()
                await asyncio.gather(up, down, return_exceptions=True)
        except (ConnectionError, OSError):
            pass
        finally:
            for w in (uwriter, lwriter):
                if w is not None:
                    w.close()
            for w in (uwriter, lwriter):
                if w is not None:
                    # Closing anyway: a reset peer or a second cancel changes nothing here.
                    with contextlib.suppress(Exception, asyncio.CancelledError):
                        await asyncio.wait_for(w.wait_closed(), 2)

    async def _pump_up(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                       quitting: asyncio.Event) -> None:
        """Local client -> proxy; at the client's EOF, QUIT (see the class doc)."""
        try:
            while True:
                data = await reader.read(self.PIPE_CHUNK)
                if not data:
                    quitting.set()
                    writer.write(_QUIT)
                    await writer.drain()
                    return
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError, ssl.SSLError):
            return

    async def _pump_down(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                         quitting: asyncio.Event) -> None:
        """Proxy -> local client. Once QUIT was sent the last bytes are held back, so that
        its +OK, which ends the stream, is not passed on."""
        held = b""
        try:
            while True:
                data = await reader.read(self.PIPE_CHUNK)
                if not data:
                    if held and held != _QUIT_OK:
                        writer.write(held)
                    return
                if quitting.is_set():
                    data = held + data
                    held, data = data[-len(_QUIT_OK):], data[:-len(_QUIT_OK)]
                if data:
                    writer.write(data)
                    await writer.drain()
        except (ConnectionError, OSError, ssl.SSLError):
            return

    async def close(self, timeout: float = 5.0) -> None:
        if self.server is not None:
            self.server.close()
        if self.renewer is not None:
            self.renewer.cancel()
            await asyncio.gather(self.renewer, return_exceptions=True)
        tasks = list(self.conns)
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=timeout)
        if self.server is not None:
            try:
                await asyncio.wait_for(self.server.wait_closed(), timeout)
            except TimeoutError:
                pass


@proxy_app.command("db")
def proxy_db(
    name: str = typer.Argument(..., help="Database name (see `cgate db ls`)."),
    tunnel: bool = typer.Option(False, "--tunnel", help="Authenticate to the proxy here, so that clients need no "
                                                        "certificate (plaintext on 127.0.0.1 only)."),
    port: int = typer.Option(0, "--port", "-p", help="Local port (0: a free one)."),
    db_user: str | None = DB_USER_OPT,
    db_name: str | None = DB_NAME_OPT,
    proxy: str | None = PROXY_OPT,
):
    """Open a local authenticated tunnel to a database, for clients that cannot present certificates."""
    _run_fast(_tunnel_main(name, tunnel, port, db_user, db_name, proxy))


async def _tunnel_main(name: str, tunnel: bool, port: int, db_user: str | None, db_name: str | None,
                       proxy: str | None) -> None:
    if not tunnel:
        fail("only --tunnel is supported: clients that can present certificates connect to the proxy directly "
             f"(see `cgate db config {shlex.quote(name)}`)")
    if not 0 <= port <= 65535:
        fail(f"--port {port}: choose a port from 1 to 65535 (or 0 for a free one)")
    prof = current_profile(proxy).require_session()
    user, dbn = await resolve_route(prof, name, db_user, db_name)
    t = Tunnel(prof, name, user, dbn)
    await t.renew()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    bound = await t.start(port)
    cluster = prof.meta.get("cluster") or prof.proxy
    route = f"db user {user}" + (f", logical database {dbn}" if dbn else "")
    lines = [(f'Started authenticated tunnel for the Redis database "{name}" in cluster "{cluster}" '
              f"on 127.0.0.1:{bound} ({route}; certificate valid until {fmt_time(t.expires)}, "
              "renewed automatically).")]
    if port == 0:
        lines.append("To avoid port randomization, you can choose the listening port using the --port flag.")
    lines += ["", ("Use the following command to connect to the database or to the address above using other "
                   "database GUI client:"), f"  $ redis-cli -p {bound}", ""]
    sys.stdout.write("\n".join(lines) + "\n")
    sys.stdout.flush()
    try:
        await stop.wait()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        _say("Stopping the tunnel.")
        await t.close(5.0)
