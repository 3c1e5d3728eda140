"""WatchUsers: what dbproxy follows of users (name, roles, traits), current state first,
then the changes that matter to live sessions, and never a credential."""

from __future__ import annotations

import asyncio

import pyotp
import pytest
from cachegate.auth.v1 import user_service_pb2 as us
from cachegate.types.v1 import types_pb2

from tests.auth.test_users import PASSWORD, add_user

PUT, DELETE, INIT = (types_pb2.WATCH_EVENT_TYPE_PUT, types_pb2.WATCH_EVENT_TYPE_DELETE,
                     types_pb2.WATCH_EVENT_TYPE_INIT_DONE)


class Watch:
    """The stream read by a task into a queue, so that waiting for "nothing" does not cancel it."""

    def __init__(self, stream):
        self.stream = stream
        self.queue: asyncio.Queue = asyncio.Queue()
        self.task = asyncio.get_running_loop().create_task(self._pump())

    async def _pump(self):
        try:
            async for ev in self.stream:
                self.queue.put_nowait(ev)
        except Exception as exc:  # noqa: BLE001 - handed to the test
            self.queue.put_nowait(exc)

    async def next(self, timeout: float = 5.0):
        item = await asyncio.wait_for(self.queue.get(), timeout)
        if isinstance(item, Exception):
            raise item
        return item

    async def nothing_within(self, timeout: float = 0.3) -> bool:
        await asyncio.sleep(timeout)
        return self.queue.empty()

    async def close(self):
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)
        await self.stream.aclose()


def _watch(env) -> Watch:
    env.as_proxy()
    return Watch(env.users.WatchUsers(us.WatchUsersRequest(), env.ctx))


def _row(ev) -> tuple:
    return ev.type, ev.user.name, list(ev.user.roles), list(ev.user.db_users), list(ev.user.db_names)


async def _update(env, name: str, mask: list[str], **fields) -> None:
    env.as_admin()
    await env.call(env.users.UpdateUser, us.UpdateUserRequest(user=types_pb2.User(name=name, **fields),
                                                              update_mask=mask))


async def test_current_users_first_then_changes_to_roles_traits_and_deletion(env):
    await add_user(env, "bob", roles=("access",), db_users=("app",), db_names=("1",))
    await add_user(env, "alice", roles=("access", "auditor"), db_users=("default",), db_names=("0",))
    stream = _watch(env)
    first = [_row(await stream.next()) for _ in range(3)]
    assert first == [(PUT, "alice", ["access", "auditor"], ["default"], ["0"]),
                     (PUT, "bob", ["access"], ["app"], ["1"]),
                     (INIT, "", [], [], [])]

    await _update(env, "alice", ["roles"], roles=["access"])
    assert _row(await stream.next()) == (PUT, "alice", ["access"], ["default"], ["0"])
    await _update(env, "alice", ["db_users", "db_names"], db_users=["default", "ro"], db_names=["0", "2"])
    assert _row(await stream.next()) == (PUT, "alice", ["access"], ["default", "ro"], ["0", "2"])
    await add_user(env, "carol", roles=("editor",), password=None)
    assert _row(await stream.next()) == (PUT, "carol", ["editor"], ["default"], ["0"])

    env.as_admin()
    await env.call(env.users.DeleteUser, us.DeleteUserRequest(name="bob"))
    ev = await stream.next()
    assert _row(ev) == (DELETE, "bob", [], [], [])
    await stream.close()
    assert not env.backend._watchers  # the subscription ends with the stream


async def test_password_totp_and_login_writes_send_nothing_and_no_secret_is_sent(env):
    secret = pyotp.random_base32()
    created = await add_user(env, "dana", password=None)
    stream = _watch(env)
    assert _row(await stream.next())[:2] == (PUT, "dana")
    assert (await stream.next()).type == INIT

    # Redeeming the invite (password hash and TOTP secret stored) and a TOTP login (its time
    # step stored) change nothing a session depends on: no event.
    await env.call(env.users.RedeemInvite, us.RedeemInviteRequest(
        invite_token=created.invite.token, password=PASSWORD, totp_secret=secret,
        totp_code=pyotp.TOTP(secret).now()))
    await env.users._use_totp("dana", 10**9)  # what a TOTP login stores
    assert await stream.nothing_within()

    stored = (await env.backend.get("users/dana")).value.decode()
    assert "argon2" in stored and secret in stored  # what must never leave auth
    await _update(env, "dana", ["roles"], roles=["auditor"])
    ev = await stream.next()
    assert _row(ev) == (PUT, "dana", ["auditor"], ["default"], ["0"])
    wire = ev.SerializeToString()
    assert b"argon2" not in wire and secret.encode() not in wire
    assert created.invite.token.encode() not in wire
    assert {f.name for f, _ in ev.user.ListFields()} <= {"name", "roles", "db_users", "db_names"}
    await stream.close()


async def test_the_watch_starts_over_when_the_storage_may_have_missed_changes(env):
    await add_user(env, "erin", password=None)
    stream = _watch(env)
    assert [(await stream.next()).type for _ in range(2)] == [PUT, INIT]
    env.backend._notify_reset()
    from tests.auth.conftest import Aborted

    with pytest.raises(Aborted) as err:
        await stream.next()
    assert "watch again" in err.value.details
