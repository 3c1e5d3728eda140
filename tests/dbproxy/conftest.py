"""Fixtures for the RESP data plane: a real TLS redis-server with requirepass, the
listener running in-process (uvloop, in a thread), test user certificates."""

from __future__ import annotations

import asyncio
import datetime as dt
import socket
import ssl
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import uvloop

from cachegate.types.v1 import types_pb2
from services.common import pki
from services.common.identity import identity_from_cert
from services.common.rbac import BUILTIN_ROLES, RoleSet, load_role_yaml
from services.dbproxy.auditspool import AuditSpool
from services.dbproxy.limits import ProxyLimits
from services.dbproxy.listener import Refused, RespListener
from services.dbproxy.session import SessionContext
from services.dbproxy.upstream import UpstreamTarget
from tests.helpers import free_port  # noqa: E402

DB = "test-redis"
REDIS_PASSWORD = "initial-secret-Pa55word"

LIMITED_ROLE = load_role_yaml("""
kind: role
version: v1
metadata: {name: limited}
spec:
  allow:
    db_labels: {'*': '*'}
    db_users: ['{{internal.db_users}}']
    db_names: ['{{internal.db_names}}']
    db_commands: ['*']
  deny:
    db_commands: [FLUSHALL, FLUSHDB, 'CLIENT|KILL', '@dangerous']
""")
# Server administration the built-in access role does not cover, named explicitly.
OPS_ROLE = load_role_yaml("""
kind: role
version: v1
metadata: {name: ops}
spec:
  allow:
    db_labels: {'*': '*'}
    db_users: ['{{internal.db_users}}']
    db_names: ['{{internal.db_names}}']
    db_commands: ['*', MONITOR, 'CLIENT|LIST', 'CLIENT|KILL', 'CONFIG|SET', DEBUG]
""")
# Scripts despite a narrower command set: an administrator's explicit choice.
SCRIPTER_ROLE = load_role_yaml("""
kind: role
version: v1
metadata: {name: scripter}
spec:
  allow:
    db_labels: {'*': '*'}
    db_users: ['{{internal.db_users}}']
    db_names: ['{{internal.db_names}}']
    db_commands: ['@scripting']
""")
ROLES = {"limited": LIMITED_ROLE, "access": BUILTIN_ROLES["access"], "ops": OPS_ROLE,
         "scripter": SCRIPTER_ROLE}




@dataclass
class Pki:
    dir: Path
    user_ca: pki.CertAuthority
    server_ca: pki.CertAuthority  # signs the proxy's and redis-server's certificates

    def path(self, name: str) -> str:
        return str(self.dir / name)

    def user_cert(self, user: str, *, db_user: str = "default", db_name: str = "", service: str = DB,
                  roles=("limited",), db_users=("default",), db_names=("0", "1"),
                  ttl: dt.timedelta = dt.timedelta(hours=1), not_after: dt.datetime | None = None,
                  ca: pki.CertAuthority | None = None, tag: str = "") -> tuple[str, str]:
        key = pki.new_key()
        ident = types_pb2.Identity(
            kind=types_pb2.IDENTITY_KIND_USER, name=user, roles=list(roles), db_users=list(db_users),
            db_names=list(db_names),
            route=types_pb2.RouteToDatabase(service_name=service, protocol="redis", db_user=db_user,
                                            db_name=db_name),
        )
        cert = (ca or self.user_ca).sign(key.public_key(), user, ident, ttl, not_after=not_after)
        stem = f"{user}{tag}-{db_user}-{db_name or 'x'}-{service}"
        cpath, kpath = self.dir / f"{stem}.crt", self.dir / f"{stem}.key"
        cpath.write_bytes(pki.cert_to_pem(cert))
        kpath.write_bytes(pki.key_to_pem(key))
        return str(cpath), str(kpath)


