"""Users, invites, login through the proxy, status, locks and the audit log: the real CLIs
against real auth and dbproxy processes."""

from __future__ import annotations

import datetime as dt
import json
import sqlite3
import stat
import time
from pathlib import Path

import grpc
import pytest

from cachegate.dbproxy.v1 import proxy_service_pb2_grpc
from cachegate.auth.v1 import user_service_pb2
from cachegate.types.v1 import types_pb2
from services.common import identity as idmod
from services.common.pki import cert_from_pem, make_csr, new_key
from tests.helpers import run_cli

pytestmark = pytest.mark.slow

PASSWORD = "correct horse battery staple 42"


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    from tests.helpers import Cluster

    root = tmp_path_factory.mktemp("login")
    c = Cluster(root)
    try:
        c.start_auth(login_max_attempts=3, login_lockout="20s")
        proxy = c.start_joiner("dbproxy", c.token("proxy"))
        c.proxy = f"127.0.0.1:{proxy.info['public_port']}"
        c.home = root / "home"
        yield c
    finally:
        c.stop()


def cgate(c, *args, input=None, check=True):
    return run_cli("cgate", *args, input=input, check=check, extra_env={"CACHEGATE_HOME": str(c.home)})


def add_user(c, name, *flags) -> str:
    data = json.loads(c.cgctl("users", "add", name, *flags, "--format=json").stdout)
    assert data["invite"] and data["invite"] in data["login_command"]
    return data["invite"]


def login(c, user, password=PASSWORD, *extra, check=True):
    return cgate(c, "login", f"--proxy={c.proxy}", f"--user={user}", f"--ca-pin={c.ca_pin}",
                 "--password-stdin", *extra, input=password + "\n", check=check)


def profile_dir(c) -> Path:
    return c.home / "profiles" / c.proxy.replace(":", "_")


def test_invite_login_status_traits_logout(env):
    c = env
    text = c.cgctl("users", "add", "alice", "--roles=access", "--db-users=default,app", "--db-names=0,1").stdout
    assert "cgate login --proxy=" in text and "--invite=" in text and "expires in" in text
    invite = text.split("--invite=")[1].split()[0]

    # First contact without a pin and without a terminal: told which pin to check, nothing sent.
    res = cgate(c, "login", f"--proxy={c.proxy}", f"--invite={invite}", "--password-stdin",
                input=PASSWORD + "\n", check=False)
    assert res.returncode == 1 and c.ca_pin in res.stderr and "--ca-pin" in res.stderr

    res = cgate(c, "login", f"--proxy={c.proxy}", f"--invite={invite}", f"--ca-pin={c.ca_pin}",
                "--password-stdin", input=PASSWORD + "\n")
    assert "Logged in as: alice" in res.stdout
    # The invite is single use.
    again = cgate(c, "login", f"--proxy={c.proxy}", f"--invite={invite}", "--password-stdin",
                  input="another password 1\n", check=False)
    assert again.returncode == 1 and "invite" in again.stderr.lower()

    st = json.loads(cgate(c, "status", "--format=json").stdout)
    assert st["user"] == "alice" and st["roles"] == ["access"]
    assert st["db_users"] == ["default", "app"] and st["db_names"] == ["0", "1"] and not st["expired"]
    human = cgate(c, "status").stdout
    assert "alice" in human and "default, app" in human and "Valid until" in human

    # The profile is private; its certificate carries the traits, and the key never left.
    folder = profile_dir(c)
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    for f in folder.iterdir():
        assert stat.S_IMODE(f.stat().st_mode) == 0o600, f
    ident = idmod.identity_from_cert(cert_from_pem((folder / "cert.pem").read_bytes()))
    assert ident.name == "alice" and list(ident.db_users) == ["default", "app"] and list(ident.db_names) == ["0", "1"]

    # Plain login with the password now works too.
    login(c, "alice")

    out = cgate(c, "logout").stdout
    assert "Logged out alice" in out and not folder.exists()
    res = cgate(c, "status", check=False)
    assert res.returncode == 1 and "not logged in" in res.stderr


def test_wrong_password_and_unknown_user_look_the_same_and_lock_out(env):
    c = env
    invite = add_user(c, "bob")
    cgate(c, "login", f"--proxy={c.proxy}", f"--invite={invite}", f"--ca-pin={c.ca_pin}", "--password-stdin",
          input=PASSWORD + "\n")
    wrong = login(c, "bob", "not the password", check=False)
    nobody = login(c, "nobody-here", "not the password", check=False)
    assert wrong.returncode == nobody.returncode == 1
    assert wrong.stderr == nobody.stderr and "invalid user name or password" in wrong.stderr

    # login_max_attempts=3: the third failure locks bob out, even with the right password.
    login(c, "bob", "still wrong", check=False)
    login(c, "bob", "wrong again", check=False)
    locked_at = time.monotonic()
    locked = login(c, "bob", check=False)
    assert locked.returncode == 1 and "too many" in locked.stderr.lower()
    time.sleep(max(0.0, 20.5 - (time.monotonic() - locked_at)))  # login_lockout=20s, from the last failure
    assert "Logged in as: bob" in login(c, "bob").stdout


