"""Batched audit delivery with an on-disk spool: never drops an event silently.

Sessions call :meth:`AuditSpool.emit` (non-blocking, no I/O: it appends a tuple).
A background task turns queued tuples into ``AuditEvent`` protobufs in batches
and hands each batch to the injected ``send`` coroutine (the lead wires it to
auth's ``AuditService.EmitAuditEvents``). When ``send`` fails or times out the
batch is written to the spool directory (one file per batch, written to a
temporary name, fsynced, then renamed) and retried later, oldest first; a file
is deleted only after ``send`` succeeded. When the in-memory queue is over its
bound, events are spilled to disk at once instead of growing memory. Should the
disk fail as well, the loss is logged at ERROR with the number of events and
counted in :attr:`AuditSpool.lost` (never silent).

Spool file format: repeated (4-byte big-endian length, serialized AuditEvent).
"""

from __future__ import annotations

import asyncio
import logging
import os
import struct
import time
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any

from google.protobuf import struct_pb2

from cachegate.types.v1 import types_pb2

__all__ = ["AUDIT_CODES", "AuditSpool", "read_spool_file"]

log = logging.getLogger("cachegate.dbproxy.audit")

AUDIT_CODES = {"db.session.start": "T5000I", "db.session.query": "T5001I", "db.session.end": "T5002I"}

SendFn = Callable[[list[types_pb2.AuditEvent]], Awaitable[Any]]

_LEN = struct.Struct(">I")


def read_spool_file(path: Path) -> list[types_pb2.AuditEvent]:
    data = path.read_bytes()
    out, off = [], 0
    while off + 4 <= len(data):
        (n,) = _LEN.unpack_from(data, off)
        off += 4
        if off + n > len(data):
            raise ValueError(f"truncated audit spool file {path.name}")
        ev = types_pb2.AuditEvent()
        ev.ParseFromString(data[off : off + n])
        out.append(ev)
        off += n
    return out


class AuditSpool:
    """``send``: async callable taking a list of AuditEvent, raising on failure.
    ``spool_dir``: where undelivered batches wait (created if missing)."""

    def __init__(
        self,
        send: SendFn,
        spool_dir: str | os.PathLike[str],
        *,
        cluster_name: str = "",
        batch_size: int = 500,
        flush_interval: float = 0.2,
        send_timeout: float = 10.0,
        retry_interval: float = 5.0,
        max_queue: int = 50_000,
    ) -> None:
        self._send = send
        self.spool_dir = Path(spool_dir)
        self.cluster_name = cluster_name
        self.batch_size = batch_size
        self.flush_interval = flush_interval
        self.send_timeout = send_timeout
        self.retry_interval = retry_interval
        self.max_queue = max_queue
        self._queue: list[tuple] = []
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._closing = False
        self._seq = 0
        self._templates: dict[int, tuple[dict, struct_pb2.Struct]] = {}
        r = os.urandom(10).hex()
        self._id_prefix = f"{r[:8]}-{r[8:12]}-4{r[12:15]}-{'89ab'[int(r[15], 16) & 3]}{r[16:19]}-"
        self._id_lo = 0
        self._spooled_pending = False
        self.sent = 0  # events delivered
        self.spooled = 0  # events written to disk (delivered later or still waiting)
        self.lost = 0  # events neither delivered nor spooled (logged at ERROR)

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
        self._queue.append((type_, actor, source_addr, success, error, fields, when or time.time(), base))
        if len(self._queue) >= self.batch_size and self._wake is not None:
            self._wake.set()
        if len(self._queue) > self.max_queue:
            self._spill()

    @property
    def queued(self) -> int:
        return len(self._queue)

    # -- life cycle ----------------------------------------------------------------------------

    async def start(self) -> None:
        self.spool_dir.mkdir(parents=True, exist_ok=True)
        self._spooled_pending = any(self.spool_dir.glob("*.batch"))
        self._wake = asyncio.Event()
        self._task = asyncio.create_task(self._run(), name="audit-spool")

    async def flush(self, timeout: float | None = None) -> None:
        """Deliver (or spool) everything queued now."""
        await asyncio.wait_for(self._deliver_queue(), timeout)

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
                await self._deliver_queue(spool_only=self._spooled_pending)
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - the loop must survive anything
                log.exception("audit delivery loop error")
            if self._closing and not self._queue:
                return

    def _take(self) -> list[tuple]:
        batch = self._queue[: self.batch_size]
        del self._queue[: self.batch_size]
        return batch

    async def _deliver_queue(self, spool_only: bool = False) -> None:
        while self._queue:
            batch = self._take()
            events = [self._event(*t) for t in batch]
            if spool_only:
                # Older events wait on disk: keep the order, queue behind them.
                self._write_spool(events)
                continue
            if not await self._try_send(events):
                self._write_spool(events)
                self._spooled_pending = True
                spool_only = True

    async def _try_send(self, events: list[types_pb2.AuditEvent]) -> bool:
        try:
            await asyncio.wait_for(self._send(events), self.send_timeout)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - any failure means: spool it
            log.warning("audit delivery failed (%d events kept in the spool): %s", len(events),
                        (str(exc).splitlines() or [type(exc).__name__])[0][:200])
            return False
        self.sent += len(events)
        return True

    async def _deliver_spool(self) -> bool:
        """Send spooled batches oldest first; True when the spool is empty."""
        for path in sorted(self.spool_dir.glob("*.batch")):
            try:
                events = read_spool_file(path)
            except (OSError, ValueError) as exc:
                bad = path.with_suffix(".bad")
                log.error("unreadable audit spool file %s moved to %s: %s", path.name, bad.name, exc)
                path.rename(bad)
                continue
            if not await self._try_send(events):
                return False
            path.unlink()
        self._spooled_pending = False
        log.info("audit spool delivered")
        return True

    # -- disk ----------------------------------------------------------------------------------

    def _spill(self) -> None:
        while self._queue:
            self._write_spool([self._event(*t) for t in self._take()])
        self._spooled_pending = True

    def _write_spool(self, events: list[types_pb2.AuditEvent]) -> None:
        self._seq += 1
        name = f"{time.time_ns():020d}-{os.getpid()}-{self._seq:06d}.batch"
        tmp = self.spool_dir / (name + ".tmp")
        try:
            self.spool_dir.mkdir(parents=True, exist_ok=True)
            with open(tmp, "wb") as f:
                for ev in events:
                    data = ev.SerializeToString()
                    f.write(_LEN.pack(len(data)))
                    f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.spool_dir / name)
            self.spooled += len(events)
            self._spooled_pending = True
        except OSError as exc:
            self.lost += len(events)
            log.error("AUDIT EVENTS LOST: %d events could not be delivered nor spooled to %s: %s",
                      len(events), self.spool_dir, exc)

    # -- building events -----------------------------------------------------------------------

    def _new_id(self) -> str:
        # A version 4 UUID from a random 76-bit prefix per spool and a 48-bit counter:
        # unique without a system call each.
        self._id_lo += 1
        return "%s%012x" % (self._id_prefix, self._id_lo & 0xFFFFFFFFFFFF)

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
            id=self._new_id(), type=type_, code=AUDIT_CODES.get(type_, ""), actor=actor,
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


def events_of(spool: Iterable[types_pb2.AuditEvent], type_: str) -> list[types_pb2.AuditEvent]:
    """Test helper: the events of one type."""
    return [e for e in spool if e.type == type_]