@pytest.fixture(scope="session")
def certs(tmp_path_factory) -> Pki:
    d = tmp_path_factory.mktemp("pki")
    user_ca = pki.CertAuthority.create("test user CA", "cachegate-test")
    server_ca = pki.CertAuthority.create("test server CA", "cachegate-test")
    (d / "user-ca.pem").write_bytes(user_ca.cert_pem)
    (d / "server-ca.pem").write_bytes(server_ca.cert_pem)
    for name in ("redis", "proxy"):
        key = pki.new_key()
        ident = types_pb2.Identity(kind=types_pb2.IDENTITY_KIND_HOST, name=name)
        cert = server_ca.sign(key.public_key(), name, ident, dt.timedelta(days=1),
                              ips=["127.0.0.1"], dns_names=["localhost"], server=True)
        (d / f"{name}.crt").write_bytes(pki.cert_to_pem(cert))
        (d / f"{name}.key").write_bytes(pki.key_to_pem(key))
    return Pki(d, user_ca, server_ca)


@dataclass
class RedisServer:
    port: int
    proc: subprocess.Popen
    certs: Pki
    password: str = REDIS_PASSWORD

    def client(self, **kw):
        import redis

        return redis.Redis(host="127.0.0.1", port=self.port, password=self.password, ssl=True,
                           ssl_ca_certs=self.certs.path("server-ca.pem"), socket_timeout=5, **kw)


@pytest.fixture(scope="session")
def redis_server(certs, tmp_path_factory):
    d = tmp_path_factory.mktemp("redis")
    port = free_port()
    proc = subprocess.Popen(
        ["redis-server", "--port", "0", "--bind", "127.0.0.1", "--tls-port", str(port),
         "--tls-cert-file", certs.path("redis.crt"), "--tls-key-file", certs.path("redis.key"),
         "--tls-ca-cert-file", certs.path("server-ca.pem"), "--tls-auth-clients", "no",
         "--requirepass", REDIS_PASSWORD, "--save", "", "--appendonly", "no", "--dir", str(d),
         "--databases", "16"],
        stdout=open(d / "redis.log", "wb"), stderr=subprocess.STDOUT,  # noqa: SIM115
    )
    server = RedisServer(port, proc, certs)
    deadline = time.monotonic() + 15
    while True:
        try:
            server.client().ping()
            break
        except Exception:
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                raise RuntimeError("redis-server did not start: " + (d / "redis.log").read_text()[-2000:])
            time.sleep(0.05)
    yield server
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()


class RotatingKey:
    """A credential provider like listKeys: a cached key, fetched again on demand."""

    def __init__(self, key: str) -> None:
        self.source = key  # what "Azure" has now
        self.cached = key
        self.refreshes = 0

    async def get(self, force_refresh: bool = False):
        if force_refresh:
            self.refreshes += 1
            self.cached = self.source
        return None, self.cached


@dataclass
class Proxy:
    port: int
    loop: asyncio.AbstractEventLoop
    listener: RespListener
    spool: AuditSpool
    events: list
    certs: Pki
    creds: RotatingKey
    overrides: dict[str, dict[str, Any]] = field(default_factory=dict)
    send_fails: list = field(default_factory=lambda: [False])

    def call(self, coro, timeout: float = 20):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def run(self, fn, *args):
        async def _do():
            return fn(*args)

        return self.call(_do())

    def flush_audit(self) -> list:
        self.call(self.spool.flush(10))
        return list(self.events)

    def redis_cli(self, cert: tuple[str, str] | None, *args: str, input: str | None = None,
                  timeout: float = 20) -> subprocess.CompletedProcess:
        cmd = ["redis-cli", "-h", "127.0.0.1", "-p", str(self.port), "--tls",
               "--cacert", self.certs.path("server-ca.pem")]
        if cert:
            cmd += ["--cert", cert[0], "--key", cert[1]]
        return subprocess.run(cmd + list(args), input=input, capture_output=True, text=True,
                              timeout=timeout)

    def client(self, cert: tuple[str, str], **kw):
        import redis

        kw.setdefault("socket_timeout", 10)
        return redis.Redis(host="127.0.0.1", port=self.port, ssl=True, ssl_certfile=cert[0],
                           ssl_keyfile=cert[1], ssl_ca_certs=self.certs.path("server-ca.pem"), **kw)

    def raw(self, cert: tuple[str, str] | None) -> "RawClient":
        return RawClient(self.port, self.certs.path("server-ca.pem"), cert)


