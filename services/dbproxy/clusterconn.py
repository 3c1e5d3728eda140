"""The asyncio shell of cluster routing: one authenticated connection per primary.

:func:`connect_cluster` asks the database's configured endpoint for its slot map (CLUSTER
SLOTS), connects and authenticates to every primary as :func:`connect_upstream` does (access
key or Entra ID token), and returns a :class:`ClusterUpstream`: what a session writes to
it goes through the sans-io :class:`~services.dbproxy.cluster.ClusterRouter`, and the
router's single reply stream comes back to the session as if from one Redis. A database
that turns out not to be a cluster (``cluster support disabled``) gets a plain
:class:`~services.dbproxy.upstream.Upstream`, so a record that says OSSCluster in error
still works.

Where the proxy connects: the credential goes only to the servers the operator or Azure
named. Over TLS every node's certificate is checked against the configured host name (an
Azure cluster's nodes share its certificate); without TLS (local tests) only nodes on the
configured host are used.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import hiredis
from opentelemetry import trace

from services.common.config import is_loopback
from services.dbproxy.cluster import ClusterRouter, SlotMap, parse_cluster_slots, proxy_node_id, split_name
from services.dbproxy.readbuffer import SharedBufferProtocol
from services.dbproxy.resp import encode_command
from services.dbproxy.upstream import (
    CredentialProvider,
    Upstream,
    UpstreamError,
    UpstreamTarget,
    _read_replies,
    connect_upstream,
)

__all__ = ["ClusterUpstream", "connect_cluster"]

log = logging.getLogger("cachegate.dbproxy.cluster")

_REFRESH_GAP = 0.2  # seconds between slot-map refreshes at most


def node_allowed(target: UpstreamTarget) -> Callable[[str], bool]:
    def allow(name: str) -> bool:
        if target.ssl is not None:
            return True  # its certificate must be valid for the configured host name
        host = split_name(name)[0]
        return host == target.host or (is_loopback(host) and is_loopback(target.host))
    return allow


async def fetch_slot_map(target: UpstreamTarget, credentials: CredentialProvider, *, timeout: float,
                         tracer: trace.Tracer | None = None,
                         on_auth_refused: Callable[[], None] | None = None) -> tuple[SlotMap | None, Upstream]:
    """(the slot map, or None when the database is no cluster; the connection used)."""
    seed = await connect_upstream(target, credentials, 0, timeout=timeout, tracer=tracer,
                                  on_auth_refused=on_auth_refused)
    try:
        async with asyncio.timeout(timeout):
            seed.writer.write(encode_command("CLUSTER", "SLOTS"))
            (reply,) = await _read_replies(seed.reader, 1)
    except (TimeoutError, OSError) as exc:
        seed.close()
        raise UpstreamError(f'database "{target.name}" at {target.address} did not answer CLUSTER SLOTS '
                            f"({type(exc).__name__}); check it with: nc -zv {target.host} {target.port}",
                            "protocol") from None
    if isinstance(reply, hiredis.ReplyError):
        if "cluster support disabled" in str(reply).lower():
            return None, seed
        seed.close()
        raise UpstreamError(f'database "{target.name}" refused CLUSTER SLOTS: {str(reply)[:200]}', "protocol")
    try:
        m = parse_cluster_slots(reply, target.host)
    except (ValueError, TypeError, IndexError) as exc:
        seed.close()
        raise UpstreamError(f'database "{target.name}" answered CLUSTER SLOTS oddly: {exc}', "protocol") from None
    return m, seed


class _NodeSide(SharedBufferProtocol):
    def __init__(self, owner: ClusterUpstream, name: str) -> None:
        self.owner, self.name = owner, name

    def data_received(self, data: bytes) -> None:
        self.owner._from_node(self.name, data)

    def eof_received(self) -> bool:
        self.owner._node_lost(self.name, self)
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.owner._node_lost(self.name, self)

    def pause_writing(self) -> None:
        self.owner._node_full(True)

    def resume_writing(self) -> None:
        self.owner._node_full(False)


class ClusterUpstream:
    """An :class:`Upstream` look-alike for a session (``auth_command``, ``client_id``,
    ``auth_expires_at``, ``close``) whose :meth:`attach` gives the transport the session
    writes to."""

    spare = False

    def __init__(self, target: UpstreamTarget, credentials: CredentialProvider, router: ClusterRouter,
                 *, timeout: float, tracer: trace.Tracer | None) -> None:
        self.target = target
        self.credentials = credentials
        self.router = router
        self.timeout = timeout
        self.tracer = tracer
        self.logical_db = 0
        self.auth_command = b""
        self.client_id = -1
        self.auth_expires_at: float | None = None
        self._tr: dict[str, asyncio.Transport] = {}
        self._sides: dict[str, _NodeSide] = {}
        self._ups: dict[str, Upstream] = {}
        self._connecting: dict[str, asyncio.Task] = {}
        self._side: asyncio.Protocol | None = None
        self._closed = False
        self._paused = False
        self._refreshing: asyncio.Task | None = None
        self._last_refresh = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._full = 0
        self._soon = False

    # -- setup -----------------------------------------------------------------------------------

    def _node_target(self, name: str) -> UpstreamTarget:
        host, port = split_name(name)
        t = self.target
        return UpstreamTarget(t.name, host, port, t.ssl, (t.server_hostname or t.host) if t.ssl else None)

    async def _open(self, name: str) -> Upstream:
        return await connect_upstream(self._node_target(name), self.credentials, 0, timeout=self.timeout,
                                      tracer=self.tracer)

    def _adopt(self, name: str, up: Upstream) -> bytes:
        from services.dbproxy.session import _take_over  # the same hand-over as a session's

        side = _NodeSide(self, name)
        transport, left = _take_over(up.reader, up.writer, side)
        self._tr[name], self._sides[name] = transport, side
        self._ups[name] = up  # its stream objects must live as long as the transport
        first = self.router.connected(name)
        if first:
            transport.write(first)
        if left:
            self.router.feed(name, left)
        if not self._paused:
            transport.resume_reading()
        return first

    async def start(self, seed: Upstream | None = None) -> None:
        """Connect to every primary (all of them, or the session is refused); ``seed``, the
        connection that asked for the map, is kept when it is one of them."""
        names = self.router.map.primaries
        if seed is not None and seed.target.address not in names:
            seed.close()
            seed = None
        if not names:
            raise UpstreamError(f'database "{self.target.name}" is a Redis Cluster whose slots no primary '
                                "serves; check the cluster (CLUSTER INFO)", "protocol")
        for name in names:
            if not self.router._allow(name):  # noqa: SLF001
                raise UpstreamError(f'database "{self.target.name}" names cluster node {name}, which is not '
                                    f"on its configured host {self.target.host}; Cachegate sends credentials "
                                    "only there (use TLS so that nodes can prove the host name)", "protocol")
        async def open_one(name: str) -> Upstream:
            if seed is not None and seed.target.address == name:
                return seed
            return await self._open(name)

        ups = await asyncio.gather(*(open_one(n) for n in names), return_exceptions=True)
        errors = [u for u in ups if isinstance(u, BaseException)]
        if errors:
            for u in ups:
                if isinstance(u, Upstream):
                    u.close()
            err = errors[0]
            if isinstance(err, UpstreamError):
                raise err
            raise UpstreamError(f'cannot reach a node of database "{self.target.name}": {type(err).__name__}',
                                "unreachable")
        for name, up in zip(names, ups):
            assert isinstance(up, Upstream)
            if not self.auth_command:
                self.auth_command, self.client_id, self.auth_expires_at = (
                    up.auth_command, up.client_id, up.auth_expires_at)
            self._adopt(name, up)

    # -- the transport the session writes to -------------------------------------------------------

    def attach(self, side: asyncio.Protocol) -> ClusterUpstream:
        """``side`` receives the reply stream from the next loop turn on (the session sets up
        its client side first)."""
        self._side = side
        self._pump(deliver=False)
        self._soon = True
        asyncio.get_running_loop().call_soon(self._deliver_soon)
        return self

    def write(self, data: bytes) -> None:
        if self._closed:
            return
        self.router.send(data)
        # Replies the router has at once (its own, CLUSTER SLOTS) reach the session on the next
        # turn of the loop, never inside this call: the session still has to write what it
        # decided before them (its own earlier replies).
        self._pump(deliver=False)
        if not self._soon:
            self._soon = True
            asyncio.get_running_loop().call_soon(self._deliver_soon)

    def _deliver_soon(self) -> None:
        self._soon = False
        self._pump()

    def pause_reading(self) -> None:
        self._paused = True
        for t in self._tr.values():
            if not t.is_closing():
                t.pause_reading()

    def resume_reading(self) -> None:
        self._paused = False
        for t in self._tr.values():
            if not t.is_closing():
                t.resume_reading()

    def is_closing(self) -> bool:
        return self._closed

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for task in list(self._connecting.values()):
            task.cancel()
        if self._refreshing is not None:
            self._refreshing.cancel()
        if self._timer is not None:
            self._timer.cancel()
        for t in self._tr.values():
            t.close()
        loop = asyncio.get_event_loop()
        for t in list(self._tr.values()):
            loop.call_later(1.0, _abort, t)

    def abort(self) -> None:
        self.close()

    # -- bytes and events ------------------------------------------------------------------------

    def _from_node(self, name: str, data: bytes) -> None:
        try:
            self.router.feed(name, data)
        except Exception:  # noqa: BLE001 - a bad reply: that node's connection is done
            log.warning("bad reply from cluster node", extra={"node": name, "database": self.target.name})
            t = self._tr.pop(name, None)
            self._sides.pop(name, None)
            if t is not None:
                t.abort()
            self.router.lost(name)
        self._pump()

    def _node_lost(self, name: str, side: _NodeSide) -> None:
        if self._closed or self._sides.get(name) is not side:
            return
        del self._sides[name]
        self._tr.pop(name, None)
        log.info("lost a cluster node connection", extra={"node": name, "database": self.target.name})
        self.router.lost(name)
        self._pump()

    def _node_full(self, full: bool) -> None:
        self._full += 1 if full else -1
        side = self._side
        if side is None:
            return
        if full and self._full == 1:
            side.pause_writing()
        elif not full and self._full == 0:
            side.resume_writing()

    def _pump(self, deliver: bool = True) -> None:
        if self._closed:
            return
        r = self.router
        for name, data in r.take_writes().items():
            t = self._tr.get(name)
            if t is not None:
                t.write(data)
        for name in r.nodes_wanted:
            if name not in self._connecting:
                self._connecting[name] = asyncio.get_running_loop().create_task(self._connect(name))
        replies = r.take_replies() if deliver else b""
        if replies and self._side is not None:
            self._side.data_received(replies)
        if r.wants_refresh and (self._refreshing is None or self._refreshing.done()):
            self._refreshing = asyncio.get_running_loop().create_task(self._refresh())
        nxt = r.next_retry
        if nxt is not None and self._timer is None:
            loop = asyncio.get_running_loop()
            self._timer = loop.call_later(max(nxt - r.clock(), 0.0), self._retry_now)

    def _retry_now(self) -> None:
        self._timer = None
        self.router.run_retries()
        self._pump()

    async def _connect(self, name: str) -> None:
        try:
            up = await self._open(name)
        except UpstreamError as exc:
            await asyncio.sleep(0.1)  # no tight loop while a node is down
            self._connecting.pop(name, None)
            if not self._closed:
                self.router.connect_failed(name, exc.reason)
                self._pump()
            return
        except asyncio.CancelledError:
            raise
        self._connecting.pop(name, None)
        if self._closed:
            up.close()
            return
        self._adopt(name, up)
        self._pump()

    async def _refresh(self) -> None:
        loop = asyncio.get_running_loop()
        wait = self._last_refresh + _REFRESH_GAP - loop.time()
        if wait > 0:
            await asyncio.sleep(wait)
        self._last_refresh = loop.time()
        if self._closed:
            return
        node = self.router.refresh_node()
        if node is not None:
            done = loop.create_future()
            self.router.request_map(node, lambda m: done.done() or done.set_result(m))
            self._pump()
            try:
                m = await asyncio.wait_for(done, self.timeout)
            except TimeoutError:
                m = None
            if m is not None:
                self._pump()
                return
        try:
            m, seed = await fetch_slot_map(self.target, self.credentials, timeout=self.timeout, tracer=self.tracer)
            seed.close()
        except UpstreamError:
            m = None
        if m is not None and not self._closed:
            self.router.update_map(m)
        elif not self._closed:
            self.router.wants_refresh = True
            await asyncio.sleep(0.3)
        self._pump()


def _abort(t: asyncio.Transport) -> None:
    try:
        t.abort()
    except Exception:  # noqa: BLE001 - already gone
        pass


async def connect_cluster(target: UpstreamTarget, credentials: CredentialProvider, logical_db: int = 0, *,
                          timeout: float = 10.0, tracer: trace.Tracer | None = None,
                          on_auth_refused: Callable[[], None] | None = None,
                          address: tuple[str, int] = ("", 0), **_: object) -> Upstream | ClusterUpstream:
    """The session's upstream for a database whose policy is OSSCluster; see the module doc."""
    try:
        return await _connect_cluster(target, credentials, logical_db, timeout, tracer, on_auth_refused, address)
    except TimeoutError:
        raise UpstreamError(f'cannot reach the nodes of database "{target.name}" at {target.address} '
                            f"(no answer within {timeout * 2:g}s); check that the proxy host can reach them",
                            "unreachable") from None


