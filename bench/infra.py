"""The real parts the benchmark runs against, each started on free loopback ports.

- :func:`make_pki`: a throw-away CA with certificates for redis-server, stunnel's server side
  and a stunnel client (mutual TLS);
- :class:`Redis`: redis-server with TLS only and ``requirepass``;
- :class:`Stunnel`: Debian's stunnel4, mutual TLS in and TLS out to Redis;
- :class:`PgServer`: a throw-away PostgreSQL (initdb + pg_ctl);
- :class:`Cachegate`: real auth and dbproxy processes (``python -m services.cli.daemon start``),
  joined with a token; a user made with ``cgctl users add`` logs in with ``cgate login``, and
  ``cgate db login`` gets a real database certificate.

Everything is bounded in time; a missing tool is one line that says how to get it.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import glob
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
REDIS_PASSWORD = "bench-Redis-Pa55-not-secret"
PG_PASSWORD = "bench-Pg-Pa55-not-secret"
USER_PASSWORD = "bench user password 1234"
SECRET_ENV = "CACHEGATE_DB_BENCH_REDIS"
DB = "bench-redis"


class BenchError(SystemExit):
    """One line for the user, then exit 1."""

    def __init__(self, msg: str):
        super().__init__(f"bench: {msg}")


def need(tool: str, package: str) -> str:
    path = shutil.which(tool)
    if not path:
        raise BenchError(f"{tool} is not installed ({package}): run make setup")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def py_env(**extra: str) -> dict:
    """The environment for children: this tree's code first."""
    e = dict(os.environ)
    e["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "protos"), e.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    e.update(extra)
    return e


def wait_port(port: int, proc: subprocess.Popen, what: str, log: Path, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
            return
        if proc.poll() is not None or time.monotonic() > deadline:
            stop(proc)
            tail = log.read_text(errors="replace")[-1500:] if log.exists() else ""
            raise BenchError(f"{what} did not start on port {port}: {tail.strip().splitlines()[-1:] or ''}")
        time.sleep(0.05)


def stop(proc: subprocess.Popen | None, timeout: float = 15) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


# --------------------------------------------------------------------------------------------
# Certificates


def make_pki(d: Path) -> None:
    """ca.pem signs redis.crt, stunnel.crt (servers, 127.0.0.1) and client.crt (stunnel's client)."""
    from cachegate.types.v1 import types_pb2

    from services.common import pki

    ca = pki.CertAuthority.create("bench CA", "cachegate-bench")
    (d / "ca.pem").write_bytes(ca.cert_pem)
    for name, server in (("redis", True), ("stunnel", True), ("client", False)):
        key = pki.new_key()
        ident = types_pb2.Identity(kind=types_pb2.IDENTITY_KIND_HOST, name=name)
        kw = {"ips": ["127.0.0.1"], "dns_names": ["localhost"], "server": True} if server else {}
        cert = ca.sign(key.public_key(), name, ident, dt.timedelta(days=1), **kw)
        (d / f"{name}.crt").write_bytes(pki.cert_to_pem(cert))
        (d / f"{name}.key").write_bytes(pki.key_to_pem(key))
        (d / f"{name}.key").chmod(0o600)


# --------------------------------------------------------------------------------------------
# redis-server


class Redis:
    def __init__(self, d: Path):
        self.d = d
        self.port = free_port()
        self.proc: subprocess.Popen | None = None

    def start(self) -> Redis:
        need("redis-server", "Debian package redis-server")
        log = self.d / "redis.log"
        self.proc = subprocess.Popen(
            ["redis-server", "--port", "0", "--bind", "127.0.0.1", "--tls-port", str(self.port),
             "--tls-cert-file", str(self.d / "redis.crt"), "--tls-key-file", str(self.d / "redis.key"),
             "--tls-ca-cert-file", str(self.d / "ca.pem"), "--tls-auth-clients", "no",
             "--requirepass", REDIS_PASSWORD, "--save", "", "--appendonly", "no", "--dir", str(self.d),
             "--maxclients", "15000", "--logfile", str(log)],
            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        wait_port(self.port, self.proc, "redis-server", log)
        return self

    def cli(self, *args: str) -> str:
        r = subprocess.run(["redis-cli", "-p", str(self.port), "--tls", "--cacert", str(self.d / "ca.pem"),
                            "--no-auth-warning", "-a", REDIS_PASSWORD, *args],
                           capture_output=True, text=True, timeout=20, check=False)
        return r.stdout.strip()

    def stop(self) -> None:
        stop(self.proc)


# --------------------------------------------------------------------------------------------
# stunnel


class Stunnel:
    """Two services in one stunnel process: ``in`` takes mutual TLS (client certificate from
    ca.pem required) and forwards to ``out`` on loopback, which opens TLS to Redis (checked
    against ca.pem). The client still sends AUTH itself: stunnel does not know the password."""

    def __init__(self, d: Path, redis_port: int):
        self.d = d
        self.redis_port = redis_port
        self.port = free_port()
        self.hop = free_port()
        self.proc: subprocess.Popen | None = None

    def start(self) -> Stunnel:
        exe = need("stunnel4", "Debian package stunnel4")
        d = self.d
        conf = d / "stunnel.conf"
        conf.write_text(f"""foreground = yes
pid =
debug = 3
output = {d / 'stunnel.log'}
socket = l:TCP_NODELAY=1
socket = r:TCP_NODELAY=1

[in]
accept = 127.0.0.1:{self.port}
connect = 127.0.0.1:{self.hop}
cert = {d / 'stunnel.crt'}
key = {d / 'stunnel.key'}
CAfile = {d / 'ca.pem'}
verifyChain = yes
requireCert = yes
sslVersionMin = TLSv1.2

[out]
client = yes
accept = 127.0.0.1:{self.hop}
connect = 127.0.0.1:{self.redis_port}
CAfile = {d / 'ca.pem'}
verifyChain = yes
checkIP = 127.0.0.1
sslVersionMin = TLSv1.2
""")
        self.proc = subprocess.Popen([exe, str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        wait_port(self.port, self.proc, "stunnel4", d / "stunnel.log")
        return self

    def stop(self) -> None:
        stop(self.proc)


class Relay:
    """:mod:`bench.relay`: a plain TLS relay on uvloop in its own process, with stunnel's
    certificate and checks: the floor of a Python data plane, next to dbproxy."""

    def __init__(self, d: Path, redis_port: int):
        self.d = d
        self.redis_port = redis_port
        self.port = free_port()
        self.proc: subprocess.Popen | None = None

    def start(self) -> Relay:
        log = self.d / "relay.log"
        with open(log, "wb") as logf:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "bench.relay", "--port", str(self.port), "--redis-port", str(self.redis_port),
                 "--dir", str(self.d)], stdout=logf, stderr=subprocess.STDOUT, cwd=ROOT, env=py_env(),
                start_new_session=True)
        wait_port(self.port, self.proc, "the plain relay (bench.relay)", log)
        return self

    def stop(self) -> None:
        stop(self.proc)


# --------------------------------------------------------------------------------------------
# PostgreSQL


def pg_bindir() -> str:
    dirs = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(Path(p).parent.name), reverse=True)
    for d in dirs:
        if os.path.exists(os.path.join(d, "initdb")):
            return d
    found = shutil.which("initdb")
    if not found:
        raise BenchError("PostgreSQL is not installed (Debian package postgresql): run make setup")
    return os.path.dirname(found)


class PgServer:
    def __init__(self, d: Path):
        self.bindir = pg_bindir()
        self.root = d / "pg"
        self.data = self.root / "data"
        self.sock = self.root / "sock"
        self.log = self.root / "postgres.log"
        self.port = free_port()
        self.as_root = os.geteuid() == 0

    def _run(self, *cmd: str) -> None:
        full = [os.path.join(self.bindir, cmd[0]), *cmd[1:]]
        if self.as_root:  # PostgreSQL refuses to run as root
            full = ["runuser", "-u", "postgres", "--", *full]
        res = subprocess.run(full, check=False, capture_output=True, text=True, timeout=120)
        if res.returncode:
            raise BenchError(f"PostgreSQL {cmd[0]} failed ({res.returncode}): "
                             f"{(res.stderr or res.stdout).strip().splitlines()[-1:]}")

    def start(self) -> PgServer:
        self.root.mkdir()
        self.sock.mkdir()
        pwfile = self.root / "pw"
        pwfile.write_text(PG_PASSWORD + "\n")
        if self.as_root:
            for p in (self.root, self.sock, pwfile):
                shutil.chown(p, "postgres")
            self.root.parent.chmod(0o755)
        self.root.chmod(0o755)
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "-E", "UTF8", "--locale=C",
                  "--auth-local=trust", "--auth-host=scram-sha-256", f"--pwfile={pwfile}")
        # Durable commits stay on (fsync on, synchronous_commit on): auth's figure is what a
        # real deployment stores, not a RAM disk's.
        opts = f"-p {self.port} -k {self.sock} -c listen_addresses=127.0.0.1 -c max_connections=100"
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-o", opts, "-w", "-t", "60", "start")
        return self

    def dsn(self) -> str:
        return f"host=127.0.0.1 port={self.port} dbname=postgres user=postgres password={PG_PASSWORD}"

    def stop(self) -> None:
        with contextlib.suppress(BaseException):
            self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")


# --------------------------------------------------------------------------------------------
# The Cachegate cluster


class Daemon:
    """One ``cachegate start`` process (python -m services.cli.daemon)."""

    def __init__(self, name: str, d: Path, cfg: dict, extra_env: dict | None = None):
        self.name = name
        self.config = d / f"{name}.yaml"
        self.config.write_text(yaml.safe_dump(cfg, sort_keys=False))
        self.config.chmod(0o600)
        self.ready = d / f"{name}.ready.json"
        self.log = d / f"{name}.log"
        self.extra_env = extra_env or {}
        self.proc: subprocess.Popen | None = None
        self.info: dict = {}

    def start(self, service: str, timeout: float = 60) -> Daemon:
        with open(self.log, "ab") as logf:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "services.cli.daemon", "start", "-c", str(self.config),
                 "--ready-file", str(self.ready)],
                stdout=logf, stderr=subprocess.STDOUT, cwd=ROOT, env=py_env(**self.extra_env))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.ready.exists():
                self.info = json.loads(self.ready.read_text())[service]
                return self
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        stop(self.proc)
        last = [ln for ln in self.log.read_text(errors="replace").splitlines() if ln.strip()][-1:]
        raise BenchError(f"{self.name} did not start (see {self.log}): {last}")

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def stop(self) -> None:
        stop(self.proc, 20)


