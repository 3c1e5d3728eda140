"""Roles: stored as role documents under ``roles/NAME``; the built-in ones live in code."""

from __future__ import annotations

import asyncio
import json
import logging

import grpc
from cachegate.auth.v1 import role_service_pb2, role_service_pb2_grpc
from cachegate.types.v1 import types_pb2

from services.auth.backend import Backend
from services.auth.state import AuthState
from services.auth.watch import Subscription, WatchOverflow
from services.common import authz, rbac
from services.common.grpcutil import paginate
from services.common.roleproto import role_from_proto, role_to_proto

log = logging.getLogger("cachegate.auth.roles")

PREFIX = "roles/"


class RoleStore:
    """Read and write roles. Built-in roles are answered from code and never stored."""

    def __init__(self, backend: Backend):
        self.backend = backend

    @staticmethod
    def decode(value: bytes) -> rbac.Role:
        return rbac.Role.from_dict(json.loads(value))

    async def get(self, name: str) -> rbac.Role | None:
        if rbac.is_builtin(name):
            return rbac.BUILTIN_ROLES[name]
        if not rbac.ROLE_NAME_RE.match(name or ""):
            return None
        item = await self.backend.get(PREFIX + name)
        if item is None:
            return None
        try:
            return self.decode(item.value)
        except (ValueError, rbac.RoleError):
            log.error("stored role is not valid; ignoring it", extra={"role": name})
            return None

    async def get_many(self, names) -> tuple[list[rbac.Role], list[str]]:
        """(roles found, names not found)."""
        found, missing = [], []
        for n in dict.fromkeys(names):
            r = await self.get(n)
            (found.append(r) if r is not None else missing.append(n))
        return found, missing

    async def list(self) -> list[rbac.Role]:
        out = dict(rbac.BUILTIN_ROLES)
        for item in await self.backend.list(PREFIX):
            name = item.key[len(PREFIX):]
            if rbac.is_builtin(name):
                continue
            try:
                out[name] = self.decode(item.value)
            except (ValueError, rbac.RoleError):
                log.error("stored role is not valid; ignoring it", extra={"role": name})
        return [out[k] for k in sorted(out)]

    async def put(self, role: rbac.Role) -> bool:
        """Store a role; True when it was new. ValueError for a built-in name."""
        if rbac.is_builtin(role.name):
            raise ValueError(builtin_message(role.name, "overwritten"))
        existed = await self.backend.get(PREFIX + role.name) is not None
        await self.backend.put(PREFIX + role.name, json.dumps(role.to_dict()).encode())
        return not existed

    async def delete(self, name: str) -> bool:
        return await self.backend.delete(PREFIX + name)


class AdminPolicy:
    """The interceptor's admin check, from the caller's roles (built-in and stored).

    Kept in memory and updated from the backend's change events, because the
    interceptor asks synchronously on every administrative call.
    """

    def __init__(self, backend: Backend):
        self.backend = backend
        self.roles: dict[str, rbac.Role] = dict(rbac.BUILTIN_ROLES)
        self._unsubscribe = None

    async def start(self) -> None:
        if self._unsubscribe is None:
            self._unsubscribe = self.backend.subscribe(PREFIX, self._on_change)
        fresh = {role.name: role for role in await RoleStore(self.backend).list()}
        self.roles = dict(rbac.BUILTIN_ROLES) | fresh

    def _on_change(self, change) -> None:
        if change.kind == "reset":  # changes may have been missed: read every role again
            asyncio.get_running_loop().create_task(self.start())
            return
        name = change.key[len(PREFIX):]
        if rbac.is_builtin(name):
            return
        if change.kind == "delete" or change.value is None:
            self.roles.pop(name, None)
            return
        try:
            self.roles[name] = RoleStore.decode(change.value)
        except (ValueError, rbac.RoleError):
            self.roles.pop(name, None)

    def stop(self) -> None:
        if self._unsubscribe:
            self._unsubscribe()

    def check(self, identity: types_pb2.Identity, resource: str, verb: str) -> bool:
        roles = [self.roles[n] for n in identity.roles if n in self.roles]
        return bool(roles) and rbac.RoleSet(roles).check_admin(resource, verb).allowed


def builtin_message(name: str, what: str) -> str:
    return f'role "{name}" is built in and cannot be {what}: create a role with another name instead'


class RoleServicer(role_service_pb2_grpc.RoleServiceServicer):
    def __init__(self, state: AuthState):
        self.state = state
        self.roles = RoleStore(state.backend)

    async def UpsertRole(self, request, context):
        caller = authz.current_caller()
        if not request.HasField("role") or not request.role.name:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "role.name is required")
        if rbac.is_builtin(request.role.name):
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, builtin_message(request.role.name, "overwritten"))
        try:
            role = role_from_proto(request.role)
        except rbac.RoleError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        created = await self.roles.put(role)
        await self.state.audit.emit("role.put", caller.name, caller.source_addr(), role=role.name, created=created)
        return role_service_pb2.UpsertRoleResponse(role=role_to_proto(role))

    async def GetRole(self, request, context):
        role = await self.roles.get(request.name)
        if role is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f'no role "{request.name}": see `cgctl roles ls`')
        return role_service_pb2.GetRoleResponse(role=role_to_proto(role))

    async def ListRoles(self, request, context):
        try:
            page, nxt = paginate(await self.roles.list(), lambda r: r.name, request.page_size, request.page_token)
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        return role_service_pb2.ListRolesResponse(roles=[role_to_proto(r) for r in page], next_page_token=nxt)

    async def DeleteRole(self, request, context):
        caller = authz.current_caller()
        name = request.name
        if rbac.is_builtin(name):
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, builtin_message(name, "deleted"))
        if await self.roles.get(name) is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f'no role "{name}": see `cgctl roles ls`')
        from services.auth.users import UserStore

        holders = [u["name"] for u in await UserStore(self.state.backend).list() if name in u["roles"]]
        if holders:
            shown = ", ".join(holders[:5]) + (f" and {len(holders) - 5} more" if len(holders) > 5 else "")
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                f'role "{name}" is assigned to users {shown}: '
                                "remove it from them first (cgctl users update)")
        if not await self.roles.delete(name):
            await context.abort(grpc.StatusCode.NOT_FOUND, f'no role "{name}": see `cgctl roles ls`')
        await self.state.audit.emit("role.delete", caller.name, caller.source_addr(), role=name)
        return role_service_pb2.DeleteRoleResponse()

    async def WatchRoles(self, request, context):
        with Subscription(self.state.backend, PREFIX) as sub:
            for role in await self.roles.list():
                yield role_service_pb2.WatchRolesResponse(type=types_pb2.WATCH_EVENT_TYPE_PUT, role=role_to_proto(role))
            yield role_service_pb2.WatchRolesResponse(type=types_pb2.WATCH_EVENT_TYPE_INIT_DONE)
            while True:
                try:
                    change = await sub.get()
                except WatchOverflow:
                    await context.abort(grpc.StatusCode.ABORTED, "the role watch fell behind: watch again")
                name = change.key[len(PREFIX):]
                if rbac.is_builtin(name):
                    continue
                if change.kind == "delete":
                    yield role_service_pb2.WatchRolesResponse(type=types_pb2.WATCH_EVENT_TYPE_DELETE,
                                                              role=types_pb2.Role(name=name))
                    continue
                try:
                    role = self.roles.decode(change.value)
                except (ValueError, rbac.RoleError):
                    continue
                yield role_service_pb2.WatchRolesResponse(type=types_pb2.WATCH_EVENT_TYPE_PUT, role=role_to_proto(role))