def test_session_ttl_is_capped_by_the_role_and_expiry_says_log_in_again(env, tmp_path):
    c = env
    role = tmp_path / "short.yaml"
    role.write_text("""kind: role
version: v1
metadata:
  name: short-sessions
spec:
  options:
    max_session_ttl: 3s
  allow:
    db_labels: {'*': '*'}
    db_users: [default]
""")
    assert 'role "short-sessions" has been created' in c.cgctl("create", "-f", str(role)).stdout
    got = json.loads(c.cgctl("get", "roles", "short-sessions", "--format=json").stdout)
    assert got["metadata"]["name"] == "short-sessions" and got["spec"]["options"]["max_session_ttl"] == "3s"
    invite = add_user(c, "carol", "--roles=access,short-sessions")
    cgate(c, "login", f"--proxy={c.proxy}", f"--invite={invite}", f"--ca-pin={c.ca_pin}", "--password-stdin",
          "--ttl=8h", input=PASSWORD + "\n")
    cert = cert_from_pem((profile_dir(c) / "cert.pem").read_bytes())
    life = cert.not_valid_after_utc - dt.datetime.now(dt.timezone.utc)
    assert life <= dt.timedelta(seconds=4)
    time.sleep(max(0.0, life.total_seconds()) + 0.5)
    res = cgate(c, "status", check=False)
    assert res.returncode == 1 and "EXPIRED" in res.stdout and "log in again" in res.stderr
    in_use = c.cgctl("rm", "role/short-sessions", check=False)
    assert in_use.returncode == 1 and "carol" in in_use.stderr
    c.cgctl("users", "rm", "carol")
    c.cgctl("rm", "role/short-sessions")
    # Built-in roles cannot be removed.
    assert c.cgctl("rm", "role/access", check=False).returncode == 1


async def _db_cert(c, folder: Path) -> None:
    """Ask the proxy's API port for a database certificate with the session certificate."""
    creds = grpc.ssl_channel_credentials(root_certificates=(folder / "cas.pem").read_bytes(),
                                         private_key=(folder / "key.pem").read_bytes(),
                                         certificate_chain=(folder / "cert.pem").read_bytes())
    api = json.loads((folder / "profile.json").read_text())["api_addr"]
    async with grpc.aio.secure_channel(api, creds, options=[
            ("grpc.ssl_target_name_override", "dbproxy.cachegate.internal")]) as ch:
        stub = proxy_service_pb2_grpc.ProxyServiceStub(ch)
        await stub.GenerateDatabaseCert(user_service_pb2.GenerateDatabaseCertRequest(
            csr_pem=make_csr(new_key(), "dave").decode(),
            route=types_pb2.RouteToDatabase(service_name="my-azure-redis", protocol="redis", db_user="default",
                                            db_name="0")), timeout=15)


async def test_a_lock_blocks_login_and_certificates_until_removed(env):
    c = env
    invite = add_user(c, "dave", "--db-users=default", "--db-names=0")
    cgate(c, "login", f"--proxy={c.proxy}", f"--invite={invite}", f"--ca-pin={c.ca_pin}", "--password-stdin",
          input=PASSWORD + "\n")
    folder = profile_dir(c)
    await _db_cert(c, folder)

    created = json.loads(c.cgctl("lock", "--user=dave", "--message=security review", "--format=json").stdout)
    locks = json.loads(c.cgctl("get", "locks", "--format=json").stdout)
    assert any(x["id"] == created["id"] and x["user"] == "dave" for x in locks)
    res = login(c, "dave", check=False)
    assert res.returncode == 1 and "locked" in res.stderr and "security review" in res.stderr
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await _db_cert(c, folder)
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED and "locked" in err.value.details()

    c.cgctl("rm", f"lock/{created['id']}")
    assert "Logged in as: dave" in login(c, "dave").stdout
    await _db_cert(c, folder)

    # A lock on a role locks its users.
    role_lock = json.loads(c.cgctl("lock", "--role=access", "--ttl=1h", "--format=json").stdout)
    assert login(c, "dave", check=False).returncode == 1
    c.cgctl("rm", f"lock/{role_lock['id']}")


