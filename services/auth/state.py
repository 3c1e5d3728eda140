"""Auth's core: the cluster's CAs, join tokens and host certificates."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import secrets
import socket
import time
import uuid
from pathlib import Path

from cachegate.types.v1 import types_pb2
from services.auth.audit import AuditLog
from services.auth.backend import Backend
from services.common import identity as idmod
from services.common.config import Config
from services.common.creds import Creds, internal_name, write_private
from services.common.grpcutil import ts
from services.common.join import local_addresses
from services.common.pki import CertAuthority, cert_from_pem, cert_to_pem, key_from_pem, key_to_pem, load_csr, new_key, split_addresses

log = logging.getLogger("cachegate.auth")

ADMIN_USER = "cachegate-admin"
ADMIN_IDENTITY_FILE = "admin-identity.pem"
ADMIN_IDENTITY_TTL = dt.timedelta(hours=24)


class TokenError(Exception):
    """A join token was refused; the message says why and what to do."""


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def token_id(token_or_hash: str, is_hash: bool = False) -> str:
    h = token_or_hash if is_hash else token_hash(token_or_hash)
    return h[:12]


class AuthState:
    def __init__(self, cfg: Config, backend: Backend):
        self.cfg = cfg
        self.acfg = cfg.auth_service
        self.backend = backend
        self.dir = cfg.service_dir("auth")
        self.cluster_name = ""
        self.host_ca: CertAuthority | None = None
        self.user_ca: CertAuthority | None = None
        self.audit: AuditLog | None = None
        self.creds: Creds | None = None

    # --- start-up ------------------------------------------------------------------
    async def init(self) -> None:
        name_item = await self.backend.get("cluster/name")
        if name_item is None:
            name = self.acfg.cluster_name or socket.gethostname()
            await self.backend.create("cluster/name", name.encode())
            name_item = await self.backend.get("cluster/name")
        self.cluster_name = name_item.value.decode()
        if self.acfg.cluster_name and self.acfg.cluster_name != self.cluster_name:
            log.warning("cluster_name in config differs from the stored one; keeping the stored name",
                        extra={"stored": self.cluster_name, "config": self.acfg.cluster_name})
        self.host_ca = await self._load_or_create_ca("host")
        self.user_ca = await self._load_or_create_ca("user")
        self.audit = AuditLog(self.backend, self.cluster_name)
        self.creds = self._own_creds()

    async def _load_or_create_ca(self, kind: str) -> CertAuthority:
        key = f"authorities/{kind}"
        item = await self.backend.get(key)
        if item is None:
            ca = CertAuthority.create(f"{self.cluster_name} {kind} CA", "Cachegate")
            doc = {"cert_pem": ca.cert_pem.decode(), "key_pem": key_to_pem(ca.key).decode()}
            if await self.backend.create(key, json.dumps(doc).encode()):
                log.info("created certificate authority", extra={"ca": kind, "pin": ca.pin})
            item = await self.backend.get(key)
        doc = json.loads(item.value)
        return CertAuthority(cert_from_pem(doc["cert_pem"]), key_from_pem(doc["key_pem"].encode()))

    def _own_creds(self) -> Creds:
        host_id_file = self.dir / "host_id"
        if host_id_file.exists():
            host_id = host_id_file.read_text().strip()
        else:
            host_id = str(uuid.uuid4())
            write_private(host_id_file, host_id.encode())
        key = new_key()
        extra = [self.acfg.listen_addr, self.acfg.join_listen_addr, *self.acfg.public_addrs]
        cert = self.sign_host(key.public_key(), host_id, types_pb2.SERVICE_ROLE_AUTH, local_addresses(*extra))
        return Creds(key_pem=key_to_pem(key), cert_pem=cert_to_pem(cert), host_ca_pem=self.host_ca.cert_pem,
                     user_ca_pem=self.user_ca.cert_pem)

    # --- certificates ----------------------------------------------------------------
    def sign_host(self, public_key, host_id: str, role: int, addresses: list[str]):
        dns, ips = split_addresses(addresses)
        dns = [internal_name(idmod.role_name(role)), host_id, *dns]
        ident = types_pb2.Identity(kind=types_pb2.IDENTITY_KIND_HOST, name=host_id, service_role=role,
                                   cluster_name=self.cluster_name, issued_at=ts(time.time()))
        return self.host_ca.sign(public_key, host_id, ident, dt.timedelta(seconds=self.acfg.host_cert_ttl),
                                 dns_names=list(dict.fromkeys(dns)), ips=list(dict.fromkeys(ips)), server=True)

    def sign_user(self, public_key, ident: types_pb2.Identity, ttl: dt.timedelta,
                  not_after: dt.datetime | None = None):
        """A user certificate valid for ``ttl``; ``not_after`` (optional) fixes its exact end."""
        ident.kind = types_pb2.IDENTITY_KIND_USER
        ident.cluster_name = self.cluster_name
        ident.issued_at.CopyFrom(ts(time.time()))
        return self.user_ca.sign(public_key, ident.name, ident, ttl, not_after=not_after)

    def write_admin_identity(self) -> Path:
        """The local administrator's identity (editor role), readable by its owner only."""
        key = new_key()
        ident = types_pb2.Identity(name=ADMIN_USER, roles=["editor"])
        cert = self.sign_user(key.public_key(), ident, ADMIN_IDENTITY_TTL)
        creds = Creds(key_pem=key_to_pem(key), cert_pem=cert_to_pem(cert), host_ca_pem=self.host_ca.cert_pem)
        path = self.dir / ADMIN_IDENTITY_FILE
        write_private(path, creds.identity_file_bytes())
        return path

    # --- join tokens -----------------------------------------------------------------
    async def create_token(self, roles: list[int], ttl: float, reusable: bool, actor: str,
                           source: str = "") -> tuple[str, types_pb2.ProvisionToken]:
        if not roles:
            raise TokenError("a token needs a type: --type=db, discovery or proxy")
        token = secrets.token_hex(16)
        h = token_hash(token)
        now = time.time()
        doc = {"id": token_id(h, True), "roles": [int(r) for r in roles], "created": now, "expires": now + ttl,
               "single_use": not reusable, "created_by": actor, "used_at": None}
        await self.backend.put(f"tokens/{h}", json.dumps(doc).encode(), expires=now + ttl)
        await self.audit.emit("join.token.create", actor, source, token_id=doc["id"],
                              roles=[idmod.role_name(r) for r in roles], ttl_seconds=ttl)
        return token, self._token_proto(doc)

    @staticmethod
    def _token_proto(doc: dict) -> types_pb2.ProvisionToken:
        return types_pb2.ProvisionToken(id=doc["id"], roles=doc["roles"], expire_time=ts(doc["expires"]),
                                        create_time=ts(doc["created"]), single_use=doc["single_use"],
                                        created_by=doc.get("created_by", ""))

    async def list_tokens(self) -> list[types_pb2.ProvisionToken]:
        out = []
        for item in await self.backend.list("tokens/"):
            doc = json.loads(item.value)
            if doc.get("used_at"):
                continue
            out.append(self._token_proto(doc))
        return sorted(out, key=lambda t: t.id)

    async def delete_token(self, id_or_token: str, actor: str, source: str = "") -> None:
        id_or_token = id_or_token.strip()
        candidates = [token_hash(id_or_token)]
        for item in await self.backend.list("tokens/"):
            if item.key[len("tokens/"):].startswith(id_or_token.lower()) and len(id_or_token) >= 8:
                candidates.append(item.key[len("tokens/"):])
        for h in candidates:
            if await self.backend.delete(f"tokens/{h}"):
                await self.audit.emit("join.token.delete", actor, source, token_id=token_id(h, True))
                return
        raise KeyError(f"no join token {id_or_token!r}: see `cgctl tokens ls`")

    async def consume_token(self, token: str, role: int) -> dict:
        """Check a join token for ``role`` and use it up. Raises TokenError."""
        h = token_hash(token)
        item = await self.backend.get(f"tokens/{h}")
        again = "create a new one with `cgctl tokens add --type=db`"
        if item is None:
            # Expired items are not returned; say so when we can tell.
            raise TokenError(f"the join token is not valid (unknown, deleted or expired): {again}")
        doc = json.loads(item.value)
        used_roles = doc.get("used_roles", [])
        if doc.get("used_at") or role in used_roles:
            raise TokenError(f"the join token was already used (tokens are single use): {again}")
        if doc["expires"] <= time.time():
            raise TokenError(f"the join token expired: {again}")
        if role not in doc["roles"]:
            have = ", ".join(idmod.role_name(r) for r in doc["roles"])
            want = {types_pb2.SERVICE_ROLE_DISCOVERY: "discovery", types_pb2.SERVICE_ROLE_DBPROXY: "proxy"}.get(role, "db")
            raise TokenError(f"the join token is for {have}, not {idmod.role_name(role)}: "
                             f"create one with `cgctl tokens add --type={want}`")
        if doc["single_use"]:
            # Single use per service role: a --type=db token joins one discovery and one
            # dbproxy (the guide's database host runs both), each once.
            used_roles = sorted(set(used_roles) | {role})
            used = dict(doc, used_roles=used_roles)
            if set(used_roles) >= set(doc["roles"]):
                used["used_at"] = time.time()
            if not await self.backend.compare_and_swap(item.key, item.value, json.dumps(used).encode(),
                                                       expires=item.expires):
                raise TokenError(f"the join token was already used (tokens are single use): {again}")
        return doc

    async def join(self, token: str, role: int, csr_pem: str, addresses: list[str], source: str):
        if role not in (types_pb2.SERVICE_ROLE_DISCOVERY, types_pb2.SERVICE_ROLE_DBPROXY):
            raise TokenError("role must be discovery or dbproxy")
        csr = load_csr(csr_pem)
        try:
            doc = await self.consume_token(token, role)
        except TokenError as exc:
            await self.audit.emit("join", "", source, success=False, error=str(exc), role=idmod.role_name(role))
            raise
        host_id = str(uuid.uuid4())
        cert = self.sign_host(csr.public_key(), host_id, role, addresses)
        await self.audit.emit("join", host_id, source, role=idmod.role_name(role), token_id=doc["id"])
        return host_id, cert
