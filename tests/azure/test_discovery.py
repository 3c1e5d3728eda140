"""Discovery fetchers with the real Azure SDK against the stand-in."""

from __future__ import annotations

import logging

import pytest

from services.azure_standin import AzureStandin
from services.discovery.azure import (
    AzureCredentialError,
    AzureFetcherSet,
    AzurePermissionError,
    AzureRedisEnterpriseFetcher,
    AzureRedisFetcher,
    dedupe_names,
    display_region,
    fetch_redis_keys,
    list_subscriptions,
    make_credential,
    parse_resource_id,
)
from services.discovery.matchers import AzureMatcher, normalize_region

from .conftest import (
    CLIENT_ID,
    CLIENT_SECRET,
    SUB1,
    SUB2,
    TENANT,
    fetch_all,
    need_examples,
    populate,
)


def names(records):
    return sorted(r.name for r in records)


# --------------------------------------------------------------------------- matchers
def test_matcher_normalization():
    m = AzureMatcher(regions=["East US"], resource_groups=["RG-A"], tags={"env": ["prod", "stag*"]})
    assert normalize_region("East US") == "eastus" == normalize_region("eastus")
    assert m.match_region("eastus") and m.match_region("East US") and not m.match_region("westus")
    assert m.match_resource_group("rg-a") and not m.match_resource_group("rg-b")
    assert m.match_tags({"ENV": "staging"}) and m.match_tags({"env": "prod"}) and not m.match_tags({"env": "dev"})
    assert not m.match_tags({})
    assert AzureMatcher().match_tags({}) and AzureMatcher(regions="*").match_region("anything")
    assert AzureMatcher(types=["redis"]).kinds == {"redis", "redis-enterprise"}
    assert AzureMatcher(types=["redis-enterprise"]).kinds == {"redis-enterprise"}
    assert AzureMatcher(tags={"*": "prod"}).match_tags({"anything": "prod"})
    with pytest.raises(ValueError):
        AzureMatcher(types=["mysql"])
    assert display_region("westus2") == "West US 2" and display_region("East US") == "East US"


# --------------------------------------------------------------------------- listing
async def test_two_pages_two_subscriptions_several_groups(standin, credential):
    populate(standin)
    standin.set_page_size(2)
    fetchers = AzureFetcherSet(credential, AzureMatcher(subscriptions="*"), base_url=standin.base_url, connection_verify=standin.ca_file)
    try:
        found = []
        for f in await fetchers():
            found.extend(await f.fetch())
    finally:
        await fetchers.close()
    assert names(found) == ["bigcache", "catalog", "metrics", "orders", "queue", "sessions"]
    assert {r.azure.subscription_id for r in found} == {SUB1, SUB2}
    assert {r.azure.resource_group for r in found} == {"rg-a", "RG-B", "rg-c"}
    # sub1 has three caches -> two pages of two
    assert standin.request_count(f"/subscriptions/{SUB1}/providers/Microsoft.Cache/redis") == 2
    assert standin.request_count("/subscriptions") == 1

    orders = next(r for r in found if r.name == "orders")
    assert orders.uri == "localhost:6380"
    assert orders.description == "Azure Redis server in East US"
    assert orders.labels == {
        "env": "prod",
        "team": "shop",
        "region": "eastus",
        "resource-group": "rg-a",
        "subscription-id": SUB1,
        "engine": "Microsoft.Cache/Redis",
        "engine-version": "6.0",
        "endpoint-type": "standalone",
        "clustering-policy": "NoCluster",
        "auth": "access_key",
        "tier": "standard",
        "cloud": "Azure",
    }
    assert orders.protocol == "redis" and orders.azure.kind == "redis" and orders.azure.region == "eastus"
    big = next(r for r in found if r.name == "bigcache")
    assert big.description == "Azure Redis Enterprise server in East US"
    assert big.uri == "localhost:10000"
    assert big.labels["engine"] == "Microsoft.Cache/redisEnterprise"
    assert big.labels["endpoint-type"] == "cluster" and big.labels["clustering-policy"] == "OSSCluster" and big.azure.clustering_policy == "OSSCluster"
    assert big.azure.resource_id.endswith("/redisEnterprise/bigcache/databases/default")


async def test_list_subscriptions(standin, credential):
    standin.set_page_size(1)
    subs = await list_subscriptions(credential, base_url=standin.base_url, connection_verify=standin.ca_file)
    assert [(s.subscription_id, s.display_name) for s in subs] == [(SUB1, "Dev"), (SUB2, "Staging")]


