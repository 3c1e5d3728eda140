"""Microsoft Entra ID tokens for Redis: how dbproxy authenticates to a database whose record
says ``auth: entra`` (access keys disabled, or chosen by an administrator).

* One :class:`EntraTokenCache` per proxy: one ``DefaultAzureCredential`` (managed identity in
  production; AZURE_TENANT_ID / AZURE_CLIENT_ID / AZURE_CLIENT_SECRET for development), built
  like the ARM credential (authority host, no instance discovery, the configured CA bundle),
  and the current token of the principal it signs in as, shared by every session and every
  Entra database of the proxy. Scope ``https://redis.azure.com/.default``.
* The token is fetched ahead of need (:meth:`EntraTokenCache.prefetch` when an Entra
  database is known, and by the first session otherwise) and refreshed in the background
  before it expires: at ``lead + jitter`` seconds before ``exp``, where ``lead`` is
  min(240 s, a quarter of the lifetime) and ``jitter`` is random in [0, min(45 s, a tenth of
  the lifetime)] -- for Azure's 60-90 minute tokens, 4 to 4.75 minutes before expiry, inside
  the 5 minutes in which azure-identity itself fetches a new token, and more than Microsoft's
  3 minutes. A refresh that fails is retried (the old token is served while it is valid).
* ``AUTH <oid> <token>``: the object id is the token's ``oid`` claim (read from the JWT
  payload; the signature is Entra's business).
* A failure is one line for the client, ``Entra ID token could not be obtained: <first line
  of the credential's error>``, and in the log the guide's troubleshooting text
  ("DefaultAzureCredential: failed to acquire a token ...") once per ``log_interval``.

No token is ever logged, audited or put in a message.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import random
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from services.dbproxy.keys import CredentialError
from services.dbproxy.upstream import UpstreamError

log = logging.getLogger("cachegate.dbproxy.entra")

REDIS_SCOPE = "https://redis.azure.com/.default"
PREFIX = "Entra ID token could not be obtained"
TROUBLESHOOTING = (
    "DefaultAzureCredential: failed to acquire a token. dbproxy could not get a Microsoft Entra ID token for "
    "Redis (scope https://redis.azure.com/.default). Check whether the credentials have been applied on the "
    "machine running the dbproxy service (a managed identity attached to it, or AZURE_TENANT_ID, AZURE_CLIENT_ID "
    "and AZURE_CLIENT_SECRET in its environment) and restart the Database Service (dbproxy); see "
    "docs/azure-setup.md, 'Entra ID'."
)


class EntraTokenError(CredentialError, UpstreamError):
    """``Entra ID token could not be obtained: ...``: one line, no secret. An UpstreamError
    too (reason ``credentials``), so the session shows it to the client as it is."""

    def __init__(self, message: str) -> None:
        Exception.__init__(self, message)
        self.reason = "credentials"


@dataclass
class EntraToken:
    oid: str
    value: str = field(repr=False)
    expires_at: float  # epoch seconds
    fetched_at: float

    @property
    def lifetime(self) -> float:
        return max(1.0, self.expires_at - self.fetched_at)


def token_oid(token: str) -> str:
    """The ``oid`` claim of a JWT access token (no signature check). ValueError when the
    token is not a JWT with an object id."""
    parts = token.split(".") if isinstance(token, str) else []
    if len(parts) < 2 or not parts[1]:
        raise ValueError("the token is not a JWT")
    body = parts[1]
    try:
        claims = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    except (ValueError, TypeError) as exc:
        raise ValueError("the token's payload is not JSON") from exc
    oid = claims.get("oid") if isinstance(claims, dict) else None
    if not isinstance(oid, str) or not oid.strip():
        raise ValueError("the token has no oid (object id) claim")
    return oid.strip()


def refresh_lead(lifetime: float, rnd: Callable[[float, float], float] = random.uniform) -> float:
    """Seconds before expiry at which a token of ``lifetime`` seconds is replaced."""
    return min(240.0, lifetime / 4) + rnd(0.0, min(45.0, lifetime / 10))


def _first_line(exc: BaseException) -> str:
    text = str(getattr(exc, "message", None) or exc)
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    first = lines[0] if lines else type(exc).__name__
    return re.split(r"\s+Trace ID:", first)[0][:300]


def _detail(exc: BaseException) -> str:
    """The reason of the credential that was configured but failed (DefaultAzureCredential
    lists one line per credential; the unavailable ones say so)."""
    text = str(getattr(exc, "message", None) or exc)
    for ln in [x.strip() for x in text.splitlines() if x.strip()][1:]:
        low = ln.lower()
        if "unavailable" in low or low.startswith(("attempted credentials", "to mitigate")) or "troubleshoot" in low:
            continue
        return re.split(r"\s+Trace ID:", ln)[0].rstrip(" '\"")[:300]
    return ""


class EntraTokenCache:
    """The proxy's Entra ID token for Redis, shared by all sessions (see the module doc)."""

    def __init__(self, endpoints: Any = None, *, timeout: float = 8.0, log_interval: float = 60.0,
                 credential_factory: Callable[[], Any] | None = None) -> None:
        self.endpoints = endpoints
        self.timeout = timeout
        self.log_interval = log_interval
        self._factory = credential_factory or self._make_credential
        self._credential: Any = None
        self._token: EntraToken | None = None
        self._lock = asyncio.Lock()
        self._refresher: asyncio.Task | None = None
        self._last_logged = float("-inf")
        self._closed = False
        self.fetches = 0  # tokens fetched (tests, metrics)

    # ------------------------------------------------------------------ credential
    def _make_credential(self) -> Any:
        from services.common.azure import make_credential

        ep = self.endpoints
        return make_credential(getattr(ep, "authority_host", "") or None, getattr(ep, "ca_file", "") or None,
                               retry_total=0, connection_timeout=min(5.0, self.timeout))

    def _cred(self) -> Any:
        if self._credential is None:
            self._credential = self._factory()
        return self._credential

    # ------------------------------------------------------------------ public
    async def token(self, force_refresh: bool = False) -> EntraToken:
        """A valid token: the cached one, or a new one when there is none, it is about to
        expire, or ``force_refresh`` (then a token other than the cached one when the
        token endpoint gives one)."""
        if self._closed:
            raise EntraTokenError(f"{PREFIX}: the proxy is shutting down")
        cur = self._token
        if cur is not None and not force_refresh and cur.expires_at - time.time() > self._min_valid(cur):
            self._ensure_refresher()
            return cur
        asked = self.fetches
        async with self._lock:
            cur = self._token
            if cur is not None and cur.expires_at - time.time() > self._min_valid(cur) and (
                    not force_refresh or self.fetches > asked):  # fetched while this call waited
                return cur
            try:
                tok = await self._fetch(different_from=cur if force_refresh else None)
            except EntraTokenError:
                if cur is not None and cur.expires_at - time.time() > 1.0 and not force_refresh:
                    return cur  # the refresh failed; the old token still works for now
                raise
            self._ensure_refresher()
            return tok

    def prefetch(self) -> None:
        """Fetch in the background now (an Entra database became known)."""
        if self._closed or self._refresher is not None:
            return
        if self._token is None:
            task = asyncio.ensure_future(self._prefetch())
            task.add_done_callback(lambda t: t.cancelled() or t.exception())
        else:
            self._ensure_refresher()

    async def close(self) -> None:
        self._closed = True
        if self._refresher is not None:
            self._refresher.cancel()
            await asyncio.gather(self._refresher, return_exceptions=True)
            self._refresher = None
        if self._credential is not None:
            try:
                await self._credential.close()
            except Exception:  # noqa: BLE001
                pass
            self._credential = None

    @property
    def current(self) -> EntraToken | None:
        return self._token

    # ------------------------------------------------------------------ internals
    @staticmethod
    def _min_valid(tok: EntraToken) -> float:
        """A token with less than this left is not handed to a new connection."""
        return min(60.0, tok.lifetime / 10)

    async def _prefetch(self) -> None:
        try:
            await self.token()
        except EntraTokenError:
            pass  # logged; sessions will get the error themselves

    def _ensure_refresher(self) -> None:
        if self._refresher is None and not self._closed:
            self._refresher = asyncio.ensure_future(self._refresh_loop())

    async def _refresh_loop(self) -> None:
        retry = 1.0
        while not self._closed:
            cur = self._token
            if cur is None:
                wait = retry
            else:
                wait = cur.expires_at - refresh_lead(cur.lifetime) - time.time()
            if wait > 0:
                await asyncio.sleep(wait)
            try:
                async with self._lock:
                    cur = self._token
                    if cur is not None and cur.expires_at - time.time() > refresh_lead(cur.lifetime) + 1:
                        continue  # a forced refresh already replaced it
                    tok = await self._fetch(different_from=cur)
                if cur is not None and tok.value == cur.value:  # the endpoint gave the same one again
                    retry = min(30.0, retry * 2)
                    await asyncio.sleep(retry)
                else:
                    retry = 1.0
            except EntraTokenError:
                left = (self._token.expires_at - time.time()) if self._token else 0.0
                retry = min(30.0, retry * 2)
                await asyncio.sleep(max(0.5, min(retry, left / 4 if left > 0 else retry)))
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - never let the refresher die
                log.exception("Entra ID token refresh failed unexpectedly")
                await asyncio.sleep(retry)

    async def _get_token(self, credential: Any) -> Any:
        return await credential.get_token(REDIS_SCOPE)

    async def _fetch(self, different_from: EntraToken | None = None) -> EntraToken:
        """A token from the credential (a new one when ``different_from`` is given: the
        credential's own cache hands back the old token while it has over 5 minutes left, so
        a second credential, without that cache, is asked then)."""
        started = time.time()
        try:
            async with asyncio.timeout(self.timeout):
                at = await self._get_token(self._cred())
                if different_from is not None and at.token == different_from.value:
                    fresh = self._factory()
                    try:
                        at = await self._get_token(fresh)
                    finally:
                        await fresh.close()
        except TimeoutError:
            raise self._failed(None, f"the token endpoint did not answer within {self.timeout:g}s") from None
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - ClientAuthenticationError and anything the chain raises
            raise self._failed(exc) from None
        try:
            oid = token_oid(at.token)
        except ValueError as exc:
            raise self._failed(None, f"Entra ID returned an unusable token: {exc}") from None
        tok = EntraToken(oid=oid, value=at.token, expires_at=float(at.expires_on), fetched_at=started)
        self._token = tok
        self.fetches += 1
        log.info("fetched an Entra ID token for Redis", extra={
            "principal_oid": oid, "expires_in": int(tok.expires_at - time.time()),
            "refresh_in": int(max(0.0, tok.expires_at - refresh_lead(tok.lifetime, lambda a, b: a) - time.time()))})
        return tok

    def _failed(self, exc: BaseException | None, why: str | None = None) -> EntraTokenError:
        first = why or _first_line(exc)  # type: ignore[arg-type]
        detail = _detail(exc) if exc is not None else ""
        line = f"{PREFIX}: {first}"
        if detail and detail not in first:
            line += f" ({detail})"
        line += "; check the managed identity or the AZURE_* client-secret settings of the dbproxy host"
        now = time.monotonic()
        if now - self._last_logged >= self.log_interval:
            self._last_logged = now
            full = " | ".join(x.strip() for x in str(exc or why).splitlines() if x.strip())[:2000]
            log.error("%s Error: %s", TROUBLESHOOTING, full)
        return EntraTokenError(line)


class EntraCredentials:
    """One session's credential provider for an Entra ID database."""

    def __init__(self, cache: EntraTokenCache, db_name: str = "") -> None:
        self.cache = cache
        self.db_name = db_name

    async def get(self, force_refresh: bool = False) -> tuple[str, str]:
        """(oid, token) for AUTH <oid> <token>; raises CredentialError("Entra ID token could
        not be obtained: <first line>")."""
        tok = await self.cache.token(force_refresh)
        return tok.oid, tok.value

    async def expiring(self, force_refresh: bool = False) -> tuple[str, str, float]:
        """(oid, token, expires_at epoch seconds): the same token get() would give, with its
        expiry."""
        tok = await self.cache.token(force_refresh)
        return tok.oid, tok.value, tok.expires_at

    def __repr__(self) -> str:
        return f"EntraCredentials({self.db_name!r})"
