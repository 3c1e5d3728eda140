"""Fixtures for the Azure discovery tests: a local ARM / Entra ID stand-in and credentials.

Nothing here reaches a real Azure or Microsoft host: every endpoint is the stand-in on
127.0.0.1, and the environment variables the Azure SDK reads are cleared first.
"""

from __future__ import annotations

import ipaddress
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from services.azure_standin import AzureStandin, StandinConfig
from services.discovery.azure import AzureRedisEnterpriseFetcher, AzureRedisFetcher
from services.discovery.matchers import AzureMatcher

SUB1 = "11111111-1111-4111-8111-111111111111"
SUB2 = "22222222-2222-4222-8222-222222222222"
TENANT = "7e4a0000-0000-4000-8000-00000000c0de"
CLIENT_ID = "c1e40000-0000-4000-8000-000000000001"
CLIENT_SECRET = "test-client-secret"
REPO = Path(__file__).resolve().parents[2]
# Azure's own published example responses, kept beside the repository (never copied into it).
EXAMPLES_DIR = (REPO / ".." / "shared" / "azure-examples").resolve()
EXAMPLES_MISSING = f"Azure's published examples are not at {EXAMPLES_DIR} (../shared/azure-examples beside the repo)"


def need_examples() -> Path:
    if not (EXAMPLES_DIR / "RedisCacheList.json").is_file():
        pytest.skip(EXAMPLES_MISSING)
    return EXAMPLES_DIR

_AZURE_ENV_PREFIXES = ("AZURE_", "IDENTITY_", "MSI_", "IMDS_")

# --- network guard: while a test of this folder runs, any attempt to resolve or connect to a
# host that is not loopback is refused (and recorded), so no test can reach a real endpoint.
_guard = {"on": False, "blocked": []}


def _loopback(host: object) -> bool:
    if host is None:
        return True
    if isinstance(host, bytes):
        host = host.decode(errors="replace")
    host = str(host).strip("[]")
    if host in ("localhost", ""):
        return True
    try:
        return ipaddress.ip_address(host.split("%")[0]).is_loopback
    except ValueError:
        return False


def _audit(event: str, args: tuple) -> None:
    if not _guard["on"]:
        return
    host = None
    if event == "socket.getaddrinfo":
        host = args[0]
    elif event == "socket.connect" and isinstance(args[1], tuple):
        host = args[1][0]
    else:
        return
    if not _loopback(host):
        _guard["blocked"].append((event, host))
        raise ConnectionRefusedError(f"test network guard: {host!r} is not loopback")


sys.addaudithook(_audit)


@pytest.fixture(autouse=True)
def _loopback_only():
    _guard["blocked"] = []
    _guard["on"] = True
    try:
        yield
    finally:
        _guard["on"] = False
    assert not _guard["blocked"], f"non-loopback network access attempted: {_guard['blocked']}"


