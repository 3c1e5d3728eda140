"""The memory allocator dbproxy runs on: jemalloc when it is installed, else glibc's malloc.

Why (measured, docs/performance.md): Python's ``ssl`` asks OpenSSL to free a connection's
record buffers whenever they are empty (``SSL_MODE_RELEASE_BUFFERS``, which keeps idle
sessions small), so every TLS read and write of the data plane allocates and frees about
17 KiB. glibc serves that size from the main heap; once thousands of sessions have come
and gone the heap is fragmented and ``_int_malloc`` searches its bins on every one of those
calls: after 3,000 idle sessions had opened and closed, the same dbproxy spent 70 instead
of 48 µs of CPU per ``-P 1`` command (12% of it in ``_int_malloc``), and stayed that way.
jemalloc (Debian's ``libjemalloc2``, which redis-server itself depends on) serves those
sizes from a per-thread cache in constant time, fragmented heap or not.

An allocator is chosen before a process starts, so ``cachegate start`` with dbproxy in it
runs itself again (``execve``: the same process id, arguments and environment) with
jemalloc in ``LD_PRELOAD``. ``dbproxy_service.allocator``: ``auto`` (the default: jemalloc
if found), ``jemalloc`` (refuse to start without it) or ``system`` (glibc's malloc, tuned
by :func:`services.dbproxy.limits.tune_malloc`). Workers inherit the environment.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Mapping
from pathlib import Path

__all__ = ["JEMALLOC_CONF", "MARK", "AllocatorError", "find_jemalloc", "jemalloc_loaded", "purge", "reexec_env",
           "reexec_if_needed"]

# Set in the environment of the process that was run again, so that it is never run a third
# time (were the preload to fail, it goes on with glibc's malloc).
MARK = "CACHEGATE_ALLOCATOR_LOADED"  # in config.ENV_NOT_CONFIG
# jemalloc's settings unless MALLOC_CONF is already set: a background thread gives unused
# pages back (after dirty_decay_ms), and allocations above 128 KiB (uvloop's 256 KiB TLS
# read buffer per connection) come from pages that were given back, so that an idle
# session's untouched buffer pages take no memory.
JEMALLOC_CONF = "background_thread:true,oversize_threshold:131072,dirty_decay_ms:2000,muzzy_decay_ms:0"
_SONAME = "libjemalloc.so.2"
_DIRS = ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib", "/usr/local/lib")
_ALL_ARENAS = 4096  # MALLCTL_ARENAS_ALL


class AllocatorError(Exception):
    """``allocator: jemalloc`` and no jemalloc on this host."""


def find_jemalloc() -> str | None:
    """The path of jemalloc's shared library, or None."""
    for d in _DIRS:
        p = Path(d) / _SONAME
        if p.is_file():
            return str(p)
    return None


def _mallctl():
    try:
        return ctypes.CDLL(None).mallctl
    except (AttributeError, OSError):
        return None


def jemalloc_loaded() -> bool:
    """Whether this process allocates with jemalloc (it exports ``mallctl``)."""
    return _mallctl() is not None


def reexec_env(setting: str, environ: Mapping[str, str], loaded: bool | None = None,
               library: str | None = None) -> dict[str, str] | None:
    """The environment to run this process again with, or None to go on as it is.
    Raises :class:`AllocatorError` for ``jemalloc`` when the library is missing."""
    if setting == "system" or environ.get(MARK):
        return None
    if jemalloc_loaded() if loaded is None else loaded:
        return None
    lib = library if library is not None else find_jemalloc()
    if not lib:
        if setting == "jemalloc":
            raise AllocatorError(f"dbproxy_service.allocator is jemalloc but {_SONAME} was not found: install "
                                 "libjemalloc2 (apt-get install libjemalloc2), or set allocator: auto")
        return None
    env = dict(environ)
    preload = env.get("LD_PRELOAD", "")
    env["LD_PRELOAD"] = f"{lib} {preload}".strip()
    if not env.get("MALLOC_CONF"):
        env["MALLOC_CONF"] = JEMALLOC_CONF
    env[MARK] = "jemalloc"
    return env


def reexec_if_needed(setting: str, argv: list[str], executable: str) -> None:
    """Run this process again on jemalloc when :func:`reexec_env` says so (does not return then)."""
    env = reexec_env(setting, os.environ)
    if env is not None:
        os.execve(executable, [executable, *argv[1:]], env)


def purge() -> bool:
    """Give jemalloc's unused pages back to the system now (all arenas); False if jemalloc
    is not the allocator."""
    mallctl = _mallctl()
    if mallctl is None:
        return False
    name = f"arena.{_ALL_ARENAS}.purge".encode()
    return mallctl(ctypes.c_char_p(name), None, None, None, ctypes.c_size_t(0)) == 0
