"""The cluster the reliability tests break: auth, dbproxy (and discovery when asked) as real
processes on fixed ports (so a restarted one is where the others expect it), a real TLS
redis-server with a password that tests may kill and restart on the same port, users
logged in through `cgate login`, and helpers that count what Redis and the audit log saw.

``CACHEGATE_RELIABILITY=full`` turns on the long variants (docs/reliability.md)."""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import signal
import ssl
import subprocess
import time
from pathlib import Path

import redis

from cachegate.types.v1 import types_pb2
from services.common import pki
from tests.helpers import Cluster, free_port, run_cli, write_yaml
from tests.integration.test_dataplane import db_cert

FULL = os.environ.get("CACHEGATE_RELIABILITY", "").lower() == "full"
PASSWORD = "reliability user password 7"
REDIS_PASSWORD = "rel-Redis-Secret-5521"
SECRET_ENV = "CACHEGATE_DB_ORDERS"
DB = "orders"
STATIC_DB = "static-orders"  # published by discovery from its static config


def wait_for(pred, what: str, timeout: float = 20.0, interval: float = 0.1):
    deadline = time.monotonic() + timeout
    while True:
        got = pred()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def run_sync(coro):
    """Run ``coro`` to completion from sync code, also when called inside a running loop."""
    import asyncio
    import concurrent.futures

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    with concurrent.futures.ThreadPoolExecutor(1) as ex:
        return ex.submit(asyncio.run, coro).result()


class RedisProc:
    """redis-server with TLS and requirepass on a fixed port; kill() and start() again."""

    def __init__(self, root: Path, port: int | None = None):
        self.dir = root
        root.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        ca = pki.CertAuthority.create("reliability redis CA", "cachegate-test")
        key = pki.new_key()
        cert = ca.sign(key.public_key(), "redis", types_pb2.Identity(kind=types_pb2.IDENTITY_KIND_HOST, name="redis"),
                       dt.timedelta(days=1), ips=["127.0.0.1"], dns_names=["localhost"], server=True)
        self.ca = str(root / "ca.pem")
        (root / "ca.pem").write_bytes(ca.cert_pem)
        (root / "redis.crt").write_bytes(pki.cert_to_pem(cert))
        (root / "redis.key").write_bytes(pki.key_to_pem(key))
        self.proc: subprocess.Popen | None = None

    def start(self) -> "RedisProc":
        d = self.dir
        log = open(d / "redis.log", "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            ["redis-server", "--port", "0", "--bind", "127.0.0.1", "--tls-port", str(self.port),
             "--tls-cert-file", str(d / "redis.crt"), "--tls-key-file", str(d / "redis.key"),
             "--tls-ca-cert-file", self.ca, "--tls-auth-clients", "no", "--requirepass", REDIS_PASSWORD,
             "--save", "", "--appendonly", "no", "--dir", str(d), "--maxclients", "10000"],
            stdout=log, stderr=subprocess.STDOUT)

        def up():
            try:
                return self.client(socket_timeout=2).ping()
            except redis.RedisError:
                assert self.proc.poll() is None, (d / "redis.log").read_text()[-2000:]
                return False

        wait_for(up, "redis-server to start", 15, 0.05)
        return self

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def client(self, **kw) -> redis.Redis:
        kw.setdefault("socket_timeout", 10)
        return redis.Redis(host="127.0.0.1", port=self.port, password=REDIS_PASSWORD, ssl=True,
                           ssl_ca_certs=self.ca, **kw)

    def commandstats(self) -> dict[str, int]:
        """calls per command (lower case, `client|id` style) since the last CONFIG RESETSTAT."""
        with self.client() as r:
            stats = r.info("commandstats")
        return {k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in stats.items()}

    def reset_stats(self) -> None:
        with self.client() as r:
            r.config_resetstat()


