"""Watch streams over the backend: current state first, then INIT_DONE, then changes."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from services.auth import metrics as auth_metrics
from services.auth.backend import Backend, Change

# A watcher that falls this far behind is ended; it reconnects and gets the current state again.
MAX_PENDING = 10_000


class WatchOverflow(Exception):
    """The consumer did not keep up; the stream must end so that it starts over."""


class Subscription:
    """Changes under a key prefix, queued from the moment of subscribing (before the listing),
    so that nothing happening between the listing and the stream is missed."""

    def __init__(self, backend: Backend, prefix: str):
        self._loop = asyncio.get_running_loop()
        self._kind = prefix.strip("/").split("/")[0] or "all"
        self._closed = False
        auth_metrics.default().watch(self._kind, 1)
        self._queue: asyncio.Queue[Change | None] = asyncio.Queue()
        self._overflow = False
        self._cancel: Callable[[], None] = backend.subscribe(prefix, self._on_change)

    def _on_change(self, change: Change) -> None:
        # Backends may notify from another thread (a PostgreSQL listener).
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is self._loop:
            self._put(change)
        else:
            self._loop.call_soon_threadsafe(self._put, change)

    def _put(self, change: Change) -> None:
        if change.kind == "reset" or self._queue.qsize() >= MAX_PENDING:
            self._overflow = True
            self._queue.put_nowait(None)
            return
        self._queue.put_nowait(change)

    async def get(self, timeout: float | None = None) -> Change | None:
        """The next change; None on timeout. Raises WatchOverflow."""
        try:
            change = await asyncio.wait_for(self._queue.get(), timeout) if timeout is not None \
                else await self._queue.get()
        except TimeoutError:
            return None
        if change is None or self._overflow:
            raise WatchOverflow()
        return change

    def close(self) -> None:
        self._cancel()
        if not self._closed:
            self._closed = True
            auth_metrics.default().watch(self._kind, -1)

    def __enter__(self) -> Subscription:  # noqa: PYI034
        return self

    def __exit__(self, *exc) -> None:
        self.close()
