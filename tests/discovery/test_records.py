"""Record conversions, static entries, db.yaml documents and `db configure` (no processes)."""

from __future__ import annotations

import json

import pytest
import yaml
from cachegate.auth.v1 import database_service_pb2
from cachegate.types.v1 import types_pb2
from typer.testing import CliRunner

from services.cli import cgctl_db, dbconfigure
from services.common.config import StaticDatabaseConfig, load_config
from services.discovery.azure import AzureInfo, DiscoveredDatabase
from services.discovery.reconciler import FetcherStatus, _fingerprint
from services.discovery.registry import (
    StaticDatabaseError,
    azure_owner,
    from_proto,
    static_record,
    status_proto,
    to_proto,
)

PEM = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"


def record(**kw) -> DiscoveredDatabase:
    base = dict(name="orders", description="Azure Redis server in East US", uri="orders.redis.cache.windows.net:6380",
                labels={"region": "eastus", "cloud": "Azure"},
                azure=AzureInfo("/subscriptions/s/resourceGroups/rg/providers/Microsoft.Cache/Redis/orders", "s", "rg",
                                "eastus", "redis"))
    base.update(kw)
    return DiscoveredDatabase(**base)


def test_proto_round_trip_keeps_the_fingerprint():
    # an unchanged resource must not be re-published every round
    for r in (record(), record(name="orders-eastus-rg-s", labels={"original-name": "orders"},
                               azure=AzureInfo("id", "s", "rg", "eastus", "redis-enterprise", "OSSCluster", True))):
        back = from_proto(to_proto(r, azure_owner("default")))
        assert _fingerprint(back) == _fingerprint(r)
    p = to_proto(record(), "azure/default")
    assert p.origin == types_pb2.DATABASE_ORIGIN_DISCOVERY and p.owner == "azure/default" and p.tls
    assert from_proto(to_proto(record(name="x-1", labels={"original-name": "x"}), "o")).original_name == "x"


def test_static_record(tmp_path):
    ca = tmp_path / "ca.pem"
    ca.write_text(PEM)
    e = StaticDatabaseConfig(name="onprem", uri="r:6380", ca_file=str(ca), secret="env:PW", labels={"env": "lab"})
    db = static_record(e, "static/default")
    assert db.origin == types_pb2.DATABASE_ORIGIN_CONFIG and db.ca_cert_pem == PEM and db.secret_ref == "env:PW"
    assert db.labels == {"cloud": "static", "env": "lab"} and db.description == "Redis server at r:6380"
    with pytest.raises(StaticDatabaseError, match="cannot read ca_file"):
        static_record(StaticDatabaseConfig(name="a", uri="r:1", ca_file=str(tmp_path / "missing")), "o")
    with pytest.raises(StaticDatabaseError) as ei:
        static_record(StaticDatabaseConfig(name="a", uri="r:1", secret="hunter2"), "o")
    assert "hunter2" not in str(ei.value)


def test_status_proto_carries_the_whole_message():
    import datetime as dt

    now = dt.datetime.now(dt.UTC)
    st = FetcherStatus(name="azure-redis/s", kind="azure-redis", last_error="first line rest",
                       last_error_detail="first line\nrest", last_error_time=now, databases_found=3)
    p = status_proto(st)
    assert p.last_error == "first line\nrest" and p.last_error_time.seconds > 0 and p.databases_found == 3
    assert not p.HasField("last_success_time")


def test_db_yaml_documents(tmp_path):
    (tmp_path / "ca.pem").write_text(PEM)
    doc = yaml.safe_load("""
kind: db
version: v1
metadata: {name: orders-cache, description: Orders, labels: {env: prod}}
spec: {uri: 'redis.internal:6380', ca_cert_file: ca.pem, secret: 'env:CACHEGATE_DB_ORDERS'}
""")
    db = cgctl_db.db_from_yaml(doc, base_dir=tmp_path)
    assert (db.name, db.uri, db.protocol, db.tls, db.ca_cert_pem) == ("orders-cache", "redis.internal:6380", "redis", True, PEM)
    assert db.labels == {"env": "prod"} and db.secret_ref == "env:CACHEGATE_DB_ORDERS"
    for bad, msg in [({"kind": "role"}, "kind must be db"),
                     ({"kind": "db", "metadata": {}}, "metadata.name"),
                     ({"kind": "db", "metadata": {"name": "a"}, "spec": {}}, "spec.uri"),
                     ({"kind": "db", "metadata": {"name": "a"}, "spec": {"uri": "h:1", "protocol": "mysql"}}, "mysql"),
                     ({"kind": "db", "metadata": {"name": "a"}, "spec": {"uri": "h:1", "secret": "pw"}}, "spec.secret"),
                     ({"kind": "db", "metadata": {"name": "a"}, "spec": {"uri": "h:1", "bogus": 1}}, "spec.bogus")]:
        with pytest.raises(cgctl_db.DbDocumentError, match=msg):
            cgctl_db.db_from_yaml(bad)
    assert cgctl_db.is_db_document(doc) and not cgctl_db.is_db_document({"kind": "role"})


