"""Discovery's metrics from a real Reconciler round: Azure errors by code (retries
included), rounds by result, records published and deleted, the lease state."""

from __future__ import annotations

from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from services.common.azure import AzureCredentialError, AzureThrottledError
from services.discovery import metrics as dm
from services.discovery.reconciler import InMemoryRegistry, Reconciler, RetrySettings
from tests.auth.test_metrics import points


class Flaky:
    """A fetcher that is throttled once, then finds nothing."""

    name = "azure-redis/sub/eastus"

    def __init__(self):
        self.calls = 0

    async def fetch(self):
        self.calls += 1
        if self.calls == 1:
            raise AzureThrottledError("Too many requests", status=429, retry_after=0)
        return []

    def owns(self, record):
        return True


class NoCredential(Flaky):
    name = "azure-redis/sub2/eastus"

    async def fetch(self):
        raise AzureCredentialError("DefaultAzureCredential failed to retrieve a token")


async def _no_sleep(_s):
    return None


async def test_azure_errors_by_code_rounds_records_and_lease():
    reader = InMemoryMetricReader()
    m = dm.DiscoveryMetrics(MeterProvider(metric_readers=[reader]).get_meter("test"), group="g1")
    rec = Reconciler([Flaky(), NoCredential()], InMemoryRegistry(), retry=RetrySettings(max_attempts=3),
                     sleep=_no_sleep)
    rec.on_error = m.azure_error
    result = await rec.run_once()
    m.round(result.ok, 0.25)
    m.published("azure", len(result.created) + len(result.updated), len(result.deleted))
    m.published("static", 2, 1)
    m.lease(dm.STANDBY)
    m.lease(dm.LEADER)
    m.lease(dm.LEADER)
    p = points(reader)
    assert p[("cachegate_discovery_azure_errors", (("code", "429"),))] == 1
    assert p[("cachegate_discovery_azure_errors", (("code", "credential"),))] == 1
    assert p[("cachegate_discovery_rounds", (("result", "failed"),))] == 1  # a fetcher failed
    assert p[("cachegate_discovery_round_duration", (("result", "failed"),))] == 1
    assert p[("cachegate_discovery_records", (("action", "published"), ("source", "static")))] == 2
    assert p[("cachegate_discovery_records", (("action", "deleted"), ("source", "static")))] == 1
    assert p[("cachegate_discovery_leader", (("group", "g1"),))] == 1
    assert p[("cachegate_discovery_lease_changes", (("state", "leader"),))] == 1  # a change, not a renewal
    assert p[("cachegate_discovery_lease_changes", (("state", "standby"),))] == 1


def test_error_codes_are_few_and_named():
    assert dm.azure_error_code(AzureThrottledError("x", status=429)) == "429"
    assert dm.azure_error_code(TimeoutError()) == "timeout"
    assert dm.azure_error_code(ConnectionResetError()) == "network"
    assert dm.azure_error_code(ValueError("odd")) == "other"


def test_metrics_off_costs_nothing():
    m = dm.DiscoveryMetrics()
    assert not m.enabled
    m.round(True, 1.0)
    m.azure_error(TimeoutError())
    m.lease(dm.LEADER)
    assert m.lease_state == dm.LEADER
