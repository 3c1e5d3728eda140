"""One RESP session: a verified client stream relayed to the database.

:class:`Session` takes an accepted (TLS-terminated) client stream and a
:class:`SessionContext` (who, which database, roles, upstream target and
credentials, audit sink), checks expiry, locks and RBAC, connects upstream (the
proxy AUTHs and SELECTs), then relays in two tasks, one per direction:

* client -> database: :class:`~services.dbproxy.resp.CommandParser` frames the
  commands (least work: argv split, raw bytes kept); each is checked against
  the role (:meth:`DatabaseAccess.check_command` with the ACL categories of
  :mod:`.commands`), audited, and its raw bytes forwarded unchanged. A denied
  command gets a local error reply and the session goes on.
* database -> client: :class:`~services.dbproxy.resp.ReplyFramer` only finds
  frame boundaries; reply bytes are forwarded as they came (whole chunks on the
  hot path). A queue of expected replies (run-length counted) tells where a
  local reply (a denied command, the proxy's answer to AUTH) goes in the
  stream, and which replies the proxy swallows (its own AUTH after RESET).

Protocol state followed: RESP2/RESP3 (HELLO), Pub/Sub in RESP2 (message frames
are out of band, subscription counts decide reply counts), MULTI/EXEC (a denied
command aborts the transaction like a queueing error), SELECT (checked against
``db_names``), MONITOR, RESET (the proxy authenticates again), QUIT.

A watchdog ends the session when the certificate expires (role option
``disconnect_expired_cert``), within a second of ``lock_check`` reporting a
lock or :meth:`Session.terminate`, and after ``client_idle_timeout``.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import time
import uuid
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from opentelemetry import trace

from services.common.rbac import DatabaseAccess, Decision, RoleSet
from services.dbproxy import commands as cmdtable
from services.dbproxy import metrics as dbmetrics
from services.dbproxy.commands import (
    KNOWN_NAMES,
    SCRIPT_CALLABLE,
    SCRIPT_RUNNERS,
    audit_args,
    lookup,
    own_client_lines,
    proxy_refusal,
    redact_config_reply,
    referenced_dbs,
)
from services.dbproxy.limits import ProxyLimits, RequestBudget
from services.dbproxy.metrics import ProxyMetrics
from services.dbproxy.resp import (
    Command,
    CommandParser,
    ProtocolError,
    ReplyFramer,
    encode_command,
    encode_error,
)
from services.dbproxy.upstream import (
    CredentialProvider,
    Upstream,
    UpstreamError,
    UpstreamTarget,
    connect_upstream,
)

__all__ = ["AuditSink", "Session", "SessionContext", "refuse"]

log = logging.getLogger("cachegate.dbproxy.session")


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


class _Queries(Protocol):
    """A session's ``db.session.query`` events (:class:`~.auditspool.QueryStream`)."""

    def commands(self, when: float, logical_db: int, cmds: list[Command]) -> None: ...

    def query(self, when: float, logical_db: int, cmd: Command, name: str, error: str = "") -> None: ...


class _EmitQueries:
    """Query events through :meth:`AuditSink.emit`, for sinks without ``query_stream``."""

    def __init__(self, audit: AuditSink, actor: str, source_addr: str, base: dict[str, Any],
                 max_arg: int, max_args: int) -> None:
        self._audit, self._actor, self._source, self._base = audit, actor, source_addr, base
        self._max_arg, self._max_args = max_arg, max_args

    def commands(self, when: float, logical_db: int, cmds: list[Command]) -> None:
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
    polled every second: it returns a reason (one line) when a lock now applies
    to the user or one of their roles, else None. ``disconnect_expired_cert`` and
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


# --------------------------------------------------------------------------------------------
# Reply bookkeeping


class _Entry:
    """Replies expected from upstream, in order. ``plain`` entries are run-length merged.
    ``local``: bytes written to the client when this entry completes (after its frames,
    or at once when ``n`` is 0). ``swallow``: its frames are not forwarded. ``hook``:
    called as ``hook(kind, done)`` for each of its reply frames. ``transform``: each
    reply frame is held whole and what ``transform(frame)`` returns goes in its place
    (CONFIG GET without secrets, CLIENT LIST without other connections)."""

    __slots__ = ("n", "plain", "local", "swallow", "hook", "push", "transform")

    def __init__(self, n: int, plain: bool = True, local: bytes | None = None,
                 swallow: bool = False, hook: Callable[[str, bool], None] | None = None,
                 push: bool = False, transform: Callable[[bytes], bytes] | None = None) -> None:
        self.n = n
        self.plain = plain
        self.local = local
        self.swallow = swallow
        self.hook = hook
        self.push = push  # RESP3 (un)subscribe: counts its confirmation push frames
        self.transform = transform


_OOB_KINDS = frozenset((">", "|"))
_PUBSUB_MESSAGES = frozenset((b"message", b"pmessage", b"smessage"))
_CONFIRMATIONS = frozenset((b"subscribe", b"psubscribe", b"ssubscribe",
                            b"unsubscribe", b"punsubscribe", b"sunsubscribe"))
_EXECABORT = encode_error("EXECABORT Transaction discarded because of previous errors.")
_OK = b"+OK\r\n"
_MAX_HELD = 1 << 20
_MAX_TRANSFORMED = 64 << 20  # a CLIENT LIST of many thousand connections fits

