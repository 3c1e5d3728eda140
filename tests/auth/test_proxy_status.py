"""dbproxy heartbeats stored by auth, on SQLite and on a real PostgreSQL: the host is the
certificate's, the time is auth's, and only administrators read them back."""

from __future__ import annotations

import time

import grpc

from cachegate.auth.v1 import database_service_pb2 as dpb
from services.auth.databases import DatabaseServicer
from services.auth.state import AuthState
from services.common.config import load_config
from services.common.grpcutil import from_ts
from tests.auth.conftest import Env
from tests.auth.test_pgbackend import backend, pg, pg_dsn  # noqa: F401 (fixtures)


async def test_heartbeat_is_stored_under_the_callers_host_id(backend, tmp_path):  # noqa: F811
    cfg = load_config(environ={}, data={"data_dir": str(tmp_path / "data"), "auth_service": {"cluster_name": "u"}})
    state = AuthState(cfg, backend)
    await state.init()
    env = Env(state)
    dbs = DatabaseServicer(state)
    env.as_proxy()
    before = time.time()
    await env.call(dbs.ReportProxyStatus, dpb.ReportProxyStatusRequest(status=dpb.ProxyStatus(
        host_id="someone-else", version="9.9.9", sessions=3, heartbeat_interval_seconds=10,
        databases=[dpb.DatabaseHealth(name="orders", state=dpb.DATABASE_HEALTH_STATE_DOWN,
                                      last_error="cannot reach database", connect_failures=2)])))
    env.as_admin()
    got = (await env.call(dbs.ListProxyStatuses, dpb.ListProxyStatusesRequest())).proxies
    assert [p.host_id for p in got] == ["proxy-host-1"]  # never the request's claim
    p = got[0]
    assert from_ts(p.heartbeat_time) >= before - 1 and p.sessions == 3
    assert p.databases[0].state == dpb.DATABASE_HEALTH_STATE_DOWN and p.databases[0].connect_failures == 2
    # A second heartbeat replaces the first.
    env.as_proxy()
    await env.call(dbs.ReportProxyStatus, dpb.ReportProxyStatusRequest(status=dpb.ProxyStatus(sessions=0)))
    env.as_admin()
    got = (await env.call(dbs.ListProxyStatuses, dpb.ListProxyStatusesRequest())).proxies
    assert len(got) == 1 and got[0].sessions == 0 and not got[0].databases
    bad = await env.fails(dbs.ListProxyStatuses, dpb.ListProxyStatusesRequest(page_token="garbage"))
    assert bad.code == grpc.StatusCode.INVALID_ARGUMENT


def test_only_dbproxy_hosts_report_and_only_admins_list():
    from services.auth.service import DATABASES, MESH_POLICY, m
    from services.common.authz import ADMIN, HOST_DBPROXY

    report = MESH_POLICY.rules[m(DATABASES, "ReportProxyStatus")]
    listing = MESH_POLICY.rules[m(DATABASES, "ListProxyStatuses")]
    assert report.principals == {HOST_DBPROXY} and listing.principals == {ADMIN}
