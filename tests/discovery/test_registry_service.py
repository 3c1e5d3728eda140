"""Auth's DatabaseService with real processes: who may write what, paging, owner filter, watch."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from cachegate.auth.v1 import database_service_pb2 as pb
from cachegate.types.v1 import types_pb2

from services.common.authclient import AuthClient
from services.common.creds import Creds
from services.common.join import ensure_joined

pytestmark = pytest.mark.slow


def db(name: str, **kw) -> types_pb2.Database:
    return types_pb2.Database(name=name, uri=kw.pop("uri", "h:6380"), **kw)


async def joined(cluster, tmp_path, role: int, type_: str) -> AuthClient:
    creds = await ensure_joined(tmp_path / type_, cluster.join_addr, cluster.token(type_), cluster.ca_pin, role, [])
    return AuthClient(cluster.auth_addr, creds)


def test_registry_rules_paging_and_watch(cluster, tmp_path):
    cluster.start_auth()

    async def go():
        admin = AuthClient(cluster.auth_addr, Creds.from_identity_file(cluster.admin_identity))
        disc = await joined(cluster, tmp_path, types_pb2.SERVICE_ROLE_DISCOVERY, "discovery")
        proxy = await joined(cluster, tmp_path, types_pb2.SERVICE_ROLE_DBPROXY, "proxy")
        watch = proxy.databases.WatchDatabases(pb.WatchDatabasesRequest())
        first = await watch.read()
        assert first.type == types_pb2.WATCH_EVENT_TYPE_INIT_DONE  # empty registry

        # admin records are dynamic whatever they say; their secrets are limited
        r = await admin.databases.UpsertDatabase(pb.UpsertDatabaseRequest(database=db(
            "mine", origin=types_pb2.DATABASE_ORIGIN_DISCOVERY, owner="azure/default",
            secret_ref="env:CACHEGATE_DB_MINE")))
        assert r.database.origin == types_pb2.DATABASE_ORIGIN_DYNAMIC and r.database.owner == ""
        for ref in ("env:AZURE_CLIENT_SECRET", "file:/etc/shadow"):
            with pytest.raises(grpc.aio.AioRpcError) as ei:
                await admin.databases.UpsertDatabase(pb.UpsertDatabaseRequest(database=db("x", secret_ref=ref)))
            assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "CACHEGATE_DB_" in ei.value.details()
        for bad in (db("bad name"), db("x", uri="nohostport"), db("x", protocol="mysql")):
            with pytest.raises(grpc.aio.AioRpcError) as ei:
                await admin.databases.UpsertDatabase(pb.UpsertDatabaseRequest(database=bad))
            assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT

        # discovery publishes its own, never over an admin's, and may not delete an admin's
        for i in range(5):
            await disc.databases.UpsertDatabase(pb.UpsertDatabaseRequest(database=db(
                f"found-{i}", origin=types_pb2.DATABASE_ORIGIN_DISCOVERY, owner="azure/default")))
        with pytest.raises(grpc.aio.AioRpcError) as ei:
            await disc.databases.UpsertDatabase(pb.UpsertDatabaseRequest(database=db(
                "mine", origin=types_pb2.DATABASE_ORIGIN_DISCOVERY, owner="azure/default")))
        assert ei.value.code() == grpc.StatusCode.ALREADY_EXISTS
        with pytest.raises(grpc.aio.AioRpcError) as ei:
            await disc.databases.DeleteDatabase(pb.DeleteDatabaseRequest(name="mine"))
        assert ei.value.code() == grpc.StatusCode.PERMISSION_DENIED
        with pytest.raises(grpc.aio.AioRpcError) as ei:
            await admin.databases.UpsertDatabase(pb.UpsertDatabaseRequest(database=db("found-1")))
        assert ei.value.code() == grpc.StatusCode.ALREADY_EXISTS and "discovery" in ei.value.details()
        with pytest.raises(grpc.aio.AioRpcError) as ei:
            await proxy.databases.UpsertDatabase(pb.UpsertDatabaseRequest(database=db("p")))
        assert ei.value.code() == grpc.StatusCode.PERMISSION_DENIED

        # paging with and without the owner filter
        names, token = [], ""
        while True:
            page = await admin.databases.ListDatabases(pb.ListDatabasesRequest(page_size=2, page_token=token,
                                                                               owner="azure/default"))
            names += [d.name for d in page.databases]
            token = page.next_page_token
            if not token:
                break
        assert names == [f"found-{i}" for i in range(5)]
        everything = await admin.databases.ListDatabases(pb.ListDatabasesRequest())
        assert [d.name for d in everything.databases] == [f"found-{i}" for i in range(5)] + ["mine"]

        # the watch saw every change, in order
        seen = []
        for _ in range(6):
            ev = await asyncio.wait_for(watch.read(), 5)
            seen.append((ev.type, ev.database.name))
        assert seen == [(types_pb2.WATCH_EVENT_TYPE_PUT, "mine")] + [
            (types_pb2.WATCH_EVENT_TYPE_PUT, f"found-{i}") for i in range(5)]
        await admin.databases.DeleteDatabase(pb.DeleteDatabaseRequest(name="found-0"))
        ev = await asyncio.wait_for(watch.read(), 5)
        assert (ev.type, ev.database.name) == (types_pb2.WATCH_EVENT_TYPE_DELETE, "found-0")
        watch.cancel()

        # a new watcher gets the current state first
        w2 = proxy.databases.WatchDatabases(pb.WatchDatabasesRequest())
        got = [await w2.read() for _ in range(6)]
        assert [e.database.name for e in got[:5]] == ["found-1", "found-2", "found-3", "found-4", "mine"]
        assert got[5].type == types_pb2.WATCH_EVENT_TYPE_INIT_DONE
        w2.cancel()

        # fetcher statuses, per reporting host
        await disc.databases.ReportFetcherStatus(pb.ReportFetcherStatusRequest(statuses=[
            types_pb2.FetcherStatus(name="azure-redis/s", kind="azure-redis", databases_found=4)]))
        hosts = (await admin.databases.ListFetcherStatuses(pb.ListFetcherStatusesRequest())).hosts
        assert len(hosts) == 1 and hosts[0].statuses[0].databases_found == 4
        for c in (admin, disc, proxy):
            await c.close()

    asyncio.run(go())
    # admin changes are audited (discovery's are logged, not audited)
    import sqlite3

    con = sqlite3.connect(cluster.data / "auth" / "cachegate.db")
    types = [(t, a) for t, a in con.execute("SELECT type, actor FROM audit WHERE type LIKE 'db.%' ORDER BY time")]
    con.close()
    assert types == [("db.put", "cachegate-admin"), ("db.delete", "cachegate-admin")]
