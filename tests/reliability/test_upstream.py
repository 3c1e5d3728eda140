"""The database goes away under the proxy and comes back: what a user sees, what the operator
sees (`cgctl status`, `cgctl db check`, `cgate db ls -v`, metrics), and that the audit log
holds exactly the commands Redis ran (counted against INFO commandstats)."""

from __future__ import annotations

import signal
import time

import pytest
import redis

from tests.reliability.stack import DB, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.reliability]


def _check(st, name=DB):
    return st.c.cgctl("db", "check", name, "--proxy-api", st.c.api, check=False)


def test_redis_killed_and_restarted_mid_session(st):
    cert = st.cert("alice")
    since = time.time() - 1
    st.redis.reset_stats()
    r = st.client(cert)
    for _ in range(50):
        r.execute_command("INCR", "rel:kill:n")
    assert r.get("rel:kill:n") == b"50"
    # The operator sees the database as healthy, from the proxy's side.
    res = _check(st)
    assert res.returncode == 0, res.stderr
    assert [ln.split()[0] for ln in res.stdout.splitlines()[1:5]] == ["tcp", "tls", "auth", "ping"]
    assert "is reachable from the proxy" in res.stdout
    wait_for(lambda: (st.proxy_health() or {}).get("state") == "ok", "health ok in cgctl status")
    before = st.redis.commandstats()["incr"]

    st.redis.kill()
    # The live session: the next command fails with an error the client shows, not a hang.
    t0 = time.monotonic()
    with pytest.raises(redis.RedisError) as err:
        r.get("rel:kill:n")
    assert time.monotonic() - t0 < 10
    r.close()
    # A new session is refused with the check to run.
    fresh = st.client(cert, socket_timeout=15)
    with pytest.raises(redis.RedisError) as refused:
        fresh.ping()
    fresh.close()
    assert "cannot reach" in str(refused.value) and f"nc -zv 127.0.0.1 {st.redis.port}" in str(refused.value)
    # Without anyone else asking, the proxy's heartbeat reports the database down, and why.
    # (A heartbeat that connected just as the process died may first report the TLS
    # handshake cut off; the next one finds nothing listening.)
    down = wait_for(lambda: (h := st.proxy_health()) and h["state"] == "down"
                    and h["last_error_kind"] == "unreachable" and h, "health down (unreachable)", 15)
    assert "nc -zv" in down["last_error"]
    assert down["connect_failures"] >= 1
    text = st.c.cgctl("status").stdout
    assert "Database health" in text and "down" in text
    res = _check(st)
    assert res.returncode == 1 and "FAILED" in res.stdout
    assert res.stderr.startswith("ERROR: cannot reach") and "nc -zv" in res.stderr and len(res.stderr.splitlines()) == 1
    assert st.metric("cachegate_dbproxy_database_up", database=DB) == 0
    assert st.metric("cachegate_dbproxy_upstream_failures_total", database=DB) >= 1
    ls = st.cgate("db", "ls", "-v").stdout
    assert "Health" in ls.splitlines()[0] and "down (unreachable since" in ls

    st.redis.start()
    # The heartbeat notices the database is back, before any user tries.
    wait_for(lambda: (st.proxy_health() or {}).get("state") == "ok", "health ok again", 15)
    assert st.metric("cachegate_dbproxy_database_up", database=DB) == 1
    assert " ok " in st.cgate("db", "ls", "-v").stdout
    r = st.client(cert)
    for _ in range(30):
        r.execute_command("INCR", "rel:kill:n")
    assert r.get("rel:kill:n") == b"30"  # a new redis-server without persistence
    r.close()
    after = st.redis.commandstats()["incr"]
    # Exactly the INCRs Redis ran are in the audit log: none lost, none twice.
    got = st.wait_audit({("alice", "INCR", "rel:kill:n"): before + after}, since)
    assert got == {("alice", "INCR", "rel:kill:n"): 80}, got
    assert before == 50 and after == 30


def test_status_marks_a_silent_proxy_stale_and_db_check_needs_a_known_database(st):
    res = _check(st, "no-such-db")
    assert res.returncode == 1 and "not registered on this proxy" in res.stderr
    data = st.status()
    assert [p["stale"] for p in data["proxies"]] == [False]
    st.proxy.popen.send_signal(signal.SIGSTOP)  # silent, as a hung or cut-off host is
    try:
        wait_for(lambda: st.status()["proxies"][0]["stale"], "the silent proxy marked stale", 15, 0.2)
        assert "stale: not seen for" in st.c.cgctl("status").stdout
    finally:
        st.proxy.popen.send_signal(signal.SIGCONT)
    wait_for(lambda: not st.status()["proxies"][0]["stale"], "the proxy fresh again", 15, 0.2)
