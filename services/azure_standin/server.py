"""A local HTTPS stand-in for Azure Resource Manager and Microsoft Entra ID.

It answers the exact calls the Azure SDK makes for Azure Cache for Redis and Azure Redis
Enterprise discovery (list / get / listKeys, paged with ``nextLink``), the Entra ID token
endpoint (client credentials), and managed identity (IMDS and the App Service form). It is
for tests and the local dev cluster only; it listens on loopback.

Usage from Python::

    standin = AzureStandin(config)             # or AzureStandin.from_yaml("state.yaml")
    await standin.start()                      # https://127.0.0.1:<port>
    RedisManagementClient(cred, sub, base_url=standin.base_url, connection_verify=standin.ca_file)
    await standin.stop()
"""

from __future__ import annotations

import asyncio
import base64
import fnmatch
import hashlib
import hmac
import ipaddress
import json
import logging
import re
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from .entra_redis import REDIS_AUDIENCE, EntraRedisEnforcer, IssuedToken, TokenBook
from .state import (
    Cache,
    EnterpriseCluster,
    EnterpriseDatabase,
    Keys,
    ServicePrincipal,
    StandinConfig,
    Subscription,
    load_config,
    load_example,
    new_key,
)
from .tls import CertBundle, generate_certs

log = logging.getLogger("cachegate.azure_standin")

ARM_AUDIENCES = {"https://management.azure.com", "https://management.core.windows.net"}
KNOWN_RESOURCES = ARM_AUDIENCES | {"https://redis.azure.com"}
SUBSCRIPTIONS_API_VERSION = "2022-12-01"

from services.common.azure import (  # noqa: E402 (the actions Azure checks, by the names Azure uses)
    ACTION_DATABASES_KEYS, ACTION_DATABASES_READ, ACTION_ENTERPRISE_READ, ACTION_REDIS_KEYS, ACTION_REDIS_READ,
)


@dataclass
class Fault:
    """An injected failure: the next ``count`` requests whose path matches ``pattern``
    (fnmatch glob, case-insensitive; ``*`` spans ``/``) get ``status``. ``count=None`` = forever."""

    pattern: str
    status: int
    count: int | None = 1
    retry_after: float | None = None
    action: str | None = None
    method: str | None = None
    code: str | None = None
    message: str | None = None
    # Seconds to wait before answering (a slow or hung Azure): with status 0 the request is
    # then served normally, else it gets ``status``.
    delay: float = 0.0
    hits: int = 0

    def matches(self, method: str, path: str) -> bool:
        if self.method and self.method.upper() != method.upper():
            return False
        return fnmatch.fnmatchcase(path.lower(), self.pattern.lower())


@dataclass
class SeenRequest:
    method: str
    path: str
    query: dict[str, str]
    status: int = 0
    at: float = field(default_factory=time.monotonic)


class _ArmError(Exception):
    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _b64url_decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _is_loopback(remote: str | None) -> bool:
    if not remote:
        return False
    try:
        return ipaddress.ip_address(remote.split("%")[0]).is_loopback
    except ValueError:
        return False


def _host_for_url(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


_SUB = r"/subscriptions/(?P<sub>[^/]+)"
_RG = _SUB + r"/resourcegroups/(?P<rg>[^/]+)/providers/microsoft\.cache"


def _signing_key(path: Path | None) -> rsa.RSAPrivateKey:
    """The token signing key: read from ``path`` when it holds one, else made (and kept there)."""
    if path is not None and path.exists():
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        if isinstance(key, rsa.RSAPrivateKey):
            return key
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    if path is not None:
        from services.common.creds import write_private

        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        write_private(path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                              serialization.NoEncryption()))
    return key


