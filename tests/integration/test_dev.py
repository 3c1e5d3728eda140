"""README command one: `cachegate dev` runs the whole cluster on this machine."""

from __future__ import annotations

import json
import signal
import subprocess
import time

import pytest

from tests.helpers import REPO, env, run_cli, tool

pytestmark = pytest.mark.slow


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
    finally:
        proc.send_signal(signal.SIGTERM)
        rest, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, rest
    assert "dev cluster stopped" in rest
