"""The RESP data plane end to end: real redis-server (TLS, requirepass), the listener in
process, real redis-cli and redis-py (RESP2 and RESP3)."""

from __future__ import annotations

import datetime as dt
import os
import threading
import time

import pytest
import redis

from services.dbproxy import session as session_mod
from services.dbproxy.resp import encode_command
from services.dbproxy.upstream import UpstreamTarget

from .conftest import DB, REDIS_PASSWORD, free_port

pytestmark = pytest.mark.slow


def C(*args) -> bytes:
    return encode_command(*args)


# -- basics ------------------------------------------------------------------------------------


def test_get_set_with_redis_cli(proxy, alice):
    r = proxy.redis_cli(alice, "SET", "cli:k", "hello world")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "OK"
    r = proxy.redis_cli(alice, "GET", "cli:k")
    assert r.stdout.strip() == "hello world"


def test_redis_cli_interactive_lines(proxy, alice):
    r = proxy.redis_cli(alice, input="SET cli:i 1\nINCR cli:i\nPING\n")
    assert r.stdout.split() == ["OK", "2", "PONG"], (r.stdout, r.stderr)


@pytest.mark.parametrize("protocol", [2, 3])
def test_get_set_with_redis_py(proxy, alice, protocol):
    c = proxy.client(alice, protocol=protocol)
    assert c.set(f"py{protocol}:k", b"\x00\xffbinary") is True
    assert c.get(f"py{protocol}:k") == b"\x00\xffbinary"
    c.hset(f"py{protocol}:h", mapping={"a": "1", "b": "2"})
    assert c.hgetall(f"py{protocol}:h") == {b"a": b"1", b"b": b"2"}
    assert c.ping() is True
    c.close()


def test_pipeline_of_10000_commands(proxy, alice):
    c = proxy.client(alice, protocol=3)
    p = c.pipeline(transaction=False)
    for i in range(5000):
        p.set(f"pipe:{i}", i)
    for i in range(5000):
        p.get(f"pipe:{i}")
    t0 = time.monotonic()
    res = p.execute()
    elapsed = time.monotonic() - t0
    assert res[:5000] == [True] * 5000
    assert res[5000:] == [str(i).encode() for i in range(5000)]
    assert elapsed < 10
    c.close()


def test_deep_raw_pipeline_with_denied_commands_in_order(proxy, alice):
    """Local replies (denied commands) land exactly in their place in a deep pipeline."""
    raw = proxy.raw(alice)
    batch = []
    for i in range(3000):
        batch.append(C("SET", f"raw:{i}", str(i)))
        if i % 500 == 7:
            batch.append(C("FLUSHALL"))
        batch.append(C("GET", f"raw:{i}"))
    raw.send(b"".join(batch))
    replies = raw.read(len(batch), timeout=20)
    k = 0
    for i in range(3000):
        assert replies[k] == b"OK"
        k += 1
        if i % 500 == 7:
            assert "denied" in str(replies[k])
            k += 1
        assert replies[k] == str(i).encode()
        k += 1
    raw.close()


def test_inline_commands(proxy, alice):
    raw = proxy.raw(alice)
    raw.send(b'SET inline:k "a b\\x41"\r\nGET inline:k\r\nPING\n')
    assert raw.read(3) == [b"OK", b"a bA", b"PONG"]
    raw.close()


# -- RBAC --------------------------------------------------------------------------------------


def test_denied_command_and_session_goes_on(proxy, alice):
    c = proxy.client(alice)
    c.set("deny:k", "v")
    with pytest.raises(redis.ResponseError, match=r'FLUSHALL denied by role "limited"'):
        c.flushall()
    with pytest.raises(redis.ResponseError, match="CLIENT|KILL denied"):
        c.client_kill_filter(_id=999999)
    assert c.get("deny:k") == b"v"
    assert c.client_setname("mine") is True
    assert c.client_getname() == "mine"
    c.close()
    r = proxy.redis_cli(alice, "FLUSHDB")
    assert "FLUSHDB denied" in r.stdout + r.stderr


