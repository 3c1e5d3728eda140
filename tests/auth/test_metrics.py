"""Auth exports metrics: logins and failures by reason, lockouts, storage latency and errors,
watch streams."""

from __future__ import annotations

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from services.auth import metrics as auth_metrics
from services.auth.watch import Subscription
from tests.auth.test_users import add_user, login, login_fails


def points(reader) -> dict:
    out: dict = {}
    for rm in reader.get_metrics_data().resource_metrics:
        for sm in rm.scope_metrics:
            for m in sm.metrics:
                for p in m.data.data_points:
                    key = (m.name, tuple(sorted(p.attributes.items())))
                    out[key] = getattr(p, "value", None) if hasattr(p, "value") else p.count
    return out


@pytest.fixture
def reader(monkeypatch):
    r = InMemoryMetricReader()
    m = auth_metrics.AuthMetrics(MeterProvider(metric_readers=[r]).get_meter("test"))
    monkeypatch.setattr(auth_metrics, "_default", [m])
    yield r, m


async def test_logins_lockouts_storage_and_watches(make, reader):
    r, m = reader
    env = await make(login_max_attempts=2, login_lockout=30)
    m.instrument_backend(env.backend)
    await add_user(env, "alice")
    await login(env, "alice")
    await login_fails(env, "alice", "wrong password!!")
    await login_fails(env, "alice", "wrong password!!")  # the second locks alice out
    await login_fails(env, "alice")
    p = points(r)
    assert p[("cachegate_auth_logins", (("reason", "password"), ("result", "ok")))] == 1
    assert p[("cachegate_auth_logins", (("reason", "password mismatch"), ("result", "failed")))] == 2
    assert p[("cachegate_auth_logins", (("reason", "too many failed attempts (user locked out)"),
                                        ("result", "failed")))] == 1
    assert p[("cachegate_auth_lockouts", (("scope", "user"),))] == 1
    assert p[("cachegate_auth_storage_duration", (("op", "get"),))] > 0

    sub = Subscription(env.backend, "roles/")
    assert points(r)[("cachegate_auth_watch_streams", (("kind", "roles"),))] == 1
    sub.close()
    sub.close()
    assert points(r)[("cachegate_auth_watch_streams", (("kind", "roles"),))] == 0

    async def broken(*a, **kw):
        raise OSError("disk on fire")

    env.backend.get = broken
    m.instrument_backend(env.backend)
    with pytest.raises(OSError):
        await env.backend.get("x")
    assert points(r)[("cachegate_auth_storage_errors", (("op", "get"),))] == 1
