"""The data plane of Entra ID caches, played by local redis-servers the stand-in administers.

Azure Cache for Redis with Entra ID takes ``AUTH <object id> <token>`` while the token is
valid, and closes a connection whose token has expired unless a fresh token was sent with
AUTH on it first. The stand-in does the same on every ``entra_redis.servers`` entry:

* an ACL user per principal of the state (service principals and the managed identity),
  named by its object id, whose passwords are that principal's Redis tokens that are still
  valid: a token is added when the token endpoint issues it and removed when it expires;
* a MONITOR feed tells when each connection sent AUTH (or HELLO ... AUTH); Redis redacts the
  arguments, so the AUTH is taken to have used the newest token of the connection's user
  that was valid at that moment (a failed AUTH leaves the deadline the connection had);
* every ``enforce_interval`` seconds, CLIENT LIST: a connection logged in as a principal
  whose deadline (its last AUTH's token ``exp``) passed ``grace`` seconds ago is ended with
  CLIENT KILL ID. A connection the stand-in never saw AUTH counts from its connect time.

No token is ever logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import ssl
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .state import EntraRedis, RedisServer

log = logging.getLogger("cachegate.azure_standin.redis")

REDIS_AUDIENCE = "https://redis.azure.com"


@dataclass
class IssuedToken:
    oid: str
    aud: str
    issued: float  # time.time() when issued
    exp: int
    value: str = field(repr=False)
    pruned: bool = False


class TokenBook:
    """The tokens the stand-in issued (values kept for the ACL and for tests only). With a
    ``file`` (0600), the unexpired ones outlive the process: a restarted stand-in (``cachegate
    dev`` restarts a dead one) still honours what it issued, as Azure does."""

    def __init__(self, file: Path | None = None) -> None:
        self.tokens: list[IssuedToken] = []
        self.file = file
        if file is not None and file.exists():
            now = time.time()
            for line in file.read_text().splitlines():
                try:
                    t = IssuedToken(**json.loads(line))
                except (ValueError, TypeError):
                    continue
                if t.exp > now:
                    self.tokens.append(t)
        self._rewrite()

    def _rewrite(self) -> None:
        from services.common.creds import write_private

        if self.file is not None:
            write_private(self.file, "".join(json.dumps(asdict(t)) + "\n" for t in self.tokens).encode())

    def add(self, t: IssuedToken) -> None:
        self.tokens.append(t)
        if self.file is not None:
            with open(self.file, "a") as fh:  # created 0600 by _rewrite
                fh.write(json.dumps(asdict(t)) + "\n")
        if len(self.tokens) > 20000:
            now = time.time()
            self.tokens = [x for x in self.tokens if x.exp > now - 3600] or self.tokens[-10000:]

    def valid(self, oid: str, at: float, aud: str = REDIS_AUDIENCE) -> list[IssuedToken]:
        return [t for t in self.tokens if t.oid == oid and t.aud == aud and t.issued - 1.0 <= at < t.exp]

    def deadline(self, oid: str, at: float) -> float | None:
        """exp of the newest token of ``oid`` valid at ``at`` (None: none was)."""
        valid = self.valid(oid, at)
        return float(max(t.exp for t in valid)) if valid else None


class _Server:
    def __init__(self, spec: RedisServer) -> None:
        self.spec = spec
        self.client: Any = None
        self.auth_seen: dict[str, float] = {}  # "ip:port" -> when it last sent AUTH
        self.deadline: dict[str, float] = {}  # client id -> exp of its last AUTH's token
        self.killed: list[dict[str, Any]] = []
        self.tasks: list[asyncio.Task] = []
        self.ready = asyncio.Event()

    @property
    def where(self) -> str:
        return f"{self.spec.host}:{self.spec.port}"

    def connect(self, socket_timeout: float | None = 10):
        """A client of the server (for MONITOR: ``socket_timeout=None``, as it may be idle for
        as long as nobody sends a command; CLIENT LIST and ACL do not show in MONITOR)."""
        import redis.asyncio as aioredis

        kw: dict[str, Any] = {"host": self.spec.host, "port": self.spec.port, "protocol": 2,
                              "socket_timeout": socket_timeout, "socket_connect_timeout": 5,
                              "username": self.spec.username, "password": self.spec.password,
                              "client_name": "azure-standin"}
        if self.spec.tls:
            kw.update(ssl=True, ssl_ca_certs=self.spec.ca_file, ssl_cert_reqs=ssl.CERT_REQUIRED if self.spec.ca_file
                      else ssl.CERT_NONE, ssl_check_hostname=False)
        return aioredis.Redis(**kw)


class EntraRedisEnforcer:
    """Keeps the principals' ACL users and ends connections with an expired token."""

    def __init__(self, cfg: EntraRedis, book: TokenBook, principals: Callable[[], set[str]]) -> None:
        self.cfg = cfg
        self.book = book
        self.principals = principals
        self.servers = [_Server(s) for s in cfg.servers]

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        for srv in self.servers:
            srv.client = srv.connect()
            srv.tasks = [asyncio.create_task(self._run(srv), name=f"entra-redis {srv.where}")]
        # The users exist before anyone gets a token (a failure is logged and retried).
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(10):
                await asyncio.gather(*(s.ready.wait() for s in self.servers))

    async def stop(self) -> None:
        for srv in self.servers:
            for t in srv.tasks:
                t.cancel()
            await asyncio.gather(*srv.tasks, return_exceptions=True)
            if srv.client is not None:
                with contextlib.suppress(Exception):
                    await srv.client.aclose()

    def status(self) -> list[dict[str, Any]]:
        return [{"server": s.where, "ready": s.ready.is_set(), "deadlines": dict(s.deadline),
                 "killed": list(s.killed)} for s in self.servers]

    # ------------------------------------------------------------------ tokens
    async def wait_token_usable(self, t: IssuedToken, timeout: float = 5.0) -> None:
        """Let the ACL updates land before the token is handed out."""
        if t.aud != REDIS_AUDIENCE:
            return
        for srv in self.servers:
            if srv.ready.is_set():
                with contextlib.suppress(Exception):
                    async with asyncio.timeout(timeout):
                        await self._acl(srv, t.oid, ">" + t.value)

    async def _acl(self, srv: _Server, oid: str, *rules: str) -> None:
        try:
            await srv.client.execute_command("ACL", "SETUSER", oid, *rules)
        except Exception as exc:  # never show the rule: it holds the token
            log.warning("stand-in: cannot update the ACL user %s on %s: %s", oid, srv.where,
                        type(exc).__name__)

    async def _setup(self, srv: _Server) -> None:
        now = time.time()
        for oid in sorted(self.principals()):
            rules = ["reset", "on", *self.cfg.acl_rules]
            rules += [">" + t.value for t in self.book.valid(oid, now)]
            await srv.client.execute_command("ACL", "SETUSER", oid, *rules)
        srv.ready.set()
        log.info("stand-in: Entra ID users ready on %s", srv.where)

    # ------------------------------------------------------------------ loops
    async def _run(self, srv: _Server) -> None:
        delay = 0.2
        while True:
            try:
                if not srv.ready.is_set():
                    await self._setup(srv)
                monitor = asyncio.create_task(self._monitor(srv))
                try:
                    while not monitor.done():
                        await self.enforce(srv)
                        await asyncio.wait({monitor}, timeout=self.cfg.enforce_interval)
                    monitor.result()
                finally:
                    monitor.cancel()
                    await asyncio.gather(monitor, return_exceptions=True)
                delay = 0.2
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("stand-in: redis-server %s: %s: %s; retrying", srv.where, type(exc).__name__,
                            str(exc).splitlines()[0][:200] if str(exc) else "")
                srv.ready.clear()
                # A new client: nothing of a connection that failed mid-command is used again.
                old, srv.client = srv.client, srv.connect()
                with contextlib.suppress(Exception):
                    await old.aclose()
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    async def _monitor(self, srv: _Server) -> None:
        client = srv.connect(socket_timeout=None)
        try:
            async with client.monitor() as m:
                async for cmd in m.listen():
                    words = str(cmd.get("command", "")).split()
                    if not words:
                        continue
                    verb = words[0].upper()
                    if verb == "AUTH" or (verb == "HELLO" and any(w.upper() == "AUTH" for w in words[1:])):
                        addr = f"{cmd.get('client_address')}:{cmd.get('client_port')}"
                        srv.auth_seen[addr] = float(cmd.get("time") or time.time())
        finally:
            with contextlib.suppress(Exception):
                await client.aclose()

    async def enforce(self, srv: _Server) -> list[str]:
        """One pass: expired tokens out of the ACL, expired connections ended. Returns the
        ids of the connections it ended."""
        now = time.time()
        for t in self.book.tokens:
            if not t.pruned and t.aud == REDIS_AUDIENCE and t.exp <= now:
                await self._acl(srv, t.oid, "<" + t.value)
                t.pruned = True
        principals = self.principals()
        clients = await srv.client.client_list()
        live_addrs, live_ids, ended = set(), set(), []
        for c in clients:
            cid, addr, user = str(c.get("id")), str(c.get("addr")), str(c.get("user"))
            live_addrs.add(addr)
            live_ids.add(cid)
            if user not in principals:
                srv.deadline.pop(cid, None)
                continue
            seen = srv.auth_seen.get(addr)
            if seen is None:
                seen = now - float(c.get("age") or 0)
            deadline = self.book.deadline(user, seen)
            if deadline is None:  # that AUTH failed: the connection keeps its login
                deadline = srv.deadline.get(cid, seen)
            srv.deadline[cid] = deadline
            if now > deadline + self.cfg.grace:
                try:
                    await srv.client.execute_command("CLIENT", "KILL", "ID", cid)
                except Exception as exc:
                    log.warning("stand-in: CLIENT KILL %s on %s failed: %s", cid, srv.where, type(exc).__name__)
                    continue
                ended.append(cid)
                srv.killed.append({"id": cid, "addr": addr, "user": user, "expired": deadline, "at": now})
                del srv.killed[:-1000]
                log.info("stand-in: ended connection %s (%s, user %s): the token of its last AUTH expired "
                         "at %s", cid, addr, user, time.strftime("%H:%M:%S", time.localtime(deadline)))
        for a in list(srv.auth_seen):
            if a not in live_addrs:
                del srv.auth_seen[a]
        for i in list(srv.deadline):
            if i not in live_ids:
                del srv.deadline[i]
        return ended
