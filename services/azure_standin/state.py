"""State of the Azure stand-in: subscriptions, identities, caches and Enterprise clusters.

The YAML file accepts snake_case or the camelCase names Azure uses (``sslPort``,
``hostName``, ``clientProtocol`` ...). See ``sample_state.yaml`` beside this file.
"""

from __future__ import annotations

import base64
import json
import re
import secrets
import uuid
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

ARM_PROVIDER = "Microsoft.Cache"
DEFAULT_TENANT = "00000000-0000-0000-0000-00000000c0de"
_UUID_NS = uuid.UUID("6f1d3c1e-3a5b-4c59-9f0b-5a1e0c7a9d11")


def new_key() -> str:
    """An access key shaped like Azure's (44 base64 characters)."""
    return base64.b64encode(secrets.token_bytes(32)).decode()


def stable_uuid(*parts: str) -> str:
    return str(uuid.uuid5(_UUID_NS, "/".join(parts)))


class _Model(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")


class Keys(_Model):
    primary: str = Field(default_factory=new_key)
    secondary: str = Field(default_factory=new_key)

    def __repr__(self) -> str:  # never print keys
        return "Keys(primary=***, secondary=***)"

    __str__ = __repr__


class Subscription(_Model):
    id: str
    display_name: str = ""
    state: str = "Enabled"


class ServicePrincipal(_Model):
    client_id: str
    client_secret: str
    object_id: str | None = None

    def oid(self) -> str:
        return self.object_id or stable_uuid("sp", self.client_id)


class ManagedIdentity(_Model):
    enabled: bool = True
    client_id: str = "11111111-0000-0000-0000-00000000a11d"
    object_id: str | None = None
    # value that the App Service form (IDENTITY_ENDPOINT + IDENTITY_HEADER) must send
    identity_header: str = "standin-identity-header"

    def oid(self) -> str:
        return self.object_id or stable_uuid("mi", self.client_id)


class Sku(_Model):
    name: str = "Standard"
    family: str | None = "C"
    capacity: int = 1


class Cache(_Model):
    """A Microsoft.Cache/redis resource."""

    name: str
    subscription: str
    resource_group: str
    location: str = "East US"
    tags: dict[str, str] = Field(default_factory=dict)
    provisioning_state: str = "Succeeded"
    host_name: str = "localhost"
    port: int | None = 6379
    ssl_port: int | None = 6380
    enable_non_ssl_port: bool = False
    redis_version: str = "6.0"
    sku: Sku = Field(default_factory=Sku)
    shard_count: int | None = None
    disable_access_key_authentication: bool = False
    # redisConfiguration["aad-enabled"]: Entra ID authentication on (Azure turns it on by
    # itself when access keys are disabled).
    aad_enabled: bool = False
    minimum_tls_version: str = "1.2"
    public_network_access: str = "Enabled"
    keys: Keys = Field(default_factory=Keys)

    @property
    def resource_id(self) -> str:
        return (
            f"/subscriptions/{self.subscription}/resourceGroups/{self.resource_group}"
            f"/providers/{ARM_PROVIDER}/Redis/{self.name}"
        )

    def to_arm(self) -> dict[str, Any]:
        props: dict[str, Any] = {
            "provisioningState": self.provisioning_state,
            "redisVersion": self.redis_version,
            "sku": self.sku.model_dump(by_alias=True, exclude_none=True),
            "enableNonSslPort": self.enable_non_ssl_port,
            "minimumTlsVersion": self.minimum_tls_version,
            "publicNetworkAccess": self.public_network_access,
            "disableAccessKeyAuthentication": self.disable_access_key_authentication,
            "redisConfiguration": {"aad-enabled": "true"} if (self.aad_enabled or self.disable_access_key_authentication) else {},
            "hostName": self.host_name,
            "instances": [],
        }
        if self.port is not None:
            props["port"] = self.port
        if self.ssl_port is not None:
            props["sslPort"] = self.ssl_port
        if self.shard_count is not None:
            props["shardCount"] = self.shard_count
        return {
            "id": self.resource_id,
            "location": self.location,
            "name": self.name,
            "type": "Microsoft.Cache/Redis",
            "tags": dict(self.tags),
            "properties": props,
        }


class EnterpriseDatabase(_Model):
    name: str = "default"
    port: int = 10000
    client_protocol: str = "Encrypted"
    clustering_policy: str = "OSSCluster"
    provisioning_state: str = "Succeeded"
    resource_state: str = "Running"
    eviction_policy: str = "VolatileLRU"
    redis_version: str = "7.2"
    access_keys_authentication: str = "Enabled"
    keys: Keys = Field(default_factory=Keys)


class EnterpriseCluster(_Model):
    """A Microsoft.Cache/redisEnterprise resource with its databases."""

    name: str
    subscription: str
    resource_group: str
    location: str = "East US"
    tags: dict[str, str] = Field(default_factory=dict)
    host_name: str = "localhost"
    provisioning_state: str = "Succeeded"
    resource_state: str = "Running"
    redis_version: str = "7"
    minimum_tls_version: str = "1.2"
    kind: str = "v2"
    sku: Sku = Field(default_factory=lambda: Sku(name="Balanced_B5", family=None, capacity=0))
    databases: list[EnterpriseDatabase] = Field(default_factory=lambda: [EnterpriseDatabase()])

    @property
    def resource_id(self) -> str:
        return (
            f"/subscriptions/{self.subscription}/resourceGroups/{self.resource_group}"
            f"/providers/{ARM_PROVIDER}/redisEnterprise/{self.name}"
        )

    def database(self, name: str) -> EnterpriseDatabase | None:
        for db in self.databases:
            if db.name.lower() == name.lower():
                return db
        return None

    def database_id(self, db: EnterpriseDatabase) -> str:
        return f"{self.resource_id}/databases/{db.name}"

    def to_arm(self) -> dict[str, Any]:
        sku = {"name": self.sku.name}
        if self.sku.capacity:
            sku["capacity"] = self.sku.capacity
        return {
            "id": self.resource_id,
            "location": self.location,
            "kind": self.kind,
            "sku": sku,
            "name": self.name,
            "type": "Microsoft.Cache/redisEnterprise",
            "tags": dict(self.tags),
            "properties": {
                "hostName": self.host_name,
                "provisioningState": self.provisioning_state,
                "resourceState": self.resource_state,
                "redisVersion": self.redis_version,
                "minimumTlsVersion": self.minimum_tls_version,
                "publicNetworkAccess": "Enabled",
            },
        }

    def database_to_arm(self, db: EnterpriseDatabase) -> dict[str, Any]:
        return {
            "id": self.database_id(db),
            "name": f"{self.name}/{db.name}",
            "type": "Microsoft.Cache/redisEnterprise/databases",
            "properties": {
                "provisioningState": db.provisioning_state,
                "resourceState": db.resource_state,
                "clientProtocol": db.client_protocol,
                "clusteringPolicy": db.clustering_policy,
                "evictionPolicy": db.eviction_policy,
                "port": db.port,
                "modules": [],
                "redisVersion": db.redis_version,
                "accessKeysAuthentication": db.access_keys_authentication,
            },
        }


class RedisServer(_Model):
    """A local redis-server that plays the data plane of Entra ID caches: the stand-in keeps an
    ACL user per principal (named by its object id) whose passwords are the principal's
    current Redis tokens, and ends connections whose last AUTH used a token now expired."""

    host: str = "127.0.0.1"
    port: int
    tls: bool = True
    ca_file: str | None = None  # CA of the server's certificate
    username: str | None = None  # the stand-in's admin login (default user when unset)
    password: str | None = None

    def __repr__(self) -> str:
        return f"RedisServer({self.host}:{self.port}, tls={self.tls})"

    __str__ = __repr__


class EntraRedis(_Model):
    """How the stand-in enforces Entra ID on the redis-servers it administers."""

    servers: list[RedisServer] = Field(default_factory=list)
    # seconds between checks of CLIENT LIST against the tokens' expiry
    enforce_interval: float = 1.0
    # a connection is ended this many seconds after its token's exp (the MONITOR feed that
    # shows a re-AUTH arrives a moment after it)
    grace: float = 0.5
    # ACL rules of the principals' users (Azure's "Data Owner" access policy)
    acl_rules: list[str] = Field(default_factory=lambda: ["~*", "&*", "+@all"])


class StandinConfig(_Model):
    """The whole state file."""

    tenant: str = DEFAULT_TENANT
    subscriptions: list[Subscription] = Field(default_factory=list)
    resource_groups: list[str] = Field(default_factory=list)  # "sub/group" of empty groups
    client_credentials: list[ServicePrincipal] = Field(default_factory=list)
    managed_identity: ManagedIdentity = Field(default_factory=ManagedIdentity)
    caches: list[Cache] = Field(default_factory=list)
    enterprise_clusters: list[EnterpriseCluster] = Field(default_factory=list)
    page_size: int = 100
    token_lifetime: int = 3600  # seconds, every token issued
    # seconds, tokens for https://redis.azure.com only (unset: token_lifetime)
    redis_token_lifetime: int | None = None
    entra_redis: EntraRedis = Field(default_factory=EntraRedis)
    denied_actions: list[str] = Field(default_factory=list)
    examples_dir: str | None = None


def load_config(path: str | Path) -> StandinConfig:
    path = Path(path)
    data = yaml.safe_load(path.read_text()) or {}
    cfg = StandinConfig.model_validate(data)
    if cfg.examples_dir and not Path(cfg.examples_dir).is_absolute():
        cfg.examples_dir = str((path.parent / cfg.examples_dir).resolve())
    return cfg


# --- Azure's published example files ----------------------------------------------------

def loads_tolerant(text: str) -> Any:
    """json.loads that also accepts trailing commas (as some published examples have)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        pass
    out: list[str] = []
    in_string = False
    escaped = False
    i = 0
    n = len(text)
    while i < n:
        ch = text[i]
        if in_string:
            out.append(ch)
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
            out.append(ch)
        elif ch == ",":
            j = i + 1
            while j < n and text[j] in " \t\r\n":
                j += 1
            if j < n and text[j] in "}]":
                pass  # drop the trailing comma
            else:
                out.append(ch)
        else:
            out.append(ch)
        i += 1
    return json.loads("".join(out))


_RG = "/subscriptions/{subscriptionId}/resourceGroups/{resourceGroupName}/providers/Microsoft.Cache"
# example file name -> (method, path template). Only list/get/listKeys calls discovery makes.
EXAMPLE_OPERATIONS: dict[str, tuple[str, str]] = {
    "RedisCacheList": ("GET", "/subscriptions/{subscriptionId}/providers/Microsoft.Cache/redis"),
    "RedisCacheListByResourceGroup": ("GET", _RG + "/redis"),
    "RedisCacheGet": ("GET", _RG + "/redis/{name}"),
    "RedisCacheListKeys": ("POST", _RG + "/redis/{name}/listKeys"),
    "RedisEnterpriseList": ("GET", "/subscriptions/{subscriptionId}/providers/Microsoft.Cache/redisEnterprise"),
    "RedisEnterpriseListByResourceGroup": ("GET", _RG + "/redisEnterprise"),
    "RedisEnterpriseGet": ("GET", _RG + "/redisEnterprise/{clusterName}"),
    "RedisEnterpriseDatabasesListByCluster": ("GET", _RG + "/redisEnterprise/{clusterName}/databases"),
    "RedisEnterpriseDatabasesGet": ("GET", _RG + "/redisEnterprise/{clusterName}/databases/{databaseName}"),
    "RedisEnterpriseDatabasesListKeys": (
        "POST",
        _RG + "/redisEnterprise/{clusterName}/databases/{databaseName}/listKeys",
    ),
}


def load_example(path: str | Path) -> tuple[str, str, str, Any] | None:
    """(method, path, subscription id, response body) for one published example file, or None
    when the file is not one of the calls the stand-in serves."""
    path = Path(path)
    op = EXAMPLE_OPERATIONS.get(path.stem)
    if op is None:
        return None
    doc = loads_tolerant(path.read_text())
    params = doc.get("parameters", {})
    body = doc.get("responses", {}).get("200", {}).get("body")
    if body is None:
        return None
    method, template = op

    def fill(m: re.Match[str]) -> str:
        return str(params[m.group(1)])

    return method, re.sub(r"\{(\w+)\}", fill, template), str(params.get("subscriptionId", "")), body
