"""Metrics and session-start traces of the data plane, through the in-process listener."""

from __future__ import annotations

import time
import urllib.request
from contextlib import contextmanager

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from services.common.config import TelemetryConfig
from services.common.telemetry import build_meter_provider
from services.dbproxy.metrics import ProxyMetrics

from .conftest import DB, REDIS_PASSWORD, free_port


def _points(reader: InMemoryMetricReader, name: str) -> list:
    data = reader.get_metrics_data()
    out = []
    for rm in data.resource_metrics if data else []:
        for sm in rm.scope_metrics:
            for m in sm.metrics:
                if m.name == name:
                    out.extend(m.data.data_points)
    return out


def _value(reader, name: str, **attrs) -> float:
    return sum(p.value for p in _points(reader, name) if all(p.attributes.get(k) == v for k, v in attrs.items()))


@contextmanager
def _metrics_on(proxy, metrics: ProxyMetrics):
    before = proxy.listener.metrics
    proxy.listener.metrics = metrics
    try:
        yield
    finally:
        proxy.listener.metrics = before


def _until(pred, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_counters_after_commands(proxy, certs):
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    spans = InMemorySpanExporter()
    tracers = TracerProvider()
    tracers.add_span_processor(SimpleSpanProcessor(spans))
    metrics = ProxyMetrics(provider.get_meter("test"), tracer=tracers.get_tracer("test"))
    mia = certs.user_cert("mia")
    with _metrics_on(proxy, metrics):
        proxy.creds.cached = "a-rotated-away-key"  # the first AUTH fails, the refreshed key works
        r = proxy.redis_cli(mia, input="SET m:k 1\nGET m:k\nGET m:k\nFLUSHALL\nNOSUCHCMD x\nPING\n")
        assert r.returncode == 0, r.stderr
        assert "denied" in r.stdout
        proxy.redis_cli(None, "PING")  # no certificate: refused
        _until(lambda: _value(reader, "cachegate.dbproxy.sessions.refused", reason="no_certificate") >= 1
               and _value(reader, "cachegate.dbproxy.commands", command="PING") >= 1)
    assert proxy.creds.cached == REDIS_PASSWORD
    assert _value(reader, "cachegate.dbproxy.sessions.started", database=DB) >= 1
    _until(lambda: _value(reader, "cachegate.dbproxy.sessions.active", database=DB) == 0)
    assert _value(reader, "cachegate.dbproxy.commands", command="GET", result="allowed") == 2
    assert _value(reader, "cachegate.dbproxy.commands", command="SET", result="allowed") == 1
    assert _value(reader, "cachegate.dbproxy.commands", command="FLUSHALL", result="denied") == 1
    assert _value(reader, "cachegate.dbproxy.commands", command="OTHER", result="allowed") == 1
    assert not [p for p in _points(reader, "cachegate.dbproxy.commands") if p.attributes["command"] == "NOSUCHCMD"]
    assert _value(reader, "cachegate.dbproxy.bytes", direction="client_to_db") > 40
    assert _value(reader, "cachegate.dbproxy.bytes", direction="db_to_client") > 10
    assert _value(reader, "cachegate.dbproxy.upstream.auth_failures", database=DB, reason="auth") == 1
    hist = _points(reader, "cachegate.dbproxy.command.duration")
    assert hist and sum(p.count for p in hist) >= 1 and all(0 < p.sum < 10 for p in hist)

    names = [s.name for s in spans.get_finished_spans()]
    for name in ("dbproxy session start", "certificate check", "authorize", "rbac", "upstream connect",
                 "credentials", "upstream auth"):
        assert name in names, names
    start = next(s for s in spans.get_finished_spans()
                 if s.name == "dbproxy session start" and s.attributes.get("cachegate.user") == "mia")
    children = {s.name for s in spans.get_finished_spans() if s.parent and s.parent.span_id == start.context.span_id}
    assert {"certificate check", "authorize", "rbac"} <= children
    assert not any(REDIS_PASSWORD in str(s.to_json()) for s in spans.get_finished_spans())
    provider.shutdown()


def test_upstream_refusal_is_counted_by_reason(proxy, certs):
    from services.dbproxy.upstream import UpstreamTarget

    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    with _metrics_on(proxy, ProxyMetrics(provider.get_meter("test"))):
        proxy.overrides["noe"] = {"target": UpstreamTarget(DB, "127.0.0.1", free_port(), None)}
        try:
            proxy.redis_cli(certs.user_cert("noe"), "PING")
        finally:
            del proxy.overrides["noe"]
        _until(lambda: _value(reader, "cachegate.dbproxy.sessions.refused", reason="upstream_unreachable") == 1)
    provider.shutdown()


@pytest.mark.parametrize("mode", ["prometheus"])
def test_prometheus_endpoint_serves_the_session_counters(proxy, alice, mode):
    from prometheus_client import CollectorRegistry

    port = free_port()
    cfg = TelemetryConfig(metrics=mode, prometheus_listen_addr=f"127.0.0.1:{port}")
    provider, server = build_meter_provider("dbproxy", cfg, prometheus_registry=CollectorRegistry())
    try:
        with _metrics_on(proxy, ProxyMetrics(provider.get_meter("cachegate.dbproxy"))):
            r = proxy.redis_cli(alice, "GET", "prom:k")
            assert r.returncode == 0, r.stderr

            def scraped() -> str:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
                    return resp.read().decode()

            _until(lambda: 'cachegate_dbproxy_commands_total{command="GET"' in scraped())
            text = scraped()
        assert f'cachegate_dbproxy_sessions_started_total{{database="{DB}"' in text
        assert "cachegate_dbproxy_sessions_active" in text
        assert 'cachegate_dbproxy_bytes_total{direction="client_to_db"' in text
    finally:
        server.shutdown()
        provider.shutdown()
