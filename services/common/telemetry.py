"""OpenTelemetry: traces across gRPC calls, and metrics (both off by default, and then
nearly free).

Metrics (``telemetry.metrics``): ``console`` prints every minute, ``otlp`` pushes to
``otlp_endpoint`` every minute, ``prometheus`` serves ``/metrics`` on
``prometheus_listen_addr`` for scraping. :func:`setup_metrics` installs the global
MeterProvider once per process; instruments taken from ``opentelemetry.metrics``
before or after it report through it. :func:`build_meter_provider` builds one
without installing it (tests, embedding)."""

from __future__ import annotations

import logging
import sys

from services.common.config import TelemetryConfig

log = logging.getLogger("cachegate.telemetry")

_state: dict[str, object] = {}


def setup_tracing(service: str, cfg: TelemetryConfig) -> bool:
    """Install a tracer provider per config. Returns whether tracing is on."""
    if cfg.traces == "off":
        return False
    if _state.get("provider"):
        return True
    from opentelemetry import trace
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter
    from opentelemetry.sdk.trace.sampling import ParentBasedTraceIdRatio

    provider = TracerProvider(
        resource=Resource.create({"service.name": f"cachegate-{service}"}),
        sampler=ParentBasedTraceIdRatio(cfg.sample_ratio),
    )
    if cfg.traces == "console":
        # One line per span, to its own stream: multi-line span JSON must never land in the log.
        out = open(cfg.traces_output, "a", buffering=1) if cfg.traces_output else sys.stdout  # noqa: SIM115
        exporter = ConsoleSpanExporter(out=out, formatter=lambda span: span.to_json(indent=None) + "\n")
    else:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        exporter = OTLPSpanExporter(endpoint=cfg.otlp_endpoint, insecure=cfg.otlp_insecure)
    provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    _state["provider"] = provider
    log.info("tracing on", extra={"exporter": cfg.traces})
    return True


def build_meter_provider(service: str, cfg: TelemetryConfig, *, readers: list | tuple = (),
                         prometheus_registry=None):
    """A MeterProvider for ``cfg.metrics`` plus ``readers`` (not installed), and the
    Prometheus HTTP server it started (or None). None when metrics are off and no
    reader is given."""
    mode = cfg.metrics
    if mode == "off" and not readers:
        return None, None
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import ConsoleMetricExporter, PeriodicExportingMetricReader
    from opentelemetry.sdk.resources import Resource

    all_readers = list(readers)
    server = None
    if mode == "console":
        all_readers.append(PeriodicExportingMetricReader(ConsoleMetricExporter(), export_interval_millis=60_000))
    elif mode == "otlp":
        from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter

        all_readers.append(PeriodicExportingMetricReader(
            OTLPMetricExporter(endpoint=cfg.otlp_endpoint, insecure=cfg.otlp_insecure),
            export_interval_millis=60_000))
    elif mode == "prometheus":
        from opentelemetry.exporter.prometheus import PrometheusMetricReader
        from prometheus_client import REGISTRY, start_http_server

        from services.common.config import split_hostport

        registry = prometheus_registry if prometheus_registry is not None else REGISTRY
        all_readers.append(PrometheusMetricReader(registry=registry))
        host, port = split_hostport(cfg.prometheus_listen_addr, 9464)
        started = start_http_server(port, addr=host or "0.0.0.0", registry=registry)
        server = started[0] if isinstance(started, tuple) else started
    provider = MeterProvider(
        metric_readers=all_readers,
        resource=Resource.create({"service.name": f"cachegate-{service}"}),
    )
    return provider, server


def setup_metrics(service: str, cfg: TelemetryConfig) -> bool:
    """Install the process's MeterProvider per ``cfg.metrics``. Returns whether metrics
    are on. Call it once, early (before the services build their instruments is best;
    instruments made earlier still follow)."""
    if _state.get("meter_provider"):
        return True
    provider, server = build_meter_provider(service, cfg)
    if provider is None:
        return False
    from opentelemetry import metrics

    metrics.set_meter_provider(provider)
    _state["meter_provider"] = provider
    if server is not None:
        _state["prometheus_server"] = server
    log.info("metrics on", extra={"exporter": cfg.metrics})
    return True


def metrics_enabled() -> bool:
    """Whether :func:`setup_metrics` installed a MeterProvider in this process."""
    return bool(_state.get("meter_provider"))


def server_interceptors(enabled: bool) -> list:
    if not enabled:
        return []
    from opentelemetry.instrumentation.grpc import aio_server_interceptor

    return [aio_server_interceptor()]


def client_interceptors(enabled: bool) -> list:
    if not enabled:
        return []
    from opentelemetry.instrumentation.grpc import aio_client_interceptors

    return list(aio_client_interceptors())


def shutdown() -> None:
    provider = _state.pop("provider", None)
    if provider is not None:
        provider.shutdown()  # type: ignore[attr-defined]
    meters = _state.pop("meter_provider", None)
    if meters is not None:
        try:
            meters.shutdown(timeout_millis=5_000)  # type: ignore[attr-defined]
        except Exception:  # noqa: BLE001 - an exporter that cannot flush must not block exit
            log.warning("metrics exporter did not shut down cleanly", exc_info=True)
    server = _state.pop("prometheus_server", None)
    if server is not None:
        server.shutdown()  # type: ignore[attr-defined]
