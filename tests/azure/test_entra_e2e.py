"""Entra ID end to end, in the real processes: a cache and an Enterprise database with access
keys disabled are discovered as ``entra``; ``cgate``'s users reach them through dbproxy with
redis-cli and redis-py (RESP2 and RESP3) with no key anywhere; a dead token endpoint is one
line for the client within the connect timeout; no token the stand-in issued is in any file
the services wrote."""

from __future__ import annotations

import asyncio
import subprocess
import time

import pytest

from tests.helpers import Cluster
from tests.integration.test_dataplane import client, db_cert, login_user, redis_cli

from .conftest import CLIENT_ID, CLIENT_SECRET, SUB1, TENANT
from .test_e2e import StandinProc, list_dbs, wait_for

pytestmark = pytest.mark.slow
SP_OID = "5f0a4e7c-0000-4000-8000-0000000000e2"


def _state(server: dict) -> dict:
    return {
        "tenant": TENANT,
        "subscriptions": [{"id": SUB1, "display_name": "Dev"}],
        "client_credentials": [{"client_id": CLIENT_ID, "client_secret": CLIENT_SECRET, "object_id": SP_OID}],
        "managed_identity": {"enabled": False},
        "caches": [{"name": "keyless", "subscription": SUB1, "resourceGroup": "rg-e", "location": "East US",
                    "hostName": "localhost", "sslPort": server["port"], "disableAccessKeyAuthentication": True,
                    "tags": {"env": "prod"}}],
        "enterprise_clusters": [{"name": "amr", "subscription": SUB1, "resourceGroup": "rg-e", "location": "East US",
                                 "hostName": "localhost", "tags": {"env": "prod"},
                                 "databases": [{"name": "default", "port": server["port"],
                                                "accessKeysAuthentication": "Disabled",
                                                "clusteringPolicy": "EnterpriseCluster"}]}],
        "entra_redis": {"servers": [server], "enforce_interval": 0.5},
    }


def test_keys_disabled_databases_work_through_entra_id(entra_redis, tmp_path):
    standin = StandinProc(tmp_path, _state(entra_redis))
    c = Cluster(tmp_path / "cluster")
    (tmp_path / "cluster").mkdir()
    try:
        c.start_auth()
        info = standin.info
        ep = {"resource_manager": info["base_url"], "authority_host": info["authority_host"],
              "ca_file": str(standin.ca)}
        azure_env = {"AZURE_TENANT_ID": TENANT, "AZURE_CLIENT_ID": CLIENT_ID, "AZURE_CLIENT_SECRET": CLIENT_SECRET,
                     "AZURE_AUTHORITY_HOST": info["authority_host"]}
        c.start_joiner("discovery", c.token("discovery"), extra_env=azure_env, poll_interval=1, azure_endpoints=ep,
                       azure=[{"regions": "*", "subscriptions": [SUB1]}])
        dbs = wait_for("the keyless databases", lambda: (d := list_dbs(c)) and len(d) == 2 and d)
        assert {n: (d.azure.auth, d.labels["auth"]) for n, d in dbs.items()} == {
            "keyless": ("entra", "entra"), "amr": ("entra", "entra")}

        # the token endpoint is down when dbproxy starts: a session gets one line, in time
        standin.control("POST", "faults", {"pattern": "*/oauth2/v2.0/token", "status": 503, "count": None})
        proxy = c.start_joiner("dbproxy", c.token("proxy"), extra_env=azure_env, azure_endpoints=ep,
                               database_ca_files=[entra_redis["ca_file"]])
        c.proxy = f"127.0.0.1:{proxy.info['public_port']}"
        c.api = f"127.0.0.1:{proxy.info['api_port']}"
        c.redis_port = proxy.info["redis_port"]
        c.home = tmp_path / "home"
        folder = login_user(c, "alice", "--roles=access", "--db-users=*")
        crt, key, ca = asyncio.run(db_cert(c, folder, "keyless", "default"))
        started = time.monotonic()
        out = redis_cli(c, crt, key, ca, "PING")
        took = time.monotonic() - started
        err = (out.stdout + out.stderr).strip()
        assert "Entra ID token could not be obtained: " in err and took < 10, (err, took)
        assert len([ln for ln in err.splitlines() if "Entra ID" in ln]) == 1

        # the endpoint is back: no key configured anywhere, and it works for every client
        standin.control("DELETE", "faults")
        r = redis_cli(c, crt, key, ca, "SET", "entra-key", "v1")
        assert r.stdout.strip() == "OK", r.stdout + r.stderr
        assert redis_cli(c, crt, key, ca, "GET", "entra-key").stdout.strip() == "v1"
        for proto in (2, 3):
            with client(c, crt, key, ca, protocol=proto) as rc:
                assert rc.get("entra-key") == b"v1" and rc.incr(f"n{proto}") == 1
        crt2, key2, _ = asyncio.run(db_cert(c, folder, "amr", "default"))
        with client(c, crt2, key2, ca, protocol=3) as rc:
            assert rc.get("entra-key") == b"v1"
        # the proxy authenticated as its principal, with a token (never with a key)
        import redis as _redis

        admin = _redis.Redis(host="127.0.0.1", port=entra_redis["port"], password=entra_redis["password"], ssl=True,
                             ssl_ca_certs=entra_redis["ca_file"], socket_timeout=5)
        assert any(x.get("user") == SP_OID for x in admin.client_list())
        admin.close()

        tokens = [t["token"] for t in standin.control("GET", "tokens")["tokens"]]
        assert tokens
    finally:
        c.stop()
        standin.stop()
    # no token in anything the services (or the stand-in) wrote: logs, audit, data, config
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    for p in files:
        data = p.read_bytes()
        for tok in tokens:
            assert tok.encode() not in data, f"a token is in {p}"
            assert tok.split(".")[2].encode() not in data, f"a token's signature is in {p}"


