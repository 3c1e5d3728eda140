"""Two auth processes on one PostgreSQL, reached by dbproxy through the documented
multi-address setting (``auth_server: [a, b]``): calls are spread over both; kill -9 either
one while a session runs commands and a user logs in over and over, and nothing fails, no
audit event is lost (the audit log counted against the commands Redis ran); the killed one
comes back and gets calls again; a PostgreSQL restart under it all is not seen either."""

from __future__ import annotations

import asyncio
import signal
import threading
import time

import grpc
import pytest

from cachegate.auth.v1 import audit_service_pb2, user_service_pb2
from cachegate.dbproxy.v1 import proxy_service_pb2_grpc
from services.common.authclient import AuthClient
from services.common.creds import Creds
from services.common.pki import make_csr, new_key
from tests.auth.test_pgbackend import pg  # noqa: F401 (fixture)
from tests.dbproxy.conftest import REDIS_PASSWORD, RawClient, certs, redis_server  # noqa: F401 (fixtures)
from tests.helpers import Cluster, free_port, run_cli
from tests.integration.test_dataplane import PASSWORD, SECRET_ENV, db_cert, login_user

pytestmark = pytest.mark.slow

ROLE = """kind: role
version: v1
metadata: {name: shop}
spec:
  allow:
    db_labels: {env: prod}
    db_users: ['{{internal.db_users}}']
    db_names: ['{{internal.db_names}}']
    db_commands: ['*']
"""


def _incr(key: str) -> bytes:
    return f"*2\r\n$4\r\nINCR\r\n${len(key)}\r\n{key}\r\n".encode()


class Load:
    """A live RESP session running INCR every 20 ms and a user logging in every 100 ms, each
    in its own thread, until stopped; every failure is kept."""

    def __init__(self, c, session_cert, key: str):
        self.stop = threading.Event()
        self.failures: list[str] = []
        self.incr_ok = 0
        self.logins_ok = 0
        self.key = key
        self.raw = RawClient(c.redis_port, session_cert[2], (session_cert[0], session_cert[1]))
        ca = (c.home / "profiles" / c.proxy.replace(":", "_") / "cas.pem").read_bytes()
        self.channel = grpc.secure_channel(c.proxy, grpc.ssl_channel_credentials(root_certificates=ca),
                                           options=[("grpc.ssl_target_name_override", "dbproxy.cachegate.internal")])
        self.threads = [threading.Thread(target=self._session, daemon=True),
                        threading.Thread(target=self._logins, daemon=True)]

    def _session(self) -> None:
        while not self.stop.is_set():
            try:
                self.raw.send(_incr(self.key))
                reply = self.raw.read(1, timeout=10)[0]
            except Exception as exc:  # noqa: BLE001
                self.failures.append(f"session: {exc!r}")
                return
            if not isinstance(reply, int):
                self.failures.append(f"session: {reply!r}")
                return
            self.incr_ok += 1
            self.stop.wait(0.02)

    def _logins(self) -> None:
        stub = proxy_service_pb2_grpc.ProxyServiceStub(self.channel)
        csr = make_csr(new_key(), "alice").decode()
        while not self.stop.is_set():
            try:
                stub.Login(user_service_pb2.LoginRequest(user="alice", password=PASSWORD, csr_pem=csr), timeout=20)
                self.logins_ok += 1
            except grpc.RpcError as exc:
                self.failures.append(f"login: {exc.code().name}: {exc.details()}")
            self.stop.wait(0.1)

    def __enter__(self) -> "Load":
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(30)
        self.raw.close() if hasattr(self.raw, "close") else self.raw.sock.close()
        self.channel.close()


def auth_logins(proc, after: int = 0) -> int:
    """Login calls this auth process served (its access log), in its log after byte ``after``."""
    return proc.output()[after:].count("UserService/Login")



