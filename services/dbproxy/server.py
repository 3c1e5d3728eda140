"""The dbproxy process: the cluster's only public endpoint.

Ports: the public gRPC API (server TLS: cluster info, login, invites, proxy
settings), the authenticated gRPC API (mutual TLS with a session certificate),
the HTTPS web port (``/v1/webapi/find``, and ``/scripts/install.sh`` with the wheel it
installs) and the RESP listener (TLS with database
certificates; see dataplane.py).
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import ssl
import tempfile
import time
from pathlib import Path

import grpc
from aiohttp import web

from cachegate.auth.v1 import cluster_service_pb2
from cachegate.dbproxy.v1 import proxy_service_pb2, proxy_service_pb2_grpc
from cachegate.types.v1 import types_pb2
from services.common import authz, heap
from services.common.authclient import AuthClient
from services.common.authz import ADMIN, ANY, PUBLIC, USER, CertVerifier, Policy, rule
from services.common.config import (
    DEFAULT_PROXY_PORT, Config, join_hostport, split_hostport,
)
from services.common.creds import Creds, write_private
from services.common.grpcserver import GrpcServer, ServiceBinding
from services.common.grpcutil import AUTH_UNREACHABLE, paginate
from services.common.join import ensure_joined, local_addresses
from services.common.pki import cert_from_pem
from services.common.telemetry import server_interceptors, setup_metrics, setup_tracing
from services.common.version import VERSION
from services.dbproxy.dataplane import DataPlane, SessionServicer
from services.dbproxy.limits import tune_malloc
from services.dbproxy.workers import WorkerSet, adopt_worker_spools, worker_count

log = logging.getLogger("cachegate.dbproxy")

PROXY = proxy_service_pb2.DESCRIPTOR.services_by_name["ProxyService"]
SESSIONS = proxy_service_pb2.DESCRIPTOR.services_by_name["SessionService"]
CLUSTER_INFO_TTL = 30.0
# The public API address /v1/webapi/find reports (known once that port is bound).
PUBLIC_ADDR = web.AppKey("public_addr", str)


def _m(desc, name):
    return f"/{desc.full_name}/{name}"


PUBLIC_POLICY = Policy({
    _m(PROXY, "GetClusterInfo"): rule(PUBLIC),
    _m(PROXY, "GetProxySettings"): rule(PUBLIC),
    _m(PROXY, "Login"): rule(PUBLIC),
    _m(PROXY, "RedeemInvite"): rule(PUBLIC),
}, infra=rule(PUBLIC))

API_POLICY = Policy({
    _m(PROXY, "GetClusterInfo"): rule(ANY),
    _m(PROXY, "GetProxySettings"): rule(ANY),
    _m(PROXY, "ListDatabases"): rule(USER),
    _m(PROXY, "GenerateDatabaseCert"): rule(USER),
    _m(SESSIONS, "ListSessions"): rule(ADMIN, resource="session", verb="list"),
    _m(SESSIONS, "TerminateSession"): rule(ADMIN, resource="session", verb="delete"),
    _m(SESSIONS, "CheckDatabase"): rule(ADMIN, resource="db", verb="read"),
})


def _relay_status(exc: grpc.aio.AioRpcError) -> tuple[grpc.StatusCode, str]:
    if exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        return grpc.StatusCode.UNAVAILABLE, f"{AUTH_UNREACHABLE}; try again shortly"
    return exc.code(), exc.details() or exc.code().name


class ProxyServicer(proxy_service_pb2_grpc.ProxyServiceServicer):
    def __init__(self, auth: AuthClient, settings: proxy_service_pb2.GetProxySettingsResponse,
                 plane: DataPlane | None = None):
        self.auth = auth
        self.settings = settings
        self.plane = plane
        self._info: tuple[float, cluster_service_pb2.GetClusterInfoResponse] | None = None

    async def cluster_info(self) -> cluster_service_pb2.GetClusterInfoResponse:
        if self._info and time.monotonic() - self._info[0] < CLUSTER_INFO_TTL:
            return self._info[1]
        info = await self.auth.cluster.GetClusterInfo(cluster_service_pb2.GetClusterInfoRequest(), timeout=10)
        self._info = (time.monotonic(), info)
        return info

    async def _forward(self, context, call, request, forward_cert: bool = False):
        caller = authz.current_caller()
        md = [(authz.CLIENT_ADDR_MD, caller.source_addr())]
        if forward_cert and caller.cert is not None:
            from services.common.pki import cert_to_pem

            md.append((authz.FORWARDED_CERT_MD, cert_to_pem(caller.cert)))
        # Answer before the caller gives up, so that it hears auth is the one not answering.
        left = context.time_remaining()
        timeout = 30.0 if left is None else max(1.0, min(30.0, left - 2.0))
        try:
            return await call(request, metadata=md, timeout=timeout)
        except grpc.aio.AioRpcError as exc:
            code, details = _relay_status(exc)
            await context.abort(code, details)

    async def GetClusterInfo(self, request, context):
        try:
            return await self.cluster_info()
        except grpc.aio.AioRpcError as exc:
            code, details = _relay_status(exc)
            await context.abort(code, details)

    async def GetProxySettings(self, request, context):
        return self.settings

    async def Login(self, request, context):
        return await self._forward(context, self.auth.users.Login, request)

    async def RedeemInvite(self, request, context):
        return await self._forward(context, self.auth.users.RedeemInvite, request)

    async def GenerateDatabaseCert(self, request, context):
        return await self._forward(context, self.auth.users.GenerateDatabaseCert, request, forward_cert=True)

    async def ListDatabases(self, request, context):
        caller = authz.current_caller()
        if self.plane is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "this proxy serves no databases")
        if not self.plane.cache.ready["databases"].is_set():
            await context.abort(grpc.StatusCode.UNAVAILABLE,
                                "the proxy has not loaded the database list from auth yet; try again in a moment")
        dbs = self.plane.allowed_databases(caller.identity, dict(request.label_selector))
        try:
            page, nxt = paginate(dbs, lambda a: a.database.name, request.page_size, request.page_token)
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        return proxy_service_pb2.ListDatabasesResponse(databases=page, next_page_token=nxt)


def public_hostport(public_addr: str, listen_addr: str, port: int) -> str:
    if public_addr:
        host, _ = split_hostport(public_addr, DEFAULT_PROXY_PORT)
    else:
        host, _ = split_hostport(listen_addr, port)
        if host in ("0.0.0.0", "::", ""):
            host = "127.0.0.1"
    return join_hostport(host, port)


_HOST_HEADER = re.compile(r"[A-Za-z0-9.\-]+(:[0-9]{1,5})?|\[[0-9A-Fa-f:.]+\](:[0-9]{1,5})?")


class Installer:
    """``/scripts/install.sh`` and the wheel it installs: this proxy's own code and version
    (services/installer). The wheel is built once, on the first request."""

    def __init__(self, ca_pem: str):
        self.ca_pem = ca_pem
        self._wheel = None
        self._lock = asyncio.Lock()

    async def wheel(self):
        async with self._lock:
            if self._wheel is None:
                from services.installer.wheel import build_wheel

                self._wheel = await asyncio.to_thread(build_wheel, VERSION)
            return self._wheel

    async def script(self, request: web.Request) -> web.Response:
        from services.installer import render_script

        host = request.headers.get("Host", "")
        if not _HOST_HEADER.fullmatch(host):
            raise web.HTTPBadRequest(text="a Host header (host:port) is needed to serve install.sh\n")
        wheel = await self.wheel()
        text = render_script(version=VERSION, wheel_name=wheel.name, wheel_sha256=wheel.sha256,
                             base_url=f"https://{host}", ca_pem=self.ca_pem)
        return web.Response(text=text, content_type="text/x-shellscript")

    async def package(self, request: web.Request) -> web.Response:
        wheel = await self.wheel()
        if request.match_info["name"] != wheel.name:
            raise web.HTTPNotFound(text=f"this proxy serves {wheel.name}\n")
        return web.Response(body=wheel.data, content_type="application/zip",
                            headers={"Content-Disposition": f'attachment; filename="{wheel.name}"'})


def web_app(servicer: ProxyServicer, settings: proxy_service_pb2.GetProxySettingsResponse,
            installer: Installer | None = None) -> web.Application:
    async def find(request: web.Request) -> web.Response:
        try:
            info = await servicer.cluster_info()
            cluster = info.cluster_name
        except grpc.aio.AioRpcError:
            cluster = ""
        body = {
            "server_version": VERSION,
            "cluster_name": cluster,
            "proxy": {
                "public_addr": request.app[PUBLIC_ADDR],
                "api_addr": settings.api_listen_addr,
                "redis_addr": settings.redis_listen_addr,
                "web_addr": settings.web_listen_addr,
            },
            "min_client_version": f"{max(0, int(VERSION.split('.')[0]) - 1)}.0.0",
        }
        return web.json_response(body, dumps=lambda o: json.dumps(o, indent=None))

    app = web.Application()
    app[PUBLIC_ADDR] = ""
    app.router.add_get("/v1/webapi/find", find)
    app.router.add_get("/webapi/find", find)
    if installer is not None:
        app.router.add_get("/scripts/install.sh", installer.script)
        app.router.add_get("/scripts/{name}", installer.package)
    return app


def web_ssl_context(cfg, creds: Creds, tmpdir: Path) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if cfg.web_cert_file:
        ctx.load_cert_chain(cfg.web_cert_file, cfg.web_key_file or None)
    else:
        chain, key = tmpdir / "web.crt", tmpdir / "web.key"
        chain.write_bytes(creds.cert_pem + creds.host_ca_pem)
        write_private(key, creds.key_pem)
        ctx.load_cert_chain(str(chain), str(key))
    return ctx


def _raise_open_files(want: int) -> None:
    """Each session holds two sockets: raise the soft open-files limit toward ``want`` (up to
    the hard limit), and say so when the hard limit is lower."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    top = want if hard == resource.RLIM_INFINITY else min(want, hard)
    if soft != resource.RLIM_INFINITY and soft < top:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (top, hard))
            soft = top
        except (ValueError, OSError):
            pass
    if soft != resource.RLIM_INFINITY and soft < want:
        log.warning("the open-files limit (%d) is below what limits.max_sessions needs (%d): raise it "
                    "(LimitNOFILE= in systemd, ulimit -n) or lower max_sessions", soft, want)