def test_select_allowed_and_denied(proxy, alice):
    r = proxy.redis_cli(alice, "-n", "1", "SET", "sel:k", "in-db-1")
    assert r.stdout.strip() == "OK", r.stdout + r.stderr
    r = proxy.redis_cli(alice, "-n", "1", "GET", "sel:k")
    assert r.stdout.strip() == "in-db-1"
    assert proxy.redis_cli(alice, "GET", "sel:k").stdout.strip() == ""
    r = proxy.redis_cli(alice, "-n", "5", "GET", "sel:k")
    assert 'logical database 5' in r.stdout + r.stderr and "denied" in r.stdout + r.stderr
    c = proxy.client(alice)
    assert c.execute_command("SELECT", 1) in (True, b"OK", "OK")
    assert c.get("sel:k") == b"in-db-1"
    with pytest.raises(redis.ResponseError, match="logical database 7"):
        c.execute_command("SELECT", 7)
    assert c.get("sel:k") == b"in-db-1"  # still in db 1
    with pytest.raises(redis.ResponseError, match="logical database 9"):
        c.execute_command("MOVE", "sel:k", 9)
    c.close()


def test_route_db_name_is_checked(proxy, certs):
    ok = certs.user_cert("carol", db_name="1")
    assert proxy.redis_cli(ok, "GET", "sel:k").stdout.strip() == "in-db-1"
    bad = certs.user_cert("carol", db_name="4")
    r = proxy.redis_cli(bad, "GET", "sel:k")
    assert "logical database 4" in r.stdout + r.stderr


def test_refusals_are_resp_errors(proxy, certs):
    bob = certs.user_cert("bob", db_user="bob")
    r = proxy.redis_cli(bob, "GET", "x")
    assert 'access to db user "bob" on "test-redis" denied by your roles' in r.stdout + r.stderr
    r = proxy.redis_cli(None, "GET", "x")
    assert "client certificate is required" in r.stdout + r.stderr
    past = dt.datetime.now(dt.timezone.utc) - dt.timedelta(minutes=1)
    expired = certs.user_cert("dave", not_after=past, ttl=dt.timedelta(minutes=10))
    r = proxy.redis_cli(expired, "GET", "x")
    assert "certificate expired" in r.stdout + r.stderr
    other = certs.user_cert("eve", service="nope")
    r = proxy.redis_cli(other, "GET", "x")
    assert 'database "nope" not found' in r.stdout + r.stderr


def test_client_auth_only_for_own_db_user(proxy, certs, alice):
    c = proxy.client(alice, password="anything")  # AUTH anything (default user): accepted
    assert c.ping() is True
    c.close()
    c = proxy.client(alice, username="default", password="x", protocol=3)  # HELLO 3 AUTH default x
    assert c.set("auth:k", "1") is True
    c.close()
    c = proxy.client(alice, username="root", password="x")
    with pytest.raises(redis.exceptions.RedisError, match='AUTH as db user "root" is not allowed'):
        c.ping()
    c.close()


# -- Pub/Sub -----------------------------------------------------------------------------------


@pytest.mark.parametrize("protocol", [2, 3])
def test_pubsub_with_redis_py(proxy, alice, protocol):
    c = proxy.client(alice, protocol=protocol)
    pub = proxy.client(alice)
    ps = c.pubsub()
    ps.subscribe("news")
    ps.psubscribe("ev.*")
    got = []
    deadline = time.monotonic() + 5
    while len(got) < 2 and time.monotonic() < deadline:
        m = ps.get_message(timeout=0.5)
        if m:
            got.append(m["type"])
    assert got == ["subscribe", "psubscribe"]
    assert pub.publish("news", "hello") == 1
    assert pub.publish("ev.x", "world") == 1
    msgs = []
    deadline = time.monotonic() + 5
    while len(msgs) < 2 and time.monotonic() < deadline:
        m = ps.get_message(timeout=0.5)
        if m and m["type"] in ("message", "pmessage"):
            msgs.append((m["type"], m["data"]))
    assert msgs == [("message", b"hello"), ("pmessage", b"world")]
    ps.ping()
    ps.unsubscribe("news")
    ps.punsubscribe()
    kinds = []
    deadline = time.monotonic() + 5
    while len(kinds) < 3 and time.monotonic() < deadline:
        m = ps.get_message(timeout=0.5)
        if m:
            kinds.append(m["type"])
    assert kinds == ["pong", "unsubscribe", "punsubscribe"]
    ps.close()
    c.close()
    pub.close()


