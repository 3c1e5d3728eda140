"""cgate db ls / login / connect / config / logout and cgate proxy db --tunnel through real
auth and dbproxy processes to a real TLS redis-server with requirepass."""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import re
import shlex
import signal
import stat
import subprocess
import time
from pathlib import Path

import pytest
from cachegate.types.v1 import types_pb2

from services.common import pki
from tests.helpers import REPO, Cluster, run_cli, tool, write_yaml
from tests.helpers import env as base_env
from tests.helpers import free_port  # noqa: E402

pytestmark = pytest.mark.slow

PASSWORD = "correct horse battery staple 42"
REDIS_PASSWORD = "e2e-Redis-Secret-9"
SECRET_ENV = "CACHEGATE_DB_TEST_REDIS"
DB = "test-redis"




@pytest.fixture(scope="module")
def redis_tls(tmp_path_factory):
    """A TLS-only redis-server with requirepass, its certificate from a test CA."""
    d = tmp_path_factory.mktemp("redis-e2e")
    ca = pki.CertAuthority.create("e2e redis CA", "cachegate-test")
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
         "--save", "", "--appendonly", "no", "--dir", str(d)], stdout=log, stderr=subprocess.STDOUT)
    info = {"port": port, "ca": str(d / "ca.pem"), "dir": d}
    deadline = time.monotonic() + 15
    while redis_direct(info, "PING").stdout.strip() != "PONG":
        if time.monotonic() > deadline or proc.poll() is not None:
            proc.kill()
            raise RuntimeError("redis-server did not start: " + (d / "redis.log").read_text()[-2000:])
        time.sleep(0.1)
    yield info
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


def redis_direct(info, *args: str) -> subprocess.CompletedProcess:
    """Straight to redis-server (not through Cachegate), to check what the proxy did."""
    return subprocess.run(["redis-cli", "-h", "127.0.0.1", "-p", str(info["port"]), "--tls", "--cacert", info["ca"],
                           "--no-auth-warning", "-a", REDIS_PASSWORD, *args],
                          capture_output=True, text=True, timeout=20, check=False)


@pytest.fixture(scope="module")
def c(tmp_path_factory, redis_tls):
    root = tmp_path_factory.mktemp("cgate-db")
    cl = Cluster(root)
    cl.start_auth()
    # dbproxy reads env:SECRET_ENV from its own environment.
    proxy = cl.start_joiner("dbproxy", cl.token("proxy"), extra_env={SECRET_ENV: REDIS_PASSWORD},
                            database_ca_files=[redis_tls["ca"]])
    cl.proxy = f"127.0.0.1:{proxy.info['public_port']}"
    cl.home = root / "home"
    cl.redis = redis_tls
    docs = [
        {"kind": "db", "version": "v1",
         "metadata": {"name": DB, "description": "Test Redis with TLS", "labels": {"env": "test", "team": "cache"}},
         "spec": {"protocol": "redis", "uri": f"127.0.0.1:{redis_tls['port']}", "tls": True,
                  "ca_cert_file": redis_tls["ca"], "secret": f"env:{SECRET_ENV}"}},
        {"kind": "db", "version": "v1",
         "metadata": {"name": "prod-cache", "description": "Unreachable prod cache", "labels": {"env": "prod"}},
         "spec": {"uri": "127.0.0.1:1", "tls": True}},
        {"kind": "role", "version": "v1", "metadata": {"name": "no-root"},
         "spec": {"deny": {"db_users": ["root"]}}},
    ]
    for i, doc in enumerate(docs):
        cl.cgctl("create", "-f", str(write_yaml(root / f"doc{i}.yaml", doc)))
    data = json.loads(cl.cgctl("users", "add", "alice", "--roles=access,no-root", "--db-users=*",
                               "--db-names=0,1", "--format=json").stdout)
    cgate(cl, "login", f"--proxy={cl.proxy}", f"--invite={data['invite']}", f"--ca-pin={cl.ca_pin}",
          "--password-stdin", input=PASSWORD + "\n")
    wait_listed(cl)
    yield cl
    cl.stop()


