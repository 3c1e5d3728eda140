"""The database registry (auth side): records published by discovery and created by admins.

Records are stored in the backend under ``databases/NAME`` as serialized
``types.v1.Database``; fetcher statuses reported by discovery hosts under
``fetcher_status/HOST_ID``. Who may write what:

- an administrator creates and replaces *dynamic* records (origin DYNAMIC) and may delete
  any record (a discovered one comes back on the next discovery round if it still exists);
- a discovery host creates, replaces and deletes records of origin DISCOVERY or CONFIG,
  never an administrator's.

``WatchDatabases`` sends every current record, then INIT_DONE, then each change.
"""

from __future__ import annotations

import logging
import re
import time

import grpc

from cachegate.auth.v1 import database_service_pb2, database_service_pb2_grpc
from cachegate.types.v1 import types_pb2
from services.auth.watch import Subscription, WatchOverflow
from services.common import authz
from services.common.config import split_hostport
from services.common.grpcutil import decode_page_token, encode_page_token, page_size, paginate, ts

log = logging.getLogger("cachegate.auth.databases")

PREFIX = "databases/"
STATUS_PREFIX = "fetcher_status/"
PROXY_STATUS_PREFIX = "proxy_status/"
# A host that stopped reporting is forgotten after this long (cgctl status marks it stale
# well before: after three of its report intervals).
STATUS_TTL = 7 * 86400.0
PROXY_STATUS_TTL = 86400.0
MAX_PROXY_DATABASES = 10_000
NAME_RE = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9._-]{0,251}[A-Za-z0-9])?$")
# Secrets an administrator's record may point at: only variables meant for it, so that an
# admin record cannot make dbproxy send another secret of its host to a chosen address.
DYNAMIC_SECRET_ENV = "CACHEGATE_DB_"
MAX_LABELS = 128
ORIGIN_NAMES = {
    types_pb2.DATABASE_ORIGIN_CONFIG: "config",
    types_pb2.DATABASE_ORIGIN_DYNAMIC: "dynamic",
    types_pb2.DATABASE_ORIGIN_DISCOVERY: "discovery",
}


class InvalidDatabase(ValueError):
    """A record that cannot be stored; the message says what to fix."""


def validate(db: types_pb2.Database) -> None:
    if not db.name:
        raise InvalidDatabase("a database needs a name")
    if not NAME_RE.match(db.name):
        raise InvalidDatabase(f"invalid database name {db.name!r}: use letters, digits, '-', '_' and '.', "
                              "starting and ending with a letter or digit")
    if not db.uri:
        raise InvalidDatabase(f"database {db.name}: uri is required (host:port)")
    try:
        host, port = split_hostport(db.uri, 0)
    except ValueError:
        host, port = "", 0
    if not host or not 0 < port < 65536:
        raise InvalidDatabase(f"database {db.name}: uri {db.uri!r} must be host:port")
    if db.protocol and db.protocol != "redis":
        raise InvalidDatabase(f"database {db.name}: protocol {db.protocol!r} is not supported (use redis)")
    if len(db.labels) > MAX_LABELS:
        raise InvalidDatabase(f"database {db.name}: at most {MAX_LABELS} labels")
    for k in db.labels:
        if not k or len(k) > 256:
            raise InvalidDatabase(f"database {db.name}: label names must be 1 to 256 characters")
    if db.secret_ref and not (db.secret_ref.startswith("env:") or db.secret_ref.startswith("file:")):
        raise InvalidDatabase(f"database {db.name}: secret must be env:NAME or file:/path, not the secret itself")


def origin_name(origin: int) -> str:
    return ORIGIN_NAMES.get(origin, "unspecified")


