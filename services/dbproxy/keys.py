"""How dbproxy authenticates to each database, so that users never hold a secret.

* Azure databases: the access keys from ARM's listKeys (the real SDK), the
  primary first; cached per database; fetched again once when Redis answers
  WRONGPASS/NOAUTH (a rotated key), falling back to the secondary when the
  primary did not change.
* Azure databases with ``auth: entra`` (access keys disabled): an Entra ID token for
  the proxy's principal, ``AUTH <oid> <token>`` (see ``services/dbproxy/entra.py``).
* Static and admin-defined databases: the secret named by ``secret_ref``
  (``env:NAME`` or ``file:/path``), read when a session starts.

No key is ever logged, audited or put in an exception message.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from pathlib import Path

from cachegate.types.v1 import types_pb2
from services.dbproxy.upstream import StaticCredentials

log = logging.getLogger("cachegate.dbproxy.keys")

KEY_CACHE_TTL = 3600.0


class CredentialError(Exception):
    """One line for the user, without any secret."""


class SecretRefCredentials:
    """The password of a static database, from the proxy's environment or a file."""

    def __init__(self, db_name: str, ref: str):
        self.db_name = db_name
        self.ref = ref.strip()

    async def get(self, force_refresh: bool = False) -> tuple[str | None, str]:
        kind, _, where = self.ref.partition(":")
        if kind == "env":
            value = os.environ.get(where)
            if value is None:
                raise CredentialError(f'the secret of database "{self.db_name}" is not set on the proxy: '
                                      f"set the environment variable {where} for the dbproxy service")
            return None, value
        if kind == "file":
            try:
                return None, Path(where).read_text().strip()
            except OSError as exc:
                raise CredentialError(f'the proxy cannot read the secret of database "{self.db_name}" '
                                      f"from {where}: {exc.strerror}") from None
        raise CredentialError(f'database "{self.db_name}" has a bad secret reference: use env:NAME or file:/path')


class AzureKeyCache:
    """listKeys results per resource id, shared by every session of the proxy."""

    def __init__(self, endpoints):
        self.endpoints = endpoints
        self._credential = None
        self._keys: dict[str, tuple[float, object]] = {}
        self._locks: dict[str, asyncio.Lock] = {}

    def _cred(self):
        if self._credential is None:
            from services.common.azure import make_credential

            self._credential = make_credential(self.endpoints.authority_host or None,
                                               self.endpoints.ca_file or None)
        return self._credential

    async def keys(self, resource_id: str, refresh: bool = False):
        from services.common.azure import AzureDiscoveryError, fetch_redis_keys

        lock = self._locks.setdefault(resource_id, asyncio.Lock())
        async with lock:
            cached = self._keys.get(resource_id)
            if cached and not refresh and time.monotonic() - cached[0] < KEY_CACHE_TTL:
                return cached[1]
            try:
                keys = await fetch_redis_keys(self._cred(), resource_id,
                                              base_url=self.endpoints.resource_manager or None,
                                              connection_verify=self.endpoints.ca_file or None, retry_total=1,
                                              timeout=10)
            except AzureDiscoveryError as exc:
                raise CredentialError(f"the proxy could not get the access key: {exc.one_line()}") from None
            self._keys[resource_id] = (time.monotonic(), keys)
            log.info("fetched access keys", extra={"resource_id": resource_id, "refreshed": refresh})
            return keys

    async def close(self) -> None:
        if self._credential is not None:
            await self._credential.close()


class AzureCredentials:
    """One session's view: the primary key, then (after WRONGPASS) fresh keys."""

    def __init__(self, cache: AzureKeyCache, db: types_pb2.Database):
        self.cache = cache
        self.db = db
        self._last: str | None = None

    async def get(self, force_refresh: bool = False) -> tuple[str | None, str]:
        keys = await self.cache.keys(self.db.azure.resource_id, refresh=force_refresh)
        password = keys.primary or keys.secondary
        if force_refresh and password == self._last and keys.secondary:
            password = keys.secondary  # the primary did not change: try the other one
        if not password:
            raise CredentialError(f'Azure returned no access key for "{self.db.name}"')
        self._last = password
        return None, password


class _Refusing:
    def __init__(self, message: str):
        self.message = message

    async def get(self, force_refresh: bool = False):
        raise CredentialError(self.message)


AUTH_ACCESS_KEY = "access_key"
AUTH_ENTRA = "entra"


def database_auth(db: types_pb2.Database) -> str:
    """How the proxy authenticates to ``db``: "entra", "access_key" (Azure listKeys) or ""
    (a static secret, or none). The record's ``azure.auth`` wins; a record without it (made
    before the field existed) takes Entra ID when its access keys are disabled."""
    auth = (db.azure.auth or "").strip().lower().replace("-", "_")
    if auth in (AUTH_ENTRA, "entra_id", "aad"):
        return AUTH_ENTRA
    if auth == AUTH_ACCESS_KEY:
        return AUTH_ACCESS_KEY if db.azure.resource_id else ""
    if db.azure.access_key_auth_disabled:
        return AUTH_ENTRA
    return AUTH_ACCESS_KEY if db.azure.resource_id else ""


def credentials_for(db: types_pb2.Database, azure: AzureKeyCache, entra=None):
    """The credential provider of one session to ``db``; ``entra`` is the proxy's
    :class:`~services.dbproxy.entra.EntraTokenCache`."""
    auth = database_auth(db)
    if auth == AUTH_ENTRA:
        from services.dbproxy.entra import EntraCredentials, EntraTokenCache

        if not db.tls:
            return _Refusing(f'database "{db.name}" takes Entra ID tokens, which the proxy sends over TLS only: '
                             "set tls: true on its record")
        if entra is None:
            entra = EntraTokenCache(azure.endpoints)
        return EntraCredentials(entra, db.name)
    if auth == AUTH_ACCESS_KEY:
        return AzureCredentials(azure, db)
    if db.secret_ref:
        return SecretRefCredentials(db.name, db.secret_ref)
    return StaticCredentials(None, "")
