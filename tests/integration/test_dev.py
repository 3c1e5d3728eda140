"""README command one: `cachegate dev` runs the whole cluster on this machine."""

from __future__ import annotations

import json
import signal
import subprocess
import time

import pytest

from tests.helpers import REPO, env, run_cli, tool

pytestmark = pytest.mark.slow


def rotate_key(home) -> None:
    import secrets
    import ssl
    import urllib.request

    azure = home / "dev" / "azure"
    old = json.loads((azure / "secrets.json").read_text())["primary"]
    info = json.loads((azure / "standin.json").read_text())
    new = secrets.token_urlsafe(32)
    port = info_redis_port(home)
    out = subprocess.run(["redis-cli", "--tls", "--cacert", str(azure / "redis-ca.pem"), "-h", "127.0.0.1", "-p",
                          str(port), "--no-auth-warning", "-a", old, "CONFIG", "SET", "requirepass", new],
                         capture_output=True, text=True, timeout=15)
    assert out.stdout.strip() == "OK", out
    ctx = ssl.create_default_context(cafile=info["ca_file"])
    req = urllib.request.Request(info["base_url"].rstrip("/") + "/_standin/keys", method="POST",
                                 data=json.dumps({"resource": "my-azure-redis", "primary": new}).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, context=ctx, timeout=15) as resp:
        assert resp.status == 200


def info_redis_port(home) -> int:
    conf = (home / "dev" / "azure" / "redis.conf").read_text()
    return int(next(line.split()[1] for line in conf.splitlines() if line.startswith("tls-port")))


def test_cachegate_dev_starts_a_joined_cluster_that_cgctl_and_curl_reach(tmp_path):
    home = tmp_path / "home"
    e = env(CACHEGATE_HOME=home)
    proc = subprocess.Popen([tool("cachegate"), "dev", "--free-ports"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=e, cwd=REPO)
    lines = []
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if line.strip() == "cluster ready":
                break
        out = "".join(lines)
        assert "cluster ready" in out, out
        assert "cgctl status" in out  # it says what to run next
        info = json.loads((home / "dev" / "cluster.json").read_text())

        # cgctl finds the dev cluster and its admin identity without flags.
        status = run_cli("cgctl", "status", extra_env={"CACHEGATE_HOME": str(home)})
        assert "cachegate-dev" in status.stdout and info["ca_pin"] in status.stdout

        # The guide's version probe, over HTTPS on dbproxy's web port.
        curl = subprocess.run(f"curl -s --cacert {info['host_ca']} https://{info['web']}/v1/webapi/find "
                              "| jq -r '.server_version'", shell=True, capture_output=True, text=True,
                              timeout=30, env=e)
        assert curl.returncode == 0 and curl.stdout.strip()[:1].isdigit(), curl

        # Discovery and dbproxy joined with real tokens and kept their host certificates.
        for name in ("discovery", "dbproxy"):
            assert (home / "dev" / "data" / name / "host.crt").exists()

        # Discovery found the stand-in's cache with the real Azure SDK, and says so.
        st = json.loads(run_cli("cgctl", "status", "--format=json", extra_env={"CACHEGATE_HOME": str(home)}).stdout)
        assert any(f["databases_found"] >= 1 and not f["last_error"] for f in st["discovery"]), st

        # The guide's step 5: the dev user is logged in; PING through the proxy, no AUTH typed.
        user_env = {"CACHEGATE_HOME": str(home)}
        ls = run_cli("cgate", "db", "ls", extra_env=user_env)
        assert "my-azure-redis" in ls.stdout and "cgate db connect my-azure-redis" in ls.stdout
        res = run_cli("cgate", "db", "connect", "my-azure-redis", input="PING\nSET guide ok\nGET guide\n",
                      extra_env=user_env)
        assert res.stdout.split() == ["PONG", "OK", "ok"], res
        # The second database, keys disabled: the same data, reached through Entra ID.
        assert "my-azure-redis-entra" in ls.stdout
        res = run_cli("cgate", "db", "connect", "my-azure-redis-entra", input="GET guide\n", extra_env=user_env)
        assert res.stdout.strip() == "ok", res
        # The guide's table has both halves: Azure Managed Redis (OSSCluster, a local 3-primary
        # Redis Cluster) works with a plain redis-cli: keys on every shard, no MOVED.
        assert "my-azure-redis-enterprise" in ls.stdout and "Azure Redis Enterprise server in East US" in ls.stdout
        lines = "".join(f"SET k{i} v{i}\n" for i in range(20)) + "MGET k0 k7 k19\nDBSIZE\nCLUSTER INFO\n"
        res = run_cli("cgate", "db", "connect", "my-azure-redis-enterprise", input=lines, extra_env=user_env)
        out = res.stdout.split()
        assert out[:20] == ["OK"] * 20 and out[20:23] == ["v0", "v7", "v19"] and out[23] == "20", res
        assert "cluster_state:ok" in res.stdout and "MOVED" not in res.stdout, res
        # Cluster-aware and plain redis-py with the database certificate of `cgate db login`.
        run_cli("cgate", "db", "login", "my-azure-redis-enterprise", extra_env=user_env)
        cfg = json.loads(run_cli("cgate", "db", "config", "my-azure-redis-enterprise", "--format=json",
                                 extra_env=user_env).stdout)
        tls = {"ssl": True, "ssl_certfile": cfg["cert"], "ssl_keyfile": cfg["key"], "ssl_ca_certs": cfg["ca"],
               "socket_timeout": 10}
        from redis import Redis
        from redis.cluster import RedisCluster

        rcl = RedisCluster(host=cfg["host"], port=cfg["port"], **tls)
        keys = [f"dev:{i}" for i in range(1000)]
        for k in keys:
            rcl.set(k, k)
        assert rcl.mget_nonatomic(keys[:50]) == [k.encode() for k in keys[:50]]
        rcl.close()
        plain = Redis(host=cfg["host"], port=cfg["port"], **tls)
        assert plain.mget(keys[::100]) == [k.encode() for k in keys[::100]]
        assert sorted(plain.scan_iter(match="dev:*", count=200)) == sorted(k.encode() for k in keys)
        assert plain.delete(*keys) == 1000
        plain.close()

        # Key rotation: Redis gets a new password and Azure a new primary key; the proxy's
        # cached key fails once with WRONGPASS, it fetches the keys again, and the next
        # session works without anyone typing anything.
        rotate_key(home)
        res = run_cli("cgate", "db", "connect", "my-azure-redis", input="GET guide\n", extra_env=user_env)
        assert res.stdout.strip() == "ok", res
    finally:
        proc.send_signal(signal.SIGTERM)
        rest, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, rest
    assert "dev cluster stopped" in rest