def test_pubsub_resp2_raw_order(proxy, alice):
    """RESP2 subscribed mode: confirmations counted, messages out of band, a denied command's
    error in its place, UNSUBSCRIBE (all) then normal commands again."""
    sub = proxy.raw(alice)
    pub = proxy.client(alice)
    sub.send(C("SUBSCRIBE", "a", "b") + C("SSUBSCRIBE", "s1") + C("PING") + C("FLUSHALL"))
    r = sub.read(5)
    assert r[0] == [b"subscribe", b"a", 1] and r[1] == [b"subscribe", b"b", 2]
    assert r[2] == [b"ssubscribe", b"s1", 1]
    assert r[3] == [b"pong", b""]
    assert "denied" in str(r[4])
    assert pub.publish("a", "m1") == 1
    assert sub.read(1) == [[b"message", b"a", b"m1"]]
    assert pub.execute_command("SPUBLISH", "s1", "m2") == 1
    assert sub.read(1) == [[b"smessage", b"s1", b"m2"]]
    sub.send(C("UNSUBSCRIBE") + C("SUNSUBSCRIBE") + C("FLUSHALL") + C("SET", "ps:k", "x") + C("GET", "ps:k"))
    r = sub.read(6)
    assert sorted(x[1] for x in r[:2]) == [b"a", b"b"] and {x[0] for x in r[:2]} == {b"unsubscribe"}
    assert r[2] == [b"sunsubscribe", b"s1", 0]
    assert "denied" in str(r[3])
    assert r[4:] == [b"OK", b"x"]
    # Not subscribed any more: an array reply that starts with "message" is a reply.
    sub.send(C("DEL", "ps:l") + C("RPUSH", "ps:l", "message", "x", "y") + C("LRANGE", "ps:l", "0", "-1"))
    assert sub.read(3)[2] == [b"message", b"x", b"y"]
    sub.close()
    pub.close()


def test_pubsub_resp3_push_frames(proxy, alice):
    sub = proxy.raw(alice)
    pub = proxy.client(alice)
    sub.send(C("HELLO", "3") + C("SUBSCRIBE", "r3") + C("FLUSHALL") + C("GET", "nokey:r3"))
    r = sub.read(4)
    assert r[0][b"proto"] == 3
    assert r[1] == [b"subscribe", b"r3", 1]  # a push frame (hiredis gives a list)
    assert "denied" in str(r[2])
    assert r[3] is None
    assert pub.publish("r3", "m") == 1
    assert sub.read(1) == [[b"message", b"r3", b"m"]]
    sub.send(C("UNSUBSCRIBE") + C("PING"))
    assert sub.read(2) == [[b"unsubscribe", b"r3", 0], b"PONG"]
    sub.close()
    pub.close()


# -- blocking, transactions, monitor, reset ----------------------------------------------------


def test_blpop_and_xread_block(proxy, alice):
    c = proxy.client(alice)
    other = proxy.client(alice)
    c.delete("blk:l", "blk:s")

    def later():
        time.sleep(0.3)
        other.rpush("blk:l", "v1")
        other.xadd("blk:s", {"f": "x"})

    t = threading.Thread(target=later)
    t.start()
    t0 = time.monotonic()
    assert c.blpop(["blk:l"], timeout=5) == (b"blk:l", b"v1")
    res = c.xread({"blk:s": "0-0"}, block=5000)
    t.join()
    assert 0.2 < time.monotonic() - t0 < 5
    assert res[0][0] == b"blk:s" and res[0][1][0][1] == {b"f": b"x"}
    assert c.blpop(["blk:none"], timeout=0.3) is None
    c.close()
    other.close()


def test_multi_exec_watch(proxy, alice):
    c = proxy.client(alice)
    p = c.pipeline(transaction=True)
    p.set("tx:a", 1).incr("tx:a").get("tx:a")
    assert p.execute() == [True, 2, b"2"]
    with c.pipeline() as p:
        p.watch("tx:a")
        p.multi()
        p.incr("tx:a")
        assert p.execute() == [3]
    raw = proxy.raw(alice)
    raw.send(C("MULTI") + C("INCR", "tx:a") + C("FLUSHALL") + C("INCR", "tx:a") + C("EXEC") + C("GET", "tx:a"))
    r = raw.read(6)
    assert r[0] == b"OK" and r[1] == b"QUEUED" and "denied" in str(r[2]) and r[3] == b"QUEUED"
    assert "EXECABORT" in str(r[4])
    assert r[5] == b"3"  # nothing of the aborted transaction ran
    raw.send(C("MULTI") + C("SELECT", "1") + C("DISCARD") + C("PING"))
    r = raw.read(4)
    assert "SELECT inside MULTI" in str(r[1]) and r[2] == b"OK" and r[3] == b"PONG"
    raw.close()
    c.close()


