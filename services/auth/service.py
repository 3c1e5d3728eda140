"""Auth's gRPC servicers, its authorization policy, and the process runner."""

from __future__ import annotations

import asyncio
import logging

import grpc

from cachegate.auth.v1 import (
    audit_service_pb2, cluster_service_pb2, cluster_service_pb2_grpc,
    database_service_pb2, database_service_pb2_grpc, lock_service_pb2, lock_service_pb2_grpc,
    role_service_pb2, role_service_pb2_grpc, token_service_pb2, token_service_pb2_grpc,
    user_service_pb2, user_service_pb2_grpc,
)
from services.auth.auditsvc import AuditServicer
from services.auth.auditsvc import add_to_server as audit_add_to_server
from services.auth.backend import open_backend
from services.auth.databases import DatabaseServicer
from services.auth.leases import LeaseError, Leases
from services.auth.locks import LockServicer
from services.auth.roles import AdminPolicy, RoleServicer
from services.auth.users import UserServicer
from services.auth.state import AuthState, TokenError
from services.common import authz, heap
from services.common.authz import ADMIN, ANY, HOST_DBPROXY, HOST_DISCOVERY, PUBLIC, USER, CertVerifier, Policy, rule
from services.common.config import Config
from services.common.creds import private_dir
from services.common.grpcserver import GrpcServer, ServiceBinding
from services.common.grpcutil import from_dur, paginate, ts
from services.auth import metrics as auth_metrics
from services.common.telemetry import server_interceptors, setup_metrics, setup_tracing
from services.common.version import VERSION

log = logging.getLogger("cachegate.auth")

DEFAULT_TOKEN_TTL = 1800.0
MAX_TOKEN_TTL = 7 * 86400.0


def _svc(module, name):
    return module.DESCRIPTOR.services_by_name[name]


CLUSTER = _svc(cluster_service_pb2, "ClusterService")
TOKENS = _svc(token_service_pb2, "TokenService")
USERS = _svc(user_service_pb2, "UserService")
ROLES = _svc(role_service_pb2, "RoleService")
LOCKS = _svc(lock_service_pb2, "LockService")
DATABASES = _svc(database_service_pb2, "DatabaseService")
AUDIT = _svc(audit_service_pb2, "AuditService")


def m(desc, name: str) -> str:
    return f"/{desc.full_name}/{name}"


# Who may call what on the mesh port (mutual TLS). Not listed = denied.
MESH_POLICY = Policy({
    m(CLUSTER, "GetClusterInfo"): rule(ANY),
    m(CLUSTER, "AcquireLease"): rule(HOST_DISCOVERY),
    m(CLUSTER, "ReleaseLease"): rule(HOST_DISCOVERY),
    m(CLUSTER, "ListLeases"): rule(ADMIN, resource="db", verb="list"),
    m(TOKENS, "CreateToken"): rule(ADMIN, resource="token", verb="create"),
    m(TOKENS, "ListTokens"): rule(ADMIN, resource="token", verb="list"),
    m(TOKENS, "DeleteToken"): rule(ADMIN, resource="token", verb="delete"),
    m(USERS, "CreateUser"): rule(ADMIN, resource="user", verb="create"),
    m(USERS, "GetUser"): rule(ADMIN, resource="user", verb="read"),
    m(USERS, "ListUsers"): rule(ADMIN, resource="user", verb="list"),
    m(USERS, "UpdateUser"): rule(ADMIN, resource="user", verb="update"),
    m(USERS, "DeleteUser"): rule(ADMIN, resource="user", verb="delete"),
    m(USERS, "ResetUser"): rule(ADMIN, resource="user", verb="update"),
    m(USERS, "RedeemInvite"): rule(HOST_DBPROXY),
    m(USERS, "Login"): rule(HOST_DBPROXY),
    m(USERS, "GenerateDatabaseCert"): rule(USER),
    m(USERS, "WatchUsers"): rule(HOST_DBPROXY),
    m(ROLES, "UpsertRole"): rule(ADMIN, resource="role", verb="create"),
    m(ROLES, "GetRole"): rule(ADMIN, HOST_DBPROXY, resource="role", verb="read"),
    m(ROLES, "ListRoles"): rule(ADMIN, HOST_DBPROXY, resource="role", verb="list"),
    m(ROLES, "DeleteRole"): rule(ADMIN, resource="role", verb="delete"),
    m(ROLES, "WatchRoles"): rule(HOST_DBPROXY),
    m(LOCKS, "CreateLock"): rule(ADMIN, resource="lock", verb="create"),
    m(LOCKS, "ListLocks"): rule(ADMIN, HOST_DBPROXY, resource="lock", verb="list"),
    m(LOCKS, "DeleteLock"): rule(ADMIN, resource="lock", verb="delete"),
    m(LOCKS, "WatchLocks"): rule(HOST_DBPROXY),
    m(DATABASES, "UpsertDatabase"): rule(ADMIN, HOST_DISCOVERY, resource="db", verb="create"),
    m(DATABASES, "GetDatabase"): rule(ADMIN, HOST_DBPROXY, HOST_DISCOVERY, resource="db", verb="read"),
    m(DATABASES, "ListDatabases"): rule(ADMIN, HOST_DBPROXY, HOST_DISCOVERY, resource="db", verb="list"),
    m(DATABASES, "DeleteDatabase"): rule(ADMIN, HOST_DISCOVERY, resource="db", verb="delete"),
    m(DATABASES, "WatchDatabases"): rule(HOST_DBPROXY),
    m(DATABASES, "ReportFetcherStatus"): rule(HOST_DISCOVERY),
    m(DATABASES, "ListFetcherStatuses"): rule(ADMIN, resource="db", verb="list"),
    m(DATABASES, "ReportProxyStatus"): rule(HOST_DBPROXY),
    m(DATABASES, "ListProxyStatuses"): rule(ADMIN, resource="db", verb="list"),
    m(AUDIT, "EmitAuditEvents"): rule(HOST_DBPROXY, HOST_DISCOVERY),
    m(AUDIT, "SearchAuditEvents"): rule(ADMIN, resource="event", verb="list"),
})

