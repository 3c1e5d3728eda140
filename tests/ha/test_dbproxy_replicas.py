"""dbproxy replicas are stateless: two dbproxy processes on one auth behind one TCP address
(a small round-robin balancer here, as a TCP load balancer would be): a user who logged in
through the balancer gets database certificates from either replica and runs sessions on
either; sessions through the balancer land on both; kill -9 of one and new sessions and
logins through the balancer still work. One of them joins through a list of join
addresses whose first one is dead.

`cgctl status` lists each replica by its heartbeat, and marks the killed one stale; each
replica's own sessions are listed with `cgctl sessions ls --proxy-api`."""

from __future__ import annotations

import asyncio
import json
import signal
import threading

import pytest

from tests.dbproxy.conftest import REDIS_PASSWORD, RawClient, certs, redis_server  # noqa: F401 (fixtures)
from tests.helpers import Cluster, free_port, run_cli
from tests.integration.test_dataplane import PASSWORD, SECRET_ENV, db_cert, login_user

pytestmark = pytest.mark.slow


class Balancer:
    """TCP round robin over backends; a backend that refuses the connection is skipped."""

    def __init__(self, backends: list[int]):
        self.backends = backends
        self.port = free_port()
        self.n = 0
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        assert self.ready.wait(10)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.server = self.loop.run_until_complete(asyncio.start_server(self._conn, "127.0.0.1", self.port))
        self.ready.set()
        self.loop.run_forever()

    async def _conn(self, reader, writer) -> None:
        for _ in range(len(self.backends)):
            port = self.backends[self.n % len(self.backends)]
            self.n += 1
            try:
                up_r, up_w = await asyncio.open_connection("127.0.0.1", port)
                break
            except OSError:
                continue
        else:
            writer.close()
            return

        async def pipe(src, dst):
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                dst.close()

        await asyncio.gather(pipe(reader, up_w), pipe(up_r, writer))

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


def ping(port: int, cert) -> bytes:
    raw = RawClient(port, cert[2], (cert[0], cert[1]))
    try:
        raw.send(b"*1\r\n$4\r\nPING\r\n")
        return raw.read(1)[0]
    finally:
        raw.sock.close()


def sessions_on(c: Cluster, api: str) -> int:
    return len(json.loads(c.cgctl("sessions", "ls", "--proxy-api", api, "--format=json").stdout))


async def status_until(c, done, timeout: float = 15.0) -> dict:
    """``cgctl status``'s proxies as {host: (stale, sessions)}, once ``done`` says so (or at timeout)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        res = await asyncio.to_thread(c.cgctl, "status", "--format=json")
        proxies = {p["host"]: (p["stale"], p["sessions"]) for p in json.loads(res.stdout)["proxies"]}
        if done(proxies) or loop.time() > deadline:
            return proxies
        await asyncio.sleep(0.5)


async def test_two_dbproxy_behind_one_address_are_interchangeable(cluster, tmp_path, certs, redis_server):  # noqa: F811
    c = cluster
    c.start_auth()
    token = c.token("proxy", "--reusable")
    procs = []
    for tag in ("dbproxy-a", "dbproxy-b"):
        cfg = c.joiner_config("dbproxy", token, data_dir=tmp_path / tag, database_ca_files=[certs.path("server-ca.pem")],
                              heartbeat_interval="1s")
        if tag == "dbproxy-b":
            # Joining tries each join address: the first one listed answers nothing. The dead
            # auth address is skipped by every call; the live one is a name, resolved at start.
            dead = f"127.0.0.1:{free_port()}"
            cfg["join_server"] = [dead, f"localhost:{c.auth.info['join_port']}"]
            cfg["auth_server"] = [dead, f"localhost:{c.auth.info['mesh_port']}"]
        p = c.proc("dbproxy", cfg, tag)
        p.extra_env = {SECRET_ENV: REDIS_PASSWORD}
        procs.append(p.start())
    a, b = procs
    assert a.info["host_id"] != b.info["host_id"]
    assert "trying the next one" in b.output()
    public = Balancer([p.info["public_port"] for p in procs])
    resp = Balancer([p.info["redis_port"] for p in procs])
    try:
        c.cgctl("create", "-f", "-", input=f"""kind: role
version: v1
metadata: {{name: shop}}
spec:
  allow:
    db_labels: {{env: prod}}
    db_users: ['{{{{internal.db_users}}}}']
    db_commands: ['*']
---
kind: db
version: v1
metadata: {{name: orders, labels: {{env: prod}}}}
spec: {{uri: "127.0.0.1:{redis_server.port}", tls: true, secret: "env:{SECRET_ENV}"}}
""")
        c.proxy = f"127.0.0.1:{public.port}"
        c.home = tmp_path / "home"
        folder = login_user(c, "alice", "--roles=shop", "--db-users=default")  # through the balancer

        # The session certificate works on either replica's API; either one's database
        # certificate works on either replica's RESP port.
        cert_by = {}
        for p in procs:
            c.api = f"127.0.0.1:{p.info['api_port']}"
            cert_by[p.info["host_id"]] = await db_cert(c, folder, "orders", "default")
        for cert in cert_by.values():
            for p in procs:
                assert ping(p.info["redis_port"], cert) == b"PONG"

        # Sessions through the balancer land on both replicas.
        cert = next(iter(cert_by.values()))
        held = [RawClient(resp.port, cert[2], (cert[0], cert[1])) for _ in range(4)]
        for h in held:
            h.send(b"*1\r\n$4\r\nPING\r\n")
            assert h.read(1)[0] == b"PONG"
        counts = [sessions_on(c, f"127.0.0.1:{p.info['api_port']}") for p in procs]
        assert counts == [2, 2], counts
        # cgctl status shows each replica, by its heartbeat.
        hosts = {p.info["host_id"] for p in procs}
        status = await status_until(c, lambda ps: {h for h, (stale, n) in ps.items() if not stale and n == 2} == hosts)
        assert {h for h, (stale, n) in status.items() if not stale and n == 2} == hosts, status
        for h in held:
            h.sock.close()

        # One replica dies: new sessions and logins through the balancer go to the other.
        a.stop(signal.SIGKILL)
        for _ in range(4):
            assert ping(resp.port, cert) == b"PONG"
        # ... and cgctl status marks the dead one stale (three missed heartbeats).
        dead_id = a.info["host_id"]
        status = await status_until(c, lambda ps: ps.get(dead_id, (False, 0))[0])
        assert status[dead_id][0] and not status[b.info["host_id"]][0], status
        res = run_cli("cgate", "login", f"--proxy={c.proxy}", "--user=alice", "--password-stdin",
                      input=PASSWORD + "\n", extra_env={"CACHEGATE_HOME": str(c.home)})
        assert "alice" in res.stdout + res.stderr
    finally:
        public.close()
        resp.close()
