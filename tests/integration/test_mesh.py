"""The mutual-TLS mesh with real processes, real grpcurl and real certificates."""

from __future__ import annotations

import datetime as dt
import json
import signal
import sqlite3

import pytest

from cachegate.types.v1 import types_pb2
from services.common.creds import Creds
from services.common.pki import CertAuthority, cert_from_pem, cert_to_pem, key_from_pem, key_to_pem, new_key
from tests.helpers import Cluster, grpcurl, split_identity

pytestmark = pytest.mark.slow

AUTH_SERVICES = ["cachegate.auth.v1.AuditService", "cachegate.auth.v1.ClusterService",
                 "cachegate.auth.v1.DatabaseService", "cachegate.auth.v1.LockService",
                 "cachegate.auth.v1.RoleService", "cachegate.auth.v1.TokenService",
                 "cachegate.auth.v1.UserService"]
INFRA = ["grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"]


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    """One read-only cluster for the tests of this module that do not change it."""
    cluster = Cluster(tmp_path_factory.mktemp("mesh"))
    try:
        cluster.start_auth()
        cluster.start_joiner("discovery", cluster.token("discovery"))
        cluster.start_joiner("dbproxy", cluster.token("proxy"))
        yield cluster
    finally:
        cluster.stop()


def _listed(res) -> list[str]:
    assert res.returncode == 0, res.stderr
    return sorted(res.stdout.split())


def _describe_all(tls: list[str], addr: str, services: list[str]) -> None:
    for svc in services:
        res = grpcurl(*tls, addr, "describe", svc)
        assert res.returncode == 0, res.stderr
        assert f"{svc} is a service" in res.stdout
        assert "rpc " in res.stdout


def _health(tls: list[str], addr: str) -> None:
    res = grpcurl(*tls, addr, "grpc.health.v1.Health/Check")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["status"] == "SERVING"


def test_grpcurl_lists_describes_and_checks_health_on_every_server(full, tmp_path):
    crt, key, ca = split_identity(full.admin_identity, tmp_path / "admin")
    mtls = ["-cacert", ca, "-cert", crt, "-key", key]
    # auth mesh port
    assert _listed(grpcurl(*mtls, full.auth_addr, "list")) == sorted(AUTH_SERVICES + INFRA)
    _describe_all(mtls, full.auth_addr, AUTH_SERVICES)
    _health(mtls, full.auth_addr)
    # auth join port: server TLS only, cluster facts and joining only
    assert _listed(grpcurl("-cacert", ca, full.join_addr, "list")) == sorted(["cachegate.auth.v1.ClusterService"] + INFRA)
    _describe_all(["-cacert", ca], full.join_addr, ["cachegate.auth.v1.ClusterService"])
    _health(["-cacert", ca], full.join_addr)
    # discovery
    disc = f"127.0.0.1:{full.procs['discovery'].info['port']}"
    assert _listed(grpcurl(*mtls, disc, "list")) == sorted(["cachegate.discovery.v1.DiscoveryService"] + INFRA)
    _describe_all(mtls, disc, ["cachegate.discovery.v1.DiscoveryService"])
    _health(mtls, disc)
    # dbproxy: public (server TLS) and API (mutual TLS)
    proxy = full.procs["dbproxy"].info
    pub, api = f"127.0.0.1:{proxy['public_port']}", f"127.0.0.1:{proxy['api_port']}"
    assert _listed(grpcurl("-cacert", ca, pub, "list")) == sorted(["cachegate.dbproxy.v1.ProxyService"] + INFRA)
    _describe_all(["-cacert", ca], pub, ["cachegate.dbproxy.v1.ProxyService"])
    _health(["-cacert", ca], pub)
    assert _listed(grpcurl(*mtls, api, "list")) == sorted(
        ["cachegate.dbproxy.v1.ProxyService", "cachegate.dbproxy.v1.SessionService"] + INFRA)
    _describe_all(mtls, api, ["cachegate.dbproxy.v1.ProxyService", "cachegate.dbproxy.v1.SessionService"])
    _health(mtls, api)
    # The public proxy forwards cluster info from auth over the mesh.
    res = grpcurl("-cacert", ca, pub, "cachegate.dbproxy.v1.ProxyService/GetClusterInfo")
    info = json.loads(res.stdout)
    assert info["cluster_name"] == "test-cluster" and info["ca_pin"] == full.ca_pin


def test_admin_identity_reaches_admin_rpcs_on_auth_and_dbproxy(full, tmp_path):
    crt, key, ca = split_identity(full.admin_identity, tmp_path / "admin")
    res = grpcurl("-cacert", ca, "-cert", crt, "-key", key, full.auth_addr, "cachegate.auth.v1.UserService/ListUsers")
    assert res.returncode == 0, res.stderr
    api = f"127.0.0.1:{full.procs['dbproxy'].info['api_port']}"
    res = grpcurl("-cacert", ca, "-cert", crt, "-key", key, api, "cachegate.dbproxy.v1.SessionService/ListSessions")
    assert res.returncode == 0, res.stderr


def test_calls_without_client_certificate_are_refused(full, tmp_path):
    _, _, ca = split_identity(full.admin_identity, tmp_path / "admin")
    disc = f"127.0.0.1:{full.procs['discovery'].info['port']}"
    api = f"127.0.0.1:{full.procs['dbproxy'].info['api_port']}"
    for addr in (full.auth_addr, disc, api):
        res = grpcurl("-cacert", ca, addr, "grpc.health.v1.Health/Check")
        assert res.returncode != 0, f"{addr} answered without a client certificate"
        assert "SERVING" not in res.stdout
    # On the public proxy port, an RPC that needs an identity is refused too.
    pub = f"127.0.0.1:{full.procs['dbproxy'].info['public_port']}"
    res = grpcurl("-cacert", ca, pub, "cachegate.dbproxy.v1.ProxyService/ListDatabases")
    assert res.returncode != 0 and "PermissionDenied" in res.stdout + res.stderr