# The join port (server TLS only): cluster facts and joining, nothing else.
JOIN_POLICY = Policy({
    m(CLUSTER, "GetClusterInfo"): rule(PUBLIC),
    m(CLUSTER, "JoinService"): rule(PUBLIC),
}, infra=rule(PUBLIC))


def _lease_proto(lease) -> cluster_service_pb2.Lease:
    return cluster_service_pb2.Lease(name=lease.name, holder=lease.holder, expire_time=ts(lease.expires),
                                     acquire_time=ts(lease.acquired))


class ClusterServicer(cluster_service_pb2_grpc.ClusterServiceServicer):
    def __init__(self, state: AuthState):
        self.state = state
        self.leases = Leases(state.backend)

    async def AcquireLease(self, request, context):
        holder = authz.current_caller().name
        ttl = from_dur(request.ttl) if request.HasField("ttl") else 15.0
        try:
            ok, lease = await self.leases.acquire(request.name, holder, ttl)
        except LeaseError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        return cluster_service_pb2.AcquireLeaseResponse(acquired=ok, lease=_lease_proto(lease) if lease else None)

    async def ReleaseLease(self, request, context):
        try:
            ok = await self.leases.release(request.name, authz.current_caller().name)
        except LeaseError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        return cluster_service_pb2.ReleaseLeaseResponse(released=ok)

    async def ListLeases(self, request, context):
        try:
            page, nxt = paginate([_lease_proto(x) for x in await self.leases.list()], lambda x: x.name,
                                 request.page_size, request.page_token)
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        return cluster_service_pb2.ListLeasesResponse(leases=page, next_page_token=nxt)

    async def GetClusterInfo(self, request, context):
        s = self.state
        return cluster_service_pb2.GetClusterInfoResponse(
            cluster_name=s.cluster_name, server_version=VERSION, ca_pin=s.host_ca.pin,
            host_ca_pem=s.host_ca.cert_pem.decode(), user_ca_pem=s.user_ca.cert_pem.decode())

    async def JoinService(self, request, context):
        caller = authz.current_caller()
        try:
            host_id, cert = await self.state.join(request.token, request.role, request.csr_pem,
                                                  list(request.addresses), caller.source_addr())
        except TokenError as exc:
            log.info("join refused", extra={"peer": caller.source_addr(), "reason": str(exc)})
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, str(exc))
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        from services.common.pki import cert_to_pem

        s = self.state
        return cluster_service_pb2.JoinServiceResponse(
            host_id=host_id, cert_pem=cert_to_pem(cert).decode(), host_ca_pem=s.host_ca.cert_pem.decode(),
            user_ca_pem=s.user_ca.cert_pem.decode(), cluster_name=s.cluster_name)


