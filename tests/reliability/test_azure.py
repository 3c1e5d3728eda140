"""Azure misbehaves under discovery, through the real Azure SDK against the stand-in: 500s,
429 with Retry-After, and requests that hang past the timeout, one after another while a
cache really goes away. Nothing is deleted while a listing fails; the waits between tries
are the backoff (and the Retry-After) the operator is told about; once Azure answers again
the one real deletion happens. (Single faults: tests/azure/test_reconciler.py.)"""

from __future__ import annotations

import time

import pytest

from services.discovery.reconciler import InMemoryRegistry, Reconciler, RetrySettings
from tests.azure.conftest import SUB1, credential, populate, standin  # noqa: F401 (fixtures)
from tests.azure.test_reconciler import close_all
from tests.reliability.stack import FULL

pytestmark = pytest.mark.reliability

RETRY = RetrySettings(max_attempts=3, base_delay=0.05, max_delay=0.2, max_retry_after=2.0)


async def test_500s_429s_and_timeouts_delete_nothing_and_back_off(standin, credential):  # noqa: F811
    from services.discovery.azure import AzureRedisFetcher
    from services.discovery.matchers import AzureMatcher

    populate(standin)
    fetchers = [AzureRedisFetcher(credential, SUB1, AzureMatcher(), standin.base_url, standin.ca_file, timeout=1.0)]
    registry = InMemoryRegistry()
    rec = Reconciler(fetchers, registry, interval=1, jitter=0, retry=RETRY, fetch_timeout=6.0)
    caches = f"/subscriptions/{SUB1}/providers/Microsoft.Cache/redis"
    name = f"azure-redis/{SUB1}"
    try:
        first = await rec.run_once()
        assert sorted(first.created) == ["catalog", "orders", "sessions"]
        standin.remove_cache("orders")  # really gone: deleted only once Azure answers again

        # 1. 500 on every try of a round: the round fails, nothing is deleted.
        standin.inject_fault(caches, 500, count=RETRY.max_attempts)
        r = await rec.run_once()
        st = rec.status(name)
        assert r.failed_fetchers == [name] and r.deleted == [] and "orders" in registry.records
        assert "500" in st.last_error and "\n" not in st.last_error
        assert len(st.waits) == RETRY.max_attempts - 1 and st.waits[1] > st.waits[0]  # exponential

        # 2. 429 with Retry-After: the next try waits what Azure asked for.
        standin.inject_fault(caches, 429, count=RETRY.max_attempts, retry_after=1)
        t0 = time.monotonic()
        r = await rec.run_once()
        took = time.monotonic() - t0
        st = rec.status(name)
        assert r.deleted == [] and st.waits == [1.0] * (RETRY.max_attempts - 1) and took >= 2.0
        assert "throttled" in st.last_error

        # 3. Azure hangs past the SDK's timeout on every try.
        standin.inject_fault(caches, 0, count=RETRY.max_attempts, delay=3.0)
        r = await rec.run_once()
        st = rec.status(name)
        assert r.failed_fetchers == [name] and r.deleted == [] and "orders" in registry.records
        assert st.last_error and "\n" not in st.last_error
        assert st.consecutive_failures == 3

        for _ in range(3 if FULL else 0):  # the long run: the three faults again, still no deletion
            for status, kw in ((500, {}), (429, {"retry_after": 0.5}), (0, {"delay": 3.0})):
                standin.inject_fault(caches, status, count=RETRY.max_attempts, **kw)
                r = await rec.run_once()
                assert r.failed_fetchers == [name] and r.deleted == [] and "orders" in registry.records, status

        # Azure answers again: the cache that went away is deleted, the others stay.
        standin.clear_faults()
        r = await rec.run_once()
        assert r.ok and r.deleted == ["orders"] and sorted(registry.records) == ["catalog", "sessions"]
        assert rec.status(name).last_error is None and rec.status(name).consecutive_failures == 0
    finally:
        await close_all(fetchers)

