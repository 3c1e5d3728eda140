"""What discovery and dbproxy share of Azure: the credential, the SDK clients' settings,
readable errors (a 403 names the missing action and the command that prints the role),
resource ids, and the access keys from listKeys (which never reach a log or a message)."""

from __future__ import annotations

import asyncio
import logging
import os
import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

from azure.core.exceptions import (
    ClientAuthenticationError,
    HttpResponseError,
    ServiceRequestError,
    ServiceResponseError,
)

log = logging.getLogger("cachegate.azure")

KIND_REDIS = "redis"
KIND_ENTERPRISE = "redis-enterprise"
ROLE_HINT = "run `cachegate db configure azure-role --subscription={sub}` and assign the role to the identity discovery runs as"
SUBSCRIPTIONS_API_VERSION = "2022-12-01"

ACTION_REDIS_READ = "Microsoft.Cache/redis/read"
ACTION_REDIS_KEYS = "Microsoft.Cache/redis/listKeys/action"
ACTION_ENTERPRISE_READ = "Microsoft.Cache/redisEnterprise/read"
ACTION_DATABASES_READ = "Microsoft.Cache/redisEnterprise/databases/read"
ACTION_DATABASES_KEYS = "Microsoft.Cache/redisEnterprise/databases/listKeys/action"
ACTION_SUBSCRIPTIONS_READ = "Microsoft.Resources/subscriptions/read"


# --------------------------------------------------------------------------- errors
class AzureDiscoveryError(Exception):
    """A discovery failure with a message fit for a log line or a status API."""

    retryable = False

    def __init__(self, message: str, *, status: int | None = None, retry_after: float | None = None):
        super().__init__(message)
        self.status = status
        self.retry_after = retry_after

    def one_line(self) -> str:
        return " ".join(line.strip() for line in str(self).splitlines() if line.strip())


class AzurePermissionError(AzureDiscoveryError):
    def __init__(self, message: str, *, action: str, subscription_id: str | None):
        super().__init__(message, status=403)
        self.action = action
        self.subscription_id = subscription_id


class AzureCredentialError(AzureDiscoveryError):
    pass


class AzureThrottledError(AzureDiscoveryError):
    retryable = True


class AzureServerError(AzureDiscoveryError):
    retryable = True


class AzureNotFoundError(AzureDiscoveryError):
    pass


_ACTION_RX = re.compile(r"perform action '([^']+)'")
CREDENTIAL_HINT = (
    "Check that the discovery host has a managed identity attached, or that AZURE_TENANT_ID, "
    "AZURE_CLIENT_ID and AZURE_CLIENT_SECRET are set in its environment, then restart it."
)


def _parse_retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        import datetime as _dt
        from email.utils import parsedate_to_datetime

        when = parsedate_to_datetime(value)
        return max(0.0, (when - _dt.datetime.now(_dt.UTC)).total_seconds())
    except (TypeError, ValueError):
        return None


def _arm_error(exc: HttpResponseError) -> tuple[str | None, str]:
    err = getattr(exc, "error", None)
    code = getattr(err, "code", None)
    message = getattr(err, "message", None)
    if not message:
        lines = (exc.message or "").splitlines()
        message = lines[0] if lines else ""
    return code, (message or exc.reason or "").strip()


def credential_error(exc: BaseException) -> AzureCredentialError:
    """DefaultAzureCredential's first line plus a hint (and the failing credential's reason
    when one of them was configured but failed)."""
    text = str(getattr(exc, "message", None) or exc)
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    first = lines[0] if lines else "Azure credential failed to retrieve a token."
    detail = ""
    for ln in lines[1:]:
        low = ln.lower()
        if "unavailable" in low or low.startswith("attempted credentials") or low.startswith("to mitigate") or "troubleshoot" in low:
            continue
        detail = ln
        break
    detail = re.split(r"\s+Trace ID:", detail)[0].rstrip(" '\"")
    if len(detail) > 300:
        detail = detail[:297] + "..."
    hint = CREDENTIAL_HINT if not detail else f"{detail} -- {CREDENTIAL_HINT}"
    return AzureCredentialError(f"{first}\n{hint}")


