"""One background task that belongs to an object: started on the running loop, stopped by
cancelling it and waiting until it has ended."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any

__all__ = ["BackgroundTask"]


class BackgroundTask:
    """Mixed into a class whose ``stop()`` ends the one task its ``start()`` began."""

    _task: asyncio.Task | None = None

    def _start_task(self, coro: Coroutine[Any, Any, Any], name: str) -> None:
        self._task = asyncio.get_running_loop().create_task(coro, name=name)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
