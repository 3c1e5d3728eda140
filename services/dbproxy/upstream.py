"""The proxy's own connection to the database: TLS, AUTH by the proxy, SELECT.

The user never sees the database's secret: a :class:`CredentialProvider` gives
the proxy ``(username or None, password)``; for Azure that is the access key
from ``listKeys`` (cached by the provider). When Redis answers ``WRONGPASS`` or
``NOAUTH`` (the key was rotated) the provider is asked once more with
``force_refresh=True`` and AUTH is tried again.

Every failure is an :class:`UpstreamError` whose message is one line for the
user, without secrets; an unreachable database names host, port and the check to
run (``nc -zv HOST PORT``), within ``timeout`` seconds.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import hiredis
from opentelemetry import trace

from services.dbproxy.resp import encode_command

log = logging.getLogger("cachegate.dbproxy.upstream")

__all__ = [
    "CredentialProvider",
    "DatabaseTLS",
    "SPARE_NAME",
    "UpstreamPool",
    "StaticCredentials",
    "Upstream",
    "UpstreamError",
    "UpstreamTarget",
    "connect_upstream",
]


class CredentialProvider(Protocol):
    async def get(self, force_refresh: bool = False) -> tuple[str | None, str]:
        """``(username or None, password)``; an empty password means no AUTH."""
        ...


@dataclass
class StaticCredentials:
    """A fixed secret (static databases, tests)."""

    username: str | None
    password: str = field(repr=False)

    async def get(self, force_refresh: bool = False) -> tuple[str | None, str]:
        return self.username, self.password


@dataclass(frozen=True)
class UpstreamTarget:
    """Where the database is. ``ssl`` None means plaintext (only for local tests);
    ``server_hostname`` defaults to ``host`` when TLS is used."""

    name: str
    host: str
    port: int
    ssl: ssl.SSLContext | None = None
    server_hostname: str | None = None

    @property
    def address(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


class _ResumingContext(ssl.SSLContext):
    """A client context that offers each server the TLS session it last had with it.

    A resumed handshake (TLS 1.3 tickets; Redis issues them) skips the certificate exchange
    and its verification: about a fifth of the CPU of opening an upstream connection. It is
    safe: only a server that holds the session's secret can complete one, and the session
    was made with a server whose certificate this context verified for that host name.
    Sessions are kept per host name, and a server that does not know a ticket simply makes
    a full, verified handshake.

    Reading a connection's session costs about 110 µs (Python's ``ssl`` copies it through
    DER, decoding the server's certificate again), so a kept session is replaced only when
    it did not resume, or after ``REFRESH`` seconds; servers accept a ticket again until
    its lifetime ends (OpenSSL's default: two hours)."""

    REFRESH = 60.0

    def __init__(self, *args, **kwargs) -> None:
        super().__init__()
        self._sessions: dict[str, tuple[ssl.SSLSession, float]] = {}

    def wrap_bio(self, incoming, outgoing, server_side=False, server_hostname=None, session=None):
        if session is None and not server_side and server_hostname:
            kept = self._sessions.get(server_hostname)
            if kept is not None:
                session = kept[0]
        return super().wrap_bio(incoming, outgoing, server_side=server_side, server_hostname=server_hostname,
                                session=session)

    def remember(self, ssl_object, server_hostname: str) -> None:
        """Keep the session of a connection that is now authenticated (its tickets have come)."""
        if ssl_object is None:
            return
        now = time.monotonic()
        kept = self._sessions.get(server_hostname)
        if kept is not None and now - kept[1] < self.REFRESH and ssl_object.session_reused:
            return  # the kept one still works
        session = getattr(ssl_object, "session", None)
        if session is not None and session.has_ticket:
            if len(self._sessions) >= 256 and server_hostname not in self._sessions:
                self._sessions.clear()
            self._sessions[server_hostname] = (session, now)
        elif kept is not None and not ssl_object.session_reused:
            del self._sessions[server_hostname]  # it no longer resumes and there is no newer one


class DatabaseTLS:
    """TLS client contexts for databases, one per CA bundle, made once and kept.

    Making a context parses every CA it trusts (the system's bundle takes tens of
    milliseconds); made per session, that was a sixth of a new session's CPU. A context
    trusts the record's own CA (``ca_pem``) or else the system's, and every file of
    ``ca_files`` (``dbproxy_service.database_ca_files``): a change to one of them (its size
    or time) makes new contexts from then on, so a rotated bundle needs no restart. Each
    context resumes TLS sessions with the servers it has verified (:class:`_ResumingContext`)."""

    MAX = 64  # contexts kept; beyond that the oldest bundles are made again when next used

    def __init__(self, ca_files: list[str] | tuple[str, ...] = ()) -> None:
        self.ca_files = tuple(ca_files)
        self._made: dict[tuple, ssl.SSLContext] = {}

    def _stamp(self) -> tuple:
        out = []
        for path in self.ca_files:
            try:
                st = os.stat(path)
            except OSError:
                out.append(None)  # load_verify_locations says what is wrong
            else:
                out.append((st.st_mtime_ns, st.st_size, st.st_ino))
        return tuple(out)

    def context(self, ca_pem: str | None) -> ssl.SSLContext:
        key = (ca_pem or "", self._stamp())
        ctx = self._made.get(key)
        if ctx is not None:
            return ctx
        # What ssl.create_default_context() makes for a client (certificate and host name
        # required), as a context that resumes sessions.
        ctx = _ResumingContext(ssl.PROTOCOL_TLS_CLIENT)
        if ca_pem:
            ctx.load_verify_locations(cadata=ca_pem)
        else:
            ctx.load_default_certs(ssl.Purpose.SERVER_AUTH)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        for path in self.ca_files:
            ctx.load_verify_locations(cafile=path)
        if len(self._made) >= self.MAX:
            del self._made[next(iter(self._made))]
        self._made[key] = ctx
        return ctx


class UpstreamError(Exception):
    """A user-facing one-line message; ``reason`` is a short code for the audit
    (``unreachable``, ``tls``, ``credentials``, ``auth``, ``select``, ``protocol``)."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


_CLIENT_ID = encode_command("CLIENT", "ID")
_AUTH_RETRY_CODES = (b"WRONGPASS", b"NOAUTH", b"ERR invalid password", b"ERR invalid username")


@dataclass
class Upstream:
    """A connected, authenticated upstream. ``auth_command`` re-authenticates it (after
    RESET): it is kept private and must never be logged or audited."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    target: UpstreamTarget
    logical_db: int
    auth_command: bytes = field(repr=False, default=b"")
    client_id: int = -1  # the database's CLIENT ID of this connection (-1: unknown)
    auth_expires_at: float | None = None  # when its AUTH's credential expires (Entra ID tokens)
    spare: bool = False  # opened ahead by a pool, named SPARE_NAME until a session takes it
    pool_tag: tuple | None = field(repr=False, default=None)  # the pool it came from (UpstreamPool.release)
    served: int = 0  # sessions it served before (given back to its pool and RESET each time)

    def reclaim(self) -> None:
        """Read this connection through its stream again (a session had moved its transport
        to a protocol of its own)."""
        transport = self.writer.transport
        transport.set_protocol(self.writer._protocol)  # noqa: SLF001 - the StreamReaderProtocol it was opened with
        transport.resume_reading()

    def close(self) -> None:
        try:
            self.writer.close()
        except Exception:  # noqa: BLE001 - best effort on any transport state
            pass


def _why(exc: BaseException) -> str:
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, socket.gaierror):
        return "the host name does not resolve"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.lower()
    return type(exc).__name__


