"""Failed-login limits with a temporary lockout, per key (a user name, a client address).

``max_attempts`` failures of one key within ``window`` seconds lock that key out for
``window`` seconds; after that it starts counting afresh. A success resets the key.

The state lives in auth's storage (items that expire by themselves), so every auth
process sharing a PostgreSQL database counts the same failures; a compare-and-swap
keeps concurrent updates from losing one. Keys are stored hashed: an address or a
mistyped password pasted as a user name does not sit in the database as it was typed.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable

from services.auth.backend import Backend

PREFIX = "loginfail/"
CAS_TRIES = 8


class FailureLimiter:
    def __init__(self, backend: Backend, scope: str, max_attempts: int, window: float,
                 clock: Callable[[], float] = time.time):
        if max_attempts < 1 or window <= 0:
            raise ValueError("max_attempts must be at least 1 and window positive")
        self.backend = backend
        self.scope = scope
        self.max_attempts = max_attempts
        self.window = window
        self.clock = clock

    def _key(self, key: str) -> str:
        return f"{PREFIX}{self.scope}/{hashlib.sha256(key.encode()).hexdigest()[:40]}"

    async def _load(self, key: str):
        item = await self.backend.get(self._key(key))
        if item is None:
            return None, {"f": [], "until": 0.0}
        try:
            return item, json.loads(item.value)
        except ValueError:
            return item, {"f": [], "until": 0.0}

    async def retry_after(self, key: str) -> float:
        """Seconds until ``key`` may try again (0: it may try now)."""
        _, doc = await self._load(key)
        return max(0.0, float(doc.get("until", 0.0)) - self.clock())

    async def failure(self, key: str) -> bool:
        """Count a failure; True when it locked the key out."""
        for _ in range(CAS_TRIES):
            now = self.clock()
            item, doc = await self._load(key)
            failures = [t for t in doc.get("f", []) if t > now - self.window]
            failures.append(now)
            locked = len(failures) >= self.max_attempts
            new = {"f": [] if locked else failures,
                   "until": now + self.window if locked else float(doc.get("until", 0.0))}
            value = json.dumps(new).encode()
            # The storage expires items by the wall clock (``clock`` may be another in tests).
            expires = time.time() + max(self.window, new["until"] - now) + 1.0
            if item is None:
                if await self.backend.create(self._key(key), value, expires=expires):
                    return locked
            elif await self.backend.compare_and_swap(item.key, item.value, value, expires=expires):
                return locked
        # Contended beyond reason: count it as a lockout rather than lose it.
        return True

    async def reset(self, key: str) -> None:
        await self.backend.delete(self._key(key))
