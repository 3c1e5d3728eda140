"""One real Cachegate cluster for the compatibility suite, and the three paths to Redis.

* ``direct``: redis-server itself (TLS, requirepass), the reference every other run is
  compared with;
* ``resp``: dbproxy's RESP port with the user's database certificate (TLS + client cert);
* ``tunnel``: plaintext to ``cgate proxy db --tunnel`` on loopback.

The cluster is the one of tests/cli/test_cgate_db_e2e.py: auth and dbproxy processes, a
static ``kind: db`` record, a user with the built-in ``access`` role (``--db-users=*
--db-names=*``) and a second role naming ``MONITOR`` (server administration, which ``'*'``
does not cover: see docs/rbac.md), ``cgate login`` and ``cgate db login``.
"""

from __future__ import annotations

import datetime as dt
import json
import re
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from cachegate.types.v1 import types_pb2

from services.common import pki
from tests.helpers import REPO, Cluster, free_port, run_cli, tool, write_yaml
from tests.helpers import env as base_env

PASSWORD = "correct horse battery staple 42"
REDIS_PASSWORD = "compat-Redis-Secret-7"
SECRET_ENV = "CACHEGATE_DB_COMPAT_REDIS"
DB = "compat-redis"
TARGETS = ("direct", "resp", "tunnel")


@dataclass
class Target:
    """How a client reaches Redis on one path: redis-py keyword arguments and redis-cli flags."""

    name: str
    host: str
    port: int
    password: str | None = None
    tls: dict = field(default_factory=dict)  # redis-py ssl_* keyword arguments
    cli_args: list[str] = field(default_factory=list)

    def kwargs(self, protocol: int = 2, **kw) -> dict:
        out = {"host": self.host, "port": self.port, "protocol": protocol, "socket_timeout": 15,
               "socket_connect_timeout": 15}
        if self.password:
            out["password"] = self.password
        if self.tls:
            out.update(ssl=True, **self.tls)
        out.update(kw)
        return out

    def redis(self, protocol: int = 2, **kw):
        import redis

        return redis.Redis(**self.kwargs(protocol, **kw))

    def aredis(self, protocol: int = 2, **kw):
        import redis.asyncio

        return redis.asyncio.Redis(**self.kwargs(protocol, **kw))

    def connection(self, protocol: int = 2, **kw):
        """A single redis-py Connection (for push and tracking tests at the frame level)."""
        import redis

        args = self.kwargs(protocol, **kw)
        if args.pop("ssl", False):
            return redis.SSLConnection(**args)
        return redis.Connection(**args)

    def pool(self, protocol: int = 2, **kw):
        import redis

        args = self.kwargs(protocol, **kw)
        if args.pop("ssl", False):
            args["connection_class"] = redis.SSLConnection
        return redis.ConnectionPool(**args)

    def cli(self, *args: str, input: str | bytes | None = None, timeout: float = 20) -> subprocess.CompletedProcess:
        text = not isinstance(input, bytes)
        return subprocess.run(["redis-cli", *self.cli_args, *args], input=input, capture_output=True, text=text,
                              timeout=timeout, check=False)


@dataclass
class Compat:
    cluster: Cluster
    redis_dir: Path
    targets: dict[str, Target]
    tunnel_err: Path

    def __getitem__(self, name: str) -> Target:
        return self.targets[name]

    @property
    def direct(self) -> Target:
        return self.targets["direct"]


