"""dbproxy's memory and session limits, through real auth and dbproxy processes to a real
TLS redis-server: dripping commands stay within the budget, unfinished TLS handshakes give
their memory back, redis-benchmark's defaults work through the RESP port and the tunnel."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.request

import pytest

from tests.cli.test_cgate_db_e2e import (  # noqa: F401
    DB, PASSWORD, REDIS_PASSWORD, cgate, proxy_with_one_database, redis_tls)
from tests.helpers import REPO, free_port, tool
from tests.helpers import env as base_env

pytestmark = pytest.mark.slow

MiB = 1024 * 1024
BUDGET = 128 * MiB


@pytest.fixture(scope="module")
def c(tmp_path_factory, redis_tls):  # noqa: F811
    metrics_port = free_port()
    cl = proxy_with_one_database(
        tmp_path_factory.mktemp("limits-e2e"), redis_tls,
        {"limits": {"request_buffer": "128MiB", "tls_handshake_timeout": "2s"}},
        {"metrics": "prometheus", "prometheus_listen_addr": f"127.0.0.1:{metrics_port}"})
    cl.metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
    yield cl
    cl.stop()


def rss(c) -> int:
    """Resident memory of the dbproxy process, bytes."""
    pid = c.procs["dbproxy"].popen.pid
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def refusals(c) -> dict[str, float]:
    text = urllib.request.urlopen(c.metrics_url, timeout=10).read().decode()
    out = {}
    for m in re.finditer(r'^cachegate_dbproxy_sessions_refused_total\{([^}]*)\} ([0-9.e+]+)$', text, re.M):
        reason = re.search(r'reason="([^"]*)"', m.group(1))
        if reason:
            out[reason.group(1)] = out.get(reason.group(1), 0) + float(m.group(2))
    return out


def tls_session(c, timeout: float = 10) -> ssl.SSLSocket:
    db = c.db
    ctx = ssl.create_default_context(cafile=db["ca"])
    ctx.load_cert_chain(db["cert"], db["key"])
    raw = socket.create_connection((db["host"], db["port"]), timeout=timeout)
    return ctx.wrap_socket(raw, server_hostname=db["host"])


PINGER = """
import socket, ssl, sys, threading, time
host, port, ca, cert, key = sys.argv[1:6]
ctx = ssl.create_default_context(cafile=ca)
ctx.load_cert_chain(cert, key)
s = ctx.wrap_socket(socket.create_connection((host, int(port)), timeout=10), server_hostname=host)
stop = threading.Event()
threading.Thread(target=lambda: (sys.stdin.readline(), stop.set()), daemon=True).start()
s.sendall(b"*1\\r\\n$4\\r\\nPING\\r\\n")
assert s.recv(64) == b"+PONG\\r\\n"
print("ready", flush=True)
while not stop.is_set():
    t0 = time.perf_counter()
    s.sendall(b"*1\\r\\n$4\\r\\nPING\\r\\n")
    if s.recv(64) != b"+PONG\\r\\n":
        print("bad-reply", flush=True)
        break
    print("%.2f" % ((time.perf_counter() - t0) * 1000), flush=True)
    time.sleep(0.02)
"""


DRIPPER = """
import asyncio, json, ssl, sys
host, port, ca, cert, key, n, size, rate, seconds = sys.argv[1:10]
n, size, rate, seconds = int(n), int(size), float(rate), float(seconds)
ctx = ssl.create_default_context(cafile=ca)
ctx.load_cert_chain(cert, key)
done = []

