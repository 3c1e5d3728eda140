"""The failed-login limiter, on auth's real storage with a fake clock."""

import pytest

from services.auth.backend import SQLiteBackend
from services.auth.ratelimit import FailureLimiter


class Clock:
    def __init__(self):
        self.t = 1_000_000.0

    def __call__(self):
        return self.t


@pytest.fixture
async def backend(tmp_path):
    b = SQLiteBackend(tmp_path / "auth.db")
    yield b
    await b.close()


async def test_locks_out_after_max_failures_within_window_then_recovers(backend):
    clock = Clock()
    lim = FailureLimiter(backend, "user", 3, 60, clock=clock)
    assert not await lim.failure("alice") and not await lim.failure("alice")
    assert await lim.retry_after("alice") == 0
    assert await lim.failure("alice")  # third failure locks out
    assert await lim.retry_after("alice") == 60
    assert await lim.retry_after("bob") == 0  # keys are independent
    clock.t += 59
    assert await lim.retry_after("alice") == 1
    clock.t += 1.5
    assert await lim.retry_after("alice") == 0
    assert not await lim.failure("alice")  # counting starts afresh after a lockout


async def test_old_failures_leave_the_window_and_success_resets(backend):
    clock = Clock()
    lim = FailureLimiter(backend, "user", 3, 60, clock=clock)
    await lim.failure("alice")
    await lim.failure("alice")
    clock.t += 61
    assert not await lim.failure("alice")  # the first two are forgotten
    await lim.failure("alice")
    await lim.reset("alice")
    assert not await lim.failure("alice") and not await lim.failure("alice") and await lim.failure("alice")


async def test_two_auth_processes_on_one_storage_count_the_same_failures(backend):
    clock = Clock()
    a = FailureLimiter(backend, "user", 4, 60, clock=clock)
    b = FailureLimiter(backend, "user", 4, 60, clock=clock)
    await a.failure("carol")
    await b.failure("carol")
    await a.failure("carol")
    assert await b.failure("carol")  # the fourth, wherever it happened
    assert await a.retry_after("carol") == 60


async def test_scopes_are_apart_and_keys_are_stored_hashed(backend):
    clock = Clock()
    users = FailureLimiter(backend, "user", 1, 60, clock=clock)
    addrs = FailureLimiter(backend, "addr", 1, 60, clock=clock)
    assert await users.failure("10.0.0.7")
    assert await addrs.retry_after("10.0.0.7") == 0
    keys = [i.key for i in await backend.list("loginfail/")]
    assert keys and all("10.0.0.7" not in k for k in keys)


async def test_entries_expire_from_storage(backend):
    import time

    lim = FailureLimiter(backend, "user", 5, 0.2)  # real clock
    await lim.failure("dave")
    assert await backend.list("loginfail/")
    time.sleep(1.5)
    assert await backend.list("loginfail/") == []