def test_monitor(proxy, certs, alice):
    denied = proxy.raw(alice)
    denied.send(C("MONITOR") + C("PING"))
    r = denied.read(2)
    assert 'MONITOR denied by role "limited" (deny @dangerous)' in str(r[0]) and r[1] == b"PONG"
    denied.close()
    admin = certs.user_cert("admin", roles=("ops",))
    mon = proxy.raw(admin)
    mon.send(C("MONITOR"))
    assert mon.read(1) == [b"OK"]
    c = proxy.client(alice)
    c.get("mon:key")
    lines = []
    deadline = time.monotonic() + 5
    while not any(b"mon:key" in x for x in lines) and time.monotonic() < deadline:
        lines += mon.read(1, timeout=5)
    assert any(b'"GET" "mon:key"' in x for x in lines)
    mon.send(C("GET", "x"))  # not while monitoring
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        item = mon.read(1)[0]
        if "only QUIT" in str(item):
            break
    else:
        pytest.fail("no error for a command after MONITOR")
    mon.close()
    c.close()


def test_reset_keeps_the_session_authenticated(proxy, alice):
    raw = proxy.raw(alice)
    raw.send(C("HELLO", "3") + C("SELECT", "1") + C("SET", "rst:k", "1") + C("RESET") + C("GET", "rst:k")
             + C("SET", "rst:k0", "0") + C("PING"))
    r = raw.read(7)
    assert r[1:4] == [b"OK", b"OK", b"RESET"]
    assert r[4] is None  # back in db 0 (the route's), authenticated, RESP2
    assert r[5:] == [b"OK", b"PONG"]
    raw.close()


def test_quit(proxy, alice):
    raw = proxy.raw(alice)
    raw.send(C("SET", "q:k", "1") + C("QUIT") + C("GET", "q:k"))
    assert raw.read(2) == [b"OK", b"OK"]
    assert raw.closed()
    raw.close()


# -- robustness --------------------------------------------------------------------------------


def test_malformed_input_ends_only_that_session(proxy, alice):
    keep = proxy.client(alice)
    keep.set("robust:k", "still")
    bad = proxy.raw(alice)
    bad.send(C("PING") + os.urandom(64).replace(b"*", b"+").replace(b"$", b"-") + b"\r\n" * 3 + b"*x\r\n")
    replies = []
    try:
        replies = bad.read(2, timeout=5)
    except EOFError:
        pass
    assert replies and replies[0] == b"PONG"
    assert bad.closed()
    bad.close()
    huge = proxy.raw(alice)
    huge.send(b"*2\r\n$3\r\nSET\r\n$99999999999\r\n")
    r = huge.read(1)
    assert "Protocol error" in str(r[0]) and "bulk length" in str(r[0])
    assert huge.closed()
    huge.close()
    big_array = proxy.raw(alice)
    big_array.send(b"*99999999\r\n")
    assert "multibulk" in str(big_array.read(1)[0])
    big_array.close()
    assert keep.get("robust:k") == b"still"
    keep.close()


def test_large_values_stream_through(proxy, alice):
    c = proxy.client(alice)
    value = os.urandom(3 * 1024 * 1024)
    c.set("big:k", value)
    assert c.get("big:k") == value
    c.close()


def test_unreachable_database(proxy, certs):
    port = free_port()
    proxy.overrides["frank"] = {"target": UpstreamTarget(DB, "127.0.0.1", port, None)}
    frank = certs.user_cert("frank")
    t0 = time.monotonic()
    r = proxy.redis_cli(frank, "GET", "x")
    assert time.monotonic() - t0 < 8
    out = r.stdout + r.stderr
    assert f"127.0.0.1:{port}" in out and f"nc -zv 127.0.0.1 {port}" in out