async def one(i):
    loop = asyncio.get_running_loop()
    await asyncio.sleep(i * 0.02)  # connect over 0.6 s, not all at once
    for attempt in range(3):  # a session first (a handshake this busy machine let time out is tried again)
        try:
            reader, writer = await asyncio.open_connection(host, int(port), ssl=ctx)
            writer.write(b"*1\\r\\n$4\\r\\nPING\\r\\n")
            if await asyncio.wait_for(reader.readexactly(7), 10) == b"+PONG\\r\\n":
                break
        except (ConnectionError, ssl.SSLError, asyncio.IncompleteReadError):
            await asyncio.sleep(0.1)
    else:
        return "no session"
    chunk = b"x" * (256 * 1024)
    try:
        writer.write(b"*3\\r\\n$3\\r\\nSET\\r\\n$%d\\r\\ndrip:%d\\r\\n$%d\\r\\n" % (len(str(i)) + 5, i, size))
        sent, t0 = 0, loop.time()
        # Never the whole value (the command stays incomplete), at most RATE bytes a second.
        while sent + len(chunk) < size and loop.time() - t0 < seconds:
            writer.write(chunk)
            sent += len(chunk)
            await writer.drain()
            await asyncio.sleep(max(0.0, t0 + sent / rate - loop.time()))
        done.append(i)
        while len(done) < n:  # held until every other one is held or refused
            await asyncio.sleep(0.05)
        return "held"
    except (ConnectionError, ssl.SSLError):
        done.append(i)
        try:
            return (await asyncio.wait_for(reader.read(4096), 5)).decode()
        except Exception as exc:
            return "no reply: %r" % exc
    finally:
        writer.transport.abort()

async def main():
    return await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(n))), 60)

