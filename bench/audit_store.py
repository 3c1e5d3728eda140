"""Audit ingest benchmark: how many audit events per second auth checks and stores.

    async def measure(backend_kind: str, events: int) -> float

``backend_kind`` is ``"sqlite"`` (a database file in a temporary directory) or
``"postgres"`` (a throw-away PostgreSQL cluster started with initdb/pg_ctl from
/usr/lib/postgresql/*/bin, as the ``postgres`` OS user when run as root, on a free
loopback port, then stopped and deleted). ``events`` is how many events to store, in
batches of 1000 (auth's maximum, what dbproxy sends under load). Returns events per
second of :meth:`services.auth.audit.AuditLog.ingest_serialized` (parse, check and store) over the whole
run, wall clock, one batch after the other. Self-contained: it starts what it needs and removes it afterwards;
nothing is left behind on success or failure. Raises RuntimeError when PostgreSQL's
binaries are not installed.

The events are realistic ``db.session.query`` events built by dbproxy's real encoder
(:class:`services.dbproxy.auditspool.AuditSpool` and its ``QueryStream``, with a
session's base fields, a logical db, a command and its arguments), serialized into
``EmitAuditEventsRequest`` bytes, as auth's gRPC server hands them to
``AuditService.EmitAuditEvents``: what is timed is :meth:`AuditLog.ingest_serialized`
on those bytes (parse, check, store each event's bytes as they came), auth's own path
without gRPC. Every id is distinct, so every event is really inserted.

From the command line (each run is bounded by ``--events``)::

    .venv/bin/python bench/audit_store.py                       # sqlite and postgres, 50000 events
    .venv/bin/python bench/audit_store.py --events 200000 --backends sqlite
    .venv/bin/python bench/audit_store.py --profile /tmp/ingest.prof --backends sqlite
    .venv/bin/python bench/audit_store.py --in-flight 8        # 8 batches at once, as dbproxy may send

It prints events/s for each backend (wall clock), the time per event, and auth's own CPU
time per event (this process: all the work with SQLite, the client side with PostgreSQL,
whose server runs in its own processes). On a shared machine the CPU figure is the steadier
one.

Not a test: nothing here runs in the test suite.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import glob
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
for _p in (str(ROOT / "protos"), str(ROOT)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

from services.auth.audit import MAX_BATCH, AuditLog  # noqa: E402
from services.dbproxy.auditspool import AuditSpool  # noqa: E402
from services.dbproxy.resp import Command  # noqa: E402

__all__ = ["build_requests", "measure"]

BATCH = MAX_BATCH
CLUSTER = "bench"

# A mix of commands a cache sees, with their arguments (an AUTH is redacted by the encoder).
_COMMANDS = [
    [b"GET", b"user:1001:profile"],
    [b"SET", b"session:9f3c2a", b"x" * 120, b"EX", b"3600"],
    [b"HGETALL", b"cart:42"],
    [b"INCR", b"counter:page:/home"],
    [b"MGET", b"k:1", b"k:2", b"k:3", b"k:4"],
    [b"EXPIRE", b"session:9f3c2a", b"600"],
    [b"LPUSH", b"queue:jobs", b'{"job":"resize","id":77}'],
    [b"ZADD", b"leaders", b"1500", b"alice"],
]


def build_requests(events: int, batch: int = BATCH) -> list[bytes]:
    """Serialized ``EmitAuditEventsRequest`` messages of ``batch`` ``db.session.query``
    events each (the last may be shorter), built by dbproxy's encoder, ``events`` in all."""
    spool = AuditSpool(lambda _b: None, tempfile.gettempdir(), cluster_name=CLUSTER,
                       max_batch_events=batch, batch_size=batch, max_queue=events + 1)
    sessions = [spool.query_stream(f"user{i}", f"198.51.100.{i + 1}",
                                   {"session_id": f"5e551011-0000-4000-8000-00000000000{i}",
                                    "db_service": "orders-cache", "db_user": "default"})
                for i in range(8)]
    cmds = [Command(argv, b"", argv[0].decode().upper()) for argv in _COMMANDS]
    out: list[bytes] = []
    left = events
    t = time.time() - 3600
    n = 0
    while left > 0:
        k = min(batch, left)
        for j in range(0, k, 8):
            s = sessions[n % len(sessions)]
            s.commands(t + n * 1e-4, n % 16, cmds[: min(8, k - j)])
            n += 1
        for evs in spool._take():  # the spool's own batching: framed events, ready to send
            out.append(b"".join(evs))
        left -= k
    return out