def test_audit_search_finds_each_event_and_no_secret_leaks(env):
    c = env
    invite = add_user(c, "erin", "--db-users=default")
    cgate(c, "login", f"--proxy={c.proxy}", f"--invite={invite}", f"--ca-pin={c.ca_pin}", "--password-stdin",
          input=PASSWORD + "\n")
    login(c, "erin", "Erin-Typo-Secret-7", check=False)
    c.cgctl("users", "update", "erin", "--db-users=default,app")
    reset = json.loads(c.cgctl("users", "reset", "erin", "--format=json").stdout)["invite"]
    lock = json.loads(c.cgctl("lock", "--user=erin", "--format=json").stdout)
    c.cgctl("rm", f"lock/{lock['id']}")
    c.cgctl("users", "rm", "erin")

    events = json.loads(c.cgctl("audit", "search", "--format=json").stdout)
    types = {(e["type"], e["success"]) for e in events}
    for want in [("user.create", True), ("user.invite.redeem", True), ("user.login", True),
                 ("user.login", False), ("user.update", True), ("user.reset", True), ("lock.create", True),
                 ("lock.delete", True), ("user.delete", True), ("join.token.create", True), ("join", True),
                 ("role.put", True), ("role.delete", True)]:
        assert want in types, want
    for e in events:
        assert e["id"] and e["time"] and e["code"], e
        assert e["actor"] or (not e["success"] and e["source_addr"]), e  # a bad invite names no user
    logins = json.loads(c.cgctl("audit", "search", "--type=user.login", "--user=erin", "--format=json").stdout)
    assert logins and all(e["type"] == "user.login" for e in logins)
    assert {e["success"] for e in logins} == {True, False}
    assert any(e["source_addr"].startswith("127.0.0.1") for e in logins)
    # Paging: the same events come back one per page.
    assert len(json.loads(c.cgctl("audit", "search", "--type=user.login", "--user=erin", "--limit=2",
                                  "--format=json").stdout)) == 2
    assert "user.login" in c.cgctl("audit", "search", "--type=user.login").stdout

    # No password, hash, invite or private key in any log line or audit record.
    db = sqlite3.connect(str(c.data / "auth" / "cachegate.db"))
    hashes = [v.decode(errors="replace") for (v,) in db.execute("SELECT value FROM items WHERE key LIKE 'users/%'")]
    audit_rows = "\n".join(r.decode(errors="replace") if isinstance(r, bytes) else str(r)
                           for (r,) in db.execute("SELECT data FROM audit"))
    db.close()
    found_hashes = [h.split('"')[0] for doc in hashes for h in doc.split("$argon2")[1:]]
    secrets = [PASSWORD, "Erin-Typo-Secret-7", invite, reset] + ["$argon2" + h for h in found_hashes if h]
    key_pem = (profile_dir(c) / "key.pem").read_text() if (profile_dir(c) / "key.pem").exists() else ""
    key_body = "".join(key_pem.splitlines()[1:-1])
    haystacks = [p.output() for p in c.procs.values()] + [audit_rows, json.dumps(events)]
    for secret in secrets + ([key_body[:40]] if key_body else []):
        for hay in haystacks:
            assert secret not in hay


def test_totp_second_factor(env):
    import pyotp

    c = env
    invite = add_user(c, "frank")
    res = cgate(c, "login", f"--proxy={c.proxy}", f"--invite={invite}", f"--ca-pin={c.ca_pin}", "--password-stdin",
                "--enable-totp", input=PASSWORD + "\n" + "000000\n", check=False)
    assert res.returncode == 1  # a wrong first code sets nothing up
    invite = json.loads(c.cgctl("users", "reset", "frank", "--format=json").stdout)["invite"]
    proc = __import__("subprocess").Popen(
        ["cgate", "login", f"--proxy={c.proxy}", f"--invite={invite}", "--password-stdin", "--enable-totp"],
        stdin=-1, stdout=-1, stderr=-1, text=True,
        env=__import__("tests.helpers", fromlist=["env"]).env(CACHEGATE_HOME=c.home))
    proc.stdin.write(PASSWORD + "\n")
    proc.stdin.flush()
    secret, seen = None, []
    for line in proc.stderr:
        seen.append(line)
        if line.strip().startswith("key:"):
            secret = line.split(":", 1)[1].strip()
            break
    assert secret, "".join(seen)
    totp = pyotp.TOTP(secret)
    out, err = proc.communicate(totp.now() + "\n", timeout=30)
    assert proc.returncode == 0, err
    assert "--otp=CODE" in out
    # Without the code, or with the code already used, the login is refused.
    assert login(c, "frank", check=False).returncode == 1
    # The next time step's code works once.
    time.sleep(30 - time.time() % 30 + 0.5)
    code = totp.now()
    assert "Logged in as: frank" in login(c, "frank", PASSWORD, f"--otp={code}").stdout
    assert login(c, "frank", PASSWORD, f"--otp={code}", check=False).returncode == 1


