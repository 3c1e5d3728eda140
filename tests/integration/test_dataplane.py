"""The RESP data plane in the real processes: auth's registry, roles and locks followed by
dbproxy, a static database with TLS and requirepass, real redis-cli and redis-py clients
with certificates that auth signed, sessions listed and ended by cgctl, and the audit trail."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import subprocess
import time
from pathlib import Path

import grpc
import pytest
import redis

from cachegate.auth.v1 import user_service_pb2
from cachegate.dbproxy.v1 import proxy_service_pb2, proxy_service_pb2_grpc
from cachegate.types.v1 import types_pb2
from services.common.pki import key_to_pem, make_csr, new_key
from tests.dbproxy.conftest import REDIS_PASSWORD, certs, redis_server  # noqa: F401 (fixtures)
from tests.helpers import Cluster, run_cli

pytestmark = pytest.mark.slow

PASSWORD = "dataplane user password 1"
SECRET_ENV = "CACHEGATE_DB_ORDERS"


@pytest.fixture(scope="module")
def env(tmp_path_factory, certs, redis_server):  # noqa: F811
    root = tmp_path_factory.mktemp("dataplane")
    c = Cluster(root)
    try:
        yield from _setup(c, root, certs, redis_server)
    finally:
        c.stop()


def _setup(c, root, certs, redis_server):  # noqa: F811
    c.start_auth()
    proxy = c.start_joiner("dbproxy", c.token("proxy"), extra_env={SECRET_ENV: REDIS_PASSWORD},
                           database_ca_files=[certs.path("server-ca.pem")])
    c.proxy = f"127.0.0.1:{proxy.info['public_port']}"
    c.api = f"127.0.0.1:{proxy.info['api_port']}"
    c.redis_port = proxy.info["redis_port"]
    c.home = root / "home"
    c.db_port = redis_server.port
    db = root / "db.yaml"
    db.write_text(f"""kind: db
version: v1
metadata:
  name: orders
  description: Orders cache
  labels: {{env: prod}}
spec:
  uri: 127.0.0.1:{redis_server.port}
  tls: true
  secret: env:{SECRET_ENV}
""")
    c.cgctl("create", "-f", str(db))
    role = root / "role.yaml"
    role.write_text("""kind: role
version: v1
metadata: {name: no-flush}
spec:
  allow:
    db_labels: {env: prod}
    db_users: ['{{internal.db_users}}']
    db_names: ['{{internal.db_names}}']
    db_commands: ['*']
  deny:
    db_commands: [FLUSHALL, '@dangerous']
""")
    c.cgctl("create", "-f", str(role))
    yield c


def login_user(c, name: str, *flags: str) -> Path:
    data = json.loads(c.cgctl("users", "add", name, *flags, "--format=json").stdout)
    run_cli("cgate", "login", f"--proxy={c.proxy}", f"--invite={data['invite']}", f"--ca-pin={c.ca_pin}",
            "--password-stdin", input=PASSWORD + "\n", extra_env={"CACHEGATE_HOME": str(c.home)})
    return c.home / "profiles" / c.proxy.replace(":", "_")


async def db_cert(c, folder: Path, db: str, db_user: str, db_name: str = "") -> tuple[str, str, str]:
    """A database certificate from dbproxy's API, as `cgate db login` gets it."""
    key = new_key()
    creds = grpc.ssl_channel_credentials(root_certificates=(folder / "cas.pem").read_bytes(),
                                         private_key=(folder / "key.pem").read_bytes(),
                                         certificate_chain=(folder / "cert.pem").read_bytes())
    async with grpc.aio.secure_channel(c.api, creds, options=[
            ("grpc.ssl_target_name_override", "dbproxy.cachegate.internal")]) as ch:
        resp = await proxy_service_pb2_grpc.ProxyServiceStub(ch).GenerateDatabaseCert(
            user_service_pb2.GenerateDatabaseCertRequest(
                csr_pem=make_csr(key, "x").decode(),
                route=types_pb2.RouteToDatabase(service_name=db, protocol="redis", db_user=db_user,
                                                db_name=db_name)), timeout=15)
    out = folder / f"{db}-{db_user}-{db_name or 'x'}"
    (out.with_suffix(".crt")).write_text(resp.cert_pem)
    (out.with_suffix(".key")).write_bytes(key_to_pem(key))
    return str(out.with_suffix(".crt")), str(out.with_suffix(".key")), str(folder / "cas.pem")