def cgate(c, *args, input=None, check=True, timeout=60):
    return run_cli("cgate", *args, input=input, check=check, timeout=timeout,
                   extra_env={"CACHEGATE_HOME": str(c.home)})


def proxy_with_one_database(root, redis_tls, proxy_section: dict | None = None,
                            telemetry: dict | None = None) -> Cluster:
    """auth and dbproxy (``proxy_section``: more of dbproxy_service) with the TLS database DB,
    and alice (access role) logged in with a database certificate (``c.db``: its config).
    ``c.proxy``/``c.api``: the public and API addresses. The caller stops it."""
    cl = Cluster(root)
    cl.start_auth()
    cfg = cl.joiner_config("dbproxy", cl.token("proxy"), database_ca_files=[redis_tls["ca"]],
                           **(proxy_section or {}))
    if telemetry:
        cfg["telemetry"] = telemetry
    proxy = cl.proc("dbproxy", cfg)
    proxy.extra_env = {SECRET_ENV: REDIS_PASSWORD}
    proxy.start()
    cl.proxy = f"127.0.0.1:{proxy.info['public_port']}"
    cl.api = f"127.0.0.1:{proxy.info['api_port']}"
    cl.home = root / "home"
    cl.redis = redis_tls
    doc = {"kind": "db", "version": "v1", "metadata": {"name": DB, "labels": {"env": "test"}},
           "spec": {"protocol": "redis", "uri": f"127.0.0.1:{redis_tls['port']}", "tls": True,
                    "ca_cert_file": redis_tls["ca"], "secret": f"env:{SECRET_ENV}"}}
    cl.cgctl("create", "-f", str(write_yaml(root / "db.yaml", doc)))
    data = json.loads(cl.cgctl("users", "add", "alice", "--roles=access", "--db-users=*", "--db-names=0",
                               "--format=json").stdout)
    cgate(cl, "login", f"--proxy={cl.proxy}", f"--invite={data['invite']}", f"--ca-pin={cl.ca_pin}",
          "--password-stdin", input=PASSWORD + "\n")
    deadline = time.monotonic() + 30
    while DB not in cgate(cl, "db", "ls", check=False).stdout:
        assert time.monotonic() < deadline, "the database was not listed"
        time.sleep(0.3)
    cgate(cl, "db", "login", DB)
    cl.db = json.loads(cgate(cl, "db", "config", DB, "--format=json").stdout)
    return cl


def wait_listed(c, timeout: float = 30) -> None:
    """dbproxy learns databases from auth by watching: wait until both are listed."""
    deadline = time.monotonic() + timeout
    while True:
        res = cgate(c, "db", "ls", "--format=json", check=False)
        if res.returncode == 0 and {d["name"] for d in json.loads(res.stdout)} >= {DB, "prod-cache"}:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"databases not listed in {timeout}s: {res.stdout}\n{res.stderr}")
        time.sleep(0.3)


def profile_dir(c) -> Path:
    return c.home / "profiles" / c.proxy.replace(":", "_")


def test_db_ls(c):
    text = cgate(c, "db", "ls").stdout
    lines = text.splitlines()
    assert lines[0].split() == ["Name", "Description", "Allowed", "Users", "Labels", "Connect"]
    row = next(ln for ln in lines if ln.startswith(DB))
    assert "Test Redis with TLS" in row and "[*], except: [root]" in row
    assert "env=test,team=cache" in row and row.endswith(f"cgate db connect {DB}")
    verbose = cgate(c, "db", "ls", "-v").stdout
    assert "Protocol" in verbose and "self-hosted" in verbose and f"127.0.0.1:{c.redis['port']}" in verbose

    data = {d["name"]: d for d in json.loads(cgate(c, "db", "ls", "--format=json").stdout)}
    assert data[DB]["allowed_users"] == ["*"] and data[DB]["denied_users"] == ["root"]
    assert data[DB]["labels"] == {"env": "test", "team": "cache"}
    only = json.loads(cgate(c, "db", "ls", "env=prod", "--format=json").stdout)
    assert [d["name"] for d in only] == ["prod-cache"]
    # The secret reference and CA never reach users.
    assert REDIS_PASSWORD not in text + verbose and SECRET_ENV not in json.dumps(data)


