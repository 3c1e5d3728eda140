"""What a user of the `access` role must not get through the proxy: the database's key,
its users, server administration, scripts that escape RBAC, other sessions' details.

Real redis-server (TLS, requirepass) behind the real listener; INFO commandstats on the
server itself proves that nothing refused reached it."""

from __future__ import annotations

import datetime as dt
import logging
import time

import pytest
import redis

from services.dbproxy.resp import encode_command

pytestmark = pytest.mark.slow


def C(*args) -> bytes:
    return encode_command(*args)


def calls(redis_server) -> dict[str, int]:
    """The server's own count of each command it ran (``config|get``, ``acl|setuser``...)."""
    stats = redis_server.client().info("commandstats")
    return {k.removeprefix("cmdstat_"): v["calls"] for k, v in stats.items()}


def ran(before: dict[str, int], after: dict[str, int], name: str) -> int:
    return after.get(name, 0) - before.get(name, 0)


@pytest.fixture
def key(proxy) -> str:
    """The access key the proxy authenticates with (what no reply may contain)."""
    return proxy.creds.cached


@pytest.fixture
def eve(certs):
    """An ordinary user: the built-in access role, every db user and logical database."""
    return certs.user_cert("eve", roles=("access",), db_names=("*",), tag="sec")


# -- the access key and the database's users ---------------------------------------------------


@pytest.mark.parametrize("protocol", [2, 3])
def test_config_get_never_shows_the_key(proxy, eve, key, protocol):
    c = proxy.client(eve, protocol=protocol)
    assert c.config_get("requirepass") == {"requirepass": "<redacted>"}
    everything = c.config_get("*")
    assert len(everything) > 100 and everything["databases"] == "16"
    for param in ("requirepass", "masterauth", "masteruser"):
        assert everything[param] == "<redacted>"
    assert c.config_get("*pass*")["requirepass"] == "<redacted>"
    assert key not in repr(everything)
    c.close()
    raw = proxy.raw(eve)
    raw.send(C("CONFIG", "GET", "requirepass") + C("CONFIG", "GET", "*") + C("PING"))
    replies = raw.read(3)
    assert replies[2] == b"PONG" and key.encode() not in repr(replies).encode()
    raw.close()


def test_secret_config_and_acl_users_are_refused_and_never_reach_redis(proxy, redis_server, certs, eve):
    ops = certs.user_cert("olga", roles=("ops",), db_names=("*",), tag="sec")  # may CONFIG SET
    attempts = [
        (eve, ("CONFIG", "SET", "requirepass", "mine"), "config|set", "CONFIG SET requirepass is refused"),
        (ops, ("CONFIG", "SET", "requirepass", "mine"), "config|set", "CONFIG SET requirepass is refused"),
        (ops, ("CONFIG", "SET", "maxmemory", "0", "masterauth", "x"), "config|set", "CONFIG SET masterauth"),
        (eve, ("ACL", "SETUSER", "probe", "on", ">pw", "+@all", "~*"), "acl|setuser", "ACL SETUSER is refused"),
        (ops, ("ACL", "SETUSER", "probe", "on", ">pw", "+@all"), "acl|setuser", "ACL SETUSER is refused"),
        (eve, ("ACL", "DELUSER", "default"), "acl|deluser", "ACL DELUSER is refused"),
        (eve, ("ACL", "GETUSER", "default"), "acl|getuser", "ACL GETUSER is refused"),
        (eve, ("ACL", "LIST"), "acl|list", "ACL LIST is refused"),
        (eve, ("ACL", "SAVE"), "acl|save", "ACL SAVE is refused"),
        (eve, ("ACL", "LOAD"), "acl|load", "ACL LOAD is refused"),
        (eve, ("ACL", "DRYRUN", "default", "GET", "k"), "acl|dryrun", "ACL DRYRUN is refused"),
        (eve, ("MIGRATE", "127.0.0.1", "1", "", "0", "100", "AUTH", "pw", "KEYS", "k"), "migrate",
         "MIGRATE with AUTH"),
        (eve, ("MIGRATE", "127.0.0.1", "1", "k", "0", "100", "COPY", "AUTH2", "u", "pw"), "migrate",
         "MIGRATE with AUTH"),
    ]
    before = calls(redis_server)
    for cert, argv, _, expected in attempts:
        raw = proxy.raw(cert)
        raw.send(C(*argv) + C("PING"))
        reply, pong = raw.read(2)
        assert isinstance(reply, Exception) and str(reply).startswith(expected), (argv, reply)
        assert pong == b"PONG"  # the session goes on
        raw.close()
    after = calls(redis_server)
    for _, _, stat, _ in attempts:
        assert ran(before, after, stat) == 0, stat
    # Nothing was created or changed: no Redis user "probe", the proxy's key still works.
    assert redis_server.client().execute_command("ACL", "USERS") == [b"default"]
    c = proxy.client(eve)
    assert c.execute_command("ACL", "WHOAMI") == b"default" and c.ping()
    c.close()