# --- a throw-away PostgreSQL -------------------------------------------------------------------
def _pg_bindir() -> str | None:
    dirs = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(Path(p).parent.name), reverse=True)
    for d in dirs:
        if os.path.exists(os.path.join(d, "initdb")):
            return d
    found = shutil.which("initdb")
    return os.path.dirname(found) if found else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Postgres:
    """initdb + pg_ctl start in a temporary directory; ``stop`` removes it all. The server
    runs with PostgreSQL's defaults for durability (fsync on, synchronous_commit on), as a
    production auth database would."""

    def __init__(self) -> None:
        bindir = _pg_bindir()
        if bindir is None:
            raise RuntimeError("PostgreSQL server binaries (initdb, pg_ctl) are not installed: "
                               "apt-get install postgresql")
        self.bindir = bindir
        self.root = Path(tempfile.mkdtemp(prefix="cg-bench-pg-"))
        self.data = self.root / "data"
        self.sock = self.root / "sock"
        self.log = self.root / "postgres.log"
        self.port = _free_port()
        self._as_root = os.geteuid() == 0
        self.password = os.urandom(12).hex()

    def _run(self, *cmd: str) -> None:
        full = [os.path.join(self.bindir, cmd[0]), *cmd[1:]]
        if self._as_root:  # PostgreSQL refuses to run as root
            full = ["runuser", "-u", "postgres", "--", *full]
        res = subprocess.run(full, check=False, capture_output=True, text=True, timeout=120)
        if res.returncode:
            log = self.log.read_text(errors="replace")[-2000:] if self.log.exists() else ""
            raise RuntimeError(f"{' '.join(cmd[:2])} failed ({res.returncode}):\n{res.stdout}\n{res.stderr}\n{log}")

    def start(self) -> str:
        self.sock.mkdir()
        pwfile = self.root / "pw"
        pwfile.write_text(self.password + "\n")
        if self._as_root:
            shutil.chown(self.root, "postgres")
            shutil.chown(self.sock, "postgres")
            shutil.chown(pwfile, "postgres")
        self.root.chmod(0o755)
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "-E", "UTF8", "--locale=C",
                  "--auth-local=trust", "--auth-host=scram-sha-256", f"--pwfile={pwfile}")
        opts = f"-p {self.port} -k {self.sock} -c listen_addresses=127.0.0.1"
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-o", opts, "-w", "-t", "60", "start")
        return f"host=127.0.0.1 port={self.port} dbname=postgres user=postgres password={self.password}"

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            if self.data.exists():
                self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")
        shutil.rmtree(self.root, ignore_errors=True)


# --- the measurement ---------------------------------------------------------------------------
async def _ingest_all(log: AuditLog, requests: list[bytes], profile: str | None = None,
                      in_flight: int = 1) -> tuple[float, float, int]:
    prof = None
    if profile:
        import cProfile  # noqa: PLC0415

        prof = cProfile.Profile()
        prof.enable()
    stored = 0
    c0 = time.process_time()
    t0 = time.perf_counter()
    if in_flight <= 1:
        for req in requests:
            # As AuditService.EmitAuditEvents does: the request's bytes as they came.
            stored += await log.ingest_serialized(req)
    else:  # several batches at once, as dbproxy sends them (max_in_flight)
        slots = asyncio.Semaphore(in_flight)

        async def one(req: bytes) -> int:
            async with slots:
                return await log.ingest_serialized(req)

        stored = sum(await asyncio.gather(*(one(r) for r in requests)))
    elapsed = time.perf_counter() - t0
    cpu = time.process_time() - c0
    if prof is not None:
        prof.disable()
        prof.dump_stats(profile)
    return elapsed, cpu, stored


async def _run(backend_kind: str, events: int, profile: str | None = None, in_flight: int = 1) -> tuple[float, float]:
    """(events/s by the wall clock, events/s by this process's CPU time)."""
    if events <= 0:
        raise ValueError("events must be positive")
    if backend_kind not in ("sqlite", "postgres", "postgresql", "pg"):
        raise ValueError(f"unknown backend_kind {backend_kind!r}: use 'sqlite' or 'postgres'")
    requests = build_requests(events)
    tmp = Path(tempfile.mkdtemp(prefix="cg-bench-audit-"))
    pg = None
    backend = None
    try:
        if backend_kind == "sqlite":
            from services.auth.backend import SQLiteBackend  # noqa: PLC0415

            backend = SQLiteBackend(tmp / "auth.db")
        elif backend_kind in ("postgres", "postgresql", "pg"):
            from services.auth.pgbackend import PostgresBackend  # noqa: PLC0415

            pg = _Postgres()
            backend = PostgresBackend(pg.start())
            await backend.start()
        else:
            raise ValueError(f"unknown backend_kind {backend_kind!r}: use 'sqlite' or 'postgres'")
        log = AuditLog(backend, CLUSTER)
        # Warm up (connections, statement caches) with a batch that is not counted.
        await log.ingest_serialized(build_requests(BATCH)[0])
        elapsed, cpu, stored = await _ingest_all(log, requests, profile, in_flight)
        if stored != events:
            raise RuntimeError(f"stored {stored} events of {events}")
        rows = await backend.search_audit(None, None, ["db.session.query"], "", None, events + BATCH + 1)
        if len(rows) != events + BATCH:
            raise RuntimeError(f"found {len(rows)} events stored, expected {events + BATCH}")
        return events / elapsed, events / max(cpu, 1e-9)
    finally:
        if backend is not None:
            with contextlib.suppress(Exception):
                await backend.close()
        if pg is not None:
            pg.stop()
        shutil.rmtree(tmp, ignore_errors=True)


async def measure(backend_kind: str, events: int) -> float:
    """Events per second that auth checks and stores (``AuditLog.ingest_serialized`` of
    1000-event batches) on ``backend_kind`` ("sqlite" or "postgres"); see the module docstring."""
    return (await _run(backend_kind, events))[0]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--events", type=int, default=50_000, help="events per backend (default 50000)")
    ap.add_argument("--backends", default="sqlite,postgres", help="comma-separated: sqlite,postgres")
    ap.add_argument("--in-flight", type=int, default=1,
                    help="batches ingested at once (dbproxy sends up to 8); default 1, as measure() does")
    ap.add_argument("--profile", help="write a cProfile of the timed part to this file (one backend)")
    args = ap.parse_args(argv)
    for kind in [b.strip() for b in args.backends.split(",") if b.strip()]:
        rate, cpu_rate = asyncio.run(_run(kind, args.events, args.profile, args.in_flight))
        print(f"{kind:9s} {args.events:8d} events  {rate:8.0f} events/s  {1e6 / rate:6.1f} us/event (wall)  "
              f"auth CPU {1e6 / cpu_rate:6.1f} us/event ({cpu_rate:.0f} events/s per core)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