_REPLY_OFF, _REPLY_SKIP = 1, 2
_SUBSCRIBE = {"SUBSCRIBE": 0, "PSUBSCRIBE": 1, "SSUBSCRIBE": 2}
_UNSUBSCRIBE = {"UNSUBSCRIBE": 0, "PUNSUBSCRIBE": 1, "SUNSUBSCRIBE": 2}


class _End(Exception):
    """Ends the session: ``reason`` for the audit, ``message`` for the client (or None)."""

    def __init__(self, reason: str, message: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.message = message


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
        self._creader = reader
        self._cwriter = writer
        self._audit = audit
        self._up: Upstream | None = None
        self.started = time.time()
        self.commands = 0
        self.bytes_in = 0  # client -> proxy
        self.bytes_out = 0  # proxy -> client
        self.end_reason = ""
        self._stop: asyncio.Future | None = None
        self._pending_stop: _End | None = None
        self._last_activity = time.monotonic()
        # Command side state.
        self._parser = CommandParser(limits.resp)
        self._proto = 2
        self._in_multi = False
        self._multi_bad = False
        self._subs: tuple[set[bytes], set[bytes], set[bytes]] = (set(), set(), set())
        self._monitor_cmd = False
        # CLIENT REPLY: 0 on, _REPLY_OFF, or _REPLY_SKIP (this command's reply is skipped);
        # while not on, the proxy expects no reply and gives none of its own.
        self._noreply = 0
        self._skip_next = False
        self._closing = False
        self._logical_db = max(ctx.logical_db, 0)
        # A route without a logical database connects to 0 without checking db_names
        # (users without db_names traits can connect); SELECT is always checked.
        self._initial_db: int | None = ctx.logical_db if (ctx.db_name or "").strip() else None
        self._access_cache: dict[int | None, DatabaseAccess] = {}
        self._script_check: tuple[DatabaseAccess, bool] | None = None
        self._access_db = self._initial_db  # the key ``_access`` was computed for
        self._access = self._access_for(self._initial_db)
        # Reply side state.
        self._framer = ReplyFramer(max_line=limits.max_reply_line)
        self._q: deque[_Entry] = deque()
        self._held = b""
        self._sub2 = False  # RESP2 subscribed mode: message arrays are out of band
        self._monitor = False
        self._drained: asyncio.Event | None = None
        # Audit.
        self._afields = {
            "session_id": ctx.session_id,
            "db_service": ctx.database,
            "db_user": ctx.db_user,
            **ctx.extra_audit_fields,
        }
        # Metrics: counted here, added in bulk by _flush_metrics.
        self._metrics = metrics = metrics or dbmetrics.DISABLED
        self._m_on = metrics.enabled
        self._m_allowed: dict[str, int] = {}
        self._m_denied: dict[str, int] = {}
        self._m_bytes = (0, 0)  # bytes_in, bytes_out already added
        self._probe = 0.0  # perf_counter() when the measured round trip began (0: none)
        self._probe_next = 0.0
        self._start_span = start_span
        stream = getattr(audit, "query_stream", None)
        if stream is not None:
            self._aq: _Queries = stream(ctx.user, ctx.source_addr, self._afields,
                                        max_arg=limits.audit_arg_max, max_args=limits.audit_max_args)
        else:
            self._aq = _EmitQueries(audit, ctx.user, ctx.source_addr, self._afields,
                                    limits.audit_arg_max, limits.audit_max_args)

    # -- public ------------------------------------------------------------------------------

    @property
    def user(self) -> str:
        return self.ctx.user

    @property
    def role_names(self) -> list[str]:
        return self.ctx.roles.role_names

    def terminate(self, reason: str) -> None:
        """End the session now; ``reason`` (one line) is told to the client and audited."""
        end = _End(reason, f"Cachegate ended this session: {reason}")
        if self._stop is None:
            self._pending_stop = end
        elif not self._stop.done():
            self._stop.set_result(end)

    def update_access(self, roles: RoleSet, db_labels: Mapping[str, str], reason: str) -> None:
        """Re-evaluate the session with ``roles`` and the database's ``db_labels`` as they are
        now (``reason``, one line, names the change: ``role "x" was deleted``). The next
        command is checked against them; when they no longer allow the session in its current
        logical database, it ends with :meth:`terminate`."""
        ctx = self.ctx
        ctx.roles = roles
        ctx.db_labels = db_labels
        self._access_cache.clear()
        self._set_access(self._access_db)
        if not self._access.decision:
            self.terminate(f"{reason}; {self._access.decision.reason}")

    async def run(self) -> None:
        """The whole session; returns when it is over (never raises for I/O errors)."""
        loop = asyncio.get_running_loop()
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
                    self._up = await connect_upstream(
                        ctx.target, ctx.credentials, self._logical_db,
                        timeout=self.limits.upstream_connect_timeout, tracer=tracer,
                        on_auth_refused=(lambda: m.upstream_auth_failure(ctx.database, "auth"))
                        if m.enabled else None,
                    )
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
        try:
            await self._relay()
        finally:
            self._up.close()
            self._cwriter.close()
            self._audit_end()
            m.session_ended(ctx.database)
            self._flush_metrics()

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
        decision = self._access.decision
        if not decision:
            return "denied", decision.reason
        return None

    def _access_for(self, logical_db: int | None) -> DatabaseAccess:
        acc = self._access_cache.get(logical_db)
        if acc is None:
            ctx = self.ctx
            acc = ctx.roles.for_database(ctx.database, ctx.db_labels, ctx.db_user, logical_db)
            if len(self._access_cache) > 64:
                self._access_cache.clear()
            self._access_cache[logical_db] = acc
        return acc

    def _set_access(self, logical_db: int | None) -> None:
        """Check commands against ``logical_db``'s access from now on (None: the route's)."""
        self._access_db = logical_db
        self._access = self._access_for(logical_db)

    def _scripts_allowed(self, name: str) -> bool:
        """May this session run (or load) scripts? Cached per access (SELECT changes it)."""
        acc = self._access
        cached = self._script_check
        if cached is not None and cached[0] is acc:
            contained = cached[1]
        else:
            contained = acc.every_logical_db and not acc.denies_any(SCRIPT_CALLABLE)
            self._script_check = (acc, contained)
        return contained or acc.explicitly_allows(name, ("@scripting",))

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
            fields=dict(self._afields, db_name=str(self._logical_db),
                        duration_ms=round((time.time() - self.started) * 1000),
                        commands=self.commands, bytes_in=self.bytes_in, bytes_out=self.bytes_out,
                        reason=self.end_reason),
        )

    def _audit_query(self, cmd: Command, name: str, decision: Decision | None, error: str = "") -> None:
        denied = decision is not None and not decision.allowed
        if denied and not error:
            error = decision.reason
        self._aq.query(time.time(), self._logical_db, cmd, name, error)
        if self._m_on:
            counts = self._m_denied if denied else self._m_allowed
            counts[name] = counts.get(name, 0) + 1

    # -- metrics -----------------------------------------------------------------------------

    def _flush_metrics(self) -> None:
        """Add what this session counted since the last call (every second, and at the end)."""
        if not self._m_on:
            return
        allowed, denied = _known(self._m_allowed), _known(self._m_denied)
        self._m_allowed, self._m_denied = {}, {}
        done_in, done_out = self._m_bytes
        self._m_bytes = (self.bytes_in, self.bytes_out)
        self._metrics.add_traffic(allowed, denied, self.bytes_in - done_in, self.bytes_out - done_out)

    # -- relay -------------------------------------------------------------------------------

    async def _relay(self) -> None:
        assert self._up is not None and self._stop is not None
        self._drained = asyncio.Event()
        tasks = [
            asyncio.create_task(self._client_to_upstream(), name="c2u"),
            asyncio.create_task(self._upstream_to_client(), name="u2c"),
            asyncio.create_task(self._watchdog(), name="watchdog"),
        ]
        end: _End
        try:
            done, _ = await asyncio.wait([*tasks, self._stop], return_when=asyncio.FIRST_COMPLETED)
            first = next(iter(done))
            if first is self._stop:
                end = first.result()
            else:
                exc = first.exception()
                if isinstance(exc, _End):
                    end = exc
                elif exc is not None:
                    if isinstance(exc, (ConnectionError, OSError, TimeoutError)):
                        end = _End(f"connection error: {type(exc).__name__}")
                    else:
                        log.error("session %s failed", self.ctx.session_id, exc_info=exc)
                        end = _End("internal error", "Cachegate ended this session: internal error")
                else:
                    end = _End("closed")
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        self.end_reason = end.reason
        if end.message and not self._framer.in_frame and not self._held:
            try:
                self._cwriter.write(encode_error(end.message))
                await asyncio.wait_for(self._cwriter.drain(), 1.0)
            except (ConnectionError, TimeoutError, OSError):
                pass

    async def _watchdog(self) -> None:
        ctx = self.ctx
        expiry = ctx.disconnect_expired_cert
        if expiry is None:
            expiry = ctx.roles.disconnect_expired_cert
        expires_at = ctx.expires_at if expiry else None
        idle = ctx.client_idle_timeout if ctx.client_idle_timeout is not None else ctx.roles.client_idle_timeout
        next_flush = 0.0
        while True:
            now = time.time()
            wait = 1.0
            if expires_at is not None:
                if now >= expires_at:
                    raise _End("certificate expired",
                               f"your certificate expired; run `cgate db login {ctx.database}` and connect again")
                wait = min(wait, expires_at - now)
            if idle:
                quiet = time.monotonic() - self._last_activity
                if quiet >= idle:
                    raise _End("idle timeout", f"Cachegate ended this session: idle for {idle:g}s")
                wait = min(wait, idle - quiet)
            if ctx.lock_check is not None:
                locked = ctx.lock_check()
                if locked:
                    raise _End(f"locked: {locked}", f"Cachegate ended this session: {locked}")
            if self._m_on and now >= next_flush:
                self._flush_metrics()
                next_flush = now + 1.0
            await asyncio.sleep(max(wait, 0.01))

    # -- client -> upstream ------------------------------------------------------------------

    async def _client_to_upstream(self) -> None:
        assert self._up is not None
        read = self._creader.read
        chunk = self.limits.read_chunk
        uwriter = self._up.writer
        parser = self._parser
        parse = parser.feed
        budget = self._budget
        held = 0  # bytes of the incomplete command, taken from the shared budget
        deadline = 0.0  # loop time by which that command must be complete
        timeout = self.limits.request_timeout
        loop = asyncio.get_running_loop()
        try:
            while True:
                if held:
                    try:
                        async with asyncio.timeout_at(deadline):
                            data = await read(chunk)
                    except TimeoutError:
                        parser.discard("request timeout")
                        budget.give(held)
                        held = 0
                        await self._refuse_request(
                            "request_timeout",
                            f"Cachegate closed this session: a command was not complete within {timeout:g}s "
                            "(request_timeout); it was not run: send each command whole and promptly")
                else:
                    data = await read(chunk)
                if not data:
                    raise _End("client closed")
                self.bytes_in += len(data)
                self._last_activity = time.monotonic()
                try:
                    cmds = parse(data)
                except ProtocolError as err:
                    out = self._handle(err.commands) if err.commands else []
                    self._audit.emit("db.session.query", self.ctx.user, source_addr=self.ctx.source_addr,
                                     success=False, error=f"protocol error: {err}",
                                     fields=dict(self._afields, db_name=str(self._logical_db), command=""))
                    self._local(err.reply())
                    if out:
                        uwriter.write(b"".join(out))
                    await self._finish_replies()
                    raise _End(f"protocol error: {err}") from None
                if cmds:
                    idle = not self._q
                    out = self._handle(cmds)
                    if out:
                        uwriter.write(out[0] if len(out) == 1 else b"".join(out))
                        if idle and self._m_on and not self._probe:
                            now = time.perf_counter()
                            if now >= self._probe_next:
                                self._probe = now
                        await uwriter.drain()
                    if self._closing:
                        await self._finish_replies()
                        raise _End("client quit")
                pending = parser.pending
                if pending or held:
                    if pending > held and not budget.take(pending - held):
                        parser.discard("request buffer full")
                        budget.give(held)
                        held = 0
                        await self._refuse_request(
                            "request_buffer",
                            "Cachegate closed this session: the proxy's memory for incomplete commands "
                            f"({_mib(budget.limit)}, shared by all sessions) is full; this command was "
                            "not run: try again later, or send smaller values")
                    if pending < held:
                        budget.give(held - pending)
                    if pending and (cmds or not held):  # a new command began
                        deadline = loop.time() + timeout
                    held = pending
        finally:
            parser.discard("session ended")  # its memory goes now, then the budget is given back
            budget.give(held)

    async def _refuse_request(self, reason: str, message: str) -> None:
        """End the session over its incomplete command (discarded: nothing of it went
        upstream); the error follows the replies already due. ``reason``: for the metrics."""
        self._metrics.session_refused(reason)
        self._audit.emit("db.session.query", self.ctx.user, source_addr=self.ctx.source_addr,
                         success=False, error=message,
                         fields=dict(self._afields, db_name=str(self._logical_db), command=""))
        self._local(encode_error(message))
        await self._finish_replies()
        raise _End(reason.replace("_", " "))

    async def _finish_replies(self, timeout: float = 2.0) -> None:
        """Wait (bounded) until every expected reply reached the client."""
        assert self._drained is not None
        if not self._q and not self._framer.in_frame:
            await self._flush_client()
            return
        self._drained.clear()
        try:
            await asyncio.wait_for(self._drained.wait(), timeout)
        except TimeoutError:
            pass
        await self._flush_client()

    async def _flush_client(self) -> None:
        try:
            await asyncio.wait_for(self._cwriter.drain(), 2.0)
        except (TimeoutError, ConnectionError, OSError):
            pass

    def _local(self, data: bytes) -> None:
        """A reply the proxy gives itself, in its place in the reply stream."""
        if self._noreply:
            return
        if not self._q and not self._framer.in_frame and not self._held:
            self._cwriter.write(data)
            self.bytes_out += len(data)
        else:
            self._q.append(_Entry(0, False, data))

    def _expect(self, n: int, *, local: bytes | None = None, swallow: bool = False,
                hook: Callable[[str, bool], None] | None = None, push: bool = False,
                transform: Callable[[bytes], bytes] | None = None) -> None:
        if n <= 0 and local is None:
            return
        if self._noreply:  # no reply will come: the command is taken to have worked
            if hook is not None:
                hook("+", True)
            return
        self._q.append(_Entry(n, False, local, swallow, hook, push, transform))

    def _deny(self, cmd: Command, name: str, reason: str) -> None:
        self._audit_query(cmd, name, Decision(False, reason))
        if self._in_multi:
            self._multi_bad = True
        self._local(encode_error(reason))

    def _handle(self, cmds: list[Command]) -> list[bytes]:
        """Check, audit and route each command; returns the bytes for upstream.

        Allowed plain commands are audited together (one queue entry for the run of
        them); a command with protocol meaning or a denial first queues the run so far,
        so the audit keeps the order and each event its logical database."""
        out: list[bytes] = []
        append = out.append
        q = self._q
        check = self._access.check_command
        special = _SPECIAL
        audited: list[Command] = []
        now = time.time()
        m_on = self._m_on
        m_allowed = self._m_allowed
        self.commands += len(cmds)
        for cmd in cmds:
            name = cmd.name
            handler = special.get(name)
            if handler is not None or self._monitor_cmd or self._noreply:
                if audited:
                    self._aq.commands(now, self._logical_db, audited)
                    audited = []
                if self._monitor_cmd and name != "QUIT":
                    handler = _Handlers.other_in_monitor
                elif handler is None:
                    handler = _Handlers.plain
                skipping = self._noreply == _REPLY_SKIP
                handler(self, cmd, out)
                if skipping and self._noreply == _REPLY_SKIP:
                    self._noreply = 0
                if self._skip_next:
                    self._skip_next = False
                    self._noreply = _REPLY_SKIP
                check = self._access.check_command  # SELECT/RESET may have changed it
                continue
            info = lookup(name, cmd.argv)
            decision = check(info.name, info.categories)
            if not decision.allowed:
                if audited:
                    self._aq.commands(now, self._logical_db, audited)
                    audited = []
                self._deny(cmd, info.name, decision.reason)
                continue
            audited.append(cmd)
            append(cmd.raw)
            if m_on:
                m_allowed[info.name] = m_allowed.get(info.name, 0) + 1
            if q:
                last = q[-1]
                if last.plain:
                    last.n += 1
                    continue
            q.append(_Entry(1))
        if audited:
            self._aq.commands(now, self._logical_db, audited)
        return out

    # -- upstream -> client ------------------------------------------------------------------

    async def _upstream_to_client(self) -> None:
        assert self._up is not None and self._drained is not None
        read = self._up.reader.read
        cwrite = self._cwriter.write
        drain = self._cwriter.drain
        chunk_size = self.limits.read_chunk
        feed = self._framer.feed
        q = self._q
        while True:
            data = await read(chunk_size)
            if not data:
                # The client's connection closes too, with no invented reply: a client
                # library then sees a closed connection, as with Redis itself, and reconnects.
                raise _End("database closed the connection")
            self._last_activity = time.monotonic()
            try:
                frames = feed(data)
            except ProtocolError as err:
                log.warning("session %s: bad reply from the database: %s", self.ctx.session_id, err)
                raise _End(f"bad reply from the database: {err}") from None
            # Hot path: every complete reply belongs to the plain entry at the head.
            if not self._held and not self._monitor and q and q[0].plain:
                head = q[0]
                sub2 = self._sub2
                replies = 0
                for f in frames:
                    k = f.kind
                    if k == ">" or k == "|" or (sub2 and k == "*" and f.tag in _PUBSUB_MESSAGES):
                        continue
                    replies += 1
                if head.n > replies:
                    head.n -= replies
                    cwrite(data)
                    self.bytes_out += len(data)
                    await drain()
                    continue
            out = self._route(data, frames)
            if out:
                payload = out[0] if len(out) == 1 else b"".join(out)
                cwrite(payload)
                self.bytes_out += len(payload)
            if not q and not self._framer.in_frame:
                self._drained.set()
                if self._probe:
                    now = time.perf_counter()
                    self._metrics.record_latency(now - self._probe, self.ctx.database)
                    self._probe = 0.0
                    self._probe_next = now + dbmetrics.LATENCY_SAMPLE_INTERVAL
            await drain()

    def _route(self, data: bytes, frames: list) -> list[bytes]:
        """The general case: place local replies, drop swallowed frames, run hooks."""
        q = self._q
        out: list[bytes] = []
        pos = 0  # data[pos:] not yet placed in out
        held = self._held
        for f in frames:
            end = f.end
            k = f.kind
            if k == ">":
                oob = not (q and q[0].push and f.tag in _CONFIRMATIONS) or self._monitor
            else:
                oob = (self._monitor or k == "|"
                       or (self._sub2 and k == "*" and f.tag in _PUBSUB_MESSAGES))
            if oob or not q or q[0].n == 0:
                if held:
                    out.append(held)
                    held = b""
            else:
                e = q[0]
                start = end - f.raw_len
                if e.transform is not None:
                    if start > pos:
                        out.append(data[pos:start])
                    # A frame begun in an earlier chunk has its start held.
                    frame = held + data[:end] if start < 0 else data[start:end]
                    held = b""
                    pos = end
                    out.append(e.transform(frame))
                elif e.swallow:
                    if start > pos:
                        out.append(data[pos:start])
                    held = b""
                    pos = end
                elif held:
                    out.append(held)
                    held = b""
                e.n -= 1
                if e.hook is not None:
                    e.hook(k, e.n == 0)
                if e.n == 0:
                    q.popleft()
                    if e.local is not None:
                        if end > pos:
                            out.append(data[pos:end])
                        pos = end
                        out.append(e.local)
            # Local replies now at the head go right after this frame.
            while q and q[0].n == 0:
                e = q.popleft()
                if end > pos:
                    out.append(data[pos:end])
                pos = end
                if e.local is not None:
                    out.append(e.local)
        tail = data[pos:]
        if tail:
            if q and (q[0].swallow or q[0].transform is not None) and not self._monitor:
                held += tail
                if len(held) > (_MAX_HELD if q[0].transform is None else _MAX_TRANSFORMED):
                    raise _End("bad reply from the database: oversized internal reply",
                               "Cachegate ended this session: the reply was too large to check")
            else:
                if held:
                    out.append(held)
                    held = b""
                out.append(tail)
        self._held = held
        return out