def test_print_dbs_and_statuses(capsys):
    dbs = [types_pb2.Database(name="b", uri="h:2", origin=types_pb2.DATABASE_ORIGIN_DISCOVERY, labels={"x": "1"},
                              azure=types_pb2.AzureDatabase(resource_id="/subscriptions/s/x")),
           types_pb2.Database(name="a", uri="h:1", secret_ref="env:CACHEGATE_DB_A", origin=types_pb2.DATABASE_ORIGIN_DYNAMIC)]
    cgctl_db.print_dbs(dbs, "text")
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["Name", "Description", "Origin", "Auth", "URI", "Labels"]
    assert out[2].startswith("a") and "dynamic" in out[2] and "x=1" in out[3]
    cgctl_db.print_dbs(dbs, "json")
    data = json.loads(capsys.readouterr().out)
    assert data[0]["spec"]["secret"] == "env:CACHEGATE_DB_A" and data[1]["status"]["azure"]["resource_id"]
    hosts = [database_service_pb2.HostFetcherStatus(host_id="h1", statuses=[types_pb2.FetcherStatus(
        name="azure-redis/s", kind="azure-redis", last_error="DefaultAzureCredential failed\nCheck X")])]
    cgctl_db.print_fetcher_statuses(hosts, "text")
    text = capsys.readouterr().out
    assert "DefaultAzureCredential failed" in text and "  Check X" in text and "never" in text


def test_db_configure_create_writes_a_loadable_config(tmp_path):
    runner = CliRunner()
    out = tmp_path / "c.yaml"
    missing = tmp_path / "no-such-token"
    r = runner.invoke(dbconfigure.app, ["create", "-o", str(out), "--proxy=proxy.example.com:3080", f"--token={missing}",
                                        "--azure-redis-discovery=eastus,westus", "--azure-subscription=sub1",
                                        "--azure-resource-group=rg1", "--labels=env=prod,team=c*",
                                        "--ca-pin=sha256:ab"])
    assert r.exit_code == 0, r.output
    cfg = load_config(out, environ={})
    m = cfg.discovery_service.azure[0]
    assert (m.regions, m.subscriptions, m.resource_groups, m.tags) == (["eastus", "westus"], ["sub1"], ["rg1"],
                                                                       {"env": "prod", "team": "c*"})
    assert cfg.discovery_service.enabled and cfg.dbproxy_service.enabled
    assert cfg.auth_server == "proxy.example.com:3025" and cfg.join_address() == "proxy.example.com:3026"
    assert cfg.join.token == str(missing) and cfg.join.ca_pin == "sha256:ab"
    assert cfg.dbproxy_service.public_addr == "proxy.example.com:3080"
    assert oct(out.stat().st_mode & 0o777) == "0o600"
    r = runner.invoke(dbconfigure.app, ["create", "-o", str(out), "--proxy=p:1", "--token=t", "--azure-redis-discovery=*"])
    assert r.exit_code == 1 and "--force" in r.output
    r = runner.invoke(dbconfigure.app, ["create", "-o", "stdout", "--proxy=p:1", "--token=t", "--azure-redis-discovery=*"])
    assert r.exit_code == 0 and yaml.safe_load(r.output)["discovery_service"]["azure"][0]["regions"] == ["*"]
    r = runner.invoke(dbconfigure.app, ["create", "-o", "stdout", "--proxy=p:1", "--token=t"])
    assert r.exit_code == 1 and "--azure-redis-discovery" in r.output


def test_db_configure_azure_role():
    r = CliRunner().invoke(dbconfigure.app, ["azure-role", "--subscription=11111111-2222-3333-4444-555555555555",
                                             "--service", "dbproxy"])
    assert r.exit_code == 0
    role = json.loads(r.stdout)  # the Entra ID steps go to stderr
    assert "Data Access Configuration" in r.stderr
    assert role["properties"]["permissions"][0]["actions"] == [
        "Microsoft.Cache/redis/listKeys/action", "Microsoft.Cache/redisEnterprise/databases/listKeys/action"]
    r = CliRunner().invoke(dbconfigure.app, ["azure-role", "--subscription=nope"])
    assert r.exit_code == 1 and "GUID" in r.output


def test_config_matchers_accept_star_and_reject_bad_values():
    cfg = load_config(data={"discovery_service": {"azure": [{"regions": "*", "subscriptions": "a,b"}]}}, environ={})
    assert cfg.discovery_service.azure[0].regions == ["*"] and cfg.discovery_service.azure[0].subscriptions == ["a", "b"]
    from services.common.config import ConfigError

    with pytest.raises(ConfigError, match="unique"):
        load_config(data={"discovery_service": {"static": [{"name": "a", "uri": "h:1"}, {"name": "a", "uri": "h:2"}]}},
                    environ={})
    with pytest.raises(ConfigError, match="poll_interval"):
        load_config(data={"discovery_service": {"poll_interval": "0.1s"}}, environ={})
