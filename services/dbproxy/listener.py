"""The RESP listener: TLS 1.2+ with user certificates, then one :class:`Session` each.

The TLS layer verifies the client certificate's chain against the user CA but
not its validity period (OpenSSL's ``X509_V_FLAG_NO_CHECK_TIME``), and a client
may connect without a certificate: both are then refused *after* the handshake
with a RESP error the client prints (``(error) ERR your certificate expired
...``), not a bare TLS alert. A certificate from another CA still fails the
handshake (it proves nothing).

After the handshake the injected ``authorize(cert, peer_addr)`` coroutine builds
the :class:`SessionContext` (identity, route, roles, upstream) or raises to refuse
(:class:`Refused`, ``PermissionError``, ``ValueError`` or ``LookupError``: their
message goes to the client; any other exception is logged and the client gets a
generic message).

Bounded whatever clients send: TCP is accepted plain and TLS started under a count
of handshakes in progress (``max_handshakes``; past it a connection is closed at
once, and a handshake not done within ``tls_handshake_timeout`` is dropped with its
memory); connections past the handshake are bounded by ``max_sessions`` and per
user by the roles' ``max_connections`` (else ``sessions_per_user``), refused with a
RESP error; all sessions share one :class:`RequestBudget` for incomplete commands.
Every refusal is counted (``sessions.refused`` by reason).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import os
import socket
import ssl
import tempfile
from collections.abc import Awaitable, Callable
from typing import Any

from cryptography import x509
from opentelemetry import trace

from services.dbproxy import metrics as dbmetrics
from services.dbproxy.limits import ProxyLimits, RequestBudget
from services.dbproxy.metrics import ProxyMetrics
from services.dbproxy.session import AuditSink, Session, SessionContext, refuse

__all__ = ["Refused", "RespListener", "server_ssl_context"]

log = logging.getLogger("cachegate.dbproxy.resp")

# OpenSSL X509_V_FLAG_NO_CHECK_TIME: verify the chain, not the dates (checked after).
_NO_CHECK_TIME = 0x200000

Authorize = Callable[[x509.Certificate, Any], Awaitable[SessionContext]]


class Refused(Exception):
    """Raised by ``authorize`` to refuse a connection; ``str()`` is shown to the client."""


def server_ssl_context(cert_pem: bytes, key_pem: bytes, client_ca_pem: bytes) -> ssl.SSLContext:
    """TLS 1.2+ server context; client certificates from ``client_ca_pem`` (chain only)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    with tempfile.TemporaryDirectory() as tmp:
        cert_path = os.path.join(tmp, "cert.pem")
        key_path = os.path.join(tmp, "key.pem")
        with open(cert_path, "wb") as f:
            f.write(cert_pem)
        fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(key_pem)
        ctx.load_cert_chain(cert_path, key_path)
    ctx.load_verify_locations(cadata=client_ca_pem.decode() if isinstance(client_ca_pem, bytes) else client_ca_pem)
    ctx.verify_mode = ssl.CERT_OPTIONAL
    ctx.verify_flags = ctx.verify_flags | _NO_CHECK_TIME
    # One TLS 1.3 ticket per handshake (OpenSSL sends two): enough for a client to resume
    # its next connection (which gets a ticket of its own), and each ticket costs the
    # server about 0.13 ms, 5% of a new session, whether the client ever resumes or not.
    ctx.num_tickets = 1
    return ctx


_PASSED_THROUGH = (Refused, PermissionError, ValueError, LookupError)