@pytest.mark.parametrize(
    "matcher, expected",
    [
        (AzureMatcher(regions=["eastus"]), ["bigcache", "orders", "queue", "sessions"]),
        (AzureMatcher(regions=["East US", "westus2"]), ["bigcache", "metrics", "orders", "queue", "sessions"]),
        (AzureMatcher(resource_groups=["rg-b"]), ["catalog"]),
        (AzureMatcher(resource_groups=["RG-A", "missing-group"]), ["orders", "sessions"]),
        (AzureMatcher(subscriptions=[SUB2]), ["bigcache", "metrics", "queue"]),
        (AzureMatcher(tags={"env": "prod"}), ["bigcache", "catalog", "orders"]),
        (AzureMatcher(tags={"env": ["dev", "stag*"]}), ["metrics", "sessions"]),
        (AzureMatcher(tags={"env": "prod", "team": "s*"}), ["catalog", "orders"]),
        (AzureMatcher(types=["redis-enterprise"]), ["bigcache"]),
    ],
)
async def test_filters_narrow(standin, credential, matcher, expected):
    populate(standin)
    fetchers = AzureFetcherSet(credential, matcher, base_url=standin.base_url, connection_verify=standin.ca_file)
    try:
        found = [r for f in await fetchers() for r in await f.fetch()]
    finally:
        await fetchers.close()
    assert names(found) == expected


async def test_resource_group_matcher_lists_by_group(standin, credential):
    populate(standin)
    await fetch_all(standin, credential, AzureMatcher(resource_groups=["rg-a"], types=["redis"]), subs=(SUB1,))
    assert standin.request_count(f"/subscriptions/{SUB1}/providers/Microsoft.Cache/redis") == 0
    assert standin.request_count(f"/subscriptions/{SUB1}/resourceGroups/rg-a/providers/Microsoft.Cache/redis") == 1


# --------------------------------------------------------------------------- published examples
async def test_published_examples(tmp_path, caplog):
    s = AzureStandin(ca_file=tmp_path / "ca.pem", examples_dir=need_examples())
    s.config.tenant = TENANT
    s.add_service_principal(CLIENT_ID, CLIENT_SECRET)
    await s.start()
    try:
        from azure.identity.aio import ClientSecretCredential

        caplog.set_level(logging.DEBUG, logger="cachegate.discovery")
        async with ClientSecretCredential(TENANT, CLIENT_ID, CLIENT_SECRET, authority=s.authority_host, disable_instance_discovery=True, connection_verify=s.ca_file) as cred:
            async with AzureRedisFetcher(cred, "subid", AzureMatcher(), s.base_url, s.ca_file) as f:
                assert await f.fetch() == []  # cache1 is still Creating
            sub = "e7b5a9d2-6b6a-4d2f-9143-20d9a10f5b8f"
            async with AzureRedisEnterpriseFetcher(cred, sub, AzureMatcher(regions=["westus"]), s.base_url, s.ca_file) as f:
                found = await f.fetch()
    finally:
        await s.stop()
    skip = [r.getMessage() for r in caplog.records if "skipping" in r.getMessage()]
    assert skip == ["skipping Azure Redis cache /subscriptions/subid/resourceGroups/rg1/providers/Microsoft.Cache/Redis/cache1: provisioning state is Creating"]
    [db] = found
    assert db.name == "cache1"  # cache1/default -> the cluster's name
    assert db.uri == "cache1.westus.something.azure.com:10000"
    assert db.description == "Azure Redis Enterprise server in West US"
    assert db.labels["region"] == "westus" and db.labels["resource-group"] == "rg1"
    assert db.labels["engine-version"] == "6.0" and db.azure.clustering_policy == "OSSCluster"
    assert db.azure.auth == "access_key" and db.labels["endpoint-type"] == "cluster"  # no accessKeysAuthentication field