def test_an_editor_user_runs_cgctl_with_the_cgate_session(env):
    c = env
    invite = add_user(c, "grace", "--roles=editor")
    cgate(c, "login", f"--proxy={c.proxy}", f"--invite={invite}", f"--ca-pin={c.ca_pin}", "--password-stdin",
          input=PASSWORD + "\n")
    home = {"CACHEGATE_HOME": str(c.home)}
    users = json.loads(run_cli("cgctl", "--auth-server", c.auth_addr, "users", "ls", "--format=json",
                               extra_env=home).stdout)
    assert "grace" in {u["name"] for u in users}
    # A user without the editor role is refused.
    invite = add_user(c, "heidi")
    cgate(c, "login", f"--proxy={c.proxy}", f"--invite={invite}", f"--ca-pin={c.ca_pin}", "--password-stdin",
          input=PASSWORD + "\n")
    res = run_cli("cgctl", "--auth-server", c.auth_addr, "users", "ls", check=False, extra_env=home)
    assert res.returncode == 1 and "user heidi may not list user" in res.stderr
    # The auditor role reads the audit log and nothing else.
    invite = add_user(c, "ivan", "--roles=auditor")
    cgate(c, "login", f"--proxy={c.proxy}", f"--invite={invite}", f"--ca-pin={c.ca_pin}", "--password-stdin",
          input=PASSWORD + "\n")
    assert run_cli("cgctl", "--auth-server", c.auth_addr, "audit", "search", "--type=user.login", "--format=json",
                   extra_env=home).stdout.startswith("[")
    res = run_cli("cgctl", "--auth-server", c.auth_addr, "users", "add", "mallory", check=False, extra_env=home)
    assert res.returncode == 1 and "may not create user" in res.stderr
    events = json.loads(c.cgctl("audit", "search", "--type=user.create", "--format=json").stdout)
    assert any(e["fields"].get("user") == "grace" or "grace" in json.dumps(e) for e in events)


def test_login_to_a_wrong_port_of_the_proxy_host_names_the_port_to_use(env):
    """`cgate login` pointed at the web, Redis, API or an auth port of the right host says
    which port that is and which to use, and leaves no profile behind."""
    c = env
    info = c.procs["dbproxy"].info
    web = f"127.0.0.1:{info['web_port']}"
    want = {
        web: (f"{web} is the proxy's HTTPS web port (default 3443), not its login port; use --proxy={c.proxy}"),
        f"127.0.0.1:{info['redis_port']}": "is a Redis port (the proxy's is 3081 by default, for `cgate db connect`",
        f"127.0.0.1:{info['api_port']}": "is not the proxy's login port: it is a Cachegate service port that takes "
                                         "host certificates",
        c.auth_addr: "is not the proxy's login port: it is a Cachegate service port",
        c.join_addr: "is auth's join port (default 3026), not the proxy's login port; use --proxy=127.0.0.1:3080",
    }
    home = c.root / "wrong-port-home"
    for addr, text in want.items():
        res = run_cli("cgate", "login", f"--proxy={addr}", "--user=nobody", f"--ca-pin={c.ca_pin}",
                      "--password-stdin", input="x\n", check=False, extra_env={"CACHEGATE_HOME": str(home)})
        assert res.returncode == 1, res
        err = res.stderr.strip()
        assert err.startswith("ERROR: ") and len(err.splitlines()) == 1 and text in err, (addr, err)
        assert "use --proxy=" in err
        assert not (home / "profiles").exists() or not any((home / "profiles").iterdir()), addr


def test_cgctl_pointed_at_another_port_of_the_cluster_names_it(env):
    """`cgctl --auth-server` naming the proxy's ports or auth's join port says which port that
    is and `--auth-server=HOST:3025`, not a TLS error about certificates."""
    c = env
    info = c.procs["dbproxy"].info
    want = {
        c.proxy: "is the proxy's login port (default 3080), not auth's mesh port",
        f"127.0.0.1:{info['web_port']}": "is the proxy's HTTPS web port (default 3443), not auth's mesh port",
        f"127.0.0.1:{info['api_port']}": "is dbproxy's API port (default 3082), not auth's mesh port",
        c.join_addr: "is auth's join port (default 3026), not auth's mesh port",
    }
    for addr, text in want.items():
        res = run_cli("cgctl", "--auth-server", addr, "-i", c.admin_identity, "status", check=False)
        err = res.stderr.strip()
        assert res.returncode == 1 and err == f"ERROR: {addr} {text}; use --auth-server=127.0.0.1:3025", (addr, err)
    assert "test-cluster" in c.cgctl("status").stdout  # the right port still works