def test_key_rotation(proxy, redis_server, alice):
    live = proxy.client(alice)
    assert live.set("rot:k", "before") is True
    admin = redis_server.client()
    new_key = "rotated-secret-" + os.urandom(4).hex()
    refreshes = proxy.creds.refreshes
    try:
        admin.config_set("requirepass", new_key)
        redis_server.password = new_key
        proxy.creds.source = new_key  # "Azure" now lists the new key; the proxy has the old cached
        assert live.get("rot:k") == b"before"  # the live session keeps working
        fresh = proxy.client(alice)
        assert fresh.get("rot:k") == b"before"  # new session: WRONGPASS, fetched again, works
        assert proxy.creds.refreshes == refreshes + 1
        assert proxy.redis_cli(alice, "GET", "rot:k").stdout.strip() == "before"
        assert proxy.creds.refreshes == refreshes + 1  # cached since
        fresh.close()
    finally:
        redis_server.client().config_set("requirepass", REDIS_PASSWORD)
        redis_server.password = REDIS_PASSWORD
        proxy.creds.source = REDIS_PASSWORD
    live.close()


def test_lock_ends_session_within_seconds(proxy, certs):
    locked = {"on": False}
    proxy.overrides["gina"] = {"lock_check": lambda: "user gina is locked: incident" if locked["on"] else None}
    gina = certs.user_cert("gina")
    raw = proxy.raw(gina)
    raw.send(C("PING"))
    assert raw.read(1) == [b"PONG"]
    t0 = time.monotonic()
    locked["on"] = True
    got = []
    try:
        got = raw.read(1, timeout=6)
    except EOFError:
        pass
    assert time.monotonic() - t0 < 5
    assert not got or "locked" in str(got[0])
    assert raw.closed(3)
    r = proxy.redis_cli(gina, "PING")
    assert "locked" in r.stdout + r.stderr


def test_idle_timeout_and_terminate(proxy, certs):
    proxy.overrides["hank"] = {"idle": 0.5}
    hank = certs.user_cert("hank")
    raw = proxy.raw(hank)
    raw.send(C("PING"))
    assert raw.read(1) == [b"PONG"]
    t0 = time.monotonic()
    assert raw.closed(5)
    assert 0.4 < time.monotonic() - t0 < 3
    raw.close()
    proxy.overrides["hank"] = {}
    raw = proxy.raw(hank)
    raw.send(C("PING"))
    assert raw.read(1) == [b"PONG"]
    n = proxy.run(lambda: proxy.listener.terminate(lambda s: s.user == "hank", "role locked"))
    assert n == 1
    assert raw.closed(5)
    raw.close()


def test_a_session_its_watchdog_cannot_check_is_ended_with_a_line_that_says_so(proxy, certs):
    calls = []

    def lock_check():  # the lock cache breaks after the session started
        calls.append(1)
        if len(calls) > 2:
            raise RuntimeError("lock cache broken")
        return None

    proxy.overrides["hilda"] = {"lock_check": lock_check}
    raw = proxy.raw(certs.user_cert("hilda"))
    raw.send(C("PING"))
    assert raw.read(1) == [b"PONG"]
    try:
        got = raw.read(1)
    except EOFError:
        got = []
    assert got and "could not check it" in str(got[0]), got
    assert raw.closed(5)
    raw.close()


def test_a_quiet_session_is_checked_less_often_and_its_lock_poll_still_ends_it(proxy, certs, monkeypatch):
    # Shorter than the real 2 s and 5 s, to keep the test short; the same rules.
    monkeypatch.setattr(session_mod, "_QUIET_AFTER", 1.0)
    monkeypatch.setattr(session_mod, "_QUIET_TICK", 2.5)
    calls: list[float] = []
    locked: list[str] = []

    def lock_check():  # a lock that no push reached: only the poll can find it
        calls.append(time.monotonic())
        return locked[0] if locked else None

    proxy.overrides["quentin"] = {"lock_check": lock_check}
    raw = proxy.raw(certs.user_cert("quentin"))
    try:
        busy_from = time.monotonic()
        while time.monotonic() - busy_from < 3.0:
            raw.send(C("PING"))
            assert raw.read(1) == [b"PONG"]
            time.sleep(0.2)
        quiet_from = time.monotonic()
        busy = [t for t in calls if t <= quiet_from]
        assert len(busy) >= 3 and max(b - a for a, b in zip(busy, busy[1:])) < 2.0, busy  # about every second
        time.sleep(7.0)
        quiet = [t for t in calls if t > quiet_from + 1.5]  # past _QUIET_AFTER and one check
        assert len(quiet) >= 2, quiet  # still polled
        assert min(b - a for a, b in zip(quiet, quiet[1:])) > 2.3, quiet  # but every _QUIET_TICK
        locked.append('user "quentin" is locked: quiet test')
        started = time.monotonic()
        got = raw.read(1, timeout=6)
        assert got and "quiet test" in str(got[0]), got
        assert time.monotonic() - started < 3.5  # within _QUIET_TICK (and the loop's grid)
        assert raw.closed(5)
    finally:
        raw.close()


