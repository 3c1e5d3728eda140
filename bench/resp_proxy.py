"""RESP proxy benchmark: redis-benchmark against Redis directly and through dbproxy's data plane.

Starts a TLS redis-server with requirepass, then the proxy's data plane in a child process
(the real :class:`RespListener`, sessions with RBAC and audit ON; audit batches go to a
sink that serializes them as the gRPC call to auth would and waits a little), and runs
redis-benchmark (TLS, client certificate for the proxy) against both in the same run.
Prints throughput ratios (proxy/direct), p50/p99 latencies, and the peak RSS of the proxy
process next to redis-server's. Bounded: ``-n`` requests per test, a timeout per step.

    .venv/bin/python bench/resp_proxy.py                    # GET,SET at -P 1 and -P 32, 50 clients
    .venv/bin/python bench/resp_proxy.py -n 200000 -P 1,16,64 --tests get,set,incr
    .venv/bin/python bench/resp_proxy.py --profile /tmp/proxy.prof   # cProfile the proxy
    .venv/bin/python bench/resp_proxy.py --metrics prometheus        # with metrics on

Not a test: nothing here runs in the test suite.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import datetime as dt
import io
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "protos")]

DB = "bench-redis"
PASSWORD = "bench-Pa55word-not-secret"
STEP_TIMEOUT = 90.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cpu_seconds(pid: int) -> tuple[float, float]:
    """(user, system) CPU time of a live process."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        tck = os.sysconf("SC_CLK_TCK")
        return int(fields[11]) / tck, int(fields[12]) / tck
    except (OSError, IndexError, ValueError):
        return 0.0, 0.0


