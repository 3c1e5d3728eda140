"""Load: many concurrent sessions from several users with mixed commands (one at a time,
pipelined, Pub/Sub, blocking, MULTI/EXEC). Every reply equals what the same script gets from
Redis directly; no protocol error, no refused session; the audit log has exactly one event
per command sent. CI runs 200 sessions once; CACHEGATE_RELIABILITY=full runs 1,000, and three
rounds of them for dbproxy's memory (within 10% from the first round to the last)."""

from __future__ import annotations

import asyncio
import collections
import ssl
import time

import hiredis
import pytest

from services.dbproxy.resp import encode_command
from tests.reliability.stack import FULL, REDIS_PASSWORD

pytestmark = [pytest.mark.slow, pytest.mark.reliability]

SESSIONS = 1000 if FULL else 200
USERS = ("alice", "bob", "carol")
KINDS = ("plain", "pipeline", "pubsub", "blocking", "multi")
TIME_LIMIT = 240 if FULL else 60  # seconds for one round, all sessions


def script(kind: str, p: str, i: int) -> list[list[str]]:
    """The commands of session ``i`` of this kind, keys under prefix ``p``."""
    k = f"{p}{i}"
    if kind == "plain":
        return [["SET", f"{k}:s", f"v{i}"], ["GET", f"{k}:s"], ["INCR", f"{k}:n"], ["INCR", f"{k}:n"],
                ["APPEND", f"{k}:s", "x"], ["STRLEN", f"{k}:s"], ["DEL", f"{k}:s", f"{k}:n"], ["EXISTS", f"{k}:s"]]
    if kind == "pipeline":
        out = []
        for j in range(40):
            out += [["RPUSH", f"{k}:l", str(j)], ["HSET", f"{k}:h", f"f{j}", str(j)]]
        return out + [["LRANGE", f"{k}:l", "0", "-1"], ["HLEN", f"{k}:h"], ["LLEN", f"{k}:l"], ["DEL", f"{k}:l", f"{k}:h"]]
    if kind == "blocking":
        return [["RPUSH", f"{k}:q", "a", "b"], ["BLPOP", f"{k}:q", "0"], ["BLPOP", f"{k}:q", "0"],
                ["BLPOP", f"{k}:q", "0.2"], ["LLEN", f"{k}:q"]]
    if kind == "multi":
        return [["MULTI"], ["INCR", f"{k}:t"], ["SET", f"{k}:m", "x"], ["GET", f"{k}:m"], ["EXEC"],
                ["DEL", f"{k}:t", f"{k}:m"]]
    if kind == "pubsub":
        return [["SUBSCRIBE", f"{k}:ch"], ["PING"], ["UNSUBSCRIBE", f"{k}:ch"], ["PING", "done"]]
    raise AssertionError(kind)


def _norm(reply, p: str):
    """A reply with the session's key prefix taken out (BLPOP and SUBSCRIBE name their key)."""
    if isinstance(reply, list):
        return [_norm(x, p) for x in reply]
    if isinstance(reply, bytes):
        return reply.replace(p.encode(), b"<p>")
    if isinstance(reply, hiredis.ReplyError):
        return ("error", str(reply).replace(p, "<p>"))
    return reply


async def _connect(host: str, port: int, ctx: ssl.SSLContext):
    return await asyncio.open_connection(host, port, ssl=ctx, limit=1 << 20,
                                         server_hostname=None if ctx.check_hostname is False else "localhost")


async def run_session(conn, kind: str, p: str, i: int, auth: bytes | None = None, ready=None) -> list:
    """Run the script of session ``i`` on an open connection; ``ready``: awaited first (all
    sessions connected), so that they are all open at once."""
    reader, writer = conn
    parser = hiredis.Reader(notEnoughData=Ellipsis)

    async def read(n: int) -> list:
        got = []
        while len(got) < n:
            item = parser.gets()
            if item is not Ellipsis:
                got.append(item)
                continue
            data = await asyncio.wait_for(reader.read(1 << 16), 60)
            if not data:
                raise ConnectionError(f"closed after {len(got)} of {n} replies")
            parser.feed(data)
        return got

    try:
        if auth is not None:
            writer.write(auth)
            assert (await read(1)) == [b"OK"]
        if ready is not None:
            await ready()
        cmds = script(kind, p, i)
        replies: list = []
        if kind == "pipeline":
            writer.write(b"".join(encode_command(*c) for c in cmds))
            replies = await read(len(cmds))
        elif kind == "pubsub":
            writer.write(encode_command(*cmds[0]))
            replies += await read(1)
            writer.write(encode_command(*cmds[1]))  # a command while subscribed
            replies += await read(1)
            writer.write(encode_command(*cmds[2]) + encode_command(*cmds[3]))
            replies += await read(2)
        else:
            for c in cmds:
                writer.write(encode_command(*c))
                replies += await read(1)
        return [_norm(r, p) for r in replies]
    finally:
        writer.close()