def test_login_config_connect_logout(c):
    out = cgate(c, "db", "login", DB).stdout
    assert f'Connection information for database "{DB}" has been saved' in out
    assert f"cgate db connect {DB}" in out and "cgate db config --format=cmd" in out
    folder = profile_dir(c) / "db"
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in folder.iterdir())
    assert cgate(c, "db", "ls").stdout.count(f"> {DB}") == 1

    cfg = json.loads(cgate(c, "db", "config", DB, "--format=json").stdout)
    assert cfg["db_user"] == "default" and cfg["db_name"] == "0" and cfg["port"] > 0
    from services.common.identity import identity_from_cert

    route = identity_from_cert(pki.cert_from_pem(Path(cfg["cert"]).read_bytes())).route
    assert (route.service_name, route.db_user, route.db_name) == (DB, "default", "0")

    # The printed redis-cli command works as is: no AUTH needed.
    cmd = shlex.split(cgate(c, "db", "config", DB, "--format=cmd").stdout)
    res = subprocess.run(cmd + ["SET", "e2e:config", "v1"], capture_output=True, text=True, timeout=20, check=False)
    assert res.stdout.strip() == "OK", res.stderr
    assert redis_direct(c.redis, "GET", "e2e:config").stdout.strip() == "v1"

    # cgate db connect execs redis-cli; arguments after -- reach it.
    res = cgate(c, "db", "connect", DB, "--", "GET", "e2e:config")
    assert res.stdout.strip() == "v1", res.stderr
    res = cgate(c, "db", "connect", DB, "--db-name=1", "--", "SET", "e2e:db1", "one")
    assert res.stdout.strip() == "OK", res.stderr
    assert redis_direct(c.redis, "-n", "1", "GET", "e2e:db1").stdout.strip() == "one"
    assert json.loads(cgate(c, "db", "config", DB, "--format=json").stdout)["db_name"] == "1"
    # Without flags, connect reuses the saved route (now logical database 1); stdin feeds redis-cli.
    res = cgate(c, "db", "connect", DB, input="PING\nGET e2e:db1\n")
    assert res.stdout.split() == ["PONG", "one"], res.stderr

    # Denied routes fail before redis-cli starts, as one line.
    res = cgate(c, "db", "connect", DB, "--db-user=root", check=False)
    assert res.returncode == 1 and res.stderr.startswith("ERROR: ") and "root" in res.stderr
    res = cgate(c, "db", "login", DB, "--db-name=5", check=False)
    assert res.returncode == 1 and "5" in res.stderr
    res = cgate(c, "db", "login", "no-such-db", check=False)
    assert res.returncode == 1 and 'database "no-such-db" not found' in res.stderr

    assert cgate(c, "db", "logout", DB).stdout.strip() == f'Logged out of database "{DB}".'
    res = cgate(c, "db", "config", DB, check=False)
    assert res.returncode == 1 and f"cgate db login {DB}" in res.stderr


@contextlib.contextmanager
def tunnel(c, tmp_path):
    """`cgate proxy db --tunnel` running; yields (port, stdout file, stderr file, process)."""
    out = tmp_path / "tunnel.out"
    err = tmp_path / "tunnel.err"
    with open(out, "wb") as fo, open(err, "wb") as fe:
        proc = subprocess.Popen([tool("cgate"), "proxy", "db", "--tunnel", DB, "--port", "0"], stdout=fo, stderr=fe,
                                cwd=REPO, env=base_env(CACHEGATE_HOME=str(c.home)))
    try:
        deadline = time.monotonic() + 30
        port = None
        while port is None:
            m = re.search(r'Started authenticated tunnel for the Redis database "test-redis" .* on 127\.0\.0\.1:(\d+)',
                          out.read_text())
            if m:
                port = int(m.group(1))
            elif proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"tunnel did not start ({proc.poll()}):\n{out.read_text()}\n{err.read_text()}")
            else:
                time.sleep(0.1)
        yield port, out, err, proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                raise