def test_server_administration_is_not_in_the_access_role(proxy, redis_server, eve):
    attempts = [("SHUTDOWN", "NOSAVE"), ("DEBUG", "SLEEP", "0"), ("MODULE", "LIST"), ("CONFIG", "REWRITE"),
                ("CONFIG", "SET", "maxmemory-policy", "noeviction"), ("CONFIG", "RESETSTAT"),
                ("REPLICAOF", "NO", "ONE"), ("SLAVEOF", "NO", "ONE"), ("FAILOVER", "ABORT"), ("SAVE",),
                ("BGSAVE",), ("BGREWRITEAOF",), ("MONITOR",), ("CLIENT", "KILL", "USER", "default"),
                ("CLIENT", "PAUSE", "10"), ("CLIENT", "NO-EVICT", "on"), ("ACL", "LOG"),
                ("SCRIPT", "KILL"), ("FUNCTION", "KILL"), ("CLUSTER", "RESET")]
    before = calls(redis_server)
    raw = proxy.raw(eve)
    raw.send(b"".join(C(*a) for a in attempts) + C("PING"))
    replies = raw.read(len(attempts) + 1)
    for argv, reply in zip(attempts, replies):
        assert isinstance(reply, Exception), argv
        assert "server administration" in str(reply) and "docs/rbac.md" in str(reply), (argv, reply)
    assert replies[-1] == b"PONG"
    raw.close()
    after = calls(redis_server)
    for stat in ("shutdown", "debug", "module|list", "config|rewrite", "config|set", "config|resetstat",
                 "replicaof", "slaveof", "failover", "save", "bgsave", "bgrewriteaof", "monitor",
                 "client|kill", "client|pause", "client|no-evict", "acl|log", "script|kill", "function|kill"):
        assert ran(before, after, stat) == 0, stat
    # Ordinary data commands, and what tools ask at start-up, keep working.
    c = proxy.client(eve)
    assert c.set("sec:k", "v") and c.get("sec:k") == b"v" and c.delete("sec:k") == 1
    assert c.info("server")["redis_version"] and c.config_get("save") is not None
    assert c.flushdb() is True  # a data command: the access role keeps it
    c.close()


def test_a_role_that_names_an_admin_command_allows_it(proxy, certs):
    ops = certs.user_cert("otto", roles=("access", "ops"), db_names=("*",), tag="sec")
    c = proxy.client(ops)
    assert c.config_set("maxmemory-policy", "noeviction") is True
    assert c.config_get("maxmemory-policy") == {"maxmemory-policy": "noeviction"}
    c.close()


# -- scripts -----------------------------------------------------------------------------------


