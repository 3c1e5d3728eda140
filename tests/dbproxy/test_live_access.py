"""Live sessions follow what dbproxy hears from auth, including what the real cluster cannot
easily produce on demand: a role deleted while a certificate still names it, and re-syncs
(INIT_DONE swapping the whole state after a reconnect). The real listener, sessions and
redis-server; the watch events are handed to dbproxy's cache as its watch streams would."""

from __future__ import annotations

import os
import time
import weakref
from pathlib import Path
from types import SimpleNamespace

import hiredis
import pytest

from cachegate.auth.v1 import role_service_pb2, user_service_pb2
from cachegate.types.v1 import types_pb2
from services.common import rbac
from services.common.authz import CertVerifier
from services.dbproxy.cache import ClusterCache, UserAccess
from services.dbproxy.dataplane import DataPlane
from services.dbproxy.health import DatabaseHealth
from services.dbproxy.listener import RespListener
from services.dbproxy.resp import encode_command
from services.dbproxy.upstream import DatabaseTLS, UpstreamPool

pytestmark = pytest.mark.slow

DB = "live-db"
SECRET_ENV = "CACHEGATE_DB_LIVE_ACCESS_TEST"
PUT, DELETE = types_pb2.WATCH_EVENT_TYPE_PUT, types_pb2.WATCH_EVENT_TYPE_DELETE


def role(name: str, deny_commands: tuple[str, ...] = ()) -> rbac.Role:
    return rbac.Role.from_dict({"kind": "role", "version": "v1", "metadata": {"name": name}, "spec": {
        "allow": {"db_labels": {"env": "test"}, "db_users": ["{{internal.db_users}}"],
                  "db_names": ["{{internal.db_names}}"], "db_commands": ["*"]},
        "deny": {"db_commands": list(deny_commands)} if deny_commands else {}}})


@pytest.fixture(scope="module")
def plane(proxy, certs, redis_server):
    """dbproxy's DataPlane authorization and change handling on its own listener."""
    os.environ[SECRET_ENV] = redis_server.password
    p = DataPlane.__new__(DataPlane)
    p.pcfg = SimpleNamespace(database_ca_files=[])
    p._db_tls = DatabaseTLS()
    p.verifier = CertVerifier(certs.server_ca.cert, certs.user_ca.cert)
    p.azure_keys = None
    p.entra = None
    p.health = DatabaseHealth()
    p.pool = UpstreamPool(size=1, health=p.health)
    p._connect = p.health.tracked(p.pool.get)
    p._contexts = weakref.WeakSet()
    p.cache = ClusterCache(None, on_change=p._on_change)
    for ev in p.cache.ready.values():
        ev.set()
    p.cache.databases = {DB: types_pb2.Database(
        name=DB, uri=f"127.0.0.1:{redis_server.port}", tls=True, labels={"env": "test"},
        ca_cert_pem=Path(certs.path("server-ca.pem")).read_text(), secret_ref=f"env:{SECRET_ENV}")}

    async def start():
        d = Path(certs.dir)
        p.listener = RespListener(p.authorize, proxy.spool, cert_pem=(d / "proxy.crt").read_bytes(),
                                  key_pem=(d / "proxy.key").read_bytes(), client_ca_pem=certs.user_ca.cert_pem,
                                  limits=proxy.listener.limits)
        return await p.listener.start()

    p.port = proxy.call(start())
    yield p
    proxy.call(p.listener.close(2))
    proxy.call(p.pool.close())
    os.environ.pop(SECRET_ENV, None)


def C(*args: str) -> bytes:
    return encode_command(*args)


def connect(proxy, plane, cert):
    from tests.dbproxy.conftest import RawClient

    raw = RawClient(plane.port, proxy.certs.path("server-ca.pem"), cert)
    raw.send(C("PING"))
    assert raw.read(1) == [b"PONG"]
    return raw


def ended(raw, within: float = 5.0) -> str:
    t0 = time.monotonic()
    got = raw.read(1, timeout=within)
    assert time.monotonic() - t0 < within
    assert isinstance(got[0], hiredis.ReplyError), got
    assert raw.closed(3)
    return str(got[0])


def end_reasons(proxy, user: str, n: int) -> list[str]:
    deadline = time.monotonic() + 5
    while True:
        ends = [e.fields["reason"] for e in proxy.flush_audit() if e.actor == user and e.type == "db.session.end"]
        if len(ends) >= n or time.monotonic() > deadline:
            return ends
        time.sleep(0.05)