class TokenServicer(token_service_pb2_grpc.TokenServiceServicer):
    def __init__(self, state: AuthState):
        self.state = state

    async def CreateToken(self, request, context):
        caller = authz.current_caller()
        ttl = from_dur(request.ttl) if request.HasField("ttl") else self.state.acfg.token_ttl or DEFAULT_TOKEN_TTL
        if ttl <= 0 or ttl > MAX_TOKEN_TTL:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "token ttl must be between 1s and 168h")
        try:
            token, info = await self.state.create_token(list(request.roles), ttl, request.reusable,
                                                        caller.name, caller.source_addr())
        except TokenError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        return token_service_pb2.CreateTokenResponse(token=token, info=info, ca_pin=self.state.host_ca.pin)

    async def ListTokens(self, request, context):
        try:
            page, nxt = paginate(await self.state.list_tokens(), lambda t: t.id, request.page_size, request.page_token)
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        return token_service_pb2.ListTokensResponse(tokens=page, next_page_token=nxt)

    async def DeleteToken(self, request, context):
        caller = authz.current_caller()
        try:
            await self.state.delete_token(request.id, caller.name, caller.source_addr())
        except KeyError as exc:
            await context.abort(grpc.StatusCode.NOT_FOUND, exc.args[0])
        return token_service_pb2.DeleteTokenResponse()


def bindings(state: AuthState) -> list[ServiceBinding]:
    return [
        ServiceBinding(cluster_service_pb2_grpc.add_ClusterServiceServicer_to_server, ClusterServicer(state), CLUSTER),
        ServiceBinding(token_service_pb2_grpc.add_TokenServiceServicer_to_server, TokenServicer(state), TOKENS),
        ServiceBinding(user_service_pb2_grpc.add_UserServiceServicer_to_server, UserServicer(state), USERS),
        ServiceBinding(role_service_pb2_grpc.add_RoleServiceServicer_to_server, RoleServicer(state), ROLES),
        ServiceBinding(lock_service_pb2_grpc.add_LockServiceServicer_to_server, LockServicer(state), LOCKS),
        ServiceBinding(database_service_pb2_grpc.add_DatabaseServiceServicer_to_server,
                       DatabaseServicer(state), DATABASES),
        ServiceBinding(audit_add_to_server, AuditServicer(state), AUDIT),
    ]


async def run_auth(cfg: Config, stop: asyncio.Event, ready=None) -> None:
    """Run the auth service until ``stop`` is set. ``ready(info)`` gets the bound ports."""
    tracing = setup_tracing("auth", cfg.telemetry)
    setup_metrics("auth", cfg.telemetry)
    folder = cfg.service_dir("auth")
    private_dir(folder, tighten_files=True)  # CA keys in the database, the admin identity
    backend = auth_metrics.default().instrument_backend(open_backend(cfg.auth_service.storage, folder))
    state = AuthState(cfg, backend)
    await state.init()
    admin_path = state.write_admin_identity()
    verifier = CertVerifier(state.host_ca.cert, state.user_ca.cert)
    admin = AdminPolicy(backend)
    await admin.start()
    mesh = GrpcServer("auth", bindings(state), MESH_POLICY, state.creds.server_credentials(True),
                      lambda: verifier, admin_check=admin.check, extra_interceptors=server_interceptors(tracing))
    join = GrpcServer("auth-join", [ServiceBinding(cluster_service_pb2_grpc.add_ClusterServiceServicer_to_server,
                                                   ClusterServicer(state), CLUSTER)],
                      JOIN_POLICY, state.creds.server_credentials(False), lambda: verifier,
                      extra_interceptors=server_interceptors(tracing))
    mesh_port = await mesh.start(cfg.auth_service.listen_addr)
    join_port = await join.start(cfg.auth_service.join_listen_addr)
    heap.settle_after_start()  # audit batches: many short-lived containers
    log.info("auth service ready", extra={"cluster": state.cluster_name, "ca_pin": state.host_ca.pin,
                                          "mesh_port": mesh_port, "join_port": join_port})
    if ready:
        ready({"service": "auth", "mesh_port": mesh_port, "join_port": join_port, "ca_pin": state.host_ca.pin,
               "cluster_name": state.cluster_name, "admin_identity": str(admin_path)})

    async def renew_admin():
        while True:
            await asyncio.sleep(3600)
            state.write_admin_identity()

    renewer = asyncio.create_task(renew_admin())
    try:
        await stop.wait()
    finally:
        renewer.cancel()
        await join.stop(2.0)
        await mesh.stop(5.0)
        admin.stop()
        await backend.close()


__all__ = ["run_auth", "MESH_POLICY", "JOIN_POLICY"]
