"""Limits of the RESP listener through the in-process proxy and a real redis-server: the
shared budget for incomplete commands, the deadline of a started command, the session
caps (roles' max_connections, sessions_per_user, max_sessions) and the handshake cap."""

from __future__ import annotations

import dataclasses
import socket
import time
from contextlib import contextmanager

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from services.common.rbac import load_role_yaml
from services.dbproxy import session as session_mod
from services.dbproxy.limits import ProxyLimits, RequestBudget
from services.dbproxy.metrics import ProxyMetrics

from . import conftest
from .test_metrics import _until, _value


def C(*args: str | bytes) -> bytes:
    out = [b"*%d\r\n" % len(args)]
    for a in args:
        b = a.encode() if isinstance(a, str) else a
        out.append(b"$%d\r\n%s\r\n" % (len(b), b))
    return b"".join(out)


@contextmanager
def limited(proxy, **changes):
    """The proxy's limits changed for new sessions, a fresh budget and metrics reader."""
    lst = proxy.listener
    before = (lst.limits, lst.budget, lst.metrics)
    limits = dataclasses.replace(lst.limits, **changes)
    reader = InMemoryMetricReader()
    metrics = ProxyMetrics(MeterProvider(metric_readers=[reader]).get_meter("test"))

    def swap():
        lst.limits, lst.budget, lst.metrics = limits, RequestBudget(limits.request_buffer), metrics

    proxy.run(swap)
    try:
        yield reader
    finally:
        def restore():
            lst.limits, lst.budget, lst.metrics = before

        proxy.run(restore)


def refused(reader, reason: str) -> float:
    return _value(reader, "cachegate.dbproxy.sessions.refused", reason=reason)


def test_incomplete_commands_past_the_shared_budget_are_refused(proxy, alice, redis_server):
    direct = redis_server.client()
    direct.delete("budget:a", "budget:b")
    big = 700_000  # fits the budget alone, not beside another session's 600 kB
    with limited(proxy, request_buffer=1024 * 1024) as reader:
        a, b = proxy.raw(alice), proxy.raw(alice)
        try:
            for r in (a, b):
                r.send(C("PING"))
                assert r.read(1) == [b"PONG"]
            head = b"*3\r\n$3\r\nSET\r\n$8\r\nbudget:%s\r\n$%d\r\n"
            a.send(head % (b"a", big) + b"x" * 600_000)
            time.sleep(0.3)
            b.send(C("PING") + head % (b"b", big) + b"y" * 600_000)
            # b's PING is answered, then the one-line error, then the connection ends.
            assert b.read(1) == [b"PONG"]
            err = b.read(1)[0]
            assert isinstance(err, Exception)
            assert "memory for incomplete commands (1MiB, shared by all sessions) is full" in str(err)
            assert "not run" in str(err)
            assert b.closed(5)
            # The other session still works: its command completes and runs.
            a.send(b"x" * (big - 600_000) + b"\r\n" + C("STRLEN", "budget:a"))
            assert a.read(2) == [b"OK", big]
        finally:
            a.close()
            b.close()
        assert direct.exists("budget:b") == 0
        assert refused(reader, "request_buffer") == 1
        assert proxy.listener.budget.used == 0


def _keep_sending(r, seconds: float, chunk: bytes) -> int:
    """Send ``chunk`` again and again for ``seconds`` without reading (a client still busy
    writing its command, as a slow or busy one is after the proxy has answered it); returns
    the bytes sent. Raises if the connection is reset meanwhile."""
    sent, end = 0, time.monotonic() + seconds
    while time.monotonic() < end:
        r.send(chunk)
        sent += len(chunk)
        time.sleep(0.01)
    return sent


def _everything(r, timeout: float = 10) -> bytes:
    """What the proxy sends until it closes the connection."""
    out, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        r.sock.settimeout(max(deadline - time.monotonic(), 0.01))
        data = r.sock.recv(1 << 16)
        if not data:
            return b"".join(out)
        out.append(data)
    raise TimeoutError(f"still open after {timeout}s; got {b''.join(out)[:200]!r}")