# --------------------------------------------------------------------------------------------
# Commands with protocol meaning


def _parse_int(arg: bytes) -> int | None:
    if arg.isdigit() and len(arg) < 12:
        return int(arg)
    return None


class _Handlers:
    """Each takes (session, command, out) and either appends the command's bytes to
    ``out`` with the reply expectation, or answers locally."""

    @staticmethod
    def _rbac(s: Session, cmd: Command) -> tuple[str, bool]:
        info = lookup(cmd.name, cmd.argv)
        decision = s._access.check_command(info.name, info.categories)
        if not decision.allowed:
            s._deny(cmd, info.name, decision.reason)
            return info.name, False
        return info.name, True

    @staticmethod
    def _rbac_outside_multi(s: Session, cmd: Command, hint: str = "") -> str | None:
        """The command's name when the role allows it and no MULTI is open; else it is
        denied (with the reason) and None."""
        name, ok = _Handlers._rbac(s, cmd)
        if not ok:
            return None
        if s._in_multi:
            s._deny(cmd, name, f"{name} inside MULTI is not supported by Cachegate{hint}")
            return None
        return name

    @staticmethod
    def _forward(s: Session, cmd: Command, name: str, out: list[bytes], n: int = 1, **kw: Any) -> None:
        s._audit_query(cmd, name, None)
        out.append(cmd.raw)
        s._expect(n, **kw)

    @staticmethod
    def plain(s: Session, cmd: Command, out: list[bytes]) -> None:
        """A command without protocol meaning, off the hot path (while CLIENT REPLY is off)."""
        name, ok = _Handlers._rbac(s, cmd)
        if ok:
            _Handlers._forward(s, cmd, name, out)

    @staticmethod
    def other_in_monitor(s: Session, cmd: Command, out: list[bytes]) -> None:
        s._deny(cmd, cmd.name, "only QUIT is accepted after MONITOR")

    @staticmethod
    def auth(s: Session, cmd: Command, out: list[bytes]) -> None:
        argv = cmd.argv
        if len(argv) not in (2, 3):
            s._audit_query(cmd, "AUTH", None, error="wrong number of arguments")
            s._local(encode_error("ERR wrong number of arguments for 'auth' command"))
            return
        user = argv[1].decode("utf-8", "replace") if len(argv) == 3 else "default"
        err = _own_user_error(s, user)
        if err:
            s._audit_query(cmd, "AUTH", Decision(False, err))
            s._local(encode_error(err))
            return
        s._audit_query(cmd, "AUTH", None)
        s._local(_OK)

    @staticmethod
    def hello(s: Session, cmd: Command, out: list[bytes]) -> None:
        argv = cmd.argv
        if len(argv) == 1:
            _Handlers._forward(s, cmd, "HELLO", out)
            return
        ver = _parse_int(argv[1])
        if ver not in (2, 3):
            s._audit_query(cmd, "HELLO", None, error="unsupported protocol version")
            s._local(encode_error("NOPROTO sorry, this protocol version is not supported."))
            return
        forward: list[bytes] = [b"HELLO", argv[1]]
        i = 2
        while i < len(argv):
            opt = argv[i].upper()
            if opt == b"AUTH" and i + 2 < len(argv):
                err = _own_user_error(s, argv[i + 1].decode("utf-8", "replace"))
                if err:
                    s._audit_query(cmd, "HELLO", Decision(False, err))
                    s._local(encode_error(err))
                    return
                i += 3
            elif opt == b"SETNAME" and i + 1 < len(argv):
                forward += [b"SETNAME", argv[i + 1]]
                i += 2
            else:
                s._audit_query(cmd, "HELLO", None, error="syntax error")
                s._local(encode_error(
                    f"ERR Syntax error in HELLO option '{argv[i].decode('utf-8', 'replace')[:64]}'"))
                return
        before = s._proto
        s._proto = ver

        def hook(kind: str, done: bool) -> None:
            if kind == "-":
                s._proto = before
            else:
                s._framer.protocol = ver

        s._audit_query(cmd, "HELLO", None)
        out.append(encode_command(*forward))
        s._expect(1, hook=hook)

    @staticmethod
    def select(s: Session, cmd: Command, out: list[bytes]) -> None:
        name = _Handlers._rbac_outside_multi(s, cmd, "; SELECT before MULTI")
        if name is None:
            return
        n = _parse_int(cmd.argv[1]) if len(cmd.argv) == 2 else None
        if n is None:
            _Handlers._forward(s, cmd, name, out)  # the server's own error
            return
        ctx = s.ctx
        decision = ctx.roles.check_database(ctx.database, ctx.db_labels, ctx.db_user, n)
        if not decision:
            s._deny(cmd, name, decision.reason)
            return
        previous = (s._logical_db, s._access_db)
        s._logical_db = n
        s._set_access(n)

        def hook(kind: str, done: bool) -> None:
            if kind == "-" and s._logical_db == n:
                # Recomputed, not restored: the roles may have changed meanwhile.
                s._logical_db = previous[0]
                s._set_access(previous[1])

        _Handlers._forward(s, cmd, name, out, hook=hook)

    @staticmethod
    def other_db(s: Session, cmd: Command, out: list[bytes]) -> None:
        """MOVE, SWAPDB, COPY ... DB n: the other logical databases must be allowed too."""
        name, ok = _Handlers._rbac(s, cmd)
        if ok and _Handlers._other_dbs_allowed(s, cmd, name):
            _Handlers._forward(s, cmd, name, out)

    @staticmethod
    def _other_dbs_allowed(s: Session, cmd: Command, name: str) -> bool:
        """The logical databases the command reaches besides the session's own are allowed
        too; else it is denied (with the reason)."""
        ctx = s.ctx
        for arg in referenced_dbs(cmd.name, cmd.argv):
            n = _parse_int(arg)
            if n is None:
                continue
            decision = ctx.roles.check_database(ctx.database, ctx.db_labels, ctx.db_user, n)
            if not decision:
                s._deny(cmd, name, decision.reason)
                return False
        return True

    @staticmethod
    def flushall(s: Session, cmd: Command, out: list[bytes]) -> None:
        """FLUSHALL empties every logical database: only for sessions allowed them all."""
        name, ok = _Handlers._rbac(s, cmd)
        if not ok:
            return
        if not s._access.every_logical_db:
            s._deny(cmd, name, "FLUSHALL empties every logical database and your roles allow only "
                    "some of them; use FLUSHDB in each one you may use")
            return
        _Handlers._forward(s, cmd, name, out)

    @staticmethod
    def multi(s: Session, cmd: Command, out: list[bytes]) -> None:
        name, ok = _Handlers._rbac(s, cmd)
        if ok:
            if not s._in_multi:
                s._in_multi, s._multi_bad = True, False
            _Handlers._forward(s, cmd, name, out)

    @staticmethod
    def exec_(s: Session, cmd: Command, out: list[bytes]) -> None:
        name, ok = _Handlers._rbac(s, cmd)
        if not ok:
            return
        if s._in_multi and s._multi_bad:
            s._in_multi = s._multi_bad = False
            s._audit_query(cmd, name, None, error="transaction aborted: a command in it was denied")
            out.append(encode_command("DISCARD"))
            s._expect(1, swallow=True, local=_EXECABORT)
            return
        s._in_multi = s._multi_bad = False
        _Handlers._forward(s, cmd, name, out)

    @staticmethod
    def discard(s: Session, cmd: Command, out: list[bytes]) -> None:
        name, ok = _Handlers._rbac(s, cmd)
        if ok:
            s._in_multi = s._multi_bad = False
            _Handlers._forward(s, cmd, name, out)

    @staticmethod
    def subscribe(s: Session, cmd: Command, out: list[bytes]) -> None:
        name = _Handlers._rbac_outside_multi(s, cmd)
        if name is None:
            return
        channels = cmd.argv[1:]
        if not channels:
            _Handlers._forward(s, cmd, name, out)  # arity error: one reply
            return
        s._subs[_SUBSCRIBE[name]].update(channels)
        if s._proto >= 3:  # confirmations are push frames, one per channel
            _Handlers._forward(s, cmd, name, out, n=len(channels), push=True)
            return

        def hook(kind: str, done: bool) -> None:
            if kind != "-":
                s._sub2 = True

        _Handlers._forward(s, cmd, name, out, n=len(channels), hook=hook)

    @staticmethod
    def unsubscribe(s: Session, cmd: Command, out: list[bytes]) -> None:
        name = _Handlers._rbac_outside_multi(s, cmd)
        if name is None:
            return
        kind_set = s._subs[_UNSUBSCRIBE[name]]
        channels = cmd.argv[1:]
        if channels:
            n = len(channels)
            kind_set.difference_update(channels)
        else:
            n = max(1, len(kind_set))
            kind_set.clear()
        if s._proto >= 3:
            _Handlers._forward(s, cmd, name, out, n=n, push=True)
            return
        remaining = sum(len(x) for x in s._subs)

        def hook(kind: str, done: bool) -> None:
            if done:
                s._sub2 = remaining > 0

        _Handlers._forward(s, cmd, name, out, n=n, hook=hook)

    @staticmethod
    def monitor(s: Session, cmd: Command, out: list[bytes]) -> None:
        name = _Handlers._rbac_outside_multi(s, cmd)
        if name is None:
            return
        s._monitor_cmd = True

        def hook(kind: str, done: bool) -> None:
            if kind == "-":
                s._monitor_cmd = False
            else:
                s._monitor = True

        _Handlers._forward(s, cmd, name, out, hook=hook)

    @staticmethod
    def reset(s: Session, cmd: Command, out: list[bytes]) -> None:
        if s._monitor_cmd:
            s._deny(cmd, "RESET", "only QUIT is accepted after MONITOR")
            return
        name, ok = _Handlers._rbac(s, cmd)
        if not ok:
            return
        initial = max(s.ctx.logical_db, 0)

        def hook(kind: str, done: bool) -> None:
            if kind != "-":
                s._sub2 = False
                s._framer.protocol = 2

        s._proto = 2
        s._noreply = 0  # RESET turns replies back on, and answers
        s._skip_next = False
        s._in_multi = s._multi_bad = False
        for x in s._subs:
            x.clear()
        s._logical_db = initial
        s._set_access(s._initial_db)
        _Handlers._forward(s, cmd, name, out, hook=hook)
        # RESET logs the connection out: the proxy authenticates again, silently.
        assert s._up is not None
        if s._up.auth_command:
            out.append(s._up.auth_command)
            s._expect(1, swallow=True)
        if initial:
            out.append(encode_command("SELECT", str(initial)))
            s._expect(1, swallow=True)

    @staticmethod
    def quit(s: Session, cmd: Command, out: list[bytes]) -> None:
        s._audit_query(cmd, "QUIT", None)
        s._local(_OK)
        s._closing = True

    @staticmethod
    def client(s: Session, cmd: Command, out: list[bytes]) -> None:
        name, ok = _Handlers._rbac(s, cmd)
        if not ok:
            return
        if name == "CLIENT|REPLY":
            if s._in_multi:  # queued, it would take effect at EXEC
                s._deny(cmd, name, "CLIENT REPLY inside MULTI is not supported by Cachegate; "
                        "send it outside the transaction")
                return
            mode = cmd.argv[2].upper() if len(cmd.argv) == 3 else b""
            if mode == b"ON":
                s._noreply = 0  # its +OK comes
            elif mode == b"OFF":
                s._noreply = _REPLY_OFF
            elif mode == b"SKIP":
                if s._noreply != _REPLY_OFF:
                    s._skip_next = True
                _Handlers._forward(s, cmd, name, out, n=0)
                return
            _Handlers._forward(s, cmd, name, out)
            return
        if name == "CLIENT|LIST" and not s._access.explicitly_allows(name, lookup(cmd.name, cmd.argv).categories):
            # Every session reaches the database as the proxy: other connections are other
            # people's sessions. Only a role that names CLIENT LIST sees them.
            if s._in_multi:
                s._deny(cmd, name, "CLIENT LIST inside MULTI is not supported by Cachegate; "
                        "send it outside the transaction")
                return
            assert s._up is not None
            client_id = s._up.client_id
            _Handlers._forward(s, cmd, name, out, transform=lambda f: own_client_lines(f, client_id))
            return
        _Handlers._forward(s, cmd, name, out)

    @staticmethod
    def proxy_business(s: Session, cmd: Command, out: list[bytes]) -> None:
        """ACL, CONFIG, MIGRATE: what touches the proxy's credentials is refused whatever
        the roles say; CONFIG GET replies lose the values of secret parameters."""
        refusal = proxy_refusal(cmd.name, cmd.argv)
        if refusal is not None:
            s._deny(cmd, lookup(cmd.name, cmd.argv).name, refusal)
            return
        name, ok = _Handlers._rbac(s, cmd)
        if not ok:
            return
        if name == "CONFIG|GET":
            if s._in_multi:
                s._deny(cmd, name, "CONFIG GET inside MULTI is not supported by Cachegate; "
                        "send it outside the transaction")
                return
            _Handlers._forward(s, cmd, name, out, transform=redact_config_reply)
            return
        if name == "MIGRATE" and not _Handlers._other_dbs_allowed(s, cmd, name):
            return
        _Handlers._forward(s, cmd, name, out)

    @staticmethod
    def script(s: Session, cmd: Command, out: list[bytes]) -> None:
        """EVAL, FCALL, SCRIPT/FUNCTION LOAD...: Redis runs a script's commands without the
        proxy seeing them, so scripts run only where they cannot do more than the roles
        allow (no deny of a command a script may call, every logical database allowed), or
        where a role allows them explicitly (@scripting or the command by name)."""
        info = lookup(cmd.name, cmd.argv)
        name, ok = _Handlers._rbac(s, cmd)
        if not ok:
            return
        if info.name in SCRIPT_RUNNERS and not s._scripts_allowed(info.name):
            s._deny(cmd, name, f"{name.replace('|', ' ')} is refused by Cachegate: your roles deny "
                    "some commands or limit the logical databases, and Redis runs a script's commands "
                    "without the proxy seeing them; ask an administrator for a role that allows "
                    "@scripting explicitly (see docs/rbac.md)")
            return
        _Handlers._forward(s, cmd, name, out)

    @staticmethod
    def replication(s: Session, cmd: Command, out: list[bytes]) -> None:
        s._deny(cmd, cmd.name, f"{cmd.name} (replication) is not supported by Cachegate")