class AzureStandin:
    """ARM + Entra ID + managed identity on loopback, with fault injection for tests."""

    def __init__(
        self,
        config: StandinConfig | None = None,
        *,
        ca_file: str | Path | None = None,
        examples_dir: str | Path | None = None,
        keep_dir: str | Path | None = None,
    ) -> None:
        self.config = config or StandinConfig()
        self._ca_out = Path(ca_file) if ca_file else None
        self._tmpdir: tempfile.TemporaryDirectory[str] | None = None
        self._runner: web.AppRunner | None = None
        self._imds_runner: web.AppRunner | None = None
        self._certs: CertBundle | None = None
        # Tokens are RS256 JWTs signed with a key made here (its public half at .../keys).
        # keep_dir: the signing key and the tokens issued outlive the process (0600 files), so
        # that a restarted stand-in accepts the tokens its clients hold.
        keep = Path(keep_dir) if keep_dir else None
        self._signing_key = _signing_key(keep / "signing-key.pem" if keep else None)
        self._kid = hashlib.sha256(self._signing_key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)).hexdigest()[:16]
        self.token_book = TokenBook(keep / "tokens.jsonl" if keep else None)
        self.entra_redis: EntraRedisEnforcer | None = None
        self.faults: list[Fault] = []
        self.requests: list[SeenRequest] = []
        self.tokens_issued: list[dict[str, Any]] = []
        self.denied_actions: set[str] = {a.lower() for a in self.config.denied_actions}
        # (METHOD, lowercased path) -> response body served as published
        self.example_responses: dict[tuple[str, str], Any] = {}
        self.host = "127.0.0.1"
        self.port = 0
        self.imds_port = 0
        self.ca_file = ""
        self._routes = self._build_routes()
        ex_dir = examples_dir or self.config.examples_dir
        if ex_dir:
            self.load_examples(ex_dir)

    # ----------------------------------------------------------------- construction
    @classmethod
    def from_yaml(cls, path: str | Path, **kwargs: Any) -> AzureStandin:
        return cls(load_config(path), **kwargs)

    # ----------------------------------------------------------------- lifecycle
    async def start(self, host: str = "127.0.0.1", port: int = 0, imds_port: int = 0) -> AzureStandin:
        """Start the HTTPS listener (ARM, Entra ID, IMDS) and a plain-http listener for managed
        identity (IMDS and App Service form; real IMDS is plain http too)."""
        self.host = host
        self._certs = generate_certs()
        if self._ca_out is None:
            self._tmpdir = tempfile.TemporaryDirectory(prefix="azure-standin-")
            self._ca_out = Path(self._tmpdir.name, "ca.pem")
        self._ca_out.parent.mkdir(parents=True, exist_ok=True)
        self._ca_out.write_bytes(self._certs.ca_pem)
        self.ca_file = str(self._ca_out)

        app = web.Application(client_max_size=1 << 20)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port, ssl_context=self._certs.server_ssl_context())
        await site.start()
        self.port = self._bound_port(self._runner)

        imds = web.Application()
        imds.router.add_route("*", "/{tail:.*}", self._handle_imds_only)
        self._imds_runner = web.AppRunner(imds, access_log=None, handle_signals=False)
        await self._imds_runner.setup()
        await web.TCPSite(self._imds_runner, host, imds_port).start()
        self.imds_port = self._bound_port(self._imds_runner)
        if self.config.entra_redis.servers:
            self.entra_redis = EntraRedisEnforcer(self.config.entra_redis, self.token_book, self.principal_oids)
            await self.entra_redis.start()
        log.info("azure stand-in listening on %s (imds %s)", self.base_url, self.imds_url)
        return self

    @staticmethod
    def _bound_port(runner: web.AppRunner) -> int:
        for addr in runner.addresses:
            if isinstance(addr, tuple):
                return int(addr[1])
        raise RuntimeError("stand-in did not bind")

    async def stop(self) -> None:
        if self.entra_redis is not None:
            await self.entra_redis.stop()
            self.entra_redis = None
        for runner in (self._runner, self._imds_runner):
            if runner is not None:
                await runner.cleanup()
        self._runner = self._imds_runner = None
        if self._tmpdir is not None:
            self._tmpdir.cleanup()
            self._tmpdir = None

    async def __aenter__(self) -> AzureStandin:
        if self._runner is None:
            await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # ----------------------------------------------------------------- addresses
    @property
    def base_url(self) -> str:
        """ARM base URL (``base_url=`` of the management clients)."""
        return f"https://{_host_for_url(self.host)}:{self.port}"

    @property
    def authority_host(self) -> str:
        """Entra ID authority (``authority=`` / AZURE_AUTHORITY_HOST)."""
        return self.base_url

    @property
    def imds_url(self) -> str:
        """Plain-http IMDS authority for AZURE_POD_IDENTITY_AUTHORITY_HOST."""
        return f"http://{_host_for_url(self.host)}:{self.imds_port}"

    @property
    def identity_endpoint(self) -> str:
        """IDENTITY_ENDPOINT for the App Service managed identity form."""
        return f"{self.imds_url}/msi/token"

    @property
    def identity_header(self) -> str:
        return self.config.managed_identity.identity_header

    @property
    def tenant(self) -> str:
        return self.config.tenant

    def env_for_client_secret(self, index: int = 0) -> dict[str, str]:
        """Environment for EnvironmentCredential / DefaultAzureCredential with a client secret."""
        sp = self.config.client_credentials[index]
        return {
            "AZURE_TENANT_ID": self.tenant,
            "AZURE_CLIENT_ID": sp.client_id,
            "AZURE_CLIENT_SECRET": sp.client_secret,
            "AZURE_AUTHORITY_HOST": self.authority_host,
        }

    def describe(self) -> dict[str, Any]:
        return {
            "base_url": self.base_url,
            "authority_host": self.authority_host,
            "ca_file": self.ca_file,
            "tenant": self.tenant,
            "imds_url": self.imds_url,
            "identity_endpoint": self.identity_endpoint,
            "identity_header": self.identity_header,
            "port": self.port,
            "imds_port": self.imds_port,
        }

    # ----------------------------------------------------------------- state mutation
    def add_subscription(self, subscription_id: str, display_name: str = "") -> Subscription:
        existing = self._subscription(subscription_id)
        if existing:
            if display_name:
                existing.display_name = display_name
            return existing
        sub = Subscription(id=subscription_id, display_name=display_name or f"Subscription {subscription_id[:8]}")
        self.config.subscriptions.append(sub)
        return sub

    def remove_subscription(self, subscription_id: str) -> None:
        self.config.subscriptions = [s for s in self.config.subscriptions if s.id.lower() != subscription_id.lower()]

    def add_service_principal(self, client_id: str, client_secret: str, object_id: str | None = None) -> ServicePrincipal:
        sp = ServicePrincipal(client_id=client_id, client_secret=client_secret, object_id=object_id)
        self.config.client_credentials = [p for p in self.config.client_credentials if p.client_id != client_id]
        self.config.client_credentials.append(sp)
        return sp

    def principal_oids(self) -> set[str]:
        """Object ids of every principal of the state (the ACL users of Entra ID caches)."""
        oids = {sp.oid() for sp in self.config.client_credentials}
        oids.add(self.config.managed_identity.oid())
        return oids

    def issued_token_values(self, aud: str | None = None) -> list[str]:
        """Every token issued so far (tests grep the services' output for them)."""
        return [t.value for t in self.token_book.tokens if aud is None or t.aud == aud]

    def set_token_lifetime(self, seconds: int | None = None, redis_seconds: int | None = None) -> None:
        if seconds is not None:
            self.config.token_lifetime = max(1, int(seconds))
        self.config.redis_token_lifetime = max(1, int(redis_seconds)) if redis_seconds else None

    def set_managed_identity(self, enabled: bool = True, client_id: str | None = None) -> None:
        self.config.managed_identity.enabled = enabled
        if client_id:
            self.config.managed_identity.client_id = client_id

    def add_cache(self, cache: Cache | None = None, /, **spec: Any) -> Cache:
        """Add or replace a Microsoft.Cache/redis resource (keyword arguments as in the YAML)."""
        c = cache or Cache.model_validate(spec)
        self.add_subscription(c.subscription)
        self.config.caches = [x for x in self.config.caches if x.resource_id.lower() != c.resource_id.lower()]
        self.config.caches.append(c)
        return c

    def update_cache(self, name: str, *, subscription: str | None = None, resource_group: str | None = None, **changes: Any) -> Cache:
        c = self.find_cache(name, subscription=subscription, resource_group=resource_group)
        data = c.model_dump()
        data.update(_snake(changes))
        new = Cache.model_validate(data)
        idx = self.config.caches.index(c)
        self.config.caches[idx] = new
        return new

    def remove_cache(self, name: str, *, subscription: str | None = None, resource_group: str | None = None) -> None:
        c = self.find_cache(name, subscription=subscription, resource_group=resource_group)
        self.config.caches.remove(c)

    def find_cache(self, name: str, *, subscription: str | None = None, resource_group: str | None = None) -> Cache:
        found = [
            c
            for c in self.config.caches
            if c.name.lower() == name.lower()
            and (subscription is None or c.subscription.lower() == subscription.lower())
            and (resource_group is None or c.resource_group.lower() == resource_group.lower())
        ]
        if len(found) != 1:
            raise KeyError(f"{len(found)} caches named {name!r}; give subscription/resource_group")
        return found[0]

    def add_enterprise_cluster(self, cluster: EnterpriseCluster | None = None, /, **spec: Any) -> EnterpriseCluster:
        c = cluster or EnterpriseCluster.model_validate(spec)
        self.add_subscription(c.subscription)
        self.config.enterprise_clusters = [
            x for x in self.config.enterprise_clusters if x.resource_id.lower() != c.resource_id.lower()
        ]
        self.config.enterprise_clusters.append(c)
        return c

    def update_enterprise_cluster(self, name: str, *, subscription: str | None = None, resource_group: str | None = None, **changes: Any) -> EnterpriseCluster:
        c = self.find_enterprise_cluster(name, subscription=subscription, resource_group=resource_group)
        data = c.model_dump()
        data.update(_snake(changes))
        new = EnterpriseCluster.model_validate(data)
        self.config.enterprise_clusters[self.config.enterprise_clusters.index(c)] = new
        return new

    def remove_enterprise_cluster(self, name: str, *, subscription: str | None = None, resource_group: str | None = None) -> None:
        c = self.find_enterprise_cluster(name, subscription=subscription, resource_group=resource_group)
        self.config.enterprise_clusters.remove(c)

    def find_enterprise_cluster(self, name: str, *, subscription: str | None = None, resource_group: str | None = None) -> EnterpriseCluster:
        found = [
            c
            for c in self.config.enterprise_clusters
            if c.name.lower() == name.lower()
            and (subscription is None or c.subscription.lower() == subscription.lower())
            and (resource_group is None or c.resource_group.lower() == resource_group.lower())
        ]
        if len(found) != 1:
            raise KeyError(f"{len(found)} Enterprise clusters named {name!r}; give subscription/resource_group")
        return found[0]

    def add_enterprise_database(self, cluster: str, database: EnterpriseDatabase | None = None, /, **spec: Any) -> EnterpriseDatabase:
        c = self.find_enterprise_cluster(cluster)
        db = database or EnterpriseDatabase.model_validate(spec)
        c.databases = [d for d in c.databases if d.name.lower() != db.name.lower()] + [db]
        return db

    def update_enterprise_database(self, cluster: str, database: str = "default", **changes: Any) -> EnterpriseDatabase:
        c = self.find_enterprise_cluster(cluster)
        db = c.database(database)
        if db is None:
            raise KeyError(f"no database {database!r} in {cluster!r}")
        data = db.model_dump()
        data.update(_snake(changes))
        new = EnterpriseDatabase.model_validate(data)
        c.databases[c.databases.index(db)] = new
        return new

    def remove_enterprise_database(self, cluster: str, database: str = "default") -> None:
        c = self.find_enterprise_cluster(cluster)
        c.databases = [d for d in c.databases if d.name.lower() != database.lower()]

    def _keys_holder(self, resource: str) -> tuple[str, Any]:
        """Find by resource id, cache name, or ``cluster/database`` / cluster name."""
        rid = resource.lower().rstrip("/")
        for c in self.config.caches:
            if c.resource_id.lower() == rid:
                return c.resource_id, c
        for cl in self.config.enterprise_clusters:
            for db in cl.databases:
                if cl.database_id(db).lower() == rid:
                    return cl.database_id(db), db
        if "/" not in resource.strip("/") or resource.count("/") == 1:
            caches = [c for c in self.config.caches if c.name.lower() == rid]
            if len(caches) == 1:
                return caches[0].resource_id, caches[0]
            cluster_name, _, db_name = rid.partition("/")
            clusters = [c for c in self.config.enterprise_clusters if c.name.lower() == cluster_name]
            if len(clusters) == 1:
                db = clusters[0].database(db_name or "default")
                if db is not None:
                    return clusters[0].database_id(db), db
        raise KeyError(f"no cache or Enterprise database {resource!r}")

    def get_keys(self, resource: str) -> Keys:
        return self._keys_holder(resource)[1].keys

    def set_keys(self, resource: str, primary: str | None = None, secondary: str | None = None) -> Keys:
        """Rotate keys of a cache or Enterprise database (resource id or name). A key left
        out is regenerated when both are left out; otherwise it is kept."""
        _, holder = self._keys_holder(resource)
        if primary is None and secondary is None:
            primary, secondary = new_key(), new_key()
        holder.keys = Keys(
            primary=primary if primary is not None else holder.keys.primary,
            secondary=secondary if secondary is not None else holder.keys.secondary,
        )
        return holder.keys

    def set_page_size(self, n: int) -> None:
        self.config.page_size = max(1, int(n))

    def deny_action(self, action: str) -> None:
        self.denied_actions.add(action.lower())

    def allow_action(self, action: str) -> None:
        self.denied_actions.discard(action.lower())

    def inject_fault(
        self,
        pattern: str,
        status: int,
        count: int | None = 1,
        *,
        retry_after: float | None = None,
        action: str | None = None,
        method: str | None = None,
        code: str | None = None,
        message: str | None = None,
        delay: float = 0.0,
    ) -> Fault:
        """Answer the next ``count`` matching requests with ``status`` (500, 429 + Retry-After,
        403 AuthorizationFailed naming ``action`` ...), after ``delay`` seconds; status 0 with a
        delay: answer normally, late (a timeout for a client that waits less). Patterns are
        fnmatch globs over the path, e.g. ``*/providers/Microsoft.Cache/redis``."""
        f = Fault(pattern, status, count, retry_after, action, method, code, message, delay)
        self.faults.append(f)
        return f

    def clear_faults(self) -> None:
        self.faults.clear()

    def request_count(self, pattern: str = "*", method: str | None = None) -> int:
        """How many requests whose path matches ``pattern`` (glob, case-insensitive) were seen."""
        p = pattern.lower()
        return sum(
            1
            for r in self.requests
            if fnmatch.fnmatchcase(r.path.lower(), p) and (method is None or r.method == method.upper())
        )

    def reset_requests(self) -> None:
        self.requests.clear()

    def load_examples(self, directory: str | Path) -> list[str]:
        """Serve Azure's published example responses (as they are) for their list/get/listKeys
        calls. Their subscriptions are added. Returns the files used."""
        used = []
        for p in sorted(Path(directory).glob("*.json")):
            loaded = load_example(p)
            if loaded is None:
                continue
            method, path, sub, body = loaded
            self.example_responses[(method, path.lower())] = body
            if sub:
                self.add_subscription(sub, f"Example {sub[:8]}")
            used.append(p.name)
        return used

    # ----------------------------------------------------------------- tokens
    def issue_token(self, resource: str, *, oid: str, appid: str, lifetime: int | None = None) -> tuple[str, int]:
        """A signed JWT (RS256) for ``resource``; its lifetime is ``token_lifetime`` seconds
        (``redis_token_lifetime`` for https://redis.azure.com) unless given."""
        now_f = time.time()
        now = int(now_f)
        if lifetime is None:
            lifetime = self.config.token_lifetime
            if resource.rstrip("/") == REDIS_AUDIENCE and self.config.redis_token_lifetime:
                lifetime = self.config.redis_token_lifetime
        exp = now + int(lifetime)
        claims = {
            "aud": resource,
            "iss": f"{self.authority_host}/{self.tenant}/v2.0",
            "iat": now,
            "nbf": now,
            "exp": exp,
            "oid": oid,
            "sub": oid,
            "tid": self.tenant,
            "appid": appid,
            "azp": appid,
            "idtyp": "app",
            "ver": "2.0",
            "uti": uuid.uuid4().hex,
        }
        header = {"alg": "RS256", "typ": "JWT", "kid": self._kid}
        signing_input = _b64url(json.dumps(header).encode()) + "." + _b64url(json.dumps(claims).encode())
        sig = self._signing_key.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
        token = signing_input + "." + _b64url(sig)
        self.tokens_issued.append({"aud": resource, "oid": oid, "appid": appid, "iat": now, "exp": exp})
        self.token_book.add(IssuedToken(oid=oid, aud=resource.rstrip("/"), issued=now_f, exp=exp, value=token))
        return token, exp

    async def _token_usable(self, token: str) -> None:
        """A Redis token works on the data plane before the caller has it."""
        if self.entra_redis is not None:
            for t in reversed(self.token_book.tokens):
                if t.value == token:
                    await self.entra_redis.wait_token_usable(t)
                    break

    def jwks(self) -> dict[str, Any]:
        pub = self._signing_key.public_key().public_numbers()

        def b64int(n: int) -> str:
            return _b64url(n.to_bytes((n.bit_length() + 7) // 8, "big"))

        return {"keys": [{"kty": "RSA", "use": "sig", "alg": "RS256", "kid": self._kid, "n": b64int(pub.n),
                          "e": b64int(pub.e)}]}

    def verify_token(self, token: str, audiences: set[str] | None = None) -> dict[str, Any]:
        """Claims of a token this stand-in issued; ValueError when invalid, expired or for
        another audience."""
        try:
            head, body, sig = token.split(".")
            self._signing_key.public_key().verify(_b64url_decode(sig), f"{head}.{body}".encode(),
                                                  padding.PKCS1v15(), hashes.SHA256())
        except ValueError as exc:
            raise ValueError("malformed token") from exc
        except Exception as exc:  # InvalidSignature
            raise ValueError("bad signature") from exc
        claims = json.loads(_b64url_decode(body))
        if claims.get("exp", 0) < time.time():
            raise ValueError("expired")
        if audiences is not None and str(claims.get("aud", "")).rstrip("/") not in audiences:
            raise ValueError(f"audience {claims.get('aud')!r} not accepted")
        return claims

    # ----------------------------------------------------------------- HTTP plumbing
    def _build_routes(self) -> list[tuple[str, re.Pattern[str], Callable[..., Awaitable[web.StreamResponse]], str | None]]:
        r = [
            ("GET", r"/subscriptions/?", self._list_subscriptions, None),
            ("GET", _SUB + r"/?", self._get_subscription, None),
            ("GET", _SUB + r"/providers/microsoft\.cache/redis/?", self._list_caches, ACTION_REDIS_READ),
            ("GET", _RG + r"/redis/?", self._list_caches, ACTION_REDIS_READ),
            ("GET", _RG + r"/redis/(?P<name>[^/]+)/?", self._get_cache, ACTION_REDIS_READ),
            ("POST", _RG + r"/redis/(?P<name>[^/]+)/listkeys/?", self._cache_keys, ACTION_REDIS_KEYS),
            ("GET", _SUB + r"/providers/microsoft\.cache/redisenterprise/?", self._list_clusters, ACTION_ENTERPRISE_READ),
            ("GET", _RG + r"/redisenterprise/?", self._list_clusters, ACTION_ENTERPRISE_READ),
            ("GET", _RG + r"/redisenterprise/(?P<cluster>[^/]+)/?", self._get_cluster, ACTION_ENTERPRISE_READ),
            ("GET", _RG + r"/redisenterprise/(?P<cluster>[^/]+)/databases/?", self._list_databases, ACTION_DATABASES_READ),
            ("GET", _RG + r"/redisenterprise/(?P<cluster>[^/]+)/databases/(?P<db>[^/]+)/?", self._get_database, ACTION_DATABASES_READ),
            ("POST", _RG + r"/redisenterprise/(?P<cluster>[^/]+)/databases/(?P<db>[^/]+)/listkeys/?", self._database_keys, ACTION_DATABASES_KEYS),
        ]
        return [(m, re.compile("^" + p + "$", re.IGNORECASE), h, a) for m, p, h, a in r]

    async def _handle_imds_only(self, request: web.Request) -> web.StreamResponse:
        seen = self._record(request)
        resp = await self._dispatch_identity(request)
        if resp is None:
            resp = web.json_response({"error": "not_found"}, status=404)
        seen.status = resp.status
        return resp

    def _record(self, request: web.Request) -> SeenRequest:
        seen = SeenRequest(request.method, request.path, dict(request.query))
        self.requests.append(seen)
        if len(self.requests) > 10000:
            del self.requests[:5000]
        return seen

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        seen = self._record(request)
        try:
            resp = await self._handle_inner(request)
        except _ArmError as e:
            resp = web.json_response({"error": {"code": e.code, "message": e.message}}, status=e.status, headers=e.headers)
        except Exception:  # pragma: no cover - a bug in the stand-in
            log.exception("stand-in handler failed")
            resp = web.json_response({"error": {"code": "InternalServerError", "message": "stand-in bug"}}, status=500)
        seen.status = resp.status
        return resp

    async def _handle_inner(self, request: web.Request) -> web.StreamResponse:
        path = request.path
        if path.startswith("/_standin/"):
            if not _is_loopback(request.remote):
                return web.json_response({"error": "control endpoint is loopback-only"}, status=403)
            return await self._control(request)

        ident = await self._dispatch_identity(request)
        if ident is not None:
            return ident

        entra = await self._dispatch_entra(request)
        if entra is not None:
            return entra

        for method, rx, handler, action in self._routes:
            m = rx.match(path)
            if not m or method != request.method:
                continue
            claims = self._authenticate(request)
            if "api-version" not in request.query:
                raise _ArmError(400, "MissingApiVersionParameter", "The api-version query parameter (?api-version=) is required for all requests.")
            scope = self._scope_of(path)
            if not await self._apply_delays(request):
                self._apply_faults(request, claims, action, scope)
            if action and action.lower() in self.denied_actions:
                raise self._authorization_failed(claims, action, scope)
            params = {k: v for k, v in m.groupdict().items()}
            if "sub" in params:
                self._require_subscription(params["sub"])
            example = self.example_responses.get((request.method, path.rstrip("/").lower()))
            if example is not None:
                return web.json_response(example)
            return await handler(request, **params)

        if self._path_looks_like_arm(path):
            self._authenticate(request)
            self._apply_faults(request, None, None, self._scope_of(path))
            raise _ArmError(404, "NotFound", f"The stand-in does not serve {request.method} {path}.")
        return web.json_response({"error": {"code": "NotFound", "message": f"no route for {path}"}}, status=404)

    @staticmethod
    def _path_looks_like_arm(path: str) -> bool:
        return path.lower().startswith("/subscriptions")

    @staticmethod
    def _scope_of(path: str) -> str:
        parts = path.rstrip("/").split("/")
        # trim trailing collection/action words so the scope names the resource
        if parts and parts[-1].lower() in {"listkeys", "databases", "redis", "redisenterprise"}:
            parts = parts[:-1]
        scope = "/".join(parts)
        if scope.lower().endswith("/providers/microsoft.cache"):
            scope = scope[: -len("/providers/Microsoft.Cache")]
        return scope or "/"

    async def _apply_delays(self, request: web.Request) -> bool:
        """Faults with a delay: wait first. One with status 0 is used up here and the request
        is then served as it is (True): it takes no other fault, even one injected while it
        waited (its client has usually given up by then)."""
        for f in list(self.faults):
            if f.delay and f.matches(request.method, request.path) and (f.count is None or f.count > 0):
                late = not f.status
                if late:
                    f.hits += 1
                    if f.count is not None:
                        f.count -= 1
                        if f.count <= 0:
                            self.faults.remove(f)
                await asyncio.sleep(f.delay)
                return late
        return False

    def _apply_faults(self, request: web.Request, claims: dict[str, Any] | None, action: str | None, scope: str) -> None:
        for f in list(self.faults):
            if not f.matches(request.method, request.path):
                continue
            if not f.status or (f.count is not None and f.count <= 0):
                continue
            f.hits += 1
            if f.count is not None:
                f.count -= 1
                if f.count <= 0:
                    self.faults.remove(f)
            headers: dict[str, str] = {}
            if f.retry_after is not None:
                ra = f.retry_after
                headers["Retry-After"] = str(int(ra)) if float(ra).is_integer() else str(ra)
            if f.status == 403:
                err = self._authorization_failed(claims, f.action or action or "unknown", scope)
                if f.message:
                    err.message = f.message
                err.headers.update(headers)
                raise err
            code = f.code or {
                429: "TooManyRequests",
                500: "InternalServerError",
                502: "BadGateway",
                503: "ServiceUnavailable",
                504: "GatewayTimeout",
                404: "ResourceNotFound",
                401: "InvalidAuthenticationToken",
            }.get(f.status, "Error")
            message = f.message or {
                429: "The request is being throttled as the limit has been reached for operation type - Read.",
                500: "The server encountered an internal error. Please retry the request.",
            }.get(f.status, f"Injected failure {f.status}.")
            raise _ArmError(f.status, code, message, headers)

    def _authorization_failed(self, claims: dict[str, Any] | None, action: str, scope: str) -> _ArmError:
        appid = (claims or {}).get("appid", "unknown")
        oid = (claims or {}).get("oid", "unknown")
        return _ArmError(
            403,
            "AuthorizationFailed",
            f"The client '{appid}' with object id '{oid}' does not have authorization to perform action "
            f"'{action}' over scope '{scope}' or the scope is invalid. If access was recently granted, "
            "please refresh your credentials.",
        )

    def _authenticate(self, request: web.Request) -> dict[str, Any]:
        auth = request.headers.get("Authorization", "")
        challenge = {
            "WWW-Authenticate": (
                f'Bearer authorization_uri="{self.authority_host}/{self.tenant}", '
                f'error="invalid_token", error_description="The authentication failed"'
            )
        }
        if not auth:
            raise _ArmError(401, "AuthenticationFailed", "Authentication failed. The 'Authorization' header is missing.", challenge)
        scheme, _, token = auth.partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise _ArmError(401, "AuthenticationFailedInvalidHeader", "Authentication failed. The 'Authorization' header is provided in an invalid format.", challenge)
        try:
            return self.verify_token(token.strip(), ARM_AUDIENCES)
        except ValueError as e:
            code = "ExpiredAuthenticationToken" if str(e) == "expired" else "InvalidAuthenticationToken"
            raise _ArmError(401, code, f"The access token is invalid ({e}).", challenge) from None

    def _subscription(self, sub_id: str) -> Subscription | None:
        for s in self.config.subscriptions:
            if s.id.lower() == sub_id.lower():
                return s
        return None

    def _require_subscription(self, sub_id: str) -> Subscription:
        s = self._subscription(sub_id)
        if s is None:
            raise _ArmError(404, "SubscriptionNotFound", f"The subscription '{sub_id}' could not be found.")
        return s

    def _require_group(self, sub: str, rg: str) -> None:
        known = {f"{c.subscription}/{c.resource_group}".lower() for c in self.config.caches}
        known |= {f"{c.subscription}/{c.resource_group}".lower() for c in self.config.enterprise_clusters}
        known |= {g.lower() for g in self.config.resource_groups}
        if f"{sub}/{rg}".lower() not in known:
            raise _ArmError(404, "ResourceGroupNotFound", f"Resource group '{rg}' could not be found.")

    def _page(self, request: web.Request, items: list[Any]) -> web.Response:
        try:
            start = int(request.query.get("$skiptoken", "0"))
        except ValueError:
            raise _ArmError(400, "InvalidSkipToken", "The skip token is invalid.") from None
        size = self.config.page_size
        chunk = items[start : start + size]
        body: dict[str, Any] = {"value": chunk}
        if start + size < len(items):
            q = dict(request.query)
            q["$skiptoken"] = str(start + size)
            query = "&".join(f"{k}={v}" for k, v in q.items())
            body["nextLink"] = f"{self.base_url}{request.path}?{query}"
        return web.json_response(body)

    # ----------------------------------------------------------------- ARM handlers
    async def _list_subscriptions(self, request: web.Request) -> web.Response:
        subs = [
            {
                "id": f"/subscriptions/{s.id}",
                "subscriptionId": s.id,
                "tenantId": self.tenant,
                "displayName": s.display_name,
                "state": s.state,
                "subscriptionPolicies": {"locationPlacementId": "Public_2014-09-01", "quotaId": "PayAsYouGo_2014-09-01", "spendingLimit": "Off"},
                "authorizationSource": "RoleBased",
            }
            for s in self.config.subscriptions
        ]
        return self._page(request, subs)

    async def _get_subscription(self, request: web.Request, sub: str) -> web.Response:
        s = self._require_subscription(sub)
        return web.json_response(
            {"id": f"/subscriptions/{s.id}", "subscriptionId": s.id, "tenantId": self.tenant, "displayName": s.display_name, "state": s.state}
        )

    def _caches_in(self, sub: str, rg: str | None) -> list[Cache]:
        return [
            c
            for c in self.config.caches
            if c.subscription.lower() == sub.lower() and (rg is None or c.resource_group.lower() == rg.lower())
        ]

    def _clusters_in(self, sub: str, rg: str | None) -> list[EnterpriseCluster]:
        return [
            c
            for c in self.config.enterprise_clusters
            if c.subscription.lower() == sub.lower() and (rg is None or c.resource_group.lower() == rg.lower())
        ]

    async def _list_caches(self, request: web.Request, sub: str, rg: str | None = None) -> web.Response:
        if rg is not None:
            self._require_group(sub, rg)
        return self._page(request, [c.to_arm() for c in self._caches_in(sub, rg)])

    def _cache(self, sub: str, rg: str, name: str) -> Cache:
        for c in self._caches_in(sub, rg):
            if c.name.lower() == name.lower():
                return c
        raise _ArmError(404, "ResourceNotFound", f"The Resource 'Microsoft.Cache/Redis/{name}' under resource group '{rg}' was not found.")

    async def _get_cache(self, request: web.Request, sub: str, rg: str, name: str) -> web.Response:
        return web.json_response(self._cache(sub, rg, name).to_arm())

    async def _cache_keys(self, request: web.Request, sub: str, rg: str, name: str) -> web.Response:
        c = self._cache(sub, rg, name)
        return web.json_response({"primaryKey": c.keys.primary, "secondaryKey": c.keys.secondary})

    async def _list_clusters(self, request: web.Request, sub: str, rg: str | None = None) -> web.Response:
        if rg is not None:
            self._require_group(sub, rg)
        return self._page(request, [c.to_arm() for c in self._clusters_in(sub, rg)])

    def _cluster(self, sub: str, rg: str, name: str) -> EnterpriseCluster:
        for c in self._clusters_in(sub, rg):
            if c.name.lower() == name.lower():
                return c
        raise _ArmError(404, "ResourceNotFound", f"The Resource 'Microsoft.Cache/redisEnterprise/{name}' under resource group '{rg}' was not found.")

    async def _get_cluster(self, request: web.Request, sub: str, rg: str, cluster: str) -> web.Response:
        return web.json_response(self._cluster(sub, rg, cluster).to_arm())

    async def _list_databases(self, request: web.Request, sub: str, rg: str, cluster: str) -> web.Response:
        c = self._cluster(sub, rg, cluster)
        return self._page(request, [c.database_to_arm(d) for d in c.databases])

    def _database(self, sub: str, rg: str, cluster: str, db: str) -> tuple[EnterpriseCluster, EnterpriseDatabase]:
        c = self._cluster(sub, rg, cluster)
        d = c.database(db)
        if d is None:
            raise _ArmError(404, "ResourceNotFound", f"The Resource 'Microsoft.Cache/redisEnterprise/{cluster}/databases/{db}' under resource group '{rg}' was not found.")
        return c, d

    async def _get_database(self, request: web.Request, sub: str, rg: str, cluster: str, db: str) -> web.Response:
        c, d = self._database(sub, rg, cluster, db)
        return web.json_response(c.database_to_arm(d))

    async def _database_keys(self, request: web.Request, sub: str, rg: str, cluster: str, db: str) -> web.Response:
        _, d = self._database(sub, rg, cluster, db)
        return web.json_response({"primaryKey": d.keys.primary, "secondaryKey": d.keys.secondary})

    # ----------------------------------------------------------------- Entra ID
    def _fault_for_plain(self, request: web.Request) -> web.Response | None:
        try:
            self._apply_faults(request, None, None, request.path)
        except _ArmError as e:
            return web.json_response({"error": e.code, "error_description": e.message}, status=e.status, headers=e.headers)
        return None

    async def _dispatch_entra(self, request: web.Request) -> web.StreamResponse | None:
        path = request.path
        m = re.match(r"^/(?P<tenant>[^/]+)(?:/v2\.0)?/\.well-known/openid-configuration$", path)
        if m and request.method == "GET":
            return self._fault_for_plain(request) or self._openid_configuration(m["tenant"])
        m = re.match(r"^/(?P<tenant>[^/]+)/oauth2/v2\.0/token$", path)
        if m and request.method == "POST":
            return self._fault_for_plain(request) or await self._token(request, m["tenant"])
        m = re.match(r"^/(?P<tenant>[^/]+)/discovery/v2\.0/keys$", path)
        if m and request.method == "GET":
            return web.json_response(self.jwks())
        return None

    def _tenant_ok(self, tenant: str) -> bool:
        return tenant.lower() in {self.tenant.lower(), "organizations", "common"}

    def _openid_configuration(self, tenant: str) -> web.Response:
        if not self._tenant_ok(tenant):
            return self._entra_error(400, "invalid_tenant", 90002, f"Tenant '{tenant}' not found.")
        t = self.tenant if tenant.lower() in {"organizations", "common"} else tenant
        base = f"{self.authority_host}/{t}"
        return web.json_response(
            {
                "token_endpoint": f"{base}/oauth2/v2.0/token",
                "token_endpoint_auth_methods_supported": ["client_secret_post", "private_key_jwt", "client_secret_basic"],
                "jwks_uri": f"{base}/discovery/v2.0/keys",
                "response_modes_supported": ["query", "fragment", "form_post"],
                "subject_types_supported": ["pairwise"],
                "id_token_signing_alg_values_supported": ["RS256"],
                "response_types_supported": ["code", "id_token", "code id_token", "id_token token"],
                "scopes_supported": ["openid", "profile", "email", "offline_access"],
                "issuer": f"{base}/v2.0",
                "request_uri_parameter_supported": False,
                "userinfo_endpoint": f"{self.authority_host}/oidc/userinfo",
                "authorization_endpoint": f"{base}/oauth2/v2.0/authorize",
                "device_authorization_endpoint": f"{base}/oauth2/v2.0/devicecode",
                "http_logout_supported": True,
                "frontchannel_logout_supported": True,
                "end_session_endpoint": f"{base}/oauth2/v2.0/logout",
                "claims_supported": ["sub", "iss", "aud", "exp", "iat", "oid", "tid"],
                "tenant_region_scope": None,
                "cloud_instance_name": "standin.local",
                "cloud_graph_host_name": "graph.standin.local",
                "msgraph_host": "graph.standin.local",
            }
        )

    def _entra_error(self, status: int, error: str, code: int, text: str) -> web.Response:
        trace, corr = str(uuid.uuid4()), str(uuid.uuid4())
        ts = time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime())
        return web.json_response(
            {
                "error": error,
                "error_description": f"AADSTS{code}: {text} Trace ID: {trace} Correlation ID: {corr} Timestamp: {ts}",
                "error_codes": [code],
                "timestamp": ts,
                "trace_id": trace,
                "correlation_id": corr,
                "error_uri": f"{self.authority_host}/error?code={code}",
            },
            status=status,
        )

    @staticmethod
    def _resource_of_scope(scope: str) -> str | None:
        for s in scope.split():
            if s.endswith("/.default"):
                return s[: -len("/.default")]
        return None

    async def _token(self, request: web.Request, tenant: str) -> web.Response:
        if not self._tenant_ok(tenant) or tenant.lower() in {"organizations", "common"}:
            return self._entra_error(400, "invalid_request", 90002, f"Tenant '{tenant}' not found. Check to make sure you have the correct tenant ID and are signing into the correct cloud.")
        form = await request.post()
        grant = form.get("grant_type")
        client_id = str(form.get("client_id", ""))
        if grant != "client_credentials":
            return self._entra_error(400, "unsupported_grant_type", 70003, f"The app requested an unsupported grant type '{grant}'.")
        sp = next((p for p in self.config.client_credentials if p.client_id == client_id), None)
        if sp is None:
            return self._entra_error(
                400,
                "unauthorized_client",
                700016,
                f"Application with identifier '{client_id}' was not found in the directory '{tenant}'. This can happen if the application has not been installed by the administrator of the tenant or consented to by any user in the tenant.",
            )
        secret = str(form.get("client_secret", ""))
        if not secret or not hmac.compare_digest(secret.encode(), sp.client_secret.encode()):
            return self._entra_error(
                401,
                "invalid_client",
                7000215,
                f"Invalid client secret provided. Ensure the secret being sent in the request is the client secret value, not the client secret ID, for a secret added to app '{client_id}'.",
            )
        resource = self._resource_of_scope(str(form.get("scope", "")))
        if resource is None or resource.rstrip("/") not in KNOWN_RESOURCES:
            return self._entra_error(
                400,
                "invalid_scope",
                500011,
                f"The resource principal named {resource or form.get('scope')} was not found in the tenant named {tenant}.",
            )
        token, exp = self.issue_token(resource.rstrip("/"), oid=sp.oid(), appid=sp.client_id)
        await self._token_usable(token)
        life = exp - int(time.time())
        return web.json_response({"token_type": "Bearer", "expires_in": life, "ext_expires_in": life, "access_token": token})

    # ----------------------------------------------------------------- managed identity
    async def _dispatch_identity(self, request: web.Request) -> web.StreamResponse | None:
        if request.path == "/metadata/identity/oauth2/token" and request.method == "GET":
            resp = self._fault_for_plain(request) or self._imds_token(request)
        elif request.path == "/msi/token" and request.method == "GET":
            resp = self._fault_for_plain(request) or self._app_service_token(request)
        else:
            return None
        if resp.status == 200:
            await self._token_usable(json.loads(resp.body)["access_token"])
        return resp
        return None

    def _mi_token_body(self, resource: str) -> dict[str, Any]:
        mi = self.config.managed_identity
        token, exp = self.issue_token(resource.rstrip("/"), oid=mi.oid(), appid=mi.client_id)
        now = int(time.time())
        return {
            "access_token": token,
            "client_id": mi.client_id,
            "expires_in": str(exp - now),
            "expires_on": str(exp),
            "ext_expires_in": str(exp - now),
            "not_before": str(now),
            "resource": resource,
            "token_type": "Bearer",
        }

    def _mi_checks(self, request: web.Request) -> web.Response | None:
        mi = self.config.managed_identity
        if not mi.enabled:
            return web.json_response({"error": "invalid_request", "error_description": "Identity not found"}, status=400)
        wanted = request.query.get("client_id")
        if wanted and wanted != mi.client_id:
            return web.json_response({"error": "invalid_request", "error_description": "Identity not found"}, status=400)
        resource = request.query.get("resource", "")
        if resource.rstrip("/") not in KNOWN_RESOURCES:
            return web.json_response(
                {"error": "invalid_resource", "error_description": f"AADSTS500011: The resource principal named {resource} was not found in the tenant."},
                status=400,
            )
        return None

    def _imds_token(self, request: web.Request) -> web.Response:
        if request.headers.get("Metadata", "").lower() != "true":
            return web.json_response({"error": "invalid_request", "error_description": "Required metadata header not specified"}, status=400)
        bad = self._mi_checks(request)
        if bad is not None:
            return bad
        return web.json_response(self._mi_token_body(request.query["resource"]))

    def _app_service_token(self, request: web.Request) -> web.Response:
        if request.headers.get("X-IDENTITY-HEADER") != self.identity_header:
            return web.json_response({"statusCode": 401, "message": "Unauthorized"}, status=401)
        bad = self._mi_checks(request)
        if bad is not None:
            return bad
        body = self._mi_token_body(request.query["resource"])
        return web.json_response({k: body[k] for k in ("access_token", "expires_on", "resource", "token_type", "client_id")})

    # ----------------------------------------------------------------- control API (loopback)
    async def _control(self, request: web.Request) -> web.Response:
        """JSON control endpoint so other processes can drive a stand-in process."""
        op = request.path[len("/_standin/") :].strip("/")
        body: dict[str, Any] = {}
        if request.method in ("POST", "PUT", "PATCH", "DELETE") and request.can_read_body:
            try:
                body = await request.json()
            except json.JSONDecodeError:
                return web.json_response({"error": "body must be JSON"}, status=400)
        try:
            result = self._control_op(request.method, op, body, dict(request.query))
        except (KeyError, ValueError) as e:
            return web.json_response({"error": str(e).strip("'\"")}, status=400)
        return web.json_response(result)

    def _control_op(self, method: str, op: str, body: dict[str, Any], query: dict[str, str]) -> Any:
        where = {k: body.pop(k) for k in ("subscription", "resource_group") if k in body and method == "DELETE"}
        if op == "info" and method == "GET":
            return self.describe()
        if op == "state" and method == "GET":
            return _without_keys(self.config.model_dump(mode="json"))
        if op == "keys" and method == "POST":
            keys = self.set_keys(body["resource"], body.get("primary"), body.get("secondary"))
            return {"ok": True, "resource": body["resource"], "rotated": True} | ({"keys": {"primary": keys.primary, "secondary": keys.secondary}} if body.get("return_keys") else {})
        if op == "keys" and method == "GET":
            keys = self.get_keys(query["resource"])
            return {"primary": keys.primary, "secondary": keys.secondary}
        if op == "caches" and method == "POST":
            return {"ok": True, "id": self.add_cache(**body).resource_id}
        if op == "caches" and method == "PATCH":
            name = body.pop("name")
            return {"ok": True, "id": self.update_cache(name, subscription=body.pop("subscription", None), resource_group=body.pop("resource_group", None), **body).resource_id}
        if op == "caches" and method == "DELETE":
            self.remove_cache(body["name"], **where)
            return {"ok": True}
        if op == "enterprise" and method == "POST":
            return {"ok": True, "id": self.add_enterprise_cluster(**body).resource_id}
        if op == "enterprise" and method == "PATCH":
            name = body.pop("name")
            sub, rg = body.pop("subscription", None), body.pop("resource_group", None)
            db_changes = body.pop("database", None)
            c = self.update_enterprise_cluster(name, subscription=sub, resource_group=rg, **body)
            if db_changes:
                self.update_enterprise_database(name, db_changes.pop("name", "default"), **db_changes)
            return {"ok": True, "id": c.resource_id}
        if op == "tokens" and method == "GET":  # tests: every token issued, to grep logs for
            aud = query.get("aud")
            return {"tokens": [{"oid": t.oid, "aud": t.aud, "exp": t.exp, "token": t.value}
                               for t in self.token_book.tokens if aud is None or t.aud == aud.rstrip("/")]}
        if op == "token-lifetime" and method == "POST":
            self.set_token_lifetime(body.get("token_lifetime"), body.get("redis_token_lifetime"))
            return {"token_lifetime": self.config.token_lifetime,
                    "redis_token_lifetime": self.config.redis_token_lifetime}
        if op == "entra-redis" and method == "GET":
            return {"servers": self.entra_redis.status() if self.entra_redis else []}
        if op == "enterprise" and method == "DELETE":
            self.remove_enterprise_cluster(body["name"], **where)
            return {"ok": True}
        if op == "faults" and method == "POST":
            f = self.inject_fault(
                body["pattern"],
                int(body["status"]),
                body.get("count", 1),
                retry_after=body.get("retry_after"),
                action=body.get("action"),
                method=body.get("method"),
                delay=float(body.get("delay", 0.0)),
            )
            return {"ok": True, "pattern": f.pattern}
        if op == "faults" and method == "DELETE":
            self.clear_faults()
            return {"ok": True}
        if op == "denied-actions" and method == "POST":
            for a in body.get("deny", []):
                self.deny_action(a)
            for a in body.get("allow", []):
                self.allow_action(a)
            return {"denied": sorted(self.denied_actions)}
        if op == "managed-identity" and method == "POST":
            self.set_managed_identity(bool(body.get("enabled", True)), body.get("client_id"))
            return {"ok": True}
        if op == "page-size" and method == "POST":
            self.set_page_size(int(body["page_size"]))
            return {"ok": True}
        if op == "requests" and method == "GET":
            pattern = query.get("pattern", "*")
            return {"count": self.request_count(pattern, query.get("method"))}
        if op == "requests" and method == "DELETE":
            self.reset_requests()
            return {"ok": True}
        raise KeyError(f"unknown control operation {method} /_standin/{op}")


def _without_keys(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _without_keys(v) for k, v in value.items() if k not in ("keys", "client_secret", "password")}
    if isinstance(value, list):
        return [_without_keys(v) for v in value]
    return value


def _snake(changes: dict[str, Any]) -> dict[str, Any]:
    """Accept camelCase keys in update_* calls."""
    out = {}
    for k, v in changes.items():
        out[re.sub(r"(?<!^)(?=[A-Z])", "_", k).lower()] = v
    return out


async def run_standin(
    config: StandinConfig,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    imds_port: int = 0,
    ca_file: str | None = None,
    ready_file: str | None = None,
    stop_event: asyncio.Event | None = None,
    keep_dir: str | None = None,
) -> None:
    """Run a stand-in until ``stop_event`` is set (used by ``python -m services.azure_standin``)."""
    standin = AzureStandin(config, ca_file=ca_file, keep_dir=keep_dir)
    await standin.start(host, port, imds_port)
    info = json.dumps(standin.describe())
    if ready_file:
        tmp = Path(ready_file + ".tmp")
        tmp.write_text(info)
        tmp.replace(ready_file)
    print(info, flush=True)
    try:
        await (stop_event or asyncio.Event()).wait()
    finally:
        await standin.stop()