def redis_cli(c, crt, key, ca, *args, input=None, db=None):
    cmd = ["redis-cli", "--tls", "--cert", crt, "--key", key, "--cacert", ca, "-h", "127.0.0.1",
           "-p", str(c.redis_port)]
    if db is not None:
        cmd += ["-n", str(db)]
    return subprocess.run(cmd + list(args), capture_output=True, text=True, input=input, timeout=30)


def client(c, crt, key, ca, **kw) -> redis.Redis:
    return redis.Redis(host="127.0.0.1", port=c.redis_port, ssl=True, ssl_certfile=crt, ssl_keyfile=key,
                       ssl_ca_certs=ca, socket_timeout=10, **kw)


async def test_db_ls_shows_what_the_roles_allow(env):
    c = env
    folder = login_user(c, "lister", "--roles=access", "--db-users=default,app")
    creds = grpc.ssl_channel_credentials(root_certificates=(folder / "cas.pem").read_bytes(),
                                         private_key=(folder / "key.pem").read_bytes(),
                                         certificate_chain=(folder / "cert.pem").read_bytes())
    async with grpc.aio.secure_channel(c.api, creds, options=[
            ("grpc.ssl_target_name_override", "dbproxy.cachegate.internal")]) as ch:
        stub = proxy_service_pb2_grpc.ProxyServiceStub(ch)
        resp = await stub.ListDatabases(proxy_service_pb2.ListDatabasesRequest(), timeout=15)
        names = [a.database.name for a in resp.databases]
        assert names == ["orders"]
        a = resp.databases[0]
        assert list(a.allowed_db_users) == ["app", "default"] and a.database.labels["env"] == "prod"
        assert not a.database.secret_ref  # where the proxy keeps the secret is not shown to users
        none = await stub.ListDatabases(proxy_service_pb2.ListDatabasesRequest(label_selector={"env": "dev"}),
                                        timeout=15)
        assert list(none.databases) == []


async def test_redis_cli_and_redis_py_work_with_no_password(env):
    c = env
    folder = login_user(c, "alice", "--roles=access", "--db-users=default", "--db-names=0,1")
    crt, key, ca = await db_cert(c, folder, "orders", "default")
    res = redis_cli(c, crt, key, ca, input="PING\nSET k1 v1\nGET k1\n")
    assert res.stdout.split() == ["PONG", "OK", "v1"], res.stderr
    for proto in (2, 3):
        r = client(c, crt, key, ca, protocol=proto)
        assert r.set("k2", "v2") and r.get("k2") == b"v2"
        pipe = r.pipeline(transaction=False)
        for i in range(2000):
            pipe.incr("counter")
        assert pipe.execute()[-1] >= 2000
        r.close()
    # SELECT: 1 is allowed, 5 is not; the session goes on after a refusal.
    res = redis_cli(c, crt, key, ca, input="SELECT 1\nSELECT 5\nPING\n")
    out = res.stdout
    assert "OK" in out and "PONG" in out and 'access to logical database 5' in out, out


async def test_denied_db_user_label_and_command_are_resp_errors(env):
    c = env
    folder = login_user(c, "bob", "--roles=no-flush", "--db-users=default")
    crt, key, ca = await db_cert(c, folder, "orders", "default")
    res = redis_cli(c, crt, key, ca, input="SET a 1\nFLUSHALL\nGET a\n")
    lines = [x for x in res.stdout.split("\n") if x]
    assert lines[0] == "OK" and "FLUSHALL" in lines[1] and "denied" in lines[1] and lines[2] == "1", res.stdout

    # A db user the roles do not allow: auth refuses the certificate outright.
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await db_cert(c, folder, "orders", "admin")
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED

    # A label the role does not allow: relabel the database, then the same certificate is refused.
    c.cgctl("create", "-f", "-", input=f"""kind: db
version: v1
metadata: {{name: orders-dev, labels: {{env: dev}}}}
spec: {{uri: "127.0.0.1:{c.db_port}", tls: true, secret: "env:{SECRET_ENV}"}}
""")
    folder = login_user(c, "bob2", "--roles=no-flush,access", "--db-users=default")
    crt2, key2, ca2 = await db_cert(c, folder, "orders-dev", "default")
    assert redis_cli(c, crt2, key2, ca2, "PING").stdout.strip() == "PONG"  # access allows it
    c.cgctl("users", "update", "bob2", "--roles=no-flush")
    login_again = run_cli("cgate", "login", f"--proxy={c.proxy}", "--user=bob2", "--password-stdin",
                          input=PASSWORD + "\n", extra_env={"CACHEGATE_HOME": str(c.home)})
    assert login_again.returncode == 0
    # Auth signs the route (it does not read database labels); dbproxy refuses the session
    # because no role of bob2's new session selects env=dev, and says so in RESP.
    crt3, key3, ca3 = await db_cert(c, folder, "orders-dev", "default")
    res = redis_cli(c, crt3, key3, ca3, "PING")
    assert "denied" in res.stdout + res.stderr and "orders-dev" in res.stdout + res.stderr, res


