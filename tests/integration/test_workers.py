"""dbproxy with ``workers: 2``: one RESP port served by two processes (SO_REUSEPORT).

Real processes: auth, dbproxy (whose first process starts the second), a TLS redis-server
with a password; sessions are plain TLS clients with a database certificate from
``cgate db login``.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import ssl
import time

import pytest

from services.dbproxy.allocator import find_jemalloc
from tests.cli.test_cgate_db_e2e import proxy_with_one_database, redis_tls  # noqa: F401

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def c(tmp_path_factory, redis_tls):  # noqa: F811
    cl = proxy_with_one_database(tmp_path_factory.mktemp("workers"), redis_tls,
                                 {"workers": 2, "heartbeat_interval": "1s"})
    cl.redis_port = cl.procs["dbproxy"].info["redis_port"]
    yield cl
    cl.stop()


def first_pid(c) -> int:
    return c.procs["dbproxy"].popen.pid


def worker_pids(c) -> list[int]:
    pid = first_pid(c)
    out = []
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            out += [int(x) for x in open(f"/proc/{pid}/task/{task}/children").read().split()]
        except OSError:
            pass
    return out


def wait_workers(c, n: int = 1, not_in: tuple[int, ...] = (), timeout: float = 20) -> list[int]:
    deadline = time.monotonic() + timeout
    while True:
        pids = [p for p in worker_pids(c) if p not in not_in]
        if len(pids) >= n:
            return pids
        assert time.monotonic() < deadline, "the dbproxy worker did not (re)start"
        time.sleep(0.2)


def accepted_by(pid: int, port: int) -> int:
    return len(peers_of(pid, port))


def peers_of(pid: int, port: int) -> set[int]:
    """The client ports of ``pid``'s accepted connections on ``port`` (the RESP port)."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    peers = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = open(table).read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            parts = line.split()
            local, remote, state, inode = parts[1], parts[2], parts[3], parts[9]
            if int(local.rsplit(":", 1)[1], 16) == port and state == "01" and inode in inodes:
                peers.add(int(remote.rsplit(":", 1)[1], 16))
    return peers


def session(c, timeout: float = 10) -> ssl.SSLSocket:
    db = c.db
    ctx = ssl.create_default_context(cafile=db["ca"])
    ctx.load_cert_chain(db["cert"], db["key"])
    s = ctx.wrap_socket(socket.create_connection((db["host"], db["port"]), timeout=timeout),
                        server_hostname=db["host"])
    return s


def ping(s: ssl.SSLSocket) -> bytes:
    s.sendall(b"*1\r\n$4\r\nPING\r\n")
    return s.recv(64)


def sessions_ls(c) -> list[dict]:
    return json.loads(c.cgctl("sessions", "ls", f"--proxy-api={c.api}", "--format=json").stdout)


def maps_jemalloc(pid: int) -> bool:
    return "libjemalloc" in open(f"/proc/{pid}/maps").read()


@pytest.mark.skipif(find_jemalloc() is None, reason="libjemalloc2 is not installed (redis-server brings it)")
def test_both_workers_run_on_jemalloc_in_the_process_that_was_started(c):
    # allocator: auto (the default) runs `cachegate start` again on jemalloc: the same
    # process id (the one Popen started), and the worker inherits it.
    [child] = wait_workers(c)
    assert maps_jemalloc(first_pid(c)) and maps_jemalloc(child)
    env = open(f"/proc/{first_pid(c)}/environ", "rb").read().split(b"\0")
    assert b"CACHEGATE_ALLOCATOR_LOADED=jemalloc" in env