# --------------------------------------------------------------------------- naming
async def test_name_override_tags(standin, credential):
    standin.add_cache(name="c1", subscription=SUB1, resource_group="rg", tags={"TeleportDatabaseName": "legacy-name"})
    standin.add_cache(name="c2", subscription=SUB1, resource_group="rg", tags={"cachegate-database-name": "pretty"})
    standin.add_cache(name="c3", subscription=SUB1, resource_group="rg", tags={"CACHEGATE-DATABASE-NAME": "ours", "TeleportDatabaseName": "theirs"})
    standin.add_enterprise_cluster(
        name="ent", subscription=SUB1, resource_group="rg", tags={"cachegate-database-name": "shiny"},
        databases=[{"name": "default"}, {"name": "db2", "port": 10001}],
    )
    standin.add_enterprise_cluster(name="ent2", subscription=SUB1, resource_group="rg", databases=[{"name": "default"}, {"name": "extra", "port": 10002}])
    found = await fetch_all(standin, credential, AzureMatcher(), subs=(SUB1,))
    assert names(found) == ["ent2", "ent2-extra", "legacy-name", "ours", "pretty", "shiny", "shiny-db2"]
    assert next(r for r in found if r.name == "shiny-db2").uri == "localhost:10001"


async def test_collisions_get_deterministic_suffixes(standin, credential):
    standin.add_cache(name="shared", subscription=SUB1, resource_group="Team_A", location="East US")
    standin.add_cache(name="shared", subscription=SUB2, resource_group="team-b", location="West Europe")
    standin.add_cache(name="unique", subscription=SUB2, resource_group="team-b")
    records = dedupe_names(await fetch_all(standin, credential, AzureMatcher()))
    assert names(records) == [
        f"shared-eastus-team-a-{SUB1}",
        f"shared-westeurope-team-b-{SUB2}",
        "unique",
    ]
    for r in records:
        if r.name.startswith("shared-"):
            assert r.labels["original-name"] == "shared" and r.original_name == "shared"
    assert "original-name" not in next(r for r in records if r.name == "unique").labels
    # deterministic and idempotent
    assert dedupe_names(records) == records
    assert dedupe_names(list(reversed(records))) == list(reversed(records))
    # once the collision is gone, the plain name comes back
    alone = dedupe_names([r for r in records if r.azure.subscription_id == SUB1])
    assert [r.name for r in alone] == ["shared"] and "original-name" not in alone[0].labels


