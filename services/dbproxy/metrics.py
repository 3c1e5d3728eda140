"""The RESP data plane's metrics (OpenTelemetry), and the tracer of session starts.

Instruments (exported by :func:`services.common.telemetry.setup_metrics` to
Prometheus, OTLP or the console; with Prometheus, dots become underscores and
counters get ``_total``):

========================================= ============= ===================================
``cachegate.dbproxy.sessions.active``     updown count  live sessions {database}
``cachegate.dbproxy.sessions.started``    counter       sessions relayed {database}
``cachegate.dbproxy.sessions.refused``    counter       refused connections {reason}
``cachegate.dbproxy.commands``            counter       commands {command, result}
``cachegate.dbproxy.bytes``               counter (By)  {direction: client_to_db|db_to_client}
``cachegate.dbproxy.command.duration``    histogram (s) round trips, sampled {database}
``cachegate.dbproxy.upstream.auth_failures`` counter    AUTH refused by the database or no
                                                        credentials {database, reason}
``cachegate.dbproxy.upstream.failures``   counter       failed connects and checks {database,
                                                        kind: unreachable|timeout|tls|auth|
                                                        credentials|protocol}
``cachegate.dbproxy.database.up``         gauge         1: the last connect or check of the
                                                        database worked, 0: it failed {database}
``cachegate.dbproxy.database.last_success`` gauge (s)   Unix time of its last success {database}
========================================= ============= ===================================

Cheap on the hot path: sessions count commands and bytes themselves and add them in
bulk (every second and at the end); the latency of at most one round trip in flight
per session is measured, and at most every ``LATENCY_SAMPLE_INTERVAL`` seconds
(a round trip: from the moment commands are sent with none outstanding to the
moment every reply reached the client; for a pipeline that is its whole). With
metrics off, :data:`DISABLED` is used and sessions skip all of it (``enabled`` is
False). ``command`` is the RBAC name (``GET``, ``CLIENT|KILL``); commands the
proxy's table does not know count as ``OTHER`` (bounded cardinality).
``result`` is ``allowed`` or ``denied``.

Refusal reasons: ``no_certificate``, ``certificate_expired``,
``certificate_not_yet_valid``, ``denied`` (authorization refused), ``authorize_timeout``,
``internal_error``, ``too_many_sessions``, ``max_sessions``, ``locked``, ``invalid_db_name``,
``request_buffer`` and ``request_timeout`` (a session closed over its incomplete command),
``too_many_handshakes``, ``handshake_timeout`` and ``handshake_failed`` (before TLS), and
``upstream_<reason>`` when the database cannot be reached or refuses the proxy
(``upstream_unreachable``, ``upstream_tls``, ``upstream_credentials``, ``upstream_auth``,
``upstream_select``, ``upstream_protocol``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["DISABLED", "LATENCY_SAMPLE_INTERVAL", "ProxyMetrics", "default"]

LATENCY_SAMPLE_INTERVAL = 0.02

_SCOPE = "cachegate.dbproxy"
# Latency buckets (seconds): 50 us .. 10 s.
_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
            0.25, 0.5, 1.0, 2.5, 10.0)


class ProxyMetrics:
    """The instruments, from ``meter`` (an OpenTelemetry Meter); ``meter=None`` is the
    disabled set whose methods do nothing. ``tracer``: for the spans of session starts
    (default: the process's, a no-op one unless tracing is set up)."""

    def __init__(self, meter: Any | None = None, tracer: Any | None = None) -> None:
        self.enabled = meter is not None
        self._tracer = tracer
        self._attrs: dict[tuple, dict[str, str]] = {}
        if meter is None:
            return
        self.active = meter.create_up_down_counter(
            "cachegate.dbproxy.sessions.active", unit="{session}", description="Live RESP sessions")
        self.parked = meter.create_up_down_counter(
            "cachegate.dbproxy.sessions.parked", unit="{session}",
            description="Live RESP sessions that gave their database connection back while idle")
        self.started = meter.create_counter(
            "cachegate.dbproxy.sessions.started", unit="{session}",
            description="RESP sessions started (connected to the database)")
        self.refused = meter.create_counter(
            "cachegate.dbproxy.sessions.refused", unit="{session}",
            description="RESP connections refused, by reason")
        self.commands = meter.create_counter(
            "cachegate.dbproxy.commands", unit="{command}", description="Commands, by name and result")
        self.bytes = meter.create_counter(
            "cachegate.dbproxy.bytes", unit="By", description="Bytes relayed, by direction")
        try:
            self.latency = meter.create_histogram(
                "cachegate.dbproxy.command.duration", unit="s",
                description="Round-trip time of commands through the proxy (sampled)",
                explicit_bucket_boundaries_advisory=list(_BUCKETS))
        except TypeError:  # an SDK without bucket advice
            self.latency = meter.create_histogram(
                "cachegate.dbproxy.command.duration", unit="s",
                description="Round-trip time of commands through the proxy (sampled)")
        self.auth_failures = meter.create_counter(
            "cachegate.dbproxy.upstream.auth_failures", unit="{failure}",
            description="Upstream AUTH refused by the database, or credentials not available")
        self.upstream_failures = meter.create_counter(
            "cachegate.dbproxy.upstream.failures", unit="{failure}",
            description="Failed connects to (and checks of) databases, by kind")
        self._meter = meter
        self._health = None

    @property
    def tracer(self) -> Any:
        if self._tracer is None:
            from opentelemetry import trace

            # A proxy tracer: it follows a provider set later (reading the environment on
            # each call cost 2% of a new session).
            self._tracer = trace.get_tracer(_SCOPE)
        return self._tracer

    def _a(self, **kv: str) -> dict[str, str]:
        key = tuple(kv.items())
        a = self._attrs.get(key)
        if a is None:
            a = dict(kv)
            if len(self._attrs) < 10_000:
                self._attrs[key] = a
        return a

    # -- sessions --------------------------------------------------------------------------------

    def session_started(self, database: str) -> None:
        if self.enabled:
            a = self._a(database=database)
            self.started.add(1, a)
            self.active.add(1, a)

    def session_ended(self, database: str) -> None:
        if self.enabled:
            self.active.add(-1, self._a(database=database))

    def session_parked(self, database: str, delta: int) -> None:
        if self.enabled:
            self.parked.add(delta, self._a(database=database))

    def session_refused(self, reason: str) -> None:
        if self.enabled:
            self.refused.add(1, self._a(reason=reason))

    def upstream_auth_failure(self, database: str, reason: str) -> None:
        if self.enabled:
            self.auth_failures.add(1, self._a(database=database, reason=reason))

    def watch_health(self, health: Any) -> None:
        """Export ``health`` (a :class:`services.dbproxy.health.DatabaseHealth`) as the
        ``database.up`` and ``database.last_success`` gauges; count its failures."""
        if not self.enabled:
            return
        from opentelemetry.metrics import Observation

        self._health = health
        prev = health.on_change
        seen: dict[str, int] = {}

        def on_change(name: str, rec: Any) -> None:
            failures = rec.connect_failures + rec.timeouts + rec.auth_failures
            if failures > seen.get(name, 0):
                self.upstream_failures.add(failures - seen.get(name, 0),
                                           self._a(database=name, kind=rec.last_error_kind or "unreachable"))
            seen[name] = failures
            if prev is not None:
                prev(name, rec)

        health.on_change = on_change

        def up(_options):
            return [Observation(1 if r.state == 1 else 0, self._a(database=n))
                    for n, r in list(health.records.items()) if r.state]

        def last_success(_options):
            return [Observation(r.last_success, self._a(database=n))
                    for n, r in list(health.records.items()) if r.last_success]

        self._meter.create_observable_gauge("cachegate.dbproxy.database.up", [up], unit="1",
                                            description="1 when the proxy's last connect to the database worked")
        self._meter.create_observable_gauge("cachegate.dbproxy.database.last_success", [last_success], unit="s",
                                            description="Unix time of the proxy's last good connect to the database")

    # -- traffic (in bulk) ----------------------------------------------------------------------

    def add_traffic(self, allowed: Mapping[str, int], denied: Mapping[str, int], bytes_in: int,
                    bytes_out: int) -> None:
        """Add a session's counts since its last call."""
        if not self.enabled:
            return
        add = self.commands.add
        for name, n in allowed.items():
            add(n, self._a(command=name, result="allowed"))
        for name, n in denied.items():
            add(n, self._a(command=name, result="denied"))
        if bytes_in:
            self.bytes.add(bytes_in, self._a(direction="client_to_db"))
        if bytes_out:
            self.bytes.add(bytes_out, self._a(direction="db_to_client"))

    def record_latency(self, seconds: float, database: str) -> None:
        if self.enabled:
            self.latency.record(seconds, self._a(database=database))


DISABLED = ProxyMetrics(None)


def default() -> ProxyMetrics:
    """The process's instruments when :func:`~services.common.telemetry.setup_metrics`
    turned metrics on, else :data:`DISABLED`."""
    from services.common import telemetry

    if not telemetry.metrics_enabled():
        return DISABLED
    global _DEFAULT
    if _DEFAULT is None:
        from opentelemetry import metrics

        _DEFAULT = ProxyMetrics(metrics.get_meter(_SCOPE))
    return _DEFAULT


_DEFAULT: ProxyMetrics | None = None