async def test_a_lock_ends_a_live_session_and_cgctl_sees_and_kills_sessions(env):
    c = env
    folder = login_user(c, "carol", "--roles=access", "--db-users=default")
    crt, key, ca = await db_cert(c, folder, "orders", "default")
    r = client(c, crt, key, ca)
    assert r.ping()
    sessions = json.loads(c.cgctl("sessions", "ls", f"--proxy-api={c.api}", "--format=json").stdout)
    mine = [s for s in sessions if s["user"] == "carol"]
    assert mine and mine[0]["database"] == "orders"

    lock = json.loads(c.cgctl("lock", "--user=carol", "--message=incident 42", "--format=json").stdout)
    deadline = time.monotonic() + 5
    ended = None
    while time.monotonic() < deadline:
        try:
            r.ping()
        except redis.RedisError as exc:
            ended = str(exc)
            break
        await asyncio.sleep(0.2)
    assert ended is not None, "the lock did not end the session within 5 s"
    # New sessions are refused while the lock holds, with a message the client prints.
    res = redis_cli(c, crt, key, ca, "PING")
    assert "locked" in res.stdout + res.stderr and "incident 42" in res.stdout + res.stderr
    c.cgctl("rm", f"lock/{lock['id']}")
    time.sleep(1)
    assert redis_cli(c, crt, key, ca, "PING").stdout.strip() == "PONG"

    # One connection, not a pool: a pool of redis-py 8.2 or later drops a connection with
    # an unread reply and connects again before its next command, which hides the line
    # the killed session was ended with.
    r2 = client(c, crt, key, ca, single_connection_client=True)
    assert r2.ping()
    sessions = json.loads(c.cgctl("sessions", "ls", f"--proxy-api={c.api}", "--format=json").stdout)
    sid = next(s["id"] for s in sessions if s["user"] == "carol")
    c.cgctl("sessions", "kill", sid, f"--proxy-api={c.api}")
    with pytest.raises(redis.RedisError) as killed:
        for _ in range(20):
            r2.ping()
            time.sleep(0.1)
    assert "Cachegate ended this session" in str(killed.value), killed.value
    r2.close()


async def test_audit_has_start_queries_and_end_without_the_password(env):
    c = env
    folder = login_user(c, "dave", "--roles=access", "--db-users=default")
    crt, key, ca = await db_cert(c, folder, "orders", "default")
    res = redis_cli(c, crt, key, ca, input=f"SET audited-key 1\nAUTH default {REDIS_PASSWORD}\nGET audited-key\n")
    assert "1" in res.stdout
    deadline = time.monotonic() + 15
    events = []
    while time.monotonic() < deadline:
        events = json.loads(c.cgctl("audit", "search", "--type=db.session.*", "--user=dave",
                                    "--format=json").stdout)
        if any(e["type"] == "db.session.end" for e in events):
            break
        time.sleep(0.5)
    types = [e["type"] for e in events]
    assert "db.session.start" in types and "db.session.end" in types
    queries = [e for e in events if e["type"] == "db.session.query"]
    assert any("audited-key" in json.dumps(e["fields"]) for e in queries)
    assert any("AUTH" in json.dumps(e["fields"]).upper() for e in queries)
    db = sqlite3.connect(str(c.data / "auth" / "cachegate.db"))
    rows = "\n".join(r.decode(errors="replace") if isinstance(r, bytes) else str(r)
                     for (r,) in db.execute("SELECT data FROM audit"))
    db.close()
    assert REDIS_PASSWORD not in rows
    for p in c.procs.values():
        assert REDIS_PASSWORD not in p.output()