def set_state(proxy, plane, roles: dict, users: dict) -> None:
    def _set():
        plane.cache.roles = dict(rbac.BUILTIN_ROLES) | roles
        plane.cache.users = users

    proxy.run(_set)


def test_a_deleted_role_ends_the_sessions_whose_certificate_names_it(proxy, plane, certs):
    set_state(proxy, plane, {"live-rw": role("live-rw"), "live-other": role("live-other")},
              {"lara": UserAccess("lara", ("live-rw",), ("default",), ("0",)),
               "otto": UserAccess("otto", ("live-other",), ("default",), ("0",))})
    lara = connect(proxy, plane, certs.user_cert("lara", service=DB, roles=("live-rw",), db_names=("0",)))
    otto = connect(proxy, plane, certs.user_cert("otto", service=DB, roles=("live-other",), db_names=("0",)))
    proxy.run(plane.cache._on_role, role_service_pb2.WatchRolesResponse(
        type=DELETE, role=types_pb2.Role(name="live-rw")), None)
    assert ended(lara) == ('ERR Cachegate ended this session: role "live-rw" was deleted; '
                           'access to database "live-db" denied by your roles')
    otto.send(C("PING"))
    assert otto.read(1) == [b"PONG"]  # a session without that role is not touched
    otto.close()
    lara.close()
    assert end_reasons(proxy, "lara", 1)[-1].startswith('role "live-rw" was deleted;')


def test_a_resync_applies_what_changed_while_the_stream_was_away(proxy, plane, certs):
    set_state(proxy, plane, {"live-rw": role("live-rw")},
              {"rita": UserAccess("rita", ("live-rw",), ("default",), ("0",)),
               "sam": UserAccess("sam", ("live-rw",), ("default",), ("0",))})
    rita = connect(proxy, plane, certs.user_cert("rita", service=DB, roles=("live-rw",), db_names=("0",)))
    sam = connect(proxy, plane, certs.user_cert("sam", service=DB, roles=("live-rw",), db_names=("0",)))
    rita.send(C("SET", "resync", "1") + C("GET", "resync"))
    assert rita.read(2) == [b"OK", b"1"]

    # The role watch re-syncs with a GET deny added: the next GET is denied, the session stays.
    fresh_roles = {"live-rw": role("live-rw", deny_commands=("GET",))}
    proxy.run(plane.cache._on_role, None, fresh_roles, True)
    rita.send(C("GET", "resync") + C("PING"))
    got = rita.read(2)
    assert 'command GET denied by role "live-rw"' in str(got[0]) and got[1] == b"PONG"

    # The user watch re-syncs without sam: only sam's session ends.
    fresh_users = {"rita": UserAccess("rita", ("live-rw",), ("default",), ("0",))}
    proxy.run(plane.cache._on_user, None, fresh_users, True)
    assert ended(sam) == "ERR Cachegate ended this session: user sam was deleted"
    rita.send(C("PING"))
    assert rita.read(1) == [b"PONG"]

    # A re-sync that changes nothing leaves sessions alone; one event that does ends rita's.
    proxy.run(plane.cache._on_user, None, dict(fresh_users), True)
    proxy.run(plane.cache._on_user, user_service_pb2.WatchUsersResponse(
        type=PUT, user=user_service_pb2.UserAccess(name="rita", roles=["access"], db_users=["default"])), None)
    assert ended(rita).startswith("ERR Cachegate ended this session: user rita's roles and traits changed;")
    rita.close()
    sam.close()
    assert end_reasons(proxy, "sam", 1)[-1] == "user sam was deleted"


def _connections(direct) -> dict[int, str]:
    """The database's connections right now (asked on the test's own connection): id -> name."""
    return {int(c["id"]): c.get("name", "") for c in direct.client_list()}