class RawClient:
    """A TLS socket speaking raw RESP, replies parsed with hiredis (exact order checks)."""

    def __init__(self, port: int, ca: str, cert: tuple[str, str] | None) -> None:
        import hiredis

        ctx = ssl.create_default_context(cafile=ca)
        if cert:
            ctx.load_cert_chain(cert[0], cert[1])
        raw = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.sock = ctx.wrap_socket(raw, server_hostname="127.0.0.1")
        self.reader = hiredis.Reader(notEnoughData=Ellipsis)

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def read(self, n: int = 1, timeout: float = 10) -> list:
        out = []
        deadline = time.monotonic() + timeout
        while len(out) < n:
            item = self.reader.gets()
            if item is not Ellipsis:
                out.append(item)
                continue
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"got {len(out)} of {n} replies: {out!r}")
            self.sock.settimeout(left)
            data = self.sock.recv(1 << 20)
            if not data:
                raise EOFError(f"connection closed after {len(out)} of {n} replies: {out!r}")
            self.reader.feed(data)
        return out

    def closed(self, timeout: float = 10) -> bool:
        """True once the server closed the connection (data before that is dropped)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.sock.settimeout(max(deadline - time.monotonic(), 0.01))
            try:
                data = self.sock.recv(1 << 16)
            except (ConnectionError, ssl.SSLError):
                return True
            except TimeoutError:
                return False
            if not data:
                return True
            self.reader.feed(data)
        return False

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


@pytest.fixture(scope="session")
def proxy(certs, redis_server, tmp_path_factory):
    events: list = []
    creds = RotatingKey(REDIS_PASSWORD)
    loop = uvloop.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="proxy-loop", daemon=True)
    thread.start()
    holder: dict[str, Proxy] = {}
    upstream_ssl = ssl.create_default_context(cafile=certs.path("server-ca.pem"))

    async def send(batch):
        if holder["p"].send_fails[0]:
            raise ConnectionError("auth unreachable (test)")
        events.extend(batch)

    async def authorize(cert, peer) -> SessionContext:
        ident = identity_from_cert(cert)
        route = ident.route
        if route.service_name != DB:
            raise Refused(f'database "{route.service_name}" not found; run `cgate db ls`')
        roles = RoleSet([ROLES[r] for r in ident.roles if r in ROLES],
                        {"db_users": list(ident.db_users), "db_names": list(ident.db_names)})
        over = holder["p"].overrides.get(ident.name, {})
        target = over.get("target") or UpstreamTarget(DB, "127.0.0.1", redis_server.port, upstream_ssl)
        decision = roles.check_database(DB, {"env": "test"}, route.db_user)
        if not decision:
            raise Refused(decision.reason)
        return SessionContext(
            user=ident.name, database=DB, db_user=route.db_user, db_name=route.db_name, roles=roles,
            db_labels={"env": "test"}, target=target, credentials=over.get("credentials", creds),
            lock_check=over.get("lock_check"), client_idle_timeout=over.get("idle"),
            disconnect_expired_cert=over.get("disconnect_expired_cert"), cluster=over.get("cluster", False),
        )

    limits = ProxyLimits(max_bulk_len=8 * 1024 * 1024, max_request=16 * 1024 * 1024,
                         tls_handshake_timeout=3, upstream_connect_timeout=2, sessions_per_user=8,
                         refusal_linger=1.0)
    spool_dir = tmp_path_factory.mktemp("spool")

    async def start():
        spool = AuditSpool(send, spool_dir, batch_size=1000, flush_interval=0.05, retry_interval=0.2,
                           send_timeout=2)
        await spool.start()
        proxy_dir = Path(certs.dir)
        listener = RespListener(
            authorize, spool, cert_pem=(proxy_dir / "proxy.crt").read_bytes(),
            key_pem=(proxy_dir / "proxy.key").read_bytes(),
            client_ca_pem=certs.user_ca.cert_pem, limits=limits,
        )
        port = await listener.start()
        return spool, listener, port

    spool, listener, port = asyncio.run_coroutine_threadsafe(start(), loop).result(20)
    p = Proxy(port, loop, listener, spool, events, certs, creds)
    holder["p"] = p
    yield p
    try:
        p.call(listener.close(2))
        p.call(spool.close(5))
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)


@pytest.fixture
def alice(certs):
    return certs.user_cert("alice")