def test_expired_certificate_ends_session(proxy, certs):
    proxy.overrides["ivan"] = {"disconnect_expired_cert": True}
    soon = dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=2)
    ivan = certs.user_cert("ivan", not_after=soon, ttl=dt.timedelta(minutes=10))
    raw = proxy.raw(ivan)
    raw.send(C("PING"))
    assert raw.read(1) == [b"PONG"]
    assert raw.closed(6)
    raw.close()


def test_sessions_per_user_limit(proxy, certs):
    judy = certs.user_cert("judy")
    conns = []
    for _ in range(8):
        r = proxy.raw(judy)
        r.send(C("PING"))
        assert r.read(1) == [b"PONG"]
        conns.append(r)
    r = proxy.redis_cli(judy, "PING")
    assert "too many sessions" in r.stdout + r.stderr
    for r in conns:
        r.close()


# -- audit -------------------------------------------------------------------------------------


def test_audit_start_queries_end_secrets_masked(proxy, certs):
    kim = certs.user_cert("kim")
    secret = "s3cr3t-" + os.urandom(4).hex()
    raw = proxy.raw(kim)
    raw.send(C("AUTH", secret) + C("HELLO", "3", "AUTH", "default", secret, "SETNAME", "kimcli")
             + C("SET", "aud:k", "x" * 1000) + C("FLUSHALL") + C("GET", "aud:k"))
    r = raw.read(5)
    assert r[0] == b"OK" and r[1][b"proto"] == 3 and r[2] == b"OK" and r[4] == b"x" * 1000
    raw.close()
    deadline = time.monotonic() + 5
    while True:
        events = [e for e in proxy.flush_audit() if e.actor == "kim"]
        if any(e.type == "db.session.end" for e in events) or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    types = [e.type for e in events]
    assert types[0] == "db.session.start" and types[-1] == "db.session.end"
    assert events[0].success
    queries = [e for e in events if e.type == "db.session.query"]
    assert [q.fields["command"] for q in queries] == ["AUTH", "HELLO", "SET", "FLUSHALL", "GET"]
    assert list(queries[0].fields["args"]) == ["AUTH", "<redacted>"]
    assert list(queries[1].fields["args"]) == ["HELLO", "3", "AUTH", "default", "<redacted>", "SETNAME", "kimcli"]
    assert queries[2].fields["args"][2] == "x" * 256 + "...(1000 bytes)"
    assert not queries[3].success and "denied" in queries[3].error
    end = events[-1]
    assert end.fields["commands"] == 5 and end.fields["bytes_in"] > 1000 and end.fields["bytes_out"] > 1000
    for e in events:
        assert secret not in str(e) and REDIS_PASSWORD not in str(e)


def test_audit_failed_start(proxy, certs):
    bob = certs.user_cert("bob", db_user="bob", tag="audit")
    proxy.redis_cli(bob, "PING")
    port = free_port()
    proxy.overrides["leo"] = {"target": UpstreamTarget(DB, "127.0.0.1", port, None)}
    proxy.redis_cli(certs.user_cert("leo"), "PING")
    events = proxy.flush_audit()
    fails = [e for e in events if e.type == "db.session.start" and not e.success and e.actor in ("bob", "leo")]
    assert any("denied" in e.error for e in fails if e.actor == "bob")
    assert any("nc -zv" in e.error for e in fails if e.actor == "leo")


def test_audit_spooled_while_auth_down(proxy, alice):
    proxy.send_fails[0] = True
    try:
        proxy.redis_cli(alice, "SET", "spool:k", "during-outage")
        time.sleep(0.3)
        spooled = list(proxy.spool.spool_dir.glob("*.batch"))
        assert spooled, "events were not spooled while auth was down"
    finally:
        proxy.send_fails[0] = False
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        events = proxy.flush_audit()
        if not list(proxy.spool.spool_dir.glob("*.batch")) and any(
                "during-outage" in list(e.fields["args"])
                for e in events if e.type == "db.session.query" and "args" in e.fields):
            break
        time.sleep(0.1)
    else:
        pytest.fail("spooled audit events were not delivered")