def _wait(cond, within: float = 5.0) -> bool:
    deadline = time.monotonic() + within
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def test_a_session_that_ends_cleanly_gives_its_connection_to_the_next_reset(proxy, plane, certs, redis_server):
    set_state(proxy, plane, {"live-rw": role("live-rw")},
              {"rene": UserAccess("rene", ("live-rw",), ("default",), ("0", "1"))})
    cert = certs.user_cert("rene", service=DB, roles=("live-rw",), db_names=("0",))
    direct = redis_server.client()
    direct.delete("reuse:k")
    before = direct.info("stats")["total_connections_received"]
    reused = plane.pool.reused
    for i in range(6):
        s = connect(proxy, plane, cert)
        # It starts on its route's database, whatever the session before it selected.
        s.send(C("GET", "reuse:k"))
        assert s.read(1) == [None]
        s.send(C("SELECT", "1") + C("SET", "reuse:k", str(i)) + C("QUIT"))
        assert s.read(3) == [b"OK", b"OK", b"OK"]
        assert s.closed(3)
        # Back in the pool, reset and logged in again, waiting under the spare name.
        assert _wait(lambda: "cachegate-spare" in _connections(direct).values())
    direct.select(1)
    assert direct.get("reuse:k") == b"5"
    direct.delete("reuse:k")
    # Six sessions, and the database saw at most two new connections (the pool's first fill).
    assert direct.info("stats")["total_connections_received"] - before <= 2
    assert plane.pool.reused - reused >= 4


@pytest.mark.parametrize("state", [C("CLIENT", "SETINFO", "LIB-NAME", "x"), C("SUBSCRIBE", "reuse-ch")],
                         ids=["setinfo", "subscribe"])
def test_a_session_that_set_connection_state_does_not_give_its_connection_back(proxy, plane, certs,
                                                                             redis_server, state):
    set_state(proxy, plane, {"live-rw": role("live-rw")},
              {"rene": UserAccess("rene", ("live-rw",), ("default",), ("0",))})
    direct = redis_server.client()
    s = connect(proxy, plane, certs.user_cert("rene", service=DB, roles=("live-rw",), db_names=("0",)))
    s.send(C("CLIENT", "ID"))
    (own,) = s.read(1)
    assert own in _connections(direct)
    s.send(state)
    s.read(1)
    s.close()
    # Closed, not reset for someone else.
    assert _wait(lambda: own not in _connections(direct))


def test_a_session_ended_with_a_reply_due_does_not_give_its_connection_back(proxy, plane, certs, redis_server):
    set_state(proxy, plane, {"live-rw": role("live-rw")},
              {"rene": UserAccess("rene", ("live-rw",), ("default",), ("0",))})
    cert = certs.user_cert("rene", service=DB, roles=("live-rw",), db_names=("0",))
    direct = redis_server.client()
    s = connect(proxy, plane, cert)
    s.send(C("DEBUG", "SLEEP", "0.3"))
    time.sleep(0.1)
    s.close()  # its reply is still due
    nxt = connect(proxy, plane, cert)
    nxt.send(C("ECHO", "mine"))
    assert nxt.read(1) == [b"mine"]  # never the earlier session's +OK
    nxt.close()
    # The connection that still owed a reply (its last command DEBUG) is closed, not reset
    # and handed on.
    assert _wait(lambda: all(c.get("cmd") != "debug" for c in direct.client_list()))


def _session_conns(direct, db: int) -> list[dict]:
    """The database's unnamed connections in logical database ``db`` (sessions', not spares)."""
    return [c for c in direct.client_list() if c.get("name", "") == "" and int(c["db"]) == db
            and "client" not in c.get("cmd", "")]


def test_an_idle_session_gives_its_connection_back_and_takes_one_again_in_its_database(
        proxy, plane, certs, redis_server):
    set_state(proxy, plane, {"live-rw": role("live-rw")},
              {"rene": UserAccess("rene", ("live-rw",), ("default",), ("0", "1"))})
    assert proxy.listener.limits.upstream_idle_release == 1.0  # the default
    direct = redis_server.client()
    direct.select(1)
    direct.delete("park:k")
    s = connect(proxy, plane, certs.user_cert("rene", service=DB, roles=("live-rw",), db_names=("0",)))
    s.send(C("SELECT", "1") + C("SET", "park:k", "before"))
    assert s.read(2) == [b"OK", b"OK"]
    assert len(_session_conns(direct, 1)) == 1
    # Idle: its connection goes back to the pool (RESET: database 0, the spare's name).
    assert _wait(lambda: not _session_conns(direct, 1), within=5)
    # The next command runs on a connection taken again, in the database the session selected.
    s.send(C("GET", "park:k") + C("INCR", "park:n"))
    assert s.read(2) == [b"before", 1]
    assert direct.get("park:n") == b"1"
    s.send(C("QUIT"))
    assert s.read(1) == [b"OK"]
    direct.delete("park:k", "park:n")
    queries = [(e.fields["command"], e.fields["db_name"]) for e in proxy.flush_audit()
               if e.actor == "rene" and e.type == "db.session.query"]
    assert queries[-4:] == [("SET", "1"), ("GET", "1"), ("INCR", "1"), ("QUIT", "1")]