def direct_client(c):
    import redis

    return redis.Redis(host="127.0.0.1", port=c.redis["port"], password=REDIS_PASSWORD, ssl=True,
                       ssl_ca_certs=c.redis["ca"], socket_timeout=10)


def test_tunnel_passes_closes_through_at_once(c, tmp_path):
    """A client that opens and closes connections often: each close ends its proxy session
    at once (no session limit reached, no subscriber or client left behind)."""
    import socket

    direct = direct_client(c)
    with tunnel(c, tmp_path) as (port, _, err, proc):
        def sessions() -> int:  # the proxy's spare connections, opened ahead, are not sessions
            return len([x for x in direct.client_list() if x.get("name") != "cachegate-spare"])

        baseline = sessions()
        for i in range(1000):
            s = socket.create_connection(("127.0.0.1", port), timeout=10)
            if i % 10 == 0:
                s.sendall(b"*2\r\n$9\r\nSUBSCRIBE\r\n$6\r\nfid:ch\r\n")
                want = b"*3\r\n$9\r\nsubscribe\r\n$6\r\nfid:ch\r\n:1\r\n"
            else:
                s.sendall(b"*1\r\n$4\r\nPING\r\n")
                want = b"+PONG\r\n"
            got = b""
            while len(got) < len(want):
                chunk = s.recv(4096)
                assert chunk, f"connection {i} closed early after {got!r}"
                got += chunk
            assert got == want, (i, got)
            if i % 10 == 0:
                assert direct.pubsub_numsub("fid:ch") == [(b"fid:ch", 1)]
            s.close()
            deadline = time.monotonic() + 0.5
            while True:  # as against Redis itself: gone once closed (a round trip through the proxy)
                numsub = direct.pubsub_numsub("fid:ch")[0][1]
                clients = sessions()
                if (numsub, clients) == (0, baseline) or time.monotonic() > deadline:
                    break
                time.sleep(0.002)
            assert (numsub, clients) == (0, baseline), f"after connection {i}"
        # Pipelined commands then a half-close: every reply arrives, and nothing more.
        s = socket.create_connection(("127.0.0.1", port), timeout=10)
        s.sendall(b"SET e2e:half 1\r\nINCR e2e:half\r\nGET e2e:half\r\n")
        s.shutdown(socket.SHUT_WR)
        got = b""
        while chunk := s.recv(4096):
            got += chunk
        assert got == b"+OK\r\n:2\r\n$1\r\n2\r\n"
        s.close()
        assert "too many" not in err.read_text()
    direct.close()


def test_tunnel(c, tmp_path):
    with tunnel(c, tmp_path) as (port, out, err, proc):
        assert f"redis-cli -p {port}" in out.read_text()

        # Plaintext on loopback, no certificate, no password.
        res = subprocess.run(["redis-cli", "-p", str(port), "SET", "e2e:tunnel", "t"], capture_output=True,
                             text=True, timeout=20, check=False)
        assert res.stdout.strip() == "OK", res.stderr
        assert redis_direct(c.redis, "GET", "e2e:tunnel").stdout.strip() == "t"

        import redis

        clients = [redis.Redis(host="127.0.0.1", port=port, socket_timeout=10) for _ in range(5)]
        for i, cl in enumerate(clients):
            cl.set(f"e2e:t{i}", i)
        assert [int(cl.get(f"e2e:t{i}")) for i, cl in enumerate(clients)] == list(range(5))
        pipe = clients[0].pipeline(transaction=False)
        for i in range(500):
            pipe.incr("e2e:counter")
        assert pipe.execute()[-1] == 500
        for cl in clients:
            cl.close()
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(15)
    assert rc == 0, err.read_text()
    assert "Stopping the tunnel" in err.read_text()
