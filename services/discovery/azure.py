"""Azure Cache for Redis and Azure Redis Enterprise discovery with the Azure SDK.

Fetchers list resources with the async management clients (``azure-mgmt-redis``,
``azure-mgmt-redisenterprise``) and turn them into ``DiscoveredDatabase`` records:

* name: the resource name; for Enterprise, the cluster name for database ``default`` and
  ``cluster-database`` otherwise. A ``cachegate-database-name`` (or ``TeleportDatabaseName``)
  tag overrides it: an explicit name, made valid when that is unambiguous (``Billing Cache``
  -> ``Billing-Cache``) and otherwise reported, never rewritten to settle a collision (see
  ``assign_names``).
* auth: ``entra`` when access keys are disabled (``disableAccessKeyAuthentication`` /
  ``accessKeysAuthentication: Disabled``), else ``access_key``; a ``cachegate-auth`` tag
  overrides it.
* labels: the resource's tags plus region, resource-group, subscription-id, engine,
  engine-version, cloud=Azure and, in one vocabulary for both resource types, auth
  (access_key | entra), clustering-policy (OSSCluster | EnterpriseCluster | NoCluster),
  endpoint-type (cluster: clients see Redis Cluster | standalone) and tier (basic, standard,
  premium, balanced, memoryoptimized, computeoptimized, flashoptimized, enterprise,
  enterpriseflash). The built-in labels win over tags.
* uri: ``hostName:sslPort`` (Redis) or ``hostName:port`` (Enterprise database).

Resources that cannot be reached over TLS (no sslPort, clientProtocol Plaintext) or are not
available (Creating, Deleting, Disabled, Failed, ...) are skipped with a debug log line.

Errors come out as ``AzureDiscoveryError`` subclasses with one readable line each; access
keys never appear in logs or exception text.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import logging
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from azure.core.exceptions import (
    HttpResponseError,
    ResourceNotFoundError,
)

from services.common.azure import (  # noqa: F401 (re-exported: discovery's API)
    ACTION_DATABASES_KEYS, ACTION_DATABASES_READ, ACTION_ENTERPRISE_READ, ACTION_REDIS_KEYS, ACTION_REDIS_READ,
    ACTION_SUBSCRIPTIONS_READ, CREDENTIAL_HINT, KIND_ENTERPRISE, KIND_REDIS, ROLE_HINT, SUBSCRIPTIONS_API_VERSION,
    AzureCredentialError,
    AzureDiscoveryError, AzureNotFoundError, AzurePermissionError, AzureServerError, AzureThrottledError,
    RedisKeys, ResourceRef, _client_kwargs, credential_error, fetch_redis_keys, make_credential,
    parse_resource_id, translate_error,
)

from .matchers import AzureMatcher, normalize_region

log = logging.getLogger("cachegate.discovery.azure")

ENGINE_REDIS = "Microsoft.Cache/Redis"
ENGINE_ENTERPRISE = "Microsoft.Cache/redisEnterprise"
NAME_OVERRIDE_TAGS = ("cachegate-database-name", "TeleportDatabaseName")  # first found wins
AUTH_OVERRIDE_TAGS = ("cachegate-auth",)
AUTH_ACCESS_KEY = "access_key"
AUTH_ENTRA = "entra"
# What auth's registry accepts as a database name.
VALID_NAME = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9._-]{0,251}[A-Za-z0-9])?$")

# Provisioning / resource states in which a resource is not usable (compared lowercased).
UNAVAILABLE_STATES = frozenset(
    {
        "creating",
        "deleting",
        "disabled",
        "disabling",
        "enabling",
        "failed",
        "provisioning",
        "unprovisioning",
        "createfailed",
        "deletefailed",
        "enablefailed",
        "canceled",
    }
)
# Known states in which the resource still serves traffic.
AVAILABLE_STATES = frozenset(
    {
        "succeeded",
        "running",
        "updating",
        "scaling",
        "linking",
        "unlinking",
        "recoveringscalefailure",
        "configuringaad",
        "updatefailed",
        "scalingfailed",
        "disablefailed",
        "moving",
    }
)

# Display names for the description ("Azure Redis server in East US") when Azure answers a
# programmatic region name.
REGION_DISPLAY_NAMES = {
    "eastus": "East US", "eastus2": "East US 2", "eastus3": "East US 3", "westus": "West US",
    "westus2": "West US 2", "westus3": "West US 3", "centralus": "Central US",
    "northcentralus": "North Central US", "southcentralus": "South Central US",
    "westcentralus": "West Central US", "canadacentral": "Canada Central", "canadaeast": "Canada East",
    "brazilsouth": "Brazil South", "brazilsoutheast": "Brazil Southeast", "mexicocentral": "Mexico Central",
    "northeurope": "North Europe", "westeurope": "West Europe", "uksouth": "UK South", "ukwest": "UK West",
    "francecentral": "France Central", "francesouth": "France South", "germanywestcentral": "Germany West Central",
    "germanynorth": "Germany North", "switzerlandnorth": "Switzerland North", "switzerlandwest": "Switzerland West",
    "norwayeast": "Norway East", "norwaywest": "Norway West", "swedencentral": "Sweden Central",
    "polandcentral": "Poland Central", "italynorth": "Italy North", "spaincentral": "Spain Central",
    "eastasia": "East Asia", "southeastasia": "Southeast Asia", "japaneast": "Japan East",
    "japanwest": "Japan West", "koreacentral": "Korea Central", "koreasouth": "Korea South",
    "australiaeast": "Australia East", "australiasoutheast": "Australia Southeast",
    "australiacentral": "Australia Central", "centralindia": "Central India", "southindia": "South India",
    "westindia": "West India", "uaenorth": "UAE North", "uaecentral": "UAE Central",
    "qatarcentral": "Qatar Central", "israelcentral": "Israel Central", "southafricanorth": "South Africa North",
    "southafricawest": "South Africa West", "newzealandnorth": "New Zealand North",
}


def display_region(location: str | None) -> str:
    """"eastus" -> "East US"; a display name ("East US") is returned as it is."""
    if not location:
        return "unknown region"
    if " " in location.strip():
        return location.strip()
    return REGION_DISPLAY_NAMES.get(normalize_region(location), location)


# --------------------------------------------------------------------------- records
@dataclass
class AzureInfo:
    resource_id: str
    subscription_id: str
    resource_group: str
    region: str  # normalized: "eastus"
    kind: str  # "redis" | "redis-enterprise"
    clustering_policy: str | None = None  # OSSCluster | EnterpriseCluster | None (standalone)
    access_key_auth_disabled: bool = False
    auth: str = ""  # access_key | entra


@dataclass
class DiscoveredDatabase:
    name: str
    description: str
    uri: str
    labels: dict[str, str]
    azure: AzureInfo
    protocol: str = "redis"
    original_name: str = ""
    explicit_name: bool = False  # from a name tag: never renamed
    name_error: str = ""  # why it cannot be published (an invalid name tag)

    def __post_init__(self) -> None:
        if not self.original_name:
            self.original_name = self.name

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DiscoveredDatabase:
        d = dict(data)
        d["azure"] = AzureInfo(**d["azure"])
        d["labels"] = dict(d.get("labels") or {})
        return cls(**d)

    @property
    def resource_id(self) -> str:
        return self.azure.resource_id if self.azure else ""


def _state_unavailable(*states: str | None) -> str | None:
    for s in states:
        if s and str(s).lower() in UNAVAILABLE_STATES:
            return str(s)
        if s and str(s).lower() not in AVAILABLE_STATES:
            log.debug("unknown Azure resource state %r treated as available", s)
    return None


def _tag(tags: Mapping[str, str], names: Sequence[str]) -> tuple[str, str] | None:
    lowered = {k.lower(): (k, v) for k, v in (tags or {}).items()}
    for t in names:
        hit = lowered.get(t.lower())
        if hit is not None and hit[1] is not None and str(hit[1]).strip():
            return hit[0], str(hit[1]).strip()
    return None


def valid_name(value: str) -> str | None:
    """``value`` as a valid database name when that is unambiguous: as it is, or with runs
    of spaces as one '-' (``Billing Cache`` -> ``Billing-Cache``). None otherwise."""
    value = value.strip()
    if VALID_NAME.match(value):
        return value
    dashed = re.sub(r"\s+", "-", value)
    return dashed if VALID_NAME.match(dashed) else None


def _override_name(tags: Mapping[str, str]) -> tuple[str | None, str]:
    """(name, error) of a name tag: (None, "") without one, (None, why) when its value cannot
    be made a valid name."""
    hit = _tag(tags, NAME_OVERRIDE_TAGS)
    if hit is None:
        return None, ""
    key, value = hit
    name = valid_name(value)
    if name is None:
        return None, (f"tag {key}={value!r} is not a valid database name (letters, digits, '-', '_' and '.', "
                      "starting and ending with a letter or digit): change the tag")
    return name, ""


def _auth(tags: Mapping[str, str], keys_disabled: bool) -> str:
    hit = _tag(tags, AUTH_OVERRIDE_TAGS)
    if hit is not None:
        v = hit[1].lower().replace("-", "_")
        if v in ("entra", "entra_id", "aad"):
            return AUTH_ENTRA
        if v in ("access_key", "access_keys", "key", "keys"):
            return AUTH_ACCESS_KEY
        log.warning("ignoring tag %s=%r: use entra or access_key", hit[0], hit[1])
    return AUTH_ENTRA if keys_disabled else AUTH_ACCESS_KEY


def _tier(sku_name: str | None) -> str:
    """Standard -> standard, Balanced_B5 -> balanced, EnterpriseFlash_F300 -> enterpriseflash."""
    return (sku_name or "").split("_", 1)[0].lower()


def _str(v: Any) -> str | None:
    if v is None:
        return None
    return str(getattr(v, "value", v))


def _labels(tags: Mapping[str, str] | None, builtin: Mapping[str, str]) -> dict[str, str]:
    labels = {str(k): str(v) for k, v in (tags or {}).items()}
    labels.update({k: v for k, v in builtin.items() if v is not None})
    return labels


def _resource_group_of(resource_id: str) -> str:
    parts = resource_id.split("/")
    for i, p in enumerate(parts):
        if p.lower() == "resourcegroups" and i + 1 < len(parts):
            return parts[i + 1]
    return ""


def redis_cache_record(cache: Any, subscription_id: str) -> tuple[DiscoveredDatabase | None, str | None]:
    """(record, None) or (None, reason it is skipped) for a RedisResource model."""
    state = _str(cache.provisioning_state)
    bad = _state_unavailable(state)
    if bad:
        return None, f"provisioning state is {bad}"
    if not cache.ssl_port:
        return None, "no TLS port (sslPort) is configured"
    if not cache.host_name:
        return None, "no host name yet"
    tags = dict(cache.tags or {})
    region = normalize_region(cache.location)
    group = _resource_group_of(cache.id)
    clustered = bool(cache.shard_count and cache.shard_count > 0)
    override, name_error = _override_name(tags)
    name = override or cache.name
    keys_disabled = bool(cache.disable_access_key_authentication)
    auth = _auth(tags, keys_disabled)
    labels = _labels(
        tags,
        {
            "region": region,
            "resource-group": group,
            "subscription-id": subscription_id,
            "engine": ENGINE_REDIS,
            "engine-version": cache.redis_version or "",
            "endpoint-type": "cluster" if clustered else "standalone",
            "clustering-policy": "OSSCluster" if clustered else "NoCluster",
            "auth": auth,
            "tier": _tier(_str(getattr(cache.sku, "name", None))),
            "cloud": "Azure",
        },
    )
    return (
        DiscoveredDatabase(
            name=name,
            description=f"Azure Redis server in {display_region(cache.location)}",
            uri=f"{cache.host_name}:{cache.ssl_port}",
            labels=labels,
            azure=AzureInfo(
                resource_id=cache.id,
                subscription_id=subscription_id,
                resource_group=group,
                region=region,
                kind=KIND_REDIS,
                clustering_policy="OSSCluster" if clustered else None,
                access_key_auth_disabled=keys_disabled,
                auth=auth,
            ),
            explicit_name=override is not None or bool(name_error),
            name_error=name_error,
        ),
        None,
    )


def enterprise_database_record(cluster: Any, database: Any, subscription_id: str) -> tuple[DiscoveredDatabase | None, str | None]:
    """(record, None) or (None, reason) for a Cluster + Database model pair."""
    bad = _state_unavailable(_str(cluster.provisioning_state), _str(cluster.resource_state))
    if bad:
        return None, f"cluster state is {bad}"
    bad = _state_unavailable(_str(database.provisioning_state), _str(database.resource_state))
    if bad:
        return None, f"database state is {bad}"
    protocol = _str(database.client_protocol)
    if (protocol or "").lower() != "encrypted":
        return None, f"clientProtocol is {protocol or 'unset'}, not Encrypted"
    if not cluster.host_name or not database.port:
        return None, "no host name or port yet"
    db_name = database.id.rstrip("/").split("/")[-1] if database.id else (database.name or "default").split("/")[-1]
    tags = dict(cluster.tags or {})
    override, name_error = _override_name(tags)
    base = override or cluster.name
    name = base if db_name.lower() == "default" else f"{base}-{db_name}"
    region = normalize_region(cluster.location)
    group = _resource_group_of(cluster.id)
    policy = _str(database.clustering_policy) or "OSSCluster"
    keys_disabled = (_str(getattr(database, "access_keys_authentication", None)) or "").lower() == "disabled"
    auth = _auth(tags, keys_disabled)
    labels = _labels(
        tags,
        {
            "region": region,
            "resource-group": group,
            "subscription-id": subscription_id,
            "engine": ENGINE_ENTERPRISE,
            "engine-version": _str(database.redis_version) or _str(cluster.redis_version) or "",
            "endpoint-type": "cluster" if policy.lower() == "osscluster" else "standalone",
            "clustering-policy": policy,
            "auth": auth,
            "tier": _tier(_str(getattr(getattr(cluster, "sku", None), "name", None))),
            "cloud": "Azure",
        },
    )
    return (
        DiscoveredDatabase(
            name=name,
            description=f"Azure Redis Enterprise server in {display_region(cluster.location)}",
            uri=f"{cluster.host_name}:{database.port}",
            labels=labels,
            azure=AzureInfo(
                resource_id=database.id or f"{cluster.id}/databases/{db_name}",
                subscription_id=subscription_id,
                resource_group=group,
                region=region,
                kind=KIND_ENTERPRISE,
                clustering_policy=policy,
                access_key_auth_disabled=keys_disabled,
                auth=auth,
            ),
            explicit_name=override is not None or bool(name_error),
            name_error=name_error,
        ),
        None,
    )


# --------------------------------------------------------------------------- name collisions
_DNS_BAD = re.compile(r"[^a-z0-9-]+")


def _dns_safe(text: str, limit: int = 63) -> str:
    s = _DNS_BAD.sub("-", text.lower())
    s = re.sub(r"-{2,}", "-", s).strip("-")
    if len(s) > limit:
        digest = hashlib.sha256(text.encode()).hexdigest()[:8]
        s = s[: limit - 9].rstrip("-") + "-" + digest
    return s


def dedupe_names(records: Iterable[DiscoveredDatabase], also_taken: Iterable[str] = ()) -> list[DiscoveredDatabase]:
    """Give every record whose name collides (case-insensitively) with another the
    deterministic, DNS-safe name ``name-region-group-subscription`` and keep the name it
    would have had in the ``original-name`` label. Unique names are left alone.
    ``also_taken``: original names of records published elsewhere that count as colliding."""
    records = list(records)
    counts: dict[str, int] = {}
    for r in records:
        key = (r.original_name or r.name).lower()
        counts[key] = counts.get(key, 0) + 1
    for n in also_taken:
        counts[n.lower()] = counts.get(n.lower(), 0) + 1
    out: list[DiscoveredDatabase] = []
    for r in records:
        original = r.original_name or r.name
        labels = {k: v for k, v in r.labels.items() if k != "original-name"}
        if counts[original.lower()] == 1:
            out.append(dataclasses.replace(r, name=original, original_name=original, labels=labels))
            continue
        a = r.azure
        name = _dns_safe(f"{original}-{a.region}-{a.resource_group}-{a.subscription_id}")
        labels["original-name"] = original
        out.append(dataclasses.replace(r, name=name, original_name=original, labels=labels))
    # Same name, region, group and subscription (a cache and an Enterprise cluster with one
    # name): tell them apart by the resource id.
    seen: dict[str, int] = {}
    for r in out:
        seen[r.name] = seen.get(r.name, 0) + 1
    for idx, r in enumerate(out):
        if seen[r.name] > 1 and "original-name" in r.labels:
            digest = hashlib.sha256(r.azure.resource_id.lower().encode()).hexdigest()[:6]
            out[idx] = dataclasses.replace(r, name=_dns_safe(f"{r.name[:56]}-{digest}"))
    return out


def suffixed_name(r: DiscoveredDatabase) -> str:
    """The long name of a record whose plain name is taken: ``name-region-group-subscription``
    (DNS-safe), plus a digest of the resource id for an Enterprise database beside a cache."""
    a = r.azure
    name = _dns_safe(f"{r.original_name or r.name}-{a.region}-{a.resource_group}-{a.subscription_id}")
    if a.kind == KIND_ENTERPRISE:
        digest = hashlib.sha256(a.resource_id.lower().encode()).hexdigest()[:6]
        name = _dns_safe(f"{name[:56]}-{digest}")
    return name


def assign_names(
    records: Iterable[DiscoveredDatabase],
    published: Mapping[str, str] | None = None,
    also_taken: Iterable[str] = (),
) -> tuple[list[DiscoveredDatabase], list[tuple[DiscoveredDatabase, str]]]:
    """Names a user can rely on. Returns (records to publish, [(record, why it is not)]).

    * A resource keeps the name it was published under (``published``: resource id ->
      name) as long as that name is still its own (its name tag, or its resource name, plain
      or suffixed): caches of the same name appearing or going elsewhere rename nothing.
    * An explicit name (a name tag) is used as it is, never rewritten: when it is taken by
      another record, or two new records claim it, it is reported instead of published.
    * A resource published for the first time gets its plain name when no other record has
      or wants it, else ``suffixed_name``.
    * A record whose name tag is invalid is reported.
    ``also_taken``: names held by records this round must not touch (a failing fetcher's)."""
    records = list(records)
    published = {k.lower(): v for k, v in (published or {}).items()}
    claimed: dict[str, str] = {n.lower(): "" for n in also_taken}  # name -> resource id
    out: dict[str, DiscoveredDatabase] = {}  # resource id -> record
    problems: list[tuple[DiscoveredDatabase, str]] = []

    def base(r: DiscoveredDatabase) -> str:
        return r.original_name or r.name

    def finish(r: DiscoveredDatabase, name: str) -> DiscoveredDatabase:
        labels = {k: v for k, v in r.labels.items() if k != "original-name"}
        if name.lower() != base(r).lower():
            labels["original-name"] = base(r)
        return dataclasses.replace(r, name=name, original_name=base(r), labels=labels)

    def claim(r: DiscoveredDatabase, name: str) -> None:
        claimed[name.lower()] = r.resource_id.lower()
        out[r.resource_id.lower()] = finish(r, name)

    valid = []
    for r in records:
        if r.name_error:
            problems.append((r, r.name_error))
        else:
            valid.append(r)
    # 1. names already published stay
    pending = []
    for r in valid:
        cur = published.get(r.resource_id.lower())
        own = {base(r).lower()} if r.explicit_name else {base(r).lower(), suffixed_name(r).lower()}
        if cur and cur.lower() in own and cur.lower() not in claimed:
            claim(r, cur)
        else:
            pending.append(r)
    # names published for resources that are still there, but not (yet) re-claimed above
    present = {r.resource_id.lower() for r in records}
    for rid, name in published.items():
        if rid in present and rid not in out and name.lower() not in claimed:
            claimed[name.lower()] = rid
    # 2. explicit names
    explicit = [r for r in pending if r.explicit_name]
    wanted: dict[str, list[DiscoveredDatabase]] = {}
    for r in explicit:
        wanted.setdefault(base(r).lower(), []).append(r)
    for key, rs in sorted(wanted.items()):
        holder = claimed.get(key)
        if holder is not None and holder not in {x.resource_id.lower() for x in rs}:
            who = next((o.resource_id for o in out.values() if o.name.lower() == key), holder or "another record")
            for r in rs:
                problems.append((r, f"its name tag asks for {base(r)!r}, which {who} already has: "
                                    "give one of them another name"))
            continue
        if len(rs) > 1:
            ids = ", ".join(sorted(x.resource_id for x in rs))
            for r in rs:
                problems.append((r, f"{len(rs)} resources ask for the name {base(r)!r} in their name tags "
                                    f"({ids}): give each its own"))
            continue
        claim(rs[0], base(rs[0]))
    # 3. resource names, plain when nobody else has or wants them
    implicit = sorted((r for r in pending if not r.explicit_name), key=lambda r: r.resource_id.lower())
    by_base: dict[str, int] = {}
    for r in valid:
        by_base[base(r).lower()] = by_base.get(base(r).lower(), 0) + 1
    for r in implicit:
        plain = base(r)
        if plain.lower() not in claimed and by_base[plain.lower()] == 1:
            claim(r, plain)
            continue
        long = suffixed_name(r)
        if long.lower() in claimed:
            problems.append((r, f"both its name {plain!r} and {long!r} are taken: give it a name tag"))
            continue
        claim(r, long)
    return sorted(out.values(), key=lambda r: r.name), problems


@dataclass
class AzureSubscription:
    subscription_id: str
    display_name: str = ""
    state: str = "Enabled"


async def list_subscriptions(
    credential: Any,
    *,
    base_url: str | None = None,
    connection_verify: Any = None,
    retry_total: int = 0,
    timeout: float = 30,
) -> list[AzureSubscription]:
    """Every subscription the credential can list (GET /subscriptions, paged), through the
    SDK's ARM pipeline (bearer token, retries, tracing)."""
    from azure.core.pipeline import policies
    from azure.core.rest import HttpRequest
    from azure.mgmt.core import AsyncARMPipelineClient
    from azure.mgmt.core.policies import AsyncARMChallengeAuthenticationPolicy

    endpoint = (base_url or "https://management.azure.com").rstrip("/")
    kw = _client_kwargs(None, connection_verify, retry_total, timeout)
    pipeline_policies = [
        policies.RequestIdPolicy(),
        policies.HeadersPolicy(),
        policies.UserAgentPolicy(user_agent="cachegate-discovery"),
        policies.ContentDecodePolicy(),
        policies.AsyncRetryPolicy(retry_total=retry_total),
        AsyncARMChallengeAuthenticationPolicy(credential, "https://management.azure.com/.default"),
    ]
    out: list[AzureSubscription] = []
    try:
        async with AsyncARMPipelineClient(
            base_url=endpoint,
            policies=pipeline_policies,
            connection_verify=kw.get("connection_verify", True),
            connection_timeout=timeout,
            read_timeout=timeout,
        ) as client:
            url: str | None = f"{endpoint}/subscriptions?api-version={SUBSCRIPTIONS_API_VERSION}"
            pages = 0
            while url and pages < 1000:
                pages += 1
                resp = await client.send_request(HttpRequest("GET", url))
                if resp.status_code != 200:
                    await resp.read()
                    from azure.mgmt.core.exceptions import ARMErrorFormat

                    raise HttpResponseError(response=resp, error_format=ARMErrorFormat)
                await resp.read()
                body = resp.json()
                for s in body.get("value", []):
                    sid = s.get("subscriptionId") or str(s.get("id", "")).rsplit("/", 1)[-1]
                    out.append(AzureSubscription(sid, s.get("displayName", ""), s.get("state", "Enabled")))
                url = body.get("nextLink")
    except Exception as exc:
        raise translate_error(exc, action=ACTION_SUBSCRIPTIONS_READ, what="listing subscriptions") from None
    return [s for s in out if (s.state or "Enabled").lower() not in {"disabled", "deleted"}]


class _AzureFetcher:
    kind: str = ""
    prefix: str = ""

    def __init__(
        self,
        credential: Any,
        subscription_id: str,
        matcher: AzureMatcher,
        base_url: str | None = None,
        connection_verify: Any = None,
        *,
        retry_total: int = 0,
        timeout: float = 30,
        name: str | None = None,
    ) -> None:
        self.credential = credential
        self.subscription_id = subscription_id
        self.matcher = matcher
        self.base_url = base_url
        self.connection_verify = connection_verify
        self.retry_total = retry_total
        self.timeout = timeout
        self.name = name or f"{self.prefix}/{subscription_id}"
        self._client: Any = None

    def _kwargs(self) -> dict[str, Any]:
        return _client_kwargs(self.base_url, self.connection_verify, self.retry_total, self.timeout)

    def owns(self, record: Any) -> bool:
        """Whether a published record came from this fetcher (survives restarts: it is read
        from the record's Azure metadata, or its labels when the registry kept only those)."""
        azure = getattr(record, "azure", None)
        if isinstance(record, Mapping):
            azure = record.get("azure")
        if azure is not None:
            sub = azure.get("subscription_id") if isinstance(azure, Mapping) else getattr(azure, "subscription_id", None)
            kind = azure.get("kind") if isinstance(azure, Mapping) else getattr(azure, "kind", None)
        else:
            labels = getattr(record, "labels", None) or (record.get("labels") if isinstance(record, Mapping) else {}) or {}
            sub = labels.get("subscription-id")
            engine = labels.get("engine", "")
            kind = {ENGINE_REDIS.lower(): KIND_REDIS, ENGINE_ENTERPRISE.lower(): KIND_ENTERPRISE}.get(engine.lower())
        return bool(sub) and str(sub).lower() == self.subscription_id.lower() and kind == self.kind

    def _candidate(self, resource: Any) -> bool:
        why = self.matcher.why_not(
            kind=self.kind,
            location=resource.location,
            subscription_id=self.subscription_id,
            resource_group=_resource_group_of(resource.id or ""),
            tags=resource.tags,
        )
        if why:
            log.debug("not matched: %s: %s", resource.id, why)
            return False
        return True

    async def _list(self, by_subscription: Any, by_group: Any, action: str) -> list[Any]:
        """Items of a paged list call, per subscription or per selected resource group."""
        items: list[Any] = []
        try:
            if self.matcher.all_resource_groups:
                async for item in by_subscription():
                    items.append(item)
                return items
            for group in self.matcher.resource_groups:
                try:
                    async for item in by_group(group):
                        items.append(item)
                except ResourceNotFoundError as exc:
                    code = getattr(getattr(exc, "error", None), "code", "")
                    if code == "ResourceGroupNotFound":
                        log.debug("resource group %s not found in subscription %s", group, self.subscription_id)
                        continue
                    raise
        except Exception as exc:
            raise translate_error(exc, action=action, subscription_id=self.subscription_id, what=self.name) from None
        return items

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None

    async def __aenter__(self) -> _AzureFetcher:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"


class AzureRedisFetcher(_AzureFetcher):
    """Azure Cache for Redis (Microsoft.Cache/redis) in one subscription."""

    kind = KIND_REDIS
    prefix = "azure-redis"

    def _redis_client(self) -> Any:
        if self._client is None:
            from azure.mgmt.redis.aio import RedisManagementClient

            self._client = RedisManagementClient(self.credential, self.subscription_id, **self._kwargs())
        return self._client

    async def fetch(self) -> list[DiscoveredDatabase]:
        if not self.matcher.wants(self.kind):
            return []
        client = self._redis_client()
        caches = await self._list(
            client.redis.list_by_subscription,
            client.redis.list_by_resource_group,
            ACTION_REDIS_READ,
        )
        out: list[DiscoveredDatabase] = []
        for cache in caches:
            if not self._candidate(cache):
                continue
            record, reason = redis_cache_record(cache, self.subscription_id)
            if record is None:
                log.debug("skipping Azure Redis cache %s: %s", cache.id, reason)
                continue
            out.append(record)
        return out


class AzureRedisEnterpriseFetcher(_AzureFetcher):
    """Azure Redis Enterprise (Microsoft.Cache/redisEnterprise) databases in one subscription."""

    kind = KIND_ENTERPRISE
    prefix = "azure-redis-enterprise"
    concurrency = 8

    def _enterprise_client(self) -> Any:
        if self._client is None:
            from azure.mgmt.redisenterprise.aio import RedisEnterpriseManagementClient

            self._client = RedisEnterpriseManagementClient(self.credential, self.subscription_id, **self._kwargs())
        return self._client

    async def fetch(self) -> list[DiscoveredDatabase]:
        if not self.matcher.wants(self.kind):
            return []
        client = self._enterprise_client()
        clusters = await self._list(
            client.redis_enterprise.list,
            client.redis_enterprise.list_by_resource_group,
            ACTION_ENTERPRISE_READ,
        )
        wanted = []
        for cluster in clusters:
            if not self._candidate(cluster):
                continue
            bad = _state_unavailable(_str(cluster.provisioning_state), _str(cluster.resource_state))
            if bad:
                log.debug("skipping Azure Redis Enterprise cluster %s: cluster state is %s", cluster.id, bad)
                continue
            wanted.append(cluster)

        sem = asyncio.Semaphore(self.concurrency)

        async def databases(cluster: Any) -> list[Any]:
            group = _resource_group_of(cluster.id)
            async with sem:
                try:
                    return [d async for d in client.databases.list_by_cluster(group, cluster.name)]
                except ResourceNotFoundError:
                    log.debug("Azure Redis Enterprise cluster %s disappeared while listing", cluster.id)
                    return []
                except Exception as exc:
                    raise translate_error(exc, action=ACTION_DATABASES_READ, subscription_id=self.subscription_id, what=self.name) from None

        per_cluster = await asyncio.gather(*(databases(c) for c in wanted))
        out: list[DiscoveredDatabase] = []
        for cluster, dbs in zip(wanted, per_cluster):
            for db in dbs:
                record, reason = enterprise_database_record(cluster, db, self.subscription_id)
                if record is None:
                    log.debug("skipping Azure Redis Enterprise database %s: %s", db.id, reason)
                    continue
                out.append(record)
        return out


FETCHER_CLASSES = {KIND_REDIS: AzureRedisFetcher, KIND_ENTERPRISE: AzureRedisEnterpriseFetcher}


class AzureFetcherSet:
    """Fetchers for one or more matchers, one per (matcher, subscription, kind). A ``'*'``
    subscription list is resolved on every call, so new subscriptions are picked up. Pass the
    instance to ``Reconciler`` as its ``fetchers`` (it is an async callable)."""

    def __init__(
        self,
        credential: Any,
        matchers: Sequence[AzureMatcher] | AzureMatcher,
        *,
        base_url: str | None = None,
        connection_verify: Any = None,
        retry_total: int = 0,
        timeout: float = 30,
    ) -> None:
        self.credential = credential
        self.matchers = [matchers] if isinstance(matchers, AzureMatcher) else list(matchers)
        self.base_url = base_url
        self.connection_verify = connection_verify
        self.retry_total = retry_total
        self.timeout = timeout
        self._fetchers: dict[str, _AzureFetcher] = {}

    async def subscriptions_for(self, matcher: AzureMatcher, listed: list[str] | None) -> list[str]:
        if matcher.all_subscriptions:
            return list(listed or [])
        return list(matcher.subscriptions)

    async def __call__(self) -> list[_AzureFetcher]:
        listed: list[str] | None = None
        if any(m.all_subscriptions for m in self.matchers):
            subs = await list_subscriptions(
                self.credential,
                base_url=self.base_url,
                connection_verify=self.connection_verify,
                retry_total=self.retry_total,
                timeout=self.timeout,
            )
            listed = [s.subscription_id for s in subs]
        current: dict[str, _AzureFetcher] = {}
        for i, matcher in enumerate(self.matchers):
            suffix = f"#{i}" if len(self.matchers) > 1 else ""
            for sub in await self.subscriptions_for(matcher, listed):
                for kind in sorted(matcher.kinds):
                    cls = FETCHER_CLASSES[kind]
                    name = f"{cls.prefix}/{sub}{suffix}"
                    f = self._fetchers.get(name) or cls(
                        self.credential,
                        sub,
                        matcher,
                        self.base_url,
                        self.connection_verify,
                        retry_total=self.retry_total,
                        timeout=self.timeout,
                        name=name,
                    )
                    current[name] = f
        for name, old in self._fetchers.items():
            if name not in current:
                await old.close()
        self._fetchers = current
        return list(current.values())

    async def close(self) -> None:
        for f in self._fetchers.values():
            await f.close()
        self._fetchers = {}