async def run_dbproxy(cfg: Config, stop: asyncio.Event, ready=None) -> None:
    tune_malloc()
    tracing = setup_tracing("dbproxy", cfg.telemetry)
    setup_metrics("dbproxy", cfg.telemetry)
    pcfg = cfg.dbproxy_service
    folder = cfg.service_dir("dbproxy")
    addrs = local_addresses(pcfg.listen_addr, pcfg.public_addr, *pcfg.public_addrs)
    creds = await ensure_joined(folder, cfg.join_address(), cfg.join.token, cfg.join.ca_pin,
                                types_pb2.SERVICE_ROLE_DBPROXY, addrs)
    verifier = CertVerifier(cert_from_pem(creds.host_ca_pem), cert_from_pem(creds.user_ca_pem))
    auth = AuthClient(cfg.auth_server, creds, tracing)
    settings = proxy_service_pb2.GetProxySettingsResponse()
    plane = DataPlane(pcfg, creds, auth, verifier, folder, creds.identity.cluster_name)
    _raise_open_files(plane.limits.max_sessions * 2 + plane.limits.max_handshakes + 512)
    servicer = ProxyServicer(auth, settings, plane)
    sessions = SessionServicer(plane)
    nworkers = worker_count(pcfg.workers)
    spool_dir = plane.audit.spool_dir
    if nworkers > 1:
        plane.listener.reuse_port = True
        adopt_worker_spools(spool_dir)
    interceptors = server_interceptors(tracing)
    public = GrpcServer("dbproxy-public", [ServiceBinding(
        proxy_service_pb2_grpc.add_ProxyServiceServicer_to_server, servicer, PROXY)],
        PUBLIC_POLICY, creds.server_credentials(False), lambda: verifier, extra_interceptors=interceptors)
    api = GrpcServer("dbproxy-api", [
        ServiceBinding(proxy_service_pb2_grpc.add_ProxyServiceServicer_to_server, servicer, PROXY),
        ServiceBinding(proxy_service_pb2_grpc.add_SessionServiceServicer_to_server, sessions, SESSIONS),
    ], API_POLICY, creds.server_credentials(True), lambda: verifier, extra_interceptors=interceptors,
        admin_check=lambda ident, res, verb: bool(plane.cache.roleset(ident).check_admin(res, verb)))
    public_port = await public.start(pcfg.listen_addr)
    api_port = await api.start(pcfg.api_listen_addr)
    whost, wport = split_hostport(pcfg.web_listen_addr, 3443)
    tmp = tempfile.TemporaryDirectory(prefix="cachegate-web-")
    # install.sh trusts the host CA for its downloads unless the web port has its own certificate.
    installer = Installer("" if pcfg.web_cert_file else creds.host_ca_pem.decode())
    runner = web.AppRunner(web_app(servicer, settings, installer), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, whost, wport, ssl_context=web_ssl_context(pcfg, creds, Path(tmp.name)))
    await site.start()
    web_port = site._server.sockets[0].getsockname()[1]  # noqa: SLF001 (port 0 in tests)
    redis_port = await plane.start()
    workers = None
    if nworkers > 1:
        workers = sessions.workers = WorkerSet(cfg, nworkers, redis_port, folder, spool_dir)
        await workers.start()
        plane.extra_sessions = workers.session_count
    pub = pcfg.public_addr
    settings.api_listen_addr = public_hostport(pub, pcfg.api_listen_addr, api_port)
    settings.web_listen_addr = public_hostport(pub, pcfg.web_listen_addr, web_port)
    settings.redis_listen_addr = public_hostport(pub, pcfg.redis_listen_addr, redis_port)
    runner.app[PUBLIC_ADDR] = public_hostport(pub, pcfg.listen_addr, public_port)
    # Long-lived objects made so far (modules, config, caches) leave the collector's view,
    # and young collections run less often: the RESP hot path allocates many short-lived objects.
    heap.settle_after_start()
    log.info("dbproxy service ready", extra={"host_id": creds.identity.name, "public_port": public_port,
                                             "api_port": api_port, "web_port": web_port, "redis_port": redis_port,
                                             "workers": nworkers})
    if ready:
        ready({"service": "dbproxy", "public_port": public_port, "api_port": api_port, "web_port": web_port,
               "redis_port": redis_port, "host_id": creds.identity.name})
    try:
        await stop.wait()
    finally:
        # Health says NOT_SERVING before anything stops, so that load balancers move new
        # sessions away while the live ones drain.
        for srv in (public, api):
            try:
                await srv.health.enter_graceful_shutdown()
            except Exception:  # noqa: BLE001 - stopping anyway
                pass
        if workers is not None:
            await asyncio.gather(plane.stop(), workers.stop(plane.limits.shutdown_grace))
        else:
            await plane.stop()
        await runner.cleanup()
        tmp.cleanup()
        await public.stop(2.0)
        await api.stop(5.0)
        await auth.close()
