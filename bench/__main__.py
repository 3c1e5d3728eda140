"""Cachegate against stunnel and direct TLS Redis, in one run on one machine.

    python -m bench --quick      # about two minutes
    python -m bench              # the full run (three interleaved rounds, longer steps)
    python -m bench --smoke      # seconds: checks that every part works; figures mean nothing

Starts a TLS redis-server with a password, stunnel4 (mutual TLS in, TLS to Redis), and the
real cluster (auth and dbproxy processes, a user logged in with `cgate login`, a database
certificate from `cgate db login`, audit ON and delivered to auth). Then, interleaved:

- redis-benchmark GET and SET, 50 clients, -P 1 and -P 16, against direct TLS, stunnel, a
  plain TLS relay on uvloop (bench/relay.py: no parsing, RBAC nor audit, the floor of a
  Python data plane) and Cachegate; a probe session measures the longest stall while
  Cachegate is loaded;
- new sessions per second (TLS handshake, AUTH or the proxy's RBAC + upstream TLS + AUTH,
  first PING) against each;
- RSS of the dbproxy process per idle session at 1,000 and 5,000 sessions;
- audit events per second that auth stores, with SQLite and with PostgreSQL, sent as
  EmitAuditEvents batches over the mesh with a dbproxy host identity;
- 2 dbproxy workers against 1, when the config has a `workers` option.

Prints a table, then (last line) one JSON object with every figure.
See docs/performance.md.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import infra
from bench.infra import ROOT, BenchError

TARGETS = ("direct_tls", "stunnel", "relay", "cachegate")
TESTS = ("get", "set")
STEP_TIMEOUT = 300.0
SETTLE_LIMIT = 30.0  # seconds a step waits at most for the audit spilled by the one before

MODES = {
    # rounds: interleaved rounds of redis-benchmark (the median is kept); step_s: seconds each
    # redis-benchmark test should last (-n is sized from a short calibration run per target,
    # within n_min..n_max); sess_s: seconds of new sessions per target; idle: idle session
    # counts, opened within idle_s; audit_s: seconds of audit ingest per backend. n_test: the
    # fewest requests a measured test sends (the method: 60,000), so that the 50
    # clients' connection set-up (its own figure: new sessions per second) is a small part of
    # it; a 3 s test of a target that sets connections up slowly would mostly measure that.
    "smoke": dict(rounds=1, step_s=0.5, n_min=1_000, n_test=1_000, n_max=10_000, sess_s=1.0, idle="50,100", idle_s=20.0,
                  audit_s=1.0, settle=0.5, idle_cpu_s=1.0),
    "quick": dict(rounds=1, step_s=3.0, n_min=2_000, n_test=20_000, n_max=1_000_000, sess_s=3.0, idle="1000,5000",
                  idle_s=45.0, audit_s=3.0, settle=2.0, idle_cpu_s=5.0),
    "full": dict(rounds=3, step_s=15.0, n_min=10_000, n_test=60_000, n_max=5_000_000, sess_s=15.0, idle="1000,5000",
                 idle_s=400.0, audit_s=15.0, settle=3.0, idle_cpu_s=15.0),
}


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------
# Targets: how each one is reached


class Target:
    def __init__(self, name: str, port: int, ca: str, cert: str = "", key: str = "", password: bool = False):
        self.name, self.port, self.ca, self.cert, self.key, self.password = name, port, ca, cert, key, password

    def tls_args(self) -> list[str]:
        out = ["--tls", "--cacert", self.ca]
        if self.cert:
            out += ["--cert", self.cert, "--key", self.key]
        return out

    def client_args(self) -> list[str]:
        out = ["--port", str(self.port), "--ca", self.ca]
        if self.cert:
            out += ["--cert", self.cert, "--key", self.key]
        if self.password:
            out += ["--password-env", "REDISCLI_AUTH"]
        return out


def child_env() -> dict:
    # The load clients read the password from this variable, not from their command line.
    return infra.py_env(REDISCLI_AUTH=infra.REDIS_PASSWORD)


def redis_benchmark(t: Target, pipeline: int, n: int, clients: int) -> dict[str, dict[str, float]]:
    cmd = ["redis-benchmark", "-h", "127.0.0.1", "-p", str(t.port), *t.tls_args(), "-c", str(clients),
           "-n", str(n), "-P", str(pipeline), "-t", ",".join(TESTS), "--csv", "--precision", "3"]
    if t.password:  # redis-benchmark 7.0 does not read REDISCLI_AUTH; the password is never printed
        cmd += ["-a", infra.REDIS_PASSWORD]
    env = {k: v for k, v in child_env().items() if k != "REDISCLI_AUTH"}
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=STEP_TIMEOUT, env=env, check=False)
    except subprocess.TimeoutExpired:
        raise BenchError(f"redis-benchmark against {t.name} took longer than {STEP_TIMEOUT:.0f}s") from None
    out = {}
    for row in csv.DictReader(io.StringIO(r.stdout)):
        with_values = {k: float(v) for k, v in row.items() if k != "test" and v not in (None, "")}
        out[row["test"].lower()] = with_values
    if r.returncode != 0 or set(out) != set(TESTS):
        raise BenchError(f"redis-benchmark against {t.name} failed ({r.returncode}): "
                         f"{(r.stderr or r.stdout).strip()[-300:]}")
    return out


def settle_audit(cg: infra.Cachegate, limit: float) -> float:
    """Wait until no dbproxy of ``cg`` has audit batches on disk (what a -P 16 run spilled
    while auth, on the same CPUs, fell behind is still being sent): the next measurement
    would share the CPUs with that delivery. Returns the seconds waited (at most ``limit``)."""
    start = time.monotonic()
    while time.monotonic() - start < limit:
        if not any(cg.d.glob("*-data/dbproxy/audit-spool/**/*.batch")):
            break
        time.sleep(0.2)
    return time.monotonic() - start


def client(what: str, *args: str, timeout: float) -> dict:
    cmd = [sys.executable, "-m", "bench.clients", what, *args]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=child_env(),
                           check=False)
    except subprocess.TimeoutExpired:
        raise BenchError(f"the {what} client took longer than {timeout:.0f}s") from None
    lines = r.stdout.strip().splitlines()
    if r.returncode != 0 or not lines:
        raise BenchError(f"the {what} client failed ({r.returncode}): {r.stderr.strip()[-400:]}")
    return json.loads(lines[-1])


class Probe:
    """A session through Cachegate sending PING after PING while the proxy is loaded."""

    def __init__(self, t: Target, limit: float):
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bench.clients", "probe", *t.client_args(), "--duration", str(limit),
             "--interval", "0.005"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
            env=child_env())
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if line.strip() != "READY":
            self.proc.kill()
            raise BenchError(f"the stall probe did not start: {self.proc.stderr.read()[-300:] if self.proc.stderr else ''}")

    def finish(self) -> dict:
        self.proc.terminate()
        out, err = self.proc.communicate(timeout=30)
        if self.proc.returncode != 0 or not out.strip():
            raise BenchError(f"the stall probe failed: {err.strip()[-300:]}")
        return json.loads(out.strip().splitlines()[-1])


# --------------------------------------------------------------------------------------------


def machine() -> dict:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass

    def version(cmd: list[str], starts: str) -> str:
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=10, check=False)
        except (OSError, subprocess.TimeoutExpired):
            return ""
        lines = [ln.strip() for ln in (r.stdout + r.stderr).splitlines() if ln.strip().startswith(starts)]
        return lines[0][:100] if lines else ""

    return {"cpus": os.cpu_count(), "cpu_model": model, "kernel": platform.release(),
            "python": platform.python_version(), "load_avg_at_start": [round(x, 2) for x in os.getloadavg()],
            "mem_total_mib": int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**20),
            "redis_server": version(["redis-server", "--version"], "Redis server"),
            "stunnel": version(["stunnel4", "-version"], "stunnel")}


def preflight() -> None:
    infra.need("redis-server", "Debian package redis-server")
    infra.need("redis-cli", "Debian package redis-tools")
    infra.need("redis-benchmark", "Debian package redis-tools")
    infra.need("stunnel4", "Debian package stunnel4")
    infra.pg_bindir()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:  # children (dbproxy, the idle client) inherit it
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def workers_supported() -> bool:
    from services.common.config import Config

    try:
        Config.model_validate({"version": "v1", "dbproxy_service": {"enabled": True, "workers": 2}})
    except Exception:  # noqa: BLE001 - pydantic refuses an unknown key
        return False
    return True


def mean(xs) -> float:
    xs = list(xs)
    return sum(xs) / len(xs) if xs else 0.0


def ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a is not None and b else None


def run(mode: str, clients_n: int, workers: int = 1) -> dict:
    cfg = MODES[mode]
    started = time.monotonic()
    preflight()
    info = machine()
    results: dict = {"mode": mode, "machine": info}
    notes: list[str] = []
    with tempfile.TemporaryDirectory(prefix="cachegate-bench-") as tmp:
        d = Path(tmp)
        d.chmod(0o755)
        parts: list = []
        try:
            log("certificates, redis-server, stunnel4, the plain relay")
            infra.make_pki(d)
            redis = infra.Redis(d).start()
            parts.append(redis)
            stunnel = infra.Stunnel(d, redis.port).start()
            parts.append(stunnel)
            relay = infra.Relay(d, redis.port).start()
            parts.append(relay)
            log("Cachegate: auth (SQLite), dbproxy, a user and its database certificate")
            cg = infra.Cachegate(d)
            parts.append(cg)
            cg.start_auth()
            idle_max = max(int(c) for c in cfg["idle"].split(","))
            proxy = cg.start_proxy(sessions_per_user=idle_max + 200, workers=workers if workers != 1 else None)
            results["workers_setting"] = workers
            cg.register_redis(redis.port)
            dbcfg = cg.login_user(proxy)
            ca = str(d / "ca.pem")
            targets = {
                "direct_tls": Target("direct_tls", redis.port, ca, password=True),
                "stunnel": Target("stunnel", stunnel.port, ca, str(d / "client.crt"), str(d / "client.key"),
                                  password=True),
                "relay": Target("relay", relay.port, ca, str(d / "client.crt"), str(d / "client.key"), password=True),
                "cachegate": Target("cachegate", int(dbcfg["port"]), dbcfg["ca"], dbcfg["cert"], dbcfg["key"]),
            }
            # Each target answers before anything is measured.
            for t in targets.values():
                client("sessions", *t.client_args(), "--duration", "5", "--max", "1", "--concurrency", "1",
                       timeout=30)

            # --- idle sessions (first, while the proxy's memory has not grown under load) ---
            log(f"idle sessions through Cachegate: {cfg['idle']}")
            # A session of its own waits for replies meanwhile: the longest wait while thousands
            # of sessions open, sit idle and close at once (a client's pool starting or going).
            probe = Probe(targets["cachegate"], STEP_TIMEOUT + cfg["idle_s"])
            idle = client("idle", *targets["cachegate"].client_args(), "--counts", cfg["idle"], "--pid",
                          str(proxy.pid), "--concurrency", "32", "--settle", str(cfg["settle"]),
                          "--duration", str(cfg["idle_s"]), "--cpu-window", str(cfg["idle_cpu_s"]),
                          timeout=cfg["idle_s"] + 120 + 2 * cfg["idle_cpu_s"])
            time.sleep(2)  # a wait the closing caused ends, and is counted
            idle["stall_probe"] = probe.finish()
            results["idle"] = idle
            if idle["errors"]:
                notes.append(f"idle sessions: {idle['errors']} failed, first: {idle['first_error']}")
            for lv in idle["levels"]:
                if lv["sessions"] < lv["wanted"]:
                    notes.append(f"idle sessions: {lv['sessions']} of {lv['wanted']} opened within "
                                 f"{cfg['idle_s']:.0f}s; the RSS figure is at {lv['sessions']}")
            per_idle = {lv["sessions"]: lv["kib_per_session"] for lv in idle["levels"]}
            # What one more idle session costs: the CPU between the two levels, so that what the
            # stall probe's session (a PING every 5 ms) costs counts in neither. Only with levels
            # 1,000 sessions apart or more (not --smoke's 50 and 100: /proc counts 10 ms ticks).
            lv = [x for x in idle["levels"] if "cpu_s_per_s" in x]
            idle_cpu = (round((lv[-1]["cpu_s_per_s"] - lv[0]["cpu_s_per_s"])
                              / (lv[-1]["sessions"] - lv[0]["sessions"]) * 1e6, 2)
                        if len(lv) > 1 and lv[-1]["sessions"] - lv[0]["sessions"] >= 1000 else None)

            # --- throughput and latency, interleaved -----------------------------------------
            # A short run per target and depth warms it up and sizes -n so that each test
            # lasts about step_s seconds (the same time, not the same count, for each target).
            sizes: dict = {}
            for p in (1, 16):
                floor = cfg["n_min"] * (8 if p == 16 else 1)  # enough pipelines per client at -P 16
                for name in TARGETS:
                    log(f"calibration: redis-benchmark -P {p} -n {floor} against {name}")
                    cal = redis_benchmark(targets[name], p, floor, clients_n)
                    rate = mean(r["rps"] for r in cal.values())
                    sizes[(name, p)] = int(min(max(rate * cfg["step_s"], floor, cfg["n_test"]), cfg["n_max"]))
            results["requests_per_test"] = {f"{name}_p{p}": n for (name, p), n in sizes.items()}
            tput: dict = {}  # (target, P, test) -> list of rows
            settled: list[float] = []  # seconds waited for spilled audit before each step
            stalls: list[dict] = []
            for rnd in range(cfg["rounds"]):
                for p in (1, 16):
                    for name in TARGETS:
                        n = sizes[(name, p)]
                        log(f"round {rnd + 1}/{cfg['rounds']}: redis-benchmark -P {p} -n {n} against {name}")
                        settled.append(settle_audit(cg, SETTLE_LIMIT))
                        probe = Probe(targets[name], STEP_TIMEOUT) if name == "cachegate" else None
                        rows = redis_benchmark(targets[name], p, n, clients_n)
                        if probe:
                            stalls.append(probe.finish())
                        for test, row in rows.items():
                            tput.setdefault((name, p, test), []).append(row)

            def fig(name: str, p: int, test: str, key: str) -> float:
                return statistics.median(r[key] for r in tput[(name, p, test)])

            table = {f"{name}_p{p}_{test}": {k: fig(name, p, test, k) for k in
                                             ("rps", "p50_latency_ms", "p99_latency_ms")}
                     for name in TARGETS for p in (1, 16) for test in TESTS}
            rps = {(name, p): mean(fig(name, p, t, "rps") for t in TESTS) for name in TARGETS for p in (1, 16)}
            p50 = {name: mean(fig(name, 1, t, "p50_latency_ms") for t in TESTS) for name in TARGETS}
            p99 = {name: max(fig(name, 1, t, "p99_latency_ms") for t in TESTS) for name in TARGETS}
            results["throughput"] = table

            # --- new sessions per second ------------------------------------------------------
            sess: dict = {}
            for name in TARGETS:
                log(f"new sessions for {cfg['sess_s']:.0f}s against {name}")
                probe = Probe(targets[name], STEP_TIMEOUT) if name == "cachegate" else None
                sess[name] = client("sessions", *targets[name].client_args(), "--duration", str(cfg["sess_s"]),
                                    "--max", "200000", "--concurrency", "16", timeout=cfg["sess_s"] + 120)
                if probe:
                    stalls.append(probe.finish())
                if sess[name]["errors"]:
                    notes.append(f"{name} sessions: {sess[name]['errors']} failed, first: {sess[name]['first_error']}")
            results["sessions"] = sess

            # --- audit events per second that auth stores --------------------------------------
            audit: dict = {}
            log(f"audit events into auth (SQLite) for {cfg['audit_s']:.0f}s")
            audit["sqlite"] = audit_blast(cg, d, cfg["audit_s"])
            log("PostgreSQL and a second auth on it")
            pg = infra.PgServer(d).start()
            parts.append(pg)
            cg_pg = infra.Cachegate(d, "cgpg")
            parts.append(cg_pg)
            cg_pg.start_auth(pg_dsn=pg.dsn())
            log(f"audit events into auth (PostgreSQL) for {cfg['audit_s']:.0f}s")
            audit["postgres"] = audit_blast(cg_pg, d, cfg["audit_s"])
            results["audit"] = audit
            for k, v in audit.items():
                if v["errors"]:
                    notes.append(f"audit {k}: {v['errors']} batches failed, first: {v['first_error']}")

            # --- workers ----------------------------------------------------------------------
            w_ratio = None
            if workers_supported():
                log("dbproxy with workers: 2 against workers: 1 at -P 16")
                proxy2 = cg.start_proxy(sessions_per_user=256, workers=2, tag="dbproxy-w2")
                t2 = Target("cachegate_w2", int(proxy2.info["redis_port"]), dbcfg["ca"], dbcfg["cert"], dbcfg["key"])
                w1, w2 = [], []
                n = sizes[("cachegate", 16)]
                # Warmed up as the first was (its spare connections, its code paths).
                redis_benchmark(t2, 16, cfg["n_min"] * 8, clients_n)
                for _ in range(cfg["rounds"]):
                    settled.append(settle_audit(cg, SETTLE_LIMIT))
                    w1.append(mean(r["rps"] for r in redis_benchmark(targets["cachegate"], 16, n, clients_n).values()))
                    settled.append(settle_audit(cg, SETTLE_LIMIT))
                    w2.append(mean(r["rps"] for r in redis_benchmark(t2, 16, n, clients_n).values()))
                proxy2.stop()
                results["workers"] = {"workers1_rps_p16": statistics.median(w1), "workers2_rps_p16": statistics.median(w2)}
                w_ratio = ratio(statistics.median(w2), statistics.median(w1))
            else:
                results["workers"] = None
                notes.append("workers2_vs_workers1: not supported yet (dbproxy config has no `workers` option)")
            results["audit_settle_s"] = round(sum(settled), 1)

            proxy_rss = infra.rss_kib(proxy.pid)
        finally:
            for part in reversed(parts):
                try:
                    part.stop()
                except BaseException as exc:  # noqa: BLE001 - keep stopping the others
                    log(f"stopping {type(part).__name__}: {exc}")

    stall = max((s["max_stall_s"] for s in stalls), default=None)
    results["stall_probe"] = stalls
    results["proxy_rss_kib_at_end"] = proxy_rss
    summary = {
        "tput_p1_vs_stunnel": ratio(rps[("cachegate", 1)], rps[("stunnel", 1)]),
        "tput_p16_vs_stunnel": ratio(rps[("cachegate", 16)], rps[("stunnel", 16)]),
        "tput_p1_vs_direct_tls": ratio(rps[("cachegate", 1)], rps[("direct_tls", 1)]),
        "tput_p16_vs_direct_tls": ratio(rps[("cachegate", 16)], rps[("direct_tls", 16)]),
        # The plain uvloop relay (bench/relay.py): what a Python data plane with no session
        # logic gives on this machine, and how much of it dbproxy keeps.
        "tput_p1_relay_vs_stunnel": ratio(rps[("relay", 1)], rps[("stunnel", 1)]),
        "tput_p16_relay_vs_stunnel": ratio(rps[("relay", 16)], rps[("stunnel", 16)]),
        "tput_p1_vs_relay": ratio(rps[("cachegate", 1)], rps[("relay", 1)]),
        "tput_p16_vs_relay": ratio(rps[("cachegate", 16)], rps[("relay", 16)]),
        "sessions_per_s_vs_stunnel": ratio(sess["cachegate"]["per_s"], sess["stunnel"]["per_s"]),
        "sessions_per_s_vs_direct_tls": ratio(sess["cachegate"]["per_s"], sess["direct_tls"]["per_s"]),
        "p50_added_ms_vs_stunnel": round(p50["cachegate"] - p50["stunnel"], 3),
        "p50_ms": round(p50["cachegate"], 3),
        "p99_ms": round(p99["cachegate"], 3),
        "max_stall_s": stall,
        # Not under load: while the idle sessions open and then all close at once.
        "idle_max_stall_s": results["idle"]["stall_probe"]["max_stall_s"],
        "rss_kib_per_idle_session": per_idle[max(per_idle)] if per_idle else None,
        "rss_kib_per_idle_session_at": {str(k): v for k, v in per_idle.items()},
        # dbproxy's CPU per idle session and second (between the two idle levels).
        "idle_cpu_us_per_session_s": idle_cpu,
        "audit_events_per_s_sqlite": audit["sqlite"]["per_s"],
        "audit_events_per_s_postgres": audit["postgres"]["per_s"],
        "workers2_vs_workers1": w_ratio,
        "rps": {f"{name}_p{p}": round(v, 1) for (name, p), v in rps.items()},
        "sessions_per_s": {name: s["per_s"] for name, s in sess.items()},
        "session_setup_ms": {name: {"p50": s["p50_ms"], "p99": s["p99_ms"]} for name, s in sess.items()},
    }
    results.update(summary=summary, notes=notes, seconds=round(time.monotonic() - started, 1),
                   settings={**cfg, "clients": clients_n})
    return results


def audit_blast(cg: infra.Cachegate, d: Path, seconds: float) -> dict:
    token_file = d / f"{cg.tag}-audit.token"
    token_file.write_text(cg.token("proxy"))
    token_file.chmod(0o600)
    return client("audit", "--addr", cg.auth_addr, "--join-addr", cg.join_addr, "--token-file", str(token_file),
                  "--ca-pin", cg.ca_pin, "--duration", str(seconds), "--concurrency", "4", "--batch", "500",
                  "--max", "5000000", timeout=seconds + 120)


# --------------------------------------------------------------------------------------------


def print_table(res: dict) -> None:
    m, s = res["machine"], res["summary"]
    print(f"Cachegate benchmark ({res['mode']}): {m['cpus']} CPUs {m['cpu_model']}, {m['mem_total_mib']} MiB, "
          f"Linux {m['kernel']}, Python {m['python']}, load {m['load_avg_at_start']} at start")
    print(f"{m['redis_server']}; {m['stunnel']}; dbproxy workers: {res.get('workers_setting', 1)}")
    print(f"redis-benchmark -c {res['settings']['clients']}, {res['settings']['rounds']} round(s) (median), "
          f"about {res['settings']['step_s']:g}s per test; -n per target: "
          + ", ".join(f"{k} {v:,}" for k, v in res["requests_per_test"].items()))
    print()
    head = f"{'test':<5}{'-P':>4}  " + "".join(f"{t + ' rps':>16}" for t in TARGETS) + \
           f"{'p50 cg/st/dir ms':>24}{'p99 cg ms':>11}"
    print(head)
    print("-" * len(head))
    tp = res["throughput"]
    for p in (1, 16):
        for test in TESTS:
            row = [tp[f"{t}_p{p}_{test}"] for t in TARGETS]
            lat = "/".join(f"{tp[f'{t}_p{p}_{test}']['p50_latency_ms']:.2f}" for t in ("cachegate", "stunnel", "direct_tls"))
            print(f"{test:<5}{p:>4}  " + "".join(f"{r['rps']:>16,.0f}" for r in row) + f"{lat:>24}"
                  f"{tp[f'cachegate_p{p}_{test}']['p99_latency_ms']:>11.2f}")
    print()
    sess = res["sessions"]
    print("new sessions/s:  " + ", ".join(f"{t} {sess[t]['per_s']:,.0f} (setup p50 {sess[t]['p50_ms']:.1f} ms, "
                                          f"p99 {sess[t]['p99_ms']:.1f} ms)" for t in TARGETS))
    idle = res["idle"]
    print(f"idle sessions:   dbproxy RSS {idle['baseline_rss_kib'] / 1024:.1f} MiB before; " + ", ".join(
        f"{lv['sessions']:,} sessions: {lv['rss_kib'] / 1024:.1f} MiB ({lv['kib_per_session']:.1f} KiB each, "
        f"opened in {lv['open_seconds']:.1f}s, {lv.get('cpu_s_per_s', 0):.3f} CPU-s/s idle)" for lv in idle["levels"]))
    a = res["audit"]
    print("audit stored/s:  " + ", ".join(f"{k} {v['per_s']:,.0f} ({v['stored']:,} events in {v['seconds']:.1f}s, "
                                          f"batches of {v['batch']}, {v['concurrency']} in flight)" for k, v in a.items()))
    w = res["workers"]
    print("workers 2 vs 1:  " + ("not supported yet (dbproxy has no `workers` option)" if w is None else
                                 f"{w['workers2_rps_p16']:,.0f} vs {w['workers1_rps_p16']:,.0f} rps at -P 16"))
    print(f"stall probe:     longest wait for a reply {s['max_stall_s']}s; seconds without a reply: "
          f"{sum(p['seconds_without_reply'] for p in res['stall_probe'])}; while the idle sessions opened "
          f"and closed: {s['idle_max_stall_s']}s")
    print()
    targets = [
        ("tput_p1_vs_stunnel", ">= 1.5"), ("tput_p16_vs_stunnel", ">= 1.5"), ("tput_p1_vs_direct_tls", ">= 0.35"),
        ("tput_p16_vs_direct_tls", ""), ("tput_p1_relay_vs_stunnel", "(plain relay)"),
        ("tput_p16_relay_vs_stunnel", "(plain relay)"), ("tput_p1_vs_relay", ""), ("tput_p16_vs_relay", ""),
        ("sessions_per_s_vs_stunnel", ">= 2"),
        ("sessions_per_s_vs_direct_tls", ">= 0.5"), ("p50_added_ms_vs_stunnel", ""), ("p50_ms", ""),
        ("p99_ms", f"<= {4 * s['p50_ms']:.3f} (4x p50)"), ("max_stall_s", "< 0.2"),
        ("rss_kib_per_idle_session", "<= 64"), ("idle_cpu_us_per_session_s", "(dbproxy CPU per idle session)"),
        ("audit_events_per_s_sqlite", ">= 50000"),
        ("audit_events_per_s_postgres", ">= 50000"), ("workers2_vs_workers1", ">= 1.2"),
    ]
    print(f"{'figure':<32}{'value':>14}  target")
    for k, tgt in targets:
        v = s[k]
        shown = "null" if v is None else (f"{v:,.3f}" if isinstance(v, float) else f"{v:,}")
        print(f"{k:<32}{shown:>14}  {tgt}")
    for note in res["notes"]:
        print(f"note: {note}")
    print(f"took {res['seconds']:.0f}s")


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--quick", action="store_true", help="about two minutes: one round, short steps")
    g.add_argument("--smoke", action="store_true", help="seconds: proves every part runs; the figures mean nothing")
    ap.add_argument("-c", "--clients", type=int, default=50, help="redis-benchmark clients (default 50)")
    ap.add_argument("--workers", type=int, default=1,
                    help="dbproxy_service.workers of the measured dbproxy (default 1; 0 = one per CPU); "
                         "RSS is summed over its processes")
    ap.add_argument("--json-out", default="", help="also write the whole result as JSON to this file")
    args = ap.parse_args()
    mode = "quick" if args.quick else "smoke" if args.smoke else "full"
    if not shutil.which("redis-benchmark"):
        raise BenchError("redis-benchmark is not installed (Debian package redis-tools): run make setup")
    res = run(mode, args.clients, args.workers)
    print_table(res)
    line = {**res["summary"], "mode": mode, "machine": res["machine"], "seconds": res["seconds"],
            "details": {k: res[k] for k in ("throughput", "sessions", "idle", "audit", "workers", "stall_probe",
                                            "audit_settle_s", "proxy_rss_kib_at_end", "settings", "requests_per_test",
                                            "notes")}}
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(line, indent=2) + "\n")
    print(json.dumps(line, separators=(",", ":")))


if __name__ == "__main__":
    main()
