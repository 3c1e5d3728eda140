"""UserService: users, invites, login, lockout, TOTP, locks and database certificates."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
import time

import grpc
import pyotp
import pytest
from cachegate.auth.v1 import audit_service_pb2, lock_service_pb2, role_service_pb2
from cachegate.auth.v1 import user_service_pb2 as us
from cachegate.types.v1 import types_pb2

from services.common import rbac
from services.common.grpcutil import dur, from_ts
from services.common.identity import identity_from_cert
from services.common.pki import cert_from_pem
from services.common.roleproto import role_to_proto
from tests.auth.conftest import Env

PASSWORD = "correct horse battery staple"
LOGIN_FAILED = "invalid user name or password"


async def add_user(env: Env, name: str, roles=("access",), db_users=("default",), db_names=("0",),
                   password: str | None = PASSWORD, totp_secret: str = "") -> us.CreateUserResponse:
    env.as_admin()
    resp = await env.call(env.users.CreateUser, us.CreateUserRequest(user=types_pb2.User(
        name=name, roles=list(roles), db_users=list(db_users), db_names=list(db_names))))
    if password is not None:
        env.as_proxy()
        code = pyotp.TOTP(totp_secret).now() if totp_secret else ""
        await env.call(env.users.RedeemInvite, us.RedeemInviteRequest(
            invite_token=resp.invite.token, password=password, totp_secret=totp_secret, totp_code=code))
    return resp


def login_req(name: str, password: str = PASSWORD, ttl: float | None = None, totp: str = "") -> us.LoginRequest:
    req = us.LoginRequest(user=name, password=password, totp_code=totp, csr_pem=Env.csr()[1])
    if ttl is not None:
        req.ttl.CopyFrom(dur(ttl))
    return req


async def login(env: Env, name: str, password: str = PASSWORD, addr: str = "203.0.113.7", **kw) -> us.LoginResponse:
    env.as_proxy(addr)
    return await env.call(env.users.Login, login_req(name, password, **kw))


async def login_fails(env: Env, name: str, password: str = PASSWORD, addr: str = "203.0.113.7", **kw):
    env.as_proxy(addr)
    return await env.fails(env.users.Login, login_req(name, password, **kw))


async def audit_events(env: Env, *types: str) -> list[types_pb2.AuditEvent]:
    env.as_admin()
    resp = await env.call(env.audit.SearchAuditEvents,
                          audit_service_pb2.SearchAuditEventsRequest(types=list(types), page_size=1000))
    return list(resp.events)


def all_audit_bytes(env: Env) -> bytes:
    rows = env.backend._db.execute("SELECT data FROM audit").fetchall()
    return b"".join(bytes(r[0]) for r in rows)


# --- administration ---------------------------------------------------------------------------

async def test_create_user_returns_single_use_invite_and_lists_without_secrets(env):
    resp = await add_user(env, "alice", db_users=["default", "reader"], password=None)
    assert resp.user.name == "alice" and list(resp.user.roles) == ["access"]
    assert list(resp.user.db_users) == ["default", "reader"]
    assert len(resp.invite.token) >= 32
    assert from_ts(resp.invite.expire_time) == pytest.approx(time.time() + 3600, abs=5)
    assert not resp.user.has_password
    env.as_admin()
    got = await env.call(env.users.GetUser, us.GetUserRequest(name="alice"))
    assert got.user.name == "alice" and not got.user.has_password
    # The invite is stored by hash only.
    stored = env.backend._db.execute("SELECT key, value FROM items WHERE key LIKE 'invites/%'").fetchall()
    assert len(stored) == 1 and resp.invite.token not in stored[0][0] and resp.invite.token.encode() not in stored[0][1]

    env.as_proxy()
    r = await env.call(env.users.RedeemInvite, us.RedeemInviteRequest(invite_token=resp.invite.token, password=PASSWORD))
    assert r.user == "alice"
    env.as_admin()
    assert (await env.call(env.users.GetUser, us.GetUserRequest(name="alice"))).user.has_password
    env.as_proxy()
    again = await env.fails(env.users.RedeemInvite, us.RedeemInviteRequest(invite_token=resp.invite.token,
                                                                         password="another long password"))
    assert again.code == grpc.StatusCode.PERMISSION_DENIED and "not valid" in again.details
    assert "cgctl users reset" in again.details
    # the first password still works, the second was never set
    await login(env, "alice")
    assert (await login_fails(env, "alice", "another long password")).details == LOGIN_FAILED
    # nothing secret in the stored user record or the audit log
    raw = env.backend._db.execute("SELECT value FROM items WHERE key='users/alice'").fetchone()[0]
    assert PASSWORD.encode() not in raw and json.loads(raw)["password_hash"].startswith("$argon2id$")
    assert PASSWORD.encode() not in all_audit_bytes(env)
    assert resp.invite.token.encode() not in all_audit_bytes(env)


@pytest.mark.parametrize("user,expect", [
    (types_pb2.User(name="bad name", roles=["access"]), "invalid user name"),
    (types_pb2.User(name="cachegate-admin", roles=["access"]), "reserved"),
    (types_pb2.User(name="bob", roles=[]), "at least one role: --roles=access"),
    (types_pb2.User(name="bob", roles=["nope"]), "unknown role nope"),
    (types_pb2.User(name="bob", roles=["access"], db_names=["prod"]), "logical databases are numbers"),
    (types_pb2.User(name="bob", roles=["access"], db_users=["two words"]), "invalid db user"),
])
async def test_create_user_refuses_bad_input_with_a_clear_message(env, user, expect):
    env.as_admin()
    err = await env.fails(env.users.CreateUser, us.CreateUserRequest(user=user))
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT
    assert expect in err.details


async def test_duplicate_update_delete_and_list(env):
    await add_user(env, "alice", password=None)
    await add_user(env, "bob", password=None)
    env.as_admin()
    dup = await env.fails(env.users.CreateUser, us.CreateUserRequest(user=types_pb2.User(name="alice", roles=["access"])))
    assert dup.code == grpc.StatusCode.ALREADY_EXISTS and "already exists" in dup.details

    up = await env.call(env.users.UpdateUser, us.UpdateUserRequest(
        user=types_pb2.User(name="alice", db_users=["*"], roles=["editor"]), update_mask=["db_users"]))
    assert list(up.user.db_users) == ["*"] and list(up.user.roles) == ["access"]  # roles not in the mask
    bad = await env.fails(env.users.UpdateUser, us.UpdateUserRequest(
        user=types_pb2.User(name="alice"), update_mask=["password_hash"]))
    assert bad.code == grpc.StatusCode.INVALID_ARGUMENT and "only roles, db_users and db_names" in bad.details
    missing = await env.fails(env.users.UpdateUser, us.UpdateUserRequest(
        user=types_pb2.User(name="carol", roles=["access"]), update_mask=["roles"]))
    assert missing.code == grpc.StatusCode.NOT_FOUND

    page1 = await env.call(env.users.ListUsers, us.ListUsersRequest(page_size=1))
    assert [u.name for u in page1.users] == ["alice"] and page1.next_page_token
    page2 = await env.call(env.users.ListUsers, us.ListUsersRequest(page_size=1, page_token=page1.next_page_token))
    assert [u.name for u in page2.users] == ["bob"] and not page2.next_page_token

    await env.call(env.users.DeleteUser, us.DeleteUserRequest(name="bob"))
    gone = await env.fails(env.users.GetUser, us.GetUserRequest(name="bob"))
    assert gone.code == grpc.StatusCode.NOT_FOUND and 'no user "bob"' in gone.details
    assert (await env.fails(env.users.DeleteUser, us.DeleteUserRequest(name="bob"))).code == grpc.StatusCode.NOT_FOUND
    types = [e.type for e in await audit_events(env, "user.*")]
    assert types.count("user.create") == 2 and "user.update" in types and "user.delete" in types


async def test_invite_of_deleted_user_no_longer_works(env):
    resp = await add_user(env, "alice", password=None)
    env.as_admin()
    await env.call(env.users.DeleteUser, us.DeleteUserRequest(name="alice"))
    env.as_proxy()
    err = await env.fails(env.users.RedeemInvite, us.RedeemInviteRequest(invite_token=resp.invite.token, password=PASSWORD))
    assert err.code == grpc.StatusCode.PERMISSION_DENIED


async def test_short_password_is_refused_without_using_up_the_invite(env):
    resp = await add_user(env, "alice", password=None)
    env.as_proxy()
    err = await env.fails(env.users.RedeemInvite, us.RedeemInviteRequest(invite_token=resp.invite.token, password="short"))
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT and "at least 12 characters" in err.details
    await env.call(env.users.RedeemInvite, us.RedeemInviteRequest(invite_token=resp.invite.token, password=PASSWORD))


async def test_expired_invite_is_refused(make):
    env = await make(invite_ttl=1)
    resp = await add_user(env, "alice", password=None)
    await asyncio.sleep(1.2)
    env.as_proxy()
    err = await env.fails(env.users.RedeemInvite, us.RedeemInviteRequest(invite_token=resp.invite.token, password=PASSWORD))
    assert err.code == grpc.StatusCode.PERMISSION_DENIED and "expired" in err.details


async def test_reset_clears_password_and_old_invite(env):
    first = await add_user(env, "alice", password=None)
    env.as_admin()
    reset = await env.call(env.users.ResetUser, us.ResetUserRequest(name="alice"))
    env.as_proxy()
    old = await env.fails(env.users.RedeemInvite, us.RedeemInviteRequest(invite_token=first.invite.token, password=PASSWORD))
    assert old.code == grpc.StatusCode.PERMISSION_DENIED
    await env.call(env.users.RedeemInvite, us.RedeemInviteRequest(invite_token=reset.invite.token, password=PASSWORD))
    await login(env, "alice")
    env.as_admin()
    again = await env.call(env.users.ResetUser, us.ResetUserRequest(name="alice"))
    assert again.invite.token
    assert (await login_fails(env, "alice")).details == LOGIN_FAILED  # the password is gone
    env.as_admin()
    assert (await env.fails(env.users.ResetUser, us.ResetUserRequest(name="nobody"))).code == grpc.StatusCode.NOT_FOUND


# --- login ------------------------------------------------------------------------------------

async def test_login_signs_a_session_certificate_for_the_csr_key(env):
    await add_user(env, "alice", db_users=["default", "reader"], db_names=["0", "3"])
    env.as_proxy("198.51.100.4")
    key, csr = Env.csr()
    resp = await env.call(env.users.Login, us.LoginRequest(user="alice", password=PASSWORD, csr_pem=csr))
    cert = cert_from_pem(resp.cert_pem)
    assert cert.public_key().public_numbers() == key.public_key().public_numbers()
    ident = identity_from_cert(cert)
    assert ident.kind == types_pb2.IDENTITY_KIND_USER and ident.name == "alice"
    assert list(ident.roles) == ["access"] and list(ident.db_users) == ["default", "reader"]
    assert list(ident.db_names) == ["0", "3"] and ident.login_ip == "198.51.100.4"
    assert env.state.user_ca.issued(cert)
    assert resp.user_ca_pem == env.state.user_ca.cert_pem.decode()
    assert resp.host_ca_pem == env.state.host_ca.cert_pem.decode()
    ttl = cert.not_valid_after_utc.timestamp() - time.time()
    assert 12 * 3600 - 120 < ttl <= 12 * 3600 + 5  # the default 12h
    assert from_ts(resp.expire_time) == pytest.approx(cert.not_valid_after_utc.timestamp(), abs=1)
    ev = (await audit_events(env, "user.login"))[-1]
    assert ev.success and ev.actor == "alice" and ev.source_addr == "198.51.100.4" and ev.id
    assert ev.fields["method"] == "password"


async def test_session_ttl_is_the_shortest_of_request_and_roles(env):
    env.as_admin()
    short = rbac.Role(name="short", options=rbac.RoleOptions(max_session_ttl=3600))
    await env.call(env.roles.UpsertRole, role_service_pb2.UpsertRoleRequest(role=role_to_proto(short)))
    await add_user(env, "alice", roles=["access", "short"])

    def ttl_of(resp):
        return cert_from_pem(resp.cert_pem).not_valid_after_utc.timestamp() - time.time()

    assert 3600 - 120 < ttl_of(await login(env, "alice")) <= 3605  # capped by the role
    assert 600 - 120 < ttl_of(await login(env, "alice", ttl=600)) <= 605  # shorter request wins
    assert ttl_of(await login(env, "alice", ttl=86400)) <= 3605


async def test_unknown_user_and_wrong_password_look_the_same(make):
    env = await make(login_max_attempts=100, login_max_attempts_per_addr=100)
    await add_user(env, "alice")
    await add_user(env, "nopass", password=None)
    answers = []
    timings: dict[str, list[float]] = {"unknown": [], "wrong": []}
    for _ in range(3):
        for kind, (name, pw) in {"unknown": ("mallory", PASSWORD), "wrong": ("alice", "wrong password!!")}.items():
            t0 = time.perf_counter()
            err = await login_fails(env, name, pw)
            timings[kind].append(time.perf_counter() - t0)
            answers.append((err.code, err.details))
    err = await login_fails(env, "nopass", PASSWORD)
    answers.append((err.code, err.details))
    assert set(answers) == {(grpc.StatusCode.UNAUTHENTICATED, LOGIN_FAILED)}
    unknown, wrong = min(timings["unknown"]), min(timings["wrong"])
    assert 0.5 < unknown / wrong < 2.0, timings  # both run one argon2 verification
    # the audit log says what really happened, never the password
    failures = [e for e in await audit_events(env, "user.login") if not e.success]
    reasons = {e.error for e in failures}
    assert {"unknown user", "password mismatch", "no password set (invite not redeemed)"} <= reasons
    assert all(e.code == "T2000W" and e.source_addr == "203.0.113.7" for e in failures)
    assert b"wrong password!!" not in all_audit_bytes(env) and PASSWORD.encode() not in all_audit_bytes(env)


async def test_failed_logins_lock_the_user_out_for_a_while(make, caplog):
    caplog.set_level(logging.DEBUG)
    env = await make(login_max_attempts=3, login_lockout=4)
    await add_user(env, "alice")
    for _ in range(3):
        assert (await login_fails(env, "alice", "wrong password!!")).code == grpc.StatusCode.UNAUTHENTICATED
    err = await login_fails(env, "alice")  # right password, but locked out
    assert err.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert err.details.startswith("too many failed login attempts for alice: try again in ")
    # unknown user names are limited the same way (no difference to learn from)
    for _ in range(3):
        await login_fails(env, "mallory", addr="192.0.2.1")
    assert (await login_fails(env, "mallory", addr="192.0.2.1")).code == grpc.StatusCode.RESOURCE_EXHAUSTED
    await asyncio.sleep(4.1)
    await login(env, "alice")
    ev = [e for e in await audit_events(env, "user.login") if "locked out" in e.error]
    assert ev and not ev[0].success
    assert "wrong password!!" not in caplog.text and PASSWORD not in caplog.text


async def test_failed_logins_from_one_address_lock_that_address_out(make):
    env = await make(login_max_attempts=100, login_max_attempts_per_addr=4, login_lockout=30)
    await add_user(env, "alice")
    for i in range(4):
        await login_fails(env, f"user{i}", addr="192.0.2.66")
    err = await login_fails(env, "alice", addr="192.0.2.66")
    assert err.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert err.details.startswith("too many failed login attempts from 192.0.2.66: try again in ")
    await login(env, "alice", addr="192.0.2.67")  # other addresses are not affected


async def test_totp_second_factor(env):
    secret = pyotp.random_base32()
    await add_user(env, "alice", totp_secret=secret)
    env.as_admin()
    assert (await env.call(env.users.GetUser, us.GetUserRequest(name="alice"))).user.totp_enabled
    err = await login_fails(env, "alice")
    assert err.code == grpc.StatusCode.UNAUTHENTICATED and "TOTP code is required" in err.details
    wrong = str((int(pyotp.TOTP(secret).now()) + 1) % 1_000_000).zfill(6)
    err = await login_fails(env, "alice", totp=wrong)
    assert err.code == grpc.StatusCode.UNAUTHENTICATED and "invalid TOTP code" in err.details
    # a code from the next time step (clock skew) is accepted once, and not again
    step = int(time.time() // 30)
    code = pyotp.TOTP(secret).at((step + 1) * 30)
    await login(env, "alice", totp=code)
    err = await login_fails(env, "alice", totp=code)
    assert "already used" in err.details
    assert secret.encode() not in all_audit_bytes(env)
    ok = [e for e in await audit_events(env, "user.login") if e.success]
    assert ok[-1].fields["method"] == "password+totp"


async def test_redeem_with_wrong_totp_code_is_refused(env):
    resp = await add_user(env, "alice", password=None)
    env.as_proxy()
    err = await env.fails(env.users.RedeemInvite, us.RedeemInviteRequest(
        invite_token=resp.invite.token, password=PASSWORD, totp_secret=pyotp.random_base32(), totp_code="000000"))
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT and "does not match" in err.details


# --- locks ------------------------------------------------------------------------------------

async def test_locked_user_cannot_log_in_or_get_certificates(env):
    await add_user(env, "alice")
    session = await login(env, "alice")
    env.as_admin()
    lock = (await env.call(env.locks.CreateLock, lock_service_pb2.CreateLockRequest(
        user="alice", message="investigating incident 42"))).lock
    err = await login_fails(env, "alice")
    assert err.code == grpc.StatusCode.PERMISSION_DENIED
    assert err.details == ('user "alice" is locked: investigating incident 42; '
                           "ask an administrator to remove the lock")
    wrong = await login_fails(env, "alice", "wrong password!!")
    assert wrong.details == LOGIN_FAILED  # the lock is not revealed without the password
    env.as_cert(session.cert_pem)
    err = await env.fails(env.users.GenerateDatabaseCert, db_cert_req("redis1", "default"))
    assert err.code == grpc.StatusCode.PERMISSION_DENIED and "investigating incident 42" in err.details
    env.as_admin()
    await env.call(env.locks.DeleteLock, lock_service_pb2.DeleteLockRequest(id=lock.id))
    await login(env, "alice")


async def test_role_lock_applies_to_its_holders(env):
    await add_user(env, "alice")
    env.as_admin()
    await env.call(env.locks.CreateLock, lock_service_pb2.CreateLockRequest(role="access", message="maintenance"))
    err = await login_fails(env, "alice")
    assert err.code == grpc.StatusCode.PERMISSION_DENIED
    assert 'role "access" is locked' in err.details and "maintenance" in err.details


async def test_lock_with_ttl_expires(env):
    await add_user(env, "alice")
    env.as_admin()
    req = lock_service_pb2.CreateLockRequest(user="alice", message="short break")
    req.ttl.CopyFrom(dur(1))
    await env.call(env.locks.CreateLock, req)
    assert (await login_fails(env, "alice")).code == grpc.StatusCode.PERMISSION_DENIED
    await asyncio.sleep(1.2)
    await login(env, "alice")


# --- database certificates ------------------------------------------------------------------

def db_cert_req(service: str, db_user: str, db_name: str = "", ttl: float | None = None):
    req = us.GenerateDatabaseCertRequest(csr_pem=Env.csr()[1], route=types_pb2.RouteToDatabase(
        service_name=service, db_user=db_user, db_name=db_name))
    if ttl is not None:
        req.ttl.CopyFrom(dur(ttl))
    return req


async def test_database_cert_carries_route_and_ends_with_session(env):
    await add_user(env, "alice", db_users=["default"], db_names=["0", "2"])
    session = await login(env, "alice", ttl=1800)
    session_end = cert_from_pem(session.cert_pem).not_valid_after_utc
    env.as_cert(session.cert_pem)
    resp = await env.call(env.users.GenerateDatabaseCert, db_cert_req("redis1", "default", "2"))
    cert = cert_from_pem(resp.cert_pem)
    ident = identity_from_cert(cert)
    assert ident.name == "alice" and ident.route.service_name == "redis1"
    assert ident.route.db_user == "default" and ident.route.db_name == "2" and ident.route.protocol == "redis"
    assert cert.not_valid_after_utc <= session_end
    assert cert.not_valid_after_utc >= session_end - dt.timedelta(seconds=5)
    # a shorter ttl is honoured, a longer one is capped by the session
    short = cert_from_pem((await env.call(env.users.GenerateDatabaseCert, db_cert_req("redis1", "default", ttl=60))).cert_pem)
    assert short.not_valid_after_utc.timestamp() - time.time() <= 61
    long_ = cert_from_pem((await env.call(env.users.GenerateDatabaseCert, db_cert_req("redis1", "default", ttl=86400))).cert_pem)
    assert long_.not_valid_after_utc <= session_end
    ev = (await audit_events(env, "user.cert.database"))[-1]
    assert ev.success and ev.actor == "alice" and ev.fields["database"] == "redis1"


async def test_database_cert_route_is_checked_against_roles_and_traits(env):
    await add_user(env, "alice", db_users=["default"], db_names=["0"])
    session = await login(env, "alice")
    env.as_cert(session.cert_pem)
    err = await env.fails(env.users.GenerateDatabaseCert, db_cert_req("redis1", "admin"))
    assert err.code == grpc.StatusCode.PERMISSION_DENIED
    assert 'db user "admin"' in err.details and "ask an administrator" in err.details
    err = await env.fails(env.users.GenerateDatabaseCert, db_cert_req("redis1", "default", "5"))
    assert err.code == grpc.StatusCode.PERMISSION_DENIED and "logical database 5" in err.details
    err = await env.fails(env.users.GenerateDatabaseCert, db_cert_req("redis1", ""))
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT and "db_user" in err.details
    err = await env.fails(env.users.GenerateDatabaseCert, db_cert_req("", "default"))
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT
    # the traits as they are now count: narrowing them takes effect without a new login
    env.as_admin()
    await env.call(env.users.UpdateUser, us.UpdateUserRequest(
        user=types_pb2.User(name="alice", db_users=["reader"]), update_mask=["db_users"]))
    env.as_cert(session.cert_pem)
    err = await env.fails(env.users.GenerateDatabaseCert, db_cert_req("redis1", "default"))
    assert err.code == grpc.StatusCode.PERMISSION_DENIED


async def test_database_cert_needs_a_live_user_and_a_session_cert(env):
    await add_user(env, "alice")
    session = await login(env, "alice")
    env.as_cert(session.cert_pem)
    db = await env.call(env.users.GenerateDatabaseCert, db_cert_req("redis1", "default"))
    env.as_cert(db.cert_pem)
    err = await env.fails(env.users.GenerateDatabaseCert, db_cert_req("redis1", "default"))
    assert err.code == grpc.StatusCode.PERMISSION_DENIED and "not a database certificate" in err.details
    env.as_admin()
    await env.call(env.users.DeleteUser, us.DeleteUserRequest(name="alice"))
    env.as_cert(session.cert_pem)
    err = await env.fails(env.users.GenerateDatabaseCert, db_cert_req("redis1", "default"))
    assert err.code == grpc.StatusCode.PERMISSION_DENIED and "does not exist" in err.details


async def test_role_rules_with_labels_and_denies_apply_to_database_certs(env):
    env.as_admin()
    role = rbac.load_role_yaml("""
kind: role
version: v1
metadata: {name: prod-reader}
spec:
  allow:
    db_labels: {env: prod}
    db_users: [reader, admin]
  deny:
    db_users: [admin]
""")
    await env.call(env.roles.UpsertRole, role_service_pb2.UpsertRoleRequest(role=role_to_proto(role)))
    await add_user(env, "bob", roles=["prod-reader"], db_users=[], db_names=[])
    session = await login(env, "bob")
    env.as_cert(session.cert_pem)
    await env.call(env.users.GenerateDatabaseCert, db_cert_req("prod-cache", "reader"))
    err = await env.fails(env.users.GenerateDatabaseCert, db_cert_req("prod-cache", "admin"))
    assert err.code == grpc.StatusCode.PERMISSION_DENIED and 'denied by role "prod-reader"' in err.details
