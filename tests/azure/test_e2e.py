"""Discovery as a real process: joined to a real auth, the real SDK against the stand-in process.

The config comes from `cachegate db configure create`; records reach auth's registry; status
reaches `ListFetcherStatuses`; a cache that disappears is deleted; no credential and 403 are
shown in the status with the messages the guide's troubleshooting needs.
"""

from __future__ import annotations

import asyncio
import json
import ssl
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml
from cachegate.auth.v1 import database_service_pb2
from cachegate.types.v1 import types_pb2

from services.common.authclient import AuthClient
from services.common.creds import Creds
from tests.helpers import REPO, Proc, run_cli

from .conftest import CLIENT_ID, CLIENT_SECRET, SUB1, SUB2, TENANT

pytestmark = pytest.mark.slow


class StandinProc:
    def __init__(self, root: Path, state: dict):
        self.root = root
        (root / "standin.yaml").write_text(yaml.safe_dump(state))
        self.ready = root / "standin.ready.json"
        self.ca = root / "standin-ca.pem"
        self.log = open(root / "standin.log", "wb")  # noqa: SIM115
        self.popen = subprocess.Popen(
            [sys.executable, "-m", "services.azure_standin", "--state", str(root / "standin.yaml"),
             "--ca-out", str(self.ca), "--ready-file", str(self.ready)],
            cwd=REPO, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 20
        while not self.ready.exists():
            assert self.popen.poll() is None, (root / "standin.log").read_text()
            assert time.monotonic() < deadline, "stand-in did not start"
            time.sleep(0.05)
        self.info = json.loads(self.ready.read_text())
        self._ctx = ssl.create_default_context(cafile=str(self.ca))

    def control(self, method: str, op: str, body: dict | None = None) -> dict:
        req = urllib.request.Request(f"{self.info['base_url']}/_standin/{op}", method=method,
                                     data=json.dumps(body or {}).encode(), headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, context=self._ctx, timeout=10) as r:
            return json.loads(r.read())

    def stop(self) -> None:
        self.popen.terminate()
        try:
            self.popen.wait(10)
        except subprocess.TimeoutExpired:
            self.popen.kill()
        self.log.close()


def state() -> dict:
    return {
        "tenant": TENANT,
        "page_size": 2,
        "subscriptions": [{"id": SUB1, "display_name": "Dev"}, {"id": SUB2, "display_name": "Staging"}],
        "client_credentials": [{"client_id": CLIENT_ID, "client_secret": CLIENT_SECRET}],
        "managed_identity": {"enabled": False},
        "caches": [
            {"name": "orders", "subscription": SUB1, "resourceGroup": "rg-a", "location": "East US",
             "tags": {"env": "prod"}},
            {"name": "sessions", "subscription": SUB1, "resourceGroup": "rg-a", "location": "eastus"},
            {"name": "catalog", "subscription": SUB1, "resourceGroup": "rg-b", "location": "eastus",
             "tags": {"TeleportDatabaseName": "product-catalog"}},
            {"name": "far-away", "subscription": SUB1, "resourceGroup": "rg-b", "location": "West Europe"},
            {"name": "orders", "subscription": SUB2, "resourceGroup": "rg-c", "location": "East US"},
        ],
        "enterprise_clusters": [
            {"name": "bigcache", "subscription": SUB2, "resourceGroup": "rg-c", "location": "East US",
             "databases": [{"name": "default", "port": 10000}]},
        ],
    }


@pytest.fixture
def standin_proc(tmp_path):
    s = StandinProc(tmp_path, state())
    yield s
    s.stop()


def admin_call(cluster, fn):
    async def go():
        async with AuthClient(cluster.auth_addr, Creds.from_identity_file(cluster.admin_identity)) as c:
            return await fn(c)
    return asyncio.run(go())


def list_dbs(cluster) -> dict[str, types_pb2.Database]:
    async def fn(c):
        r = await c.databases.ListDatabases(database_service_pb2.ListDatabasesRequest(), timeout=10)
        return {d.name: d for d in r.databases}
    return admin_call(cluster, fn)


def fetcher_statuses(cluster) -> list[types_pb2.FetcherStatus]:
    async def fn(c):
        r = await c.databases.ListFetcherStatuses(database_service_pb2.ListFetcherStatusesRequest(), timeout=10)
        return [s for h in r.hosts for s in h.statuses]
    return admin_call(cluster, fn)


def wait_for(what: str, check, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}; last: {last!r}")


def local_overrides(monkeypatch, cluster) -> None:
    """What a test machine changes in the written config: loopback ports, a fast poll."""
    for k, v in {
        "CACHEGATE_JOIN_SERVER": cluster.join_addr,
        "CACHEGATE_DISCOVERY_SERVICE__LISTEN_ADDR": "127.0.0.1:0",
        "CACHEGATE_DISCOVERY_SERVICE__POLL_INTERVAL": "1s",
        "CACHEGATE_DBPROXY_SERVICE__LISTEN_ADDR": "127.0.0.1:0",
        "CACHEGATE_DBPROXY_SERVICE__API_LISTEN_ADDR": "127.0.0.1:0",
        "CACHEGATE_DBPROXY_SERVICE__REDIS_LISTEN_ADDR": "127.0.0.1:0",
        "CACHEGATE_DBPROXY_SERVICE__WEB_LISTEN_ADDR": "127.0.0.1:0",
        "CACHEGATE_LOG__LEVEL": "debug",
    }.items():
        monkeypatch.setenv(k, v)


def test_db_configure_create_starts_discovery_that_finds_the_caches(cluster, standin_proc, tmp_path, monkeypatch):
    cluster.start_auth()
    token_file = tmp_path / "token"
    token_file.write_text(cluster.token("db", "--reusable"))  # discovery and dbproxy both join with it
    cfg_path = tmp_path / "cachegate.yaml"
    info = standin_proc.info
    run_cli("cachegate", "db", "configure", "create", "-o", f"file://{cfg_path}", "--proxy=127.0.0.1:3080",
            f"--token={token_file}", "--azure-redis-discovery=eastus", f"--ca-pin={cluster.ca_pin}",
            f"--auth-server={cluster.auth_addr}", f"--data-dir={tmp_path / 'dbhost'}",
            f"--azure-resource-manager={info['base_url']}", f"--azure-authority-host={info['authority_host']}",
            f"--azure-ca-file={standin_proc.ca}")
    written = yaml.safe_load(cfg_path.read_text())
    assert written["discovery_service"]["azure"][0]["regions"] == ["eastus"]
    assert written["dbproxy_service"]["enabled"] is True
    again = run_cli("cachegate", "db", "configure", "create", "-o", f"file://{cfg_path}", "--proxy=x:1",
                    "--token=t", "--azure-redis-discovery=eastus", check=False)
    assert again.returncode == 1 and "--force" in again.stderr

    # an administrator's record that discovery must never touch
    dyn = types_pb2.Database(name="hand-made", uri="10.0.0.1:6380", labels={"env": "lab"})
    admin_call(cluster, lambda c: c.databases.UpsertDatabase(database_service_pb2.UpsertDatabaseRequest(database=dyn)))

    local_overrides(monkeypatch, cluster)
    monkeypatch.setenv("AZURE_TENANT_ID", TENANT)
    monkeypatch.setenv("AZURE_CLIENT_ID", CLIENT_ID)
    monkeypatch.setenv("AZURE_CLIENT_SECRET", CLIENT_SECRET)
    host = Proc("discovery", cfg_path, tmp_path / "dbhost.ready.json", tmp_path / "dbhost.log")
    cluster.procs["dbhost"] = host
    host.start()

    expected = {"orders-eastus-rg-a-" + SUB1, "orders-eastus-rg-c-" + SUB2, "sessions", "product-catalog",
                "bigcache", "hand-made"}
    dbs = wait_for("the eastus caches", lambda: (d := list_dbs(cluster)) and set(d) == expected and d)
    o = dbs["orders-eastus-rg-a-" + SUB1]
    assert o.labels["original-name"] == "orders" and o.labels["env"] == "prod" and o.labels["cloud"] == "Azure"
    assert o.origin == types_pb2.DATABASE_ORIGIN_DISCOVERY and o.owner == "azure/default"
    assert o.description == "Azure Redis server in East US" and o.uri == "localhost:6380"
    assert o.azure.resource_id.endswith("/Redis/orders") and o.azure.subscription_id == SUB1
    assert dbs["bigcache"].uri == "localhost:10000" and dbs["bigcache"].azure.kind == "redis-enterprise"
    assert dbs["hand-made"].origin == types_pb2.DATABASE_ORIGIN_DYNAMIC

    sts = wait_for("fetcher statuses", lambda: [s for s in fetcher_statuses(cluster) if s.databases_found])
    assert {s.kind for s in sts} >= {"azure-redis"}
    assert all(not s.last_error for s in fetcher_statuses(cluster))
    # the discovery host's own status API, and Resync
    disc_addr = f"127.0.0.1:{host.info['port']}"

    async def own_status():
        from cachegate.discovery.v1 import discovery_service_pb2 as dpb
        from cachegate.discovery.v1 import discovery_service_pb2_grpc as dgrpc

        from services.common.creds import secure_channel

        creds = Creds.from_identity_file(cluster.admin_identity)
        async with secure_channel(disc_addr, creds.channel_credentials(), "discovery") as ch:
            stub = dgrpc.DiscoveryServiceStub(ch)
            listed = await stub.ListFetcherStatuses(dpb.ListFetcherStatusesRequest(), timeout=10)
            resynced = await stub.Resync(dpb.ResyncRequest(), timeout=30)
        return listed.statuses, resynced.statuses

    listed, resynced = asyncio.run(own_status())
    by_name = {s.name: s for s in resynced}
    assert f"azure-redis/{SUB1}" in by_name and by_name[f"azure-redis/{SUB1}"].databases_found == 3
    assert {s.name for s in listed} == set(by_name)

    # the cache goes away in Azure: its record goes; the admin's record stays
    standin_proc.control("DELETE", "caches", {"name": "sessions"})
    wait_for("sessions to be deleted", lambda: "sessions" not in list_dbs(cluster))
    # Azure fails for a while: nothing is deleted
    standin_proc.control("POST", "faults", {"pattern": "/subscriptions/*", "status": 500, "count": None})
    time.sleep(3)
    assert set(list_dbs(cluster)) == expected - {"sessions"}
    assert wait_for("the error in the status", lambda: [s for s in fetcher_statuses(cluster) if "500" in s.last_error])
    standin_proc.control("DELETE", "faults")
    wait_for("recovery", lambda: all(not s.last_error for s in fetcher_statuses(cluster)))
    assert set(list_dbs(cluster)) == expected - {"sessions"}

    # what an administrator sees and does with cgctl
    out = cluster.cgctl("get", "dbs").stdout
    assert "product-catalog" in out and "discovery" in out and "hand-made" in out
    doc = tmp_path / "db.yaml"
    doc.write_text("kind: db\nversion: v1\nmetadata: {name: lab-redis, labels: {env: lab}}\n"
                   "spec: {uri: 'lab.internal:6380'}\n")
    cluster.cgctl("create", "-f", str(doc))
    cluster.cgctl("rm", "db/hand-made")
    time.sleep(1.5)  # a discovery round passes: the admin's new record stays, the removed one stays gone
    names = set(list_dbs(cluster))
    assert "lab-redis" in names and "hand-made" not in names and "product-catalog" in names


def test_no_credential_and_forbidden_reach_status_and_log(cluster, standin_proc, tmp_path, monkeypatch):
    cluster.start_auth()
    token = cluster.token("discovery")
    monkeypatch.setenv("AZURE_POD_IDENTITY_AUTHORITY_HOST", standin_proc.info["imds_url"])  # no identity there
    ep = {"resource_manager": standin_proc.info["base_url"], "authority_host": standin_proc.info["authority_host"],
          "ca_file": str(standin_proc.ca)}
    disc = cluster.start_joiner("discovery", token, poll_interval=1, azure_endpoints=ep,
                                azure=[{"regions": "*", "subscriptions": [SUB1, SUB2]}])
    first = "DefaultAzureCredential failed to retrieve a token from the included credentials."

    def azure_fetchers():
        return [s for s in fetcher_statuses(cluster) if s.kind.startswith("azure-redis")]

    sts = wait_for("the credential error in the status",
                   lambda: (s := azure_fetchers()) and all(first in x.last_error for x in s) and s)
    assert len(sts) == 4  # two subscriptions x (redis, enterprise)
    assert "AZURE_CLIENT_ID" in sts[0].last_error and sts[0].last_error_time.seconds > 0
    time.sleep(2.5)
    lines = [json.loads(x) for x in disc.output().splitlines() if x.startswith("{")]
    cred_lines = [x for x in lines if first in x.get("msg", "")]
    rounds = [x for x in lines if x.get("msg", "").startswith("discovery round:")]
    assert cred_lines and len(cred_lines) <= len(rounds) + 1  # once per round, not once per fetcher
    assert "AZURE_CLIENT_SECRET" in cred_lines[0]["msg"]
    assert list_dbs(cluster) == {}
    disc.stop()

    # now with a credential, but without the read permission on caches
    standin_proc.control("POST", "managed-identity", {"enabled": True})
    standin_proc.control("POST", "denied-actions", {"deny": ["Microsoft.Cache/redis/read"]})
    disc.start()
    sts = wait_for("the 403 in the status", lambda: [s for s in fetcher_statuses(cluster)
                                                    if "Microsoft.Cache/redis/read" in s.last_error])
    assert f"cachegate db configure azure-role --subscription={SUB1}" in "".join(s.last_error for s in sts)
    # the enterprise fetchers still work
    wait_for("bigcache", lambda: "bigcache" in list_dbs(cluster))


def test_static_databases_are_published_and_removed(cluster, tmp_path):
    cluster.start_auth()
    token = cluster.token("discovery")
    ca = tmp_path / "db-ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n")
    static = [{"name": "onprem", "uri": "redis.internal:6380", "labels": {"env": "lab"}, "ca_file": str(ca),
               "secret": "env:ONPREM_REDIS_PASSWORD", "description": "On-premises Redis"},
              {"name": "second", "uri": "redis2.internal:6379", "tls": False}]
    disc = cluster.start_joiner("discovery", token, poll_interval=1, static=static)
    dbs = wait_for("static records", lambda: (d := list_dbs(cluster)) and len(d) == 2 and d)
    assert dbs["onprem"].origin == types_pb2.DATABASE_ORIGIN_CONFIG and dbs["onprem"].secret_ref == "env:ONPREM_REDIS_PASSWORD"
    assert dbs["onprem"].ca_cert_pem.startswith("-----BEGIN CERTIFICATE-----") and dbs["onprem"].labels["env"] == "lab"
    assert dbs["second"].tls is False and dbs["second"].description == "Redis server at redis2.internal:6379"
    disc.stop()
    cfg = yaml.safe_load(disc.config.read_text())
    cfg["discovery_service"]["static"] = static[:1]
    disc.config.write_text(yaml.safe_dump(cfg))
    disc.start()
    wait_for("the removed static record to go", lambda: set(list_dbs(cluster)) == {"onprem"})
    st = wait_for("static status", lambda: [s for s in fetcher_statuses(cluster) if s.name == "static"])
    assert st[0].databases_found == 1 and not st[0].last_error


async def test_dev_standin_helper(tmp_path):
    from azure.identity.aio import ClientSecretCredential
    from azure.mgmt.redis.aio import RedisManagementClient

    from services.azure_standin import dev

    proc, info = dev.start_process(tmp_path / "azure")
    try:
        env = dev.credential_env(info)
        section = dev.discovery_section(info)
        assert section["azure_endpoints"]["ca_file"] == info["ca_file"]
        async with ClientSecretCredential(env["AZURE_TENANT_ID"], env["AZURE_CLIENT_ID"], env["AZURE_CLIENT_SECRET"],
                                          authority=info["authority_host"], disable_instance_discovery=True,
                                          connection_verify=info["ca_file"]) as cred:
            async with RedisManagementClient(cred, "11111111-2222-3333-4444-555555555555", base_url=info["base_url"],
                                             connection_verify=info["ca_file"], retry_total=0) as c:
                assert [x.name async for x in c.redis.list_by_subscription()] == ["my-azure-redis", "my-azure-redis-entra"]
    finally:
        proc.terminate()
        proc.wait(10)
