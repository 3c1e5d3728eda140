"""The Azure stand-in answers what the real Azure SDK sends (no SDK mocks)."""

from __future__ import annotations

import asyncio
import json
import ssl
import sys
import time
from pathlib import Path

import aiohttp
import pytest
import yaml
from azure.core.exceptions import ClientAuthenticationError
from azure.identity import CredentialUnavailableError
from azure.mgmt.redis.aio import RedisManagementClient
from azure.mgmt.redisenterprise.aio import RedisEnterpriseManagementClient

from services.azure_standin import AzureStandin, loads_tolerant

from .conftest import (
    CLIENT_ID,
    CLIENT_SECRET,
    SUB1,
    SUB2,
    TENANT,
    need_examples,
    populate,
)

ARM = "https://management.azure.com/.default"
REDIS = "https://redis.azure.com/.default"


def _ssl(standin: AzureStandin) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=standin.ca_file)


async def test_client_secret_credential_gets_arm_and_redis_tokens(standin, credential):
    arm = await credential.get_token(ARM)
    redis = await credential.get_token(REDIS)
    arm_claims = standin.verify_token(arm.token)
    redis_claims = standin.verify_token(redis.token)
    assert arm_claims["aud"] == "https://management.azure.com"
    assert redis_claims["aud"] == "https://redis.azure.com"
    assert arm_claims["tid"] == TENANT and arm_claims["appid"] == CLIENT_ID
    assert redis_claims["oid"] == arm_claims["oid"]
    assert arm.expires_on > time.time() + 600


async def test_wrong_client_secret_gets_entra_error(standin):
    from azure.identity.aio import ClientSecretCredential

    async with ClientSecretCredential(
        TENANT, CLIENT_ID, "not-the-secret", authority=standin.authority_host,
        disable_instance_discovery=True, connection_verify=standin.ca_file,
    ) as cred:
        with pytest.raises(ClientAuthenticationError) as ei:
            await cred.get_token(ARM)
    assert "invalid_client" in str(ei.value) and "AADSTS7000215" in str(ei.value)


async def test_sync_credential_uses_openid_configuration(standin):
    """The sync credential reads the openid-configuration before asking for a token."""
    from azure.identity import ClientSecretCredential

    cred = ClientSecretCredential(
        TENANT, CLIENT_ID, CLIENT_SECRET, authority=standin.authority_host,
        disable_instance_discovery=True, connection_verify=standin.ca_file,
    )
    token = await asyncio.wait_for(asyncio.to_thread(cred.get_token, ARM), 20)
    assert standin.verify_token(token.token)["appid"] == CLIENT_ID
    assert standin.request_count(f"/{TENANT}/v2.0/.well-known/openid-configuration") >= 1


async def test_openid_configuration(standin):
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{standin.base_url}/{TENANT}/v2.0/.well-known/openid-configuration", ssl=_ssl(standin)) as r:
            doc = await r.json()
    assert doc["token_endpoint"] == f"{standin.base_url}/{TENANT}/oauth2/v2.0/token"
    assert doc["authorization_endpoint"].startswith(standin.base_url)
    assert doc["issuer"] == f"{standin.base_url}/{TENANT}/v2.0"


async def test_managed_identity_imds(standin, monkeypatch):
    from azure.identity.aio import ManagedIdentityCredential

    monkeypatch.setenv("AZURE_POD_IDENTITY_AUTHORITY_HOST", standin.imds_url)
    async with ManagedIdentityCredential() as cred:
        token = await cred.get_token(REDIS)
    claims = standin.verify_token(token.token)
    assert claims["aud"] == "https://redis.azure.com"
    assert claims["oid"] == standin.config.managed_identity.oid()
    assert standin.request_count("/metadata/identity/oauth2/token") == 1

    standin.set_managed_identity(False)
    async with ManagedIdentityCredential() as cred:
        with pytest.raises(CredentialUnavailableError):
            await cred.get_token(ARM)


async def test_managed_identity_app_service_form(standin, monkeypatch):
    from azure.identity.aio import ManagedIdentityCredential

    monkeypatch.setenv("IDENTITY_ENDPOINT", standin.identity_endpoint)
    monkeypatch.setenv("IDENTITY_HEADER", standin.identity_header)
    async with ManagedIdentityCredential() as cred:
        token = await cred.get_token(ARM)
    assert standin.verify_token(token.token)["aud"] == "https://management.azure.com"
    assert standin.request_count("/msi/token") == 1