print(json.dumps(asyncio.run(main())))
"""


def test_dripping_commands_stay_within_the_budget_and_others_keep_answering(c):
    base = rss(c)
    stop = threading.Event()
    peak = [base]
    pings: list[float] = []
    problems: list[str] = []

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], rss(c))
            time.sleep(0.02)

    # PINGs from their own process (this one is busy sending): each round trip in ms.
    db = c.db
    pinger = subprocess.Popen([sys.executable, "-c", PINGER, db["host"], str(db["port"]), db["ca"], db["cert"],
                               db["key"]], stdout=subprocess.PIPE, stdin=subprocess.PIPE, text=True)
    assert pinger.stdout.readline().strip() == "ready"

    # The 30 senders: one process, one thread, at lower priority (an attacker's CPU is not
    # the proxy's), each dripping at 4 MB/s for 8 s (120 MB/s in all), or until refused.
    drip = subprocess.Popen([sys.executable, "-c", DRIPPER, db["host"], str(db["port"]), db["ca"], db["cert"],
                             db["key"], "30", str(60 * MiB), str(4 * MiB), "8"], stdout=subprocess.PIPE, text=True,
                            preexec_fn=lambda: os.nice(19))

    threads = [threading.Thread(target=sample)]
    for t in threads:
        t.start()
    time.sleep(0.3)
    out, _ = drip.communicate(timeout=90)
    results = json.loads(out)
    stop.set()
    for t in threads:
        t.join(10)
    out, _ = pinger.communicate("stop\n", timeout=20)
    lines = out.split()
    problems += [ln for ln in lines if not ln.replace(".", "").isdigit()]
    pings = [float(ln) / 1000 for ln in lines if ln.replace(".", "").isdigit()]

    assert not problems, problems
    assert peak[0] < BUDGET + 200 * MiB, f"RSS peaked at {peak[0] / MiB:.0f} MiB (started at {base / MiB:.0f})"
    # Within 100 ms, 95 in 100 of them: on a shared two-core test machine the scheduler alone
    # can hold a process back longer now and then; none is stuck behind the flood.
    ordered = sorted(pings)
    assert len(pings) > 100 and ordered[len(ordered) // 2] < 0.02 and ordered[int(len(ordered) * 0.95)] < 0.1 \
        and ordered[-1] < 1.0, f"PINGs (s): median {ordered[len(ordered) // 2]}, slowest {ordered[-5:]} of {len(pings)}"
    # 30 x 32 MB wanted, 128 MiB held: many sessions were refused (at full speed most are; a
    # sender this machine slows down holds less), each with the one-line error.
    refused = [r for r in results if r != "held"]
    assert len(refused) >= 10 and len(results) == 30, results
    assert all(r.startswith("-ERR Cachegate closed this session: the proxy's memory for incomplete "
                            "commands (128MiB, shared by all sessions) is full") and r.endswith("\r\n")
                        and r.count("\r\n") == 1 for r in refused), refused[:3]
    assert refusals(c).get("request_buffer", 0) >= len(refused)
    # Nothing of them reached Redis.
    direct = subprocess.run(["redis-cli", "-h", "127.0.0.1", "-p", str(c.redis["port"]), "--tls", "--cacert",
                             c.redis["ca"], "--no-auth-warning", "-a", REDIS_PASSWORD, "--scan", "--pattern", "drip:*"],
                            capture_output=True, text=True, timeout=20)
    assert direct.stdout.strip() == ""


def test_unfinished_handshakes_give_their_memory_back(c):
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 10_500:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 12_000), hard))
    time.sleep(1)
    base = rss(c)
    before = refusals(c)
    host, port = c.db["host"], c.db["port"]
    # The first bytes of a ClientHello: the proxy waits for the rest.
    hello = b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 64
    socks: list[socket.socket] = []
    started = time.monotonic()
    try:
        for _ in range(10_000):
            s = socket.socket()
            s.settimeout(5)
            try:
                s.connect((host, port))
                s.send(hello)
            except OSError:
                pass
            socks.append(s)
            assert time.monotonic() - started < 40, "opening connections took too long"
        during = rss(c)
        # Legitimate clients still get in once the unfinished handshakes time out (2s).
        time.sleep(3)
        s = tls_session(c)
        s.sendall(b"*1\r\n$4\r\nPING\r\n")
        assert s.recv(64) == b"+PONG\r\n"
        s.close()
    finally:
        for s in socks:
            s.close()
    time.sleep(1)
    after = rss(c)
    assert after < base + 100 * MiB, (f"RSS {after / MiB:.0f} MiB after, {base / MiB:.0f} before, "
                                      f"{during / MiB:.0f} during")
    now = refusals(c)
    over = now.get("too_many_handshakes", 0) - before.get("too_many_handshakes", 0)
    timed_out = now.get("handshake_timeout", 0) - before.get("handshake_timeout", 0)
    assert over > 0 and timed_out > 0 and over + timed_out >= 9_000, now


def start_tunnel(c, tmp_path) -> tuple[subprocess.Popen, int]:
    out = tmp_path / "tunnel.out"
    with open(out, "wb") as fo:
        proc = subprocess.Popen([tool("cgate"), "proxy", "db", "--tunnel", DB, "--port", "0"], stdout=fo,
                                stderr=subprocess.STDOUT, cwd=REPO, env=base_env(CACHEGATE_HOME=str(c.home)))
    deadline = time.monotonic() + 30
    while True:
        m = re.search(r"on 127\.0\.0\.1:(\d+)", out.read_text())
        if m:
            return proc, int(m.group(1))
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"tunnel did not start:\n{out.read_text()}")
        time.sleep(0.1)


def benchmark(*args: str) -> subprocess.CompletedProcess:
    # Default client count (50); few requests, to stay quick on a small machine.
    return subprocess.run(["redis-benchmark", "-q", "-n", "3000", "-t", "set,get", *args],
                          capture_output=True, text=True, timeout=120)


def _ok(res: subprocess.CompletedProcess) -> None:
    text = res.stdout + res.stderr
    assert res.returncode == 0 and "ERR" not in text, text[-2000:]
    assert re.search(r"SET: [0-9.]+ requests per second", text) and re.search(r"GET: [0-9.]+ requests per second",
                                                                               text), text[-2000:]


def test_redis_benchmark_defaults_through_the_resp_port(c):
    db = c.db
    _ok(benchmark("-h", db["host"], "-p", str(db["port"]), "--tls", "--cacert", db["ca"], "--cert", db["cert"],
                  "--key", db["key"]))


def test_redis_benchmark_defaults_and_a_pool_of_100_through_the_tunnel(c, tmp_path):
    import redis

    proc, port = start_tunnel(c, tmp_path)
    try:
        pool = [redis.Redis(host="127.0.0.1", port=port, socket_timeout=20) for _ in range(100)]
        assert all(p.ping() for p in pool)  # 100 sessions held open ...
        _ok(benchmark("-h", "127.0.0.1", "-p", str(port)))  # ... while 50 more come and go
        assert all(p.ping() for p in pool)
        for p in pool:
            p.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()


def test_an_explicit_ca_pin_is_checked_also_with_a_profile(c):
    import stat

    wrong = "sha256:" + "0" * 64
    res = cgate(c, "login", f"--proxy={c.proxy}", "--user=alice", f"--ca-pin={wrong}", "--password-stdin",
                input=PASSWORD + "\n", check=False)
    assert res.returncode == 1, res.stdout
    line = res.stderr.strip()
    assert len(line.splitlines()) == 1 and wrong in line and c.ca_pin in line, line
    # The right pin still logs in over the existing profile.
    res = cgate(c, "login", f"--proxy={c.proxy}", "--user=alice", f"--ca-pin={c.ca_pin}", "--password-stdin",
                input=PASSWORD + "\n", check=False)
    assert res.returncode == 0, res.stderr
    # Keys, certificates, tokens and spooled audit: 0600 in 0700 folders.
    mode = lambda p: stat.S_IMODE(p.stat().st_mode)  # noqa: E731
    for folder in (c.data / "auth", c.data / "dbproxy", c.data / "dbproxy" / "audit-spool",
                   c.home / "profiles", *(c.home / "profiles").iterdir()):
        assert mode(folder) == 0o700, folder
        for f in folder.iterdir():
            if f.is_file():
                assert mode(f) == 0o600, f


def test_sigterm_mid_pipeline_answers_every_command_that_ran(c):
    """SIGTERM to dbproxy during a 200,000-command pipeline: health says NOT_SERVING, every
    command Redis ran gets its reply, the client is told to reconnect, the process exits
    within its grace period. (Last in the module: it restarts dbproxy.)"""
    import hiredis

    direct = redis_direct_client(c)
    direct.delete("term:n")
    cgate(c, "db", "login", DB)  # a fresh database certificate (an earlier test logged in again)
    c.db = json.loads(cgate(c, "db", "config", DB, "--format=json").stdout)
    sock = tls_session(c, timeout=20)
    sock.sendall(b"*1\r\n$4\r\nPING\r\n")
    assert sock.recv(64) == b"+PONG\r\n"  # the session is relaying
    batch = b"*2\r\n$4\r\nINCR\r\n$6\r\nterm:n\r\n" * 2000
    sent = threading.Event()

    def send_all():
        try:
            for i in range(100):
                sock.sendall(batch)
                if i == 30:
                    sent.set()
        except (OSError, ValueError):
            pass
        sent.set()

    sender = threading.Thread(target=send_all)
    sender.start()
    assert sent.wait(30)
    proc = c.procs["dbproxy"].popen
    started = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    reader = hiredis.Reader()
    replies = []
    sock.settimeout(20)
    ended = None
    while True:
        try:
            data = sock.recv(1 << 20)
        except (OSError, ssl.SSLError) as exc:
            ended = exc
            break
        if not data:
            break
        reader.feed(data)
        while (item := reader.gets()) is not False:
            replies.append(item)
    sender.join(20)
    sock.close()
    rc = proc.wait(20)
    took = time.monotonic() - started
    ran = int(direct.get("term:n") or 0)
    counts = [r for r in replies if isinstance(r, int)]
    assert ran > 0 and counts == list(range(1, ran + 1)), (ran, len(counts), ended)
    assert isinstance(replies[-1], hiredis.ReplyError) and "shutting down; reconnect" in str(replies[-1])
    assert rc == 0 and took < 10 + 5, (rc, took)  # limits.shutdown_grace (10 s) and the rest of the stop
    direct.close()
    c.procs["dbproxy"].start()  # for whatever runs after


def redis_direct_client(c):
    import redis

    return redis.Redis(host="127.0.0.1", port=c.redis["port"], password=REDIS_PASSWORD, ssl=True,
                       ssl_ca_certs=c.redis["ca"], socket_timeout=10)
