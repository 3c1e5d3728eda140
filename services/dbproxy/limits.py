"""Limits of the RESP data plane, with safe defaults, read from config.

Config (``dbproxy_service.limits``, all optional; sizes take ``KiB``/``MiB``/``GiB`` or
plain bytes, durations ``30s``/``1m``/plain seconds)::

    limits:
      max_bulk_len: 64MiB          # largest argument a client may send
      max_array_len: 1048576       # most arguments in one command
      max_inline_len: 64KiB        # longest inline command line
      max_request: 64MiB           # largest command held in memory
      request_buffer: 256MiB       # all sessions together: bytes of commands not yet complete
      request_timeout: 60s         # a started command must be complete within this
      tls_handshake_timeout: 10s
      max_handshakes: 512          # concurrent unfinished TLS handshakes
      sessions_per_user: 256       # unless the user's roles set max_connections
      max_sessions: 4096           # sessions of the whole proxy
      upstream_connect_timeout: 10s
      upstream_idle_release: 1s    # an idle session's database connection goes back to the pool (0: never)
      max_reply_line: 1MiB         # longest reply header line from the database
      audit_arg_max: 256           # audit keeps this many bytes of each argument
      audit_max_args: 64           # ... and this many arguments
      read_chunk: 64KiB
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields, replace
from typing import Any

from services.common.background import BackgroundTask
from services.common.durations import parse_duration, parse_size
from services.dbproxy.allocator import jemalloc_loaded, purge
from services.dbproxy.resp import Limits as RespLimits

__all__ = ["ProxyLimits", "RequestBudget", "parse_size"]

_MiB = 1024 * 1024

_SIZES = {"max_bulk_len", "max_inline_len", "max_request", "request_buffer", "max_reply_line", "read_chunk"}
_DURATIONS = {"tls_handshake_timeout", "upstream_connect_timeout", "refusal_linger", "request_timeout",
              "shutdown_grace", "upstream_idle_release"}
# Limits for which 0 means "off".
_MAY_BE_ZERO = {"refusal_linger", "upstream_idle_release"}


@dataclass(frozen=True, slots=True)
class ProxyLimits:
    max_bulk_len: int = 64 * _MiB
    max_array_len: int = 1024 * 1024
    max_inline_len: int = 64 * 1024
    max_request: int = 64 * _MiB
    # Bytes held for commands not yet complete, all sessions of the process together.
    request_buffer: int = 256 * _MiB
    # A command whose first byte arrived must be complete within this many seconds.
    request_timeout: float = 60.0
    tls_handshake_timeout: float = 10.0
    # TLS handshakes in progress at once; more connections are closed at once.
    max_handshakes: int = 512
    # Sessions of one user, unless their roles set max_connections (redis-benchmark opens
    # 50, connection pools often 100).
    sessions_per_user: int = 256
    # Sessions of the whole proxy (each holds two sockets; see the open-files limit).
    max_sessions: int = 4096
    upstream_connect_timeout: float = 10.0
    # A session that sent nothing for this long, with no reply due and nothing set on its
    # database connection that RESET would undo (only plain commands and SELECT), gives
    # that connection back to the pool and takes one again for its next command: idle
    # sessions hold no database connection (Azure caps them per tier) and about half the
    # memory. 0: a session keeps its connection to the end.
    upstream_idle_release: float = 1.0
    # On SIGTERM, how long live sessions have to receive the replies already due, then end.
    shutdown_grace: float = 10.0
    max_reply_line: int = _MiB
    audit_arg_max: int = 256
    audit_max_args: int = 64
    read_chunk: int = 64 * 1024
    # How long a refused connection is kept open to read the client's first command, so
    # the error is its reply rather than lost to a reset.
    refusal_linger: float = 1.0

    @property
    def resp(self) -> RespLimits:
        return RespLimits(
            max_bulk_len=self.max_bulk_len,
            max_array_len=self.max_array_len,
            max_inline_len=self.max_inline_len,
            max_buffer=max(self.max_request, 1024),
        )

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any] | None) -> ProxyLimits:
        """Build from a config mapping; unknown keys and bad values raise ValueError."""
        if not data:
            return cls()
        known = {f.name for f in fields(cls)}
        values: dict[str, Any] = {}
        for key, raw in data.items():
            if key not in known:
                raise ValueError(f"unknown RESP limit {key!r} (known: {', '.join(sorted(known))})")
            if key in _SIZES:
                v: Any = parse_size(raw)
            elif key in _DURATIONS:
                v = parse_duration(raw)
            else:
                if isinstance(raw, bool) or not isinstance(raw, (int, str)) or not str(raw).isdigit():
                    raise ValueError(f"invalid value {raw!r} for {key}: use a whole number")
                v = int(raw)
            if v < 0 or (v == 0 and key not in _MAY_BE_ZERO):
                raise ValueError(f"invalid value {raw!r} for {key}: it must be positive")
            values[key] = v
        return replace(cls(), **values)


class RequestBudget:
    """Bytes held for commands not yet complete, shared by every session of the process.

    A session takes what its parser holds beyond what it already took, and gives it
    back when the command completes or the session ends. Single event loop: no lock."""

    __slots__ = ("limit", "used")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0

    def take(self, n: int) -> bool:
        """Reserve ``n`` more bytes; False (nothing reserved) when that would pass the limit."""
        if self.used + n > self.limit:
            return False
        self.used += n
        return True

    def give(self, n: int) -> None:
        self.used = max(0, self.used - n)


def _libc():
    import ctypes
    import ctypes.util

    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


class MallocTrimmer(BackgroundTask):
    """Gives the memory of ended sessions back to the system: glibc's ``malloc_trim(0)`` (or
    jemalloc's purge of every arena, :mod:`services.dbproxy.allocator`), in a thread, once
    sessions ended (``ended()``, a running count) and then a second passed
    without another ending, or every ``interval`` seconds while sessions keep ending.

    A session's two TLS connections leave their freed memory spread over the heap, between
    blocks still in use, where glibc does not return it by itself: without this, RSS rose
    by about 40 KiB per session that had ended (500 sessions opened and closed again and
    again) until fragmentation happened to clear. A trim takes about 10 ms on a 200 MB heap."""

    def __init__(self, ended: Callable[[], int], interval: float = 10.0, poll: float = 1.0) -> None:
        self.ended = ended
        self.interval = interval
        self.poll = poll
        self.trims = 0
        if jemalloc_loaded():
            self._trim = lambda _pad: purge()
        else:
            libc = _libc()
            self._trim = getattr(libc, "malloc_trim", None) if libc is not None else None

    def start(self) -> None:
        if self._trim is not None:
            self._start_task(self._run(), "malloc-trim")

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        trimmed = last = self.ended()
        last_trim = loop.time()
        while True:
            await asyncio.sleep(self.poll)
            now = self.ended()
            quiet = now == last
            last = now
            if now != trimmed and (quiet or loop.time() - last_trim >= self.interval):
                trimmed = now
                await asyncio.to_thread(self._trim, 0)
                last_trim = loop.time()
                self.trims += 1


def tune_malloc(mmap_threshold: int = 128 * 1024) -> bool:
    """Keep large buffers out of the heap (glibc): each TLS connection's 256 KiB read buffer
    (uvloop) is then its own mapping, of which only the pages used count, and it goes back
    to the system when the session ends. Without this glibc raises its threshold after the
    first such buffer is freed, and idle sessions keep whole touched heap blocks (about
    40 KiB more per session). Returns whether the setting took (False off glibc, and on
    jemalloc: :mod:`services.dbproxy.allocator`)."""
    if jemalloc_loaded():
        return False
    libc = _libc()
    mallopt = getattr(libc, "mallopt", None) if libc is not None else None
    if mallopt is None:
        return False
    m_mmap_threshold = -3
    return bool(mallopt(m_mmap_threshold, mmap_threshold))
