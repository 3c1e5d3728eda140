"""A joined service's connection to auth over the mesh (mutual TLS)."""

from __future__ import annotations

from cachegate.auth.v1 import (
    audit_service_pb2_grpc, cluster_service_pb2_grpc, database_service_pb2_grpc, lock_service_pb2_grpc,
    role_service_pb2_grpc, token_service_pb2_grpc, user_service_pb2_grpc,
)
from services.common.creds import Creds, secure_channel
from services.common.telemetry import client_interceptors


class AuthClient:
    def __init__(self, addr: str, creds: Creds, tracing: bool = False):
        self.addr = addr
        self.channel = secure_channel(addr, creds.channel_credentials(), "auth",
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