def wait_until(what: str, check, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"{what}: not within {timeout:g}s"
        time.sleep(0.2)


async def audit_count(addrs: str, identity: str, type_: str, user: str) -> int:
    n, page = 0, ""
    async with AuthClient(addrs, Creds.from_identity_file(identity)) as auth:
        while True:
            resp = await auth.audit.SearchAuditEvents(audit_service_pb2.SearchAuditEventsRequest(
                types=[type_], user=user, page_size=1000, page_token=page), timeout=20)
            n += sum(1 for e in resp.events if e.success or type_ == "db.session.query")
            page = resp.next_page_token
            if not page:
                return n


def test_kill_9_either_auth_and_restart_postgres_under_sessions_and_logins(
        tmp_path, pg, certs, redis_server):  # noqa: F811
    dsn = pg.new_database()
    c = Cluster(tmp_path)
    ports = {"auth": (free_port(), free_port()), "auth-b": (free_port(), free_port())}
    try:
        for tag, (mesh, join) in ports.items():
            cfg = c.base(auth_service={"enabled": True, "cluster_name": "ha", "listen_addr": f"127.0.0.1:{mesh}",
                                       "join_listen_addr": f"127.0.0.1:{join}",
                                       "storage": {"type": "postgres", "conn_string": dsn}})
            cfg["data_dir"] = str(tmp_path / tag)
            c.proc("auth", cfg, tag).start()
        a, b = c.procs["auth"], c.procs["auth-b"]
        both = ",".join(f"127.0.0.1:{m}" for m, _ in ports.values())

        token = c.token("proxy")
        cfg = c.joiner_config("dbproxy", token, database_ca_files=[certs.path("server-ca.pem")])
        # The documented multi-address setting (docs/ha.md): a list of auth addresses.
        cfg["auth_server"] = [f"127.0.0.1:{m}" for m, _ in ports.values()]
        cfg["join_server"] = [f"127.0.0.1:{j}" for _, j in ports.values()]
        proxy = c.proc("dbproxy", cfg)
        proxy.extra_env = {SECRET_ENV: REDIS_PASSWORD}
        proxy.start()
        c.proxy = f"127.0.0.1:{proxy.info['public_port']}"
        c.api = f"127.0.0.1:{proxy.info['api_port']}"
        c.redis_port = proxy.info["redis_port"]
        c.home = tmp_path / "home"
        c.cgctl("create", "-f", "-", input=ROLE + f"""---
kind: db
version: v1
metadata: {{name: orders, labels: {{env: prod}}}}
spec: {{uri: "127.0.0.1:{redis_server.port}", tls: true, secret: "env:{SECRET_ENV}"}}
""")
        folder = login_user(c, "alice", "--roles=shop", "--db-users=default")
        cert = asyncio.run(db_cert(c, folder, "orders", "default"))
        key = f"ha:{time.time_ns()}"

        with Load(c, cert, key) as load:
            # Spread: both auth processes serve logins.
            wait_until("logins on both auth processes", lambda: auth_logins(a) >= 3 and auth_logins(b) >= 3)
            for victim in (a, b):
                victim.stop(signal.SIGKILL)
                before = load.logins_ok
                wait_until("logins to go on through the other auth", lambda: load.logins_ok >= before + 5)
                mark = len(victim.output())
                victim.start()
                if victim is a:
                    # It comes back: logins reach it again (reconnect backoff at most 5 s).
                    wait_until("the restarted auth to serve logins again", lambda: auth_logins(victim, mark) >= 2,
                               timeout=30)
            before = load.logins_ok
            pg.restart()
            wait_until("logins after the PostgreSQL restart", lambda: load.logins_ok >= before + 5)
            assert not load.failures, load.failures
        assert not load.failures, load.failures
        assert load.incr_ok > 50 and load.logins_ok >= 20

        # Redis ran exactly the commands the session got replies for...
        check = RawClient(c.redis_port, cert[2], (cert[0], cert[1]))
        check.send(f"*2\r\n$3\r\nGET\r\n${len(key)}\r\n{key}\r\n".encode())
        assert int(check.read(1)[0]) == load.incr_ok
        # ...and the audit log has one db.session.query for each (the GET is the last one).
        ident = c.admin_identity
        deadline = time.monotonic() + 30
        while (n := asyncio.run(audit_count(both, ident, "db.session.query", "alice"))) < load.incr_ok + 1:
            assert time.monotonic() < deadline, f"{n} query events for {load.incr_ok + 1} commands"
            time.sleep(0.5)
        assert n == load.incr_ok + 1
        assert asyncio.run(audit_count(both, ident, "user.login", "alice")) >= load.logins_ok
        # Admin calls after it all: cgctl with both addresses, and through each one alone.
        for addr in [both, *both.split(",")]:
            assert "alice" in run_cli("cgctl", "--auth-server", addr, "-i", ident, "users", "ls").stdout
        check.sock.close()
    finally:
        c.stop()