@pytest.mark.parametrize("case", ["request_buffer", "protocol_error"])
def test_a_client_still_sending_when_it_is_refused_gets_the_one_line_error(proxy, certs, case):
    # Past the proxy's old one-second close grace: a closed socket answers more data with a
    # reset, and a client that had not read the error yet lost it (redis-py: "Connection
    # reset by peer" instead of the reason).
    user = f"still-sending-{case}"
    with limited(proxy, request_buffer=1024 * 1024) as reader:
        r = proxy.raw(certs.user_cert(user))
        try:
            r.send(C("PING"))
            assert r.read(1) == [b"PONG"]
            if case == "request_buffer":
                r.send(b"*3\r\n$3\r\nSET\r\n$6\r\nlinger\r\n$%d\r\n" % (8 * 1024 * 1024))
            else:
                r.send(b"*2\r\n$3\r\nGET\r\n$x\r\n")
            sent = _keep_sending(r, 2.5, b"z" * 32768)
            assert sent > 2 * 1024 * 1024
            got = _everything(r)
        finally:
            r.close()
    # One line, the reason, and nothing after it (no second error over the bytes that followed).
    assert got.count(b"\r\n") == 1 and got.startswith(b"-ERR "), got[:300]
    if case == "request_buffer":
        assert b"memory for incomplete commands (1MiB, shared by all sessions) is full" in got
        assert refused(reader, "request_buffer") == 1
    else:
        assert got.startswith(b"-ERR Protocol error: "), got
    events = [e for e in proxy.flush_audit() if e.actor == user]
    failed = [e for e in events if e.type == "db.session.query" and not e.success]
    assert len(failed) == 1, [e.error for e in failed]
    assert failed[0].error.lower() in got.decode().lower(), (failed[0].error, got)
    ends = [e.fields["reason"] for e in events if e.type == "db.session.end"]
    assert len(ends) == 1 and ends[0] == ("request buffer" if case == "request_buffer" else failed[0].error), ends


def test_a_command_not_completed_within_the_deadline_is_refused(proxy, alice, redis_server):
    direct = redis_server.client()
    direct.delete("slow:k")
    with limited(proxy, request_timeout=1.0) as reader:
        r = proxy.raw(alice)
        try:
            r.send(C("PING"))
            assert r.read(1) == [b"PONG"]
            started = time.monotonic()
            r.send(b"*3\r\n$3\r\nSET\r\n$6\r\nslow:k\r\n$10\r\nabc")
            time.sleep(0.5)
            r.send(b"de")  # still dripping: the deadline is for the whole command
            err = r.read(1, timeout=5)[0]
            took = time.monotonic() - started
            assert isinstance(err, Exception) and "not complete within 1s (request_timeout)" in str(err)
            assert 0.9 <= took < 3, took
            assert r.closed(5)
        finally:
            r.close()
        assert direct.exists("slow:k") == 0
        assert refused(reader, "request_timeout") == 1
        # Commands that complete in time, pipelined or split, are not affected.
        r = proxy.raw(alice)
        try:
            for _ in range(3):
                r.send(b"*3\r\n$3\r\nSET\r\n$6\r\nslow:k\r\n$2\r\nv")
                time.sleep(0.6)
                r.send(b"1\r\n")
                assert r.read(1) == [b"OK"]
        finally:
            r.close()
        assert refused(reader, "request_timeout") == 1


