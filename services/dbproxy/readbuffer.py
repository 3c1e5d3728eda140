"""One read buffer for every relaying transport of a process.

uvloop's TLS layer hands a plain ``asyncio.Protocol`` each read as a new bytes object,
made by asking OpenSSL for up to 256 KiB: two allocations of that size per read (the
second for the read that finds nothing more), each a mapping of its own under
:func:`~services.dbproxy.limits.tune_malloc`, with its page faults and munmap. Measured
through the real dbproxy at ``redis-benchmark -P 1``, that was a third of the proxy's CPU
per command. A buffered protocol is given the bytes in a buffer that already exists instead.

Sharing one buffer is safe: the loop fills it and calls ``buffer_updated``, which copies
the bytes out before anything else runs, so no other transport reads into it meanwhile.
"""

from __future__ import annotations

import asyncio

__all__ = ["SharedBufferProtocol"]

_SIZE = 256 * 1024  # what uvloop's TLS layer reads at most at once
_BUFFER = memoryview(bytearray(_SIZE))


class SharedBufferProtocol(asyncio.BufferedProtocol):
    """A protocol whose reads arrive, as bytes, in :meth:`data_received`.

    Not an ``asyncio.Protocol``: the loops check for that class and then ignore
    ``get_buffer``."""

    __slots__ = ()

    def get_buffer(self, sizehint: int) -> memoryview:
        return _BUFFER

    def buffer_updated(self, nbytes: int) -> None:
        self.data_received(_BUFFER[:nbytes].tobytes())

    def data_received(self, data: bytes) -> None:
        raise NotImplementedError
