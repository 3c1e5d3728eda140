"""The failed-login limiter, with a fake clock."""

from services.auth.ratelimit import FailureLimiter


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


def test_locks_out_after_max_failures_within_window_then_recovers():
    clock = Clock()
    lim = FailureLimiter(3, 60, clock=clock)
    assert not lim.failure("alice") and not lim.failure("alice")
    assert lim.retry_after("alice") == 0
    assert lim.failure("alice")  # third failure locks out
    assert lim.retry_after("alice") == 60
    assert lim.retry_after("bob") == 0  # keys are independent
    clock.t += 59
    assert lim.retry_after("alice") == 1
    clock.t += 1.5
    assert lim.retry_after("alice") == 0
    assert not lim.failure("alice")  # counting starts afresh after a lockout


def test_old_failures_leave_the_window_and_success_resets():
    clock = Clock()
    lim = FailureLimiter(3, 60, clock=clock)
    lim.failure("alice")
    lim.failure("alice")
    clock.t += 61
    assert not lim.failure("alice")  # the first two are forgotten
    lim.failure("alice")
    lim.reset("alice")
    assert not lim.failure("alice") and not lim.failure("alice") and lim.failure("alice")


def test_memory_is_bounded():
    lim = FailureLimiter(3, 60, max_keys=100, clock=Clock())
    for i in range(1000):
        lim.failure(f"addr{i}")
    assert len(lim._keys) == 100
