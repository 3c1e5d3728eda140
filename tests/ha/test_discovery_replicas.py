"""Discovery replicas (real auth and two real discovery processes): exactly one reconciles
its group; kill -9 it and the other takes over well within 30 s; `cgctl status` names the
leader. Lease TTL 3 s, renewed every 1 s here (15 s / 5 s by default)."""

from __future__ import annotations

import asyncio
import json
import signal
import time

import pytest

from cachegate.auth.v1 import cluster_service_pb2, database_service_pb2
from services.common.authclient import AuthClient
from services.common.creds import Creds
from tests.helpers import Cluster, free_port

pytestmark = pytest.mark.slow

STATIC = [{"name": "onprem", "uri": "redis.internal:6380", "tls": False}]
LEASE = {"lease_ttl": "3s", "lease_renew_interval": "1s", "poll_interval": 1}


def prometheus(addr: str) -> dict[str, float]:
    """One scrape of /metrics: {'name{labels}': value} (labels as exported, sorted by name)."""
    import urllib.request

    out = {}
    with urllib.request.urlopen(f"http://{addr}/metrics", timeout=10) as r:
        for line in r.read().decode().splitlines():
            if line and not line.startswith("#"):
                key, _, value = line.rpartition(" ")
                if "{" in key:
                    name, labels = key[:-1].split("{", 1)
                    parts = sorted(p for p in labels.split(",") if p and not p.startswith(("job=", "instance=", "otel_scope_")))
                    key = name + "{" + ",".join(parts) + "}"
                out[key] = float(value)
    return out


def rounds(proc) -> int:
    return sum(1 for line in proc.output().splitlines() if '"discovery round done"' in line)


async def wait_for(what: str, check, timeout: float = 20.0):
    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if asyncio.iscoroutine(got):
            got = await got
        if got:
            return got
        assert time.monotonic() < deadline, f"{what}: not within {timeout:g}s"
        await asyncio.sleep(0.1)


async def leader_of(auth: AuthClient) -> str:
    resp = await auth.cluster.ListLeases(cluster_service_pb2.ListLeasesRequest(), timeout=10)
    return {x.name: x.holder for x in resp.leases}.get("discovery/default", "")


async def published(auth: AuthClient) -> bool:
    resp = await auth.databases.ListDatabases(database_service_pb2.ListDatabasesRequest(), timeout=10)
    return any(d.name == "onprem" for d in resp.databases)


async def test_one_replica_reconciles_and_the_other_takes_over_after_kill_9(cluster, tmp_path):
    c: Cluster = cluster
    c.start_auth()
    token = c.token("discovery", "--reusable")
    metrics = {}
    for tag in ("disc-a", "disc-b"):
        cfg = c.joiner_config("discovery", token, data_dir=tmp_path / tag, static=STATIC, **LEASE)
        metrics[tag] = f"127.0.0.1:{free_port()}"
        cfg["telemetry"] = {"metrics": "prometheus", "prometheus_listen_addr": metrics[tag]}
        c.proc("discovery", cfg, tag).start()
    a, b = c.procs["disc-a"], c.procs["disc-b"]
    scrape = {id(a): metrics["disc-a"], id(b): metrics["disc-b"]}
    ids = {a.info["host_id"]: a, b.info["host_id"]: b}
    async with AuthClient(c.auth_addr, Creds.from_identity_file(c.admin_identity)) as auth:
        lead = await wait_for("a leader", lambda: leader_of(auth))
        leader, standby = ids[lead], next(p for h, p in ids.items() if h != lead)
        await wait_for("the standby to say it stands by", lambda: "standing by" in standby.output())
        await asyncio.sleep(3)  # three poll intervals: the leader reconciles, the standby does not
        assert rounds(leader) >= 2 and rounds(standby) == 0, (rounds(leader), rounds(standby))
        # Metrics, scraped as Prometheus would: the lease state, rounds, records published.
        lm, sm = prometheus(scrape[id(leader)]), prometheus(scrape[id(standby)])
        assert lm['cachegate_discovery_leader{group="default"}'] == 1
        assert sm['cachegate_discovery_leader{group="default"}'] == 0
        assert lm['cachegate_discovery_rounds_total{result="ok"}'] >= 2
        assert lm['cachegate_discovery_records_total{action="published",source="static"}'] >= 1
        assert lm['cachegate_discovery_round_duration_seconds_count{result="ok"}'] >= 2
        assert not any(k.startswith("cachegate_discovery_rounds_total") for k in sm)
        status = c.cgctl("status").stdout
        assert f"Leader   discovery {lead} (group default)" in status
        assert json.loads(c.cgctl("status", "--format=json").stdout)["discovery_leaders"] == {"default": lead}

        # The leader reconciles: a record deleted by hand is published again.
        await auth.databases.DeleteDatabase(database_service_pb2.DeleteDatabaseRequest(name="onprem"), timeout=10)
        await wait_for("the leader to publish the record again", lambda: published(auth))

        leader.stop(signal.SIGKILL)
        t0 = time.monotonic()
        await wait_for("the standby to take over", lambda: "leads its group" in standby.output(), timeout=30)
        took = time.monotonic() - t0
        assert await leader_of(auth) == standby.info["host_id"]
        n = rounds(standby)
        await auth.databases.DeleteDatabase(database_service_pb2.DeleteDatabaseRequest(name="onprem"), timeout=10)
        await wait_for("the new leader to reconcile", lambda: rounds(standby) > n)
        await wait_for("the new leader to publish", lambda: published(auth))
        # TTL 3 s + a renewal every 1 s: the takeover is bounded by about 4 s (30 s is the promise).
        assert took < 8, took

        # The killed replica comes back as a standby: the lease stays where it is.
        leader.start()
        await wait_for("the restarted replica to stand by",
                       lambda: "standing by" in leader.output().split("discovery service ready")[-1])
        assert await leader_of(auth) == standby.info["host_id"]
        # A graceful stop releases the lease: the other one leads at once, not after the TTL.
        standby.stop()
        t0 = time.monotonic()
        await wait_for("the released lease to be taken", lambda: "leads its group" in leader.output().split(
            "discovery service ready")[-1], timeout=10)
        assert time.monotonic() - t0 < 2.5
