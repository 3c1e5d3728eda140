"""cgate db / cgate proxy db without a server: route defaults, db ls formatting, saved
database certificates, config output, the redis-cli check and the connect command line."""

from __future__ import annotations

import datetime as dt
import json
import os
import shlex
import stat
from pathlib import Path

import pytest
from cachegate.dbproxy.v1 import proxy_service_pb2
from cachegate.types.v1 import types_pb2
from typer.testing import CliRunner

from services.cli import cgate_db
from services.cli.cgate import app
from services.cli.common import CLIError
from services.cli.profile import open_profile, set_current
from services.common import pki
from services.common.creds import write_private
from tests.helpers import BIN, run_cli

PROXY = "127.0.0.1:3080"


# --------------------------------------------------------------------------------------------
# A profile on disk, as `cgate login` leaves it, and database certificates for its key


class FakeCluster:
    def __init__(self, home: Path):
        self.home = home
        self.user_ca = pki.CertAuthority.create("user CA", "test")
        self.host_ca = pki.CertAuthority.create("host CA", "test")
        self.key = pki.new_key()
        prof = open_profile(PROXY, create=True)
        prof.meta.update(user="alice", cluster="test-cluster", api_addr="127.0.0.1:1", redis_addr="127.0.0.1:3081",
                         server_version="0.1.0")
        ident = types_pb2.Identity(kind=types_pb2.IDENTITY_KIND_USER, name="alice", roles=["access"],
                                   db_users=["default", "app"], db_names=["0", "1"])
        cert = self.user_ca.sign(self.key.public_key(), "alice", ident, dt.timedelta(hours=1))
        write_private(prof.folder / "cas.pem", self.host_ca.cert_pem)
        prof.save_session(pki.key_to_pem(self.key), pki.cert_to_pem(cert), self.user_ca.cert_pem)
        set_current(prof)
        self.prof = prof

    def db_cert(self, name: str, db_user: str = "default", db_name: str = "0",
                ttl: dt.timedelta = dt.timedelta(minutes=30), key=None) -> bytes:
        ident = types_pb2.Identity(
            kind=types_pb2.IDENTITY_KIND_USER, name="alice", roles=["access"],
            route=types_pb2.RouteToDatabase(service_name=name, protocol="redis", db_user=db_user, db_name=db_name))
        not_after = None
        if ttl.total_seconds() < 0:
            not_after = pki.now() + ttl
            ttl = dt.timedelta(minutes=10)
        cert = self.user_ca.sign((key or self.key).public_key(), "alice", ident, ttl, not_after=not_after)
        return pki.cert_to_pem(cert)