async def test_arm_requires_a_valid_bearer_token(standin):
    url = f"{standin.base_url}/subscriptions/{SUB1}/providers/Microsoft.Cache/redis?api-version=2024-11-01"
    async with aiohttp.ClientSession() as http:
        async with http.get(url, ssl=_ssl(standin)) as r:
            assert r.status == 401
            assert (await r.json())["error"]["code"] == "AuthenticationFailed"
        async with http.get(url, ssl=_ssl(standin), headers={"Authorization": "Bearer not.a.token"}) as r:
            assert r.status == 401
            assert (await r.json())["error"]["code"] == "InvalidAuthenticationToken"
        redis_token, _ = standin.issue_token("https://redis.azure.com", oid="x", appid="y")
        async with http.get(url, ssl=_ssl(standin), headers={"Authorization": f"Bearer {redis_token}"}) as r:
            assert r.status == 401  # a Redis token is not an ARM token


async def test_sdk_paths_paging_and_listkeys(standin, credential):
    populate(standin)
    standin.set_page_size(2)
    async with RedisManagementClient(credential, SUB1, base_url=standin.base_url, connection_verify=standin.ca_file, retry_total=0) as c:
        names = sorted([r.name async for r in c.redis.list_by_subscription()])
        assert names == ["catalog", "orders", "sessions"]
        by_group = [r.name async for r in c.redis.list_by_resource_group("rg-b")]  # case-insensitive
        assert by_group == ["catalog"]
        got = await c.redis.get("rg-a", "orders")
        assert got.location == "East US" and got.ssl_port == 6380 and got.tags == {"env": "prod", "team": "shop"}
        keys = await c.redis.list_keys("rg-a", "orders")
        assert keys.primary_key == standin.get_keys("orders").primary
    assert standin.request_count(f"/subscriptions/{SUB1}/providers/Microsoft.Cache/redis") == 2  # two pages
    assert any(r.query.get("$skiptoken") == "2" and r.query.get("api-version") == "2024-11-01" for r in standin.requests)

    async with RedisEnterpriseManagementClient(credential, SUB2, base_url=standin.base_url, connection_verify=standin.ca_file, retry_total=0) as c:
        clusters = [x async for x in c.redis_enterprise.list()]
        assert [x.name for x in clusters] == ["bigcache"]
        dbs = [d async for d in c.databases.list_by_cluster("rg-c", "bigcache")]
        assert dbs[0].name == "bigcache/default" and dbs[0].port == 10000
        db = await c.databases.get("rg-c", "bigcache", "default")
        assert db.client_protocol == "Encrypted"
        old = standin.get_keys(db.id).primary
        standin.set_keys(db.id)
        keys = await c.databases.list_keys("rg-c", "bigcache", "default")
        assert keys.primary_key != old and keys.primary_key == standin.get_keys(db.id).primary


async def test_fault_injection_counts_and_error_bodies(standin, credential):
    populate(standin)
    pattern = f"/subscriptions/{SUB1}/providers/Microsoft.Cache/redis"
    standin.inject_fault(pattern, 500, count=2)
    standin.inject_fault(pattern, 429, count=1, retry_after=7)
    standin.inject_fault(pattern, 403, count=1, action="Microsoft.Cache/redis/read")
    token = (await credential.get_token(ARM)).token
    statuses = []
    async with aiohttp.ClientSession() as http:
        for _ in range(5):
            async with http.get(f"{standin.base_url}{pattern}?api-version=2024-11-01", ssl=_ssl(standin), headers={"Authorization": f"Bearer {token}"}) as r:
                body = await r.json()
                statuses.append(r.status)
                if r.status == 429:
                    assert r.headers["Retry-After"] == "7"
                if r.status == 403:
                    assert body["error"]["code"] == "AuthorizationFailed"
                    assert "'Microsoft.Cache/redis/read'" in body["error"]["message"]
                if r.status == 500:
                    assert body["error"]["code"] == "InternalServerError"
    assert statuses == [500, 500, 429, 403, 200]
    assert standin.request_count(pattern) == 5
    assert standin.faults == []