def test_sessions_spread_over_both_workers_and_are_listed_and_killed_from_the_first(c):
    [child] = wait_workers(c)
    socks = [session(c) for _ in range(40)]
    try:
        assert all(ping(s) == b"+PONG\r\n" for s in socks)
        by_first, by_child = accepted_by(first_pid(c), c.redis_port), accepted_by(child, c.redis_port)
        assert by_first + by_child == 40 and by_first > 0 and by_child > 0, (by_first, by_child)
        # `cgctl sessions ls` asks the first process, which asks the other worker.
        listed = sessions_ls(c)
        assert len(listed) == 40 and {s["user"] for s in listed} == {"alice"}
        # `cgctl status` shows one dbproxy host, every worker's sessions counted.
        deadline = time.monotonic() + 20
        while True:
            proxies = json.loads(c.cgctl("status", "--format=json").stdout)["proxies"]
            if [p["sessions"] for p in proxies] == [40] or time.monotonic() > deadline:
                break
            time.sleep(1)
        assert [p["sessions"] for p in proxies] == [40] and not proxies[0]["stale"], proxies
        # Kill one session of each worker: each is told why, the others go on.
        on_child = peers_of(child, c.redis_port)
        port_of = {int(x["client"].rsplit(":", 1)[1]): x["id"] for x in listed}
        victims = [next(p for p in port_of if p in on_child), next(p for p in port_of if p not in on_child)]
        for p in victims:
            c.cgctl("sessions", "kill", port_of[p], f"--proxy-api={c.api}")
        for s in socks:
            if s.getsockname()[1] not in victims:
                continue
            s.settimeout(5)
            data = b""
            while b"\r\n" not in data:
                chunk = s.recv(256)
                if not chunk:
                    break
                data += chunk
            assert b"an administrator" in data and b"ended it" in data, data
        left = {x["id"] for x in sessions_ls(c)}
        assert len(left) == 38 and not left & {port_of[p] for p in victims}
        res = c.cgctl("sessions", "kill", port_of[victims[0]], f"--proxy-api={c.api}", check=False)
        assert res.returncode != 0 and "no live session" in res.stderr
        # Every worker's audit reaches auth: one PING event per session, each session once.
        deadline = time.monotonic() + 15
        while True:
            events = json.loads(c.cgctl("audit", "search", "--type=db.session.query", "--user=alice",
                                        "--format=json").stdout)
            pings = [e["fields"]["session_id"] for e in events if e["fields"].get("command") == "PING"]
            if len(pings) >= 40 or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert sorted(pings) == sorted(port_of.values())
    finally:
        for s in socks:
            s.close()


def test_a_killed_worker_is_started_again_and_the_other_keeps_serving(c):
    [child] = wait_workers(c)
    socks = [session(c) for _ in range(20)]
    assert all(ping(s) == b"+PONG\r\n" for s in socks)
    on_child = peers_of(child, c.redis_port)
    assert on_child and len(on_child) < 20
    os.kill(child, signal.SIGKILL)
    started = time.monotonic()
    [new_child] = wait_workers(c, not_in=(child,), timeout=15)
    assert time.monotonic() - started < 10
    # Sessions of the first process never noticed; those of the killed worker are gone.
    for s in socks:
        s.settimeout(3)
        try:
            answer = ping(s)
        except (OSError, ssl.SSLError):
            answer = b""
        if s.getsockname()[1] in on_child:
            assert answer == b"", answer
        else:
            assert answer == b"+PONG\r\n", answer
    # New sessions land on both again.
    deadline = time.monotonic() + 10
    while accepted_by(new_child, c.redis_port) == 0:
        extra = session(c)
        assert ping(extra) == b"+PONG\r\n"
        socks.append(extra)
        assert time.monotonic() < deadline, "no session reached the restarted worker"
    for s in socks:
        s.close()
    log = (c.root / "dbproxy.log").read_text()
    assert "dbproxy worker exited; starting it again" in log


def test_sigterm_stops_every_worker(c):
    [child] = wait_workers(c)
    s = session(c)
    assert ping(s) == b"+PONG\r\n"
    proc = c.procs["dbproxy"].popen
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(20) == 0
    deadline = time.monotonic() + 10
    while not gone(child):
        assert time.monotonic() < deadline, "the worker outlived the first process"
        time.sleep(0.1)
    s.close()


def gone(pid: int) -> bool:
    try:
        return open(f"/proc/{pid}/stat").read().split()[2] == "Z"
    except OSError:
        return True


def test_a_worker_never_outlives_the_first_process(c):
    """kill -9 of the first process: the other worker drains and exits too, so a dbproxy
    started again does not find old workers on its port."""
    c.procs["dbproxy"].start()
    [child] = wait_workers(c)
    os.kill(first_pid(c), signal.SIGKILL)
    deadline = time.monotonic() + 15
    while not gone(child):
        assert time.monotonic() < deadline, "the worker outlived the first process"
        time.sleep(0.1)