class Stack:
    """auth + dbproxy + redis, users logged in. ``start()`` once per module."""

    def __init__(self, root: Path, users: tuple[str, ...] = ("alice",), *, discovery: bool = False,
                 auth_kw: dict | None = None, heartbeat: str | None = "0.5s"):
        self.root = root
        self.c = Cluster(root)
        self.users = users
        self.with_discovery = discovery
        self.auth_kw = auth_kw or {}
        self.heartbeat = heartbeat
        self.redis = RedisProc(root / "redis")
        self.folders: dict[str, Path] = {}
        self.certs: dict[str, tuple[str, str, str]] = {}
        self.metrics_port = free_port()

    # --- lifecycle ------------------------------------------------------------------------------
    def start(self) -> "Stack":
        c = self.c
        self.redis.start()
        c.start_auth(listen_addr=f"127.0.0.1:{free_port()}", join_listen_addr=f"127.0.0.1:{free_port()}",
                     **self.auth_kw)
        fixed = {"listen_addr": f"127.0.0.1:{free_port()}", "api_listen_addr": f"127.0.0.1:{free_port()}",
                 "redis_listen_addr": f"127.0.0.1:{free_port()}", "web_listen_addr": f"127.0.0.1:{free_port()}"}
        extra = {"heartbeat_interval": self.heartbeat} if self.heartbeat else {}
        cfg = c.joiner_config("dbproxy", c.token("proxy"), database_ca_files=[self.redis.ca],
                              limits={"sessions_per_user": 2000, "max_sessions": 8000}, **fixed, **extra)
        cfg["telemetry"] = {"metrics": "prometheus", "prometheus_listen_addr": f"127.0.0.1:{self.metrics_port}"}
        proxy = c.proc("dbproxy", cfg)
        proxy.extra_env = {**proxy.extra_env, SECRET_ENV: REDIS_PASSWORD}
        proxy.start()
        c.proxy = f"127.0.0.1:{proxy.info['public_port']}"
        c.api = f"127.0.0.1:{proxy.info['api_port']}"
        c.redis_port = proxy.info["redis_port"]
        c.home = self.root / "home"
        if self.with_discovery:
            static = [{"name": STATIC_DB, "uri": f"127.0.0.1:{self.redis.port}", "tls": True, "ca_file": self.redis.ca,
                       "secret": f"env:{SECRET_ENV}", "labels": {"env": "test"}}]
            c.start_joiner("discovery", c.token("discovery"), poll_interval="1s", static=static,
                           listen_addr=f"127.0.0.1:{free_port()}")
        self.create_db(DB, self.redis.port)
        for u in self.users:
            self.login(u)
        return self

    def create_db(self, name: str, port: int) -> None:
        doc = {"kind": "db", "version": "v1", "metadata": {"name": name, "labels": {"env": "test"}},
               "spec": {"protocol": "redis", "uri": f"127.0.0.1:{port}", "tls": True,
                        "ca_cert_file": self.redis.ca, "secret": f"env:{SECRET_ENV}"}}
        self.c.cgctl("create", "-f", str(write_yaml(self.root / f"{name}.yaml", doc)))

    def stop(self) -> None:
        self.c.stop()
        self.redis.kill()

    @property
    def proxy(self):
        return self.c.procs["dbproxy"]

    @property
    def auth(self):
        return self.c.procs["auth"]

    # --- users --------------------------------------------------------------------------------
    def cgate(self, *args, check=True, input=None, timeout=60):
        return run_cli("cgate", *args, input=input, check=check, timeout=timeout,
                       extra_env={"CACHEGATE_HOME": str(self.c.home)})

    def login(self, user: str) -> None:
        c = self.c
        data = json.loads(c.cgctl("users", "add", user, "--roles=access", "--db-users=*", "--db-names=*",
                                  "--format=json").stdout)
        home = self.root / f"home-{user}"
        run_cli("cgate", "login", f"--proxy={c.proxy}", f"--invite={data['invite']}", f"--ca-pin={c.ca_pin}",
                "--password-stdin", input=PASSWORD + "\n", extra_env={"CACHEGATE_HOME": str(home)})
        self.folders[user] = home / "profiles" / c.proxy.replace(":", "_")
        if user == self.users[0]:
            c.home = home

    def cert(self, user: str, db: str = DB) -> tuple[str, str, str]:
        """A database certificate of ``user`` (as `cgate db login` gets it), cached."""
        key = (user, db)
        if key not in self.certs:
            self.certs[key] = run_sync(db_cert(self.c, self.folders[user], db, "default"))
        return self.certs[key]

    def client(self, cert: tuple[str, str, str], **kw) -> redis.Redis:
        crt, key, ca = cert
        kw.setdefault("socket_timeout", 10)
        return redis.Redis(host="127.0.0.1", port=self.c.redis_port, ssl=True, ssl_certfile=crt, ssl_keyfile=key,
                           ssl_ca_certs=ca, **kw)

    def tls_context(self, cert: tuple[str, str, str]) -> ssl.SSLContext:
        crt, key, ca = cert
        ctx = ssl.create_default_context(cafile=ca)
        ctx.load_cert_chain(crt, key)
        ctx.check_hostname = False
        return ctx

    # --- what the cluster says --------------------------------------------------------------------
    def status(self) -> dict:
        """What `cgctl status --format=json` prints under "proxies" and "discovery", read
        in-process (the same functions; no CLI start-up per poll)."""
        import asyncio

        from cachegate.auth.v1 import database_service_pb2 as dpb
        from services.cli import cgctl_db
        from services.cli.admin_conn import resolve
        from services.common.authclient import AuthClient

        async def get():
            conn = resolve(self.c.auth_addr, self.c.admin_identity, None)
            async with AuthClient(conn.auth_server, conn.creds) as a:
                proxies = (await a.databases.ListProxyStatuses(dpb.ListProxyStatusesRequest(), timeout=10)).proxies
                hosts = (await a.databases.ListFetcherStatuses(dpb.ListFetcherStatusesRequest(), timeout=10)).hosts
            return {"proxies": cgctl_db.proxy_statuses_to_list(proxies),
                    "discovery": cgctl_db.fetcher_statuses_to_list(hosts)}

        return run_sync(get())

    def proxy_health(self, db: str = DB) -> dict | None:
        for p in self.status()["proxies"]:
            for h in p["databases"]:
                if h["database"] == db:
                    return h
        return None

    def metrics(self) -> str:
        import urllib.request

        return urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10).read().decode()

    def metric(self, name: str, **labels) -> float:
        total = 0.0
        for m in re.finditer(rf"^{re.escape(name)}\{{([^}}]*)\}} ([0-9.e+-]+)$", self.metrics(), re.M):
            attrs = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1)))
            if all(attrs.get(k) == v for k, v in labels.items()):
                total += float(m.group(2))
        return total

    def audit_commands(self, since: float = 0.0) -> "collections.Counter[tuple[str, str, str]]":
        """Counter of (user, command, first argument) of the db.session.query events auth
        stored (read from its SQLite file, read-only: every event, however many)."""
        import collections
        import sqlite3

        from google.protobuf.json_format import MessageToDict

        path = self.c.data / "auth" / "cachegate.db"
        out: collections.Counter = collections.Counter()
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10) as db:
            rows = db.execute("SELECT actor, data FROM audit WHERE type = 'db.session.query' AND time >= ?",
                              (since,)).fetchall()
        for actor, data in rows:
            ev = types_pb2.AuditEvent()
            ev.ParseFromString(data)
            f = MessageToDict(ev.fields)
            args = [str(a) for a in f.get("args") or []]
            cmd = str(f.get("command", "")).upper()
            if args and args[0].upper() == cmd.split("|")[0]:
                args = args[1:]  # the command's name itself
            out[(actor, cmd, args[0] if args else "")] += 1
        return out

    def wait_audit(self, want: dict, since: float = 0.0, timeout: float = 40.0):
        """Waits until the stored counts of every (user, command, arg) in ``want`` reach it;
        returns the counts (a duplicate shows as more than wanted)."""
        got = {}

        def ok():
            nonlocal got
            allc = self.audit_commands(since)
            got = {k: allc.get(k, 0) for k in want}
            return all(got[k] >= v for k, v in want.items())

        try:
            wait_for(ok, f"audit events {want}", timeout, 0.5)
        except AssertionError:
            pass
        time.sleep(0.5)  # anything more would be a duplicate: let it arrive
        allc = self.audit_commands(since)
        return {k: allc.get(k, 0) for k in want}
