"""dbproxy's Entra ID token provider with the real azure-identity against the stand-in:
the token and its object id for AUTH, one token shared and refreshed ahead of expiry, a new
one on demand, managed identity, and a dead token endpoint reported in one line."""

from __future__ import annotations

import asyncio
import logging
import time

import pytest

from services.common.config import AzureEndpoints
from services.dbproxy.entra import PREFIX, EntraCredentials, EntraTokenCache, refresh_lead, token_oid
from services.dbproxy.keys import CredentialError

from .conftest import CLIENT_ID


def _endpoints(standin) -> AzureEndpoints:
    return AzureEndpoints(authority_host=standin.authority_host, ca_file=standin.ca_file)


@pytest.fixture
def client_secret_env(standin, monkeypatch):
    for k, v in standin.env_for_client_secret().items():
        monkeypatch.setenv(k, v)


def test_refresh_lead_is_inside_azure_guidance():
    for life in (3600, 5400):
        assert 240 <= refresh_lead(life, lambda a, b: a) and refresh_lead(life, lambda a, b: b) <= 285
    assert 180 < refresh_lead(3600) < 300
    assert 1 <= refresh_lead(4, lambda a, b: b) < 2  # short test tokens are replaced too


def test_token_oid_parses_robustly():
    import base64
    import json

    def jwt(claims) -> str:
        body = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
        return f"eyJhbGciOiJSUzI1NiJ9.{body}.sig"

    assert token_oid(jwt({"oid": "abc"})) == "abc"
    for bad in ("", "nodots", jwt({"sub": "x"}), "a.!!!.c", jwt(["oid"])):
        with pytest.raises(ValueError):
            token_oid(bad)


async def test_token_shared_refreshed_ahead_and_forced(standin, client_secret_env, caplog):
    standin.set_token_lifetime(redis_seconds=6)
    cache = EntraTokenCache(_endpoints(standin), timeout=5)
    a, b = EntraCredentials(cache, "db-a"), EntraCredentials(cache, "db-b")
    try:
        with caplog.at_level(logging.INFO):
            oid, tok = await a.get()
            oid2, tok2, exp = await b.expiring()
        sp = standin.config.client_credentials[0]
        assert oid == oid2 == sp.oid() and tok == tok2 and cache.fetches == 1
        assert standin.verify_token(tok)["appid"] == CLIENT_ID and abs(exp - standin.verify_token(tok)["exp"]) < 1
        # the background refresh replaces it before it expires (6 s tokens: 1.5 to 2.1 s early)
        await asyncio.sleep(exp - time.time() - 1.0)
        _, tok3, exp3 = await a.expiring()
        assert tok3 != tok and exp3 > exp and cache.fetches == 2
        # on demand (WRONGPASS, or the session core's re-AUTH): a different token at once
        _, tok4 = await a.get(force_refresh=True)
        assert tok4 != tok3 and cache.fetches == 3
        assert tok not in caplog.text and tok3 not in caplog.text and tok4 not in caplog.text
    finally:
        await cache.close()


async def test_managed_identity(standin, monkeypatch):
    monkeypatch.setenv("AZURE_POD_IDENTITY_AUTHORITY_HOST", standin.imds_url)
    cache = EntraTokenCache(_endpoints(standin), timeout=5)
    try:
        oid, tok = await EntraCredentials(cache).get()
        assert oid == standin.config.managed_identity.oid()
        assert standin.verify_token(tok)["aud"] == "https://redis.azure.com"
    finally:
        await cache.close()


async def test_token_endpoint_down_is_one_line_quickly_and_logged_once(standin, client_secret_env, caplog):
    standin.inject_fault("*/oauth2/v2.0/token", 503, count=None)
    cache = EntraTokenCache(_endpoints(standin), timeout=3, log_interval=60)
    creds = EntraCredentials(cache, "db")
    try:
        with caplog.at_level(logging.INFO, logger="cachegate.dbproxy.entra"):
            for _ in range(2):
                started = time.monotonic()
                with pytest.raises(CredentialError) as ei:
                    await creds.get()
                assert time.monotonic() - started < 4
                msg = str(ei.value)
                assert msg.startswith(f"{PREFIX}: ") and "\n" not in msg and "AZURE_" in msg
        logged = [r for r in caplog.records if "DefaultAzureCredential: failed to acquire a token" in r.getMessage()]
        assert len(logged) == 1 and "restart the Database Service" in logged[0].getMessage()
        assert "test-client-secret" not in caplog.text and "test-client-secret" not in msg
    finally:
        await cache.close()
