"""The reconciler over real fetchers, the stand-in and an in-memory registry."""

from __future__ import annotations

import asyncio
import time

from services.discovery.azure import (
    AzureFetcherSet,
    AzureRedisEnterpriseFetcher,
    AzureRedisFetcher,
)
from services.discovery.matchers import AzureMatcher
from services.discovery.reconciler import InMemoryRegistry, Reconciler, RetrySettings

from .conftest import SUB1, SUB2, populate

FAST = RetrySettings(max_attempts=3, base_delay=0.01, max_delay=0.05, max_retry_after=2.0)


def make_fetchers(standin, credential, matcher=None, subs=(SUB1, SUB2)):
    matcher = matcher or AzureMatcher()
    return [
        cls(credential, sub, matcher, standin.base_url, standin.ca_file)
        for sub in subs
        for cls in (AzureRedisFetcher, AzureRedisEnterpriseFetcher)
    ]


async def close_all(fetchers):
    for f in fetchers:
        await f.close()


async def test_create_update_delete(standin, credential):
    populate(standin)
    fetchers = make_fetchers(standin, credential)
    registry = InMemoryRegistry()
    rec = Reconciler(fetchers, registry, interval=1, jitter=0, retry=FAST)
    try:
        r1 = await rec.run_once()
        assert sorted(r1.created) == ["bigcache", "catalog", "metrics", "orders", "queue", "sessions"]
        assert r1.ok and not r1.updated and not r1.deleted

        r2 = await rec.run_once()  # nothing changed: no writes
        assert (r2.created, r2.updated, r2.deleted) == ([], [], [])

        standin.remove_cache("queue")
        standin.update_cache("orders", tags={"env": "prod", "team": "checkout"})
        r3 = await rec.run_once()
        assert r3.deleted == ["queue"] and r3.updated == ["orders"] and r3.created == []
        assert "queue" not in registry.records
        assert registry.records["orders"].labels["team"] == "checkout"

        st = {s.name: s for s in rec.statuses()}
        assert st[f"azure-redis/{SUB1}"].databases_found == 3
        assert st[f"azure-redis-enterprise/{SUB2}"].databases_found == 1
        assert all(s.last_error is None and s.last_success is not None for s in st.values())
    finally:
        await close_all(fetchers)


async def test_server_errors_for_a_while_delete_nothing(standin, credential):
    populate(standin)
    fetchers = make_fetchers(standin, credential)
    registry = InMemoryRegistry()
    rec = Reconciler(fetchers, registry, interval=1, jitter=0, retry=FAST)
    try:
        await rec.run_once()
        before = dict(registry.records)

        # sub1's cache listing fails every time; meanwhile a cache goes away there and one
        # appears in sub2: sub2 is reconciled, sub1's records stay as they are.
        standin.inject_fault(f"/subscriptions/{SUB1}/providers/Microsoft.Cache/redis", 500, count=None)
        standin.remove_cache("orders")
        standin.add_cache(name="newcomer", subscription=SUB2, resource_group="rg-c")
        for _ in range(3):
            r = await rec.run_once()
            assert r.failed_fetchers == [f"azure-redis/{SUB1}"]
            assert r.deleted == []
        assert set(before) <= set(registry.records)
        assert "newcomer" in registry.records
        assert sorted(r.kept) == ["catalog", "orders", "sessions"]
        st = rec.status(f"azure-redis/{SUB1}")
        assert st.consecutive_failures == 3 and "500" in st.last_error and "\n" not in st.last_error
        assert st.retries == FAST.max_attempts - 1

        standin.clear_faults()
        r = await rec.run_once()
        assert r.deleted == ["orders"] and r.ok
        assert rec.status(f"azure-redis/{SUB1}").last_error is None
    finally:
        await close_all(fetchers)


async def test_transient_500s_are_retried_with_backoff(standin, credential):
    populate(standin)
    fetchers = make_fetchers(standin, credential, subs=(SUB1,))
    registry = InMemoryRegistry()
    rec = Reconciler(fetchers, registry, retry=FAST)
    try:
        standin.inject_fault(f"/subscriptions/{SUB1}/providers/Microsoft.Cache/redis", 503, count=2)
        r = await rec.run_once()
        assert r.ok and sorted(r.created) == ["catalog", "orders", "sessions"]
        st = rec.status(f"azure-redis/{SUB1}")
        assert st.retries == 2 and len(st.waits) == 2 and st.waits[1] > st.waits[0]
        assert all(w <= FAST.max_delay * 1.1 for w in st.waits)
    finally:
        await close_all(fetchers)


