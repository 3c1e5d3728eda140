"""The benchmark's own load clients, each run as a child process (``python -m bench.clients``)
so that its CPU is not the driver's. Each prints one JSON line and exits; each is bounded in
count and time.

- ``sessions``: new sessions per second. Each session is a new TCP connection, a full TLS
  handshake (with a client certificate for Cachegate and stunnel), AUTH when the target
  needs it from the client (direct Redis, stunnel), and the first PING answered.
- ``idle``: opens idle sessions (handshake + one PING, then nothing) up to each count and
  reads the proxy's RSS (VmRSS) from /proc once settled.
- ``probe``: one session sending PING after PING; the longest wait for a reply (a stall)
  and the number of whole seconds without any reply.
- ``audit``: joins the cluster as a dbproxy host (join token) and sends EmitAuditEvents
  batches of ``db.session.query`` events over the mesh (mutual TLS gRPC); counts what auth
  reports as stored.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import signal
import ssl
import sys
import time
from collections.abc import Callable
from pathlib import Path


def _raise_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _ssl(args) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=args.ca)
    if args.cert:
        ctx.load_cert_chain(args.cert, args.key)
    return ctx


def _hello(args) -> tuple[bytes, bytes]:
    """What a new session sends first, and the reply that ends it."""
    if args.password:
        pw = args.password.encode()
        return (b"*2\r\n$4\r\nAUTH\r\n$%d\r\n%s\r\n*1\r\n$4\r\nPING\r\n" % (len(pw), pw), b"+OK\r\n+PONG\r\n")
    return b"*1\r\n$4\r\nPING\r\n", b"+PONG\r\n"


async def _open(args, ctx, hello, want):
    reader, writer = await asyncio.open_connection(args.host, args.port, ssl=ctx, server_hostname=args.host)
    writer.write(hello)
    got = b""
    while len(got) < len(want):
        chunk = await reader.read(4096)
        if not chunk:
            raise ConnectionError(f"closed after {got[:200]!r}")
        got += chunk
    if got != want:
        raise ConnectionError(f"unexpected reply {got[:200]!r}")
    return reader, writer


def _pct(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


async def sessions(args) -> dict:
    ctx = _ssl(args)
    hello, want = _hello(args)
    times: list[float] = []
    errors: list[str] = []
    start = time.perf_counter()
    deadline = start + args.duration

    async def worker() -> None:
        while time.perf_counter() < deadline and len(times) < args.max:
            t0 = time.perf_counter()
            try:
                _, writer = await asyncio.wait_for(_open(args, ctx, hello, want), 10)
            except Exception as exc:  # noqa: BLE001 - counted, the first one shown
                errors.append(f"{type(exc).__name__}: {exc}"[:200])
                if len(errors) > 20:
                    return
                continue
            times.append(time.perf_counter() - t0)
            writer.close()
            try:
                await asyncio.wait_for(writer.wait_closed(), 5)
            except Exception:  # noqa: BLE001, S110
                pass

    await asyncio.gather(*(worker() for _ in range(args.concurrency)))
    elapsed = time.perf_counter() - start
    return {"sessions": len(times), "seconds": round(elapsed, 3), "per_s": round(len(times) / elapsed, 1),
            "p50_ms": round(_pct(times, 0.5) * 1e3, 3), "p99_ms": round(_pct(times, 0.99) * 1e3, 3),
            "errors": len(errors), "first_error": errors[0] if errors else ""}


def _summed(pid: int, own: Callable[[int], float]) -> float:
    """``own(pid)`` plus the same for each of its child processes (dbproxy's workers), and
    theirs; a child that is gone meanwhile counts nothing (``pid`` itself must be there)."""
    total = own(pid)
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            children = (task / "children").read_text().split()
        except OSError:
            continue
        for child in children:
            try:
                total += _summed(int(child), own)
            except OSError:
                pass
    return total


def _own_rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def _own_cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _rss(pid: int) -> int:
    """VmRSS of ``pid`` and its child processes (dbproxy's workers), KiB."""
    return int(_summed(pid, _own_rss))


def _cpu(pid: int) -> float:
    """CPU seconds (user and system) of ``pid`` and its child processes (dbproxy's workers)."""
    return _summed(pid, _own_cpu)


async def idle(args) -> dict:
    ctx = _ssl(args)
    hello, want = _hello(args)
    counts = [int(c) for c in args.counts.split(",")]
    held: list = []
    errors: list[str] = []
    out = {"baseline_rss_kib": _rss(args.pid), "levels": []}
    started = time.perf_counter()
    sem = asyncio.Semaphore(args.concurrency)

    deadline = started + args.duration

    async def one() -> None:
        async with sem:
            if time.perf_counter() > deadline:
                return
            try:
                held.append(await asyncio.wait_for(_open(args, ctx, hello, want), 30))
            except Exception as exc:  # noqa: BLE001
                errors.append(f"{type(exc).__name__}: {exc}"[:200])

    for n in counts:
        if time.perf_counter() > deadline:
            break
        need = n - len(held)
        t0 = time.perf_counter()
        await asyncio.gather(*(one() for _ in range(max(need, 0))))
        opened = time.perf_counter() - t0
        await asyncio.sleep(args.settle)
        rss = _rss(args.pid)
        level = {"sessions": len(held), "wanted": n, "open_seconds": round(opened, 2), "rss_kib": rss,
                 "kib_per_session": round((rss - out["baseline_rss_kib"]) / max(len(held), 1), 1)}
        if args.cpu_window > 0:  # what the proxy spends while they all sit idle
            c0, t0 = _cpu(args.pid), time.perf_counter()
            await asyncio.sleep(args.cpu_window)
            spent, took = _cpu(args.pid) - c0, time.perf_counter() - t0
            level["cpu_s_per_s"] = round(spent / took, 4)
            level["cpu_us_per_session_s"] = round(spent / took / max(len(held), 1) * 1e6, 2)
        out["levels"].append(level)
        if errors:
            break
    out["errors"] = len(errors)
    out["first_error"] = errors[0] if errors else ""
    for _, w in held:
        w.close()
    await asyncio.sleep(0.5)
    return out


async def probe(args) -> dict:
    ctx = _ssl(args)
    hello, want = _hello(args)
    reader, writer = await _open(args, ctx, hello, want)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    print("READY", flush=True)
    start = time.perf_counter()
    end = start + args.duration
    longest = 0.0
    replies = 0
    seconds_with_replies: set[int] = set()
    last = start
    while not stop.is_set() and time.perf_counter() < end:
        t0 = time.perf_counter()
        writer.write(b"*1\r\n$4\r\nPING\r\n")
        got = b""
        while len(got) < 7:
            chunk = await reader.read(64)
            if not chunk:
                raise ConnectionError("the probe's session was closed")
            got += chunk
        now = time.perf_counter()
        longest = max(longest, now - t0, now - last)
        last = now
        replies += 1
        seconds_with_replies.add(int(now - start))
        await asyncio.sleep(args.interval)
    total = int(time.perf_counter() - start)
    writer.close()
    return {"replies": replies, "seconds": total, "max_stall_s": round(longest, 4),
            "seconds_without_reply": sum(1 for s in range(total) if s not in seconds_with_replies)}


async def audit(args) -> dict:
    import uuid

    import grpc
    from google.protobuf import struct_pb2

    from cachegate.auth.v1 import audit_service_pb2
    from cachegate.types.v1 import types_pb2
    from services.common.auditcodes import code_for
    from services.common.creds import secure_channel
    from services.common.grpcutil import ts
    from services.common.join import join
    from services.dbproxy.auditspool import id_prefix

    creds = await join(args.join_addr, Path(args.token_file).read_text().strip(), args.ca_pin,
                       types_pb2.SERVICE_ROLE_DBPROXY, ["127.0.0.1"])
    placeholder = "00000000-0000-4000-8000-000000000000"
    fields = struct_pb2.Struct()
    fields.update({"user": "bench", "database": "bench-redis", "db_user": "default", "db_name": "0",
                   "session_id": str(uuid.uuid4()), "command": "GET", "args": ["key:000000000042"]})
    # What dbproxy fills in itself as well: the event's code and its cluster's name.
    template = types_pb2.AuditEvent(id=placeholder, type="db.session.query", time=ts(time.time()), actor="bench",
                                    source_addr="127.0.0.1:50000", success=True, fields=fields,
                                    code=code_for("db.session.query", True),
                                    cluster_name=creds.identity.cluster_name).SerializeToString()
    from google.protobuf.internal.encoder import _VarintBytes

    head = b"\x0a" + _VarintBytes(len(template))  # field 1 (events), length-delimited

    # Ids as dbproxy makes them (services.dbproxy.auditspool.id_prefix): a random prefix per
    # sender and a counter, each event its own id.
    prefix = id_prefix().encode()
    seq = 0

    def batch() -> bytes:
        nonlocal seq
        seq += args.batch
        return b"".join(head + template.replace(placeholder.encode(), b"%s%012x" % (prefix, n))
                        for n in range(seq - args.batch, seq))

    channel = secure_channel(args.addr, creds.channel_credentials(), "auth")
    emit = channel.unary_unary("/cachegate.auth.v1.AuditService/EmitAuditEvents", request_serializer=None,
                               response_deserializer=audit_service_pb2.EmitAuditEventsResponse.FromString)
    await emit(batch(), timeout=30)  # warm up: connection, first statements
    stored = 0
    errors: list[str] = []
    start = time.perf_counter()
    deadline = start + args.duration

    async def sender() -> None:
        nonlocal stored
        while time.perf_counter() < deadline and stored < args.max:
            try:
                resp = await emit(batch(), timeout=60)
            except grpc.aio.AioRpcError as exc:
                errors.append(f"{exc.code().name}: {exc.details()}"[:200])
                return
            stored += resp.stored

    await asyncio.gather(*(sender() for _ in range(args.concurrency)))
    elapsed = time.perf_counter() - start
    await channel.close()
    return {"stored": stored, "seconds": round(elapsed, 3), "per_s": round(stored / elapsed, 1),
            "batch": args.batch, "concurrency": args.concurrency, "errors": len(errors),
            "first_error": errors[0] if errors else ""}


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.clients")
    ap.add_argument("what", choices=["sessions", "idle", "probe", "audit"])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--ca", default="")
    ap.add_argument("--cert", default="")
    ap.add_argument("--key", default="")
    ap.add_argument("--password-env", default="", help="environment variable that holds the AUTH password")
    ap.add_argument("--duration", type=float, default=5.0)
    ap.add_argument("--max", type=int, default=100_000)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--counts", default="1000,5000")
    ap.add_argument("--pid", type=int, default=0)
    ap.add_argument("--settle", type=float, default=2.0)
    ap.add_argument("--cpu-window", type=float, default=0.0,
                    help="idle: seconds over which to measure the proxy's CPU at each level (0: not measured)")
    ap.add_argument("--interval", type=float, default=0.001)
    ap.add_argument("--addr", default="")
    ap.add_argument("--join-addr", default="")
    ap.add_argument("--token-file", default="")
    ap.add_argument("--ca-pin", default="")
    ap.add_argument("--batch", type=int, default=500)
    args = ap.parse_args()
    args.password = os.environ.get(args.password_env, "") if args.password_env else ""
    _raise_nofile()
    try:
        import uvloop
        runner = uvloop.run
    except ImportError:  # pragma: no cover
        runner = asyncio.run
    result = runner({"sessions": sessions, "idle": idle, "probe": probe, "audit": audit}[args.what](args))
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    sys.exit(main())