def translate_error(
    exc: BaseException,
    *,
    action: str,
    subscription_id: str | None = None,
    what: str = "",
) -> AzureDiscoveryError:
    """Turn an Azure SDK exception into a one-line AzureDiscoveryError."""
    if isinstance(exc, AzureDiscoveryError):
        return exc
    sub = subscription_id or "<subscription>"
    where = f" ({what})" if what else ""
    if isinstance(exc, HttpResponseError) and exc.status_code is not None and exc.response is not None and getattr(exc, "error", None) is not None:
        status = exc.status_code
        code, message = _arm_error(exc)
        if status == 403:
            m = _ACTION_RX.search(message)
            denied = m.group(1) if m else action
            return AzurePermissionError(
                f"Azure denied '{denied}' on subscription {sub}{where}: the identity lacks this permission; "
                + ROLE_HINT.format(sub=sub),
                action=denied,
                subscription_id=subscription_id,
            )
        if status == 401:
            return AzureCredentialError(f"Azure Resource Manager rejected the access token{where}: {code}: {message}", status=401)
        if status == 429:
            retry_after = _parse_retry_after(exc.response.headers.get("Retry-After"))
            return AzureThrottledError(f"Azure throttled the request{where}: {code or 'TooManyRequests'}", status=429, retry_after=retry_after)
        if status >= 500:
            return AzureServerError(f"Azure answered {status}{where}: {code or exc.reason}: {message}"[:400], status=status, retry_after=_parse_retry_after(exc.response.headers.get("Retry-After")))
        if status == 404:
            return AzureNotFoundError(f"Azure: {code or 'NotFound'}{where}: {message}"[:400], status=404)
        return AzureDiscoveryError(f"Azure answered {status}{where}: {code}: {message}"[:400], status=status)
    if isinstance(exc, ClientAuthenticationError):
        return credential_error(exc)
    if isinstance(exc, HttpResponseError) and exc.status_code is not None:
        status = exc.status_code
        if status == 429 or status >= 500:
            headers = exc.response.headers if exc.response is not None else {}
            cls = AzureThrottledError if status == 429 else AzureServerError
            return cls(f"Azure answered {status}{where}", status=status, retry_after=_parse_retry_after(headers.get("Retry-After")))
        return AzureDiscoveryError(f"Azure answered {status}{where}: {exc.reason}", status=status)
    if isinstance(exc, (ServiceRequestError, ServiceResponseError, asyncio.TimeoutError, OSError)):
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return AzureServerError(f"cannot reach Azure Resource Manager{where}: {first[:200]}")
    return AzureDiscoveryError(f"Azure request failed{where}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:400])


# --------------------------------------------------------------------------- credential
def _is_local(url: str | None) -> bool:
    if not url:
        return False
    host = urlparse(url if "://" in url else f"https://{url}").hostname or ""
    return host in {"127.0.0.1", "::1", "localhost"}


def make_credential(authority_host: str | None = None, ca_file: str | None = None, **kwargs: Any):
    """DefaultAzureCredential (async). With a loopback authority (the local stand-in) instance
    discovery is disabled and the developer-tool credentials, which would talk to real
    Microsoft hosts, are left out; ``ca_file`` is trusted for the token requests."""
    from azure.identity.aio import DefaultAzureCredential

    authority = authority_host or os.environ.get("AZURE_AUTHORITY_HOST")
    if authority:
        kwargs.setdefault("authority", authority)
    if _is_local(authority):
        kwargs.setdefault("disable_instance_discovery", True)
        for flag in (
            "exclude_cli_credential",
            "exclude_powershell_credential",
            "exclude_developer_cli_credential",
            "exclude_visual_studio_code_credential",
            "exclude_shared_token_cache_credential",
        ):
            kwargs.setdefault(flag, True)
    if ca_file:
        kwargs.setdefault("connection_verify", ca_file)
    return DefaultAzureCredential(**kwargs)


# --------------------------------------------------------------------------- helpers
_RID_RX = re.compile(
    r"^/subscriptions/(?P<sub>[^/]+)/resourcegroups/(?P<rg>[^/]+)/providers/microsoft\.cache/"
    r"(?P<type>redis|redisenterprise)/(?P<name>[^/]+)(?:/databases/(?P<db>[^/]+))?/?$",
    re.IGNORECASE,
)


@dataclass(frozen=True)
class ResourceRef:
    subscription_id: str
    resource_group: str
    kind: str
    name: str  # cache or cluster name
    database: str | None = None


def parse_resource_id(resource_id: str) -> ResourceRef:
    m = _RID_RX.match(resource_id or "")
    if not m:
        raise ValueError(f"not an Azure Redis resource id: {resource_id!r}")
    kind = KIND_REDIS if m["type"].lower() == "redis" else KIND_ENTERPRISE
    if kind == KIND_ENTERPRISE and not m["db"]:
        raise ValueError(f"an Enterprise resource id must name a database: {resource_id!r}")
    return ResourceRef(m["sub"], m["rg"], kind, m["name"], m["db"])


# --------------------------------------------------------------------------- clients
def _client_kwargs(base_url: str | None, connection_verify: Any, retry_total: int, timeout: float) -> dict[str, Any]:
    kw: dict[str, Any] = {
        "retry_total": retry_total,
        "connection_timeout": timeout,
        "read_timeout": timeout,
        "user_agent": "cachegate-discovery",
    }
    if base_url:
        kw["base_url"] = base_url.rstrip("/")
    if connection_verify is not None:
        kw["connection_verify"] = connection_verify
    return kw


# --------------------------------------------------------------------------- access keys
class RedisKeys(tuple):
    """(primary, secondary) access keys; repr/str never show them."""

    def __new__(cls, primary: str | None, secondary: str | None) -> RedisKeys:
        return super().__new__(cls, (primary, secondary))

    @property
    def primary(self) -> str | None:
        return self[0]

    @property
    def secondary(self) -> str | None:
        return self[1]

    def __repr__(self) -> str:
        return "RedisKeys(primary=***, secondary=***)"

    __str__ = __repr__


async def fetch_redis_keys(
    credential: Any,
    resource_id: str,
    *,
    base_url: str | None = None,
    connection_verify: Any = None,
    retry_total: int = 3,
    timeout: float = 30,
) -> RedisKeys:
    """Access keys of an Azure Cache for Redis (``.../Microsoft.Cache/redis/NAME``) or an
    Enterprise database (``.../redisEnterprise/CLUSTER/databases/DB``) via listKeys."""
    ref = parse_resource_id(resource_id)
    kw = _client_kwargs(base_url, connection_verify, retry_total, timeout)
    if ref.kind == KIND_REDIS:
        from azure.mgmt.redis.aio import RedisManagementClient

        action = ACTION_REDIS_KEYS
        try:
            async with RedisManagementClient(credential, ref.subscription_id, **kw) as client:
                keys = await client.redis.list_keys(ref.resource_group, ref.name)
        except Exception as exc:
            raise translate_error(exc, action=action, subscription_id=ref.subscription_id, what=f"listKeys of {ref.name}") from None
    else:
        from azure.mgmt.redisenterprise.aio import RedisEnterpriseManagementClient

        action = ACTION_DATABASES_KEYS
        try:
            async with RedisEnterpriseManagementClient(credential, ref.subscription_id, **kw) as client:
                keys = await client.databases.list_keys(ref.resource_group, ref.name, ref.database or "default")
        except Exception as exc:
            raise translate_error(exc, action=action, subscription_id=ref.subscription_id, what=f"listKeys of {ref.name}/{ref.database}") from None
    return RedisKeys(keys.primary_key, keys.secondary_key)