def _peak_rss_kib(pid: int) -> int:
    """VmHWM (peak resident set) of a live process, in KiB (0 if unknown)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


# --------------------------------------------------------------------------------------------
# Certificates


def make_pki(d: Path) -> None:
    from cachegate.types.v1 import types_pb2
    from services.common import pki

    user_ca = pki.CertAuthority.create("bench user CA", "cachegate-bench")
    server_ca = pki.CertAuthority.create("bench server CA", "cachegate-bench")
    (d / "user-ca.pem").write_bytes(user_ca.cert_pem)
    (d / "server-ca.pem").write_bytes(server_ca.cert_pem)
    for name in ("redis", "proxy"):
        key = pki.new_key()
        ident = types_pb2.Identity(kind=types_pb2.IDENTITY_KIND_HOST, name=name)
        cert = server_ca.sign(key.public_key(), name, ident, dt.timedelta(days=1),
                              ips=["127.0.0.1"], dns_names=["localhost"], server=True)
        (d / f"{name}.crt").write_bytes(pki.cert_to_pem(cert))
        (d / f"{name}.key").write_bytes(pki.key_to_pem(key))
    key = pki.new_key()
    ident = types_pb2.Identity(
        kind=types_pb2.IDENTITY_KIND_USER, name="bench", roles=["access"], db_users=["default"],
        db_names=["0"],
        route=types_pb2.RouteToDatabase(service_name=DB, protocol="redis", db_user="default"),
    )
    cert = user_ca.sign(key.public_key(), "bench", ident, dt.timedelta(hours=2))
    (d / "user.crt").write_bytes(pki.cert_to_pem(cert))
    (d / "user.key").write_bytes(pki.key_to_pem(key))


# --------------------------------------------------------------------------------------------
# The proxy (child process)


def serve_proxy(d: Path, redis_port: int, metrics: str, profile: str, audit_mode: str,
                gc_tuned: bool = False) -> None:
    """Run the data plane until SIGTERM; print "PORT n" when listening and a JSON line of
    audit statistics at the end."""
    import uvloop

    from cachegate.auth.v1 import audit_service_pb2
    from services.common.config import TelemetryConfig
    from services.common.identity import identity_from_cert
    from services.common.rbac import BUILTIN_ROLES, RoleSet
    from services.dbproxy.auditspool import AuditSpool
    from services.dbproxy.limits import ProxyLimits
    from services.dbproxy.listener import RespListener
    from services.dbproxy.session import SessionContext
    from services.dbproxy.upstream import StaticCredentials, UpstreamTarget

    if metrics != "off":
        from services.common import telemetry

        telemetry.setup_metrics("dbproxy", TelemetryConfig(
            metrics=metrics, prometheus_listen_addr=f"127.0.0.1:{_free_port()}"))

    from services.dbproxy.limits import tune_malloc

    tune_malloc()  # as run_dbproxy does
    stats = {"batches": 0, "events": 0, "query_events": 0, "bytes": 0}
    upstream_ssl = ssl.create_default_context(cafile=str(d / "server-ca.pem"))
    creds = StaticCredentials(None, PASSWORD)

    async def send(batch) -> None:
        # What the real sink does: one EmitAuditEvents request per batch, serialized on the
        # loop by grpc.aio (or, "encoded", already serialized), then the round trip to auth.
        if audit_mode == "encoded":
            data = batch
        else:
            data = audit_service_pb2.EmitAuditEventsRequest(events=batch).SerializeToString()
        # Counted from the bytes (type is field 2), not to load the proxy with the count.
        queries = data.count(b"\x12\x10db.session.query")
        stats["batches"] += 1
        stats["events"] += queries + data.count(b"\x12\x10db.session.start") + data.count(b"\x12\x0edb.session.end")
        stats["query_events"] += queries
        stats["bytes"] += len(data)
        await asyncio.sleep(0.002)

    async def authorize(cert, peer) -> SessionContext:
        ident = identity_from_cert(cert)
        roles = RoleSet([BUILTIN_ROLES[r] for r in ident.roles if r in BUILTIN_ROLES],
                        {"db_users": list(ident.db_users), "db_names": list(ident.db_names)})
        return SessionContext(
            user=ident.name, database=DB, db_user=ident.route.db_user, db_name=ident.route.db_name,
            roles=roles, db_labels={"env": "bench"},
            target=UpstreamTarget(DB, "127.0.0.1", redis_port, upstream_ssl), credentials=creds)

    import gc

    gc_time = [0.0, 0.0, 0.0]
    gc_start = [0.0]

    def gc_timer(phase: str, info: dict) -> None:
        if phase == "start":
            gc_start[0] = time.perf_counter()
        else:
            gc_time[info["generation"]] += time.perf_counter() - gc_start[0]

    gc.callbacks.append(gc_timer)

    async def main() -> None:
        spool = AuditSpool(send, d / "spool", encoded=audit_mode == "encoded")
        await spool.start()
        listener = RespListener(
            authorize, spool, cert_pem=(d / "proxy.crt").read_bytes(),
            key_pem=(d / "proxy.key").read_bytes(), client_ca_pem=(d / "user-ca.pem").read_bytes(),
            limits=ProxyLimits(sessions_per_user=1024))
        port = await listener.start()
        from services.dbproxy.limits import MallocTrimmer

        MallocTrimmer(lambda: listener.ended).start()  # as DataPlane does
        if gc_tuned:  # what the lead's run_dbproxy may do after start-up
            gc.freeze()
            gc.set_threshold(20_000, 20, 20)
        print(f"PORT {port}", flush=True)
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        await stop.wait()
        await listener.close(2)
        await spool.close(10)
        stats.update(sent=spool.sent, spooled=spool.spooled, lost=spool.lost,
                     peak_rss_kib=_peak_rss_kib(os.getpid()), gc=gc.get_stats(), gc_seconds=gc_time)
        print("STATS " + json.dumps(stats), flush=True)

    if profile:
        import cProfile

        prof = cProfile.Profile()
        prof.enable()
        try:
            uvloop.run(main())
        finally:
            prof.disable()
            prof.dump_stats(profile)
    else:
        uvloop.run(main())


# --------------------------------------------------------------------------------------------
# The driver


def start_redis(d: Path) -> tuple[subprocess.Popen, int]:
    port = _free_port()
    proc = subprocess.Popen(
        ["redis-server", "--port", "0", "--bind", "127.0.0.1", "--tls-port", str(port),
         "--tls-cert-file", str(d / "redis.crt"), "--tls-key-file", str(d / "redis.key"),
         "--tls-ca-cert-file", str(d / "server-ca.pem"), "--tls-auth-clients", "no",
         "--requirepass", PASSWORD, "--save", "", "--appendonly", "no", "--dir", str(d),
         "--maxclients", "1000"],
        stdout=open(d / "redis.log", "wb"), stderr=subprocess.STDOUT,  # noqa: SIM115
    )
    deadline = time.monotonic() + 15
    while True:
        r = subprocess.run(["redis-cli", "-p", str(port), "--tls", "--cacert", str(d / "server-ca.pem"),
                            "--no-auth-warning", "-a", PASSWORD, "PING"], capture_output=True, text=True)
        if r.stdout.strip() == "PONG":
            return proc, port
        if time.monotonic() > deadline or proc.poll() is not None:
            proc.kill()
            raise SystemExit("redis-server did not start: " + (d / "redis.log").read_text()[-2000:])
        time.sleep(0.05)


def start_proxy(d: Path, redis_port: int, metrics: str, profile: str,
                audit_mode: str, gc_tuned: bool) -> tuple[subprocess.Popen, int]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--serve-proxy", str(d), str(redis_port),
           "--metrics", metrics, "--audit-mode", audit_mode] + (["--gc-tuned"] if gc_tuned else [])
    if profile:
        cmd += ["--profile", profile]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith("PORT "):
            return proc, int(line.split()[1])
    proc.kill()
    raise SystemExit("the proxy did not start")


def benchmark(d: Path, port: int, tests: str, n: int, clients: int, pipeline: int,
              direct: bool) -> dict[str, dict[str, float]]:
    cmd = ["redis-benchmark", "-h", "127.0.0.1", "-p", str(port), "--tls", "--cacert",
           str(d / "server-ca.pem"), "-c", str(clients), "-n", str(n), "-P", str(pipeline),
           "-t", tests, "--csv", "--precision", "3"]
    if direct:
        cmd += ["-a", PASSWORD]
    else:
        cmd += ["--cert", str(d / "user.crt"), "--key", str(d / "user.key")]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=STEP_TIMEOUT)
    if r.returncode != 0:
        raise SystemExit(f"redis-benchmark failed ({r.returncode}): {r.stderr.strip()[-500:]}")
    out = {}
    for row in csv.DictReader(io.StringIO(r.stdout)):
        out[row["test"]] = {k: float(v) for k, v in row.items() if k != "test"}
    if not out:
        raise SystemExit(f"no results from redis-benchmark: {r.stdout[-300:]} {r.stderr[-300:]}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-n", "--requests", type=int, default=100_000, help="requests per test (default 100000)")
    ap.add_argument("-c", "--clients", type=int, default=50)
    ap.add_argument("-P", "--pipelines", default="1,32", help="comma-separated pipeline depths")
    ap.add_argument("--tests", default="get,set", help="redis-benchmark -t (default get,set)")
    ap.add_argument("--metrics", default="off", choices=["off", "console", "prometheus"],
                    help="the proxy's metrics exporter (default off)")
    ap.add_argument("--audit-mode", default="encoded", choices=["encoded", "list"],
                    help="how batches reach the sink: serialized request bytes (AuditSpool(encoded=True)) "
                         "or a list of AuditEvent (default encoded)")
    ap.add_argument("--gc-tuned", action="store_true",
                    help="gc.freeze() after start-up and gc.set_threshold(20000, 20, 20) in the proxy")
    ap.add_argument("--profile", default="", help="write a cProfile of the proxy to this file")
    ap.add_argument("--py-spy", default="", help="record the proxy with py-spy --native (raw stacks) here")
    ap.add_argument("--json", action="store_true", help="print the results as JSON too")
    ap.add_argument("--serve-proxy", nargs=2, metavar=("DIR", "REDIS_PORT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve_proxy:
        serve_proxy(Path(args.serve_proxy[0]), int(args.serve_proxy[1]), args.metrics, args.profile,
                    args.audit_mode, args.gc_tuned)
        return
    for tool in ("redis-server", "redis-benchmark", "redis-cli"):
        if not shutil.which(tool):
            raise SystemExit(f"{tool} is not on PATH")
    pipelines = [int(p) for p in args.pipelines.split(",") if p]
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="cachegate-bench-") as tmp:
        d = Path(tmp)
        make_pki(d)
        redis, redis_port = start_redis(d)
        proxy = None
        try:
            proxy, proxy_port = start_proxy(d, redis_port, args.metrics, args.profile, args.audit_mode,
                                            args.gc_tuned)
            spy = None
            if args.py_spy:  # sampled native stacks of the proxy, collapsed ("raw") format
                exe = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
                spy = subprocess.Popen([exe, "record", "--pid", str(proxy.pid), "--native", "--format", "raw",
                                        "-r", "200", "-o", args.py_spy], stdout=subprocess.DEVNULL)
                time.sleep(1)
            results = []
            for p in pipelines:
                for test in [t for t in args.tests.split(",") if t]:
                    direct = benchmark(d, redis_port, test, args.requests, args.clients, p, True)
                    cpu = _cpu_seconds(proxy.pid)
                    via = benchmark(d, proxy_port, test, args.requests, args.clients, p, False)
                    after = _cpu_seconds(proxy.pid)
                    for name in direct:
                        if name in via:
                            via[name]["cpu_us"] = (sum(after) - sum(cpu)) / args.requests * 1e6
                            via[name]["user_us"] = (after[0] - cpu[0]) / args.requests * 1e6
                            results.append((p, name, direct[name], via[name]))
            if spy is not None:
                spy.send_signal(signal.SIGINT)
                spy.wait(30)
            proxy_rss = _peak_rss_kib(proxy.pid)
            redis_rss = _peak_rss_kib(redis.pid)
            proxy.send_signal(signal.SIGTERM)
            out, _ = proxy.communicate(timeout=30)
            stats = {}
            for line in out.splitlines():
                if line.startswith("STATS "):
                    stats = json.loads(line[6:])
        finally:
            for proc in (proxy, redis):
                if proc is not None and proc.poll() is None:
                    proc.terminate()
                    try:
                        proc.wait(10)
                    except subprocess.TimeoutExpired:
                        proc.kill()

    print(f"redis-benchmark -c {args.clients} -n {args.requests} over TLS; proxy audit ON "
          f"({args.audit_mode} batches), metrics {args.metrics}{', gc tuned' if args.gc_tuned else ''}; "
          f"{os.cpu_count()} CPUs")
    head = f"{'test':<6}{'-P':>4}{'direct rps':>13}{'proxy rps':>12}{'ratio':>8}" \
           f"{'p50 direct':>12}{'p50 proxy':>11}{'p99 direct':>12}{'p99 proxy':>11}{'proxy CPU/req (user)':>22}"
    print(head)
    print("-" * len(head))
    for p, test, a, b in results:
        print(f"{test:<6}{p:>4}{a['rps']:>13,.0f}{b['rps']:>12,.0f}{b['rps'] / a['rps']:>8.2f}"
              f"{a['p50_latency_ms']:>10.3f}ms{b['p50_latency_ms']:>9.3f}ms"
              f"{a['p99_latency_ms']:>10.3f}ms{b['p99_latency_ms']:>9.3f}ms{b['cpu_us']:>12.1f}us ({b['user_us']:.1f}us)")
    print(f"peak RSS: proxy {proxy_rss / 1024:.1f} MiB, redis-server {redis_rss / 1024:.1f} MiB "
          f"(ratio {proxy_rss / max(redis_rss, 1):.1f})")
    if stats:
        print(f"audit: {stats['query_events']:,} query events in {stats['batches']:,} batches "
              f"({stats['bytes'] / max(stats['events'], 1):.0f} bytes/event); "
              f"spooled {stats['spooled']}, lost {stats['lost']}")
    if stats.get("gc"):
        print("proxy gc collections by generation: "
              + ", ".join(f"{g['collections']} ({t:.2f}s)" for g, t in zip(stats["gc"], stats["gc_seconds"])))
    print(f"took {time.monotonic() - started:.1f}s")
    if args.json:
        print(json.dumps({"results": [{"pipeline": p, "test": t, "direct": a, "proxy": b}
                                      for p, t, a, b in results],
                          "proxy_peak_rss_kib": proxy_rss, "redis_peak_rss_kib": redis_rss,
                          "audit": stats}))


if __name__ == "__main__":
    main()