@pytest.mark.parametrize("state,cmd", [
    (C("WATCH", "park:w"), "watch"),
    (C("SET", "park:w", "1") + C("WAIT", "0", "0"), "wait"),
    (C("CLIENT", "SETNAME", "mine"), "client|setname"),
], ids=["watch", "wait", "setname"])
def test_an_idle_session_that_set_connection_state_keeps_its_connection(proxy, plane, certs, redis_server,
                                                                         state, cmd):
    set_state(proxy, plane, {"live-rw": role("live-rw")},
              {"rene": UserAccess("rene", ("live-rw",), ("default",), ("0",))})
    direct = redis_server.client()
    s = connect(proxy, plane, certs.user_cert("rene", service=DB, roles=("live-rw",), db_names=("0",)))
    s.send(state)
    s.read(state.count(b"*"))
    time.sleep(2.5)  # past upstream_idle_release and the watchdog's next look
    assert [c for c in direct.client_list() if c.get("cmd") == cmd]
    if cmd == "watch":  # and WATCH still works: a change made meanwhile aborts the transaction
        direct.set("park:w", "changed")
        s.send(C("MULTI") + C("SET", "park:w", "mine") + C("EXEC"))
        assert s.read(3) == [b"OK", b"QUEUED", None]
        assert direct.get("park:w") == b"changed"
    s.close()
    direct.delete("park:w")


def test_an_idle_session_that_cannot_have_a_connection_again_ends_with_one_line(proxy, plane, certs,
                                                                               redis_server):
    set_state(proxy, plane, {"live-rw": role("live-rw")},
              {"rene": UserAccess("rene", ("live-rw",), ("default",), ("0",))})
    direct = redis_server.client()
    s = connect(proxy, plane, certs.user_cert("rene", service=DB, roles=("live-rw",), db_names=("0",)))
    assert _wait(lambda: not _session_conns(direct, 0), within=5)
    # While it is idle the database's password changes and the waiting connections go.
    os.environ[SECRET_ENV] = "not-the-password"
    try:
        proxy.run(lambda: plane.pool.forget(DB))
        s.send(C("SET", "park:lost", "1"))
        line = ended(s)
    finally:
        os.environ[SECRET_ENV] = redis_server.password
    assert line.startswith('ERR Cachegate ended this session: the proxy could not authenticate to database '
                           f'"{DB}"'), line
    assert line.endswith("the command was not run")
    assert "not-the-password" not in line and redis_server.password not in line
    assert direct.get("park:lost") is None
    assert end_reasons(proxy, "rene", 1)[-1] == "database connection failed: auth"


def test_a_new_session_gets_the_roles_and_traits_as_they_are_now(proxy, plane, certs):
    """Sessions of one user and certificate share what RBAC compiled for them, until a role
    or the user changes."""
    from services.common.roleproto import role_to_proto

    set_state(proxy, plane, {"live-rw": role("live-rw")},
              {"nora": UserAccess("nora", ("live-rw",), ("default",), ("0", "1"))})
    cert = certs.user_cert("nora", service=DB, roles=("live-rw",), db_names=("0",))
    for _ in range(2):
        s = connect(proxy, plane, cert)
        s.send(C("GET", "nora:k") + C("SELECT", "1"))
        assert s.read(2) == [None, b"OK"]
        s.close()
    proxy.run(plane.cache._on_role, role_service_pb2.WatchRolesResponse(
        type=PUT, role=role_to_proto(role("live-rw", deny_commands=("GET",)))), None)
    s = connect(proxy, plane, cert)
    s.send(C("GET", "nora:k"))
    assert 'command GET denied by role "live-rw"' in str(s.read(1)[0])
    s.close()
    proxy.run(plane.cache._on_user, user_service_pb2.WatchUsersResponse(
        type=PUT, user=user_service_pb2.UserAccess(name="nora", roles=["live-rw"], db_users=["default"],
                                                   db_names=["0"])), None)
    s = connect(proxy, plane, cert)
    s.send(C("SELECT", "1"))
    (reply,) = s.read(1)
    assert isinstance(reply, hiredis.ReplyError), reply
    s.close()