def test_a_quiet_session_still_meets_its_request_timeout(proxy, alice, monkeypatch):
    # A session quiet for _QUIET_AFTER is checked every _QUIET_TICK seconds: a command begun
    # then must still be refused at its deadline, not at the next of those checks.
    monkeypatch.setattr(session_mod, "_QUIET_AFTER", 0.5)
    monkeypatch.setattr(session_mod, "_QUIET_TICK", 5.0)
    with limited(proxy, request_timeout=1.0) as reader:
        r = proxy.raw(alice)
        try:
            r.send(C("PING"))
            assert r.read(1) == [b"PONG"]
            time.sleep(2.0)  # a check has seen the session quiet: the next one is 5 s away
            started = time.monotonic()
            r.send(b"*3\r\n$3\r\nSET\r\n$7\r\nquiet:k\r\n$10\r\nabc")
            err = r.read(1, timeout=8)[0]
            took = time.monotonic() - started
            assert isinstance(err, Exception) and "not complete within 1s (request_timeout)" in str(err)
            assert 0.9 <= took < 2.5, took
        finally:
            r.close()
        assert refused(reader, "request_timeout") == 1


CAPPED = load_role_yaml("""
kind: role
version: v1
metadata: {name: capped}
spec:
  options: {max_connections: 2}
  allow:
    db_labels: {'*': '*'}
    db_users: ['{{internal.db_users}}']
    db_commands: ['*']
""")


@pytest.fixture
def capped_role():
    conftest.ROLES["capped"] = CAPPED
    yield
    conftest.ROLES.pop("capped", None)


def test_role_max_connections_caps_sessions_per_user(proxy, certs, capped_role):
    capped = certs.user_cert("capped-user", roles=("capped",))
    with limited(proxy) as reader:
        conns = []
        try:
            for _ in range(2):
                r = proxy.raw(capped)
                r.send(C("PING"))
                assert r.read(1) == [b"PONG"]
                conns.append(r)
            res = proxy.redis_cli(capped, "PING")
            assert "too many sessions for user capped-user (limit 2, max_connections of your roles)" in res.stdout + res.stderr
            assert refused(reader, "too_many_sessions") == 1
        finally:
            for r in conns:
                r.close()


def test_sessions_per_user_default_lets_50_clients_work(proxy, certs):
    assert ProxyLimits().sessions_per_user >= 150  # redis-benchmark's 50 plus a pool of 100
    many = certs.user_cert("fifty-clients")
    with limited(proxy, sessions_per_user=ProxyLimits().sessions_per_user):
        conns = []
        try:
            for _ in range(50):
                r = proxy.raw(many)
                r.send(C("PING"))
                conns.append(r)
            assert all(r.read(1) == [b"PONG"] for r in conns)
        finally:
            for r in conns:
                r.close()


def test_max_sessions_caps_the_whole_proxy(proxy, certs):
    users = [certs.user_cert(f"ms{i}") for i in range(3)]
    with limited(proxy, max_sessions=2) as reader:
        conns = []
        try:
            for cert in users[:2]:
                r = proxy.raw(cert)
                r.send(C("PING"))
                assert r.read(1) == [b"PONG"]
                conns.append(r)
            res = proxy.redis_cli(users[2], "PING")
            assert "the proxy has reached its limit of 2 sessions; try again later" in res.stdout + res.stderr
            assert refused(reader, "max_sessions") == 1
        finally:
            for r in conns:
                r.close()


def test_handshakes_past_the_cap_are_closed_at_once(proxy, alice):
    with limited(proxy, max_handshakes=3, tls_handshake_timeout=1.0) as reader:
        idle = [socket.create_connection(("127.0.0.1", proxy.port), timeout=5) for _ in range(3)]
        try:
            time.sleep(0.3)
            extra = socket.create_connection(("127.0.0.1", proxy.port), timeout=5)
            started = time.monotonic()
            assert extra.recv(10) == b""  # closed without waiting for the handshake timeout
            assert time.monotonic() - started < 0.5
            extra.close()
            assert refused(reader, "too_many_handshakes") == 1
            # Unfinished handshakes time out and free their places.
            for s in idle:
                s.settimeout(5)
                assert s.recv(10) == b""
            _until(lambda: refused(reader, "handshake_timeout") == 3, 5)
            r = proxy.raw(alice)
            r.send(C("PING"))
            assert r.read(1) == [b"PONG"]
            r.close()
        finally:
            for s in idle:
                s.close()
