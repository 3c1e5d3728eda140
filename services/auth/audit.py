"""The audit log: every security-relevant event, stored by auth's backend.

Auth records its own events with :meth:`AuditLog.emit`; other services send batches that
:meth:`AuditLog.ingest` checks and stores. :meth:`AuditLog.search` pages through them
(oldest first) with an opaque cursor. Storing is never silently skipped: a failure raises.
"""

from __future__ import annotations

import base64
import json
import logging
import re
import time
import uuid

from cachegate.types.v1 import types_pb2
from google.protobuf import struct_pb2

from services.common.auditcodes import CODES, code_for  # noqa: F401 (CODES: part of this module's API)
from services.common.grpcutil import page_size, ts

log = logging.getLogger("cachegate.audit")


# Event types only auth itself records: other services may not emit them.
AUTH_ONLY_PREFIXES = ("join", "user.", "role.", "lock.")
TYPE_RE = re.compile(r"^[a-z][a-z0-9_]*(\.[a-z0-9_]+)*$")
TYPE_FILTER_RE = re.compile(r"^([a-z][a-z0-9_.]*)?\*?$")
MAX_BATCH = 1000
MAX_EVENT_BYTES = 256 * 1024


class AuditError(ValueError):
    """A batch or a search was refused; the message says why."""


class AuditLog:
    def __init__(self, backend, cluster_name: str):
        self.backend = backend
        self.cluster_name = cluster_name

    async def emit(self, type_: str, actor: str, source_addr: str = "", success: bool = True,
                   error: str = "", **fields) -> types_pb2.AuditEvent:
        st = struct_pb2.Struct()
        st.update({k: v for k, v in fields.items() if v is not None})
        ev = types_pb2.AuditEvent(
            id=str(uuid.uuid4()), type=type_, code=code_for(type_, success), time=ts(time.time()), actor=actor,
            source_addr=source_addr, success=success, error=error, fields=st, cluster_name=self.cluster_name)
        await self.store(ev)
        return ev

    async def store(self, ev: types_pb2.AuditEvent) -> None:
        if not ev.id:
            ev.id = str(uuid.uuid4())
        when = ev.time.seconds + ev.time.nanos / 1e9 if ev.HasField("time") else time.time()
        # A failure here propagates: callers must not report success for an unaudited action.
        await self.backend.append_audit(ev.id, when, ev.type, ev.actor, ev.SerializeToString())

    # --- events from other services ---------------------------------------------------------
    def check_batch(self, events) -> list[types_pb2.AuditEvent]:
        """Validate a batch from another service and fill in what the server sets.

        All or nothing: one bad event refuses the batch (AuditError). Ids must be UUIDs (the
        same id sent again is stored once, so a retried batch is not duplicated); a missing id
        or time is set here; the cluster name is always ours."""
        if len(events) > MAX_BATCH:
            raise AuditError(f"too many events in one batch ({len(events)}): send at most {MAX_BATCH}")
        out = []
        for i, src in enumerate(events):
            ev = types_pb2.AuditEvent()
            ev.CopyFrom(src)
            where = f"event {i}"
            if not TYPE_RE.match(ev.type) or len(ev.type) > 100:
                raise AuditError(f"{where}: invalid event type {ev.type[:100]!r}: use dotted lower-case names "
                                 "like db.session.query")
            if ev.type.startswith(AUTH_ONLY_PREFIXES):
                raise AuditError(f"{where}: events of type {ev.type} are recorded by auth itself")
            if ev.id:
                try:
                    ev.id = str(uuid.UUID(ev.id))
                except ValueError:
                    raise AuditError(f"{where}: id {ev.id[:64]!r} is not a UUID (leave it empty to have one set)") from None
            else:
                ev.id = str(uuid.uuid4())
            if not ev.HasField("time") or (ev.time.seconds == 0 and ev.time.nanos == 0):
                ev.time.CopyFrom(ts(time.time()))
            if not ev.code:
                ev.code = code_for(ev.type, ev.success)
            ev.cluster_name = self.cluster_name
            if ev.ByteSize() > MAX_EVENT_BYTES:
                raise AuditError(f"{where}: event is larger than {MAX_EVENT_BYTES // 1024} KiB: shorten its fields")
            out.append(ev)
        return out

    async def ingest(self, events) -> int:
        """Check and store a batch; the number stored. AuditError, or the storage error."""
        batch = self.check_batch(events)
        for ev in batch:
            await self.store(ev)
        return len(batch)

    # --- search -----------------------------------------------------------------------------
    async def search(self, since: float | None, until: float | None, types: list[str], user: str,
                     size: int, token: str) -> tuple[list[types_pb2.AuditEvent], str]:
        """Events oldest first, filtered; (page, next_page_token). AuditError for bad input."""
        types = [t.strip() for t in types if t.strip()]
        for t in types:
            if not TYPE_FILTER_RE.match(t):
                raise AuditError(f"invalid event type filter {t!r}: use a type (user.login) or a prefix (user.*)")
        if "*" in types:
            types = []
        if since is not None and until is not None and until < since:
            raise AuditError("until is before since: swap them")
        after = decode_cursor(token)
        n = page_size(size)
        rows = await self.backend.search_audit(since, until, types, user, after, n + 1)
        page = []
        for when, _id, data in rows[:n]:
            ev = types_pb2.AuditEvent()
            ev.ParseFromString(data)
            page.append(ev)
        nxt = encode_cursor(rows[n - 1][0], rows[n - 1][1]) if len(rows) > n else ""
        return page, nxt


def encode_cursor(when: float, event_id: str) -> str:
    return base64.urlsafe_b64encode(json.dumps([when, event_id]).encode()).decode()


def decode_cursor(token: str) -> tuple[float, str] | None:
    if not token:
        return None
    try:
        when, event_id = json.loads(base64.urlsafe_b64decode(token.encode()))
        return float(when), str(event_id)
    except (ValueError, TypeError):
        raise AuditError("invalid page_token: pass the next_page_token of the previous page") from None
