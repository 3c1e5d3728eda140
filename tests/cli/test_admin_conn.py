"""How cgctl finds its cluster: flags, environment, the user's login, a local config that runs
auth, the dev cluster; a config without an auth section never takes over."""

from __future__ import annotations

import json

import pytest

from tests.helpers import Cluster, run_cli

pytestmark = pytest.mark.slow


def test_db_host_config_never_takes_over(tmp_path):
    c = Cluster(tmp_path / "c")
    (tmp_path / "c").mkdir()
    try:
        c.start_auth()
        home = tmp_path / "home"
        (home / "dev").mkdir(parents=True)
        # What `cachegate dev` leaves for cgctl.
        (home / "dev" / "cluster.json").write_text(json.dumps(
            {"auth_server": c.auth_addr, "admin_identity": c.admin_identity}))
        etc = tmp_path / "etc" / "cachegate.yaml"
        # The guide's own step, on this machine: `db configure create -o file`.
        run_cli("cachegate", "db", "configure", "create", "-o", f"file://{etc}", "--proxy=proxy.example.com:3080",
                "--token=abc", "--azure-redis-discovery=eastus")
        assert etc.exists()
        e = {"CACHEGATE_HOME": str(home), "CACHEGATE_SYSTEM_CONFIG": str(etc)}

        st = json.loads(run_cli("cgctl", "status", "--format=json", extra_env=e).stdout)
        assert st["cluster"] == "test-cluster"
        assert st["identity"].startswith("dev cluster")
        text = run_cli("cgctl", "status", extra_env=e).stdout
        assert "Identity dev cluster" in text and f"Auth     {c.auth_addr}" in text

        # --auth-server given: still no takeover by the db host's config.
        st = json.loads(run_cli("cgctl", "--auth-server", c.auth_addr, "status", "--format=json", extra_env=e).stdout)
        assert st["cluster"] == "test-cluster"

        # The same through CACHEGATE_CONFIG.
        st = json.loads(run_cli("cgctl", "status", "--format=json", extra_env=e | {"CACHEGATE_CONFIG": str(etc)}).stdout)
        assert st["cluster"] == "test-cluster"

        # Named with -c, it is an error that says why.
        res = run_cli("cgctl", "-c", str(etc), "status", check=False, extra_env=e)
        assert res.returncode == 1
        assert "does not run auth" in res.stderr and "--identity" in res.stderr
        assert len(res.stderr.strip().splitlines()) == 1

        # A config that runs auth: its admin identity, and status says so.
        st = json.loads(run_cli("cgctl", "--auth-server", c.auth_addr, "status", "--format=json",
                                extra_env=e | {"CACHEGATE_SYSTEM_CONFIG": str(c.auth.config)}).stdout)
        assert st["identity"] == f"admin identity of {c.auth.config}"

        # Flags beat everything.
        st = json.loads(run_cli("cgctl", "--auth-server", c.auth_addr, "-i", c.admin_identity, "status",
                                "--format=json", extra_env=e).stdout)
        assert st["identity"] == f"--identity {c.admin_identity}"

        # Nothing at all: one line that says what to do, and names the skipped file.
        res = run_cli("cgctl", "status", check=False, extra_env=e | {"CACHEGATE_HOME": str(tmp_path / "empty")})
        assert res.returncode == 1
        assert f"{etc} does not run auth" in res.stderr and "make dev" in res.stderr
    finally:
        c.stop()