async def _read_replies(reader: asyncio.StreamReader, count: int) -> list:
    parser = hiredis.Reader(notEnoughData=Ellipsis)
    out: list = []
    while len(out) < count:
        data = await reader.read(65536)
        if not data:
            raise UpstreamError("the database closed the connection during setup", "protocol")
        parser.feed(data)
        while len(out) < count:
            item = parser.gets()
            if item is Ellipsis:
                break
            out.append(item)
    return out


def _err_text(reply: object) -> str:
    text = str(reply).splitlines()[0] if str(reply) else "error"
    return text[:200]


async def connect_upstream(
    target: UpstreamTarget,
    credentials: CredentialProvider,
    logical_db: int = 0,
    *,
    timeout: float = 10.0,
    on_auth_refused: Callable[[], None] | None = None,
    tracer: trace.Tracer | None = None,
    name: str = "",
) -> Upstream:
    """Connect, AUTH (retrying once with refreshed credentials), SELECT; all within
    ``timeout`` seconds. Raises :class:`UpstreamError`. ``on_auth_refused`` is called
    each time the database refuses the proxy's AUTH (a rotated key that the retry heals
    included). Traced with ``tracer`` (default: the process's) as spans ``upstream
    connect``, ``credentials``, ``upstream auth``."""
    nc = f"nc -zv {target.host} {target.port}"
    where = f'database "{target.name}" at {target.address}'
    tracer = tracer or trace.get_tracer("cachegate.dbproxy")
    try:
        async with asyncio.timeout(timeout):
            try:
                with tracer.start_as_current_span("upstream connect", attributes={
                        "db.system": "redis", "server.address": target.host, "server.port": target.port,
                        "db.tls": target.ssl is not None}):
                    reader, writer = await asyncio.open_connection(
                        target.host,
                        target.port,
                        ssl=target.ssl,
                        server_hostname=(target.server_hostname or target.host) if target.ssl else None,
                        limit=1 << 20,
                    )
            except ssl.SSLError as exc:
                raise UpstreamError(
                    f"TLS handshake with {where} failed: {exc.reason or exc.__class__.__name__}; "
                    "check the database's CA configuration",
                    "tls",
                ) from None
            except OSError as exc:
                raise UpstreamError(
                    f"cannot reach {where} ({_why(exc)}); check that the proxy host can reach it: {nc}",
                    "unreachable",
                ) from None
            try:
                sock = writer.get_extra_info("socket")
                if sock is not None:
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                auth_cmd, expires_at = await _authenticate(reader, writer, target, credentials, tracer,
                                                           on_auth_refused)
                # One round trip: the logical database, and the connection's id (a session is
                # shown only its own line of CLIENT LIST).
                setup = [encode_command("SELECT", str(logical_db))] if logical_db else []
                if name:
                    setup.append(encode_command("CLIENT", "SETNAME", name))
                setup.append(_CLIENT_ID)
                writer.write(b"".join(setup))
                replies = await _read_replies(reader, len(setup))
                if logical_db and isinstance(replies[0], hiredis.ReplyError):
                    raise UpstreamError(
                        f"cannot select logical database {logical_db} on \"{target.name}\": "
                        f"{_err_text(replies[0])}",
                        "select",
                    )
                client_id = replies[-1] if isinstance(replies[-1], int) else -1
                remember = getattr(target.ssl, "remember", None)
                if remember is not None:  # a DatabaseTLS context: resume with this server next time
                    remember(writer.get_extra_info("ssl_object"), target.server_hostname or target.host)
            except BaseException:
                writer.close()
                raise
    except TimeoutError:
        err = UpstreamError(
            f"cannot reach {where} (no answer within {timeout:g}s); "
            f"check that the proxy host can reach it: {nc}",
            "unreachable",
        )
        err.timed_out = True  # database health counts timeouts apart  # type: ignore[attr-defined]
        raise err from None
    except (ConnectionError, ssl.SSLError, OSError) as exc:
        raise UpstreamError(
            f"the connection to {where} failed during setup ({_why(exc)}); check it with: {nc}",
            "unreachable",
        ) from None
    return Upstream(reader, writer, target, logical_db, auth_cmd, client_id, expires_at, bool(name))


