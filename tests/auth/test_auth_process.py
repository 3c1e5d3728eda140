"""The real auth process on the mutual-TLS mesh, with a real dbproxy in front of it.

Administration goes to auth with the admin identity; login and database certificates go
through dbproxy (which forwards them to auth with the client's address), as cgate's do.
"""

from __future__ import annotations

import asyncio

import grpc
import pytest
from cachegate.auth.v1 import (
    audit_service_pb2 as au,
)
from cachegate.auth.v1 import (
    lock_service_pb2 as ls,
)
from cachegate.auth.v1 import (
    role_service_pb2 as rs,
)
from cachegate.auth.v1 import (
    user_service_pb2 as us,
)
from cachegate.dbproxy.v1 import proxy_service_pb2_grpc
from cachegate.types.v1 import types_pb2

from services.common.authclient import AuthClient
from services.common.creds import Creds, secure_channel, server_only_channel
from services.common.identity import identity_from_cert
from services.common.pki import cert_from_pem, key_to_pem, make_csr, new_key

pytestmark = pytest.mark.slow

PASSWORD = "correct horse battery staple"


async def test_users_login_locks_and_audit_through_the_mesh(cluster):
    cluster.start_auth(login_max_attempts=2, login_lockout="2s")
    proxy = cluster.start_joiner("dbproxy", cluster.token("proxy"))
    admin_creds = Creds.from_identity_file(cluster.admin_identity)
    proxy_creds = Creds.load_dir(cluster.data / "dbproxy")
    public = server_only_channel(f"127.0.0.1:{proxy.info['public_port']}", proxy_creds.host_ca_pem, "dbproxy")
    pub = proxy_service_pb2_grpc.ProxyServiceStub(public)

    async with AuthClient(cluster.auth_addr, admin_creds) as admin, AuthClient(cluster.auth_addr, proxy_creds) as px:
        # --- an administrator adds a user; the invite is redeemed through the proxy ---------
        made = await admin.users.CreateUser(us.CreateUserRequest(user=types_pb2.User(
            name="alice", roles=["access"], db_users=["default"], db_names=["0"])), timeout=20)
        await pub.RedeemInvite(us.RedeemInviteRequest(invite_token=made.invite.token, password=PASSWORD), timeout=20)
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            await pub.RedeemInvite(us.RedeemInviteRequest(invite_token=made.invite.token, password=PASSWORD), timeout=20)
        assert exc.value.code() == grpc.StatusCode.PERMISSION_DENIED

        # --- only dbproxy hosts may call Login on auth -------------------------------------
        key = new_key()
        csr = make_csr(key, "alice").decode()
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            await admin.users.Login(us.LoginRequest(user="alice", password=PASSWORD, csr_pem=csr), timeout=20)
        assert exc.value.code() == grpc.StatusCode.PERMISSION_DENIED

        # --- login through the proxy -------------------------------------------------------
        session = await pub.Login(us.LoginRequest(user="alice", password=PASSWORD, csr_pem=csr), timeout=20)
        ident = identity_from_cert(cert_from_pem(session.cert_pem))
        assert ident.name == "alice" and list(ident.db_users) == ["default"] and ident.login_ip == "127.0.0.1"

        for who, pw in (("alice", "wrong password!!"), ("nobody", PASSWORD)):
            with pytest.raises(grpc.aio.AioRpcError) as exc:
                await pub.Login(us.LoginRequest(user=who, password=pw, csr_pem=csr), timeout=20)
            assert (exc.value.code(), exc.value.details()) == (grpc.StatusCode.UNAUTHENTICATED,
                                                               "invalid user name or password")

        # --- a database certificate through the proxy's API port, with the session cert ----
        user_creds = Creds(key_pem=key_to_pem(key), cert_pem=session.cert_pem.encode(),
                           host_ca_pem=proxy_creds.host_ca_pem)
        api = secure_channel(f"127.0.0.1:{proxy.info['api_port']}", user_creds.channel_credentials(), "dbproxy")
        db_key = new_key()
        db = await proxy_service_pb2_grpc.ProxyServiceStub(api).GenerateDatabaseCert(us.GenerateDatabaseCertRequest(
            csr_pem=make_csr(db_key, "alice").decode(),
            route=types_pb2.RouteToDatabase(service_name="cache1", db_user="default")), timeout=20)
        db_cert = cert_from_pem(db.cert_pem)
        assert identity_from_cert(db_cert).route.service_name == "cache1"
        assert db_cert.not_valid_after_utc <= cert_from_pem(session.cert_pem).not_valid_after_utc

        # --- the proxy watches locks; a lock stops logins ---------------------------------
        watch = px.locks.WatchLocks(ls.WatchLocksRequest())
        assert (await asyncio.wait_for(watch.read(), 10)).type == types_pb2.WATCH_EVENT_TYPE_INIT_DONE
        lock = (await admin.locks.CreateLock(ls.CreateLockRequest(user="alice", message="audit in progress"),
                                             timeout=20)).lock
        ev = await asyncio.wait_for(watch.read(), 10)
        assert ev.type == types_pb2.WATCH_EVENT_TYPE_PUT and ev.lock.id == lock.id
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            await pub.Login(us.LoginRequest(user="alice", password=PASSWORD, csr_pem=csr), timeout=20)
        assert exc.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert exc.value.details() == ('user "alice" is locked: audit in progress; '
                                       "ask an administrator to remove the lock")
        await admin.locks.DeleteLock(ls.DeleteLockRequest(id=lock.id), timeout=20)
        assert (await asyncio.wait_for(watch.read(), 10)).type == types_pb2.WATCH_EVENT_TYPE_DELETE
        watch.cancel()

        # --- roles stream to the proxy; built-ins cannot be replaced -----------------------
        roles = px.roles.WatchRoles(rs.WatchRolesRequest())
        names = []
        while (ev := await asyncio.wait_for(roles.read(), 10)).type != types_pb2.WATCH_EVENT_TYPE_INIT_DONE:
            names.append(ev.role.name)
        assert names == ["access", "auditor", "editor"]
        roles.cancel()
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            await admin.roles.DeleteRole(rs.DeleteRoleRequest(name="access"), timeout=20)
        assert exc.value.code() == grpc.StatusCode.FAILED_PRECONDITION

        # --- the audit log has it all, with the client's address, and no secrets ----------
        found = await admin.audit.SearchAuditEvents(au.SearchAuditEventsRequest(types=["user.*"], user="alice"),
                                                    timeout=20)
        logins = [e for e in found.events if e.type == "user.login"]
        assert [e.success for e in logins] == [True, False, False]
        assert all(e.source_addr == "127.0.0.1" for e in logins)
        assert "user.cert.database" in [e.type for e in found.events]
        blob = b"".join(e.SerializeToString() for e in found.events)
        assert PASSWORD.encode() not in blob and made.invite.token.encode() not in blob
    await public.close()
    await api.close()
    log = cluster.auth.output()
    assert PASSWORD not in log and made.invite.token not in log and "wrong password!!" not in log
