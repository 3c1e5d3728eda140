"""Auth's metrics: logins and failures by reason, lockouts, storage latency and errors,
watch streams. Instruments come from the global MeterProvider that
:func:`services.common.telemetry.setup_metrics` installs; with metrics off every call returns
at once."""

from __future__ import annotations

import functools
import time
from typing import Any

from services.common import telemetry

# Backend methods timed (and counted when they raise).
STORAGE_OPS = ("get", "put", "create", "compare_and_swap", "delete", "list", "append_audit", "append_audit_many",
               "search_audit")


class AuthMetrics:
    def __init__(self, meter: Any | None = None) -> None:
        self.enabled = meter is not None or telemetry.metrics_enabled()
        if not self.enabled:
            return
        if meter is None:
            from opentelemetry import metrics

            meter = metrics.get_meter("cachegate.auth")
        self.logins = meter.create_counter("cachegate_auth_logins", unit="1",
                                           description="Logins by result (ok, failed) and reason")
        self.lockouts = meter.create_counter("cachegate_auth_lockouts", unit="1",
                                             description="Login lockouts by scope (user, addr)")
        self.certs = meter.create_counter("cachegate_auth_database_certs", unit="1",
                                          description="Database certificates by result")
        self.storage_latency = meter.create_histogram("cachegate_auth_storage_duration", unit="s",
                                                      description="Storage call latency by operation")
        self.storage_errors = meter.create_counter("cachegate_auth_storage_errors", unit="1",
                                                   description="Storage calls that raised, by operation")
        self.watch_streams = meter.create_up_down_counter("cachegate_auth_watch_streams", unit="1",
                                                          description="Open watch streams by kind")

    def login(self, ok: bool, reason: str = "") -> None:
        if self.enabled:
            self.logins.add(1, {"result": "ok" if ok else "failed", "reason": reason or "none"})

    def lockout(self, scope: str) -> None:
        if self.enabled:
            self.lockouts.add(1, {"scope": scope})

    def database_cert(self, ok: bool, reason: str = "") -> None:
        if self.enabled:
            self.certs.add(1, {"result": "ok" if ok else "failed", "reason": reason or "none"})

    def watch(self, kind: str, delta: int) -> None:
        if self.enabled:
            self.watch_streams.add(delta, {"kind": kind})

    def instrument_backend(self, backend: Any) -> Any:
        """Time the backend's storage calls (in place); returns it."""
        if not self.enabled:
            return backend
        for op in STORAGE_OPS:
            fn = getattr(backend, op, None)
            if fn is not None:
                setattr(backend, op, self._timed(op, fn))
        return backend

    def _timed(self, op: str, fn):
        attrs = {"op": op}
        latency, errors = self.storage_latency, self.storage_errors

        @functools.wraps(fn)
        async def wrapper(*args, **kw):
            t0 = time.perf_counter()
            try:
                return await fn(*args, **kw)
            except Exception:
                errors.add(1, attrs)
                raise
            finally:
                latency.record(time.perf_counter() - t0, attrs)

        return wrapper


_default: list[AuthMetrics] = []


def default() -> AuthMetrics:
    """The process's auth metrics (made on first use, after setup_metrics)."""
    if not _default or (not _default[0].enabled and telemetry.metrics_enabled()):
        _default[:] = [AuthMetrics()]
    return _default[0]