# --------------------------------------------------------------------------- skipped resources
@pytest.mark.parametrize("state", ["Creating", "Deleting", "Disabled", "Failed", "Provisioning", "Unprovisioning"])
async def test_redis_unavailable_states_skipped(standin, credential, caplog, state):
    standin.add_cache(name="ok", subscription=SUB1, resource_group="rg")
    standin.add_cache(name="busy", subscription=SUB1, resource_group="rg", provisioning_state=state)
    caplog.set_level(logging.DEBUG, logger="cachegate.discovery")
    found = await fetch_all(standin, credential, AzureMatcher(), subs=(SUB1,))
    assert names(found) == ["ok"]
    assert any("busy" in r.getMessage() and state in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("state", ["Updating", "Scaling", "Succeeded"])
async def test_redis_serving_states_kept(standin, credential, state):
    standin.add_cache(name="c", subscription=SUB1, resource_group="rg", provisioning_state=state)
    assert names(await fetch_all(standin, credential, AzureMatcher(), subs=(SUB1,))) == ["c"]


async def test_redis_without_tls_port_skipped(standin, credential, caplog):
    standin.add_cache(name="plain", subscription=SUB1, resource_group="rg", ssl_port=None, enable_non_ssl_port=True)
    caplog.set_level(logging.DEBUG, logger="cachegate.discovery")
    assert await fetch_all(standin, credential, AzureMatcher(), subs=(SUB1,)) == []
    assert any("plain" in r.getMessage() and "sslPort" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize(
    "cluster_changes, db_changes, reason",
    [
        ({"resource_state": "Creating"}, {}, "cluster state is Creating"),
        ({"provisioning_state": "Deleting"}, {}, "cluster state is Deleting"),
        ({"resource_state": "Disabled"}, {}, "cluster state is Disabled"),
        ({"provisioning_state": "Failed"}, {}, "cluster state is Failed"),
        ({}, {"provisioning_state": "Provisioning"}, "database state is Provisioning"),
        ({}, {"resource_state": "Unprovisioning"}, "database state is Unprovisioning"),
        ({}, {"client_protocol": "Plaintext"}, "clientProtocol is Plaintext"),
    ],
)
async def test_enterprise_skips(standin, credential, caplog, cluster_changes, db_changes, reason):
    standin.add_enterprise_cluster(name="good", subscription=SUB1, resource_group="rg")
    standin.add_enterprise_cluster(name="bad", subscription=SUB1, resource_group="rg", databases=[{"name": "default", **db_changes}], **cluster_changes)
    caplog.set_level(logging.DEBUG, logger="cachegate.discovery")
    found = await fetch_all(standin, credential, AzureMatcher(types=["redis-enterprise"]), subs=(SUB1,))
    assert names(found) == ["good"]
    assert any("/bad" in r.getMessage() and reason in r.getMessage() for r in caplog.records), [r.getMessage() for r in caplog.records]


async def test_enterprise_updating_kept(standin, credential):
    standin.add_enterprise_cluster(name="e", subscription=SUB1, resource_group="rg", resource_state="Updating")
    assert names(await fetch_all(standin, credential, AzureMatcher(), subs=(SUB1,))) == ["e"]


async def test_clustered_cache_and_key_auth_flags(standin, credential):
    standin.add_cache(name="clustered", subscription=SUB1, resource_group="rg", sku={"name": "Premium", "family": "P", "capacity": 1}, shard_count=3, disable_access_key_authentication=True)
    [r] = await fetch_all(standin, credential, AzureMatcher(), subs=(SUB1,))
    assert r.labels["endpoint-type"] == "cluster" and r.azure.clustering_policy == "OSSCluster"
    assert r.azure.access_key_auth_disabled is True
    assert r.azure.auth == "entra" and r.labels["auth"] == "entra" and r.labels["tier"] == "premium"


async def test_keys_disabled_is_entra_for_both_types_and_a_tag_overrides(standin, credential):
    standin.add_cache(name="keyless", subscription=SUB1, resource_group="rg", disable_access_key_authentication=True)
    standin.add_cache(name="aad-but-keys", subscription=SUB1, resource_group="rg", aad_enabled=True)
    standin.add_cache(name="forced", subscription=SUB1, resource_group="rg", tags={"cachegate-auth": "entra"})
    standin.add_enterprise_cluster(name="amr", subscription=SUB1, resource_group="rg",
                                   databases=[{"name": "default", "accessKeysAuthentication": "Disabled",
                                               "clusteringPolicy": "EnterpriseCluster"}])
    standin.add_enterprise_cluster(name="amr-keys", subscription=SUB1, resource_group="rg")
    by = {r.name: r for r in await fetch_all(standin, credential, AzureMatcher(), subs=(SUB1,))}
    auth = {n: (r.azure.auth, r.labels["auth"]) for n, r in by.items()}
    assert auth == {"keyless": ("entra", "entra"), "aad-but-keys": ("access_key", "access_key"),
                    "forced": ("entra", "entra"), "amr": ("entra", "entra"), "amr-keys": ("access_key", "access_key")}
    # one vocabulary for both resource types
    assert (by["amr"].labels["endpoint-type"], by["amr"].labels["clustering-policy"]) == ("standalone", "EnterpriseCluster")
    assert (by["amr-keys"].labels["endpoint-type"], by["amr-keys"].labels["clustering-policy"]) == ("cluster", "OSSCluster")
    assert (by["keyless"].labels["endpoint-type"], by["keyless"].labels["clustering-policy"]) == ("standalone", "NoCluster")
    assert by["amr"].labels["tier"] == "balanced" and by["keyless"].labels["tier"] == "standard"


# --------------------------------------------------------------------------- errors
async def test_forbidden_names_the_missing_action(standin, credential):
    populate(standin)
    standin.deny_action("Microsoft.Cache/redisEnterprise/read")
    async with AzureRedisEnterpriseFetcher(credential, SUB2, AzureMatcher(), standin.base_url, standin.ca_file) as f:
        with pytest.raises(AzurePermissionError) as ei:
            await f.fetch()
    msg = str(ei.value)
    assert "\n" not in msg
    assert "'Microsoft.Cache/redisEnterprise/read'" in msg
    assert f"cachegate db configure azure-role --subscription={SUB2}" in msg
    assert ei.value.action == "Microsoft.Cache/redisEnterprise/read"

    standin.inject_fault("*/providers/Microsoft.Cache/redis", 403, action="Microsoft.Cache/redis/read")
    async with AzureRedisFetcher(credential, SUB1, AzureMatcher(), standin.base_url, standin.ca_file) as f:
        with pytest.raises(AzurePermissionError, match="Microsoft.Cache/redis/read"):
            await f.fetch()


async def test_no_credential_gives_default_credential_message(standin, monkeypatch):
    # managed identity points at the stand-in, which has none: the chain has nothing left
    standin.set_managed_identity(False)
    monkeypatch.setenv("AZURE_POD_IDENTITY_AUTHORITY_HOST", standin.imds_url)
    cred = make_credential(authority_host=standin.authority_host, ca_file=standin.ca_file)
    try:
        async with AzureRedisFetcher(cred, SUB1, AzureMatcher(), standin.base_url, standin.ca_file) as f:
            with pytest.raises(AzureCredentialError) as ei:
                await f.fetch()
    finally:
        await cred.close()
    lines = str(ei.value).splitlines()
    assert lines[0] == "DefaultAzureCredential failed to retrieve a token from the included credentials."
    assert "AZURE_CLIENT_ID" in lines[1] and "managed identity" in lines[1]
    assert len(lines) == 2
    assert not [r for r in standin.requests if r.path.startswith("/subscriptions")]


async def test_default_credential_with_client_secret_and_managed_identity(standin, monkeypatch):
    populate(standin)
    for k, v in standin.env_for_client_secret().items():
        monkeypatch.setenv(k, v)
    cred = make_credential(ca_file=standin.ca_file)  # authority from AZURE_AUTHORITY_HOST
    try:
        async with AzureRedisFetcher(cred, SUB1, AzureMatcher(), standin.base_url, standin.ca_file) as f:
            assert names(await f.fetch()) == ["catalog", "orders", "sessions"]
    finally:
        await cred.close()
    assert standin.tokens_issued[-1]["appid"] == CLIENT_ID

    for k in ("AZURE_CLIENT_ID", "AZURE_CLIENT_SECRET", "AZURE_TENANT_ID"):
        monkeypatch.delenv(k)
    monkeypatch.setenv("AZURE_POD_IDENTITY_AUTHORITY_HOST", standin.imds_url)
    cred = make_credential(authority_host=standin.authority_host, ca_file=standin.ca_file)
    try:
        async with AzureRedisFetcher(cred, SUB2, AzureMatcher(), standin.base_url, standin.ca_file) as f:
            assert names(await f.fetch()) == ["metrics", "queue"]
    finally:
        await cred.close()
    assert standin.tokens_issued[-1]["appid"] == standin.config.managed_identity.client_id


async def test_wrong_secret_message(standin, monkeypatch):
    env = standin.env_for_client_secret()
    env["AZURE_CLIENT_SECRET"] = "wrong"
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    cred = make_credential(ca_file=standin.ca_file)
    try:
        async with AzureRedisFetcher(cred, SUB1, AzureMatcher(), standin.base_url, standin.ca_file) as f:
            with pytest.raises(AzureCredentialError) as ei:
                await f.fetch()
    finally:
        await cred.close()
    lines = str(ei.value).splitlines()
    assert lines[0] == "DefaultAzureCredential failed to retrieve a token from the included credentials."
    assert "AADSTS7000215" in lines[1] and "wrong" not in str(ei.value)


# --------------------------------------------------------------------------- keys
async def test_fetch_keys_for_both_kinds_and_rotation(standin, credential, caplog):
    populate(standin)
    caplog.set_level(logging.DEBUG)
    cache_id = standin.find_cache("orders").resource_id
    cluster = standin.find_enterprise_cluster("bigcache")
    db_id = cluster.database_id(cluster.databases[0])
    kw = dict(base_url=standin.base_url, connection_verify=standin.ca_file)

    primary, secondary = await fetch_redis_keys(credential, cache_id, **kw)
    assert (primary, secondary) == (standin.get_keys(cache_id).primary, standin.get_keys(cache_id).secondary)
    keys = await fetch_redis_keys(credential, db_id, **kw)
    assert keys.primary == standin.get_keys(db_id).primary
    assert keys.primary not in repr(keys) and keys.primary not in str(keys)

    standin.set_keys(cache_id, primary="rotated-primary")
    assert (await fetch_redis_keys(credential, cache_id, **kw)).primary == "rotated-primary"

    standin.deny_action("Microsoft.Cache/redis/listKeys/action")
    with pytest.raises(AzurePermissionError) as ei:
        await fetch_redis_keys(credential, cache_id, **kw)
    assert "Microsoft.Cache/redis/listKeys/action" in str(ei.value)
    secrets = {"rotated-primary", secondary, keys.primary, keys.secondary}
    assert not any(s in str(ei.value) for s in secrets)
    assert not any(s in rec.getMessage() for rec in caplog.records for s in secrets)

    with pytest.raises(ValueError):
        parse_resource_id(cluster.resource_id)  # an Enterprise id must name the database
    assert parse_resource_id(db_id).database == "default"