def test_tolerant_json_reads_the_published_enterprise_list():
    text = (need_examples() / "RedisEnterpriseList.json").read_text()
    with pytest.raises(json.JSONDecodeError):
        json.loads(text)
    doc = loads_tolerant(text)
    cluster = doc["responses"]["200"]["body"]["value"][0]
    assert cluster["properties"]["publicNetworkAccess"] == "Disabled"
    assert loads_tolerant('{"a": "x,}", "b": [1, 2,],}') == {"a": "x,}", "b": [1, 2]}


async def test_published_examples_are_served_as_they_are(credential, tmp_path):
    s = AzureStandin(ca_file=tmp_path / "ca.pem", examples_dir=need_examples())
    s.add_service_principal(CLIENT_ID, CLIENT_SECRET)
    s.config.tenant = TENANT
    await s.start()
    try:
        from azure.identity.aio import ClientSecretCredential

        async with ClientSecretCredential(TENANT, CLIENT_ID, CLIENT_SECRET, authority=s.authority_host, disable_instance_discovery=True, connection_verify=s.ca_file) as cred:
            async with RedisManagementClient(cred, "subid", base_url=s.base_url, connection_verify=s.ca_file, retry_total=0) as c:
                caches = [x async for x in c.redis.list_by_subscription()]
                assert caches[0].location == "East US" and caches[0].provisioning_state == "Creating"
                keys = await c.redis.list_keys("rg1", "cache1")
                assert keys.primary_key == "<primaryKey>"
            sub = "e7b5a9d2-6b6a-4d2f-9143-20d9a10f5b8f"
            async with RedisEnterpriseManagementClient(cred, sub, base_url=s.base_url, connection_verify=s.ca_file, retry_total=0) as c:
                clusters = [x async for x in c.redis_enterprise.list()]
                assert clusters[0].host_name == "cache1.westus.something.azure.com"
                dbs = [d async for d in c.databases.list_by_cluster("rg1", "cache1")]
                assert dbs[0].name == "cache1/default" and dbs[0].clustering_policy == "OSSCluster"
    finally:
        await s.stop()


async def test_runs_as_a_process_with_control_endpoint(tmp_path):
    state = {
        "tenant": TENANT,
        "subscriptions": [{"id": SUB1, "display_name": "Dev"}],
        "client_credentials": [{"client_id": CLIENT_ID, "client_secret": CLIENT_SECRET}],
        "caches": [{"name": "proc-cache", "subscription": SUB1, "resourceGroup": "rg", "sslPort": 6380, "keys": {"primary": "p1", "secondary": "s1"}}],
    }
    state_file = tmp_path / "state.yaml"
    state_file.write_text(yaml.safe_dump(state))
    ready = tmp_path / "ready.json"
    ca = tmp_path / "ca.pem"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "services.azure_standin", "--state", str(state_file), "--port", "0",
        "--ca-out", str(ca), "--ready-file", str(ready),
        cwd=str(Path(__file__).resolve().parents[2]),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 15
        while not ready.exists():
            assert proc.returncode is None, (await proc.stderr.read()).decode()
            assert time.monotonic() < deadline, "stand-in process did not become ready"
            await asyncio.sleep(0.05)
        info = json.loads(ready.read_text())
        assert info["ca_file"] == str(ca) and ca.exists()
        from azure.identity.aio import ClientSecretCredential

        ctx = ssl.create_default_context(cafile=str(ca))
        async with ClientSecretCredential(TENANT, CLIENT_ID, CLIENT_SECRET, authority=info["authority_host"], disable_instance_discovery=True, connection_verify=str(ca)) as cred:
            async with RedisManagementClient(cred, SUB1, base_url=info["base_url"], connection_verify=str(ca), retry_total=0) as c:
                assert (await c.redis.list_keys("rg", "proc-cache")).primary_key == "p1"
                async with aiohttp.ClientSession() as http:
                    async with http.post(f"{info['base_url']}/_standin/keys", json={"resource": "proc-cache", "primary": "p2"}, ssl=ctx) as r:
                        assert r.status == 200
                        assert "p2" not in await r.text()
                keys = await c.redis.list_keys("rg", "proc-cache")
                assert (keys.primary_key, keys.secondary_key) == ("p2", "s1")
    finally:
        proc.terminate()
        await asyncio.wait_for(proc.wait(), 10)
    assert proc.returncode == 0