def _mib(n: int) -> str:
    return f"{n / (1 << 20):g}MiB" if n >= 1 << 20 else f"{n}B"


def _known(counts: dict[str, int]) -> dict[str, int]:
    """Command counts with the names the table does not know folded into ``OTHER``."""
    out: dict[str, int] = {}
    for name, n in counts.items():
        key = name if name in KNOWN_NAMES else "OTHER"
        out[key] = out.get(key, 0) + n
    return out


def _own_user_error(s: Session, user: str) -> str | None:
    if user == s.ctx.db_user:
        return None
    return (f'ERR AUTH as db user "{user[:64]}" is not allowed: this Cachegate session is db user '
            f'"{s.ctx.db_user}" (Cachegate authenticates for you; connect with --db-user to change)')


_SPECIAL: dict[str, Callable[[Session, Command, list[bytes]], None]] = {
    "AUTH": _Handlers.auth,
    "HELLO": _Handlers.hello,
    "SELECT": _Handlers.select,
    "MOVE": _Handlers.other_db,
    "SWAPDB": _Handlers.other_db,
    "COPY": _Handlers.other_db,
    "FLUSHALL": _Handlers.flushall,
    "MULTI": _Handlers.multi,
    "EXEC": _Handlers.exec_,
    "DISCARD": _Handlers.discard,
    "SUBSCRIBE": _Handlers.subscribe,
    "PSUBSCRIBE": _Handlers.subscribe,
    "SSUBSCRIBE": _Handlers.subscribe,
    "UNSUBSCRIBE": _Handlers.unsubscribe,
    "PUNSUBSCRIBE": _Handlers.unsubscribe,
    "SUNSUBSCRIBE": _Handlers.unsubscribe,
    "MONITOR": _Handlers.monitor,
    "RESET": _Handlers.reset,
    "QUIT": _Handlers.quit,
    "CLIENT": _Handlers.client,
    "ACL": _Handlers.proxy_business,
    "CONFIG": _Handlers.proxy_business,
    "MIGRATE": _Handlers.proxy_business,
    "EVAL": _Handlers.script,
    "EVALSHA": _Handlers.script,
    "EVAL_RO": _Handlers.script,
    "EVALSHA_RO": _Handlers.script,
    "FCALL": _Handlers.script,
    "FCALL_RO": _Handlers.script,
    "SCRIPT": _Handlers.script,
    "FUNCTION": _Handlers.script,
    "SYNC": _Handlers.replication,
    "PSYNC": _Handlers.replication,
    "REPLCONF": _Handlers.replication,
}

assert cmdtable  # the table module is part of this package's contract