async def test_429_retry_after_is_honoured(standin, credential):
    populate(standin)
    fetchers = make_fetchers(standin, credential, subs=(SUB2,))
    rec = Reconciler(fetchers, InMemoryRegistry(), retry=FAST)
    try:
        standin.inject_fault(f"/subscriptions/{SUB2}/providers/Microsoft.Cache/redisEnterprise", 429, count=1, retry_after=1)
        t0 = time.monotonic()
        r = await rec.run_once()
        elapsed = time.monotonic() - t0
        assert r.ok and "bigcache" in r.created
        assert rec.status(f"azure-redis-enterprise/{SUB2}").waits == [1.0]
        assert 1.0 <= elapsed < 5
        assert standin.request_count(f"/subscriptions/{SUB2}/providers/Microsoft.Cache/redisEnterprise") == 2

        # a huge Retry-After is bounded by max_retry_after
        bounded = RetrySettings(max_attempts=2, max_retry_after=0.2)
        rec2 = Reconciler(fetchers, InMemoryRegistry(), retry=bounded)
        standin.inject_fault(f"/subscriptions/{SUB2}/providers/Microsoft.Cache/redis", 429, count=1, retry_after=3600)
        t0 = time.monotonic()
        r = await rec2.run_once()
        assert r.ok and time.monotonic() - t0 < 3
        assert rec2.status(f"azure-redis/{SUB2}").waits == [0.2]
    finally:
        await close_all(fetchers)


async def test_forbidden_is_not_retried_and_keeps_records(standin, credential):
    populate(standin)
    fetchers = make_fetchers(standin, credential, subs=(SUB1,))
    registry = InMemoryRegistry()
    rec = Reconciler(fetchers, registry, retry=FAST)
    try:
        await rec.run_once()
        standin.deny_action("Microsoft.Cache/redis/read")
        n = standin.request_count(f"/subscriptions/{SUB1}/providers/Microsoft.Cache/redis")
        r = await rec.run_once()
        assert r.failed_fetchers == [f"azure-redis/{SUB1}"] and r.deleted == []
        assert standin.request_count(f"/subscriptions/{SUB1}/providers/Microsoft.Cache/redis") == n + 1
        err = rec.status(f"azure-redis/{SUB1}").last_error
        assert "Microsoft.Cache/redis/read" in err and "cachegate db configure azure-role" in err
    finally:
        await close_all(fetchers)


async def test_collisions_through_the_reconciler(standin, credential):
    """Names are stable: a same-named cache appearing and going elsewhere renames nothing."""
    standin.add_cache(name="dup", subscription=SUB1, resource_group="rg1")
    fetchers = make_fetchers(standin, credential)
    registry = InMemoryRegistry()
    rec = Reconciler(fetchers, registry, retry=FAST)
    try:
        assert (await rec.run_once()).created == ["dup"]
        standin.add_cache(name="dup", subscription=SUB2, resource_group="rg2", location="West US")
        r = await rec.run_once()
        assert r.created == [f"dup-westus-rg2-{SUB2}"] and r.deleted == [] and r.updated == []
        assert registry.records[f"dup-westus-rg2-{SUB2}"].labels["original-name"] == "dup"
        assert "original-name" not in registry.records["dup"].labels
        standin.remove_cache("dup", subscription=SUB2)
        r = await rec.run_once()
        assert r.deleted == [f"dup-westus-rg2-{SUB2}"] and r.created == [] and sorted(registry.records) == ["dup"]
        # two new ones at once: both get the long name (neither is preferred)
        standin.add_cache(name="twin", subscription=SUB1, resource_group="rg1")
        standin.add_cache(name="twin", subscription=SUB2, resource_group="rg2")
        r = await rec.run_once()
        assert sorted(r.created) == [f"twin-eastus-rg1-{SUB1}", f"twin-eastus-rg2-{SUB2}"]
        # a restarted discovery (a new reconciler) keeps every name
        rec2 = Reconciler(fetchers, registry, retry=FAST)
        r = await rec2.run_once()
        assert r.created == r.deleted == r.updated == []
    finally:
        await close_all(fetchers)


