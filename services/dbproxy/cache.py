"""dbproxy's view of auth's registry: databases, roles, users and locks.

Each is followed with auth's Watch RPC (current state first, then changes).
When the stream breaks, the last known state stays in use while the watcher
reconnects with backoff, so dbproxy keeps serving while auth is away.

``on_change(kind, changes)`` is told of every applied change to databases,
roles or users (``changes``: ``(name, before, after)``, None for absent), both
single events and the difference a re-sync (INIT_DONE) makes, so that live
sessions can follow them.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from dataclasses import dataclass
from typing import Any, Callable

import grpc

from cachegate.auth.v1 import database_service_pb2, lock_service_pb2, role_service_pb2, user_service_pb2
from cachegate.types.v1 import types_pb2
from services.common import rbac
from services.common.authclient import AuthClient
from services.common.grpcutil import from_ts
from services.common.locks import lock_applies
from services.common.roleproto import role_from_proto

log = logging.getLogger("cachegate.dbproxy.cache")

PUT, DELETE, INIT_DONE = (types_pb2.WATCH_EVENT_TYPE_PUT, types_pb2.WATCH_EVENT_TYPE_DELETE,
                          types_pb2.WATCH_EVENT_TYPE_INIT_DONE)

Changes = list[tuple[str, Any, Any]]


@dataclass(frozen=True)
class UserAccess:
    """A user as auth has it now: the roles they hold and their traits."""

    name: str
    roles: tuple[str, ...]
    db_users: tuple[str, ...]
    db_names: tuple[str, ...]

    @classmethod
    def from_proto(cls, u: user_service_pb2.UserAccess) -> UserAccess:
        return cls(u.name, tuple(u.roles), tuple(u.db_users), tuple(u.db_names))


def _diff(old: dict, new: dict) -> Changes:
    return [(n, old.get(n), new.get(n)) for n in sorted(old.keys() | new.keys()) if old.get(n) != new.get(n)]


class ClusterCache:
    def __init__(self, auth: AuthClient, on_lock: Callable[[types_pb2.Lock], None] | None = None,
                 on_change: Callable[[str, Changes], None] | None = None):
        self.auth = auth
        self.databases: dict[str, types_pb2.Database] = {}
        self.roles: dict[str, rbac.Role] = dict(rbac.BUILTIN_ROLES)
        self.users: dict[str, UserAccess] = {}
        self.locks: dict[str, types_pb2.Lock] = {}
        self.on_lock = on_lock
        self.on_change = on_change
        kinds = ("databases", "roles", "users", "locks")
        self.ready = {k: asyncio.Event() for k in kinds}
        self.connected = dict.fromkeys(kinds, False)
        self._tasks: list[asyncio.Task] = []
        # access_roleset's answers, kept while the user and each role are the same objects
        # (a change replaces them): sessions of one user and certificate share one RoleSet.
        self._rolesets: dict[tuple, tuple[UserAccess, tuple[rbac.Role, ...], rbac.RoleSet]] = {}

    # --- lifecycle ------------------------------------------------------------------------------
    def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._follow("databases", self.auth.databases.WatchDatabases,
                                             database_service_pb2.WatchDatabasesRequest(), self._on_database)),
            asyncio.create_task(self._follow("roles", self.auth.roles.WatchRoles,
                                             role_service_pb2.WatchRolesRequest(), self._on_role)),
            asyncio.create_task(self._follow("users", self.auth.users.WatchUsers,
                                             user_service_pb2.WatchUsersRequest(), self._on_user)),
            asyncio.create_task(self._follow("locks", self.auth.locks.WatchLocks,
                                             lock_service_pb2.WatchLocksRequest(), self._on_lock)),
        ]

    async def wait_ready(self, timeout: float) -> bool:
        try:
            await asyncio.wait_for(asyncio.gather(*(e.wait() for e in self.ready.values())), timeout)
            return True
        except TimeoutError:
            return False

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _follow(self, what: str, method, request, apply: Callable) -> None:
        backoff = 0.5
        while True:
            fresh: dict | None = None
            try:
                call = method(request)
                fresh = {}
                async for event in call:
                    if event.type == INIT_DONE:
                        # Swap in the complete current state at once: nothing is dropped
                        # between the break and the reconnect.
                        apply(None, fresh, replace=True)
                        fresh = None
                        self.connected[what] = True
                        self.ready[what].set()
                        backoff = 0.5
                        log.info("following auth's %s", what)
                        continue
                    if fresh is not None:
                        apply(event, fresh)
                    else:
                        apply(event, None)
                raise grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, None, None, "stream ended")
            except asyncio.CancelledError:
                raise
            except grpc.aio.AioRpcError as exc:
                if self.connected[what]:
                    log.warning("lost auth's %s stream; serving the last known state while reconnecting",
                                what, extra={"error": exc.code().name})
                self.connected[what] = False
            except Exception:  # noqa: BLE001 - a bad record must not stop the watcher
                log.exception("watching auth's %s failed; retrying", what)
                self.connected[what] = False
            await asyncio.sleep(backoff + random.uniform(0, backoff / 2))
            backoff = min(backoff * 2, 15.0)

    def _changed(self, kind: str, changes: Changes) -> None:
        if changes and self.on_change is not None:
            try:
                self.on_change(kind, changes)
            except Exception:  # noqa: BLE001 - following auth must go on
                log.exception("re-evaluating sessions after a change to %s failed", kind)

    # --- appliers: event=None with replace=True installs ``fresh`` as the whole state ---------
    def _on_database(self, event, fresh: dict | None, replace: bool = False) -> None:
        if replace:
            old, self.databases = self.databases, fresh or {}
            self._changed("databases", _diff(old, self.databases))
            return
        target = fresh if fresh is not None else self.databases
        name = event.database.name
        before = target.get(name)
        if event.type == PUT:
            target[name] = event.database
        elif event.type == DELETE:
            target.pop(name, None)
        if fresh is None and before != target.get(name):
            self._changed("databases", [(name, before, target.get(name))])

    def _on_role(self, event, fresh: dict | None, replace: bool = False) -> None:
        if replace:
            old, self.roles = self.roles, dict(rbac.BUILTIN_ROLES) | (fresh or {})
            self._changed("roles", _diff(old, self.roles))
            return
        target = fresh if fresh is not None else self.roles
        name = event.role.name
        before = target.get(name)
        if event.type == PUT:
            try:
                target[name] = role_from_proto(event.role)
            except rbac.RoleError as exc:
                # Deny by default: a role that does not validate grants nothing.
                target.pop(name, None)
                log.error("ignoring a role auth sent that does not validate", extra={"role": name,
                                                                                      "error": str(exc)})
        elif event.type == DELETE and not rbac.is_builtin(name):
            target.pop(name, None)
        if fresh is None and before != target.get(name):
            self._changed("roles", [(name, before, target.get(name))])

    def _on_user(self, event, fresh: dict | None, replace: bool = False) -> None:
        if replace:
            old, self.users = self.users, fresh or {}
            self._changed("users", _diff(old, self.users))
            return
        target = fresh if fresh is not None else self.users
        name = event.user.name
        before = target.get(name)
        if event.type == PUT:
            target[name] = UserAccess.from_proto(event.user)
        elif event.type == DELETE:
            target.pop(name, None)
        if fresh is None and before != target.get(name):
            self._changed("users", [(name, before, target.get(name))])

    def _on_lock(self, event, fresh: dict | None, replace: bool = False) -> None:
        if replace:
            self.locks = fresh or {}
            if self.on_lock:
                for lk in self.locks.values():
                    self.on_lock(lk)
            return
        target = fresh if fresh is not None else self.locks
        if event.type == PUT:
            target[event.lock.id] = event.lock
            if fresh is None and self.on_lock:
                self.on_lock(event.lock)
        elif event.type == DELETE:
            target.pop(event.lock.id, None)

    # --- questions --------------------------------------------------------------------------------
    def roleset(self, identity: types_pb2.Identity) -> rbac.RoleSet:
        roles = [self.roles[n] for n in identity.roles if n in self.roles]
        traits = {"db_users": list(identity.db_users), "db_names": list(identity.db_names)}
        return rbac.RoleSet(roles, traits)

    def access_roleset(self, identity: types_pb2.Identity) -> rbac.RoleSet | None:
        """What a user certificate allows now: the certificate's roles that the user still
        holds (a role added to the user does not widen an existing certificate), as they are
        defined now, with the user's current traits. None: the user no longer exists."""
        user = self.users.get(identity.name)
        if user is None:
            return None
        held = set(user.roles)
        roles = tuple(self.roles[n] for n in identity.roles if n in held and n in self.roles)
        key = (identity.name, tuple(identity.roles))
        hit = self._rolesets.get(key)
        if hit is not None and hit[0] is user and len(hit[1]) == len(roles) \
                and all(a is b for a, b in zip(hit[1], roles)):
            return hit[2]
        rs = rbac.RoleSet(roles, {"db_users": list(user.db_users), "db_names": list(user.db_names)})
        if len(self._rolesets) >= 4096:
            self._rolesets.clear()
        self._rolesets[key] = (user, roles, rs)
        return rs

    def lock_for(self, user: str, roles) -> types_pb2.Lock | None:
        now = time.time()
        for lk in self.locks.values():
            exp = from_ts(lk.expire_time)
            if exp is not None and exp <= now:
                continue
            if lock_applies(lk, user, roles):
                return lk
        return None

