"""Failed-login limits with a temporary lockout, per key (a user name, a client address).

``max_attempts`` failures of one key within ``window`` seconds lock that key out for
``window`` seconds; after that it starts counting afresh. A success resets the key. State is
in memory (per auth process) and bounded: the least recently failing keys are forgotten first
when ``max_keys`` is reached.
"""

from __future__ import annotations

import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class _Entry:
    failures: deque = field(default_factory=deque)
    locked_until: float = 0.0


class FailureLimiter:
    def __init__(self, max_attempts: int, window: float, max_keys: int = 100_000,
                 clock: Callable[[], float] = time.monotonic):
        if max_attempts < 1 or window <= 0:
            raise ValueError("max_attempts must be at least 1 and window positive")
        self.max_attempts = max_attempts
        self.window = window
        self.max_keys = max_keys
        self.clock = clock
        self._keys: OrderedDict[str, _Entry] = OrderedDict()

    def retry_after(self, key: str) -> float:
        """Seconds until ``key`` may try again (0: it may try now)."""
        entry = self._keys.get(key)
        if entry is None:
            return 0.0
        return max(0.0, entry.locked_until - self.clock())

    def failure(self, key: str) -> bool:
        """Count a failure; True when it locked the key out."""
        now = self.clock()
        entry = self._keys.get(key)
        if entry is None:
            entry = self._keys[key] = _Entry()
        self._keys.move_to_end(key)
        q = entry.failures
        while q and q[0] <= now - self.window:
            q.popleft()
        q.append(now)
        locked = False
        if len(q) >= self.max_attempts:
            entry.locked_until = now + self.window
            q.clear()
            locked = True
        while len(self._keys) > self.max_keys:
            self._keys.popitem(last=False)
        return locked

    def reset(self, key: str) -> None:
        self._keys.pop(key, None)
