"""Locks: stop a user, or everyone holding a role, from logging in and getting certificates.

Stored under ``locks/ID`` (JSON); a lock with a TTL is stored with that expiry and vanishes
from the backend on its own. Watchers get a DELETE when a lock expires too.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from dataclasses import dataclass

import grpc
from cachegate.auth.v1 import lock_service_pb2, lock_service_pb2_grpc
from cachegate.types.v1 import types_pb2

from services.auth.backend import Backend
from services.auth.state import AuthState
from services.auth.watch import Subscription, WatchOverflow
from services.common import authz
from services.common.grpcutil import from_dur, paginate, ts
from services.common.locks import lock_applies, locked_message  # noqa: F401 (locked_message: users.py)

PREFIX = "locks/"
MAX_MESSAGE_LEN = 1024
MAX_LOCK_TTL = 10 * 365 * 86400.0
_NAME = re.compile(r"^[^\s/\x00-\x1f\x7f]{1,128}$")


@dataclass
class LockDoc:
    id: str
    user: str
    role: str
    message: str
    created: float
    expires: float | None
    created_by: str

    @classmethod
    def decode(cls, value: bytes) -> LockDoc:
        d = json.loads(value)
        return cls(d["id"], d.get("user", ""), d.get("role", ""), d.get("message", ""), d["created"],
                   d.get("expires"), d.get("created_by", ""))

    def encode(self) -> bytes:
        return json.dumps(self.__dict__).encode()

    def live(self, now: float | None = None) -> bool:
        return self.expires is None or self.expires > (now or time.time())

    def to_proto(self) -> types_pb2.Lock:
        out = types_pb2.Lock(id=self.id, user=self.user, role=self.role, message=self.message,
                             create_time=ts(self.created), created_by=self.created_by)
        if self.expires is not None:
            out.expire_time.CopyFrom(ts(self.expires))
        return out

    def target(self) -> str:
        return f'user "{self.user}"' if self.user else f'role "{self.role}"'


class LockStore:
    def __init__(self, backend: Backend):
        self.backend = backend

    async def create(self, user: str, role: str, message: str, ttl: float | None, actor: str) -> LockDoc:
        now = time.time()
        doc = LockDoc(str(uuid.uuid4()), user, role, message, now, now + ttl if ttl else None, actor)
        await self.backend.put(PREFIX + doc.id, doc.encode(), expires=doc.expires)
        return doc

    async def list(self) -> list[LockDoc]:
        now = time.time()
        out = []
        for item in await self.backend.list(PREFIX):
            try:
                doc = LockDoc.decode(item.value)
            except (ValueError, KeyError):
                continue
            if doc.live(now):
                out.append(doc)
        return sorted(out, key=lambda d: d.id)

    async def delete(self, lock_id: str) -> LockDoc | None:
        if not lock_id or "/" in lock_id:
            return None
        item = await self.backend.get(PREFIX + lock_id)
        if item is None or not await self.backend.delete(PREFIX + lock_id):
            return None
        return LockDoc.decode(item.value)

    async def find(self, user: str, roles) -> LockDoc | None:
        """The lock that applies to this user (directly, or through one of ``roles``), if any.

        A direct user lock wins over a role lock (its message is the more specific one)."""
        roles = set(roles)
        hits = [d for d in await self.list() if lock_applies(d, user, roles)]
        if not hits:
            return None
        hits.sort(key=lambda d: (0 if d.user else 1, d.created))
        return hits[0]


class LockServicer(lock_service_pb2_grpc.LockServiceServicer):
    def __init__(self, state: AuthState):
        self.state = state
        self.locks = LockStore(state.backend)

    async def CreateLock(self, request, context):
        caller = authz.current_caller()
        user, role = request.user.strip(), request.role.strip()
        if bool(user) == bool(role):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                "a lock needs exactly one target: a user (--user=NAME) or a role (--role=NAME)")
        if not _NAME.match(user or role):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"invalid lock target {user or role!r}")
        message = request.message.strip()
        if len(message) > MAX_MESSAGE_LEN or any(ord(ch) < 32 for ch in message):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"the lock message must be one line of at most {MAX_MESSAGE_LEN} characters")
        ttl = None
        if request.HasField("ttl"):
            ttl = from_dur(request.ttl)
            if ttl <= 0 or ttl > MAX_LOCK_TTL:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                    "lock ttl must be positive (leave it out for a lock until removed)")
        doc = await self.locks.create(user, role, message, ttl, caller.name)
        await self.state.audit.emit("lock.create", caller.name, caller.source_addr(), lock_id=doc.id,
                                    target_user=user or None, target_role=role or None, message=message,
                                    ttl_seconds=ttl)
        return lock_service_pb2.CreateLockResponse(lock=doc.to_proto())

    async def ListLocks(self, request, context):
        try:
            page, nxt = paginate(await self.locks.list(), lambda d: d.id, request.page_size, request.page_token)
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        return lock_service_pb2.ListLocksResponse(locks=[d.to_proto() for d in page], next_page_token=nxt)

    async def DeleteLock(self, request, context):
        caller = authz.current_caller()
        doc = await self.locks.delete(request.id.strip())
        if doc is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no lock {request.id!r}: see `cgctl locks ls`")
        await self.state.audit.emit("lock.delete", caller.name, caller.source_addr(), lock_id=doc.id,
                                    target_user=doc.user or None, target_role=doc.role or None)
        return lock_service_pb2.DeleteLockResponse()

    async def WatchLocks(self, request, context):
        put, delete = types_pb2.WATCH_EVENT_TYPE_PUT, types_pb2.WATCH_EVENT_TYPE_DELETE
        expiring: dict[str, float] = {}
        with Subscription(self.state.backend, PREFIX) as sub:
            for doc in await self.locks.list():
                if doc.expires is not None:
                    expiring[doc.id] = doc.expires
                yield lock_service_pb2.WatchLocksResponse(type=put, lock=doc.to_proto())
            yield lock_service_pb2.WatchLocksResponse(type=types_pb2.WATCH_EVENT_TYPE_INIT_DONE)
            while True:
                now = time.time()
                for lock_id in [i for i, t in expiring.items() if t <= now]:
                    del expiring[lock_id]
                    yield lock_service_pb2.WatchLocksResponse(type=delete, lock=types_pb2.Lock(id=lock_id))
                timeout = max(0.0, min(expiring.values()) - now) + 0.01 if expiring else None
                try:
                    change = await sub.get(timeout)
                except WatchOverflow:
                    await context.abort(grpc.StatusCode.ABORTED, "the lock watch fell behind: watch again")
                if change is None:
                    continue
                lock_id = change.key[len(PREFIX):]
                if change.kind == "delete":
                    expiring.pop(lock_id, None)
                    yield lock_service_pb2.WatchLocksResponse(type=delete, lock=types_pb2.Lock(id=lock_id))
                    continue
                try:
                    doc = LockDoc.decode(change.value)
                except (ValueError, KeyError):
                    continue
                if not doc.live():
                    continue
                if doc.expires is not None:
                    expiring[doc.id] = doc.expires
                yield lock_service_pb2.WatchLocksResponse(type=put, lock=doc.to_proto())


__all__ = ["LockDoc", "LockServicer", "LockStore", "locked_message"]