def _kind(i: int) -> tuple[str, str]:
    return USERS[i % len(USERS)], KINDS[(i // len(USERS)) % len(KINDS)]


async def one_round(st, round_no: int, certs: dict, direct_ctx: ssl.SSLContext) -> tuple[collections.Counter, list]:
    """SESSIONS sessions through the proxy, all connected before any starts its script (so they
    are open at once), then the same scripts against Redis directly; replies compared."""
    connecting = asyncio.Semaphore(64)  # TLS handshakes in flight (the proxy's max_handshakes is 512)
    all_in = asyncio.Barrier(SESSIONS)
    sent: collections.Counter = collections.Counter()
    failures: list = []
    auth = encode_command("AUTH", REDIS_PASSWORD)

    async def via_proxy(i: int):
        user, kind = _kind(i)
        try:
            async with connecting:
                conn = await asyncio.wait_for(_connect("127.0.0.1", st.c.redis_port, certs[user]), 60)
        except Exception as exc:  # noqa: BLE001 - counted and shown
            failures.append((i, kind, "connect", repr(exc)))
            await all_in.abort()
            return None
        try:
            return await run_session(conn, kind, f"r{round_no}:p:", i, ready=all_in.wait)
        except Exception as exc:  # noqa: BLE001
            failures.append((i, kind, repr(exc)))
            return None

    proxied = await asyncio.wait_for(asyncio.gather(*(via_proxy(i) for i in range(SESSIONS))), TIME_LIMIT)
    direct_sem = asyncio.Semaphore(100)

    async def direct(i: int):
        user, kind = _kind(i)
        async with direct_sem:
            conn = await _connect("127.0.0.1", st.redis.port, direct_ctx)
            return await run_session(conn, kind, f"r{round_no}:d:", i, auth=auth)

    directs = await asyncio.wait_for(asyncio.gather(*(direct(i) for i in range(SESSIONS))), TIME_LIMIT)
    for i, (got, want) in enumerate(zip(proxied, directs)):
        user, kind = _kind(i)
        if got is None:
            continue
        if got != want:
            failures.append((i, kind, got, want))
        if any(isinstance(x, tuple) and x[0] == "error" and "Protocol" in x[1] for x in got):
            failures.append((i, kind, "protocol error", got))
        for c in script(kind, "", i):
            sent[(user, c[0])] += 1
    return sent, failures


def _rss(pid: int) -> int:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def _check_audit(st, since: float, sent: collections.Counter) -> None:
    """One db.session.query event per command sent, per user and command: none lost, none twice."""
    want = collections.Counter(sent)
    deadline = time.monotonic() + 60
    while True:
        per: collections.Counter = collections.Counter()
        for (u, c, _arg), n in st.audit_commands(since).items():
            if u in USERS and (u, c) in want:
                per[(u, c)] += n
        if per == want or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert per == want, {k: (per.get(k), v) for k, v in want.items() if per.get(k) != v}


def _rounds(st, n: int) -> tuple[collections.Counter, list[float], list[int]]:
    certs = {u: st.tls_context(st.cert(u)) for u in USERS}
    direct_ctx = ssl.create_default_context(cafile=st.redis.ca)
    pid = st.proxy.popen.pid
    sent: collections.Counter = collections.Counter()
    took, rss = [], []
    for round_no in range(1, n + 1):
        t0 = time.monotonic()
        got, failures = asyncio.run(one_round(st, round_no, certs, direct_ctx))
        took.append(time.monotonic() - t0)
        assert not failures, failures[:5]
        sent += got
        time.sleep(3.0)  # the sessions' ends, the audit flush, the proxy giving their memory back
        rss.append(_rss(pid))
    return sent, took, rss


def test_concurrent_sessions_mixed_commands(st):
    refused_before = st.metric("cachegate_dbproxy_sessions_refused_total")
    since = time.time() - 1
    sent, took, rss = _rounds(st, 1)
    assert st.metric("cachegate_dbproxy_sessions_refused_total") == refused_before
    _check_audit(st, since, sent)
    print(f"\nload: {SESSIONS} concurrent sessions of {len(USERS)} users, {sum(sent.values())} commands "
          f"through the proxy in {took[0]:.1f}s, every reply as Redis's own, audit exact; dbproxy RSS "
          f"{rss[0] >> 20} MiB")


def test_dbproxy_memory_is_flat_across_rounds(st):
    """Three rounds of SESSIONS sessions (200 in CI, 1,000 in the full run): dbproxy gives
    the memory of ended sessions back (limits.MallocTrimmer); before it did, RSS rose by
    about 25 MiB per 200 sessions, round after round."""
    since = time.time() - 1
    sent, took, rss = _rounds(st, 3)
    _check_audit(st, since, sent)
    growth = (rss[-1] - rss[0]) / rss[0]
    print(f"\nmemory: {SESSIONS} sessions x 3 rounds ({', '.join(f'{t:.0f}s' for t in took)}), dbproxy RSS "
          f"{' -> '.join(str(r >> 20) for r in rss)} MiB ({growth:+.1%} from the first round to the last)")
    assert growth < 0.10, rss
