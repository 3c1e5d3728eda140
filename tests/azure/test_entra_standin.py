"""The stand-in's Entra ID data plane behaves as Azure's: a Redis token from its token
endpoint (signed JWT with oid, exp, aud, tid) works as ``AUTH <oid> <token>`` on the local
redis-server, and a connection whose last AUTH used a token that has since expired is ended,
while one that re-authenticated with a fresh token goes on."""

from __future__ import annotations

import asyncio
import base64
import json
import time

from services.azure_standin import AzureStandin

from .conftest import CLIENT_ID, CLIENT_SECRET, TENANT, entra_config, raw_call, raw_redis

REDIS = "https://redis.azure.com/.default"


def claims(token: str) -> dict:
    body = token.split(".")[1]
    return json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))


async def _cred(s: AzureStandin):
    from azure.identity.aio import ClientSecretCredential

    return ClientSecretCredential(TENANT, CLIENT_ID, CLIENT_SECRET, authority=s.authority_host,
                                  disable_instance_discovery=True, connection_verify=s.ca_file)


async def test_token_works_on_redis_and_expired_connections_are_ended(entra_redis, tmp_path):
    s = AzureStandin(entra_config(entra_redis, redis_lifetime=4), ca_file=tmp_path / "ca.pem")
    await s.start()
    cred = await _cred(s)
    a = b = None
    try:
        t1 = await cred.get_token(REDIS)
        c1 = claims(t1.token)
        assert c1["aud"] == "https://redis.azure.com" and c1["tid"] == TENANT and c1["exp"] - c1["iat"] == 4
        assert s.verify_token(t1.token)["oid"] == c1["oid"]
        oid = c1["oid"]
        a, b = await raw_redis(entra_redis), await raw_redis(entra_redis)
        assert await raw_call(a, "AUTH", oid, t1.token) == b"+OK"
        assert await raw_call(b, "AUTH", oid, t1.token) == b"+OK"
        assert (await raw_call(b, "AUTH", oid, "not-a-token")).startswith(b"-WRONGPASS")
        await asyncio.sleep(2)
        async with await _cred(s) as other:  # a second credential: the first one's cache holds t1
            t2 = await other.get_token(REDIS)
        assert t2.token != t1.token and t2.expires_on >= t1.expires_on + 2
        assert await raw_call(b, "AUTH", oid, t2.token) == b"+OK"
        await asyncio.sleep(max(0.0, t1.expires_on + 1.2 - time.time()))
        assert await raw_call(a, "PING") == b"", "the connection on the expired token was not ended"
        assert await raw_call(b, "PING") == b"+PONG"
        # the expired token no longer logs in anywhere
        late = await raw_redis(entra_redis)
        assert (await raw_call(late, "AUTH", oid, t1.token)).startswith(b"-WRONGPASS")
        late[1].close()
        await asyncio.sleep(max(0.0, t2.expires_on + 1.2 - time.time()))
        assert await raw_call(b, "PING") == b""
        killed = s.entra_redis.status()[0]["killed"]
        assert len(killed) == 2 and all(k["user"] == oid for k in killed)
    finally:
        for c in (a, b):
            if c is not None:
                c[1].close()
        await cred.close()
        await s.stop()


async def test_a_quiet_server_keeps_its_expired_connections_ended(entra_redis, tmp_path, caplog):
    # Nothing but the stand-in's own CLIENT LIST talks to the server for longer than a read
    # timeout (CLIENT and ACL do not show in MONITOR): the stand-in must not take the quiet
    # for a failure (it did: its users were set up again and expired connections lived on).
    s = AzureStandin(entra_config(entra_redis, redis_lifetime=13), ca_file=tmp_path / "ca.pem")
    await s.start()
    cred = await _cred(s)
    a = None
    try:
        t = await cred.get_token(REDIS)
        a = await raw_redis(entra_redis)
        assert await raw_call(a, "AUTH", claims(t.token)["oid"], t.token) == b"+OK"
        caplog.clear()
        await asyncio.sleep(max(0.0, t.expires_on + 1.5 - time.time()))  # 14 s with no command
        assert s.entra_redis.status()[0]["ready"]
        assert not [r.getMessage() for r in caplog.records if "retrying" in r.getMessage()]
        assert await raw_call(a, "PING") == b"", "the connection on the expired token was not ended"
    finally:
        if a is not None:
            a[1].close()
        await cred.close()
        await s.stop()


async def test_control_patch_applies_its_body(standin):
    import aiohttp
    import ssl

    from .conftest import SUB1

    standin.add_cache(name="c1", subscription=SUB1, resource_group="rg")
    standin.add_enterprise_cluster(name="e1", subscription=SUB1, resource_group="rg")
    ctx = ssl.create_default_context(cafile=standin.ca_file)
    async with aiohttp.ClientSession() as http:
        async with http.patch(f"{standin.base_url}/_standin/caches", ssl=ctx,
                              json={"name": "c1", "disableAccessKeyAuthentication": True}) as r:
            assert r.status == 200, await r.text()
        async with http.patch(f"{standin.base_url}/_standin/enterprise", ssl=ctx,
                              json={"name": "e1", "database": {"accessKeysAuthentication": "Disabled"}}) as r:
            assert r.status == 200, await r.text()
    arm = standin.find_cache("c1").to_arm()["properties"]
    assert arm["disableAccessKeyAuthentication"] is True and arm["redisConfiguration"]["aad-enabled"] == "true"
    assert standin.find_enterprise_cluster("e1").databases[0].access_keys_authentication == "Disabled"
