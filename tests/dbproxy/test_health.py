"""Database health as the proxy sees it, against a real redis-server (TLS + password): the
check's four steps, each failure counted by kind with a one-line error and no secret, the
heartbeat's re-checks, and the metrics it exports."""

from __future__ import annotations

import asyncio
import socket
import ssl

from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from cachegate.auth.v1 import database_service_pb2 as dpb
from services.dbproxy.health import DatabaseHealth, Heartbeat
from services.dbproxy.metrics import ProxyMetrics
from services.dbproxy.upstream import StaticCredentials, UpstreamPool, UpstreamTarget

from .conftest import REDIS_PASSWORD, certs, free_port, redis_server  # noqa: F401 (fixtures)

OK, DOWN = dpb.DATABASE_HEALTH_STATE_OK, dpb.DATABASE_HEALTH_STATE_DOWN


def _target(certs, port, name="orders"):  # noqa: F811
    return UpstreamTarget(name, "127.0.0.1", port, ssl.create_default_context(cafile=certs.path("server-ca.pem")))


async def test_check_of_a_healthy_database_has_four_timed_steps(certs, redis_server):  # noqa: F811
    h = DatabaseHealth()
    resp = await h.check(_target(certs, redis_server.port), StaticCredentials(None, REDIS_PASSWORD), timeout=5)
    assert resp.ok, resp
    assert [s.name for s in resp.steps] == ["tcp", "tls", "auth", "ping"] and all(s.ok for s in resp.steps)
    assert resp.steps[-1].detail == "PONG" and resp.steps[1].detail.startswith("TLSv1.")
    assert resp.health.state == OK and resp.health.successes == 1 and resp.health.last_success_time.seconds


async def test_failures_are_counted_by_kind_with_one_line_and_no_secret(certs, redis_server):  # noqa: F811
    h = DatabaseHealth()
    wrong = "not-the-password-4471"
    resp = await h.check(_target(certs, redis_server.port), StaticCredentials(None, wrong), timeout=5)
    assert not resp.ok and resp.steps[-1].name == "auth" and not resp.steps[-1].ok
    assert "WRONGPASS" in resp.steps[-1].detail and wrong not in str(resp) and REDIS_PASSWORD not in str(resp)
    assert resp.health.auth_failures == 1 and resp.health.last_error_kind == "auth"

    closed = free_port()
    resp = await h.check(_target(certs, closed, "gone"), StaticCredentials(None, REDIS_PASSWORD), timeout=5)
    assert [(s.name, s.ok) for s in resp.steps] == [("tcp", False)]
    assert f"nc -zv 127.0.0.1 {closed}" in resp.steps[0].detail and "\n" not in resp.steps[0].detail
    assert resp.health.state == DOWN and resp.health.connect_failures == 1

    # A port that accepts and never answers: the TLS step times out.
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    try:
        resp = await h.check(_target(certs, srv.getsockname()[1], "silent"),
                             StaticCredentials(None, REDIS_PASSWORD), timeout=0.5)
    finally:
        srv.close()
    assert [(s.name, s.ok) for s in resp.steps] == [("tcp", True), ("tls", False)]
    assert resp.health.timeouts == 1 and resp.health.last_error_kind == "timeout"
    assert "at the tls step" in resp.steps[-1].detail
    assert [x.name for x in h.snapshot()] == ["gone", "orders", "silent"]


async def test_session_connects_are_tracked_and_the_heartbeat_rechecks_a_down_database(certs, redis_server):  # noqa: F811
    h = DatabaseHealth()
    pool = UpstreamPool(size=1, timeout=2, health=h)
    connect = h.tracked(pool.get)
    good = _target(certs, redis_server.port)
    up = await connect(good, StaticCredentials(None, REDIS_PASSWORD), 0, timeout=2)
    up.close()
    assert h.records["orders"].state == OK
    dead = _target(certs, free_port(), "dead")
    try:
        await connect(dead, StaticCredentials(None, REDIS_PASSWORD), 0, timeout=2)
    except Exception as exc:  # noqa: BLE001
        assert "nc -zv" in str(exc)
    else:
        raise AssertionError("a connect to a closed port succeeded")
    assert h.records["dead"].state == DOWN
    await asyncio.sleep(0.2)
    await pool.close()

    reports: list[dpb.ProxyStatus] = []
    probed: list[str] = []

    async def report(st):
        reports.append(st)

    async def probe(name):
        probed.append(name)

    hb = Heartbeat(report, lambda: dpb.ProxyStatus(databases=h.snapshot()), h, probe, interval=0.05)
    # Both were used just now; the down one would be re-checked even if not.
    assert hb.due_probes() == ["dead", "orders"]
    h.records["orders"].last_used = 0
    assert hb.due_probes() == ["dead"]
    hb.start()
    await asyncio.sleep(0.3)
    await hb.stop()
    assert len(reports) >= 3 and probed[:1] == ["dead"] and set(probed) == {"dead"}
    assert {d.name: d.state for d in reports[-1].databases} == {"dead": DOWN, "orders": OK}

    # A heartbeat that auth does not take is retried next time; the proxy goes on.
    async def failing(st):
        raise ConnectionError("auth is away")

    hb2 = Heartbeat(failing, lambda: dpb.ProxyStatus(), h, None, interval=0.05)
    await hb2.once()
    await hb2.once()
    assert hb2.reports == 0


def test_health_is_exported_as_metrics():
    reader = InMemoryMetricReader()
    m = ProxyMetrics(MeterProvider(metric_readers=[reader]).get_meter("t"))
    h = DatabaseHealth()
    m.watch_health(h)
    from services.dbproxy.upstream import UpstreamError

    h.success("a")
    h.failure("b", UpstreamError("cannot reach database \"b\"", "unreachable"))
    h.failure("b", UpstreamError("cannot reach database \"b\"", "unreachable"))
    data = reader.get_metrics_data()
    points = {}
    for rm in data.resource_metrics:
        for sm in rm.scope_metrics:
            for metric in sm.metrics:
                for p in metric.data.data_points:
                    points[(metric.name, tuple(sorted(p.attributes.items())))] = p.value
    assert points[("cachegate.dbproxy.database.up", (("database", "a"),))] == 1
    assert points[("cachegate.dbproxy.database.up", (("database", "b"),))] == 0
    assert points[("cachegate.dbproxy.upstream.failures", (("database", "b"), ("kind", "unreachable")))] == 2
    assert points[("cachegate.dbproxy.database.last_success", (("database", "a"),))] > 1.7e9
