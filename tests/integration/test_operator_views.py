"""Operator views: audit search newest first with paging that says how to get more, an error
for an unknown event type; durations as people write them; a failed first login leaves
nothing behind."""

from __future__ import annotations

import json

import pytest
import yaml

from tests.helpers import Cluster, run_cli

pytestmark = pytest.mark.slow


def test_audit_roles_and_first_login(tmp_path):
    c = Cluster(tmp_path)
    try:
        c.start_auth()
        proxy = c.start_joiner("dbproxy", c.token("proxy"))
        for name in ("u1", "u2", "u3"):
            c.cgctl("users", "add", name)

        events = json.loads(c.cgctl("audit", "search", "--type=user.create", "--format=json").stdout)
        times = [e["time"] for e in events]
        assert times == sorted(times, reverse=True) and len(events) == 3
        old = json.loads(c.cgctl("audit", "search", "--type=user.create", "--oldest-first", "--format=json").stdout)
        assert [e["id"] for e in old] == [e["id"] for e in reversed(events)]

        # A page, and the way to the next one.
        res = c.cgctl("audit", "search", "--type=user.create", "--limit=2")
        assert "more match" in res.stderr and "--page-token=" in res.stderr
        cmd = res.stderr.split("Next page: ")[1].strip().split()
        assert cmd[:3] == ["cgctl", "audit", "search"]
        rest = json.loads(c.cgctl("audit", "search", *cmd[3:], "--format=json").stdout)
        assert [e["id"] for e in rest] == [events[2]["id"]]

        res = c.cgctl("audit", "search", "--type=bogus", check=False)
        assert res.returncode == 1 and "unknown event type 'bogus'" in res.stderr and "user.login" in res.stderr
        res = c.cgctl("audit", "search", "--type=user.create", "--since=2020-01-01", "--until=2020-01-02")
        assert "No events match" in res.stderr

        roles = yaml.safe_load(c.cgctl("get", "roles", "--format=yaml").stdout)
        access = [r for r in roles if r["metadata"]["name"] == "access"][0]
        assert access["spec"]["options"]["max_session_ttl"] == "12h"

        # A failed first login (wrong password) leaves no profile behind.
        home = tmp_path / "home"
        addr = f"127.0.0.1:{proxy.info['public_port']}"
        res = run_cli("cgate", "login", f"--proxy={addr}", "--user=u1", f"--ca-pin={c.ca_pin}", "--password-stdin",
                      input="not the password\n", check=False, extra_env={"CACHEGATE_HOME": str(home)})
        assert res.returncode == 1
        assert not (home / "profiles").exists() or not any((home / "profiles").iterdir())
    finally:
        c.stop()