# The last slot map of each cluster, shared by the sessions of this process: a new session
# connects to the primaries at once (no extra connection to ask for the map); a stale map
# costs only redirections, which refresh it.
_MAPS: dict[tuple, tuple[float, list[str | None]]] = {}
_MAP_TTL = 60.0


def _map_key(target: UpstreamTarget) -> tuple:
    return (target.name, target.host, target.port, target.ssl is not None)


def forget_maps(name: str | None = None) -> None:
    for key in [k for k in _MAPS if name is None or k[0] == name]:
        del _MAPS[key]


async def _connect_cluster(target, credentials, logical_db, timeout, tracer, on_auth_refused, address):
    async with asyncio.timeout(timeout * 2):
        key = _map_key(target)
        loop = asyncio.get_running_loop()
        cached = _MAPS.get(key)
        for attempt in (0, 1):
            seed = None
            if cached is not None and attempt == 0 and loop.time() - cached[0] < _MAP_TTL:
                m = SlotMap(owner=list(cached[1]))
            else:
                m, seed = await fetch_slot_map(target, credentials, timeout=timeout, tracer=tracer,
                                               on_auth_refused=on_auth_refused)
                if m is None:  # not a cluster after all: the plain path, as for any database
                    seed.close()
                    return await connect_upstream(target, credentials, logical_db, timeout=timeout,
                                                  tracer=tracer, on_auth_refused=on_auth_refused)
                _MAPS[key] = (loop.time(), list(m.owner))
            if logical_db:
                if seed is not None:
                    seed.close()
                raise UpstreamError(f'database "{target.name}" is a Redis Cluster, which has only logical '
                                    f"database 0; run `cgate db login {target.name}` without --db-name", "select")
            router = ClusterRouter(m, address=address, node_id=proxy_node_id(target.name),
                                   allow_node=node_allowed(target),
                                   on_map=lambda sm: _MAPS.__setitem__(key, (loop.time(), list(sm.owner))))
            up = ClusterUpstream(target, credentials, router, timeout=timeout, tracer=tracer)
            try:
                await up.start(seed)
            except UpstreamError:
                up.close()
                if seed is not None or attempt:
                    raise
                _MAPS.pop(key, None)  # the cached map named a node that is gone: ask again
                continue
            except BaseException:
                up.close()
                raise
            return up
        raise AssertionError("unreachable")  # pragma: no cover
