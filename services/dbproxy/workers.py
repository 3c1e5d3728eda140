"""Worker processes: one dbproxy on every core (``dbproxy_service.workers``).

The first process (the one started) runs everything: the gRPC and web ports, the RESP port
and the supervision of the others. Each other worker is a child process that serves only
the RESP port, bound to the same port with SO_REUSEPORT so that the kernel spreads new
sessions over all of them. A worker has its own connection to auth (the registry, roles,
users and locks followed live, the same as the first process), its own upstream pool and
its own audit spool (``<audit spool>/worker-N``; what a worker left there is delivered by
the first process the next time it starts).

``cgctl sessions ls`` and ``kill`` see every worker's sessions: the first process asks the
others over a Unix socket in the service's private directory (0700), speaking the
SessionService messages; only the first process audits a termination.

A worker that dies is started again (backoff 1 s doubling to 30 s, logged); on SIGTERM
every worker drains its sessions the same way (the replies of what was sent, then
"reconnect") and the first process waits for them within the grace period.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import signal
import sys
from pathlib import Path

import grpc

from cachegate.dbproxy.v1 import proxy_service_pb2, proxy_service_pb2_grpc

__all__ = ["WorkerSet", "adopt_worker_spools", "worker_count"]

log = logging.getLogger("cachegate.dbproxy.workers")

_READY = "CACHEGATE-WORKER-READY"
_CALLER = "x-cachegate-caller"
_BACKOFF_MAX = 30.0


def worker_count(configured: int) -> int:
    return configured if configured > 0 else max(os.cpu_count() or 1, 1)


def adopt_worker_spools(spool_dir: Path) -> int:
    """Move audit batches that workers left in ``spool_dir/worker-*`` into ``spool_dir`` (before
    any worker starts), so that the first process delivers them; returns how many."""
    moved = 0
    for sub in sorted(spool_dir.glob("worker-*")):
        if not sub.is_dir():
            continue
        for f in sorted(sub.glob("*.batch")):
            os.replace(f, spool_dir / f"{sub.name}-{f.name}")
            moved += 1
    if moved:
        log.info("audit batches left by earlier workers will be delivered", extra={"batches": moved})
    return moved


class _Worker:
    def __init__(self, index: int) -> None:
        self.index = index
        self.proc: asyncio.subprocess.Process | None = None
        self.control = ""
        self.channel: grpc.aio.Channel | None = None
        self.stub: proxy_service_pb2_grpc.SessionServiceStub | None = None


class WorkerSet:
    """The first process's view of the other workers: start, supervise, ask, stop."""

    def __init__(self, cfg, count: int, port: int, folder: Path, spool_dir: Path) -> None:
        self.cfg = cfg
        self.port = port
        self.folder = folder
        self.spool_dir = spool_dir
        self.control_dir = folder / "workers"
        self.workers = [_Worker(i) for i in range(1, count)]
        self._tasks: list[asyncio.Task] = []
        self._stopping = False
        self.restarts = 0
        self._counts: dict[int, int] = {}  # live sessions of each other worker, as last asked

    async def start(self, timeout: float = 60.0) -> None:
        if self.control_dir.exists():
            shutil.rmtree(self.control_dir, ignore_errors=True)
        self.control_dir.mkdir(mode=0o700, parents=True)
        started = await asyncio.gather(*(self._spawn(w, timeout) for w in self.workers), return_exceptions=True)
        for w, res in zip(self.workers, started):
            if isinstance(res, Exception):  # the supervisor tries again, with backoff
                log.error("dbproxy worker could not be started: %s", res, extra={"worker": w.index})
        self._tasks = [asyncio.create_task(self._supervise(w, timeout), name=f"worker-{w.index}")
                       for w in self.workers]
        self._tasks.append(asyncio.create_task(self._count_sessions(), name="worker-sessions"))

    async def _spawn(self, w: _Worker, timeout: float) -> None:
        w.control = str(self.control_dir / f"worker-{w.index}.sock")
        spec = {"config": self.cfg.model_dump(mode="json"), "index": w.index, "port": self.port,
                "control": w.control, "spool_dir": str(self.spool_dir / f"worker-{w.index}")}
        w.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "services.dbproxy.workers",
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            env={**os.environ, "CACHEGATE_WORKER_PARENT": str(os.getpid())})
        assert w.proc.stdin is not None and w.proc.stdout is not None
        w.proc.stdin.write(json.dumps(spec).encode() + b"\n")  # the config travels by pipe only
        await w.proc.stdin.drain()
        w.proc.stdin.close()
        try:
            line = await asyncio.wait_for(w.proc.stdout.readline(), timeout)
        except TimeoutError:
            line = b""
        if not line.startswith(_READY.encode()):
            code = w.proc.returncode
            if code is None:
                w.proc.kill()
                await w.proc.wait()
            raise RuntimeError(f"dbproxy worker {w.index} did not start (exit code {w.proc.returncode}); "
                               "its log lines above say why")
        if w.channel is not None:
            await w.channel.close()
        w.channel = grpc.aio.insecure_channel(f"unix:{w.control}")
        w.stub = proxy_service_pb2_grpc.SessionServiceStub(w.channel)
        log.info("dbproxy worker started", extra={"worker": w.index, "pid": w.proc.pid, "redis_port": self.port})

    async def _supervise(self, w: _Worker, timeout: float) -> None:
        backoff = 1.0
        while True:
            code = await w.proc.wait() if w.proc is not None else None
            if self._stopping:
                return
            log.error("dbproxy worker exited; starting it again", extra={
                "worker": w.index, "exit_code": code, "retry_in_s": backoff})
            await asyncio.sleep(backoff)
            if self._stopping:
                return
            try:
                await self._spawn(w, timeout)
                self.restarts += 1
                backoff = 1.0
            except (RuntimeError, OSError) as exc:
                log.error("dbproxy worker could not be started again: %s", exc, extra={"worker": w.index})
                backoff = min(backoff * 2, _BACKOFF_MAX)

    def session_count(self) -> int:
        """The other workers' live sessions (as counted within the last few seconds)."""
        return sum(self._counts.values())

    async def _count_sessions(self, interval: float = 5.0) -> None:
        while True:
            await asyncio.sleep(interval)
            for w in self.workers:
                try:
                    self._counts[w.index] = len(await self._sessions_of(w))
                except Exception:  # noqa: BLE001 - a worker being restarted: counted next time
                    self._counts[w.index] = 0

    async def sessions(self) -> list[proxy_service_pb2.Session]:
        """Every other worker's live sessions (a worker that does not answer is skipped)."""
        found = await asyncio.gather(*(self._sessions_of(w) for w in self.workers))
        return [s for part in found for s in part]

    async def _sessions_of(self, w: _Worker) -> list[proxy_service_pb2.Session]:
        if w.stub is None or w.proc is None or w.proc.returncode is not None:
            return []
        out, token = [], ""
        try:
            while True:
                resp = await w.stub.ListSessions(
                    proxy_service_pb2.ListSessionsRequest(page_size=1000, page_token=token), timeout=5)
                out += resp.sessions
                token = resp.next_page_token
                if not token:
                    return out
        except grpc.aio.AioRpcError as exc:
            log.warning("dbproxy worker did not list its sessions: %s", exc.code().name, extra={"worker": w.index})
            return out

    async def terminate(self, session_id: str, caller: str) -> bool:
        """End the session ``session_id`` wherever it runs; True if a worker had it."""
        for w in self.workers:
            if w.stub is None:
                continue
            try:
                await w.stub.TerminateSession(proxy_service_pb2.TerminateSessionRequest(id=session_id),
                                              timeout=5, metadata=((_CALLER, caller),))
                return True
            except grpc.aio.AioRpcError as exc:
                if exc.code() != grpc.StatusCode.NOT_FOUND:
                    log.warning("dbproxy worker did not answer: %s", exc.code().name, extra={"worker": w.index})
        return False

    async def stop(self, grace: float) -> None:
        """SIGTERM to every worker (each drains its sessions), then wait; kill what is left."""
        self._stopping = True
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        procs = [w.proc for w in self.workers if w.proc is not None and w.proc.returncode is None]
        for p in procs:
            try:
                p.send_signal(signal.SIGTERM)
            except ProcessLookupError:
                pass
        if procs:
            _, pending = await asyncio.wait([asyncio.create_task(p.wait()) for p in procs], timeout=grace + 5)
            for p in procs:
                if p.returncode is None:
                    log.error("dbproxy worker did not stop in time; killed it", extra={"pid": p.pid})
                    p.kill()
            if pending:
                await asyncio.wait(pending, timeout=5)
        for w in self.workers:
            if w.channel is not None:
                await w.channel.close()
        shutil.rmtree(self.control_dir, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# The worker process


class _ControlServicer(proxy_service_pb2_grpc.SessionServiceServicer):
    """The first process's questions to this worker (over its private Unix socket)."""

    def __init__(self, plane) -> None:
        from services.dbproxy.dataplane import SessionServicer

        self.plane = plane
        self._lister = SessionServicer(plane)

    async def ListSessions(self, request, context):
        return await self._lister.ListSessions(request, context)

    async def TerminateSession(self, request, context):
        caller = dict(context.invocation_metadata() or ()).get(_CALLER, "an administrator")
        n = self.plane.listener.terminate(lambda s: s.ctx.session_id == request.id,
                                          f"an administrator ({caller}) ended it")
        if not n:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no live session {request.id!r}")
        return proxy_service_pb2.TerminateSessionResponse()


async def run_worker(spec: dict) -> None:
    from services.common.authclient import AuthClient
    from services.common.authz import CertVerifier
    from services.common.config import Config
    from services.common.creds import Creds
    from services.common.grpcserver import install_signal_handlers
    from services.common.pki import cert_from_pem
    from services.common.telemetry import setup_metrics, setup_tracing, shutdown
    from services.dbproxy.dataplane import DataPlane

    from services.dbproxy.limits import tune_malloc

    tune_malloc()
    cfg = Config.model_validate(spec["config"])
    index = spec["index"]
    if cfg.telemetry.metrics == "prometheus":  # the port is the first process's
        cfg.telemetry.metrics = "off"
    tracing = setup_tracing("dbproxy", cfg.telemetry)
    setup_metrics("dbproxy", cfg.telemetry)
    folder = cfg.service_dir("dbproxy")
    creds = Creds.load_dir(folder)
    if creds is None:
        raise RuntimeError(f"no host credentials in {folder}: the first dbproxy process joins first")
    verifier = CertVerifier(cert_from_pem(creds.host_ca_pem), cert_from_pem(creds.user_ca_pem))
    auth = AuthClient(cfg.auth_server, creds, tracing)
    pcfg = cfg.dbproxy_service.model_copy(update={"audit_spool_dir": spec["spool_dir"]})
    plane = DataPlane(pcfg, creds, auth, verifier, folder, creds.identity.cluster_name)
    plane.listener.port = spec["port"]
    plane.listener.reuse_port = True
    plane.heartbeat_enabled = False  # the first process reports for the host, these sessions counted in
    stop = asyncio.Event()
    install_signal_handlers(stop)
    control = grpc.aio.server()
    proxy_service_pb2_grpc.add_SessionServiceServicer_to_server(_ControlServicer(plane), control)
    control.add_insecure_port(f"unix:{spec['control']}")
    await control.start()
    os.chmod(spec["control"], 0o600)
    await plane.start()
    log.info("dbproxy worker ready", extra={"worker": index, "redis_port": plane.listener.port})
    print(_READY, flush=True)
    os.dup2(2, 1)  # nobody reads the pipe after this line: anything else goes where stderr goes
    try:
        await stop.wait()
    finally:
        await plane.stop()
        await control.stop(1.0)
        await auth.close()
        shutdown()


def _die_with_parent(parent: int) -> None:
    """SIGTERM (a drain) when the first process dies, even by kill -9: a worker never outlives
    it, so a restarted dbproxy does not find old workers still on its port (Linux)."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # it died before the line above
        os.kill(os.getpid(), signal.SIGTERM)


def main() -> None:
    from services.common.logs import setup_logging

    _die_with_parent(int(os.environ.get("CACHEGATE_WORKER_PARENT", "0")) or os.getppid())
    spec = json.loads(sys.stdin.readline())
    log_cfg = spec["config"].get("log", {})
    setup_logging(f"dbproxy-worker-{spec['index']}", log_cfg.get("level", "info"),
                  log_cfg.get("format", "json"), log_cfg.get("output", ""), route_stderr=True)
    try:
        import uvloop

        uvloop.install()
    except ImportError:  # pragma: no cover
        pass
    asyncio.run(run_worker(spec))


if __name__ == "__main__":
    main()