def cli(name: str, *args: str, home: Path | None = None, input: str | None = None, check: bool = True,
        timeout: float = 60) -> subprocess.CompletedProcess:
    """Run cgctl or cgate from this tree."""
    code = f"import sys; sys.argv[0] = {name!r}; from services.cli.{name} import main; main()"
    extra = {"CACHEGATE_HOME": str(home)} if home else {}
    res = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, input=input,
                         timeout=timeout, cwd=ROOT, env=py_env(**extra), check=False)
    if check and res.returncode != 0:
        err = (res.stderr or res.stdout).strip().splitlines()
        words = [a for a in (args[4:] if name == "cgctl" else args) if not a.startswith("-")][:2]
        raise BenchError(f"{name} {' '.join(words)} failed: {err[-1] if err else res.returncode}")
    return res


class Cachegate:
    """auth (SQLite, or PostgreSQL given a DSN) and optionally dbproxy, joined with a token."""

    def __init__(self, d: Path, tag: str = "cg"):
        self.d = d / tag
        self.d.mkdir(mode=0o700)
        self.tag = tag
        self.auth: Daemon | None = None
        self.proxy: Daemon | None = None
        self.home = self.d / "home"

    def base(self, data: str) -> dict:
        return {"version": "v1", "data_dir": str(self.d / data), "log": {"level": "warning", "format": "json"}}

    def start_auth(self, pg_dsn: str = "") -> Cachegate:
        section = {"enabled": True, "cluster_name": f"bench-{self.tag}", "listen_addr": "127.0.0.1:0",
                   "join_listen_addr": "127.0.0.1:0"}
        if pg_dsn:
            section["storage"] = {"type": "postgres", "conn_string": pg_dsn}
        self.auth = Daemon(f"{self.tag}-auth", self.d, {**self.base("auth-data"), "auth_service": section}).start("auth")
        return self

    @property
    def auth_addr(self) -> str:
        assert self.auth
        return f"127.0.0.1:{self.auth.info['mesh_port']}"

    @property
    def join_addr(self) -> str:
        assert self.auth
        return f"127.0.0.1:{self.auth.info['join_port']}"

    @property
    def ca_pin(self) -> str:
        assert self.auth
        return self.auth.info["ca_pin"]

    def cgctl(self, *args: str, input: str | None = None) -> str:
        assert self.auth
        return cli("cgctl", "--auth-server", self.auth_addr, "-i", self.auth.info["admin_identity"], *args,
                   input=input).stdout

    def token(self, type_: str) -> str:
        return self.cgctl("tokens", "add", f"--type={type_}").strip()

    def proxy_config(self, token: str, data: str, sessions_per_user: int, workers: int | None = None) -> dict:
        section = {"enabled": True, "listen_addr": "127.0.0.1:0", "api_listen_addr": "127.0.0.1:0",
                   "redis_listen_addr": "127.0.0.1:0", "web_listen_addr": "127.0.0.1:0",
                   "database_ca_files": [str(self.d.parent / "ca.pem")],
                   "limits": {"sessions_per_user": sessions_per_user, "max_sessions": sessions_per_user + 100}}
        if workers is not None:
            section["workers"] = workers
        return {**self.base(data), "auth_server": self.auth_addr, "join_server": self.join_addr,
                "join": {"token": token, "ca_pin": self.ca_pin}, "dbproxy_service": section}

    def start_proxy(self, sessions_per_user: int, workers: int | None = None, tag: str = "dbproxy") -> Daemon:
        cfg = self.proxy_config(self.token("proxy"), f"{tag}-data", sessions_per_user, workers)
        p = Daemon(f"{self.tag}-{tag}", self.d, cfg, {SECRET_ENV: REDIS_PASSWORD}).start("dbproxy")
        if self.proxy is None:
            self.proxy = p
        return p

    def register_redis(self, redis_port: int) -> None:
        doc = {"kind": "db", "version": "v1",
               "metadata": {"name": DB, "description": "benchmark Redis", "labels": {"env": "bench"}},
               "spec": {"protocol": "redis", "uri": f"127.0.0.1:{redis_port}", "tls": True,
                        "ca_cert_file": str(self.d.parent / "ca.pem"), "secret": f"env:{SECRET_ENV}"}}
        path = self.d / "db.yaml"
        path.write_text(yaml.safe_dump(doc, sort_keys=False))
        self.cgctl("create", "-f", str(path))

    def login_user(self, proxy: Daemon, user: str = "bench") -> dict:
        """cgctl users add, cgate login (invite), cgate db login; the `cgate db config` JSON."""
        data = json.loads(self.cgctl("users", "add", user, "--roles=access", "--db-users=*", "--db-names=0",
                                     "--format=json"))
        addr = f"127.0.0.1:{proxy.info['public_port']}"
        cli("cgate", "login", f"--proxy={addr}", f"--invite={data['invite']}", f"--ca-pin={self.ca_pin}",
            "--password-stdin", home=self.home, input=USER_PASSWORD + "\n")
        deadline = time.monotonic() + 30
        while True:  # dbproxy learns databases by watching auth
            res = cli("cgate", "db", "ls", "--format=json", home=self.home, check=False)
            if res.returncode == 0 and DB in {x["name"] for x in json.loads(res.stdout or "[]")}:
                break
            if time.monotonic() > deadline:
                raise BenchError(f"dbproxy did not list {DB} within 30s")
            time.sleep(0.3)
        cli("cgate", "db", "login", DB, home=self.home)
        return json.loads(cli("cgate", "db", "config", DB, "--format=json", home=self.home).stdout)

    def stop(self) -> None:
        for p in (self.proxy, self.auth):
            if p is not None:
                p.stop()


def rss_kib(pid: int) -> int:
    """Current resident set (VmRSS) of a live process, in KiB."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def cpu_seconds(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0
