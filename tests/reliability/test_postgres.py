"""PostgreSQL restarted under a running auth (the HA backend), twice: no data is lost and the
very first admin call after each restart works (auth's pool checks a reused connection and
retries once, docs/ha.md); were one to fail, its error is one line without the password.
Full run only (tests/ha has the CI version)."""

from __future__ import annotations

import json

import pytest

from tests.auth.test_pgbackend import PG_PASSWORD, PgServer, _pg_bindir
from tests.helpers import Cluster
from tests.reliability.stack import FULL

pytestmark = [pytest.mark.slow, pytest.mark.reliability,
              pytest.mark.skipif(not FULL, reason="PostgreSQL restarts run with CACHEGATE_RELIABILITY=full")]


def test_postgres_restart_under_auth(tmp_path):
    bindir = _pg_bindir()
    if bindir is None:
        pytest.skip("PostgreSQL server binaries are not installed: apt-get install postgresql")
    pg = PgServer(bindir).start()
    c = Cluster(tmp_path)
    try:
        c.start_auth(storage={"type": "postgres", "conn_string": pg.new_database()})
        c.cgctl("users", "add", "before-restart")
        failures = []
        for n in range(2):
            pg._run("pg_ctl", "-D", str(pg.data), "-l", str(pg.log), "-m", "fast", "-w", "-t", "60", "restart")
            for attempt in range(5):
                res = c.cgctl("users", "add", f"after-restart-{n}", check=False)
                if res.returncode == 0:
                    break
                err = res.stderr.strip()
                assert len(err.splitlines()) == 1 and PG_PASSWORD not in err, err
                failures.append(err)
            else:
                raise AssertionError(f"auth did not serve again after a PostgreSQL restart: {failures}")
        assert not failures, failures
        users = {u["name"] for u in json.loads(c.cgctl("users", "ls", "--format=json").stdout)}
        assert {"before-restart", "after-restart-0", "after-restart-1"} <= users
        assert PG_PASSWORD not in c.auth.output()
        print(f"\npostgres: 2 restarts, {len(failures)} failed admin call(s) before auth served again: "
              f"{failures[:1]}")
    finally:
        c.stop()
        pg.stop()