@pytest.fixture(autouse=True)
def _isolated_azure_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No ambient Azure configuration leaks into a test (and so no real endpoint is tried)."""
    for key in list(os.environ):
        if key.startswith(_AZURE_ENV_PREFIXES):
            monkeypatch.delenv(key, raising=False)


def base_config() -> StandinConfig:
    return StandinConfig.model_validate(
        {
            "tenant": TENANT,
            "subscriptions": [
                {"id": SUB1, "display_name": "Dev"},
                {"id": SUB2, "display_name": "Staging"},
            ],
            "client_credentials": [{"client_id": CLIENT_ID, "client_secret": CLIENT_SECRET}],
            "managed_identity": {"enabled": True},
        }
    )


@pytest.fixture
async def standin(tmp_path: Path) -> AsyncIterator[AzureStandin]:
    s = AzureStandin(base_config(), ca_file=tmp_path / "standin-ca.pem")
    await s.start()
    try:
        yield s
    finally:
        await s.stop()


@pytest.fixture
async def credential(standin: AzureStandin):
    from azure.identity.aio import ClientSecretCredential

    cred = ClientSecretCredential(
        TENANT,
        CLIENT_ID,
        CLIENT_SECRET,
        authority=standin.authority_host,
        disable_instance_discovery=True,
        connection_verify=standin.ca_file,
    )
    try:
        yield cred
    finally:
        await cred.close()


def populate(s: AzureStandin) -> None:
    """Five caches over two subscriptions and three resource groups, one Enterprise cluster."""
    s.add_cache(name="orders", subscription=SUB1, resource_group="rg-a", location="East US", tags={"env": "prod", "team": "shop"})
    s.add_cache(name="sessions", subscription=SUB1, resource_group="rg-a", location="eastus", tags={"env": "dev"})
    s.add_cache(name="catalog", subscription=SUB1, resource_group="RG-B", location="West Europe", tags={"env": "prod", "team": "search"})
    s.add_cache(name="metrics", subscription=SUB2, resource_group="rg-c", location="West US 2", tags={"env": "staging"})
    s.add_cache(name="queue", subscription=SUB2, resource_group="rg-c", location="East US", tags={})
    s.add_enterprise_cluster(
        name="bigcache",
        subscription=SUB2,
        resource_group="rg-c",
        location="East US",
        tags={"env": "prod"},
        databases=[{"name": "default", "port": 10000}],
    )


async def fetch_all(s: AzureStandin, cred, matcher: AzureMatcher, subs=(SUB1, SUB2)):
    out = []
    for sub in subs:
        for cls in (AzureRedisFetcher, AzureRedisEnterpriseFetcher):
            async with cls(cred, sub, matcher, s.base_url, s.ca_file) as f:
                out.extend(await f.fetch())
    return out


# --- the data plane of Entra ID caches: a real TLS redis-server the stand-in administers ----
ENTRA_REDIS_ADMIN = "stand-in-admin-Pa55"


@pytest.fixture(scope="session")
def entra_redis(tmp_path_factory):
    """A redis-server with TLS like Azure's port 6380 (its default user's password plays the
    access key and the stand-in's admin login), shared by the Entra ID tests."""
    import subprocess
    import time

    from tests.helpers import free_port

    pki_dir = tmp_path_factory.mktemp("entra-pki")
    from services.common import pki as _pki
    from cachegate.types.v1 import types_pb2
    import datetime as dt

    ca = _pki.CertAuthority.create("entra test server CA", "cachegate-test")
    key = _pki.new_key()
    cert = ca.sign(key.public_key(), "localhost", types_pb2.Identity(kind=types_pb2.IDENTITY_KIND_HOST, name="redis"),
                   dt.timedelta(days=1), ips=["127.0.0.1"], dns_names=["localhost"], server=True)
    (pki_dir / "ca.pem").write_bytes(ca.cert_pem)
    (pki_dir / "redis.crt").write_bytes(_pki.cert_to_pem(cert))
    (pki_dir / "redis.key").write_bytes(_pki.key_to_pem(key))
    d = tmp_path_factory.mktemp("entra-redis")
    port = free_port()
    conf = d / "redis.conf"
    conf.write_text("\n".join([
        "bind 127.0.0.1", "port 0", f"tls-port {port}", f"tls-cert-file {pki_dir / 'redis.crt'}",
        f"tls-key-file {pki_dir / 'redis.key'}", f"tls-ca-cert-file {pki_dir / 'ca.pem'}", "tls-auth-clients no",
        f"requirepass {ENTRA_REDIS_ADMIN}", 'save ""', "appendonly no", f"dir {d}", ""]))
    conf.chmod(0o600)
    proc = subprocess.Popen(["redis-server", str(conf)], stdout=open(d / "redis.log", "wb"),  # noqa: SIM115
                            stderr=subprocess.STDOUT)
    import redis as _redis

    deadline = time.monotonic() + 15
    while True:
        try:
            _redis.Redis(host="127.0.0.1", port=port, password=ENTRA_REDIS_ADMIN, ssl=True,
                         ssl_ca_certs=str(pki_dir / "ca.pem"), socket_timeout=2).ping()
            break
        except Exception:
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                raise RuntimeError("redis-server did not start: " + (d / "redis.log").read_text()[-2000:])
            time.sleep(0.05)
    yield {"host": "127.0.0.1", "port": port, "tls": True, "ca_file": str(pki_dir / "ca.pem"),
           "password": ENTRA_REDIS_ADMIN}
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()


def entra_config(server: dict, *, redis_lifetime: int | None = None, interval: float = 0.25) -> StandinConfig:
    cfg = base_config()
    cfg.entra_redis = cfg.entra_redis.model_validate({"servers": [server], "enforce_interval": interval,
                                                      "grace": 0.3})
    cfg.redis_token_lifetime = redis_lifetime
    return cfg


async def raw_redis(server: dict):
    """A plain RESP connection over TLS (no client library that would reconnect by itself)."""
    import asyncio
    import ssl

    ctx = ssl.create_default_context(cafile=server["ca_file"])
    return await asyncio.open_connection(server["host"], server["port"], ssl=ctx, server_hostname="localhost")


async def raw_call(conn, *args: str, timeout: float = 5.0) -> bytes:
    """One command; the reply's first line (b'' when the server closed the connection)."""
    import asyncio

    reader, writer = conn
    writer.write(b"*%d\r\n" % len(args) + b"".join(b"$%d\r\n%s\r\n" % (len(a.encode()), a.encode()) for a in args))
    try:
        await writer.drain()
        return (await asyncio.wait_for(reader.readline(), timeout)).rstrip(b"\r\n")
    except (ConnectionError, OSError):
        return b""
