"""One RESP session: a verified client connection relayed to the database.

:class:`Session` takes an accepted (TLS-terminated) client connection and a
:class:`SessionContext` (who, which database, roles, upstream target and
credentials, audit sink), checks expiry, locks and RBAC, connects upstream (the
proxy AUTHs and SELECTs), then relays. It is a thin asyncio shell: every protocol
decision is the sans-io :class:`~services.dbproxy.sessioncore.SessionCore`'s, fed the
bytes of each side; the shell moves bytes between two transports with asyncio
Protocols (no read/drain round trip per chunk), with back-pressure both ways (a side
whose peer cannot keep up is paused with ``pause_reading``).

Bounds: bytes held for incomplete commands come from the listener's shared
:class:`~services.dbproxy.limits.RequestBudget`, and a started command must be complete
within ``request_timeout``; past either the session ends with one error line (nothing of
that command reaches the database).

A watchdog ends the session when the certificate expires (role option
``disconnect_expired_cert``, on by default), after ``client_idle_timeout``, and when
``lock_check`` reports a lock: within about a second while the session is busy, within
``_QUIET_TICK`` seconds once it has been quiet for ``_QUIET_AFTER`` (locks reach live
sessions at once by push, :meth:`Session.terminate`; the poll is the second line).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import math
import random
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from opentelemetry import trace

from services.common.rbac import RoleSet
from services.dbproxy import metrics as dbmetrics
from services.dbproxy.commands import KNOWN_NAMES, audit_args, lookup
from services.dbproxy.limits import ProxyLimits, RequestBudget
from services.dbproxy.metrics import ProxyMetrics
from services.dbproxy.readbuffer import SharedBufferProtocol
from services.dbproxy.resp import Command, encode_command, encode_error
from services.dbproxy.sessioncore import End, SessionCore
from services.dbproxy.upstream import (
    CLEAR_NAME,
    CredentialProvider,
    Upstream,
    UpstreamError,
    UpstreamTarget,
    connect_upstream,
)

__all__ = ["AuditSink", "Session", "SessionContext", "refuse"]

log = logging.getLogger("cachegate.dbproxy.session")

# How long the replies already due may take once the session is ending (QUIT, a
# protocol error), and how long a closing TLS connection may wait for its peer.
_FINISH_TIMEOUT = 2.0
_CLOSE_GRACE = 1.0
# A session that ends over what the client sent (a command past request_buffer or
# request_timeout, a protocol error) may end while the client is still sending it: what it
# sends then is read and dropped for up to this long (until it closes), so that it reads the
# one-line error instead of losing it to the reset a closed socket answers more data with.
# The session keeps its place among max_sessions meanwhile.
_REFUSED_LINGER = 5.0
# With no new token, a session ends this long before its token expires (Azure would close it).
_LAST_SECOND = 1.0
# Client commands held behind a capped blocking command, at most (then the client is not read).
_MAX_HELD_BEHIND_BLOCK = 1 << 20
# Ends after which the database connection may go back to the pool (Session._gives_back).
_CLEAN_ENDS = frozenset(("client closed", "client quit"))
# The watchdog checks a session every second; one quiet (nothing read from either side) for
# _QUIET_AFTER seconds every _QUIET_TICK seconds instead; with regular checks on a shared
# _GRID, 5,000 pooled idle connections cost 0.01 CPU-s/s here instead of 0.07. Deadlines (certificate expiry, client_idle_timeout,
# the upstream idle release, request_timeout) still end or park it on time, and locks reach
# it at once by push: what waits longer is only the lock poll, the second line.
_TICK = 1.0
_QUIET_AFTER = 2.0
_QUIET_TICK = 5.0
_GRID = 0.25  # regular checks fall on multiples of this of the loop's clock (Session._arm)


class AuditSink(Protocol):
    def emit(
        self,
        type_: str,
        actor: str,
        *,
        source_addr: str = "",
        success: bool = True,
        error: str = "",
        fields: dict[str, Any] | None = None,
        when: float | None = None,
        base: dict[str, Any] | None = None,
    ) -> None: ...


class _EmitQueries:
    """Query events through :meth:`AuditSink.emit`, for sinks without ``query_stream``."""

    def __init__(self, audit: AuditSink, actor: str, source_addr: str, base: dict[str, Any],
                 max_arg: int, max_args: int) -> None:
        self._audit, self._actor, self._source, self._base = audit, actor, source_addr, base
        self._max_arg, self._max_args = max_arg, max_args

    def commands(self, when: float, logical_db: int, cmds: list[Command], size: int = -1) -> None:
        for cmd in cmds:
            self.query(when, logical_db, cmd, lookup(cmd.name, cmd.argv).name)

    def query(self, when: float, logical_db: int, cmd: Command, name: str, error: str = "") -> None:
        self._audit.emit(
            "db.session.query", self._actor, source_addr=self._source, success=not error, error=error,
            fields={"db_name": str(logical_db), "command": name,
                    "args": audit_args(cmd.name, cmd.argv, max_arg=self._max_arg, max_args=self._max_args)},
            when=when, base=self._base)


@dataclass
class SessionContext:
    """Everything a session needs; built by the listener's ``authorize`` callback.

    ``db_name`` is the logical database of the certificate's route ("" = 0).
    ``expires_at`` is the certificate's NotAfter (epoch seconds). ``lock_check`` is
    polled by the watchdog (every second; every few seconds while the session is quiet):
    it returns a reason (one line) when a lock now applies to the user or one of their
    roles, else None. ``disconnect_expired_cert`` and
    ``client_idle_timeout`` default to the roles' options.
    """

    user: str
    database: str
    db_user: str
    db_name: str
    roles: RoleSet
    db_labels: Mapping[str, str]
    target: UpstreamTarget
    credentials: CredentialProvider
    expires_at: float | None = None
    source_addr: str = ""
    lock_check: Callable[[], str | None] | None = None
    disconnect_expired_cert: bool | None = None
    client_idle_timeout: float | None = None
    session_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    extra_audit_fields: dict[str, Any] = field(default_factory=dict)
    # How the upstream connection is made (an UpstreamPool's ``get``); connect_upstream if None.
    connect: Callable[..., Awaitable[Upstream]] | None = None
    # The database is a Redis Cluster (OSSCluster): the session routes by slot
    # (services/dbproxy/clusterconn.py) instead of using ``connect``.
    cluster: bool = False
    # Takes back the database connection of a session that ended cleanly (an UpstreamPool's
    # ``release``); None: it is closed.
    release: Callable[[Upstream], None] | None = None

    @property
    def logical_db(self) -> int:
        text = (self.db_name or "0").strip()
        return int(text) if text.isdigit() else -1


async def refuse(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, message: str, linger: float = 1.0
) -> None:
    """Answer with ``-ERR message`` and close, after reading the client's first
    command (up to ``linger`` seconds) so the error arrives as its reply."""
    try:
        writer.write(encode_error(message))
        await asyncio.wait_for(writer.drain(), linger)
        try:
            await asyncio.wait_for(reader.read(65536), linger)
        except (TimeoutError, ConnectionError):
            pass
    except (ConnectionError, TimeoutError, OSError):
        pass
    finally:
        writer.close()
        try:
            await asyncio.wait_for(writer.wait_closed(), 1.0)
        except Exception:  # noqa: BLE001 - closing anyway
            pass


def _take_over(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
               protocol: asyncio.Protocol) -> tuple[asyncio.Transport, bytes]:
    """Move a connection from its stream to ``protocol``: the transport, and the bytes
    the stream had read but nobody consumed (a client's first commands, sent with the
    handshake). Reading is paused; the caller resumes it once it is ready."""
    transport = writer.transport
    transport.pause_reading()
    leftover = bytes(reader._buffer)  # noqa: SLF001 - the stream's unread bytes, handed over
    reader._buffer.clear()  # noqa: SLF001
    transport.set_protocol(protocol)
    return transport, leftover


class _Side(SharedBufferProtocol):
    """One transport of a relaying session; everything goes to the session.

    ``data_received`` is the session's callback itself, held in a slot (the session swaps
    it while idle without a database connection): each read reaches the session straight
    from the shared buffer, with no method of this class in between."""

    __slots__ = ("data_received", "_on_eof", "_pause_peer", "_resume_peer", "name", "gone")

    def __init__(self, on_data: Callable[[bytes], None], on_eof: Callable[[str], None],
                 pause_peer: Callable[[], None], resume_peer: Callable[[], None], name: str) -> None:
        self.data_received = on_data
        self._on_eof = on_eof
        self._pause_peer = pause_peer
        self._resume_peer = resume_peer
        self.name = name
        self.gone: asyncio.Future | None = None  # set once the connection is lost

    def detach(self) -> None:
        """The session ended: nothing more reaches it (and this no longer keeps it alive)."""
        self.data_received = _ignore
        self._on_eof = self._pause_peer = self._resume_peer = _noop

    def eof_received(self) -> bool:
        self._on_eof(self.name)
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        gone = self.gone
        if gone is not None and not gone.done():
            gone.set_result(None)
        self._on_eof(self.name)

    # The peer of this side cannot take more bytes than this side's transport can send.
    def pause_writing(self) -> None:
        self._pause_peer()

    def resume_writing(self) -> None:
        self._resume_peer()


class Session:
    """Run with :meth:`run`; :meth:`terminate` ends it from outside (locks, admin)."""

    def __init__(
        self,
        ctx: SessionContext,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        audit: AuditSink,
        limits: ProxyLimits | None = None,
        *,
        metrics: ProxyMetrics | None = None,
        start_span: trace.Span | None = None,
        budget: RequestBudget | None = None,
    ) -> None:
        self.ctx = ctx
        self.limits = limits = limits or ProxyLimits()
        # Bytes of incomplete commands, shared with the other sessions (the listener's).
        self._budget = budget if budget is not None else RequestBudget(limits.request_buffer)
        self._held = 0  # bytes of the incomplete command taken from the budget
        self._deadline = 0.0  # monotonic time by which that command must be complete
        self._creader = reader
        self._cwriter = writer
        self._audit = audit
        self._up: Upstream | None = None
        self._ct: asyncio.Transport | None = None
        self._ut: asyncio.Transport | None = None
        self.started = time.time()
        self.bytes_in = 0  # client -> proxy
        self.bytes_out = 0  # proxy -> client
        self.end_reason = ""
        self._stop: asyncio.Future | None = None
        self._pending_stop: End | None = None
        self._finishing: End | None = None  # waiting for the replies due, then this
        self._held_pause = False  # client reading paused while commands wait behind a block
        self._input_refused = False  # what the client sends is dropped; its close lingers
        self._gone: asyncio.Future | None = None  # the lingering client connection is lost
        self._last_activity = time.monotonic()
        self._client_side: _Side | None = None
        self._upstream_side: _Side | None = None
        # Idle with its database connection given back (limits.upstream_idle_release): what
        # the client sent since waits here while :meth:`_unpark` takes a connection again.
        self._parked = False
        self._parked_in: list[bytes] = []
        self._unparking: asyncio.Task | None = None
        self._watch_timer: asyncio.TimerHandle | None = None  # the watchdog's next check (_watch)
        self._loop: asyncio.AbstractEventLoop | None = None  # run()'s
        self._clear_name = False  # the connection still has the pool's spare name
        # Audit.
        self._afields = {
            "session_id": ctx.session_id,
            "db_service": ctx.database,
            "db_user": ctx.db_user,
            **ctx.extra_audit_fields,
        }
        stream = getattr(audit, "query_stream", None)
        if stream is not None:
            queries = stream(ctx.user, ctx.source_addr, self._afields,
                             max_arg=limits.audit_arg_max, max_args=limits.audit_max_args)
        else:
            queries = _EmitQueries(audit, ctx.user, ctx.source_addr, self._afields,
                                   limits.audit_arg_max, limits.audit_max_args)
        # Metrics: counted by the core, added in bulk by _flush_metrics.
        self._metrics = metrics = metrics or dbmetrics.DISABLED
        self._m_on = metrics.enabled
        self._m_bytes = (0, 0)  # bytes_in, bytes_out already added
        self._probe = 0.0  # perf_counter() when the measured round trip began (0: none)
        self._probe_next = 0.0
        self._start_span = start_span
        self.core = SessionCore(
            database=ctx.database, db_user=ctx.db_user, db_name=ctx.db_name, roles=ctx.roles,
            db_labels=ctx.db_labels, queries=queries, on_protocol_error=self._audit_protocol_error,
            resp_limits=limits.resp, max_reply_line=limits.max_reply_line, count_commands=self._m_on)

    # -- public ------------------------------------------------------------------------------

    @property
    def user(self) -> str:
        return self.ctx.user

    @property
    def role_names(self) -> list[str]:
        return self.ctx.roles.role_names

    @property
    def commands(self) -> int:
        return self.core.commands

    def terminate(self, reason: str) -> None:
        """End the session now; ``reason`` (one line) is told to the client and audited."""
        self._end(End(reason, f"Cachegate ended this session: {reason}"))

    def drain(self, reason: str, timeout: float) -> None:
        """End the session gracefully: no new command is read, the replies of every command
        already sent to the database reach the client (within ``timeout``), then it is told
        ``reason`` and to reconnect (the proxy is shutting down)."""
        self._end(End(reason, f"Cachegate ended this session: {reason}; reconnect", after_replies=True),
                  finish_timeout=timeout)

    def update_access(self, roles: RoleSet, db_labels: Mapping[str, str], reason: str) -> None:
        """Re-evaluate the session with ``roles`` and the database's ``db_labels`` as they are
        now (``reason``, one line, names the change: ``role "x" was deleted``). The next
        command is checked against them; when they no longer allow the session in its current
        logical database, it ends with :meth:`terminate`."""
        self.ctx.roles = roles
        self.ctx.db_labels = db_labels
        decision = self.core.update_access(roles, db_labels)
        if not decision:
            self.terminate(f"{reason}; {decision.reason}")

    async def run(self) -> None:
        """The whole session; returns when it is over (never raises for I/O errors)."""
        self._loop = loop = asyncio.get_running_loop()
        self._stop = loop.create_future()
        if self._pending_stop is not None:
            self._stop.set_result(self._pending_stop)
        ctx = self.ctx
        m = self._metrics
        tracer = m.tracer
        span = self._start_span or tracer.start_span("dbproxy session start")
        span.set_attributes({"cachegate.user": ctx.user, "cachegate.database": ctx.database,
                             "cachegate.db_user": ctx.db_user, "cachegate.session_id": ctx.session_id})
        try:
            with trace.use_span(span, end_on_exit=False):
                with tracer.start_as_current_span("rbac"):
                    refusal = self._precheck()
                if refusal is None and self._pending_stop is not None:
                    refusal = ("locked", self._pending_stop.reason)
                if refusal is not None:
                    span.set_status(trace.Status(trace.StatusCode.ERROR, refusal[0]))
                    m.session_refused(refusal[0])
                    self._audit_start(False, refusal[1])
                    await refuse(self._creader, self._cwriter, refusal[1], self.limits.refusal_linger)
                    return
                try:
                    self._up = await self._connect()
                except UpstreamError as exc:
                    span.set_status(trace.Status(trace.StatusCode.ERROR, f"upstream {exc.reason}"))
                    m.session_refused(f"upstream_{exc.reason}")
                    if exc.reason == "credentials":
                        m.upstream_auth_failure(ctx.database, "credentials")
                    self._audit_start(False, str(exc), reason=exc.reason)
                    await refuse(self._creader, self._cwriter, str(exc), self.limits.refusal_linger)
                    return
        finally:
            span.end()
        self._audit_start(True, "")
        m.session_started(ctx.database)
        self._watch_start()
        tasks = []
        expiring = getattr(ctx.credentials, "expiring", None)
        if expiring is not None and self._up.auth_expires_at is not None:
            self.core.block_cap = _block_cap(self._up.auth_expires_at - time.time())
            tasks.append(asyncio.create_task(self._reauth_loop(expiring), name="reauth"))
        try:
            await self._relay()
        finally:
            if self._watch_timer is not None:
                self._watch_timer.cancel()
                self._watch_timer = None
            if self._unparking is not None:
                tasks.append(self._unparking)
            if tasks:
                for t in tasks:
                    t.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
            self._release_budget()
            self.core.discard("session ended")  # its memory goes now
            self._close()
            self._audit_end()
            if self._parked:
                m.session_parked(ctx.database, -1)
            m.session_ended(ctx.database)
            self._flush_metrics()
            self._release()
            if self._gone is not None:
                await asyncio.wait((self._gone,), timeout=_REFUSED_LINGER + _CLOSE_GRACE)

    # -- checks ------------------------------------------------------------------------------

    def _precheck(self) -> tuple[str, str] | None:
        """None, or (reason code for the metrics, message for the client and the audit)."""
        ctx = self.ctx
        if ctx.expires_at is not None and ctx.expires_at <= time.time():
            when = dt.datetime.fromtimestamp(ctx.expires_at, dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
            return ("certificate_expired",
                    f"your certificate expired at {when}; run `cgate db login {ctx.database}` and connect again")
        if ctx.lock_check is not None:
            locked = ctx.lock_check()
            if locked:
                return "locked", locked
        if ctx.logical_db < 0:
            return "invalid_db_name", f'logical database "{ctx.db_name}" is not a number'
        decision = self.core.access.decision
        if not decision:
            return "denied", decision.reason
        return None

    # -- audit -------------------------------------------------------------------------------

    def _audit_start(self, success: bool, error: str, reason: str = "") -> None:
        ctx = self.ctx
        fields = dict(self._afields, db_name=ctx.db_name or "0",
                      roles=list(ctx.roles.role_names), db_host=ctx.target.address)
        if reason:
            fields["reason"] = reason
        self._audit.emit("db.session.start", ctx.user, source_addr=ctx.source_addr,
                         success=success, error=error, fields=fields)

    def _audit_end(self) -> None:
        ctx = self.ctx
        self._audit.emit(
            "db.session.end", ctx.user, source_addr=ctx.source_addr,
            fields=dict(self._afields, db_name=str(self.core.logical_db),
                        duration_ms=round((time.time() - self.started) * 1000),
                        commands=self.core.commands, bytes_in=self.bytes_in, bytes_out=self.bytes_out,
                        reason=self.end_reason),
        )

    def _audit_protocol_error(self, logical_db: int, error: str) -> None:
        self._audit.emit("db.session.query", self.ctx.user, source_addr=self.ctx.source_addr,
                         success=False, error=error,
                         fields=dict(self._afields, db_name=str(logical_db), command=""))

    # -- metrics -----------------------------------------------------------------------------

    def _flush_metrics(self) -> None:
        """Add what this session counted since the last call (every second, and at the end)."""
        if not self._m_on:
            return
        core = self.core
        if not core.allowed_counts and not core.denied_counts and self._m_bytes == (self.bytes_in, self.bytes_out):
            return  # nothing since the last call (an idle session, every second)
        allowed, denied = _known(core.allowed_counts), _known(core.denied_counts)
        core.allowed_counts, core.denied_counts = {}, {}
        done_in, done_out = self._m_bytes
        self._m_bytes = (self.bytes_in, self.bytes_out)
        self._metrics.add_traffic(allowed, denied, self.bytes_in - done_in, self.bytes_out - done_out)

    # -- relay -------------------------------------------------------------------------------

    def _end(self, end: End, finish_timeout: float = _FINISH_TIMEOUT) -> None:
        """End the session with ``end`` (the first reason wins); with ``after_replies``,
        once the replies already due reached the client (bounded)."""
        if end.input_refused and not self._input_refused:
            # Nothing more the client sends is read as commands (it would only be refused again).
            self._input_refused = True
            if self._client_side is not None:
                self._client_side.data_received = _ignore
        stop = self._stop
        if stop is None:
            if self._pending_stop is None:
                self._pending_stop = end
            return
        if stop.done():
            return
        if end.after_replies and (self._ct is None or not self.core.idle):
            # (Before relaying starts, too: a drain then sends nothing the client sent.)
            if self._finishing is None:
                self._finishing = end
                if self._ct is not None:
                    self._ct.pause_reading()  # nothing more from the client
                asyncio.get_running_loop().call_later(finish_timeout, self._finish_now)
            return
        stop.set_result(end)

    def _finish_now(self) -> None:
        if self._finishing is not None and self._stop is not None and not self._stop.done():
            self._stop.set_result(self._finishing)

    async def _connect(self) -> Upstream:
        """A database connection in the session's logical database (``ctx.connect``: the
        pool's; a Redis Cluster's router); raises UpstreamError."""
        ctx = self.ctx
        m = self._metrics
        connect = ctx.connect or connect_upstream
        extra = {}
        if ctx.cluster:
            from services.dbproxy.clusterconn import connect_cluster

            connect = connect_cluster
            extra["address"] = _client_facing(self._cwriter)
        return await connect(
            ctx.target, ctx.credentials, self.core.logical_db,
            timeout=self.limits.upstream_connect_timeout, tracer=m.tracer,
            on_auth_refused=(lambda: m.upstream_auth_failure(ctx.database, "auth")) if m.enabled else None,
            **extra)

    def _attach(self, up: Upstream) -> bytes:
        """Make ``up`` the session's database connection; returns the bytes it had already
        read. Each side sees its own transport's flow control: when the client cannot take
        more, the database is not read, and the other way round."""
        self._up = up
        core = self.core
        core.upstream_auth, core.client_id = up.auth_command, up.client_id
        upstream = _Side(self._from_upstream, self._lost, self._pause_client, self._resume_client, "database")
        self._upstream_side = upstream
        if hasattr(up, "attach"):  # a Redis Cluster: the router is the session's upstream
            self._ut = up.attach(upstream)
            return b""
        self._ut, left = _take_over(up.reader, up.writer, upstream)
        # The pool's name for it goes with the client's next bytes (one write for both).
        self._clear_name = up.spare
        return left

    async def _relay(self) -> None:
        assert self._up is not None and self._stop is not None
        up_left = self._attach(self._up)
        client = _Side(self._from_client, self._lost, self._pause_upstream, self._resume_upstream, "client")
        self._client_side = client
        self._ct, client_left = _take_over(self._creader, self._cwriter, client)
        if up_left:
            self._from_upstream(up_left)
        if self._finishing is not None:  # drained while connecting: no command of it was sent
            self._finish_now()
        elif client_left:
            self._from_client(client_left)
        if not self._stop.done():
            self._ut.resume_reading()
            if self._finishing is None:
                self._ct.resume_reading()
        end: End = await self._stop
        self.end_reason = end.reason
        ct = self._ct
        if end.message and not self.core.mid_reply and not ct.is_closing():
            last = encode_error(end.message)
            ct.write(last)
            self.bytes_out += len(last)

    def _while_parked(self, data: bytes) -> None:
        """What the client sends while the session has no database connection (the client
        side's callback from :meth:`_park` until :meth:`_unpark` is done)."""
        self.bytes_in += len(data)
        self._last_activity = time.monotonic()
        self._parked_in.append(data)
        if self._unparking is None:
            self._ct.pause_reading()  # until a database connection is back
            self._unparking = asyncio.get_running_loop().create_task(self._unpark(), name="unpark")

    def _from_client(self, data: bytes, counted: bool = False) -> None:
        """The client side's callback while the session relays (the hot path: one call per
        read; ``counted``: the bytes were counted as they came, while parked)."""
        if not counted:
            self.bytes_in += len(data)
            self._last_activity = time.monotonic()
        core = self.core
        # Whether a round trip begins here, for the latency sample (only with metrics on).
        idle = self._m_on and not self._probe and core.idle
        before = core.commands
        if self._clear_name:
            self._clear_name = False
            first = core.swallowed(CLEAR_NAME)  # its reply is dropped, before the client's
            up, down = core.feed_client(data)
            up = first + up
        else:
            up, down = core.feed_client(data)
        if up:
            self._ut.write(up)
            if idle:
                now = time.perf_counter()
                if now >= self._probe_next:
                    self._probe = now
        if down:
            self._ct.write(down)
            self.bytes_out += len(down)
        if core.ending is not None:
            self._end(core.ending)
            return
        if core.held_bytes > _MAX_HELD_BEHIND_BLOCK and not self._held_pause:
            # Commands behind a blocking command wait in the proxy: read no more until they go.
            self._held_pause = True
            self._ct.pause_reading()
        pending = core.pending
        if pending or self._held:
            self._account(pending, core.commands != before)

    def _from_upstream(self, data: bytes) -> None:
        self._last_activity = time.monotonic()
        core = self.core
        down = core.feed_upstream(data)
        if down:
            self._ct.write(down)
            self.bytes_out += len(down)
        up = core.take_upstream()
        if up:
            self._ut.write(up)
            if self._held_pause and not core.held_bytes:
                self._held_pause = False
                self._resume_client()
        if core.ending is not None:
            self._end(core.ending)
        if (self._finishing is not None or self._probe) and core.idle:
            if self._finishing is not None:
                self._finish_now()
            if self._probe:
                now = time.perf_counter()
                self._metrics.record_latency(now - self._probe, self.ctx.database)
                self._probe = 0.0
                self._probe_next = now + dbmetrics.LATENCY_SAMPLE_INTERVAL

    def _lost(self, side: str) -> None:
        # Either side closing ends the session: a client that closed asked nothing more, and a
        # database that closed gets no invented reply (the client sees its connection close).
        self._end(End("client closed" if side == "client" else "database closed the connection"))

    def _pause_client(self) -> None:
        if self._ct is not None and not self._ct.is_closing():
            self._ct.pause_reading()

    def _resume_client(self) -> None:
        if (self._ct is not None and not self._ct.is_closing() and self._finishing is None
                and not self._held_pause):
            self._ct.resume_reading()

    # -- idle sessions give their database connection back -----------------------------------

    def _park(self) -> None:
        """Give the database connection back to the pool while the session is idle (see
        ``limits.upstream_idle_release``); nothing happens unless the connection is plain:
        only plain commands and SELECT were sent, no reply is due, no command half read, and
        it is not a Redis Cluster router nor authenticated with a token that expires."""
        up, ut = self._up, self._ut
        if (not self._own_connection() or self._stop is None or self._stop.done()
                or self._finishing is not None or up.auth_expires_at is not None or not self.core.parkable):
            return
        if self._upstream_side is not None:
            self._upstream_side.detach()
        self._upstream_side = None
        self._up = self._ut = None
        self._parked = True
        if self._client_side is not None:
            self._client_side.data_received = self._while_parked
        up.reclaim()
        self.ctx.release(up)
        self._metrics.session_parked(self.ctx.database, 1)

    async def _unpark(self) -> None:
        """Take a database connection again (the pool's, in the session's logical database)
        for what the client sent while parked; if none can be had the session ends with one
        line that says why (its command did not run)."""
        try:
            up = await self._connect()
        except UpstreamError as exc:
            self._unparking = None
            self._end(End(f"database connection failed: {exc.reason}",
                          f"Cachegate ended this session: {exc}; the command was not run"))
            return
        except Exception:  # noqa: BLE001 - never a session left paused: it ends, the log has why
            log.exception("could not take a database connection again for an idle session")
            self._unparking = None
            self._end(End("internal error", "Cachegate ended this session: the proxy could not connect to "
                          "the database again (internal error; see the proxy log); the command was not run"))
            return
        self._unparking = None
        if self._stop is None or self._stop.done():
            up.close()
            return
        self._parked = False
        self._metrics.session_parked(self.ctx.database, -1)
        if self._client_side is not None:
            self._client_side.data_received = self._from_client
        left = self._attach(up)
        if left:
            self._from_upstream(left)
        data = b"".join(self._parked_in)
        self._parked_in.clear()
        self._from_client(data, counted=True)
        self._ut.resume_reading()
        self._resume_client()

    def _pause_upstream(self) -> None:
        if self._ut is not None and not self._ut.is_closing():
            self._ut.pause_reading()

    def _resume_upstream(self) -> None:
        if self._ut is not None and not self._ut.is_closing():
            self._ut.resume_reading()

    # -- bounds ------------------------------------------------------------------------------

    def _account(self, pending: int, completed: bool) -> None:
        """Keep the bytes of the incomplete command within the shared budget."""
        held = self._held
        budget = self._budget
        if pending > held and not budget.take(pending - held):
            self._refuse_request(
                "request_buffer",
                "Cachegate closed this session: the proxy's memory for incomplete commands "
                f"({_mib(budget.limit)}, shared by all sessions) is full; this command was "
                "not run: try again later, or send smaller values")
            return
        if pending < held:
            budget.give(held - pending)
        if pending and (completed or not held):  # a new command began
            self._deadline = deadline = time.monotonic() + self.limits.request_timeout
            self._watch_by(deadline)  # a quiet session's watchdog would look too late
        self._held = pending

    def _release_budget(self) -> None:
        if self._held:
            self._budget.give(self._held)
            self._held = 0

    def _refuse_request(self, reason: str, message: str) -> None:
        """End the session over its incomplete command (discarded: nothing of it went
        upstream); the error follows the replies already due. ``reason``: for the metrics."""
        self.core.discard(reason.replace("_", " "))
        self._release_budget()
        self._metrics.session_refused(reason)
        self._audit.emit("db.session.query", self.ctx.user, source_addr=self.ctx.source_addr,
                         success=False, error=message,
                         fields=dict(self._afields, db_name=str(self.core.logical_db), command=""))
        down = self.core.reply_local(encode_error(message))
        if down and self._ct is not None:
            self._ct.write(down)
            self.bytes_out += len(down)
        self._end(End(reason.replace("_", " "), after_replies=True, input_refused=True))

    def _watch_start(self) -> None:
        """Start the session's watchdog: certificate expiry, idle timeout, giving the database
        connection back while idle, request_timeout, locks, metrics. A timer of the loop
        calls :meth:`_watch` when the next of them is due (at least every ``_TICK`` seconds,
        ``_QUIET_TICK`` while the session is quiet): not a task per session, whose
        coroutine, sleep future and cancelling at the end each session paid for (about
        1 KiB of an idle session)."""
        ctx = self.ctx
        expiry = ctx.disconnect_expired_cert
        if expiry is None:
            expiry = ctx.roles.disconnect_expired_cert
        self._w_expires_at = ctx.expires_at if expiry else None
        self._w_idle = ctx.client_idle_timeout if ctx.client_idle_timeout is not None else ctx.roles.client_idle_timeout
        self._w_park_after = self.limits.upstream_idle_release if ctx.release is not None else 0.0
        self._w_next_flush = 0.0
        self._watch()

    def _watch(self) -> None:
        self._watch_timer = None
        stop = self._stop
        if stop is None or stop.done():
            return
        try:
            wait = self._watch_once()
        except Exception:  # noqa: BLE001 - a session its watchdog cannot check does not go on
            log.exception("session watchdog failed")
            self._end(End("internal error", "Cachegate ended this session: the proxy could not check it "
                          "(internal error; see the proxy log)"))
            return
        if wait is not None and not stop.done():
            self._arm(wait, wait == _TICK or wait == _QUIET_TICK)

    def _arm(self, wait: float, regular: bool) -> None:
        """The next check in ``wait`` seconds; a ``regular`` one (no deadline is due sooner)
        on the loop's shared _GRID, so that one wake-up of the loop checks every session due
        then (each of thousands of sessions woke the loop on its own before)."""
        loop = self._loop
        now = loop.time()
        due = now + max(wait, 0.01)
        if regular:
            due = math.ceil(due / _GRID) * _GRID
        self._watch_timer = loop.call_at(due, self._watch)

    def _watch_by(self, due: float) -> None:
        """Have the watchdog look again by ``due`` (monotonic), not later."""
        timer = self._watch_timer
        if timer is None:  # not started yet, or the session is ending
            return
        wait = due - time.monotonic()
        if timer.when() <= self._loop.time() + wait:
            return  # it looks by then already
        timer.cancel()
        self._arm(wait, False)

    def _watch_once(self) -> float | None:
        """One check; seconds until the next one, or None when it ended the session."""
        ctx = self.ctx
        now = time.time()
        quiet = time.monotonic() - self._last_activity
        wait = _TICK if quiet < _QUIET_AFTER else _QUIET_TICK
        expires_at = self._w_expires_at
        if expires_at is not None:
            if now >= expires_at:
                self._end(End("certificate expired",
                              f"your certificate expired; run `cgate db login {ctx.database}` and connect again"))
                return None
            wait = min(wait, expires_at - now)
        idle = self._w_idle
        if idle:
            if quiet >= idle:
                self._end(End("idle timeout", f"Cachegate ended this session: idle for {idle:g}s"))
                return None
            wait = min(wait, idle - quiet)
        park_after = self._w_park_after
        if park_after and not self._parked:
            if quiet >= park_after:
                self._park()
            else:
                wait = min(wait, park_after - quiet)
        if self._held:
            left = self._deadline - time.monotonic()
            if left <= 0:
                timeout = self.limits.request_timeout
                self._refuse_request(
                    "request_timeout",
                    f"Cachegate closed this session: a command was not complete within {timeout:g}s "
                    "(request_timeout); it was not run: send each command whole and promptly")
                return None
            wait = min(wait, left)
        if ctx.lock_check is not None:
            locked = ctx.lock_check()
            if locked:
                self._end(End(f"locked: {locked}", f"Cachegate ended this session: {locked}"))
                return None
        if self._m_on and now >= self._w_next_flush:
            self._flush_metrics()
            self._w_next_flush = now + 1.0
        return wait

    async def _reauth_loop(self, expiring: Callable[..., Awaitable[tuple[str, str, float]]]) -> None:
        """Authenticate the upstream connection again, in band, before its token expires:
        a third of the token's life early, at most 3 minutes (Microsoft's advice), with
        jitter so that sessions do not all refresh at once. A token that cannot be had in
        time ends the session with one line once the old one expired."""
        assert self._up is not None
        expires_at = self._up.auth_expires_at or time.time()
        retry_at: float | None = None
        while True:
            now = time.time()
            if retry_at is None:
                margin = min(180.0, max((expires_at - now) / 3, 1.0))
                wake = expires_at - margin - random.uniform(0, margin / 3)
            else:
                wake = retry_at
            await asyncio.sleep(max(wake - now, 0))
            try:
                user, token, new_expiry = await expiring()
                if new_expiry <= expires_at:  # the shared cache still holds the old one
                    user, token, new_expiry = await expiring(force_refresh=True)
            except Exception as exc:  # noqa: BLE001 - one line for the client, the provider logs
                left = expires_at - time.time()
                if left <= _LAST_SECOND:  # ended by the proxy, with its reason, not cut by Azure
                    first = (str(exc).splitlines() or [type(exc).__name__])[0][:300]
                    self._end(End("Entra ID token could not be renewed",
                                  f"Cachegate ended this session: its Entra ID token expired and a new one "
                                  f"could not be obtained: {first}"))
                    return
                retry_at = time.time() + min(5.0, max((left - _LAST_SECOND) / 4, 0.1))
                continue
            retry_at = None
            if self._ct is None or self._stop is None or self._stop.done():
                return
            up = self.core.reauth(_auth_command(user, token))
            if up and self._ut is not None:
                self._ut.write(up)
            expires_at = new_expiry
            self.core.block_cap = _block_cap(new_expiry - time.time())

    def _release(self) -> None:
        """Break the reference cycles of an ended session (session -> transport -> protocol ->
        session, core -> session), so that it and its two TLS connections are freed as soon
        as the transports close, not at the next full garbage collection (which the hot
        path's collector settings make rare): without this, ended sessions piled up."""
        for side in (self._client_side, self._upstream_side):
            if side is not None:
                side.detach()
        self._client_side = self._upstream_side = None
        self._ct = self._ut = None
        self._up = None
        self._creader = self._cwriter = None
        self._parked_in.clear()
        self.core.detach()

    def _own_connection(self) -> bool:
        """The session relays over a pool connection of its own (not a cluster router) that
        is still open and may go back to the pool."""
        ut, up = self._ut, self._up
        return (self.ctx.release is not None and ut is not None and up is not None and not ut.is_closing()
                and up.writer.transport is ut)

    def _gives_back(self) -> bool:
        """The database connection can serve another session: the client closed or quit,
        every reply it was due has come, and the session sent nothing RESET may not undo."""
        return self.end_reason in _CLEAN_ENDS and self._own_connection() and self.core.reusable

    def _close(self) -> None:
        """Close both sides; a TLS peer that does not answer the close is cut off after a
        moment, so that nothing more is read from it (as Redis closes at once)."""
        loop = asyncio.get_running_loop()
        up = self._up
        if up is not None:
            if self._gives_back():
                up.reclaim()
                self.ctx.release(up)
            else:
                up.close()
        ct = self._ct
        if ct is None:
            self._cwriter.close()
            return
        grace = _CLOSE_GRACE
        if self._input_refused and not ct.is_closing() and self.limits.refusal_linger > 0:
            # The TLS close reads and drops what the client still sends until it answers the
            # close or closes (the session waits for that, in run), or this long at most.
            grace = _REFUSED_LINGER
            side = self._client_side
            if side is not None:
                self._gone = side.gone = loop.create_future()
        ct.close()
        loop.call_later(grace, _abort, ct)


def _client_facing(writer: asyncio.StreamWriter) -> tuple[str, int]:
    """The proxy's address as this client reached it (what CLUSTER SLOTS names)."""
    addr = writer.get_extra_info("sockname")
    if isinstance(addr, tuple) and len(addr) >= 2:
        return str(addr[0]), int(addr[1])
    return "", 0


def _block_cap(token_life: float) -> float:
    """How long a blocking command may block at most while tokens need renewing: short enough
    that an AUTH queued behind it (a third of the token's life early, at most 3 minutes) runs
    before the token expires."""
    return max(min(token_life / 6, 60.0), 0.5)


def _auth_command(user: str, token: str) -> bytes:
    return encode_command("AUTH", user, token)


def _ignore(_data: bytes) -> None:
    pass


def _noop(*_args) -> None:
    pass


def _abort(transport: asyncio.Transport) -> None:
    try:
        transport.abort()
    except Exception:  # noqa: BLE001 - already gone
        pass


def _mib(n: int) -> str:
    return f"{n / (1 << 20):g}MiB" if n >= 1 << 20 else f"{n}B"


def _known(counts: dict[str, int]) -> dict[str, int]:
    """Command counts with the names the table does not know folded into ``OTHER``."""
    out: dict[str, int] = {}
    for name, n in counts.items():
        key = name if name in KNOWN_NAMES else "OTHER"
        out[key] = out.get(key, 0) + n
    return out
