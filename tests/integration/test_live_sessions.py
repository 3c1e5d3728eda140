"""Live sessions follow the cluster's state (real auth and dbproxy processes, a real TLS
redis-server, certificates that auth signed): a change to a role, a user or a database record
ends or narrows every live session it touches within 5 s, with a one-line error that names the
change and a ``db.session.end`` whose reason does too."""

from __future__ import annotations

import json
import time

import hiredis
import pytest

from tests.dbproxy.conftest import RawClient, certs, redis_server  # noqa: F401 (fixtures)
from tests.integration.test_dataplane import SECRET_ENV, db_cert, login_user, redis_cli
from tests.dbproxy.conftest import REDIS_PASSWORD
from tests.helpers import Cluster

pytestmark = pytest.mark.slow

WITHIN = 5.0
ENDED = "ERR Cachegate ended this session: "


@pytest.fixture(scope="module")
def env(tmp_path_factory, certs, redis_server):  # noqa: F811
    root = tmp_path_factory.mktemp("live")
    c = Cluster(root)
    try:
        c.start_auth()
        proxy = c.start_joiner("dbproxy", c.token("proxy"), extra_env={SECRET_ENV: REDIS_PASSWORD},
                               database_ca_files=[certs.path("server-ca.pem")])
        c.proxy = f"127.0.0.1:{proxy.info['public_port']}"
        c.api = f"127.0.0.1:{proxy.info['api_port']}"
        c.redis_port = proxy.info["redis_port"]
        c.home = root / "home"
        c.db_port = redis_server.port
        yield c
    finally:
        c.stop()


def put_db(c, name: str, env_label: str) -> None:
    c.cgctl("create", "-f", "-", input=f"""kind: db
version: v1
metadata: {{name: {name}, labels: {{env: {env_label}}}}}
spec: {{uri: "127.0.0.1:{c.db_port}", tls: true, secret: "env:{SECRET_ENV}"}}
""")


def put_role(c, name: str, labels: str = "{env: prod}", commands: str = "['*']", deny: str = "") -> None:
    c.cgctl("create", "-f", "-", input=f"""kind: role
version: v1
metadata: {{name: {name}}}
spec:
  allow:
    db_labels: {labels}
    db_users: ['{{{{internal.db_users}}}}']
    db_names: ['{{{{internal.db_names}}}}']
    db_commands: {commands}
{deny}""")


def cmd(*args: str) -> bytes:
    return b"".join([f"*{len(args)}\r\n".encode()] + [f"${len(a.encode())}\r\n{a}\r\n".encode() for a in args])


class Live:
    """One live RESP session (a TLS socket), so that the test sees exactly what this session
    is told: no client library reconnecting behind its back."""

    def __init__(self, c, cert: tuple[str, str, str]):
        self.raw = RawClient(c.redis_port, cert[2], (cert[0], cert[1]))

    def call(self, *args: str, timeout: float = 10):
        self.raw.send(cmd(*args))
        return self.raw.read(1, timeout)[0]

    def ended(self, within: float = WITHIN) -> str:
        """The reason in the one line the proxy sent when it ended the session (it must end
        within ``within``)."""
        t0 = time.monotonic()
        got = []
        try:
            got = self.raw.read(1, timeout=within)
        except EOFError:
            pass
        except TimeoutError:
            raise AssertionError(f"the session was still up {within:g}s after the change") from None
        assert time.monotonic() - t0 <= within + 0.5
        assert self.raw.closed(3), "the proxy did not close the session"
        assert got and isinstance(got[0], hiredis.ReplyError), f"no error line before the close: {got!r}"
        line = str(got[0])
        assert "\n" not in line and "\r" not in line
        assert line.startswith(ENDED), line
        return line[len(ENDED):]

    def close(self):
        self.raw.close()


def until_denied(live: Live, *args: str, within: float = WITHIN):
    """Run the command every 0.1 s until the proxy denies it; the denial."""
    deadline = time.monotonic() + within
    while True:
        reply = live.call(*args)
        if isinstance(reply, hiredis.ReplyError):
            return str(reply)
        assert time.monotonic() < deadline, f"{' '.join(args)} was still allowed {within:g}s after the change"
        time.sleep(0.1)


async def session(c, user: str, *flags: str, db: str = "shop", db_name: str = "") -> Live:
    folder = login_user(c, user, *flags)
    crt, key, ca = await db_cert(c, folder, db, "default", db_name)
    live = Live(c, (crt, key, ca))
    assert live.call("PING") == b"PONG"
    live.cert = (crt, key, ca)
    return live


def session_end_reasons(c, user: str, n: int = 1, timeout: float = 20) -> list[str]:
    """The reasons of the user's ``db.session.end`` events (oldest first), once there are ``n``."""
    deadline = time.monotonic() + timeout
    while True:
        events = json.loads(c.cgctl("audit", "search", "--type=db.session.end", f"--user={user}",
                                    "--format=json").stdout)
        if len(events) >= n:
            return [e["fields"]["reason"] for e in events]
        assert time.monotonic() < deadline, f"{len(events)} of {n} db.session.end events for {user}"
        time.sleep(0.5)


@pytest.fixture(scope="module", autouse=True)
def shop(env):
    put_db(env, "shop", "prod")


