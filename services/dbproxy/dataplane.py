"""The RESP data plane of dbproxy, wired to the cluster.

``authorize`` turns a verified database certificate into a session context: the
identity and its route come from the certificate only; the database, the
roles and the locks come from auth's registry (followed by
:class:`~services.dbproxy.cache.ClusterCache`). The session checks locks and
RBAC before any upstream connection; a refusal is one line the client prints.

Live sessions follow the cluster: when a role, a user or a database record changes
(one event or a re-sync), every session it touches is re-evaluated with what its
certificate allows now (:meth:`ClusterCache.access_roleset`) and either goes on with
the new access from its next command or ends with a line that names the change.
"""

from __future__ import annotations

import logging
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import grpc

from cachegate.auth.v1 import audit_service_pb2, database_service_pb2
from cachegate.dbproxy.v1 import proxy_service_pb2, proxy_service_pb2_grpc
from cachegate.types.v1 import types_pb2
from services.common import authz, rbac
from services.common.authclient import AuthClient
from services.common.authz import CertVerifier
from services.common.config import DbProxyServiceConfig, split_hostport
from services.common.creds import Creds
from services.common.grpcutil import dur, paginate, ts
from services.common.locks import lock_applies, locked_message
from services.common.version import VERSION
from services.dbproxy.auditspool import AuditRejected, AuditSpool
from services.dbproxy.cache import Changes, ClusterCache
from services.dbproxy.clusterconn import forget_maps
from services.dbproxy.entra import EntraTokenCache
from services.dbproxy.health import DatabaseHealth, Heartbeat
from services.dbproxy.keys import AUTH_ENTRA, AzureKeyCache, credentials_for, database_auth
from services.dbproxy.limits import MallocTrimmer, ProxyLimits
from services.dbproxy.listener import Refused, RespListener, server_ssl_context
from services.dbproxy.session import Session, SessionContext
from services.dbproxy.upstream import DatabaseTLS, UpstreamPool, UpstreamTarget

log = logging.getLogger("cachegate.dbproxy")


@dataclass(eq=False)
class ClusterSessionContext(SessionContext):
    """A session's context with the verified certificate's identity it was built from, so
    that the session can be re-evaluated when the cluster changes."""

    identity: types_pb2.Identity | None = None

    __hash__ = object.__hash__  # by identity (kept in a WeakSet)


def change_reason(kind: str, name: str, before, after) -> str | None:
    """The change, as the one line a session it ends is told; None: nothing a session
    depends on changed."""
    if kind == "roles":
        if after is None:
            return f'role "{name}" was deleted'
        return f'role "{name}" was created' if before is None else f'role "{name}" changed'
    if kind == "users":
        if after is None:
            return f"user {name} was deleted"
        if before is None:
            return f"user {name} was added"
        what = [w for w, changed in (("roles", before.roles != after.roles),
                                     ("traits", (before.db_users, before.db_names) !=
                                      (after.db_users, after.db_names))) if changed]
        return f"user {name}'s {' and '.join(what)} changed" if what else None
    if kind == "databases":
        if after is None:
            return f'database "{name}" was removed'
        if before is not None and dict(before.labels) != dict(after.labels):
            return f'database "{name}" labels changed'
        return None
    return None


def is_cluster(db: types_pb2.Database) -> bool:
    """Clients of this database see a Redis Cluster (Azure's OSSCluster policy, or a static
    database with ``cluster: true``): the proxy routes by slot."""
    return (db.azure.clustering_policy or "").strip().lower() == "osscluster"


