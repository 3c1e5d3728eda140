"""Auth servicers against a real SQLite backend and a real AuthState, with a fake gRPC context.

The caller of each RPC is set the way the authorization interceptor sets it (a verified
certificate's identity in ``authz`` 's context variable); tests pick who calls.
"""

from __future__ import annotations

import datetime as dt

import grpc
import pytest
from cachegate.types.v1 import types_pb2

from services.auth.auditsvc import AuditServicer
from services.auth.backend import SQLiteBackend
from services.auth.locks import LockServicer
from services.auth.roles import RoleServicer
from services.auth.state import AuthState
from services.auth.users import UserServicer
from services.common import authz
from services.common.config import load_config
from services.common.identity import identity_from_cert
from services.common.pki import cert_from_pem, make_csr, new_key


class Aborted(Exception):
    def __init__(self, code: grpc.StatusCode, details: str):
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details


class FakeContext:
    async def abort(self, code, details):
        raise Aborted(code, details)

    def peer(self):
        return "ipv4:127.0.0.1:1"


class Env:
    def __init__(self, state: AuthState):
        self.state = state
        self.backend = state.backend
        self.users = UserServicer(state)
        self.roles = RoleServicer(state)
        self.locks = LockServicer(state)
        self.audit = AuditServicer(state)
        self.ctx = FakeContext()

    # --- callers -------------------------------------------------------------------------
    def _user_cert(self, name: str, roles: list[str]):
        key = new_key()
        return self.state.sign_user(key.public_key(), types_pb2.Identity(name=name, roles=roles),
                                    dt.timedelta(hours=1))

    def as_admin(self, addr: str = "10.1.1.1") -> None:
        cert = self._user_cert("cachegate-admin", ["editor"])
        authz._current.set(authz.Caller(identity_from_cert(cert), cert, f"ipv4:{addr}:4000"))

    def as_proxy(self, client_addr: str = "203.0.113.7", role=types_pb2.SERVICE_ROLE_DBPROXY) -> None:
        key = new_key()
        cert = self.state.sign_host(key.public_key(), "proxy-host-1", role, ["127.0.0.1"])
        authz._current.set(authz.Caller(identity_from_cert(cert), cert, "ipv4:127.0.0.1:5000",
                                        client_addr=client_addr))

    def as_cert(self, cert_pem: str, client_addr: str = "203.0.113.7") -> None:
        """A user certificate, forwarded by dbproxy (as GenerateDatabaseCert arrives)."""
        cert = cert_from_pem(cert_pem)
        authz._current.set(authz.Caller(identity_from_cert(cert), cert, "ipv4:127.0.0.1:5000",
                                        client_addr=client_addr))

    async def call(self, method, request):
        return await method(request, self.ctx)

    async def fails(self, method, request) -> Aborted:
        try:
            await method(request, self.ctx)
        except Aborted as exc:
            return exc
        raise AssertionError(f"{method.__name__} succeeded but was expected to fail")

    @staticmethod
    def csr() -> tuple[object, str]:
        key = new_key()
        return key, make_csr(key, "ignored").decode()


async def make_env(tmp_path, **auth_section) -> Env:
    cfg = load_config(environ={}, data={"data_dir": str(tmp_path / "data"),
                                        "auth_service": {"cluster_name": "unit", **auth_section}})
    backend = SQLiteBackend(tmp_path / "auth.db")
    state = AuthState(cfg, backend)
    await state.init()
    return Env(state)


@pytest.fixture
async def env(tmp_path):
    e = await make_env(tmp_path)
    yield e
    await e.backend.close()


@pytest.fixture
async def make(tmp_path):
    """Build an Env with auth_service settings: ``await make(login_lockout=1)``."""
    made = []

    async def _make(**kw):
        e = await make_env(tmp_path / f"e{len(made)}", **kw)
        made.append(e)
        return e

    yield _make
    for e in made:
        await e.backend.close()
