"""OpenTelemetry: traces across gRPC calls (off by default, and then nearly free)."""

from __future__ import annotations

import logging

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
        exporter = ConsoleSpanExporter()
    else:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        exporter = OTLPSpanExporter(endpoint=cfg.otlp_endpoint, insecure=cfg.otlp_insecure)
    provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    _state["provider"] = provider
    log.info("tracing on", extra={"exporter": cfg.traces})
    return True


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