async def _authenticate(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    target: UpstreamTarget,
    credentials: CredentialProvider,
    tracer: trace.Tracer,
    on_auth_refused: Callable[[], None] | None,
) -> tuple[bytes, float | None]:
    """AUTH with the provider's credentials; on WRONGPASS/NOAUTH refresh once. Returns the AUTH
    command and, for a credential that expires (an Entra ID token), when it does."""
    expiring = getattr(credentials, "expiring", None)
    for attempt in (0, 1):
        expires_at = None
        try:
            with tracer.start_as_current_span("credentials", attributes={"refresh": bool(attempt)}):
                if expiring is not None:
                    username, password, expires_at = await expiring(force_refresh=bool(attempt))
                else:
                    username, password = await credentials.get(force_refresh=bool(attempt))
        except UpstreamError:
            raise
        except Exception as exc:  # noqa: BLE001 - the provider's failure, reported in one line
            first = (str(exc).splitlines() or [type(exc).__name__])[0][:300]
            raise UpstreamError(
                f'the proxy could not get credentials for database "{target.name}": {first}',
                "credentials",
            ) from None
        if not password:
            return b"", None
        cmd = encode_command("AUTH", username, password) if username else encode_command("AUTH", password)
        with tracer.start_as_current_span("upstream auth") as span:
            writer.write(cmd)
            (reply,) = await _read_replies(reader, 1)
            if not isinstance(reply, hiredis.ReplyError):
                return cmd, expires_at
            text = str(reply)
            span.set_status(trace.Status(trace.StatusCode.ERROR, text.split(" ", 1)[0] if text else "ERR"))
        if on_auth_refused is not None:
            on_auth_refused()
        if attempt == 0 and text.encode().startswith(_AUTH_RETRY_CODES):
            continue
        code = text.split(" ", 1)[0] if text else "ERR"
        raise UpstreamError(
            f'the proxy could not authenticate to database "{target.name}": the server answered '
            f"{code}; check the credentials configured for it (or its access keys in Azure)",
            "auth",
        )
    raise AssertionError("unreachable")  # pragma: no cover