class DataPlane:
    def __init__(self, pcfg: DbProxyServiceConfig, creds: Creds, auth: AuthClient, verifier: CertVerifier,
                 folder: Path, cluster_name: str = ""):
        self.pcfg = pcfg
        self.creds = creds
        self.verifier = verifier
        self.limits = ProxyLimits.from_mapping(pcfg.limits.set_values())
        self.cache = ClusterCache(auth, on_lock=self._on_lock, on_change=self._on_change)
        # Contexts handed to the listener: a change that lands between ``authorize`` and the
        # session joining ``listener.sessions`` is applied to the context itself.
        self._contexts: weakref.WeakSet[ClusterSessionContext] = weakref.WeakSet()
        self.azure_keys = AzureKeyCache(pcfg.azure_endpoints)
        # The proxy's Entra ID token for Redis, shared by every session and database; fetched
        # well within the upstream connect timeout so that a dead token endpoint is reported.
        self.entra = EntraTokenCache(pcfg.azure_endpoints,
                                     timeout=max(1.0, min(8.0, self.limits.upstream_connect_timeout * 0.8)))
        # Upstream connections opened and authenticated ahead of the sessions that take them.
        # What each database's connects and checks gave (cgctl status, cgate db ls -v, metrics).
        self.health = DatabaseHealth()
        self.pool = UpstreamPool(timeout=self.limits.upstream_connect_timeout, health=self.health)
        self._connect = self.health.tracked(self.pool.get)
        from services.dbproxy import metrics as proxy_metrics

        proxy_metrics.default().watch_health(self.health)
        self.started = time.time()
        # The first of several worker processes reports for the host (the others do not), with
        # the other workers' sessions counted in (a WorkerSet's ``session_count``).
        self.heartbeat_enabled = True
        self.extra_sessions: Callable[[], int] = lambda: 0
        self.heartbeat = Heartbeat(
            lambda st: auth.databases.ReportProxyStatus(database_service_pb2.ReportProxyStatusRequest(status=st),
                                                        timeout=10),
            self.proxy_status, self.health, self.probe, interval=pcfg.heartbeat_interval)
        spool_dir = Path(pcfg.audit_spool_dir) if pcfg.audit_spool_dir else folder / "audit-spool"

        # Batches go to auth already serialized (the spool writes the wire format itself:
        # no protobuf object per event on the hot path).
        emit_raw = auth.channel.unary_unary(
            "/cachegate.auth.v1.AuditService/EmitAuditEvents", request_serializer=None,
            response_deserializer=audit_service_pb2.EmitAuditEventsResponse.FromString)

        async def send(request_bytes: bytes):
            try:
                await emit_raw(request_bytes, timeout=10)
            except grpc.aio.AioRpcError as exc:
                if exc.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.PERMISSION_DENIED):
                    raise AuditRejected(exc.details() or exc.code().name) from None
                raise

        self.audit = AuditSpool(send, spool_dir, cluster_name=cluster_name, encoded=True)
        self._db_tls = DatabaseTLS(pcfg.database_ca_files)
        self._db_tls.context(None)  # the system's CA bundle: slow to load, so loaded now
        self.listener = RespListener(
            self.authorize, self.audit,
            ssl_context=server_ssl_context(creds.cert_pem + creds.host_ca_pem, creds.key_pem, creds.user_ca_pem),
            limits=self.limits, host=split_hostport(pcfg.redis_listen_addr, 3081)[0] or "0.0.0.0",
            port=split_hostport(pcfg.redis_listen_addr, 3081)[1])
        self.trimmer = MallocTrimmer(lambda: self.listener.ended)

    # --- lifecycle -----------------------------------------------------------------------------
    async def start(self) -> int:
        await self.audit.start()
        self.cache.start()
        if not await self.cache.wait_ready(15):
            log.warning("auth's registry is not loaded yet; sessions are refused until it is")
        if any(database_auth(db) == AUTH_ENTRA for db in self.cache.databases.values()):
            self.entra.prefetch()
        port = await self.listener.start()
        self.trimmer.start()
        if self.heartbeat_enabled:
            self.heartbeat.start()
        return port

    async def stop(self) -> None:
        await self.heartbeat.stop()
        await self.trimmer.stop()
        await self.listener.close(self.limits.shutdown_grace)
        await self.pool.close()
        await self.cache.stop()
        await self.audit.close()
        await self.azure_keys.close()
        await self.entra.close()

    # --- TLS to databases -------------------------------------------------------------------------
    def target_for(self, db: types_pb2.Database) -> UpstreamTarget:
        host, port = split_hostport(db.uri, 6380 if db.tls else 6379)
        ssl_ctx = None
        if db.tls:
            ssl_ctx = self._db_tls.context(db.ca_cert_pem or None)
        return UpstreamTarget(db.name, host, port, ssl_ctx)

    # --- sessions -------------------------------------------------------------------------------
    async def authorize(self, cert, peer) -> SessionContext:
        ident = self.verifier.identity(cert)  # ValueError -> shown to the client
        if ident.kind != types_pb2.IDENTITY_KIND_USER:
            raise Refused("only user database certificates may open sessions")
        route = ident.route
        if not route.service_name:
            raise Refused("this certificate names no database: run `cgate db login DATABASE` and use its certificate")
        if not self.cache.connected["databases"] and not self.cache.ready["databases"].is_set():
            raise Refused("the proxy has not loaded the database list from auth yet; try again in a moment")
        if not self.cache.ready["users"].is_set():
            raise Refused("the proxy has not loaded the user list from auth yet; try again in a moment")
        db = self.cache.databases.get(route.service_name)
        if db is None:
            raise LookupError(f'database "{route.service_name}" is not registered: see `cgate db ls`')
        # The certificate's roles the user still holds, as defined now, with the user's traits
        # now. Locks and RBAC (labels, db user, db name) are checked by the session itself
        # before it connects upstream, and audited and counted there with their reason.
        roles = self.cache.access_roleset(ident)
        if roles is None:
            raise Refused(f'user "{ident.name}" does not exist (it may have been deleted): ask an administrator')
        labels = dict(db.labels)
        user, role_names = ident.name, list(ident.roles)

        def lock_check() -> str | None:
            lk = self.cache.lock_for(user, role_names)
            return locked_message(lk, user) if lk is not None else None

        ctx = ClusterSessionContext(
            user=user, database=db.name, db_user=route.db_user, db_name=route.db_name, roles=roles,
            db_labels=labels, target=self.target_for(db), credentials=credentials_for(db, self.azure_keys, self.entra),
            lock_check=lock_check, extra_audit_fields={"db_uri": db.uri}, identity=ident,
            connect=self._connect, cluster=is_cluster(db))
        if not ctx.cluster:
            ctx.release = self.pool.release
        self._contexts.add(ctx)
        return ctx

    # --- live sessions follow the cluster ------------------------------------------------------
    def _on_change(self, kind: str, changes: Changes) -> None:
        """Re-evaluate the sessions a change to roles, users or databases touches."""
        if kind == "databases":  # connections made ahead for an old record are not used
            for name, _, after in changes:
                self.pool.forget(name)
                forget_maps(name)  # a cluster's slot map is learnt again
                if after is None:
                    self.health.forget([name])
                if after is not None and database_auth(after) == AUTH_ENTRA:
                    self.entra.prefetch()  # the token is there before the first session
        reasons: dict[str, str] = {}
        for name, before, after in changes:
            reason = change_reason(kind, name, before, after)
            if reason is not None:
                reasons[name] = reason
        if not reasons:
            return

        def touched(ctx: ClusterSessionContext) -> str | None:
            if kind == "users":
                return reasons.get(ctx.user)
            if kind == "databases":
                return reasons.get(ctx.database)
            return next((reasons[r] for r in ctx.identity.roles if r in reasons), None)

        live: set[int] = set()
        n = 0
        for s in list(self.listener.sessions):
            ctx = s.ctx
            if not isinstance(ctx, ClusterSessionContext) or ctx.identity is None:
                continue
            live.add(id(ctx))
            reason = touched(ctx)
            if reason is not None:
                n += 1
                self._reevaluate(s, reason)
        for ctx in list(self._contexts):
            if id(ctx) not in live and ctx.identity is not None and touched(ctx) is not None:
                roles, labels, _ = self._access_now(ctx)
                ctx.roles, ctx.db_labels = roles, labels
        if n:
            log.info("re-evaluated live sessions after a change", extra={"kind": kind, "sessions": n,
                                                                        "changed": sorted(reasons)[:20]})

    def _access_now(self, ctx: ClusterSessionContext) -> tuple[rbac.RoleSet, dict, str | None]:
        """(roles, database labels, why the session must end regardless of roles or None)."""
        db = self.cache.databases.get(ctx.database)
        roles = self.cache.access_roleset(ctx.identity) if db is not None else None
        if db is None:
            return rbac.RoleSet([]), {}, f'database "{ctx.database}" was removed'
        if roles is None:
            return rbac.RoleSet([]), dict(db.labels), f"user {ctx.user} was deleted"
        return roles, dict(db.labels), None

    def _reevaluate(self, s: Session, reason: str) -> None:
        roles, labels, gone = self._access_now(s.ctx)
        if gone is not None:
            s.terminate(gone)
            s.update_access(roles, labels, gone)  # and nothing is allowed meanwhile
            return
        s.update_access(roles, labels, reason)

    def _on_lock(self, lock: types_pb2.Lock) -> None:
        hits = [s for s in list(self.listener.sessions) if lock_applies(lock, s.user, s.role_names)]
        for s in hits:
            s.terminate(locked_message(lock, s.user))
        n = len(hits)
        if n:
            log.info("ended sessions for a lock", extra={"lock_id": lock.id, "sessions": n})

    # --- API -------------------------------------------------------------------------------------
    def allowed_databases(self, ident: types_pb2.Identity, selector: dict) -> list[proxy_service_pb2.AllowedDatabase]:
        roles = self.cache.roleset(ident)
        out = []
        for name in sorted(self.cache.databases):
            db = self.cache.databases[name]
            labels = dict(db.labels)
            if any(labels.get(k) != v for k, v in selector.items()):
                continue
            if not roles.can_see_database(name, labels):
                continue
            users_ok, users_no = roles.allowed_db_users(name, labels)
            names_ok, names_no = roles.allowed_db_names(name, labels)
            public = types_pb2.Database()
            public.CopyFrom(db)
            public.ClearField("secret_ref")  # where the proxy reads a secret is not the user's business
            out.append(proxy_service_pb2.AllowedDatabase(
                database=public, allowed_db_users=users_ok, denied_db_users=users_no,
                allowed_db_names=names_ok, denied_db_names=names_no, health=self.health.get(name)))
        return out

    # --- health ----------------------------------------------------------------------------------
    async def check(self, name: str) -> proxy_service_pb2.CheckDatabaseResponse | None:
        """`cgctl db check NAME` from this proxy's side (None: no such database)."""
        db = self.cache.databases.get(name)
        if db is None:
            return None
        return await self.health.check(self.target_for(db), credentials_for(db, self.azure_keys, self.entra),
                                       timeout=self.limits.upstream_connect_timeout)

    async def probe(self, name: str) -> None:
        if await self.check(name) is None:
            self.health.forget([name])

    def proxy_status(self) -> database_service_pb2.ProxyStatus:
        names = [n for n in self.health.records if n in self.cache.databases]
        st = database_service_pb2.ProxyStatus(
            version=VERSION, sessions=len(self.listener.sessions) + self.extra_sessions(),
            heartbeat_interval_seconds=max(1, round(self.heartbeat.interval)),
            databases=self.health.snapshot(names))
        st.start_time.CopyFrom(ts(self.started))
        return st


