"""Batched audit delivery with an on-disk spool: never drops an event silently.

Producers never block and do no I/O:

* :meth:`AuditSpool.emit` queues one event of any type (session start and end,
  refusals) as a tuple.
* A session's queries take the cheap road: :meth:`AuditSpool.query_stream`
  gives a :class:`QueryStream` that holds what every ``db.session.query`` event
  of that session shares, already encoded; the session then queues whole chunks
  of allowed commands at once (:meth:`QueryStream.commands`: one tuple for all
  the commands one read brought, which the parser had built anyway) or one
  command (:meth:`QueryStream.query`, for denials and commands the proxy
  answers itself).

A background task encodes the queued events in batches. Query events are
written straight in the protobuf wire format (an ``AuditEvent`` with its
``fields`` Struct: the session's fields, ``db_name``, ``command``, ``args``),
from per-session and per-command parts encoded once; arguments go through the
same masking and cutting as :func:`~services.dbproxy.commands.audit_args`
(secrets of AUTH/HELLO/... redacted, long arguments cut with their length
kept, at most ``max_args``). Every batch is checked by parsing it (upb, in C)
before it leaves. Other events are built as protobuf messages.

Each batch goes to the injected ``send`` coroutine: by default as a list of
``AuditEvent``; with ``encoded=True`` as the serialized
``EmitAuditEventsRequest`` (bytes), which a gRPC call with no request
serializer sends as is (no copying of messages at all). When ``send`` fails or
times out the batch is written to the spool directory (one file per batch,
written to a temporary name, fsynced, then renamed) and retried later, oldest
first; a file is deleted only after ``send`` succeeded. Spool files are written
by a thread of their own, in order, so that a slow disk (an fsync of a cloud disk
takes milliseconds) holds up neither the sessions nor the delivery; once
``_WRITE_BACKLOG`` bytes wait for it, the event loop waits for the disk too (so do
the sessions, and memory stays bounded). When the in-memory queue is over its
bound, events are spilled to disk at once instead of growing memory. Should the
disk fail as well, the loss is logged at ERROR with the
number of events and counted in :attr:`AuditSpool.lost` (never silent).

Spool file format: repeated (4-byte big-endian length, serialized AuditEvent).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import struct
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from google.protobuf import struct_pb2

from cachegate.auth.v1 import audit_service_pb2
from cachegate.types.v1 import types_pb2
from services.common.logs import LOGGED_EVENTS, event_line
from services.common.auditcodes import CODES
from services.common.auditwire import event_spans
from services.common.creds import private_dir
from services.dbproxy.commands import SECRET_COMMANDS, SUBCOMMAND_PARENTS, audit_args, audit_text, lookup

__all__ = ["AuditSpool", "QueryStream", "id_prefix", "read_spool_file"]

log = logging.getLogger("cachegate.dbproxy.audit")


SendFn = Callable[[Any], Awaitable[Any]]

_LEN = struct.Struct(">I")
# Bytes of spool files at most waiting for the writer thread (AuditSpool._write_spool).
_WRITE_BACKLOG = 16 << 20
_Request = audit_service_pb2.EmitAuditEventsRequest

# Queue entry kinds; ``held``: the bytes of the client's commands the entry keeps.
_GEN = 0  # (_GEN, type_, actor, source_addr, success, error, fields, when, base)
_CMDS = 1  # (_CMDS, stream, when, logical_db, commands, held): allowed commands
_ONE = 2  # (_ONE, stream, when, logical_db, command, rbac_name, error, held)


def _arg_bytes(cmds: Iterable[Any]) -> int:
    """The bytes of the commands' arguments (0 for arguments that are not bytes: a bug the
    encoder reports as lost events; queuing never raises)."""
    try:
        return sum([len(a) for c in cmds for a in c.argv])
    except TypeError:
        return 0


def _split_request(data: bytes, name: str = "") -> list[bytes]:
    """A serialized EmitAuditEventsRequest as its framed events (field 1 each)."""
    return [data[f:e] for f, _s, e in event_spans(data, name)]


def _read_spool_raw(path: Path) -> list[bytes]:
    """The framed events of a spool file: a serialized EmitAuditEventsRequest, or (files
    of earlier versions) repeated 4-byte big-endian length + AuditEvent."""
    data = path.read_bytes()
    if not data or data[0] == 0x0A:
        return _split_request(data, path.name)
    out, off = [], 0
    while off + 4 <= len(data):
        (n,) = _LEN.unpack_from(data, off)
        off += 4
        if off + n > len(data):
            raise ValueError(f"truncated audit spool file {path.name}")
        out.append(_frame(data[off : off + n]))
        off += n
    if off != len(data):
        raise ValueError(f"truncated audit spool file {path.name}")
    return out


def read_spool_file(path: Path) -> list[types_pb2.AuditEvent]:
    return list(_Request.FromString(b"".join(_read_spool_raw(path))).events)


# --------------------------------------------------------------------------------------------
# Protobuf wire format, by hand (only what AuditEvent and Struct need)

_V1 = [bytes((i,)) for i in range(128)]


def _varint(n: int) -> bytes:
    if n < 128:
        return _V1[n]
    # Up to five bytes (every length, a time's seconds and nanoseconds) without a loop.
    if n < 1 << 14:
        return bytes((n & 0x7F | 0x80, n >> 7))
    if n < 1 << 21:
        return bytes((n & 0x7F | 0x80, n >> 7 & 0x7F | 0x80, n >> 14))
    if n < 1 << 28:
        return bytes((n & 0x7F | 0x80, n >> 7 & 0x7F | 0x80, n >> 14 & 0x7F | 0x80, n >> 21))
    if n < 1 << 35:
        return bytes((n & 0x7F | 0x80, n >> 7 & 0x7F | 0x80, n >> 14 & 0x7F | 0x80, n >> 21 & 0x7F | 0x80,
                      n >> 28))
    out = bytearray()
    while n > 127:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


_VN = 4096
_VARINTS = [_varint(i) for i in range(_VN)]  # the lengths of nearly every event and field


def _ld(tag: bytes, payload: bytes) -> bytes:
    """A length-delimited field."""
    n = len(payload)
    return tag + (_VARINTS[n] if n < _VN else _varint(n)) + payload


def _value_str(text: bytes) -> bytes:
    """google.protobuf.Value{string_value} (field 3)."""
    return _ld(b"\x1a", text)


def _entry(key: str, value: bytes) -> bytes:
    """One ``Struct.fields`` map entry (Struct field 1) holding an encoded Value."""
    return _ld(b"\x0a", _ld(b"\x0a", key.encode()) + _ld(b"\x12", value))


def _str_entry(key: str, text: str) -> bytes:
    return _entry(key, _value_str(text.encode()))


def _frame(ev: bytes) -> bytes:
    """An encoded AuditEvent as the ``events`` field (1) of EmitAuditEventsRequest: batches
    are the concatenation of framed events."""
    return _ld(b"\x0a", ev)


# A ListValue item (field 1) holding a short string Value: tag, length, tag, length.
_LIST_ITEM = [bytes((0x0A, n + 2, 0x1A, n)) for n in range(126)]
_SUCCESS = b"\x38\x01"
_SUCCESS_FIELDS = _SUCCESS + b"\x4a"  # success, then the fields Struct's tag
_ID_MASK = 0xFFFFFFFFFFFF


def id_prefix() -> str:
    """The first 24 characters of a sender's event ids: a version 4 UUID's random 76 bits,
    drawn once. Each id is this and a 48-bit counter (12 hex digits): unique without a system
    call each, and one sender's ids follow each other, so that auth's id index takes a batch
    as one run of neighbouring entries instead of as many scattered pages as events."""
    r = os.urandom(10).hex()
    return f"{r[:8]}-{r[8:12]}-4{r[12:15]}-{'89ab'[int(r[15], 16) & 3]}{r[16:19]}-"


def _list_item(text: bytes) -> bytes:
    n = len(text)
    if n < 126:
        return _LIST_ITEM[n] + text
    return _ld(b"\x0a", _value_str(text))


def _args_header(n: int) -> bytes:
    """The ``args`` Struct entry up to its ListValue items (``n`` bytes of them)."""
    value = b"\x32" + _varint(n)  # Value{list_value}
    payload = b"\x0a\x04args\x12" + _varint(len(value) + n) + value
    return b"\x0a" + _varint(len(payload) + n) + payload


_ARGS_HEADER = [_args_header(n) for n in range(8192)]


def _args_items(name: str, argv: Sequence[bytes], max_arg: int, max_args: int) -> bytes:
    """The ``args`` list items: what :func:`audit_args` gives, encoded."""
    if len(argv) <= max_args and name not in SECRET_COMMANDS:
        short = min(max_arg, 125)
        item = _LIST_ITEM
        parts = []
        for a in argv:
            n = len(a)
            parts.append(item[n] + a if n <= short and a.isascii() else _list_item(audit_text(a, max_arg).encode()))
        return b"".join(parts)
    return b"".join([_list_item(t.encode())
                     for t in audit_args(name, list(argv), max_arg=max_arg, max_args=max_args)])


def _args_entry(name: str, argv: Sequence[bytes], max_arg: int, max_args: int) -> bytes:
    items = _args_items(name, argv, max_arg, max_args)
    n = len(items)
    return (_ARGS_HEADER[n] if n < 8192 else _args_header(n)) + items


_SECONDS: list = [None, b""]  # the last whole second encoded, and its encoding


def _timestamp(when: float) -> bytes:
    """``time`` (field 4): a Timestamp of seconds and nanoseconds (at most 14 bytes)."""
    sec = int(when)
    nanos = int((when - sec) * 1e9)
    last = _SECONDS
    if last[0] != sec:
        last[1] = b"\x08" + _varint(sec)
        last[0] = sec
    body = last[1] + b"\x10" + _varint(nanos) if nanos > 0 else last[1]
    return b"\x22" + _V1[len(body)] + body


def _struct_bytes(fields: Mapping[str, Any]) -> bytes:
    st = struct_pb2.Struct()
    st.update({k: v for k, v in fields.items() if v is not None})
    return st.SerializeToString()


_DB_ENTRIES: dict[int, bytes] = {}
_CMD_ENTRIES: dict[str, bytes] = {}  # by RBAC name
_CMD_BY_NAME: dict[str, bytes] = {}  # by command name, for commands without subcommands
_CACHE_MAX = 4096


def _db_entry(db: int) -> bytes:
    e = _DB_ENTRIES.get(db)
    if e is None:
        e = _str_entry("db_name", str(db))
        if len(_DB_ENTRIES) < _CACHE_MAX:
            _DB_ENTRIES[db] = e
    return e


def _cmd_entry(name: str) -> bytes:
    e = _CMD_ENTRIES.get(name)
    if e is None:
        e = _str_entry("command", name)
        if len(_CMD_ENTRIES) < _CACHE_MAX:
            _CMD_ENTRIES[name] = e
    return e


def _cmd_entry_of(name: str, argv: Sequence[bytes]) -> bytes:
    """The ``command`` entry of a command: its RBAC name (``CLIENT|KILL``)."""
    e = _cmd_entry(lookup(name, argv).name)
    if name not in SUBCOMMAND_PARENTS and len(_CMD_BY_NAME) < _CACHE_MAX:
        _CMD_BY_NAME[name] = e
    return e


class QueryStream:
    """The ``db.session.query`` events of one session (see :meth:`AuditSpool.query_stream`).

    ``commands(when, logical_db, cmds, size)`` queues one event per command (allowed,
    forwarded); each command is anything with ``.name`` (uppercased first argument)
    and ``.argv`` (list of bytes) that nobody changes afterwards, such as
    :class:`~services.dbproxy.resp.Command`; ``size``: their bytes (the caller has
    counted them: the ``raw`` of each), or -1 to count their arguments here. The queue
    keeps the commands until they are encoded, so it is bounded by their bytes too
    (``AuditSpool.max_queue_bytes``). ``query(when, logical_db, command,
    name, error)`` queues one event whose ``command`` field is ``name`` (the RBAC
    name); a non-empty ``error`` makes it a failure."""

    __slots__ = ("_spool", "head", "base", "max_arg", "max_args", "_db", "_shared")

    def __init__(self, spool: AuditSpool, actor: str, source_addr: str, base: Mapping[str, Any],
                 max_arg: int, max_args: int) -> None:
        self._spool = spool
        type_ = "db.session.query"
        # Every field of the event that is the same for the whole session, encoded.
        self.head = b"".join((
            _ld(b"\x12", type_.encode()), _ld(b"\x1a", CODES[type_].encode()),
            _ld(b"\x2a", actor.encode()) if actor else b"",
            _ld(b"\x32", source_addr.encode()) if source_addr else b"",
            _ld(b"\x52", spool.cluster_name.encode()) if spool.cluster_name else b"",
        ))
        self.base = _struct_bytes(base)
        self.max_arg = max_arg
        self.max_args = max_args
        self._db = -1  # the logical database of the last commands, and
        self._shared = b""  # their Struct entries shared by every command (base, db_name)

    def shared(self, db: int) -> bytes:
        """The fields Struct's entries the same for every command in logical database ``db``."""
        if db != self._db:
            self._shared = self.base + _db_entry(db)
            self._db = db
        return self._shared

    def commands(self, when: float, logical_db: int, cmds: list, size: int = -1) -> None:
        sp = self._spool
        if size < 0:
            size = _arg_bytes(cmds)
        sp._queue.append((_CMDS, self, when, logical_db, cmds, size))
        sp._pending += len(cmds)
        sp._held += size
        if sp._pending >= sp._trigger or sp._held > sp._held_trigger:
            sp._queued_a_batch()

    def query(self, when: float, logical_db: int, cmd: Any, name: str, error: str = "") -> None:
        sp = self._spool
        size = _arg_bytes((cmd,))
        sp._queue.append((_ONE, self, when, logical_db, cmd, name, error, size))
        sp._pending += 1
        sp._held += size
        if sp._pending >= sp._trigger or sp._held > sp._held_trigger:
            sp._queued_a_batch()


