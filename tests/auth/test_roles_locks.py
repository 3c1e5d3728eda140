"""RoleService and LockService, including their watch streams."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest
from cachegate.auth.v1 import audit_service_pb2
from cachegate.auth.v1 import lock_service_pb2 as ls
from cachegate.auth.v1 import role_service_pb2 as rs
from cachegate.auth.v1 import user_service_pb2 as us
from cachegate.types.v1 import types_pb2

from services.common import rbac
from services.common.grpcutil import dur, from_dur, from_ts
from services.common.roleproto import role_from_proto, role_to_proto

PUT, DELETE, INIT = (types_pb2.WATCH_EVENT_TYPE_PUT, types_pb2.WATCH_EVENT_TYPE_DELETE,
                     types_pb2.WATCH_EVENT_TYPE_INIT_DONE)

READONLY = """
kind: role
version: v1
metadata:
  name: redis-readonly
  description: read-only access to prod caches
spec:
  options:
    max_session_ttl: 8h
    disconnect_expired_cert: true
    client_idle_timeout: 30m
  allow:
    db_labels: {env: [prod, staging]}
    db_users: ['{{internal.db_users}}']
    db_commands: ['@read']
  deny:
    db_commands: ['@dangerous']
"""


def upsert(role: rbac.Role) -> rs.UpsertRoleRequest:
    return rs.UpsertRoleRequest(role=role_to_proto(role))


async def test_role_round_trips_through_the_api(env):
    env.as_admin()
    role = rbac.load_role_yaml(READONLY)
    resp = await env.call(env.roles.UpsertRole, upsert(role))
    assert role_from_proto(resp.role) == role and not resp.role.builtin
    got = (await env.call(env.roles.GetRole, rs.GetRoleRequest(name="redis-readonly"))).role
    assert role_from_proto(got) == role
    assert from_dur(got.options.max_session_ttl) == 8 * 3600 and got.options.disconnect_expired_cert
    assert from_dur(got.options.client_idle_timeout) == 1800
    names = [r.name for r in (await env.call(env.roles.ListRoles, rs.ListRolesRequest())).roles]
    assert names == ["access", "auditor", "editor", "redis-readonly"]
    builtins = {r.name for r in (await env.call(env.roles.ListRoles, rs.ListRolesRequest())).roles if r.builtin}
    assert builtins == {"access", "auditor", "editor"}
    # update in place
    changed = role.model_copy(update={"description": "changed"})
    await env.call(env.roles.UpsertRole, upsert(changed))
    assert (await env.call(env.roles.GetRole, rs.GetRoleRequest(name="redis-readonly"))).role.description == "changed"
    found = await env.call(env.audit.SearchAuditEvents, audit_service_pb2.SearchAuditEventsRequest(types=["role.*"]))
    kinds = [(e.type, e.fields["role"]) for e in found.events]
    assert kinds == [("role.put", "redis-readonly"), ("role.put", "redis-readonly")]


@pytest.mark.parametrize("name", ["access", "editor", "auditor"])
async def test_builtin_roles_cannot_be_overwritten_or_deleted(env, name):
    env.as_admin()
    err = await env.fails(env.roles.UpsertRole, rs.UpsertRoleRequest(role=types_pb2.Role(name=name)))
    assert err.code == grpc.StatusCode.FAILED_PRECONDITION
    assert err.details == f'role "{name}" is built in and cannot be overwritten: create a role with another name instead'
    err = await env.fails(env.roles.DeleteRole, rs.DeleteRoleRequest(name=name))
    assert err.code == grpc.StatusCode.FAILED_PRECONDITION and "cannot be deleted" in err.details
    assert (await env.call(env.roles.GetRole, rs.GetRoleRequest(name=name))).role.builtin


async def test_invalid_role_is_refused_with_the_role_document_message(env):
    env.as_admin()
    bad = types_pb2.Role(name="Bad Name")
    err = await env.fails(env.roles.UpsertRole, rs.UpsertRoleRequest(role=bad))
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT and "invalid role name" in err.details
    bad = types_pb2.Role(name="x", allow=types_pb2.RoleConditions(db_names=["prod"]))
    err = await env.fails(env.roles.UpsertRole, rs.UpsertRoleRequest(role=bad))
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT and "logical databases are numbers" in err.details
    bad = types_pb2.Role(name="x", options=types_pb2.RoleOptions(max_session_ttl=dur(0)))
    err = await env.fails(env.roles.UpsertRole, rs.UpsertRoleRequest(role=bad))
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT and "max_session_ttl" in err.details
    err = await env.fails(env.roles.UpsertRole, rs.UpsertRoleRequest())
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT and "role.name is required" in err.details


async def test_role_in_use_cannot_be_deleted(env):
    env.as_admin()
    await env.call(env.roles.UpsertRole, upsert(rbac.load_role_yaml(READONLY)))
    await env.call(env.users.CreateUser, us.CreateUserRequest(user=types_pb2.User(name="alice", roles=["redis-readonly"])))
    err = await env.fails(env.roles.DeleteRole, rs.DeleteRoleRequest(name="redis-readonly"))
    assert err.code == grpc.StatusCode.FAILED_PRECONDITION and "assigned to users alice" in err.details
    await env.call(env.users.UpdateUser, us.UpdateUserRequest(user=types_pb2.User(name="alice", roles=["access"]),
                                                              update_mask=["roles"]))
    await env.call(env.roles.DeleteRole, rs.DeleteRoleRequest(name="redis-readonly"))
    err = await env.fails(env.roles.GetRole, rs.GetRoleRequest(name="redis-readonly"))
    assert err.code == grpc.StatusCode.NOT_FOUND and "cgctl roles ls" in err.details
    err = await env.fails(env.roles.DeleteRole, rs.DeleteRoleRequest(name="redis-readonly"))
    assert err.code == grpc.StatusCode.NOT_FOUND


async def _next(stream, timeout=5.0):
    return await asyncio.wait_for(stream.__anext__(), timeout)


async def test_watch_roles_sends_current_state_then_changes(env):
    env.as_admin()
    await env.call(env.roles.UpsertRole, upsert(rbac.load_role_yaml(READONLY)))
    env.as_proxy()
    stream = env.roles.WatchRoles(rs.WatchRolesRequest(), env.ctx)
    first = [await _next(stream) for _ in range(5)]
    assert [(e.type, e.role.name) for e in first] == [
        (PUT, "access"), (PUT, "auditor"), (PUT, "editor"), (PUT, "redis-readonly"), (INIT, "")]
    assert first[0].role.builtin
    env.as_admin()
    await env.call(env.roles.UpsertRole, upsert(rbac.Role(name="ops", description="new")))
    ev = await _next(stream)
    assert (ev.type, ev.role.name, ev.role.description) == (PUT, "ops", "new")
    await env.call(env.roles.DeleteRole, rs.DeleteRoleRequest(name="ops"))
    ev = await _next(stream)
    assert (ev.type, ev.role.name) == (DELETE, "ops")
    await stream.aclose()
    assert not env.backend._watchers  # the subscription ends with the stream


# --- locks ------------------------------------------------------------------------------------

async def test_lock_needs_exactly_one_target(env):
    env.as_admin()
    for req in (ls.CreateLockRequest(), ls.CreateLockRequest(user="a", role="b")):
        err = await env.fails(env.locks.CreateLock, req)
        assert err.code == grpc.StatusCode.INVALID_ARGUMENT
        assert err.details == "a lock needs exactly one target: a user (--user=NAME) or a role (--role=NAME)"
    req = ls.CreateLockRequest(user="alice")
    req.ttl.CopyFrom(dur(-5))
    assert (await env.fails(env.locks.CreateLock, req)).code == grpc.StatusCode.INVALID_ARGUMENT


async def test_create_list_delete_locks(env):
    env.as_admin()
    req = ls.CreateLockRequest(user="alice", message="left the company")
    req.ttl.CopyFrom(dur(3600))
    a = (await env.call(env.locks.CreateLock, req)).lock
    b = (await env.call(env.locks.CreateLock, ls.CreateLockRequest(role="access"))).lock
    assert a.user == "alice" and a.message == "left the company" and a.created_by == "cachegate-admin"
    assert from_ts(a.expire_time) == pytest.approx(time.time() + 3600, abs=5)
    assert not b.HasField("expire_time")
    listed = (await env.call(env.locks.ListLocks, ls.ListLocksRequest())).locks
    assert sorted(lk.id for lk in listed) == sorted([a.id, b.id])
    await env.call(env.locks.DeleteLock, ls.DeleteLockRequest(id=a.id))
    assert [lk.id for lk in (await env.call(env.locks.ListLocks, ls.ListLocksRequest())).locks] == [b.id]
    err = await env.fails(env.locks.DeleteLock, ls.DeleteLockRequest(id=a.id))
    assert err.code == grpc.StatusCode.NOT_FOUND and "cgctl locks ls" in err.details
    evs = (await env.call(env.audit.SearchAuditEvents, audit_service_pb2.SearchAuditEventsRequest(types=["lock.*"]))).events
    assert [e.type for e in evs] == ["lock.create", "lock.create", "lock.delete"]
    assert evs[0].fields["target_user"] == "alice" and evs[0].actor == "cachegate-admin"


async def test_watch_locks_sends_current_state_changes_and_expiry(env):
    env.as_admin()
    old = (await env.call(env.locks.CreateLock, ls.CreateLockRequest(user="alice", message="m1"))).lock
    env.as_proxy()
    stream = env.locks.WatchLocks(ls.WatchLocksRequest(), env.ctx)
    first = [await _next(stream) for _ in range(2)]
    assert [(e.type, e.lock.id) for e in first] == [(PUT, old.id), (INIT, "")]
    assert first[0].lock.message == "m1"
    env.as_admin()
    req = ls.CreateLockRequest(role="access", message="brief")
    req.ttl.CopyFrom(dur(1))
    new = (await env.call(env.locks.CreateLock, req)).lock
    ev = await _next(stream)
    assert (ev.type, ev.lock.id, ev.lock.role) == (PUT, new.id, "access")
    await env.call(env.locks.DeleteLock, ls.DeleteLockRequest(id=old.id))
    ev = await _next(stream)
    assert (ev.type, ev.lock.id) == (DELETE, old.id)
    # the TTL lock expires by itself: watchers are told
    t0 = time.monotonic()
    ev = await _next(stream, timeout=5)
    assert (ev.type, ev.lock.id) == (DELETE, new.id)
    assert time.monotonic() - t0 < 3
    await stream.aclose()