class SessionServicer(proxy_service_pb2_grpc.SessionServiceServicer):
    """``cgctl sessions ls/kill``: this process's sessions, and with ``workers`` (a
    :class:`~services.dbproxy.workers.WorkerSet`) the other workers' too."""

    def __init__(self, plane: DataPlane, workers=None):
        self.plane = plane
        self.workers = workers

    def _sessions(self):
        import time

        now = time.monotonic()
        out = []
        for s in self.plane.listener.sessions:
            ctx = s.ctx
            msg = proxy_service_pb2.Session(
                id=ctx.session_id, user=ctx.user, database=ctx.database, db_user=ctx.db_user,
                db_name=ctx.db_name or "0", client_addr=ctx.source_addr, commands=s.commands,
                bytes_in=s.bytes_in, bytes_out=s.bytes_out, start_time=ts(s.started),
                idle=dur(max(0.0, now - getattr(s, "_last_activity", now))))
            out.append(msg)
        return out

    async def ListSessions(self, request, context):
        found = self._sessions()
        if self.workers is not None:
            found += await self.workers.sessions()
        found.sort(key=lambda m: m.id)
        try:
            page, nxt = paginate(found, lambda m: m.id, request.page_size, request.page_token)
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        return proxy_service_pb2.ListSessionsResponse(sessions=page, next_page_token=nxt)

    async def TerminateSession(self, request, context):
        caller = authz.current_caller()
        n = self.plane.listener.terminate(lambda s: s.ctx.session_id == request.id,
                                          f"an administrator ({caller.name}) ended it")
        if not n and self.workers is not None:
            n = await self.workers.terminate(request.id, caller.name)
        if not n:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no live session {request.id!r}: see `cgctl sessions ls`")
        self.plane.audit.emit("db.session.terminate", caller.name, source_addr=caller.source_addr(),
                              fields={"session_id": request.id})
        return proxy_service_pb2.TerminateSessionResponse()

    async def CheckDatabase(self, request, context):
        resp = await self.plane.check(request.name)
        if resp is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"database {request.name!r} is not registered on this "
                                                           "proxy: see `cgctl get dbs`")
        return resp