def _write_cert(folder, cert, key, ca_pem: bytes):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "c.crt").write_bytes(cert_to_pem(cert))
    (folder / "c.key").write_bytes(key_to_pem(key))
    (folder / "ca.pem").write_bytes(ca_pem)
    return ["-cacert", str(folder / "ca.pem"), "-cert", str(folder / "c.crt"), "-key", str(folder / "c.key")]


def test_certificate_from_another_ca_is_refused(full, tmp_path):
    _, _, ca = split_identity(full.admin_identity, tmp_path / "admin")
    rogue = CertAuthority.create("test-cluster user CA", "Cachegate")
    key = new_key()
    cert = rogue.sign(key.public_key(), "mallory", types_pb2.Identity(
        kind=types_pb2.IDENTITY_KIND_USER, name="mallory", roles=["editor"]), dt.timedelta(hours=1))
    tls = _write_cert(tmp_path / "rogue", cert, key, open(ca, "rb").read())
    res = grpcurl(*tls, full.auth_addr, "cachegate.auth.v1.TokenService/ListTokens")
    assert res.returncode != 0
    assert "tokens" not in res.stdout


def _real_user_ca(cluster) -> CertAuthority:
    db = sqlite3.connect(str(cluster.data / "auth" / "cachegate.db"))
    doc = json.loads(db.execute("SELECT value FROM items WHERE key='authorities/user'").fetchone()[0])
    return CertAuthority(cert_from_pem(doc["cert_pem"]), key_from_pem(doc["key_pem"].encode()))


def test_expired_certificate_is_refused(full, tmp_path):
    _, _, ca = split_identity(full.admin_identity, tmp_path / "admin")
    user_ca = _real_user_ca(full)
    key = new_key()
    ident = types_pb2.Identity(kind=types_pb2.IDENTITY_KIND_USER, name="cachegate-admin", roles=["editor"])
    past = dt.datetime.now(dt.timezone.utc) - dt.timedelta(minutes=1)
    expired = user_ca.sign(key.public_key(), "cachegate-admin", ident, dt.timedelta(hours=1), not_after=past)
    valid = user_ca.sign(key.public_key(), "cachegate-admin", ident, dt.timedelta(hours=1))
    ca_pem = open(ca, "rb").read()
    ok = grpcurl(*_write_cert(tmp_path / "valid", valid, key, ca_pem), full.auth_addr,
                 "cachegate.auth.v1.TokenService/ListTokens")
    assert ok.returncode == 0, ok.stderr  # the same CA and identity work while valid
    res = grpcurl(*_write_cert(tmp_path / "expired", expired, key, ca_pem), full.auth_addr,
                  "cachegate.auth.v1.TokenService/ListTokens")
    assert res.returncode != 0


def test_discovery_host_certificate_cannot_call_admin_rpcs(full, tmp_path):
    creds = Creds.load_dir(full.data / "discovery")
    folder = tmp_path / "disc"
    folder.mkdir()
    (folder / "c.crt").write_bytes(creds.cert_pem)
    (folder / "c.key").write_bytes(creds.key_pem)
    (folder / "ca.pem").write_bytes(creds.host_ca_pem)
    tls = ["-cacert", str(folder / "ca.pem"), "-cert", str(folder / "c.crt"), "-key", str(folder / "c.key")]
    res = grpcurl(*tls, "-d", '{"roles": ["SERVICE_ROLE_DBPROXY"]}', full.auth_addr,
                  "cachegate.auth.v1.TokenService/CreateToken")
    assert res.returncode != 0
    assert "PermissionDenied" in res.stdout + res.stderr
    assert "may not call /cachegate.auth.v1.TokenService/CreateToken" in res.stdout + res.stderr
    # The same certificate may do what discovery is for (cluster info over the mesh).
    ok = grpcurl(*tls, full.auth_addr, "cachegate.auth.v1.ClusterService/GetClusterInfo")
    assert ok.returncode == 0, ok.stderr


def test_auth_restart_keeps_cas_and_tokens_and_joined_service_needs_no_token(cluster, tmp_path):
    auth = cluster.start_auth()
    pin = auth.info["ca_pin"]
    spare = cluster.cgctl("tokens", "add", "--type=proxy", "--format=json").stdout
    spare_id = json.loads(spare)["id"]
    proxy = cluster.start_joiner("dbproxy", cluster.token("proxy"))
    proxy.stop()
    auth.stop(signal.SIGKILL)
    auth.start()
    assert auth.info["ca_pin"] == pin
    assert spare_id in cluster.cgctl("tokens", "ls").stdout
    # The joined proxy restarts with no token at all: it has its host certificate.
    cfg = cluster.joiner_config("dbproxy", token="")
    cluster.proc("dbproxy", cfg, "dbproxy2").start()
    assert "joined the cluster" not in cluster.procs["dbproxy2"].output()


def test_sigterm_drains_and_exits_cleanly(cluster):
    auth = cluster.start_auth()
    assert auth.stop(signal.SIGTERM, timeout=15) == 0
    assert '"msg": "stopped"' in auth.output()