def _start_redis(d: Path) -> tuple[subprocess.Popen, Target]:
    ca = pki.CertAuthority.create("compat redis CA", "cachegate-test")
    key = pki.new_key()
    cert = ca.sign(key.public_key(), "redis", types_pb2.Identity(kind=types_pb2.IDENTITY_KIND_HOST, name="redis"),
                   dt.timedelta(days=1), ips=["127.0.0.1"], dns_names=["localhost"], server=True)
    (d / "ca.pem").write_bytes(ca.cert_pem)
    (d / "redis.crt").write_bytes(pki.cert_to_pem(cert))
    (d / "redis.key").write_bytes(pki.key_to_pem(key))
    port = free_port()
    log = open(d / "redis.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        ["redis-server", "--port", "0", "--bind", "127.0.0.1", "--tls-port", str(port),
         "--tls-cert-file", str(d / "redis.crt"), "--tls-key-file", str(d / "redis.key"),
         "--tls-ca-cert-file", str(d / "ca.pem"), "--tls-auth-clients", "no", "--requirepass", REDIS_PASSWORD,
         "--save", "", "--appendonly", "no", "--dir", str(d), "--maxclients", "2000"],
        stdout=log, stderr=subprocess.STDOUT)
    log.close()
    ca_file = str(d / "ca.pem")
    target = Target("direct", "127.0.0.1", port, REDIS_PASSWORD, {"ssl_ca_certs": ca_file},
                    ["-h", "127.0.0.1", "-p", str(port), "--tls", "--cacert", ca_file, "--no-auth-warning",
                     "-a", REDIS_PASSWORD])
    deadline = time.monotonic() + 15
    while target.cli("PING").stdout.strip() != "PONG":
        if time.monotonic() > deadline or proc.poll() is not None:
            proc.kill()
            raise RuntimeError("redis-server did not start: " + (d / "redis.log").read_text()[-2000:])
        time.sleep(0.1)
    return proc, target


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def cgate(home: Path, *args: str, input: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    return run_cli("cgate", *args, input=input, check=check, timeout=60, extra_env={"CACHEGATE_HOME": str(home)})


@pytest.fixture(scope="module")
def compat(tmp_path_factory):
    root = tmp_path_factory.mktemp("compat")
    rdir = root / "redis"
    rdir.mkdir()
    redis_proc, direct = _start_redis(rdir)
    cl = Cluster(root)
    tunnel_proc = None
    try:
        cl.start_auth()
        proxy = cl.start_joiner("dbproxy", cl.token("proxy"), extra_env={SECRET_ENV: REDIS_PASSWORD},
                                database_ca_files=[str(rdir / "ca.pem")])
        proxy_addr = f"127.0.0.1:{proxy.info['public_port']}"
        home = root / "home"
        docs = [
            {"kind": "db", "version": "v1",
             "metadata": {"name": DB, "description": "compatibility suite", "labels": {"env": "test"}},
             "spec": {"protocol": "redis", "uri": f"127.0.0.1:{direct.port}", "tls": True,
                      "ca_cert_file": str(rdir / "ca.pem"), "secret": f"env:{SECRET_ENV}"}},
            {"kind": "role", "version": "v1", "metadata": {"name": "compat-monitor"},
             "spec": {"allow": {"db_labels": {"*": "*"}, "db_users": ["{{internal.db_users}}"],
                                "db_names": ["{{internal.db_names}}"], "db_commands": ["MONITOR"]}}},
        ]
        for i, doc in enumerate(docs):
            cl.cgctl("create", "-f", str(write_yaml(root / f"doc{i}.yaml", doc)))
        data = json.loads(cl.cgctl("users", "add", "compat", "--roles=access,compat-monitor", "--db-users=*",
                                   "--db-names=*", "--format=json").stdout)
        cgate(home, "login", f"--proxy={proxy_addr}", f"--invite={data['invite']}", f"--ca-pin={cl.ca_pin}",
              "--password-stdin", input=PASSWORD + "\n")
        deadline = time.monotonic() + 30
        while True:  # dbproxy learns databases by watching auth
            res = cgate(home, "db", "login", DB, check=False)
            if res.returncode == 0:
                break
            if time.monotonic() > deadline:
                raise AssertionError(f"cgate db login failed: {res.stdout}\n{res.stderr}")
            time.sleep(0.3)
        cfg = json.loads(cgate(home, "db", "config", DB, "--format=json").stdout)
        resp = Target("resp", cfg["host"], int(cfg["port"]), None,
                      {"ssl_ca_certs": cfg["ca"], "ssl_certfile": cfg["cert"], "ssl_keyfile": cfg["key"]},
                      ["-h", cfg["host"], "-p", str(cfg["port"]), "--tls", "--cacert", cfg["ca"],
                       "--cert", cfg["cert"], "--key", cfg["key"]])

        out, err = root / "tunnel.out", root / "tunnel.err"
        with open(out, "wb") as fo, open(err, "wb") as fe:
            tunnel_proc = subprocess.Popen([tool("cgate"), "proxy", "db", "--tunnel", DB, "--port", "0"],
                                           stdout=fo, stderr=fe, cwd=REPO, env=base_env(CACHEGATE_HOME=str(home)))
        deadline = time.monotonic() + 30
        while True:
            m = re.search(r"Started authenticated tunnel .* on 127\.0\.0\.1:(\d+)", out.read_text())
            if m:
                break
            if tunnel_proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"tunnel did not start:\n{out.read_text()}\n{err.read_text()}")
            time.sleep(0.1)
        tport = int(m.group(1))
        tunnel = Target("tunnel", "127.0.0.1", tport, None, {}, ["-h", "127.0.0.1", "-p", str(tport)])
        yield Compat(cl, rdir, {"direct": direct, "resp": resp, "tunnel": tunnel}, err)
    finally:
        if tunnel_proc is not None:
            _stop(tunnel_proc)
        cl.stop()
        _stop(redis_proc)
