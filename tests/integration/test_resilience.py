"""When auth goes away, dbproxy keeps serving from its last known state and keeps the audit
on disk; when auth is back, the spooled events are delivered. Nothing is dropped."""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from tests.dbproxy.conftest import REDIS_PASSWORD, certs, redis_server  # noqa: F401 (fixtures)
from tests.helpers import Cluster, run_cli
from tests.integration.test_dataplane import PASSWORD, SECRET_ENV, db_cert, redis_cli
from tests.helpers import free_port  # noqa: E402

pytestmark = pytest.mark.slow




async def test_dbproxy_serves_and_spools_audit_while_auth_is_down(tmp_path, certs, redis_server):  # noqa: F811
    c = Cluster(tmp_path)
    try:
        # Fixed ports, so that the restarted auth is where dbproxy expects it.
        c.start_auth(listen_addr=f"127.0.0.1:{free_port()}", join_listen_addr=f"127.0.0.1:{free_port()}")
        proxy = c.start_joiner("dbproxy", c.token("proxy"), extra_env={SECRET_ENV: REDIS_PASSWORD},
                               database_ca_files=[certs.path("server-ca.pem")])
        c.proxy = f"127.0.0.1:{proxy.info['public_port']}"
        c.api = f"127.0.0.1:{proxy.info['api_port']}"
        c.redis_port = proxy.info["redis_port"]
        home = tmp_path / "home"
        c.cgctl("create", "-f", "-", input=f"""kind: db
version: v1
metadata: {{name: orders}}
spec: {{uri: "127.0.0.1:{redis_server.port}", tls: true, secret: "env:{SECRET_ENV}"}}
""")
        invite = json.loads(c.cgctl("users", "add", "erin", "--db-users=default", "--format=json").stdout)["invite"]
        run_cli("cgate", "login", f"--proxy={c.proxy}", f"--invite={invite}", f"--ca-pin={c.ca_pin}",
                "--password-stdin", input=PASSWORD + "\n", extra_env={"CACHEGATE_HOME": str(home)})
        folder = home / "profiles" / c.proxy.replace(":", "_")
        crt, key, ca = await db_cert(c, folder, "orders", "default")
        assert redis_cli(c, crt, key, ca, "PING").stdout.strip() == "PONG"

        c.auth.stop()
        # Auth is down: the proxy still knows the database, the roles and the locks.
        res = redis_cli(c, crt, key, ca, input="SET while-auth-down yes\nGET while-auth-down\n")
        assert res.stdout.split() == ["OK", "yes"], res
        await asyncio.sleep(1)
        spool = c.data / "dbproxy" / "audit-spool"
        assert spool.exists() and any(spool.iterdir()), "audit events were not kept on disk"
        # A new database certificate needs auth: the user is told that auth is the one away,
        # not that the proxy did not answer.
        t0 = time.monotonic()
        res = run_cli("cgate", "db", "login", "orders", check=False, extra_env={"CACHEGATE_HOME": str(home)})
        assert res.returncode == 1 and time.monotonic() - t0 < 25, res
        assert res.stderr.strip() == (f"ERROR: the proxy at {c.api} answered, but it cannot reach the auth service "
                                      "right now: try again shortly; if it persists, the cluster's administrator "
                                      "should check auth (`cgctl status`)"), res

        c.auth.start()
        deadline = time.monotonic() + 40
        found = []
        while time.monotonic() < deadline:
            events = json.loads(c.cgctl("audit", "search", "--type=db.session.query", "--user=erin",
                                        "--format=json").stdout)
            found = [e for e in events if "while-auth-down" in json.dumps(e["fields"])]
            if len(found) >= 2:
                break
            await asyncio.sleep(1)
        assert len(found) >= 2, "the spooled audit events did not reach auth"
        # And the proxy follows auth again: a new database appears for it.
        c.cgctl("create", "-f", "-", input=f"""kind: db
version: v1
metadata: {{name: orders-2}}
spec: {{uri: "127.0.0.1:{redis_server.port}", tls: true, secret: "env:{SECRET_ENV}"}}
""")
        crt2, key2, ca2 = await db_cert(c, folder, "orders-2", "default")
        deadline = time.monotonic() + 30
        out = ""
        while time.monotonic() < deadline:
            out = redis_cli(c, crt2, key2, ca2, "PING").stdout.strip()
            if out == "PONG":
                break
            await asyncio.sleep(0.5)
        assert out == "PONG"
    finally:
        c.stop()
