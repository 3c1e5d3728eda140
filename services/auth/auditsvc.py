"""AuditService: batches from dbproxy and discovery in, searches out."""

from __future__ import annotations

import logging

import grpc
from cachegate.auth.v1 import audit_service_pb2, audit_service_pb2_grpc

from services.auth.audit import AuditError
from services.auth.state import AuthState
from services.common import authz
from services.common.grpcutil import from_ts

log = logging.getLogger("cachegate.auth.audit")


class AuditServicer(audit_service_pb2_grpc.AuditServiceServicer):
    def __init__(self, state: AuthState):
        self.state = state

    async def EmitAuditEvents(self, request: bytes | audit_service_pb2.EmitAuditEventsRequest, context):
        """``request``: the serialized EmitAuditEventsRequest (see add_to_server), or one
        built in this process."""
        caller = authz.current_caller()
        if not isinstance(request, bytes):
            request = request.SerializeToString()
        try:
            stored = await self.state.audit.ingest_serialized(request)
        except AuditError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except Exception as exc:  # noqa: BLE001 - storage failure: the sender keeps the batch and retries
            log.error("could not store audit events", extra={"from": caller.name, "bytes": len(request),
                                                             "error": type(exc).__name__})
            await context.abort(grpc.StatusCode.UNAVAILABLE,
                                "auth could not store the audit events right now: keep them and send them again")
        return audit_service_pb2.EmitAuditEventsResponse(stored=stored)

    async def SearchAuditEvents(self, request, context):
        since = from_ts(request.since) if request.HasField("since") else None
        until = from_ts(request.until) if request.HasField("until") else None
        try:
            page, nxt = await self.state.audit.search(since, until, list(request.types), request.user.strip(),
                                                      request.page_size, request.page_token,
                                                      newest_first=request.newest_first)
        except AuditError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        return audit_service_pb2.SearchAuditEventsResponse(events=page, next_page_token=nxt)


def add_to_server(servicer: AuditServicer, server) -> None:
    """The generated ``add_AuditServiceServicer_to_server``, except that EmitAuditEvents
    gets its request as the bytes that came: auth stores each event's bytes as they are
    (AuditLog.ingest_serialized) instead of serializing every event again."""
    pb = audit_service_pb2
    handlers = {
        "EmitAuditEvents": grpc.unary_unary_rpc_method_handler(
            servicer.EmitAuditEvents, request_deserializer=None,
            response_serializer=pb.EmitAuditEventsResponse.SerializeToString),
        "SearchAuditEvents": grpc.unary_unary_rpc_method_handler(
            servicer.SearchAuditEvents, request_deserializer=pb.SearchAuditEventsRequest.FromString,
            response_serializer=pb.SearchAuditEventsResponse.SerializeToString),
    }
    name = pb.DESCRIPTOR.services_by_name["AuditService"].full_name
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(name, handlers),))
    server.add_registered_method_handlers(name, handlers)
