"""How each database is doing, as this proxy sees it; the heartbeat that reports it to auth.

:class:`DatabaseHealth` counts, per database, what happened to the proxy's connects:
successes, failures by kind (``unreachable``, ``timeout``, ``tls``, ``auth``,
``credentials``, ``protocol``), the last error (a one-line message without secrets,
as the user was told) and when. Every upstream connect of a session goes through
:meth:`DatabaseHealth.tracked`; so do the pool's spare connections and the checks.

:meth:`DatabaseHealth.check` is `cgctl db check NAME`: TCP, TLS, AUTH and PING, each
step timed, like the guide's ``nc -zv HOST PORT`` from the proxy's side.

:class:`Heartbeat` reports the host (version, sessions, the health of its databases) to
auth every ``interval`` seconds (``ReportProxyStatus``) and, between reports, re-checks
the databases that are down or that sessions used lately, so that a database that went
away (or came back) is noticed without waiting for the next user.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field

import hiredis

from cachegate.auth.v1 import database_service_pb2 as dpb
from cachegate.dbproxy.v1 import proxy_service_pb2
from services.common.background import BackgroundTask
from services.common.grpcutil import dur, ts
from services.dbproxy.resp import encode_command
from services.dbproxy.upstream import (
    CredentialProvider, UpstreamError, UpstreamTarget, _authenticate, _read_replies, _why,
)

log = logging.getLogger("cachegate.dbproxy.health")

__all__ = ["DatabaseHealth", "Heartbeat", "Record"]

OK, DOWN, UNKNOWN = (dpb.DATABASE_HEALTH_STATE_OK, dpb.DATABASE_HEALTH_STATE_DOWN,
                     dpb.DATABASE_HEALTH_STATE_UNSPECIFIED)
# A database used by a session within this long is re-checked by the heartbeat.
RECENT_USE = 600.0
MAX_DATABASES = 10_000  # records kept (the registry's size, bounded)


@dataclass
class Record:
    name: str
    state: int = UNKNOWN
    last_success: float = 0.0
    last_failure: float = 0.0
    last_error: str = ""
    last_error_kind: str = ""
    successes: int = 0
    connect_failures: int = 0
    timeouts: int = 0
    auth_failures: int = 0
    consecutive_failures: int = 0
    last_used: float = 0.0

    def proto(self) -> dpb.DatabaseHealth:
        h = dpb.DatabaseHealth(
            name=self.name, state=self.state, last_error=self.last_error, last_error_kind=self.last_error_kind,
            connect_failures=self.connect_failures, timeouts=self.timeouts, auth_failures=self.auth_failures,
            successes=self.successes, consecutive_failures=self.consecutive_failures)
        if self.last_success:
            h.last_success_time.CopyFrom(ts(self.last_success))
        if self.last_failure:
            h.last_failure_time.CopyFrom(ts(self.last_failure))
        return h


def failure_kind(exc: UpstreamError) -> str:
    if getattr(exc, "timed_out", False):
        return "timeout"
    return exc.reason


@dataclass
class DatabaseHealth:
    """Per-database reachability. ``on_change(name, record)`` is called after each update
    (metrics)."""

    on_change: Callable[[str, Record], None] | None = None
    records: dict[str, Record] = field(default_factory=dict)

    def _rec(self, name: str) -> Record | None:
        rec = self.records.get(name)
        if rec is None:
            if len(self.records) >= MAX_DATABASES:
                return None
            rec = self.records[name] = Record(name)
        return rec

    def success(self, name: str) -> None:
        rec = self._rec(name)
        if rec is None:
            return
        if rec.state == DOWN:
            log.info("database reachable again", extra={"db": name, "after_failures": rec.consecutive_failures})
        rec.state, rec.last_success, rec.consecutive_failures = OK, time.time(), 0
        rec.successes += 1
        self._changed(rec)

    def failure(self, name: str, exc: UpstreamError) -> None:
        kind = failure_kind(exc)
        if kind == "select":  # the database answered: a bad logical db number is the client's
            self.success(name)
            return
        rec = self._rec(name)
        if rec is None:
            return
        if rec.state != DOWN:
            log.warning("database unreachable from this proxy", extra={"db": name, "kind": kind, "error": str(exc)})
        rec.state, rec.last_failure = DOWN, time.time()
        rec.last_error, rec.last_error_kind = str(exc).splitlines()[0][:500] if str(exc) else kind, kind
        rec.consecutive_failures += 1
        if kind == "timeout":
            rec.timeouts += 1
        elif kind in ("auth", "credentials"):
            rec.auth_failures += 1
        else:
            rec.connect_failures += 1
        self._changed(rec)

    def used(self, name: str) -> None:
        rec = self._rec(name)
        if rec is not None:
            rec.last_used = time.monotonic()

    def forget(self, names: Iterable[str]) -> None:
        for n in names:
            self.records.pop(n, None)

    def _changed(self, rec: Record) -> None:
        if self.on_change is not None:
            try:
                self.on_change(rec.name, rec)
            except Exception:  # noqa: BLE001 - metrics never break a connect
                log.debug("health callback failed", exc_info=True)

    def get(self, name: str) -> dpb.DatabaseHealth:
        rec = self.records.get(name)
        return rec.proto() if rec is not None else dpb.DatabaseHealth(name=name)

    def snapshot(self, names: Iterable[str] | None = None) -> list[dpb.DatabaseHealth]:
        keys = sorted(self.records) if names is None else sorted(names)
        return [self.get(n) for n in keys]

    def tracked(self, connect: Callable[..., Awaitable]) -> Callable[..., Awaitable]:
        """``connect`` (``UpstreamPool.get``'s signature) that records what happened."""

        async def wrapper(target: UpstreamTarget, credentials, logical_db: int = 0, **kw):
            self.used(target.name)
            try:
                up = await connect(target, credentials, logical_db, **kw)
            except UpstreamError as exc:
                self.failure(target.name, exc)
                raise
            self.success(target.name)
            return up

        return wrapper

    async def check(self, target: UpstreamTarget, credentials: CredentialProvider, *,
                    timeout: float = 10.0) -> proxy_service_pb2.CheckDatabaseResponse:
        """TCP, TLS, AUTH, PING to ``target``, each step timed; records the outcome."""
        resp = proxy_service_pb2.CheckDatabaseResponse(name=target.name, address=target.address)
        nc = f"nc -zv {target.host} {target.port}"
        where = f'database "{target.name}" at {target.address}'
        writer = None
        step = "tcp"
        t0 = time.monotonic()
        failure: UpstreamError | None = None

        def done(name: str, ok: bool, detail: str = "") -> None:
            nonlocal t0
            now = time.monotonic()
            resp.steps.append(proxy_service_pb2.CheckStep(name=name, ok=ok, duration=dur(now - t0), detail=detail))
            t0 = now

        try:
            async with asyncio.timeout(timeout):
                try:
                    raw = await asyncio.open_connection(target.host, target.port)
                except OSError as exc:
                    raise UpstreamError(f"cannot reach {where} ({_why(exc)}); check that the proxy host can "
                                        f"reach it: {nc}", "unreachable") from None
                reader, writer = raw
                sock = writer.get_extra_info("socket")
                if sock is not None:
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                done("tcp", True, f"connected to {target.address}")
                if target.ssl is not None:
                    step = "tls"
                    try:
                        await writer.start_tls(target.ssl, server_hostname=target.server_hostname or target.host)
                    except ssl.SSLError as exc:
                        raise UpstreamError(f"TLS handshake with {where} failed: {exc.reason or type(exc).__name__}; "
                                            "check the database's CA configuration", "tls") from None
                    except (OSError, ConnectionError) as exc:
                        raise UpstreamError(f"TLS handshake with {where} failed ({_why(exc)}); is this a TLS port? "
                                            f"check the record's tls setting", "tls") from None
                    done("tls", True, str(writer.get_extra_info("ssl_object").version()))
                step = "auth"
                auth_cmd, _ = await _authenticate(reader, writer, target, credentials,
                                                  _noop_tracer(), None)
                done("auth", True, "authenticated" if auth_cmd else "no password configured: AUTH skipped")
                step = "ping"
                writer.write(encode_command("PING"))
                (reply,) = await _read_replies(reader, 1)
                if isinstance(reply, hiredis.ReplyError):
                    raise UpstreamError(f"{where} answered PING with {str(reply).split(' ', 1)[0]}", "protocol")
                done("ping", True, reply.decode() if isinstance(reply, bytes) else str(reply))
        except TimeoutError:
            failure = UpstreamError(f"cannot reach {where} (no answer within {timeout:g}s at the {step} step); "
                                    f"check that the proxy host can reach it: {nc}", "unreachable")
            failure.timed_out = True  # type: ignore[attr-defined]
        except UpstreamError as exc:
            failure = exc
        except (ConnectionError, OSError) as exc:
            failure = UpstreamError(f"the connection to {where} failed at the {step} step ({_why(exc)}); "
                                    f"check it with: {nc}", "unreachable")
        finally:
            if writer is not None:
                writer.close()
        if failure is None:
            resp.ok = True
            self.success(target.name)
        else:
            done(step, False, str(failure))
            self.failure(target.name, failure)
        resp.health.CopyFrom(self.get(target.name))
        return resp


def _noop_tracer():
    from opentelemetry import trace

    return trace.NoOpTracer()


class Heartbeat(BackgroundTask):
    """Reports ``status()`` to auth every ``interval`` seconds and re-checks, in between, the
    databases that are down or were used lately (``probe(name)``)."""

    def __init__(self, report: Callable[[dpb.ProxyStatus], Awaitable], status: Callable[[], dpb.ProxyStatus],
                 health: DatabaseHealth, probe: Callable[[str], Awaitable] | None, interval: float = 10.0):
        self.report, self.status, self.health, self.probe = report, status, health, probe
        self.interval = interval
        self.reports = 0
        self._warned = False

    def start(self) -> None:
        self._start_task(self._run(), "dbproxy-heartbeat")

    def due_probes(self) -> list[str]:
        now = time.monotonic()
        return sorted(n for n, r in self.health.records.items()
                      if r.state == DOWN or (r.last_used and now - r.last_used < RECENT_USE))

    async def once(self) -> None:
        if self.probe is not None:
            names = self.due_probes()
            if names:
                await asyncio.gather(*(self.probe(n) for n in names), return_exceptions=True)
        try:
            await self.report(self.status())
            self.reports += 1
            if self._warned:
                log.info("reporting status to auth again")
            self._warned = False
        except Exception as exc:  # noqa: BLE001 - the heartbeat never stops the proxy
            if not self._warned:
                log.warning("cannot report status to auth: %s", (str(exc).splitlines() or [type(exc).__name__])[0])
            self._warned = True

    async def _run(self) -> None:
        while True:
            await self.once()
            await asyncio.sleep(self.interval)