def test_tls_handshake_timeout_and_plaintext_client(proxy, alice):
    import socket

    s = socket.create_connection(("127.0.0.1", proxy.port), timeout=10)
    t0 = time.monotonic()
    s.settimeout(8)
    try:
        data = s.recv(100)  # the proxy gives up on the silent client
    except ConnectionError:
        data = b""
    assert data == b"" and time.monotonic() - t0 < 6
    s.close()
    s = socket.create_connection(("127.0.0.1", proxy.port), timeout=10)
    s.sendall(b"PING\r\n")  # plaintext RESP to a TLS port: the handshake fails, nothing else
    s.settimeout(8)
    try:
        s.recv(100)
    except ConnectionError:
        pass
    s.close()
    assert proxy.redis_cli(alice, "PING").stdout.strip() == "PONG"


def test_drain_delivers_every_reply_of_what_ran_then_says_reconnect(proxy, certs, redis_server):
    """The proxy shutting down mid-pipeline: no new command is read, every command the
    database ran gets its reply, then one line tells the client to reconnect."""
    direct = redis_server.client()
    direct.delete("drain:n")
    dora = certs.user_cert("dora", roles=("access",), db_names=("*",))
    raw = proxy.raw(dora)
    raw.send(C("PING"))
    assert raw.read(1) == [b"PONG"]
    session = next(s for s in proxy.listener.sessions if s.user == "dora")
    # Each command takes the database a moment, so that many have run whose replies are
    # still on their way when the proxy starts shutting down.
    slow_incr = C("EVAL", "local i = 0 while i < 2000 do i = i + 1 end return redis.call('INCR', KEYS[1])",
                  "1", "drain:n")
    batch = slow_incr * 2000

    def send_all():
        try:
            for _ in range(100):  # up to 200,000 commands, as fast as the proxy takes them
                raw.sock.sendall(batch)
        except (OSError, ValueError):
            pass  # the proxy stopped reading and closed

    sender = threading.Thread(target=send_all)
    sender.start()
    time.sleep(0.3)
    proxy.run(session.drain, "the proxy is shutting down", 10.0)
    replies = []
    try:
        while True:
            replies += raw.read(1, timeout=10)
    except (EOFError, TimeoutError, OSError):
        pass
    sender.join(10)
    raw.close()
    ran = int(direct.get("drain:n") or 0)
    counts = [r for r in replies if isinstance(r, int)]
    assert ran > 0 and len(counts) == ran and counts == list(range(1, ran + 1)), (ran, len(counts))
    assert isinstance(replies[-1], Exception) and "the proxy is shutting down; reconnect" in str(replies[-1])


def test_tls_session_resumption_keeps_the_certificates_identity(proxy, certs):
    """A client that resumes its TLS session (a TLS 1.3 ticket) skips the certificate
    exchange; the session is still the certificate's user, checked and audited as such."""
    import socket
    import ssl

    ruth = certs.user_cert("ruth")
    ctx = ssl.create_default_context(cafile=certs.path("server-ca.pem"))
    ctx.load_cert_chain(*ruth)
    ticket = None
    reused = []
    for i in range(3):
        s = ctx.wrap_socket(socket.create_connection(("127.0.0.1", proxy.port), timeout=10),
                            server_hostname="127.0.0.1", session=ticket)
        s.sendall(C("SET", f"resume:{i}", "v") + C("FLUSHALL"))
        got = b""
        while got.count(b"\r\n") < 2:
            got += s.recv(4096)
        assert got.startswith(b"+OK\r\n") and b"FLUSHALL denied" in got, got  # her roles, resumed or not
        reused.append(s.session_reused)
        ticket = s.session
        s.close()
    assert reused == [False, True, True]
    deadline = time.monotonic() + 5
    while True:
        starts = [e for e in proxy.flush_audit() if e.actor == "ruth" and e.type == "db.session.start"]
        if len(starts) >= 3 or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert len(starts) == 3 and all(e.success for e in starts)