class DatabaseServicer(database_service_pb2_grpc.DatabaseServiceServicer):
    def __init__(self, state):
        self.state = state

    @property
    def backend(self):
        return self.state.backend

    @property
    def audit(self):
        return self.state.audit

    # --- storage ------------------------------------------------------------------------
    async def _get(self, name: str) -> tuple[types_pb2.Database | None, bytes | None]:
        item = await self.backend.get(PREFIX + name)
        if item is None:
            return None, None
        db = types_pb2.Database()
        db.ParseFromString(item.value)
        return db, item.value

    async def _all(self) -> list[types_pb2.Database]:
        out = []
        for item in await self.backend.list(PREFIX):
            db = types_pb2.Database()
            try:
                db.ParseFromString(item.value)
            except Exception:  # noqa: BLE001 - a damaged record must not break listing
                log.error("skipping unreadable database record", extra={"key": item.key})
                continue
            out.append(db)
        return out

    # --- RPCs ---------------------------------------------------------------------------
    async def UpsertDatabase(self, request, context):
        caller = authz.current_caller()
        db = types_pb2.Database()
        db.CopyFrom(request.database)
        db.name = db.name.strip()
        db.protocol = db.protocol or "redis"
        is_admin = caller.is_user
        if is_admin:
            db.origin = types_pb2.DATABASE_ORIGIN_DYNAMIC
            db.owner = ""
            if db.secret_ref.startswith("file:") or (
                    db.secret_ref.startswith("env:") and not db.secret_ref[4:].startswith(DYNAMIC_SECRET_ENV)):
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                    f"database {db.name}: an administrator's record may read its password only from "
                                    f"an environment variable named {DYNAMIC_SECRET_ENV}* on the dbproxy host "
                                    f"(secret: env:{DYNAMIC_SECRET_ENV}{db.name.upper().replace('-', '_')}); "
                                    "use the discovery service's static config for other sources")
            if db.HasField("azure"):
                db.ClearField("azure")
        elif db.origin not in (types_pb2.DATABASE_ORIGIN_DISCOVERY, types_pb2.DATABASE_ORIGIN_CONFIG):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                "a discovery host publishes records of origin DISCOVERY or CONFIG")
        try:
            validate(db)
        except InvalidDatabase as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        db.update_time.CopyFrom(ts(time.time()))
        key = PREFIX + db.name
        value = db.SerializeToString(deterministic=True)
        for _ in range(5):
            current, raw = await self._get(db.name)
            if current is not None:
                if is_admin and current.origin != types_pb2.DATABASE_ORIGIN_DYNAMIC:
                    await context.abort(grpc.StatusCode.ALREADY_EXISTS,
                                        f"database {db.name} exists and is managed by discovery "
                                        f"({origin_name(current.origin)}, {current.owner or 'no owner'}); "
                                        "choose another name")
                if not is_admin and current.origin == types_pb2.DATABASE_ORIGIN_DYNAMIC:
                    await context.abort(grpc.StatusCode.ALREADY_EXISTS,
                                        f"database {db.name} was created by an administrator; discovery does not "
                                        "replace it (rename the resource or set its cachegate-database-name tag)")
                if await self.backend.compare_and_swap(key, raw, value):
                    break
            elif await self.backend.create(key, value):
                break
        else:
            await context.abort(grpc.StatusCode.ABORTED, f"database {db.name} changed concurrently; try again")
        if is_admin:
            await self.audit.emit("db.put", caller.name, caller.source_addr(), name=db.name, uri=db.uri,
                                  origin=origin_name(db.origin), created=current is None)
        log.info("database %s", "created" if current is None else "updated",
                 extra={"db": db.name, "origin": origin_name(db.origin), "by": caller.name})
        return database_service_pb2.UpsertDatabaseResponse(database=db)

    async def GetDatabase(self, request, context):
        db, _ = await self._get(request.name)
        if db is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"database {request.name!r} not found: see `cgctl get dbs`")
        return database_service_pb2.GetDatabaseResponse(database=db)

    async def ListDatabases(self, request, context):
        try:
            after = decode_page_token(request.page_token)
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        size = page_size(request.page_size)
        out: list[types_pb2.Database] = []
        last = after
        more = False
        # Read in chunks so an owner filter still fills a page.
        while True:
            items = await self.backend.list(PREFIX, after=PREFIX + last if last else "", limit=size + 1)
            for item in items:
                last = item.key[len(PREFIX):]
                db = types_pb2.Database()
                try:
                    db.ParseFromString(item.value)
                except Exception:  # noqa: BLE001
                    continue
                if request.owner and db.owner != request.owner:
                    continue
                if len(out) == size:
                    more = True
                    break
                out.append(db)
            if more or len(items) <= size:
                break
        nxt = encode_page_token(out[-1].name) if more and out else ""
        return database_service_pb2.ListDatabasesResponse(databases=out, next_page_token=nxt)

    async def DeleteDatabase(self, request, context):
        caller = authz.current_caller()
        current, _ = await self._get(request.name)
        if current is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"database {request.name!r} not found: see `cgctl get dbs`")
        if not caller.is_user and current.origin == types_pb2.DATABASE_ORIGIN_DYNAMIC:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED,
                                f"database {request.name} was created by an administrator; discovery may not delete it")
        await self.backend.delete(PREFIX + request.name)
        if caller.is_user:
            await self.audit.emit("db.delete", caller.name, caller.source_addr(), name=request.name,
                                  origin=origin_name(current.origin))
        log.info("database deleted", extra={"db": request.name, "origin": origin_name(current.origin),
                                            "by": caller.name})
        return database_service_pb2.DeleteDatabaseResponse()

    async def WatchDatabases(self, request, context):
        with Subscription(self.backend, PREFIX) as sub:
            for db in await self._all():
                yield database_service_pb2.WatchDatabasesResponse(type=types_pb2.WATCH_EVENT_TYPE_PUT, database=db)
            yield database_service_pb2.WatchDatabasesResponse(type=types_pb2.WATCH_EVENT_TYPE_INIT_DONE)
            while True:
                try:
                    change = await sub.get()
                except WatchOverflow:
                    # Fell behind, or the storage may have missed changes: the watcher reconnects
                    # and gets the current state again.
                    await context.abort(grpc.StatusCode.ABORTED, "the database watch must start over: watch again")
                name = change.key[len(PREFIX):]
                if change.kind == "delete":
                    yield database_service_pb2.WatchDatabasesResponse(
                        type=types_pb2.WATCH_EVENT_TYPE_DELETE, database=types_pb2.Database(name=name))
                    continue
                db = types_pb2.Database()
                try:
                    db.ParseFromString(change.value or b"")
                except Exception:  # noqa: BLE001
                    continue
                yield database_service_pb2.WatchDatabasesResponse(type=types_pb2.WATCH_EVENT_TYPE_PUT, database=db)

    async def ReportFetcherStatus(self, request, context):
        caller = authz.current_caller()
        host = database_service_pb2.HostFetcherStatus(host_id=caller.name, statuses=request.statuses,
                                                      report_time=ts(time.time()),
                                                      poll_interval_seconds=max(0, request.poll_interval_seconds))
        await self.backend.put(STATUS_PREFIX + caller.name, host.SerializeToString(deterministic=True),
                               expires=time.time() + STATUS_TTL)
        return database_service_pb2.ReportFetcherStatusResponse()

    async def _host_page(self, prefix: str, cls, request, context) -> tuple[list, str]:
        """One page of the per-host reports stored under ``prefix`` (by host id)."""
        hosts = []
        for item in await self.backend.list(prefix):
            h = cls()
            try:
                h.ParseFromString(item.value)
            except Exception:  # noqa: BLE001 - a damaged report must not break listing
                continue
            hosts.append(h)
        try:
            return paginate(hosts, lambda h: h.host_id, request.page_size, request.page_token)
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))

    async def ListFetcherStatuses(self, request, context):
        page, nxt = await self._host_page(STATUS_PREFIX, database_service_pb2.HostFetcherStatus, request, context)
        return database_service_pb2.ListFetcherStatusesResponse(hosts=page, next_page_token=nxt)

    async def ReportProxyStatus(self, request, context):
        caller = authz.current_caller()
        st = database_service_pb2.ProxyStatus()
        st.CopyFrom(request.status)
        if len(st.databases) > MAX_PROXY_DATABASES:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"a heartbeat carries at most {MAX_PROXY_DATABASES} databases")
        st.host_id = caller.name  # who reports is the certificate's business, not the request's
        now = time.time()
        st.heartbeat_time.CopyFrom(ts(now))
        await self.backend.put(PROXY_STATUS_PREFIX + caller.name, st.SerializeToString(deterministic=True),
                               expires=now + PROXY_STATUS_TTL)
        return database_service_pb2.ReportProxyStatusResponse()

    async def ListProxyStatuses(self, request, context):
        page, nxt = await self._host_page(PROXY_STATUS_PREFIX, database_service_pb2.ProxyStatus, request, context)
        return database_service_pb2.ListProxyStatusesResponse(proxies=page, next_page_token=nxt)
