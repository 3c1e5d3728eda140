"""Users, invites, password (+TOTP) login and the certificates users get.

Storage: ``users/NAME`` (JSON, with the argon2id hash and the TOTP secret, which never leave
auth) and ``invites/<sha256 of the token>`` (the token itself is shown once and never stored).

Login failures that could tell whether a user exists (unknown user, wrong password, no
password set yet) all answer UNAUTHENTICATED ``invalid user name or password`` after the same
work (one argon2 verification). Failures are counted per user name and per client address;
too many lock that key out for a while (``login_max_attempts``, ``login_max_attempts_per_addr``,
``login_lockout`` in the auth_service config). Every attempt is an audit event.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import hmac
import json
import logging
import re
import secrets
import time

import grpc
import pyotp
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError
from cachegate.auth.v1 import user_service_pb2, user_service_pb2_grpc
from cachegate.types.v1 import types_pb2

from services.auth import metrics as auth_metrics
from services.auth.backend import Backend
from services.auth.locks import LockStore, locked_message
from services.auth.ratelimit import FailureLimiter
from services.auth.roles import RoleStore
from services.auth.state import ADMIN_USER, AuthState
from services.auth.watch import Subscription, WatchOverflow
from services.common import authz, rbac
from services.common.grpcutil import from_dur, paginate, ts
from services.common.pki import cert_to_pem, load_csr

log = logging.getLogger("cachegate.auth.users")

USERS = "users/"
INVITES = "invites/"
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@+-]{0,63}$")
MIN_PASSWORD_LEN = 12
MAX_PASSWORD_LEN = 1024
MIN_TOTP_SECRET_LEN = 16  # base32 characters: 80 bits
MAX_TRAIT_VALUES = 256
MAX_TRAIT_LEN = 256
TOTP_STEP = 30

LOGIN_FAILED = "invalid user name or password"
INVITE_INVALID = "the invite is not valid (unknown, already used or expired): ask an administrator for a new one (cgctl users reset)"
UPDATE_FIELDS = ("roles", "db_users", "db_names")

_hasher = PasswordHasher()  # argon2id, the library's recommended parameters
_dummy_hash: str | None = None


def _dummy() -> str:
    """A hash to verify against when the user is unknown, so that both cases cost the same."""
    global _dummy_hash
    if _dummy_hash is None:
        _dummy_hash = _hasher.hash(secrets.token_hex(16))
    return _dummy_hash


def hash_password(password: str) -> str:
    return _hasher.hash(password)


def verify_password(stored: str | None, password: str) -> bool:
    """Constant work whether or not there is a stored hash."""
    try:
        return _hasher.verify(stored or _dummy(), password) and stored is not None
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        return False


def invite_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class UserError(ValueError):
    """A request was invalid; the message says what to fix."""


def check_name(name: str) -> str:
    name = (name or "").strip()
    if not NAME_RE.match(name):
        raise UserError(f"invalid user name {name!r}: use 1 to 64 letters, digits, '.', '_', '-', '@' or '+', "
                        "starting with a letter or digit")
    if name == ADMIN_USER:
        raise UserError(f'the user name "{ADMIN_USER}" is reserved for the local administrator identity')
    return name


def _check_traits(values, what: str, numeric: bool) -> list[str]:
    out = []
    for raw in values:
        v = str(raw).strip()
        if not v:
            continue
        if len(v) > MAX_TRAIT_LEN or any(ch.isspace() or not ch.isprintable() for ch in v):
            raise UserError(f"invalid {what} {v!r}: no spaces or control characters, at most {MAX_TRAIT_LEN} long")
        if "{{" in v or "}}" in v:
            raise UserError(f"invalid {what} {v!r}: templates belong in roles, not in user traits")
        if numeric and v != rbac.WILDCARD:
            if not v.isdigit():
                raise UserError(f"invalid db name {v!r}: Redis logical databases are numbers (0, 1, ...) or '*'")
            v = str(int(v))
        out.append(v)
    out = list(dict.fromkeys(out))
    if len(out) > MAX_TRAIT_VALUES:
        raise UserError(f"too many {what}s (at most {MAX_TRAIT_VALUES})")
    return out


def user_proto(doc: dict) -> types_pb2.User:
    return types_pb2.User(name=doc["name"], roles=doc["roles"], db_users=doc["db_users"], db_names=doc["db_names"],
                          create_time=ts(doc["created"]), has_password=bool(doc.get("password_hash")),
                          totp_enabled=bool(doc.get("totp_secret")))


def user_access(doc: dict) -> user_service_pb2.UserAccess:
    """What dbproxy may know of a user: name, roles and traits, nothing else."""
    return user_service_pb2.UserAccess(name=doc["name"], roles=doc["roles"], db_users=doc["db_users"],
                                       db_names=doc["db_names"])


def _access_key(doc: dict) -> tuple:
    return tuple(doc["roles"]), tuple(doc["db_users"]), tuple(doc["db_names"])


def fmt_seconds(seconds: float) -> str:
    s = max(1, int(seconds + 0.999))
    m, s = divmod(s, 60)
    return f"{m}m{s:02d}s" if m else f"{s}s"


class UserStore:
    def __init__(self, backend: Backend):
        self.backend = backend

    async def get_item(self, name: str):
        if not NAME_RE.match(name or ""):
            return None, None
        item = await self.backend.get(USERS + name)
        if item is None:
            return None, None
        return item, json.loads(item.value)

    async def get(self, name: str) -> dict | None:
        return (await self.get_item(name))[1]

    async def list(self) -> list[dict]:
        return [json.loads(i.value) for i in await self.backend.list(USERS)]

    async def create(self, doc: dict) -> bool:
        return await self.backend.create(USERS + doc["name"], json.dumps(doc).encode())

    async def update(self, name: str, change) -> dict | None:
        """Apply ``change(doc) -> doc`` atomically (compare-and-swap, retried). None: no such user."""
        for _ in range(50):
            item, doc = await self.get_item(name)
            if item is None:
                return None
            new = change(dict(doc))
            if await self.backend.compare_and_swap(item.key, item.value, json.dumps(new).encode(),
                                                   expires=item.expires):
                return new
            await asyncio.sleep(0.005)
        raise RuntimeError("the user record is changing too fast; try again")

    async def delete(self, name: str) -> bool:
        return await self.backend.delete(USERS + name)

    # --- invites -----------------------------------------------------------------------
    async def new_invite(self, name: str, ttl: float, kind: str) -> tuple[str, float]:
        """A fresh one-time invite for ``name``; earlier invites of that user stop working."""
        await self.drop_invites(name)
        token = secrets.token_urlsafe(32)
        now = time.time()
        doc = {"user": name, "created": now, "expires": now + ttl, "used_at": None, "kind": kind}
        await self.backend.put(INVITES + invite_hash(token), json.dumps(doc).encode(), expires=now + ttl)
        return token, now + ttl

    async def drop_invites(self, name: str) -> None:
        for item in await self.backend.list(INVITES):
            try:
                if json.loads(item.value).get("user") == name:
                    await self.backend.delete(item.key)
            except ValueError:
                continue


class UserServicer(user_service_pb2_grpc.UserServiceServicer):
    def __init__(self, state: AuthState):
        self.state = state
        self.acfg = state.acfg
        self.users = UserStore(state.backend)
        self.roles = RoleStore(state.backend)
        self.locks = LockStore(state.backend)
        self.user_limiter = FailureLimiter(state.backend, "user", self.acfg.login_max_attempts,
                                           self.acfg.login_lockout)
        self.addr_limiter = FailureLimiter(state.backend, "addr", self.acfg.login_max_attempts_per_addr,
                                           self.acfg.login_lockout)

    @property
    def audit(self):
        return self.state.audit

    async def _validate_user(self, user: types_pb2.User, fields=UPDATE_FIELDS) -> dict:
        out: dict = {}
        if "roles" in fields:
            roles = list(dict.fromkeys(r.strip() for r in user.roles if r.strip()))
            if not roles:
                raise UserError("a user needs at least one role: --roles=access (see `cgctl roles ls`)")
            _, missing = await self.roles.get_many(roles)
            if missing:
                raise UserError(f"unknown role{'s' if len(missing) > 1 else ''} {', '.join(missing)}: "
                                "see `cgctl roles ls`")
            out["roles"] = roles
        if "db_users" in fields:
            out["db_users"] = _check_traits(user.db_users, "db user", numeric=False)
        if "db_names" in fields:
            out["db_names"] = _check_traits(user.db_names, "db name", numeric=True)
        return out

    # --- administration ----------------------------------------------------------------------
    async def CreateUser(self, request, context):
        caller = authz.current_caller()
        try:
            name = check_name(request.user.name)
            doc = {"name": name, **await self._validate_user(request.user), "created": time.time(),
                   "password_hash": None, "totp_secret": None, "totp_last": 0}
        except UserError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        if not await self.users.create(doc):
            await context.abort(grpc.StatusCode.ALREADY_EXISTS,
                                f'user "{name}" already exists: change it with `cgctl users update` '
                                "or issue a new invite with `cgctl users reset`")
        token, expires = await self.users.new_invite(name, self.acfg.invite_ttl, "create")
        await self.audit.emit("user.create", caller.name, caller.source_addr(), user=name, roles=doc["roles"],
                              db_users=doc["db_users"], db_names=doc["db_names"])
        return user_service_pb2.CreateUserResponse(
            user=user_proto(doc), invite=user_service_pb2.Invite(token=token, expire_time=ts(expires)))

    async def GetUser(self, request, context):
        doc = await self.users.get(request.name)
        if doc is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f'no user "{request.name}": see `cgctl users ls`')
        return user_service_pb2.GetUserResponse(user=user_proto(doc))

    async def ListUsers(self, request, context):
        docs = sorted(await self.users.list(), key=lambda d: d["name"])
        try:
            page, nxt = paginate(docs, lambda d: d["name"], request.page_size, request.page_token)
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        return user_service_pb2.ListUsersResponse(users=[user_proto(d) for d in page], next_page_token=nxt)

    async def UpdateUser(self, request, context):
        caller = authz.current_caller()
        mask = [p.strip() for p in request.update_mask if p.strip()] or list(UPDATE_FIELDS)
        unknown = [p for p in mask if p not in UPDATE_FIELDS]
        if unknown:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"cannot update {', '.join(unknown)}: only roles, db_users and db_names can change")
        name = request.user.name
        try:
            changes = await self._validate_user(request.user, mask)
        except UserError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        doc = await self.users.update(name, lambda d: {**d, **changes})
        if doc is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f'no user "{name}": see `cgctl users ls`')
        await self.audit.emit("user.update", caller.name, caller.source_addr(), user=name, changed=mask,
                              **{k: v for k, v in changes.items()})
        return user_service_pb2.UpdateUserResponse(user=user_proto(doc))

    async def DeleteUser(self, request, context):
        caller = authz.current_caller()
        name = request.name
        if await self.users.get(name) is None or not await self.users.delete(name):
            await context.abort(grpc.StatusCode.NOT_FOUND, f'no user "{name}": see `cgctl users ls`')
        await self.users.drop_invites(name)
        await self.audit.emit("user.delete", caller.name, caller.source_addr(), user=name)
        return user_service_pb2.DeleteUserResponse()

    async def ResetUser(self, request, context):
        caller = authz.current_caller()
        name = request.name

        def clear(d):
            return {**d, "password_hash": None, "totp_secret": None, "totp_last": 0}

        if await self.users.update(name, clear) is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f'no user "{name}": see `cgctl users ls`')
        token, expires = await self.users.new_invite(name, self.acfg.invite_ttl, "reset")
        await self.audit.emit("user.reset", caller.name, caller.source_addr(), user=name)
        return user_service_pb2.ResetUserResponse(invite=user_service_pb2.Invite(token=token, expire_time=ts(expires)))

    async def WatchUsers(self, request, context):
        """Every user's roles and traits, INIT_DONE, then changes to them. Writes that change
        nothing dbproxy needs (a password, a TOTP time step) send nothing."""
        put, delete = types_pb2.WATCH_EVENT_TYPE_PUT, types_pb2.WATCH_EVENT_TYPE_DELETE
        sent: dict[str, tuple] = {}
        with Subscription(self.state.backend, USERS) as sub:
            for doc in sorted(await self.users.list(), key=lambda d: d["name"]):
                sent[doc["name"]] = _access_key(doc)
                yield user_service_pb2.WatchUsersResponse(type=put, user=user_access(doc))
            yield user_service_pb2.WatchUsersResponse(type=types_pb2.WATCH_EVENT_TYPE_INIT_DONE)
            while True:
                try:
                    change = await sub.get()
                except WatchOverflow:
                    await context.abort(grpc.StatusCode.ABORTED, "the user watch fell behind: watch again")
                name = change.key[len(USERS):]
                if change.kind == "delete":
                    if sent.pop(name, None) is not None:
                        yield user_service_pb2.WatchUsersResponse(type=delete,
                                                                  user=user_service_pb2.UserAccess(name=name))
                    continue
                try:
                    doc = json.loads(change.value)
                    key = _access_key(doc)
                except (ValueError, KeyError, TypeError):
                    # Deny by default: a record that cannot be read gives its user no access.
                    log.error("stored user is not valid; dbproxy treats it as deleted", extra={"user": name})
                    if sent.pop(name, None) is not None:
                        yield user_service_pb2.WatchUsersResponse(type=delete,
                                                                  user=user_service_pb2.UserAccess(name=name))
                    continue
                if sent.get(name) == key:
                    continue
                sent[name] = key
                yield user_service_pb2.WatchUsersResponse(type=put, user=user_access(doc))

    # --- invites -----------------------------------------------------------------------------
    async def RedeemInvite(self, request, context):
        caller = authz.current_caller()
        source = caller.source_addr()
        password = request.password
        if len(password) < MIN_PASSWORD_LEN:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"the password is too short: use at least {MIN_PASSWORD_LEN} characters")
        if len(password) > MAX_PASSWORD_LEN:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"the password is too long: use at most {MAX_PASSWORD_LEN} characters")
        secret = request.totp_secret.strip().replace(" ", "").upper()
        if secret:
            if not _valid_base32(secret) or len(secret) < MIN_TOTP_SECRET_LEN:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                    f"the TOTP secret must be base32 and at least {MIN_TOTP_SECRET_LEN} characters")
            if totp_counter(secret, request.totp_code) is None:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                    "the TOTP code does not match the secret: enter the code your authenticator "
                                    "app shows now (and check its clock)")
        elif request.totp_code:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "a TOTP code was given without a TOTP secret")

        h = invite_hash(request.invite_token.strip())
        item = await self.state.backend.get(INVITES + h) if request.invite_token.strip() else None
        invite = json.loads(item.value) if item is not None else None
        if invite is None or invite.get("used_at") or invite["expires"] <= time.time():
            await self.audit.emit("user.invite.redeem", "", source, success=False,
                                  error="unknown, used or expired invite")
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, INVITE_INVALID)
        name = invite["user"]
        used = dict(invite, used_at=time.time())
        if not await self.state.backend.compare_and_swap(item.key, item.value, json.dumps(used).encode(),
                                                         expires=item.expires):
            await self.audit.emit("user.invite.redeem", name, source, success=False, error="invite already used",
                                  user=name)
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, INVITE_INVALID)
        pw_hash = await asyncio.to_thread(hash_password, password)
        counter = totp_counter(secret, request.totp_code) if secret else None

        def set_password(d):
            return {**d, "password_hash": pw_hash, "totp_secret": secret or None, "totp_last": counter or 0}

        doc = await self.users.update(name, set_password)
        await self.state.backend.delete(item.key)
        if doc is None:
            await self.audit.emit("user.invite.redeem", name, source, success=False, error="user was deleted",
                                  user=name)
            await context.abort(grpc.StatusCode.NOT_FOUND,
                                f'user "{name}" no longer exists: ask an administrator to add it again')
        await self.user_limiter.reset(name)
        await self.audit.emit("user.invite.redeem", name, source, user=name, totp_enabled=bool(secret))
        return user_service_pb2.RedeemInviteResponse(user=name)

    # --- login -------------------------------------------------------------------------------
    async def _login_failed(self, context, name: str, source: str, reason: str, code=grpc.StatusCode.UNAUTHENTICATED,
                            message: str = LOGIN_FAILED, count: bool = True, **fields):
        m = auth_metrics.default()
        m.login(False, reason)
        if count:
            if await self.user_limiter.failure(name):
                m.lockout("user")
            if await self.addr_limiter.failure(source):
                m.lockout("addr")
        await self.audit.emit("user.login", name if NAME_RE.match(name) else "", source, success=False, error=reason,
                              user=name[:128], **fields)
        await context.abort(code, message)

    async def Login(self, request, context):
        caller = authz.current_caller()
        source = caller.source_addr()
        name = request.user.strip()
        shown = name if NAME_RE.match(name) else "this user name"
        wait = await self.user_limiter.retry_after(name)
        if wait > 0:
            await self._login_failed(context, name, source, "too many failed attempts (user locked out)",
                                     grpc.StatusCode.RESOURCE_EXHAUSTED,
                                     f"too many failed login attempts for {shown}: try again in {fmt_seconds(wait)}",
                                     count=False)
        wait = await self.addr_limiter.retry_after(source)
        if wait > 0:
            await self._login_failed(context, name, source, "too many failed attempts (address locked out)",
                                     grpc.StatusCode.RESOURCE_EXHAUSTED,
                                     f"too many failed login attempts from {source}: try again in {fmt_seconds(wait)}",
                                     count=False)
        try:
            csr = load_csr(request.csr_pem)
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        requested = from_dur(request.ttl) if request.HasField("ttl") else 0.0
        if requested < 0:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "ttl must be positive (or unset for the default)")

        _, doc = await self.users.get_item(name)
        stored = doc.get("password_hash") if doc else None
        ok = await asyncio.to_thread(verify_password, stored, request.password[:MAX_PASSWORD_LEN])
        if not ok:
            reason = "unknown user" if doc is None else ("no password set (invite not redeemed)" if not stored
                                                        else "password mismatch")
            await self._login_failed(context, name, source, reason)
        method = "password"
        if doc.get("totp_secret"):
            method = "password+totp"
            code = request.totp_code.strip()
            if not code:
                await self._login_failed(context, name, source, "TOTP code missing",
                                         message="a TOTP code is required for this user: "
                                                 "enter the code from your authenticator app")
            counter = totp_counter(doc["totp_secret"], code)
            if counter is None:
                await self._login_failed(context, name, source, "TOTP code mismatch",
                                         message="invalid TOTP code: enter the code your authenticator app shows now")
            if not await self._use_totp(name, counter):
                await self._login_failed(context, name, source, "TOTP code reused",
                                         message="this TOTP code was already used: wait for the next one")

        roles, _ = await self.roles.get_many(doc["roles"])
        lock = await self.locks.find(name, doc["roles"])
        if lock is not None:
            await self._login_failed(context, name, source, "user locked", grpc.StatusCode.PERMISSION_DENIED,
                                     locked_message(lock, name), count=False, lock_id=lock.id)

        roleset = rbac.RoleSet(roles, {"db_users": doc["db_users"], "db_names": doc["db_names"]})
        ttl = min(requested or self.acfg.session_ttl, roleset.max_session_ttl)
        ident = types_pb2.Identity(name=name, roles=[r.name for r in roles], db_users=doc["db_users"],
                                   db_names=doc["db_names"], login_ip=source)
        cert = self.state.sign_user(csr.public_key(), ident, dt.timedelta(seconds=ttl))
        await self.user_limiter.reset(name)
        expires = cert.not_valid_after_utc.timestamp()
        await self.audit.emit("user.login", name, source, user=name, method=method, roles=list(ident.roles),
                              ttl_seconds=round(expires - time.time()))
        auth_metrics.default().login(True, method)
        return user_service_pb2.LoginResponse(
            cert_pem=cert_to_pem(cert).decode(), user_ca_pem=self.state.user_ca.cert_pem.decode(),
            host_ca_pem=self.state.host_ca.cert_pem.decode(), identity=ident, expire_time=ts(expires))

    async def _use_totp(self, name: str, counter: int) -> bool:
        """Record the time step of an accepted code; False if it (or a later one) was used before."""
        fresh = True

        def bump(d):
            nonlocal fresh
            fresh = counter > int(d.get("totp_last") or 0)
            return {**d, "totp_last": counter} if fresh else d

        await self.users.update(name, bump)
        return fresh

    # --- database certificates ---------------------------------------------------------------
    async def GenerateDatabaseCert(self, request, context):
        caller = authz.current_caller()
        ident = caller.identity
        source = caller.source_addr()
        if not caller.is_user or caller.cert is None:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, "only users get database certificates")
        if ident.route.service_name:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED,
                                "use your session certificate (cgate login), not a database certificate, "
                                "to request database certificates")
        name = ident.name
        route = types_pb2.RouteToDatabase()
        route.CopyFrom(request.route)
        route.service_name = route.service_name.strip()
        route.db_user = route.db_user.strip()
        route.db_name = route.db_name.strip()
        route.protocol = route.protocol.strip() or "redis"
        if not route.service_name:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "route.service_name is required: name the database")
        if not route.db_user:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                "route.db_user is required: choose a database user (--db-user)")
        if route.protocol != "redis":
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"unsupported protocol {route.protocol!r}: use redis")
        if route.db_name:
            if not route.db_name.isdigit():
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                    f"invalid db name {route.db_name!r}: Redis logical databases are numbers (0, 1, ...)")
            route.db_name = str(int(route.db_name))
        try:
            csr = load_csr(request.csr_pem)
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        requested = from_dur(request.ttl) if request.HasField("ttl") else 0.0
        if requested < 0:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "ttl must be positive (or unset)")

        doc = await self.users.get(name)
        if doc is None:
            await self._cert_refused(context, name, source, route, "user does not exist",
                                     f'user "{name}" does not exist (it may have been deleted): ask an administrator')
        lock = await self.locks.find(name, set(ident.roles) | set(doc["roles"]))
        if lock is not None:
            await self._cert_refused(context, name, source, route, "user locked", locked_message(lock, name))
        # Only roles the session has and the user still holds; the traits as they are now.
        roles, _ = await self.roles.get_many([r for r in ident.roles if r in doc["roles"]])
        decision = route_decision(roles, doc, route)
        if not decision:
            await self._cert_refused(context, name, source, route, decision.reason,
                                     f"{decision.reason}: ask an administrator for a role that allows it")

        session_end = caller.cert.not_valid_after_utc
        now = dt.datetime.now(dt.UTC)
        remaining = (session_end - now).total_seconds()
        if remaining < 1:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "your session has expired: log in again (cgate login)")
        ttl = min(requested or remaining, remaining)
        end = min(session_end, now + dt.timedelta(seconds=ttl))
        db_ident = types_pb2.Identity(name=name, roles=[r.name for r in roles], db_users=doc["db_users"],
                                      db_names=doc["db_names"], route=route, login_ip=ident.login_ip)
        cert = self.state.sign_user(csr.public_key(), db_ident, dt.timedelta(seconds=ttl), not_after=end)
        expires = cert.not_valid_after_utc.timestamp()
        await self.audit.emit("user.cert.database", name, source, user=name, database=route.service_name,
                              db_user=route.db_user, db_name=route.db_name or None,
                              ttl_seconds=round(expires - time.time()))
        auth_metrics.default().database_cert(True)
        return user_service_pb2.GenerateDatabaseCertResponse(
            cert_pem=cert_to_pem(cert).decode(), user_ca_pem=self.state.user_ca.cert_pem.decode(),
            host_ca_pem=self.state.host_ca.cert_pem.decode(), expire_time=ts(expires))

    async def _cert_refused(self, context, name, source, route, reason, message):
        await self.audit.emit("user.cert.database", name, source, success=False, error=reason, user=name,
                              database=route.service_name, db_user=route.db_user, db_name=route.db_name or None)
        auth_metrics.default().database_cert(False, reason if reason in ("user does not exist", "user locked")
                                             else "denied")
        await context.abort(grpc.StatusCode.PERMISSION_DENIED, message)


def route_decision(roles: list[rbac.Role], doc: dict, route: types_pb2.RouteToDatabase) -> rbac.Decision:
    """Whether the roles allow this db user (and logical database) on some database.

    The database's labels are not known here (the registry belongs to another component), so
    label selectors are left out: an allow block with any labels counts as selecting the
    database, and a deny block counts only when it applies to every database. dbproxy checks the
    full route, labels included, on every connection."""
    relaxed = []
    for r in roles:
        allow = r.allow.model_copy(update={"db_labels": {rbac.WILDCARD: [rbac.WILDCARD]}}) if r.allow.db_labels else r.allow
        deny = r.deny.model_copy(update={"db_labels": {}, "db_users": [], "db_names": [], "db_commands": []}) \
            if r.deny.db_labels else r.deny
        relaxed.append(r.model_copy(update={"allow": allow, "deny": deny}))
    rs = rbac.RoleSet(relaxed, {"db_users": doc["db_users"], "db_names": doc["db_names"]})
    return rs.check_database(route.service_name, {}, route.db_user, route.db_name or None)


def _valid_base32(secret: str) -> bool:
    import base64
    import binascii

    try:
        base64.b32decode(secret + "=" * (-len(secret) % 8))
        return True
    except (binascii.Error, ValueError):
        return False


def totp_counter(secret: str, code: str, now: float | None = None) -> int | None:
    """The time step (current, or one either side for clock skew) whose code this is; None if none."""
    code = (code or "").strip().replace(" ", "")
    if not code.isdigit():
        return None
    totp = pyotp.TOTP(secret, interval=TOTP_STEP)
    now = time.time() if now is None else now
    step = int(now // TOTP_STEP)
    for counter in (step, step - 1, step + 1):
        if hmac.compare_digest(totp.generate_otp(counter), code):
            return counter
    return None