def test_scripts_cannot_escape_a_deny(proxy, redis_server, alice):
    """alice's role `limited` denies FLUSHALL and @dangerous: a script could run them inside
    Redis, so scripts are refused for her."""
    admin = redis_server.client()
    admin.set("victim", "still here")
    sha = admin.script_load("return redis.call('DEL', KEYS[1])")
    before = calls(redis_server)
    c = proxy.client(alice)
    for script, nkeys, args in (("return redis.call('DEL', KEYS[1])", 1, ["victim"]),
                                ("return redis.call('FLUSHALL')", 0, [])):
        with pytest.raises(redis.ResponseError, match="EVAL is refused by Cachegate.*@scripting"):
            c.eval(script, nkeys, *args)
    with pytest.raises(redis.ResponseError, match="EVALSHA is refused"):
        c.evalsha(sha, 1, "victim")
    with pytest.raises(redis.ResponseError, match="SCRIPT LOAD is refused"):
        c.script_load("return 1")
    with pytest.raises(redis.ResponseError, match="FUNCTION LOAD is refused"):
        c.function_load("#!lua name=evil\nredis.register_function('f', function() return redis.call('FLUSHALL') end)")
    with pytest.raises(redis.ResponseError, match="FCALL is refused"):
        c.fcall("f", 0)
    assert c.get("victim") == b"still here" and c.ping()
    c.close()
    after = calls(redis_server)
    for stat in ("eval", "evalsha", "script|load", "function|load", "fcall", "flushall"):
        assert ran(before, after, stat) == 0, stat
    assert admin.get("victim") == b"still here"


def test_scripts_cannot_escape_db_names(proxy, redis_server, certs):
    zed = certs.user_cert("zed", roles=("access",), db_names=("0",), tag="sec")
    admin = redis_server.client(db=1)
    admin.delete("x")
    c = proxy.client(zed)
    with pytest.raises(redis.ResponseError, match="EVAL is refused"):
        c.eval("redis.call('SELECT', 1); return redis.call('SET', 'x', 'y')", 0)
    c.close()
    assert admin.get("x") is None


def test_scripts_work_where_they_cannot_do_more_than_the_roles(proxy, redis_server, eve, certs, alice):
    c = proxy.client(eve)
    assert c.eval("return redis.call('SET', KEYS[1], ARGV[1])", 1, "sec:s", "v") == b"OK"
    assert c.eval("return redis.call('GET', KEYS[1])", 1, "sec:s") == b"v"
    # What the access role does not cover, Redis itself refuses inside scripts.
    with pytest.raises(redis.ResponseError, match="not allowed from script"):
        c.eval("return redis.call('CONFIG', 'GET', 'requirepass')", 0)
    c.close()
    # An explicit @scripting grant is an administrator's choice.
    both = certs.user_cert("alice", roles=("limited", "scripter"), tag="scripter")
    c = proxy.client(both)
    assert c.eval("return 1 + 1", 0) == 2
    c.close()


# -- other sessions ----------------------------------------------------------------------------


def test_client_list_shows_only_the_own_connection(proxy, redis_server, eve, certs):
    a, b = proxy.client(eve), proxy.client(eve)
    a.client_setname("first")
    b.client_setname("second")
    mine = a.client_list()
    assert [x["name"] for x in mine] == ["first"] and mine[0]["id"] == str(a.client_id())
    assert [x["name"] for x in b.client_list(_type="normal")] == ["second"]
    assert a.client_info()["name"] == "first"
    names = {x["name"] for x in redis_server.client().client_list()}
    assert {"first", "second"} <= names  # both are really there
    raw = proxy.raw(eve)
    raw.send(C("HELLO", "3") + C("CLIENT", "LIST") + C("MULTI") + C("CLIENT", "LIST") + C("EXEC"))
    hello, listing, ok, refused, execabort = raw.read(5)
    assert listing.count(b"id=") == 1 and ok == b"OK"
    assert "CLIENT LIST inside MULTI" in str(refused) and "EXECABORT" in str(execabort)
    raw.close()
    ops = proxy.client(certs.user_cert("olga", roles=("ops",), db_names=("*",), tag="sec2"))
    assert {"first", "second"} <= {x["name"] for x in ops.client_list()}
    for c in (a, b, ops):
        c.close()


