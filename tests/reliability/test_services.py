"""Auth and discovery go away under live sessions: users notice nothing, the operator sees
which host went quiet, and the audit log holds every command Redis ran exactly once
(counted against INFO commandstats). SIGTERM to dbproxy mid-pipeline is
tests/integration/test_limits_e2e.py::test_sigterm_mid_pipeline_answers_every_command_that_ran."""

from __future__ import annotations

import json
import signal
import time

import pytest

from tests.reliability.stack import FULL, STATIC_DB, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.reliability]


def _incr(r, key: str, n: int) -> None:
    for _ in range(n):
        r.execute_command("INCR", key)


def test_auth_stopped_then_killed_under_live_sessions(st):
    cert = st.cert("bob")
    since = time.time() - 1
    st.redis.reset_stats()
    key = "rel:auth:n"
    r = st.client(cert)
    _incr(r, key, 20)
    pause = 12.0 if FULL else 3.0

    st.auth.popen.send_signal(signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        _incr(r, key, 20)  # the live session goes on, at full speed
        fresh = st.client(cert)  # and a new one starts: the proxy has what it needs
        _incr(fresh, key, 10)
        fresh.close()
        assert time.monotonic() - t0 < 5
        time.sleep(max(0.0, pause - (time.monotonic() - t0)))
    finally:
        st.auth.popen.send_signal(signal.SIGCONT)
    st.auth.stop(signal.SIGKILL)
    _incr(r, key, 20)  # with auth dead too
    st.auth.start()
    _incr(r, key, 10)
    assert r.get(key) == b"80"
    r.close()
    ran = st.redis.commandstats()["incr"]
    got = st.wait_audit({("bob", "INCR", key): ran}, since)
    assert ran == 80 and got == {("bob", "INCR", key): 80}, (ran, got)
    # The heartbeat finds the new auth: the proxy is fresh in cgctl status again.
    wait_for(lambda: [p["stale"] for p in st.status()["proxies"]] == [False], "a fresh heartbeat", 20, 0.3)


def test_discovery_down_keeps_its_records_and_is_marked_stale(st):
    def listed():
        res = st.cgate("db", "ls", "--format=json", check=False)
        return res.returncode == 0 and [d["name"] for d in json.loads(res.stdout)].count(STATIC_DB) == 1

    wait_for(listed, "the static database published by discovery", 30, 0.5)
    cert = st.cert("carol", STATIC_DB)
    since = time.time() - 1
    st.redis.reset_stats()
    key = "rel:disc:n"
    disc = st.c.procs["discovery"]
    disc.stop(signal.SIGKILL)
    try:
        r = st.client(cert)
        _incr(r, key, 25)
        # The operator sees discovery gone quiet; the record it published stays.
        data = wait_for(lambda: (d := st.status()["discovery"]) and all(x["stale"] for x in d) and d,
                        "discovery marked stale", 20, 0.5)
        assert {x["host"] for x in data}
        assert "(stale)" in st.c.cgctl("status").stdout
        assert listed()
        _incr(r, key, 25)
    finally:
        disc.start()
    wait_for(lambda: (d := st.status()["discovery"]) and not any(x["stale"] for x in d), "discovery fresh", 20, 0.5)
    _incr(r, key, 10)
    assert r.get(key) == b"60"
    r.close()
    assert listed()  # once, not twice: the restarted host republished the same record
    ran = st.redis.commandstats()["incr"]
    got = st.wait_audit({("carol", "INCR", key): ran}, since)
    assert ran == 60 and got == {("carol", "INCR", key): 60}, (ran, got)