class RespListener:
    """``authorize``: async (cert, peer_addr) -> SessionContext, raising to refuse.
    ``audit``: the sink (an :class:`~services.dbproxy.auditspool.AuditSpool`).
    Either ``ssl_context`` or (``cert_pem``, ``key_pem``, ``client_ca_pem``)."""

    def __init__(
        self,
        authorize: Authorize,
        audit: AuditSink,
        *,
        ssl_context: ssl.SSLContext | None = None,
        cert_pem: bytes | None = None,
        key_pem: bytes | None = None,
        client_ca_pem: bytes | None = None,
        limits: ProxyLimits | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        authorize_timeout: float = 10.0,
        metrics: ProxyMetrics | None = None,
        reuse_port: bool = False,
    ) -> None:
        if ssl_context is None:
            if not (cert_pem and key_pem and client_ca_pem):
                raise ValueError("give ssl_context, or cert_pem, key_pem and client_ca_pem")
            ssl_context = server_ssl_context(cert_pem, key_pem, client_ca_pem)
        self.ssl_context = ssl_context
        self.authorize = authorize
        self.audit = audit
        self.limits = limits or ProxyLimits()
        self.host = host
        self.port = port
        self.authorize_timeout = authorize_timeout
        # SO_REUSEPORT: several worker processes listen on one port (the kernel spreads connections).
        self.reuse_port = reuse_port
        # The process's instruments (services.common.telemetry.setup_metrics) unless given.
        self.metrics = metrics if metrics is not None else dbmetrics.default()
        self.sessions: set[Session] = set()
        self._per_user: dict[str, int] = {}
        self.budget = RequestBudget(self.limits.request_buffer)
        self.handshakes = 0  # TLS handshakes in progress
        self.admitted = 0  # connections past the handshake (authorizing, refusing or in a session)
        self.ended = 0  # sessions that ended (their memory is given back by limits.MallocTrimmer)
        self._handlers: set[asyncio.Task] = set()
        self._sock: socket.socket | None = None
        self._accept_task: asyncio.Task | None = None

    async def start(self) -> int:
        """Listen; returns the bound port."""
        family = socket.getaddrinfo(self.host or None, self.port, type=socket.SOCK_STREAM,
                                    flags=socket.AI_PASSIVE)[0][0]
        dual = family == socket.AF_INET6 and self.host in ("", "::") and socket.has_dualstack_ipv6()
        sock = socket.create_server((self.host, self.port), family=family, backlog=1024, dualstack_ipv6=dual,
                                    reuse_port=self.reuse_port)
        sock.setblocking(False)
        self._sock = sock
        self.port = sock.getsockname()[1]
        self._accept_task = asyncio.get_running_loop().create_task(self._accept_loop(sock), name="resp-accept")
        return self.port

    async def close(self, grace: float = 5.0) -> None:
        """Stop accepting; drain live sessions (they are audited): each reads no new command,
        delivers the replies of the commands already sent, and is told to reconnect; what
        is still open after ``grace`` seconds is ended."""
        if self._accept_task is not None:
            self._accept_task.cancel()
            await asyncio.gather(self._accept_task, return_exceptions=True)
            self._accept_task = None
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        for s in list(self.sessions):
            s.drain("the proxy is shutting down", max(grace - 1.0, 0.5))
        if self._handlers:
            await asyncio.wait(list(self._handlers), timeout=grace)
        for t in list(self._handlers):
            t.cancel()

    def session_count(self, user: str) -> int:
        """Live sessions of ``user`` (kept as they start and end: no walk over every session)."""
        return self._per_user.get(user, 0)

    def terminate(self, predicate: Callable[[Session], bool], reason: str) -> int:
        """End every live session for which ``predicate`` is true (a lock on a user or
        a role); returns how many."""
        hit = [s for s in self.sessions if predicate(s)]
        for s in hit:
            s.terminate(reason)
        return len(hit)

    # -- per connection ------------------------------------------------------------------------

    async def _accept_loop(self, lsock: socket.socket) -> None:
        """Accept TCP connections; TLS starts only for those within ``max_handshakes`` (the
        socket is not read before: the ClientHello is the TLS layer's)."""
        loop = asyncio.get_running_loop()
        while True:
            try:
                sock, _ = await loop.sock_accept(lsock)
            except OSError as exc:  # out of file descriptors, mostly: wait instead of spinning
                log.warning("RESP listener cannot accept connections: %s", exc)
                await asyncio.sleep(0.1)
                continue
            if self.handshakes >= self.limits.max_handshakes:
                self.metrics.session_refused("too_many_handshakes")
                sock.close()
                continue
            self.handshakes += 1
            task = loop.create_task(self._on_client(sock))
            self._handlers.add(task)
            task.add_done_callback(self._handlers.discard)

    async def _on_client(self, sock: socket.socket) -> None:
        try:
            pair = await self._handshake(sock)
        finally:
            self.handshakes -= 1
        if pair is None:
            return
        reader, writer = pair
        self.admitted += 1
        try:
            await self._serve(reader, writer)
        except Exception:  # noqa: BLE001 - one connection must never take the listener down
            log.exception("RESP connection handler failed")
            writer.close()
        finally:
            self.admitted -= 1

    async def _handshake(self, sock: socket.socket) -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
        """TLS on the accepted socket within ``tls_handshake_timeout``: the streams, or None
        after closing it (there is no TLS yet to carry an error)."""
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=max(self.limits.read_chunk * 2, 1 << 16), loop=loop)
        protocol = asyncio.StreamReaderProtocol(reader, loop=loop)
        try:
            transport, _ = await loop.connect_accepted_socket(
                lambda: protocol, sock, ssl=self.ssl_context,
                ssl_handshake_timeout=self.limits.tls_handshake_timeout)
        except (TimeoutError, ssl.SSLError, ConnectionError, OSError) as exc:
            # asyncio and uvloop abort a slow handshake with "SSL handshake is taking longer than".
            timed_out = isinstance(exc, TimeoutError) or "taking longer" in str(exc)
            self.metrics.session_refused("handshake_timeout" if timed_out else "handshake_failed")
            sock.close()
            return None
        return reader, asyncio.StreamWriter(transport, protocol, reader, loop)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        source = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) and len(peer) >= 2 else str(peer or "")
        sock = writer.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass
        tracer = self.metrics.tracer
        # One span for the start of the session (certificate, authorization, RBAC,
        # credentials, upstream connect); the Session ends it once relaying begins.
        span = tracer.start_span("dbproxy session start", attributes={"client.address": source})
        try:
            with trace.use_span(span, end_on_exit=False):
                session = await self._start(reader, writer, source, peer, span, tracer)
        except BaseException as exc:
            span.record_exception(exc)
            span.end()
            raise
        if session is None:
            span.end()
            return
        self.sessions.add(session)
        per_user, user = self._per_user, session.user
        per_user[user] = per_user.get(user, 0) + 1
        try:
            await session.run()
        finally:
            self.sessions.discard(session)
            left = per_user[user] - 1
            if left:
                per_user[user] = left
            else:
                del per_user[user]
            self.ended += 1

    async def _start(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, source: str, peer: Any,
                     span: trace.Span, tracer: trace.Tracer) -> Session | None:
        """Check the certificate and authorize; the Session to run, or None after a refusal."""
        linger = self.limits.refusal_linger

        async def refused(code: str, actor: str, audit_error: str, message: str) -> None:
            span.set_status(trace.Status(trace.StatusCode.ERROR, code))
            self.metrics.session_refused(code)
            self._audit_refusal(actor, source, audit_error)
            await refuse(reader, writer, message, linger)

        if self.admitted > self.limits.max_sessions:
            total = self.limits.max_sessions
            await refused("max_sessions", "", "the proxy's session limit was reached",
                          f"the proxy has reached its limit of {total} sessions; try again later "
                          "(an administrator can raise limits.max_sessions)")
            return None
        with tracer.start_as_current_span("certificate check"):
            sslobj = writer.get_extra_info("ssl_object")
            der = sslobj.getpeercert(binary_form=True) if sslobj is not None else None
            cert = x509.load_der_x509_certificate(der) if der else None
            actor = _common_name(cert) if cert is not None else ""
            now = dt.datetime.now(dt.timezone.utc)
        if cert is None:
            await refused("no_certificate", "", "no client certificate",
                          "a client certificate is required: run `cgate db login DATABASE` "
                          "and connect with redis-cli --tls --cert CERT --key KEY --cacert CA")
            return None
        span.set_attribute("cachegate.user", actor)
        if cert.not_valid_after_utc <= now:
            when = cert.not_valid_after_utc.strftime("%Y-%m-%d %H:%M:%S UTC")
            await refused("certificate_expired", actor, "certificate expired",
                          f"your certificate expired at {when}; run `cgate db login` "
                          "for the database and connect again")
            return None
        if cert.not_valid_before_utc > now + dt.timedelta(minutes=5):
            await refused("certificate_not_yet_valid", actor, "certificate not yet valid",
                          "your certificate is not valid yet; check this machine's clock")
            return None
        try:
            with tracer.start_as_current_span("authorize"):
                ctx = await asyncio.wait_for(self.authorize(cert, peer), self.authorize_timeout)
        except _PASSED_THROUGH as exc:
            message = (str(exc).splitlines() or ["access denied"])[0]
            await refused("denied", actor, message, message)
            return None
        except TimeoutError:
            await refused("authorize_timeout", actor, "authorization timed out",
                          "the proxy could not authorize this session in time; try again")
            return None
        except Exception:  # noqa: BLE001 - the client gets a generic message, the log the details
            log.exception("authorize failed for %s", actor)
            await refused("internal_error", actor, "internal error",
                          "the proxy could not authorize this session (internal error; see the proxy log)")
            return None
        if not ctx.source_addr:
            ctx.source_addr = source
        if ctx.expires_at is None:
            ctx.expires_at = cert.not_valid_after_utc.timestamp()
        by_role = ctx.roles.max_connections
        limit = by_role or self.limits.sessions_per_user
        if self.session_count(ctx.user) >= limit:
            where = "max_connections of your roles" if by_role else "the proxy's sessions_per_user"
            await refused("too_many_sessions", ctx.user, "too many sessions",
                          f"too many sessions for user {ctx.user} (limit {limit}, {where}); "
                          "close some and try again")
            return None
        return Session(ctx, reader, writer, self.audit, self.limits, metrics=self.metrics, start_span=span,
                       budget=self.budget)

    def _audit_refusal(self, actor: str, source: str, error: str) -> None:
        self.audit.emit("db.session.start", actor, source_addr=source, success=False, error=error,
                        fields={"reason": "refused"})


def _common_name(cert: x509.Certificate) -> str:
    try:
        attrs = cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
        return str(attrs[0].value) if attrs else ""
    except Exception:  # noqa: BLE001
        return ""