LIVE_LIFETIME = 30  # seconds: the token lifetime for the live refresh test


def test_live_sessions_survive_token_refreshes_in_every_state(entra_redis, tmp_path):
    """With 30-second tokens, a plain session, SUBSCRIBE (RESP2 and RESP3), BLPOP 0 and an open
    MULTI keep working across at least 3 refreshes through the real dbproxy, and the stand-in,
    which closes every connection whose last AUTH's token expired, closes none of them."""
    import threading

    import redis as _redis

    from services.dbproxy.resp import encode_command as C
    from tests.dbproxy.conftest import RawClient

    state = _state(entra_redis)
    state["redis_token_lifetime"] = LIVE_LIFETIME
    standin = StandinProc(tmp_path, state)
    c = Cluster(tmp_path / "cluster")
    (tmp_path / "cluster").mkdir()
    errors: list[str] = []
    results: dict = {}
    try:
        c.start_auth()
        info = standin.info
        ep = {"resource_manager": info["base_url"], "authority_host": info["authority_host"],
              "ca_file": str(standin.ca)}
        azure_env = {"AZURE_TENANT_ID": TENANT, "AZURE_CLIENT_ID": CLIENT_ID, "AZURE_CLIENT_SECRET": CLIENT_SECRET,
                     "AZURE_AUTHORITY_HOST": info["authority_host"]}
        c.start_joiner("discovery", c.token("discovery"), extra_env=azure_env, poll_interval=1, azure_endpoints=ep,
                       azure=[{"regions": "*", "subscriptions": [SUB1]}])
        wait_for("the keyless databases", lambda: (d := list_dbs(c)) and len(d) == 2 and d)
        proxy = c.start_joiner("dbproxy", c.token("proxy"), extra_env=azure_env, azure_endpoints=ep,
                               database_ca_files=[entra_redis["ca_file"]])
        c.proxy = f"127.0.0.1:{proxy.info['public_port']}"
        c.api = f"127.0.0.1:{proxy.info['api_port']}"
        c.redis_port = proxy.info["redis_port"]
        c.home = tmp_path / "home"
        folder = login_user(c, "lena", "--roles=access", "--db-users=*", "--db-names=*")
        crt, key, ca = asyncio.run(db_cert(c, folder, "keyless", "default"))
        deadline = time.monotonic() + 3.4 * LIVE_LIFETIME * 2 / 3 + 5  # >= 3 renewals of each session

        def plain():
            with client(c, crt, key, ca) as r:
                n = 0
                while time.monotonic() < deadline:
                    r.incr("live:n")
                    n += 1
                    time.sleep(0.5)
                results["plain"] = n

        def untimed(**kw):  # a client that may wait on its socket (Pub/Sub, BLPOP 0)
            return _redis.Redis(host="127.0.0.1", port=c.redis_port, ssl=True, ssl_certfile=crt,
                                ssl_keyfile=key, ssl_ca_certs=ca, socket_timeout=None, **kw)

        def subscribed(protocol):
            with untimed(protocol=protocol) as r:
                ps = r.pubsub()
                ps.subscribe(f"live:ch{protocol}")
                got = []
                while time.monotonic() < deadline + 3:
                    m = ps.get_message(timeout=0.5)
                    if m and m["type"] == "message":
                        got.append(m["data"])
                results[f"sub{protocol}"] = got
                ps.close()

        def blocked():
            with untimed() as r:
                results["blpop"] = r.blpop("live:q", 0)

        def transaction():
            raw = RawClient(c.redis_port, ca, (crt, key))
            raw.send(C("MULTI") + C("SET", "live:m", "1"))
            assert raw.read(2) == [b"OK", b"QUEUED"]
            while time.monotonic() < deadline:
                time.sleep(1)
                raw.send(C("INCR", "live:m"))
                assert raw.read(1) == [b"QUEUED"]
            raw.send(C("EXEC"))
            results["exec"] = raw.read(1, timeout=20)[0]
            raw.close()

        def run(fn, *args):
            try:
                fn(*args)
            except Exception as exc:  # noqa: BLE001
                errors.append(f"{fn.__name__}{args}: {type(exc).__name__}: {exc}")

        threads = [threading.Thread(target=run, args=a) for a in
                   ((plain,), (subscribed, 2), (subscribed, 3), (blocked,), (transaction,))]
        for t in threads:
            t.start()
        admin = _redis.Redis(host="127.0.0.1", port=entra_redis["port"], password=entra_redis["password"],
                             ssl=True, ssl_ca_certs=entra_redis["ca_file"], socket_timeout=5)
        sent = []
        time.sleep(2)
        while time.monotonic() < deadline:
            for p in (2, 3):
                admin.publish(f"live:ch{p}", f"m{len(sent)}")
            sent.append(len(sent))
            time.sleep(1)
        admin.rpush("live:q", "woken")
        for t in threads:
            t.join(40)
        status = standin.control("GET", "entra-redis")
        admin.close()
    finally:
        c.stop()
        standin.stop()
    assert not errors, errors
    assert results["plain"] > 30
    for p in (2, 3):
        assert results[f"sub{p}"] == [f"m{i}".encode() for i in sent], p
    assert results["blpop"] == (b"live:q", b"woken")
    assert isinstance(results["exec"], list) and results["exec"][-1] == len(results["exec"])
    killed = [k for s in status["servers"] for k in s["killed"] if k.get("user") == SP_OID]
    assert killed == [], killed  # the stand-in's expiry enforcement ended no proxied connection
