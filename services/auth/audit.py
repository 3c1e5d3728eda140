"""The audit log: every security-relevant event, stored by auth's backend."""

from __future__ import annotations

import logging
import time
import uuid

from google.protobuf import struct_pb2

from cachegate.types.v1 import types_pb2
from services.common.grpcutil import ts

log = logging.getLogger("cachegate.audit")

# Stable codes per event type.
CODES = {
    "join.token.create": "T1000I",
    "join.token.delete": "T1001I",
    "join": "T1002I",
    "user.login": "T2000I",
    "user.create": "T2001I",
    "user.update": "T2002I",
    "user.delete": "T2003I",
    "user.reset": "T2004I",
    "user.invite.redeem": "T2005I",
    "role.put": "T3000I",
    "role.delete": "T3001I",
    "lock.create": "T4000I",
    "lock.delete": "T4001I",
    "db.session.start": "T5000I",
    "db.session.query": "T5001I",
    "db.session.end": "T5002I",
    "db.put": "T6000I",
    "db.delete": "T6001I",
}


class AuditLog:
    def __init__(self, backend, cluster_name: str):
        self.backend = backend
        self.cluster_name = cluster_name

    async def emit(self, type_: str, actor: str, source_addr: str = "", success: bool = True,
                   error: str = "", **fields) -> types_pb2.AuditEvent:
        st = struct_pb2.Struct()
        st.update({k: v for k, v in fields.items() if v is not None})
        ev = types_pb2.AuditEvent(
            id=str(uuid.uuid4()), type=type_, code=CODES.get(type_, ""), time=ts(time.time()), actor=actor,
            source_addr=source_addr, success=success, error=error, fields=st, cluster_name=self.cluster_name)
        await self.store(ev)
        return ev

    async def store(self, ev: types_pb2.AuditEvent) -> None:
        if not ev.id:
            ev.id = str(uuid.uuid4())
        when = ev.time.seconds + ev.time.nanos / 1e9 if ev.HasField("time") else time.time()
        # A failure here propagates: callers must not report success for an unaudited action.
        await self.backend.append_audit(ev.id, when, ev.type, ev.actor, ev.SerializeToString())