async def test_name_tags_made_valid_or_reported(standin, credential):
    standin.add_cache(name="billing", subscription=SUB1, resource_group="rg1", tags={"TeleportDatabaseName": "Billing Cache"})
    standin.add_cache(name="weird", subscription=SUB1, resource_group="rg1", tags={"TeleportDatabaseName": "caf\u00e9/1"})
    standin.add_cache(name="one", subscription=SUB1, resource_group="rg1", tags={"TeleportDatabaseName": "shared-name"})
    standin.add_cache(name="two", subscription=SUB2, resource_group="rg2", tags={"TeleportDatabaseName": "shared-name"})
    fetchers = make_fetchers(standin, credential)
    registry = InMemoryRegistry()
    rec = Reconciler(fetchers, registry, retry=FAST)
    try:
        r = await rec.run_once()
        assert sorted(registry.records) == ["Billing-Cache"]
        assert len(r.unpublished) == 3
        st1 = rec.status(f"azure-redis/{SUB1}").unpublished
        assert any("weird" in x and "not a valid database name" in x for x in st1)
        assert any("shared-name" in x and "give each its own" in x for x in st1)
        assert any("shared-name" in x for x in rec.status(f"azure-redis/{SUB2}").unpublished)
        # the clash resolved by the admin: both publish; nothing is renamed to settle it
        standin.update_cache("two", tags={"TeleportDatabaseName": "other-name"})
        r = await rec.run_once()
        assert sorted(r.created) == ["other-name", "shared-name"]
        # an explicit name clashing with a published one is reported; the published one stays
        standin.add_cache(name="three", subscription=SUB2, resource_group="rg2", tags={"TeleportDatabaseName": "shared-name"})
        r = await rec.run_once()
        assert r.created == [] and registry.records["shared-name"].azure.resource_id.endswith("/one")
        assert any("three" in x and "already has" in x for x in r.unpublished)
    finally:
        await close_all(fetchers)


async def test_subscription_that_disappears_is_cleaned_up(standin, credential):
    populate(standin)
    fetchers = AzureFetcherSet(credential, AzureMatcher(subscriptions="*"), base_url=standin.base_url, connection_verify=standin.ca_file)
    registry = InMemoryRegistry()
    rec = Reconciler(fetchers, registry, retry=FAST)
    try:
        await rec.run_once()
        assert len(registry.records) == 6
        # subscription listing fails: nothing is deleted
        standin.inject_fault("/subscriptions", 500, count=None)
        standin.remove_subscription(SUB2)
        r = await rec.run_once()
        assert r.deleted == [] and not r.ok
        assert rec.source_status.last_error is not None
        standin.clear_faults()
        r = await rec.run_once()
        assert sorted(r.deleted) == ["bigcache", "metrics", "queue"]
        assert sorted(registry.records) == ["catalog", "orders", "sessions"]
        assert {s.name for s in rec.statuses()} >= {f"azure-redis/{SUB1}", "fetcher-source"}
    finally:
        await fetchers.close()


async def test_run_forever_and_resync(standin, credential):
    populate(standin)
    fetchers = make_fetchers(standin, credential, subs=(SUB1,))
    registry = InMemoryRegistry()
    rec = Reconciler(fetchers, registry, interval=60, jitter=0, retry=FAST)
    stop = asyncio.Event()
    task = asyncio.create_task(rec.run_forever(stop))
    try:
        for _ in range(200):
            if rec.last_result is not None:
                break
            await asyncio.sleep(0.01)
        assert sorted(registry.records) == ["catalog", "orders", "sessions"]
        standin.remove_cache("orders")
        rec.request_resync()
        for _ in range(200):
            if "orders" not in registry.records:
                break
            await asyncio.sleep(0.01)
        assert "orders" not in registry.records
    finally:
        stop.set()
        await asyncio.wait_for(task, 5)
        await close_all(fetchers)


class FailingRegistry(InMemoryRegistry):
    async def upsert(self, record):
        if record.name == "orders":
            raise RuntimeError("registry write refused")
        await super().upsert(record)


async def test_one_failing_write_does_not_stop_the_round(standin, credential):
    populate(standin)
    fetchers = make_fetchers(standin, credential, subs=(SUB1,))
    try:
        rec = Reconciler(fetchers, FailingRegistry(), retry=FAST)
        r = await rec.run_once()
        assert sorted(r.created) == ["catalog", "sessions"]
        assert r.errors == ["upsert orders: RuntimeError: registry write refused"]
    finally:
        await close_all(fetchers)


def test_retry_settings_are_bounded():
    s = RetrySettings(base_delay=1, max_delay=4, jitter=0)
    assert [s.delay(a, None) for a in range(1, 6)] == [1, 2, 4, 4, 4]
    assert s.delay(1, 2.5) == 2.5
    assert RetrySettings(max_retry_after=5).delay(1, 100) == 5
