"""Leases in auth's storage (one discovery replica of a group reconciles at a time), from
both backends: SQLite and a real PostgreSQL, and through the servicer as discovery calls it."""

from __future__ import annotations

import asyncio

import pytest

from cachegate.auth.v1 import cluster_service_pb2 as cs
from services.auth.leases import LeaseError, Leases
from services.auth.service import JOIN_POLICY, MESH_POLICY
from services.common.authz import HOST_DISCOVERY
from tests.auth.test_pgbackend import backend, pg, pg_dsn  # noqa: F401 (fixtures)

NAME = "discovery/default"


async def test_one_holder_at_a_time_renewal_expiry_and_release(backend):  # noqa: F811
    leases = Leases(backend)
    ok, lease = await leases.acquire(NAME, "host-a", 1.0)
    assert ok and lease.holder == "host-a"
    ok, other = await leases.acquire(NAME, "host-b", 1.0)
    assert not ok and other.holder == "host-a"  # the standby learns who leads
    ok, renewed = await leases.acquire(NAME, "host-a", 1.0)
    assert ok and renewed.acquired == lease.acquired and renewed.expires >= lease.expires
    assert [x.holder for x in await leases.list()] == ["host-a"]

    await asyncio.sleep(1.2)  # host-a stopped renewing: the lease ends with its TTL
    assert await leases.list() == []
    ok, taken = await leases.acquire(NAME, "host-b", 1.0)
    assert ok and taken.holder == "host-b" and taken.acquired > lease.acquired
    assert not (await leases.acquire(NAME, "host-a", 1.0))[0]

    assert not await leases.release(NAME, "host-a")  # not the holder: nothing happens
    assert (await leases.acquire(NAME, "host-a", 1.0))[1].holder == "host-b"
    assert await leases.release(NAME, "host-b")
    ok, back = await leases.acquire(NAME, "host-a", 5.0)  # at once, not after the TTL
    assert ok and back.holder == "host-a"


async def test_replicas_racing_for_a_free_lease_get_exactly_one_holder(backend):  # noqa: F811
    leases = Leases(backend)
    results = await asyncio.gather(*(leases.acquire(NAME, f"host-{i}", 5.0) for i in range(8)))
    winners = {lease.holder for ok, lease in results if ok}
    assert len(winners) == 1
    assert {lease.holder for _, lease in results} == winners


@pytest.mark.parametrize("name,ttl", [("locks/x", 5.0), ("discovery/", 5.0), ("discovery/a b", 5.0),
                                      (NAME, 0.1), (NAME, 3600.0)])
async def test_bad_names_and_ttls_are_refused(tmp_path, name, ttl):
    from services.auth.backend import SQLiteBackend

    with pytest.raises(LeaseError) as exc:
        await Leases(SQLiteBackend(tmp_path / "a.db")).acquire(name, "h", ttl)
    assert "\n" not in str(exc.value)


def test_only_discovery_hosts_take_leases_and_never_on_the_join_port():
    for method in ("AcquireLease", "ReleaseLease"):
        full = f"/cachegate.auth.v1.ClusterService/{method}"
        assert MESH_POLICY.lookup(full).principals == frozenset({HOST_DISCOVERY})
        assert JOIN_POLICY.lookup(full) is None
    assert cs.AcquireLeaseRequest(name=NAME).name == NAME
