"""Discovery's metrics: rounds (count, duration, result), Azure errors by code, records
published and deleted, and the lease (leader or standby). Instruments come from the global
MeterProvider that :func:`services.common.telemetry.setup_metrics` installs (the same
exporters as auth's: console, otlp or prometheus); with metrics off every call returns at
once."""

from __future__ import annotations

import asyncio
from typing import Any

from services.common import telemetry
from services.common.azure import AzureCredentialError

# Lease states, as the cachegate_discovery_leader gauge reports them.
LEADER, STANDBY, UNKNOWN = 1, 0, -1


def azure_error_code(exc: BaseException) -> str:
    """A small, bounded label for an Azure failure: the HTTP status when Azure answered
    (403, 404, 429, 500, ...), else what went wrong (credential, timeout, network)."""
    status = getattr(exc, "status", None)
    if status:
        return str(status)
    if isinstance(exc, AzureCredentialError):
        return "credential"
    if isinstance(exc, (asyncio.TimeoutError, TimeoutError)):
        return "timeout"
    if isinstance(exc, OSError):
        return "network"
    return "other"


class DiscoveryMetrics:
    def __init__(self, meter: Any | None = None, group: str = "default") -> None:
        self.enabled = meter is not None or telemetry.metrics_enabled()
        self.group = group
        self.lease_state = UNKNOWN
        if not self.enabled:
            return
        if meter is None:
            from opentelemetry import metrics

            meter = metrics.get_meter("cachegate.discovery")
        self.rounds = meter.create_counter("cachegate_discovery_rounds", unit="1",
                                           description="Discovery rounds by result (ok, failed)")
        self.round_duration = meter.create_histogram("cachegate_discovery_round_duration", unit="s",
                                                     description="Duration of discovery rounds by result")
        self.azure_errors = meter.create_counter("cachegate_discovery_azure_errors", unit="1",
                                                 description="Azure requests that failed, by code (HTTP status "
                                                             "or credential, timeout, network), retries included")
        self.records = meter.create_counter("cachegate_discovery_records", unit="1",
                                            description="Database records published (created or updated) and "
                                                        "deleted, by source (azure, static)")
        self.lease_changes = meter.create_counter("cachegate_discovery_lease_changes", unit="1",
                                                  description="Times this host became leader or standby")

        def observe(_options):
            from opentelemetry.metrics import Observation

            return [Observation(self.lease_state, {"group": self.group})]

        meter.create_observable_gauge("cachegate_discovery_leader", callbacks=[observe], unit="1",
                                      description="1 while this host holds its group's lease and reconciles, "
                                                  "0 while it stands by, -1 before it knows")

    def round(self, ok: bool, seconds: float) -> None:
        if self.enabled:
            attrs = {"result": "ok" if ok else "failed"}
            self.rounds.add(1, attrs)
            self.round_duration.record(seconds, attrs)

    def azure_error(self, exc: BaseException) -> None:
        if self.enabled:
            self.azure_errors.add(1, {"code": azure_error_code(exc)})

    def published(self, source: str, published: int, deleted: int) -> None:
        if self.enabled:
            if published:
                self.records.add(published, {"action": "published", "source": source})
            if deleted:
                self.records.add(deleted, {"action": "deleted", "source": source})

    def lease(self, state: int) -> None:
        changed = state != self.lease_state
        self.lease_state = state
        if self.enabled and changed and state != UNKNOWN:
            self.lease_changes.add(1, {"state": "leader" if state == LEADER else "standby"})