@pytest.fixture
def fc(tmp_path, monkeypatch):
    monkeypatch.setenv("CACHEGATE_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("CACHEGATE_PROXY", raising=False)
    return FakeCluster(tmp_path / "home")


@pytest.fixture(autouse=True)
def _no_columns(monkeypatch):
    """Output as to a pipe (whole lines) unless a test sets COLUMNS itself."""
    monkeypatch.delenv("COLUMNS", raising=False)


def invoke(*args: str):
    return CliRunner().invoke(app, list(args), catch_exceptions=False)


def allowed(name, users=("*",), denied=(), names=("*",), denied_names=(), description="", labels=None,
            uri="redis.example:6380", azure_kind="", auth=""):
    db = types_pb2.Database(name=name, description=description, protocol="redis", uri=uri, labels=labels or {})
    if azure_kind:
        db.azure.kind = azure_kind
    if auth:
        db.azure.auth = auth
    return proxy_service_pb2.AllowedDatabase(database=db, allowed_db_users=list(users), denied_db_users=list(denied),
                                             allowed_db_names=list(names), denied_db_names=list(denied_names))


# --------------------------------------------------------------------------------------------
# Route defaults


def test_db_user_defaults():
    c = cgate_db.choose_db_user
    assert c("r", ["app"], [], None) == "app"                      # the only one
    assert c("r", ["*"], [], None) == "default"                    # wildcard: default
    assert c("r", ["app", "default"], [], None) == "default"       # default when allowed
    assert c("r", ["*"], ["default"], "x") == "x"                  # given wins (the proxy decides)
    assert c("r", ["*", "app"], [], None) == "default"
    with pytest.raises(CLIError, match=r"several database users .*\[app ops\].*--db-user"):
        c("r", ["app", "ops"], [], None)
    with pytest.raises(CLIError, match=r"\[\*\], except: \[default\].*--db-user"):
        c("r", ["*"], ["default"], None)
    with pytest.raises(CLIError, match="no database user"):
        c("r", [], ["*"], None)
    with pytest.raises(CLIError, match="empty"):
        c("r", ["*"], [], " ")


def test_db_name_defaults():
    c = cgate_db.choose_db_name
    assert c("r", ["3"], [], None) == "3"
    assert c("r", ["*"], [], None) == "0"
    assert c("r", ["1", "0"], [], None) == "0"
    assert c("r", [], [], None) == ""           # no db_names rules: the proxy uses 0 unchecked
    assert c("r", ["*"], [], "07") == "7"
    with pytest.raises(CLIError, match="several logical databases"):
        c("r", ["1", "2"], [], None)
    with pytest.raises(CLIError, match="numbers"):
        c("r", ["*"], [], "zero")


# --------------------------------------------------------------------------------------------
# db ls


def test_db_ls_table_and_except_column(fc, monkeypatch):
    dbs = [
        allowed("my-azure-redis-enterprise", description="Azure Redis Enterprise server in East US",
                labels={"region": "eastus", "env": "prod"}, azure_kind="redis-enterprise", uri="e.redis.azure.net:10000",
                auth="entra"),
        allowed("my-azure-redis", description="Azure Redis server in East US", azure_kind="redis",
                uri="r.redis.cache.windows.net:6380"),
        allowed("onprem", users=["*"], denied=["root", "admin"], uri="10.0.0.5:6380"),
        allowed("two-users", users=["app", "default"], names=["0"]),
    ]
    seen = {}

    async def fake_list(prof, selector=None):
        seen["selector"] = selector
        return dbs

    monkeypatch.setattr(cgate_db, "list_databases", fake_list)
    res = invoke("db", "ls")
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    assert lines[0].split() == ["Name", "Description", "Allowed", "Users", "Labels", "Connect"]
    assert set(lines[1].replace(" ", "")) == {"-"}
    # Columns line up under the header.
    col = {h: lines[0].index(h) for h in ("Description", "Allowed Users", "Labels", "Connect")}
    rows = {ln.split()[0]: ln for ln in lines[2:]}
    assert list(rows) == ["my-azure-redis", "my-azure-redis-enterprise", "onprem", "two-users"]  # sorted
    r = rows["my-azure-redis"]
    assert r[col["Description"]:].startswith("Azure Redis server in East US")
    assert r[col["Allowed Users"]:].startswith("[*] ")
    assert r[col["Connect"]:] == "cgate db connect my-azure-redis"
    assert rows["my-azure-redis-enterprise"][col["Labels"]:].startswith("env=prod,region=eastus ")
    assert rows["onprem"][col["Allowed Users"]:].startswith("[*], except: [root admin]")
    assert rows["two-users"][col["Allowed Users"]:].startswith("[app default]")
    assert "URI" not in lines[0] and seen["selector"] == {}

    # -v adds Protocol, Type, Auth, URI and Health (unknown: the proxy has not tried it yet).
    res = invoke("db", "ls", "-v")
    head = res.output.splitlines()[0]
    assert head.split()[:8] == ["Name", "Description", "Protocol", "Type", "Auth", "URI", "Health", "Allowed"]
    health_col = head.index("Health")
    assert all(ln[health_col:].startswith("unknown ") for ln in res.output.splitlines()[2:])
    auth_col = head.index("Auth")
    ent = next(ln for ln in res.output.splitlines() if ln.startswith("my-azure-redis-enterprise"))
    assert ent[auth_col:].startswith("entra ")
    body = res.output
    assert "Azure Cache for Redis" in body and "Azure Redis Enterprise" in body and "self-hosted" in body
    assert "r.redis.cache.windows.net:6380" in body and "redis " in body

    # Label filters go to the server (and are applied here too).
    res = invoke("db", "ls", "env=prod", "--format=json")
    assert res.exit_code == 0
    assert seen["selector"] == {"env": "prod"}
    data = json.loads(res.output)
    assert [d["name"] for d in data] == ["my-azure-redis-enterprise"]
    assert data[0]["labels"] == {"env": "prod", "region": "eastus"} and data[0]["type"] == "Azure Redis Enterprise"
    assert data[0]["allowed_users"] == ["*"] and data[0]["logged_in"] is None

    res = invoke("db", "ls", "--format=json")
    onprem = next(d for d in json.loads(res.output) if d["name"] == "onprem")
    assert onprem["denied_users"] == ["root", "admin"] and onprem["uri"] == "10.0.0.5:6380"
    import yaml

    assert yaml.safe_load(invoke("db", "ls", "--format=yaml").output)[0]["name"] == "my-azure-redis"

    res = invoke("db", "ls", "envprod")
    assert res.exit_code == 1 and "ERROR: label filter 'envprod': write key=value" in res.output


def test_db_ls_marks_logged_in_databases(fc, monkeypatch):
    async def fake_list(prof, selector=None):
        return [allowed("a"), allowed("b")]

    monkeypatch.setattr(cgate_db, "list_databases", fake_list)
    cgate_db.save_login(fc.prof, "b", "default", "0", fc.db_cert("b"))
    lines = invoke("db", "ls").output.splitlines()
    assert lines[2].startswith("a ") and lines[3].startswith("> b ")
    data = json.loads(invoke("db", "ls", "--format=json").output)
    assert data[1]["logged_in"]["db_user"] == "default" and data[0]["logged_in"] is None


def test_db_ls_needs_a_live_session(fc):
    prof = fc.prof
    ident = types_pb2.Identity(kind=types_pb2.IDENTITY_KIND_USER, name="alice")
    old = fc.user_ca.sign(fc.key.public_key(), "alice", ident, dt.timedelta(minutes=1),
                          not_after=pki.now() - dt.timedelta(minutes=1))
    (prof.folder / "cert.pem").write_bytes(pki.cert_to_pem(old))
    res = invoke("db", "ls")
    assert res.exit_code == 1 and "expired" in res.output and "log in again" in res.output
    assert res.output.startswith("ERROR: ") and len(res.output.strip().splitlines()) == 1


# --------------------------------------------------------------------------------------------
# saved certificates, config, logout


def test_saved_login_files_are_private_and_follow_the_key(fc):
    lg = cgate_db.save_login(fc.prof, "orders/cache", "app", "1", fc.db_cert("orders/cache", "app", "1"))
    folder = cgate_db.db_dir(fc.prof)
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    files = list(folder.iterdir())
    assert len(files) == 2 and all(stat.S_IMODE(f.stat().st_mode) == 0o600 for f in files)
    assert "/" not in lg.cert_path.name
    again = cgate_db.load_login(fc.prof, "orders/cache")
    assert again and again.db_user == "app" and again.db_name == "1" and again.valid()
    assert again.matches(None, None) and again.matches("app", "01") and not again.matches("default", None)
    # A certificate for another key (issued before a new `cgate login`) is not used.
    cgate_db.save_login(fc.prof, "x", "default", "0", fc.db_cert("x", key=pki.new_key()))
    assert cgate_db.load_login(fc.prof, "x") is None
    assert [l.name for l in cgate_db.all_logins(fc.prof)] == ["orders/cache"]


def test_config_formats(fc):
    res = invoke("db", "config", "cache")
    assert res.exit_code == 1 and 'not logged in to database "cache": run `cgate db login cache` first' in res.output
    cgate_db.save_login(fc.prof, "cache", "app", "1", fc.db_cert("cache", "app", "1"))
    folder = fc.prof.folder

    cmd = invoke("db", "config", "cache", "--format=cmd").output.strip()
    assert shlex.split(cmd) == ["redis-cli", "-h", "127.0.0.1", "-p", "3081", "--tls",
                                "--cacert", str(folder / "cas.pem"), "--cert", str(folder / "db" / "cache.crt"),
                                "--key", str(folder / "key.pem"), "-n", "1"]

    data = json.loads(invoke("db", "config", "cache", "--format", "json").output)
    assert data["host"] == "127.0.0.1" and data["port"] == 3081 and data["db_user"] == "app"
    assert data["db_name"] == "1" and Path(data["ca"]).read_bytes() == fc.host_ca.cert_pem
    assert Path(data["key"]).read_bytes() == fc.prof.key_pem
    assert pki.cert_from_pem(Path(data["cert"]).read_bytes()).public_key() == fc.key.public_key()

    text = invoke("db", "config", "cache").output
    for label, value in (("Host:", "127.0.0.1"), ("Port:", "3081"), ("User:", "app"), ("Database:", "1"),
                         ("CA:", str(folder / "cas.pem")), ("Key:", str(folder / "key.pem"))):
        assert any(ln.split()[:2] == [label, value] for ln in text.splitlines()), (label, text)

    # No logical database in the route: no -n.
    cgate_db.save_login(fc.prof, "nodb", "default", "", fc.db_cert("nodb", "default", ""))
    assert "-n" not in shlex.split(invoke("db", "config", "nodb", "--format=cmd").output)

    cgate_db.save_login(fc.prof, "old", "default", "0", fc.db_cert("old", ttl=dt.timedelta(minutes=-1)))
    res = invoke("db", "config", "old")
    assert res.exit_code == 1 and "expired" in res.output and "cgate db login old" in res.output


def test_logout(fc):
    cgate_db.save_login(fc.prof, "a", "default", "0", fc.db_cert("a"))
    cgate_db.save_login(fc.prof, "b", "default", "0", fc.db_cert("b"))
    res = invoke("db", "logout", "zzz")
    assert res.exit_code == 1 and 'ERROR: not logged in to database "zzz"' in res.output
    assert invoke("db", "logout", "a").output == 'Logged out of database "a".\n'
    assert cgate_db.load_login(fc.prof, "a") is None and cgate_db.load_login(fc.prof, "b") is not None
    assert invoke("db", "logout").output == 'Logged out of database "b".\n'
    assert invoke("db", "logout").output == "You are not logged in to any database.\n"
    assert (fc.prof.folder / "key.pem").exists()  # the session stays


# --------------------------------------------------------------------------------------------
# redis-cli


def fake_redis_cli(folder: Path, version_line: str, record: Path | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    script = folder / "redis-cli"
    body = f'#!/bin/sh\nif [ "$1" = "--version" ]; then echo "{version_line}"; exit 0; fi\n'
    if record:
        body += f'for a in "$@"; do printf "%s\\n" "$a"; done > {shlex.quote(str(record))}\necho fake-redis-cli-ran\n'
    script.write_text(body)
    script.chmod(0o755)
    return script


@pytest.mark.parametrize("line,ok", [
    ("redis-cli 7.0.15", True), ("redis-cli 6.2.0", True), ("redis-cli 6.2", True),
    ("redis-cli 255.255.255 (git:abc)", True), ("redis-cli 6.0.16", False), ("redis-cli 5.0.7", False),
])
def test_redis_cli_version_check(tmp_path, monkeypatch, line, ok):
    script = fake_redis_cli(tmp_path / "bin", line)
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    if ok:
        assert cgate_db.check_redis_cli() == str(script)
    else:
        with pytest.raises(CLIError) as exc:
            cgate_db.check_redis_cli()
        msg = str(exc.value)
        assert line.split()[1] in msg and "redis-cli 6.2 or newer is needed for TLS client certificates" in msg
        assert "apt-get install redis-tools" in msg and "brew install redis" in msg


def test_redis_cli_missing_or_unreadable(tmp_path, monkeypatch):
    (tmp_path / "empty").mkdir()
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(CLIError, match=r"redis-cli was not found on PATH; redis-cli 6.2 or newer .*apt-get install"):
        cgate_db.check_redis_cli()
    fake_redis_cli(tmp_path / "bin", "something else")
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    with pytest.raises(CLIError, match="cannot tell the version"):
        cgate_db.check_redis_cli()
    assert cgate_db.parse_redis_cli_version("redis-cli 7.2.4") == (7, 2, 4)


def test_connect_runs_redis_cli_with_the_saved_certificate(fc, tmp_path):
    """The real `cgate` process: exec of redis-cli with the TLS flags and extra args."""
    record = tmp_path / "argv.txt"
    fake_redis_cli(tmp_path / "bin", "redis-cli 7.2.4", record)
    cgate_db.save_login(fc.prof, "cache", "app", "1", fc.db_cert("cache", "app", "1"))
    res = run_cli("cgate", "db", "connect", "cache", "--", "--raw", "GET", "k", check=False,
                  extra_env={"CACHEGATE_HOME": str(fc.home), "PATH": f"{tmp_path / 'bin'}{os.pathsep}{BIN}"})
    assert res.returncode == 0, res.stderr
    assert "fake-redis-cli-ran" in res.stdout
    folder = fc.prof.folder
    assert record.read_text().splitlines() == [
        "-h", "127.0.0.1", "-p", "3081", "--tls", "--cacert", str(folder / "cas.pem"),
        "--cert", str(folder / "db" / "cache.crt"), "--key", str(folder / "key.pem"), "-n", "1",
        "--raw", "GET", "k"]


def test_connect_checks_redis_cli_first(fc, tmp_path):
    fake_redis_cli(tmp_path / "bin", "redis-cli 6.0.9")
    res = run_cli("cgate", "db", "connect", "cache", check=False,
                  extra_env={"CACHEGATE_HOME": str(fc.home), "PATH": f"{tmp_path / 'bin'}{os.pathsep}{BIN}"})
    assert res.returncode == 1
    assert res.stderr.strip().startswith("ERROR: ") and len(res.stderr.strip().splitlines()) == 1
    assert "redis-cli 6.0.9" in res.stderr and "apt-get install redis-tools" in res.stderr


def test_proxy_db_requires_tunnel(fc):
    res = invoke("proxy", "db", "cache")
    assert res.exit_code == 1 and "only --tunnel is supported" in res.output


# --------------------------------------------------------------------------------------------
# The tunnel, against a stand-in TLS server that requires the database certificate


async def test_tunnel_pipes_and_renews(fc, tmp_path, monkeypatch):
    import asyncio
    import ssl

    from services.common.creds import internal_name

    host_key = pki.new_key()
    host_cert = fc.host_ca.sign(host_key.public_key(), "dbproxy-host", types_pb2.Identity(
        kind=types_pb2.IDENTITY_KIND_HOST, name="dbproxy-host"), dt.timedelta(hours=1),
        dns_names=[internal_name("dbproxy")], ips=["127.0.0.1"], server=True)
    (tmp_path / "srv.pem").write_bytes(pki.cert_to_pem(host_cert) + pki.key_to_pem(host_key))
    sctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cadata=fc.user_ca.cert_pem.decode())
    sctx.verify_mode = ssl.CERT_REQUIRED
    sctx.load_cert_chain(str(tmp_path / "srv.pem"))
    serials: list[int] = []

    async def echo(reader, writer):
        der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
        from cryptography import x509

        serials.append(x509.load_der_x509_certificate(der).serial_number)
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(echo, "127.0.0.1", 0, ssl=sctx)
    port = server.sockets[0].getsockname()[1]
    fc.prof.meta["redis_addr"] = f"127.0.0.1:{port}"
    issued: list[tuple] = []

    async def fake_issue(prof, name, db_user, db_name, ttl=0.0):
        issued.append((name, db_user, db_name))
        return fc.db_cert(name, db_user, db_name, ttl=dt.timedelta(seconds=6)), prof.key_pem

    monkeypatch.setattr(cgate_db, "issue_cert", fake_issue)
    t = cgate_db.Tunnel(fc.prof, "cache", "default", "0", max_conns=4)
    await t.renew()
    lport = await t.start(0)
    try:
        async def roundtrip(payload: bytes) -> bytes:
            r, w = await asyncio.open_connection("127.0.0.1", lport)
            w.write(payload)
            # Read while writing: an echo of megabytes does not fit in the socket buffers.
            writing = asyncio.create_task(w.drain())
            got = await asyncio.wait_for(r.readexactly(len(payload)), 30)
            await writing
            w.close()
            return got

        big = os.urandom(3 * 1024 * 1024)
        assert await roundtrip(b"*1\r\n$4\r\nPING\r\n") == b"*1\r\n$4\r\nPING\r\n"
        assert await roundtrip(big) == big
        first = serials[-1]
        for _ in range(400):  # renewed at 2/3 of 6s
            if t.renewals >= 2:
                break
            await asyncio.sleep(0.05)
        assert t.renewals >= 2 and issued[-1] == ("cache", "default", "0")
        assert await roundtrip(b"hello") == b"hello"
        assert serials[-1] != first  # new connections use the new certificate
        # No temporary key material is left behind.
        assert not [p for p in cgate_db.db_dir(fc.prof).iterdir() if p.name.startswith(".tunnel-")]

        # Too many at once: refused with a RESP error, the others keep working.
        held = [await asyncio.open_connection("127.0.0.1", lport) for _ in range(4)]
        await asyncio.sleep(0.1)
        r, _ = await asyncio.open_connection("127.0.0.1", lport)
        assert (await asyncio.wait_for(r.read(), 20)).startswith(b"-ERR cachegate tunnel: too many connections")
        for _, hw in held:
            hw.close()
    finally:
        await t.close(2)
        server.close()
    assert not t.conns

    # The proxy unreachable: the client gets a RESP error, not a silent close.
    t2 = cgate_db.Tunnel(fc.prof, "cache", "default", "0")
    await t2.renew()
    lport = await t2.start(0)
    await server.wait_closed()
    try:
        r, _ = await asyncio.open_connection("127.0.0.1", lport)
        assert (await asyncio.wait_for(r.read(), 30)).startswith(b"-ERR cachegate tunnel: cannot reach the proxy")
    finally:
        await t2.close(2)


def test_db_ls_cuts_labels_to_the_terminal_width(fc, monkeypatch):
    """As the reference CLI: a long Labels column is cut with "..." so each line fits the
    terminal; -v and --format show every label; a pipe (no COLUMNS) gets whole lines."""
    labels = {f"tag{i:02d}": f"value-{i:02d}" for i in range(12)}  # ~190 characters of labels
    full = cgate_db.labels_cell(labels)

    async def fake_list(prof, selector=None):
        return [allowed("my-azure-redis", description="Azure Redis server in East US", labels=labels),
                allowed("short", labels={"env": "dev"})]

    monkeypatch.setattr(cgate_db, "list_databases", fake_list)
    monkeypatch.setenv("COLUMNS", "120")
    lines = invoke("db", "ls").output.splitlines()
    assert all(len(ln) <= 120 for ln in lines), lines
    row = next(ln for ln in lines if ln.startswith("my-azure-redis"))
    cut = row[lines[0].index("Labels"):lines[0].index("Connect")].strip()
    assert cut.endswith("...") and full.startswith(cut[:-3]) and len(cut) > 10
    assert row.endswith("cgate db connect my-azure-redis")  # the column after it is whole
    assert "env=dev" in next(ln for ln in lines if ln.startswith("short"))

    # Too narrow for the other columns: Labels keeps 10 characters, nothing else is cut.
    monkeypatch.setenv("COLUMNS", "40")
    row = next(ln for ln in invoke("db", "ls").output.splitlines() if ln.startswith("my-azure-redis"))
    assert "tag00=v..." in row and row.endswith("cgate db connect my-azure-redis")

    monkeypatch.setenv("COLUMNS", "120")
    assert full in invoke("db", "ls", "-v").output
    assert json.loads(invoke("db", "ls", "--format=json").output)[0]["labels"] == labels
    monkeypatch.delenv("COLUMNS")
    assert full in invoke("db", "ls").output  # not a terminal: whole lines