# The client name of a spare connection while it waits (CLIENT LIST tells them from sessions);
# the session that takes one clears it.
SPARE_NAME = "cachegate-spare"
CLEAR_NAME = encode_command("CLIENT", "SETNAME", "")
_SPARE_SETNAME = encode_command("CLIENT", "SETNAME", SPARE_NAME)
_RESET = encode_command("RESET")


class UpstreamPool:
    """Upstream connections opened and authenticated ahead of need, so that a new session
    costs the client's handshake only.

    Per database (name and address) up to ``size`` connections wait, filled in the
    background when fewer wait; a waiting connection older than ``max_age`` seconds, or
    one the database closed or wrote to, is dropped; with none ready, :meth:`get`
    connects as :func:`connect_upstream` does (and reports its errors the same way).
    :meth:`forget` drops a database's connections (its record changed).

    A session that ends cleanly gives its connection back (:meth:`release`): it is RESET
    (database 0, no name, RESP2, no MULTI, WATCH, subscriptions, tracking or MONITOR, and
    logged out), authenticated again with the proxy's own credentials and waits for the
    next session, so that a new session costs no handshake to the database. Only
    connections of sessions that sent nothing RESET might not undo come back
    (:attr:`~services.dbproxy.sessioncore.SessionCore.reusable`); any surprise on the way
    (an error, a stray byte, a timeout, a changed record, an expiring token) closes it.
    At most ``max_idle`` wait per database."""

    def __init__(self, size: int = 4, max_age: float = 60.0, *, timeout: float = 10.0,
                 health=None, max_idle: int = 64) -> None:
        self.size = size
        self.health = health  # a health.DatabaseHealth: spare connects count too
        self.max_age = max_age
        self.timeout = timeout
        self.max_idle = max(max_idle, size)
        self._ready: dict[tuple, list[tuple[float, Upstream]]] = {}
        self._filling: dict[tuple, asyncio.Task] = {}
        self._gen: dict[str, int] = {}  # per database name: +1 at each forget
        self._recycling: set[asyncio.Task] = set()
        self.reused = 0  # connections given to a session after serving an earlier one

    @staticmethod
    def _key(target: UpstreamTarget) -> tuple:
        return (target.name, target.host, target.port, target.ssl is not None)

    async def get(self, target: UpstreamTarget, credentials: CredentialProvider, logical_db: int = 0, *,
                  timeout: float = 10.0, on_auth_refused: Callable[[], None] | None = None,
                  tracer: trace.Tracer | None = None) -> Upstream:
        key = self._key(target)
        tag = (key, self._gen.get(target.name, 0))
        ready = self._ready.get(key)
        now = asyncio.get_running_loop().time()
        up = None
        while ready:
            created, candidate = ready.pop()
            if now - created < self.max_age and _usable(candidate):
                up = candidate
                break
            candidate.close()
        if len(ready or ()) < self.size:
            self._fill(key, target, credentials)
        if up is None:
            up = await connect_upstream(target, credentials, logical_db, timeout=timeout,
                                        on_auth_refused=on_auth_refused, tracer=tracer)
            up.pool_tag = tag
            return up
        up.pool_tag = tag
        if up.served:
            self.reused += 1
        if logical_db:
            try:
                async with asyncio.timeout(timeout):
                    up.writer.write(encode_command("SELECT", str(logical_db)))
                    (reply,) = await _read_replies(up.reader, 1)
            except (TimeoutError, OSError, UpstreamError):
                up.close()
                return await connect_upstream(target, credentials, logical_db, timeout=timeout,
                                              on_auth_refused=on_auth_refused, tracer=tracer)
            except BaseException:  # cancelled (the session ended meanwhile): it goes too
                up.close()
                raise
            if isinstance(reply, hiredis.ReplyError):
                up.close()
                raise UpstreamError(f'cannot select logical database {logical_db} on "{target.name}": '
                                    f"{_err_text(reply)}", "select")
            up.logical_db = logical_db
        return up

    def _fill(self, key: tuple, target: UpstreamTarget, credentials: CredentialProvider) -> None:
        task = self._filling.get(key)
        if task is not None and not task.done():
            return
        self._filling[key] = asyncio.get_running_loop().create_task(
            self._fill_up(key, target, credentials), name=f"upstream-pool {target.name}")

    async def _fill_up(self, key: tuple, target: UpstreamTarget, credentials: CredentialProvider) -> None:
        loop = asyncio.get_running_loop()
        ready = self._ready.setdefault(key, [])
        while len(ready) < self.size:
            try:
                up = await connect_upstream(target, credentials, 0, timeout=self.timeout, name=SPARE_NAME)
            except UpstreamError as exc:
                # The next session connects itself and reports the problem to its user.
                log.debug("could not open a spare connection to %s: %s", target.name, exc.reason)
                if self.health is not None:
                    self.health.failure(target.name, exc)
                return
            if self.health is not None:
                self.health.success(target.name)
            if self._ready.get(key) is not ready:  # forgotten meanwhile
                up.close()
                return
            ready.append((loop.time(), up))
            if up.auth_expires_at is not None:
                # A spare whose token would expire before a session takes it is closed first
                # (Azure would close it); a session renews the token of the one it takes.
                left = up.auth_expires_at - time.time()
                loop.call_later(max(left * 2 / 3, 0.0), self._drop, key, up)

    def release(self, up: Upstream) -> None:
        """Take back the connection of a session that ended cleanly (see the class doc); the
        caller has given up its transport (:meth:`Upstream.reclaim`)."""
        tag = up.pool_tag
        up.pool_tag = None
        if tag is None or up.auth_expires_at is not None or self._gen.get(tag[0][0], 0) != tag[1] \
                or len(self._ready.get(tag[0], ())) + len(self._recycling) >= self.max_idle:
            up.close()
            return
        task = asyncio.get_running_loop().create_task(self._recycle(tag, up), name="upstream-pool reset")
        self._recycling.add(task)
        task.add_done_callback(self._recycling.discard)

    async def _recycle(self, tag: tuple, up: Upstream) -> None:
        key, gen = tag
        cmds = [_RESET, up.auth_command, _SPARE_SETNAME] if up.auth_command else [_RESET, _SPARE_SETNAME]
        try:
            async with asyncio.timeout(self.timeout):
                up.writer.write(b"".join(cmds))
                replies = await _read_replies(up.reader, len(cmds))
        except (TimeoutError, OSError, UpstreamError):
            up.close()
            return
        except asyncio.CancelledError:
            up.close()
            raise
        ready = self._ready.get(key)
        if (replies[0] != b"RESET" or any(isinstance(r, hiredis.ReplyError) for r in replies)
                or not _usable(up) or ready is None or self._gen.get(key[0], 0) != gen
                or len(ready) >= self.max_idle):
            up.close()
            return
        up.logical_db = 0
        up.spare = True
        up.served += 1
        ready.append((asyncio.get_running_loop().time(), up))

    def _drop(self, key: tuple, up: Upstream) -> None:
        ready = self._ready.get(key)
        if ready:
            for i, (_, candidate) in enumerate(ready):
                if candidate is up:
                    del ready[i]
                    up.close()
                    return

    def forget(self, name: str) -> None:
        """Drop the waiting connections of database ``name`` (and those sessions give back)."""
        self._gen[name] = self._gen.get(name, 0) + 1
        for key in [k for k in self._ready if k[0] == name]:
            for _, up in self._ready.pop(key):
                up.close()
            task = self._filling.pop(key, None)
            if task is not None:
                task.cancel()

    async def close(self) -> None:
        for key in list(self._ready):
            self.forget(key[0])
        tasks = [t for t in (*self._filling.values(), *self._recycling) if not t.done()]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._filling.clear()


def _usable(up: Upstream) -> bool:
    """Still connected, and nothing was said on it since it was set up."""
    reader = up.reader
    return not up.writer.is_closing() and not reader.at_eof() and not reader._buffer  # noqa: SLF001