async def test_role_update_adding_a_deny_applies_to_the_next_command_and_the_session_stays_up(env):
    c = env
    put_role(c, "shop-rw")
    live = await session(c, "rhea", "--roles=shop-rw", "--db-users=default")
    assert live.call("SET", "live-k", "v") == b"OK" and live.call("GET", "live-k") == b"v"
    put_role(c, "shop-rw", deny="  deny:\n    db_commands: [GET]\n")
    denial = until_denied(live, "GET", "live-k")
    assert 'command GET denied by role "shop-rw"' in denial
    assert live.call("SET", "live-k", "v2") == b"OK"  # the same session goes on
    assert live.call("PING") == b"PONG"

    # A role update that no longer selects the database ends the session.
    put_role(c, "shop-rw", labels="{env: staging}")
    line = live.ended()
    assert line.startswith('role "shop-rw" changed')
    assert 'access to database "shop" denied' in line
    live.close()
    [reason] = session_end_reasons(c, "rhea")
    assert reason.startswith('role "shop-rw" changed; access to database "shop" denied')
    # A new session with the same certificate is refused too.
    res = redis_cli(c, *live.cert, "PING")
    assert "denied" in res.stdout + res.stderr


async def test_user_losing_a_role_is_narrowed_then_ended(env):
    c = env
    put_role(c, "shop-all")
    put_role(c, "shop-read", commands="['@read']")
    live = await session(c, "ugo", "--roles=shop-all,shop-read", "--db-users=default")
    assert live.call("SET", "ugo-k", "1") == b"OK"
    # Without shop-all, only what shop-read allows: SET is denied from the next command on.
    c.cgctl("users", "update", "ugo", "--roles=shop-read")
    assert "command SET denied by your roles" in until_denied(live, "SET", "ugo-k", "2")
    assert live.call("GET", "ugo-k") == b"1"
    # A role added to the user does not widen an existing certificate; with no role of the
    # certificate left, the session ends.
    put_role(c, "shop-other")
    c.cgctl("users", "update", "ugo", "--roles=shop-other")
    line = live.ended()
    assert line.startswith("user ugo's roles changed"), line
    live.close()
    [reason] = session_end_reasons(c, "ugo")
    assert reason.startswith("user ugo's roles changed;")


async def test_user_traits_change_ends_a_session_in_a_logical_database_it_lost(env):
    c = env
    put_role(c, "shop-db")
    in_db1 = await session(c, "tess", "--roles=shop-db", "--db-users=default", "--db-names=0,1", db_name="1")
    folder = c.home / "profiles" / c.proxy.replace(":", "_")
    crt, key, ca = await db_cert(c, folder, "shop", "default")
    in_db0 = Live(c, (crt, key, ca))
    assert in_db0.call("SELECT", "1") == b"OK" and in_db0.call("SELECT", "0") == b"OK"

    c.cgctl("users", "update", "tess", "--db-names=0")
    line = in_db1.ended()
    assert line.startswith("user tess's traits changed")
    assert "logical database 1" in line
    # The session in database 0 goes on, narrowed: database 1 is denied from now on.
    assert "logical database 1" in until_denied(in_db0, "SELECT", "1")
    assert in_db0.call("PING") == b"PONG"
    in_db0.close()
    in_db1.close()
    reasons = session_end_reasons(c, "tess", 2)
    assert sorted(r.split(";")[0] for r in reasons) == ["client closed", "user tess's traits changed"]


async def test_user_delete_ends_the_session(env):
    c = env
    put_role(c, "shop-del")
    live = await session(c, "dora", "--roles=shop-del", "--db-users=default")
    c.cgctl("users", "rm", "dora")
    assert live.ended() == "user dora was deleted"
    live.close()
    assert session_end_reasons(c, "dora") == ["user dora was deleted"]
    res = redis_cli(c, *live.cert, "PING")
    assert 'user "dora" does not exist' in res.stdout + res.stderr


async def test_database_label_change_and_removal_end_their_sessions(env):
    c = env
    put_role(c, "shop-lbl")
    put_db(c, "shop-eu", "prod")
    put_db(c, "shop-us", "prod")
    eu = await session(c, "lena", "--roles=shop-lbl", "--db-users=default", db="shop-eu")
    folder = c.home / "profiles" / c.proxy.replace(":", "_")
    us_cert = await db_cert(c, folder, "shop-us", "default")
    us = Live(c, us_cert)
    assert us.call("PING") == b"PONG"

    put_db(c, "shop-eu", "dev")  # out of the role's labels
    line = eu.ended()
    assert line.startswith('database "shop-eu" labels changed')
    assert us.call("PING") == b"PONG"  # another database's session is not touched
    c.cgctl("rm", "db/shop-us")
    assert us.ended() == 'database "shop-us" was removed'
    eu.close()
    us.close()
    reasons = session_end_reasons(c, "lena", 2)
    assert sorted(r.split(";")[0] for r in reasons) == ['database "shop-eu" labels changed',
                                                       'database "shop-us" was removed']


async def test_a_role_in_use_cannot_be_deleted_under_a_live_session(env):
    """Auth refuses to delete a role its users hold, so a live session never loses its role
    that way (sessions follow a role that is deleted anyway, e.g. after a re-sync: see
    tests/dbproxy/test_live_access.py)."""
    c = env
    put_role(c, "shop-keep")
    live = await session(c, "kim", "--roles=shop-keep", "--db-users=default")
    res = c.cgctl("rm", "role/shop-keep", check=False)
    assert res.returncode != 0 and "assigned to users kim" in res.stdout + res.stderr
    time.sleep(1)
    assert live.call("PING") == b"PONG"
    live.close()