class AuditRejected(Exception):
    """Raised by ``send`` when the receiver refuses the batch itself (not a transient failure)."""


class AuditSpool:
    """``send``: async callable taking a batch (a list of AuditEvent, or with ``encoded``
    the serialized EmitAuditEventsRequest), raising on failure. ``spool_dir``: where
    undelivered batches wait (created if missing). A batch leaves when ``batch_size``
    events wait or every ``flush_interval``; it takes all that waits then, up to
    ``max_batch_events`` (auth takes at most 1000 per call) and ``max_batch_bytes``
    (gRPC's limit is 4 MiB); up to ``max_in_flight`` batches are sent at once.

    Past ``max_queue`` events, or ``max_queue_bytes`` of the client commands they keep (a
    query event keeps its command until it is encoded, cut to ``max_arg``), the oldest go
    to disk. Sessions sending large values while auth is slow or away would otherwise make
    the queue hold their every byte (50,000 commands of 1 MiB: 50 GB)."""

    def __init__(
        self,
        send: SendFn,
        spool_dir: str | os.PathLike[str],
        *,
        cluster_name: str = "",
        batch_size: int = 500,
        max_batch_events: int = 1000,
        max_batch_bytes: int = 2 << 20,
        flush_interval: float = 0.2,
        send_timeout: float = 10.0,
        retry_interval: float = 5.0,
        max_queue: int = 50_000,
        max_queue_bytes: int = 64 << 20,
        max_in_flight: int = 8,
        encoded: bool = False,
    ) -> None:
        self._send = send
        self.spool_dir = Path(spool_dir)
        self.cluster_name = cluster_name
        self.batch_size = batch_size
        self.max_batch_events = max_batch_events
        self.max_batch_bytes = max_batch_bytes
        self.flush_interval = flush_interval
        self.send_timeout = send_timeout
        self.retry_interval = retry_interval
        self.max_queue = max_queue
        self.max_queue_bytes = max_queue_bytes
        self.max_in_flight = max(1, max_in_flight)
        self.encoded = encoded
        self._queue: deque[tuple] = deque()
        self._pending = 0  # events in _queue
        self._held = 0  # the bytes of client commands its entries keep
        # Send (or spill) from here: a quarter of the bound is a batch's worth of bytes.
        self._held_trigger = max_queue_bytes // 4
        self._trigger = min(batch_size, max_queue + 1)  # wake the sender (or spill) from here
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._closing = False
        self._seq = 0
        self._templates: dict[int, tuple[dict, struct_pb2.Struct]] = {}
        self._id_prefix = id_prefix()
        self._id_prefix_b = self._id_prefix.encode()
        self._id_lo = 0
        self._spooled_pending = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._writer: ThreadPoolExecutor | None = None  # writes spool files (one thread: in order)
        # Spool files handed to it and not yet accounted for, oldest first: (its future, the
        # number of events, the bytes); it finishes them in this order.
        self._writes: deque[tuple[Future, int, int]] = deque()
        self._writing_bytes = 0
        self._written: asyncio.Event | None = None  # set while it has nothing to write
        self.sent = 0  # events delivered
        self.spooled = 0  # events written to disk (delivered later or still waiting)
        self.lost = 0  # events neither delivered nor spooled (logged at ERROR)
        self.rejected = 0  # events auth refused as invalid: kept on disk as *.rejected (ERROR)

    # -- producer side (hot path) ------------------------------------------------------------

    def emit(
        self,
        type_: str,
        actor: str,
        *,
        source_addr: str = "",
        success: bool = True,
        error: str = "",
        fields: dict[str, Any] | None = None,
        when: float | None = None,
        base: dict[str, Any] | None = None,
    ) -> None:
        """Queue one event; never blocks, never raises for delivery problems.

        ``base``: fields shared by many events (a session's id, user, database); pass the
        same dict object each time (and never change it) so its Struct is built once."""
        self._queue.append((_GEN, type_, actor, source_addr, success, error, fields, when or time.time(), base))
        if type_ in LOGGED_EVENTS:  # session start and end: one line in the log too
            event_line(type_, actor, source_addr, success, error, {**(base or {}), **(fields or {})})
        self._pending += 1
        if self._pending >= self._trigger:
            self._queued_a_batch()

    def query_stream(self, actor: str, source_addr: str, base: Mapping[str, Any], *,
                     max_arg: int = 256, max_args: int = 64) -> QueryStream:
        """The cheap way to queue one session's ``db.session.query`` events; ``base``: the
        session's own fields (session id, database, db user), read once now."""
        return QueryStream(self, actor, source_addr, base, max_arg, max_args)

    def _queued_a_batch(self) -> None:
        if self._wake is not None:
            self._wake.set()
        if self._pending > self.max_queue or self._held > self.max_queue_bytes:
            # The oldest events go to disk until the rest fits (spilling all that waited at
            # once stalled every session for the time it took).
            self._spill(keep=self.max_queue, keep_bytes=self.max_queue_bytes)

    @property
    def queued(self) -> int:
        return self._pending

    @property
    def queued_bytes(self) -> int:
        """The bytes of client commands the queued events keep."""
        return self._held

    @property
    def spooling(self) -> int:
        """Events handed to the writer thread and not yet on disk (then: ``spooled``)."""
        return sum(count for _done, count, _size in self._writes)

    # -- life cycle ----------------------------------------------------------------------------

    async def start(self) -> None:
        # Events hold command arguments: the owner's only (a spool from before is tightened).
        private_dir(self.spool_dir, tighten_files=True)
        self._spooled_pending = any(self.spool_dir.glob("*.batch"))
        self._wake = asyncio.Event()
        self._loop = asyncio.get_running_loop()
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="audit-spool-writer")
        self._written = asyncio.Event()
        self._written.set()
        self._task = asyncio.create_task(self._run(), name="audit-spool")

    async def flush(self, timeout: float | None = None) -> None:
        """Deliver (or spool) everything queued now."""
        async def both() -> None:
            await self._deliver_queue()
            await self.written()

        await asyncio.wait_for(both(), timeout)

    async def written(self) -> None:
        """Return once every spool file handed to the writer thread is on disk (or lost)."""
        while self._writes and self._written is not None:
            await self._written.wait()

    async def close(self, timeout: float = 10.0) -> None:
        """Deliver what is queued (or spool it), then stop."""
        self._closing = True
        if self._wake is not None:
            self._wake.set()
        if self._task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._task), timeout)
            except (TimeoutError, asyncio.CancelledError):
                self._task.cancel()
        if self._queue:
            self._spill()
        try:
            await asyncio.wait_for(self.written(), timeout)
        except TimeoutError:  # the disk hangs: said, never silent
            log.error("AUDIT SPOOL: the disk has not taken %d spool files within %gs; they are written "
                      "when it does (lost if this process is killed first)", len(self._writes), timeout)
        writer, self._writer = self._writer, None  # from here, spool files are written at once
        if writer is not None:
            writer.shutdown(wait=False)

    # -- consumer ------------------------------------------------------------------------------

    async def _run(self) -> None:
        assert self._wake is not None
        next_retry = 0.0
        while True:
            try:
                await asyncio.wait_for(self._wake.wait(), self.flush_interval)
            except TimeoutError:
                pass
            self._wake.clear()
            try:
                now = time.monotonic()
                if self._spooled_pending and now >= next_retry:
                    if not await self._deliver_spool():
                        next_retry = now + self.retry_interval
                await self._deliver_queue(spool_only=self._spooled_pending, drain=self._closing)
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - the loop must survive anything
                log.exception("audit delivery loop error")
            if self._closing and not self._queue:
                return

    def _take(self) -> list[list[bytes]]:
        """Encode the queued events (up to ``max_batch_events``, whole entries); split them
        into batches of at most ``max_batch_bytes``.

        Taking all that waits (not ``batch_size``) keeps up under load: whatever the
        sessions queued while the previous batch was on its way goes in the next one."""
        q = self._queue
        evs: list[bytes] = []
        limit = max(self.batch_size, self.max_batch_events)
        encode_commands = self._encode_commands
        while q and len(evs) < limit:
            if q[0][0] == _CMDS:
                # The run of command entries that waits (nearly all of them), in one call.
                run: list[tuple] = []
                count = held = 0
                while q and q[0][0] == _CMDS and len(evs) + count < limit:
                    entry = q.popleft()
                    run.append(entry)
                    count += len(entry[4])
                    held += entry[5]
                self._pending -= count
                self._held -= held
                before = len(evs)
                try:
                    encode_commands(run, evs)
                except Exception:  # noqa: BLE001 - one by one: only what cannot be encoded is lost
                    del evs[before:]
                    for entry in run:
                        self._encode_or_lose(entry, evs)
                continue
            entry = q.popleft()
            self._pending -= 1
            if entry[0] == _ONE:
                self._held -= entry[7]
            self._encode_or_lose(entry, evs)
        batches, cur, size = [], [], 0
        for ev in evs:
            if cur and (len(cur) >= limit or size + len(ev) > self.max_batch_bytes):
                batches.append(cur)
                cur, size = [], 0
            cur.append(ev)
            size += len(ev)
        if cur:
            batches.append(cur)
        return batches

    async def _deliver_queue(self, spool_only: bool = False, drain: bool = True) -> None:
        """Send everything queued, in batches, up to ``max_in_flight`` at a time. Taking
        all that waits at each turn keeps up with busy sessions: this task runs once per
        turn of the event loop, whatever the number of sessions. A batch that fails goes
        to the spool, and so does everything after it.

        A batch is encoded when a sending slot is free, and the sessions run between two
        batches: encoding all that waited at once (tens of thousands of events when auth,
        on the same CPUs, fell behind) held every session up for 100 ms and more.

        Without ``drain``, what was queued while a batch was on its way goes at once only
        when it makes a whole batch; else it waits for ``batch_size`` events or the next
        ``flush_interval``. (Sending whatever had come in meant, under steady load of
        one command per round trip, a call to auth every few milliseconds with a few dozen
        events: auth then spent more on calls than on storing events.)"""
        first = True
        while self._queue and (first or drain or self._pending >= self.batch_size):
            first = False
            slots = asyncio.Semaphore(self.max_in_flight)
            sends: list[asyncio.Future] = []

            async def send(batches: list[list[bytes]]) -> list[tuple[bool, list[bytes]]]:
                try:
                    return [await self._try_send(b) for b in batches]
                finally:
                    slots.release()

            left = self._pending  # this round: what waits now, not what comes meanwhile
            failed: Exception | None = None
            try:
                while self._queue and (left > 0 or not sends):
                    await slots.acquire()
                    spool_only = spool_only or self._spooled_pending  # spilled meanwhile: keep the order
                    before = self._pending
                    try:
                        batches = self._take()
                    except Exception as exc:  # noqa: BLE001 - the batches on their way still count
                        slots.release()
                        failed = exc
                        break
                    left -= before - self._pending
                    if spool_only:
                        # Older events wait on disk: keep the order, queue behind them.
                        for batch in batches:
                            self._write_spool(batch)
                        slots.release()
                    else:
                        sends.append(asyncio.ensure_future(send(batches)))
                    await asyncio.sleep(0)  # the sessions, and the send just begun, run now
                results = [r for done in await asyncio.gather(*sends) for r in done]
            except asyncio.CancelledError:
                for f in sends:
                    f.cancel()
                raise
            for ok, kept in results:
                if not ok:
                    self._write_spool(kept)
                    self._spooled_pending = True
                    spool_only = True
            if failed is not None:
                raise failed

    def _checked(self, evs: list[bytes]) -> list[bytes]:
        """``evs`` without the events that do not parse (a bug: logged at ERROR and
        counted as lost, never silent, and never a batch that blocks the spool)."""
        try:
            _Request.FromString(b"".join(evs))
            return evs
        except Exception:  # noqa: BLE001 - DecodeError: find the bad ones
            pass
        good = []
        for ev in evs:
            try:
                _Request.FromString(ev)
                good.append(ev)
            except Exception:  # noqa: BLE001
                self.lost += 1
                log.error("AUDIT EVENT LOST: an encoded audit event does not parse: %r", ev[:200])
        return good

    async def _try_send(self, evs: list[bytes]) -> tuple[bool, list[bytes]]:
        ok, kept, _ = await self._try_send_once(evs)
        return ok, kept

    async def _try_send_once(self, evs: list[bytes]) -> tuple[bool, list[bytes], bool]:
        """Send one batch of framed events. Returns whether it was delivered, the events to
        keep when not, and whether the receiver rejected them (:class:`AuditRejected`). With
        ``encoded`` the bytes go as they are (checked only when the send fails); else they
        are parsed into AuditEvent messages."""
        for attempt in (0, 1):
            try:
                if self.encoded:
                    batch: Any = b"".join(evs)
                else:
                    try:
                        batch = list(_Request.FromString(b"".join(evs)).events)
                    except Exception:  # noqa: BLE001 - DecodeError
                        evs = self._checked(evs)
                        batch = list(_Request.FromString(b"".join(evs)).events)
                if not evs:
                    return True, evs, False
                await asyncio.wait_for(self._send(batch), self.send_timeout)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - any failure means: spool it
                if attempt == 0 and self.encoded:
                    good = self._checked(evs)
                    if len(good) != len(evs):
                        evs = good
                        continue  # the batch was bad, not the sink: send the rest now
                log.warning("audit delivery failed (%d events kept in the spool): %s", len(evs),
                            (str(exc).splitlines() or [type(exc).__name__])[0][:200])
                return False, evs, isinstance(exc, AuditRejected)
            self.sent += len(evs)
            return True, evs, False
        return False, evs, False  # pragma: no cover

    async def _deliver_spool(self) -> bool:
        """Send spooled batches, oldest first, up to ``max_in_flight`` files at a time (one at a
        time, a spool that had filled under load drained slower than sessions queued events,
        so it spilled again and again); True when the spool is empty. A file goes once its
        send returned; after a failed send the rest waits for the next retry."""
        step = self.max_in_flight
        while True:
            paths = sorted(self.spool_dir.glob("*.batch"))  # again: spilled meanwhile
            if not paths:
                if not self._writes:
                    break
                await self.written()  # files on their way to the disk are part of the spool
                continue
            for i in range(0, len(paths), step):
                results = await asyncio.gather(*(self._deliver_file(p) for p in paths[i:i + step]))
                if not all(results):
                    return False
        self._spooled_pending = False
        log.info("audit spool delivered")
        return True

    async def _deliver_file(self, path: Path) -> bool:
        """Send one spool file; True when it is gone (delivered, or set aside)."""
        try:
            evs = _read_spool_raw(path)
        except (OSError, ValueError) as exc:
            bad = path.with_suffix(".bad")
            log.error("unreadable audit spool file %s moved to %s: %s", path.name, bad.name, exc)
            path.rename(bad)
            return True
        ok, _, rejected = await self._try_send_once(evs)
        if not ok and rejected:
            # Auth refuses these events for what they are: retrying would block every
            # later event behind them. They stay on disk, set aside, and are counted.
            aside = path.with_suffix(".rejected")
            path.rename(aside)
            self.rejected += len(evs)
            log.error("AUDIT EVENTS REJECTED by auth: %d events set aside in %s; see auth's log",
                      len(evs), aside)
            return True
        if not ok:
            return False
        path.unlink()
        return True

    # -- disk ----------------------------------------------------------------------------------

    def _spill(self, keep: int = 0, keep_bytes: int = 0) -> None:
        """Write queued events to the spool, oldest first, a batch at a time, until at most
        ``keep`` wait in memory, keeping at most ``keep_bytes`` of client commands."""
        while self._queue and (self._pending > keep or self._held > keep_bytes):
            for batch in self._take():
                self._write_spool(batch)
        self._spooled_pending = True

    def _write_spool(self, evs: list[bytes]) -> None:
        """One spool file of ``evs``, named (so ordered) now and written by the writer thread;
        written here when that thread is not running (before start, after close)."""
        self._seq += 1
        name = f"{time.time_ns():020d}-{os.getpid()}-{self._seq:06d}.batch"
        data = b"".join(evs)
        self._spooled_pending = True
        writer, loop = self._writer, self._loop
        if writer is None or loop is None:  # not started, or closed: written here
            try:
                self._write_file(name, data)
            except OSError as exc:
                self._lost_to_disk(len(evs), exc)
            else:
                self.spooled += len(evs)
            return
        while self._writes and self._writing_bytes + len(data) > _WRITE_BACKLOG:
            # Too much waits for the disk: the loop (and so every session) waits for the
            # oldest write, about one fsync, and no more than it must.
            self._writes[0][0].exception()  # waits; what it raised is accounted by _reap
            self._reap()
        done = writer.submit(self._write_file, name, data)
        self._writes.append((done, len(evs), len(data)))
        self._writing_bytes += len(data)
        if self._written is not None:
            self._written.clear()
        done.add_done_callback(functools.partial(_call_soon, loop, self._reap))

    def _reap(self) -> None:
        """Account for the spool files the writer thread has finished (oldest first)."""
        writes = self._writes
        while writes and writes[0][0].done():
            done, count, size = writes.popleft()
            self._writing_bytes -= size
            exc = done.exception() if not done.cancelled() else OSError("the write was cancelled")
            if exc is None:
                self.spooled += count
            else:
                self._lost_to_disk(count, exc)
        if not writes and self._written is not None:
            self._written.set()

    def _write_file(self, name: str, data: bytes) -> None:
        """Write a spool file: to a temporary name, fsynced, then renamed (any thread)."""
        tmp = self.spool_dir / (name + ".tmp")
        private_dir(self.spool_dir)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.spool_dir / name)

    def _lost_to_disk(self, count: int, exc: BaseException) -> None:
        self.lost += count
        log.error("AUDIT EVENTS LOST: %d events could not be delivered nor spooled to %s: %s",
                  count, self.spool_dir, exc)

    # -- building events -----------------------------------------------------------------------

    def _new_id(self) -> str:
        # A version 4 UUID from a random 76-bit prefix per spool and a 48-bit counter:
        # unique without a system call each.
        self._id_lo += 1
        return "%s%012x" % (self._id_prefix, self._id_lo & _ID_MASK)

    def _encode_or_lose(self, entry: tuple, out: list[bytes]) -> None:
        """:meth:`_encode`; an entry that cannot be encoded (a bug) is counted as lost and
        logged at ERROR, and the rest go on."""
        before = len(out)
        try:
            self._encode(entry, out)
        except Exception:  # noqa: BLE001 - a bug here must not stop the rest
            del out[before:]
            count = len(entry[4]) if entry[0] == _CMDS else 1
            self.lost += count
            log.exception("AUDIT EVENTS LOST: %d events could not be encoded", count)

    def _encode(self, entry: tuple, out: list[bytes]) -> None:
        """Append the framed events of one queue entry to ``out``."""
        kind = entry[0]
        if kind == _CMDS:
            self._encode_commands([entry], out)
        elif kind == _ONE:
            _, s, when, db, cmd, name, error, _size = entry
            f = b"".join((s.base, _db_entry(db), _str_entry("command", name),
                          _args_entry(cmd.name, cmd.argv, s.max_arg, s.max_args)))
            status = _ld(b"\x42", error.encode("utf-8", "replace")) if error else _SUCCESS
            out.append(_frame(b"".join((b"\x0a\x24", self._new_id().encode(), s.head, _timestamp(when),
                                        status, _ld(b"\x4a", f)))))
        else:
            out.append(_frame(self._event(*entry[1:]).SerializeToString()))

    def _encode_commands(self, entries: list[tuple], out: list[bytes]) -> None:
        """The hot loop: one framed AuditEvent per allowed command of each ``(_CMDS, stream,
        when, logical_db, cmds)`` entry. Layout: id (the spool's UUID prefix and a counter),
        the session's constant fields, time and success (one ``post`` per entry), then the
        fields Struct (the session's, db_name, command, args)."""
        pre = self._id_prefix_b
        item = _LIST_ITEM
        header = _ARGS_HEADER
        vt = _VARINTS
        by_name = _CMD_BY_NAME
        secret = SECRET_COMMANDS
        lo = self._id_lo
        append = out.append
        join = b"".join
        for _kind, s, when, db, cmds, _size in entries:
            post = s.head + _timestamp(when) + _SUCCESS_FIELDS
            fixed = 38 + len(post)  # id (2 + 36 bytes) and post
            shared = s.shared(db)
            nshared = len(shared)
            max_arg, max_args = s.max_arg, s.max_args
            short = min(max_arg, 125)
            for cmd in cmds:
                name = cmd.name
                argv = cmd.argv
                ce = by_name.get(name)
                if ce is None:
                    ce = _cmd_entry_of(name, argv)
                if len(argv) <= max_args and name not in secret:
                    parts = []
                    add = parts.append
                    for a in argv:
                        n = len(a)
                        if n <= short and a.isascii():
                            add(item[n])
                            add(a)
                        else:
                            add(_list_item(audit_text(a, max_arg).encode()))
                    items = join(parts)
                else:
                    items = _args_items(name, argv, max_arg, max_args)
                ni = len(items)
                ah = header[ni] if ni < 8192 else _args_header(ni)
                nf = nshared + len(ce) + len(ah) + ni
                vf = vt[nf] if nf < _VN else _varint(nf)
                ne = fixed + len(vf) + nf
                lo += 1
                append(join((b"\x0a", vt[ne] if ne < _VN else _varint(ne), b"\x0a\x24", pre,
                             b"%012x" % (lo & _ID_MASK), post, vf, shared, ce, ah, items)))
        self._id_lo = lo

    def _template(self, base: dict[str, Any]) -> struct_pb2.Struct:
        hit = self._templates.get(id(base))
        if hit is not None and hit[0] is base:
            return hit[1]
        st = struct_pb2.Struct()
        st.update({k: v for k, v in base.items() if v is not None})
        if len(self._templates) > 1024:
            self._templates.clear()
        self._templates[id(base)] = (base, st)
        return st

    def _event(self, type_, actor, source_addr, success, error, fields, when, base=None) -> types_pb2.AuditEvent:
        ev = types_pb2.AuditEvent(
            id=self._new_id(), type=type_, code=CODES.get(type_, ""), actor=actor,
            source_addr=source_addr, success=success, error=error, cluster_name=self.cluster_name,
        )
        sec = int(when)
        ev.time.seconds = sec
        ev.time.nanos = int((when - sec) * 1e9)
        st = ev.fields
        if base:
            st.CopyFrom(self._template(base))
        if fields:
            sf = st.fields
            for k, v in fields.items():
                if type(v) is str:
                    sf[k].string_value = v
                elif type(v) is list and all(type(x) is str for x in v):
                    values = sf[k].list_value.values
                    for x in v:
                        values.add().string_value = x
                elif v is not None:
                    st.update({k: v})
        return ev


def _call_soon(loop: asyncio.AbstractEventLoop, fn: Callable[[], None], _done: Future) -> None:
    """From the writer thread: ``fn`` on the loop (unless it is gone: the process is ending)."""
    try:
        loop.call_soon_threadsafe(fn)
    except RuntimeError:  # the loop is closed
        pass


def events_of(spool: Iterable[types_pb2.AuditEvent], type_: str) -> list[types_pb2.AuditEvent]:
    """Test helper: the events of one type."""
    return [e for e in spool if e.type == type_]