# -- nothing anywhere shows the key ------------------------------------------------------------


def test_the_key_is_in_no_reply_audit_event_or_log_line(proxy, redis_server, eve, certs, key, caplog):
    caplog.set_level(logging.DEBUG)
    probes = [("CONFIG", "GET", "requirepass"), ("CONFIG", "GET", "masterauth"), ("CONFIG", "GET", "*"),
              ("CONFIG", "GET", "*pass*", "*auth*", "*user*"), ("ACL", "GETUSER", "default"), ("ACL", "LIST"),
              ("ACL", "LOG"), ("ACL", "USERS"), ("ACL", "WHOAMI"), ("INFO", "all"), ("INFO", "everything"),
              ("CLIENT", "LIST"), ("CLIENT", "INFO"), ("HELLO", "3"), ("HELLO", "2"), ("DEBUG", "OBJECT", "x"),
              ("MIGRATE", "127.0.0.1", "1", "x", "0", "100"), ("SLOWLOG", "GET"), ("LATENCY", "DOCTOR"),
              ("MEMORY", "DOCTOR"), ("COMMAND", "GETKEYS", "AUTH", key), ("ROLE",), ("MODULE", "LIST")]
    received = []
    for cert in (eve, certs.user_cert("olga", roles=("ops",), db_names=("*",), tag="sec3")):
        raw = proxy.raw(cert)
        raw.send(b"".join(C(*p) for p in probes))
        received += raw.read(len(probes))
        raw.close()
    # MONITOR (allowed by `ops`) while other sessions connect, so the proxy AUTHs with the key.
    mon = proxy.raw(certs.user_cert("olga", roles=("ops",), db_names=("*",), tag="sec4"))
    mon.send(C("MONITOR"))
    assert mon.read(1) == [b"OK"]
    for _ in range(3):
        c = proxy.client(eve)
        c.set("sec:mon", "1")
        c.close()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and not any(b"sec:mon" in x for x in received if isinstance(x, bytes)):
        received += mon.read(1, timeout=5)
    assert any(b"auth" in x.lower() for x in received if isinstance(x, bytes))  # it saw the AUTHs
    mon.close()
    text = repr(received)
    assert "requirepass" in text and "redis_version" in text  # the probes did answer
    assert key not in text
    events = proxy.flush_audit()
    assert events and key not in repr([str(e) for e in events])
    assert key not in caplog.text


def test_a_session_ends_with_its_certificate_by_default(proxy, certs):
    soon = dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=2)
    fay = certs.user_cert("fay", roles=("access",), not_after=soon, ttl=dt.timedelta(minutes=10), tag="sec")
    raw = proxy.raw(fay)
    raw.send(C("PING"))
    assert raw.read(1) == [b"PONG"]
    assert raw.closed(6)
    raw.close()


def test_db_names_hold_for_commands_that_reach_every_database(proxy, redis_server, certs):
    zed = certs.user_cert("zed", roles=("access",), db_names=("0",), tag="flush")
    admin = redis_server.client(db=1)
    admin.set("keep", "1")
    before = calls(redis_server)
    raw = proxy.raw(zed)
    raw.send(C("FLUSHALL") + C("MIGRATE", "127.0.0.1", str(redis_server.port), "k", "1", "100") + C("PING"))
    flush, migrate, pong = raw.read(3)
    assert "FLUSHALL empties every logical database" in str(flush) and "use FLUSHDB" in str(flush)
    assert "logical database 1" in str(migrate) and pong == b"PONG"
    raw.close()
    after = calls(redis_server)
    assert ran(before, after, "flushall") == 0 and ran(before, after, "migrate") == 0
    assert admin.get("keep") == b"1"
