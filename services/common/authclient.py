"""A joined service's connection to auth over the mesh (mutual TLS).

``addr`` is one auth address or several (a list, a comma-separated string, or a DNS name
with several addresses): one channel balances calls over all of them with round_robin and
sends the calls of :data:`endpoints.RETRYABLE_AUTH_METHODS` again when the auth process that
had them went away (see services/common/endpoints.py, docs/ha.md)."""

from __future__ import annotations

from typing import Iterable

from cachegate.auth.v1 import (
    audit_service_pb2_grpc, cluster_service_pb2_grpc, database_service_pb2_grpc, lock_service_pb2_grpc,
    role_service_pb2_grpc, token_service_pb2_grpc, user_service_pb2_grpc,
)
from services.common import endpoints
from services.common.config import DEFAULT_AUTH_PORT
from services.common.creds import Creds, secure_channel
from services.common.telemetry import client_interceptors


def auth_channel(addr: str | Iterable[str], credentials, interceptors=None):
    """A channel to auth's mesh port at one or several addresses."""
    target = endpoints.grpc_target(addr, DEFAULT_AUTH_PORT)
    return secure_channel(target, credentials, "auth", interceptors=interceptors,
                          service_config=endpoints.service_config(endpoints.RETRYABLE_AUTH_METHODS),
                          extra_options=endpoints.RECONNECT_OPTIONS)


class AuthClient:
    def __init__(self, addr: str | Iterable[str], creds: Creds, tracing: bool = False):
        self.addrs = endpoints.parse_addresses(addr, DEFAULT_AUTH_PORT)
        # For messages: the address (or addresses) as the user gave them.
        self.addr = ",".join(self.addrs)
        self.channel = auth_channel(self.addrs, creds.channel_credentials(),
                                    interceptors=client_interceptors(tracing) or None)
        ch = self.channel
        self.cluster = cluster_service_pb2_grpc.ClusterServiceStub(ch)
        self.tokens = token_service_pb2_grpc.TokenServiceStub(ch)
        self.users = user_service_pb2_grpc.UserServiceStub(ch)
        self.roles = role_service_pb2_grpc.RoleServiceStub(ch)
        self.locks = lock_service_pb2_grpc.LockServiceStub(ch)
        self.databases = database_service_pb2_grpc.DatabaseServiceStub(ch)
        self.audit = audit_service_pb2_grpc.AuditServiceStub(ch)

    async def close(self) -> None:
        await self.channel.close()

    async def __aenter__(self) -> "AuthClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()
