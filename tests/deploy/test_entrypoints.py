"""Each entrypoint of the image as a process (no container runtime here: see docs/deploy.md).

cachegate-auth, cachegate-discovery and cachegate-dbproxy, configured the way compose.yaml
and the Kubernetes manifests configure them (config from $CACHEGATE_CONFIG, the join token
and the CA pin as files, a plaintext health port), answer `cachegate health`, and the
proxy's web port serves install.sh and the wheel it pins.
"""

from __future__ import annotations

import hashlib
import json
import re
import signal
import ssl
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.helpers import REPO, env, free_port, run_cli, write_yaml

pytestmark = pytest.mark.slow


def start(name: str, cfg: Path, root: Path) -> tuple[subprocess.Popen, dict]:
    ready = root / f"{name}.ready.json"
    log = open(root / f"{name}.log", "ab")  # noqa: SIM115
    code = f"from services.cli.daemon import main_{name}; main_{name}()"
    p = subprocess.Popen([sys.executable, "-c", code, "--ready-file", str(ready)], stdout=log,
                         stderr=subprocess.STDOUT, cwd=REPO, env=env(CACHEGATE_CONFIG=str(cfg)))
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if ready.exists():
            return p, json.loads(ready.read_text())
        if p.poll() is not None:
            break
        time.sleep(0.05)
    p.kill()
    raise AssertionError(f"{name} did not start:\n{(root / f'{name}.log').read_text()[-3000:]}")


def health(port: int) -> str:
    r = run_cli("cachegate", "health", "--addr", f"127.0.0.1:{port}", check=False)
    return r.stdout.strip() or r.stderr.strip()


def test_each_service_entrypoint_runs_joins_and_serves_health(tmp_path):
    procs: list[subprocess.Popen] = []
    base = {"version": "v1", "data_dir": str(tmp_path / "data"), "log": {"level": "info", "format": "json"}}
    try:
        hp = {s: free_port() for s in ("auth", "discovery", "dbproxy")}
        auth_cfg = write_yaml(tmp_path / "auth.yaml", dict(base, health_listen_addr=f"127.0.0.1:{hp['auth']}",
                                                           auth_service={"enabled": True, "cluster_name": "ep",
                                                                         "listen_addr": "127.0.0.1:0",
                                                                         "join_listen_addr": "127.0.0.1:0"}))
        p, info = start("auth", auth_cfg, tmp_path)
        procs.append(p)
        auth = info["auth"]
        assert info["health_port"] == hp["auth"] and health(hp["auth"]) == "SERVING"
        admin = ["--auth-server", f"127.0.0.1:{auth['mesh_port']}", "-i", auth["admin_identity"]]
        join_dir = tmp_path / "join"
        join_dir.mkdir()
        (join_dir / "ca_pin").write_text(auth["ca_pin"] + "\n")
        for service, type_ in (("discovery", "discovery"), ("dbproxy", "proxy")):
            token = run_cli("cgctl", *admin, "tokens", "add", f"--type={type_}").stdout.strip()
            (join_dir / f"{service}.token").write_text(token)
        common = dict(base, auth_server=f"127.0.0.1:{auth['mesh_port']}",
                      join_server=f"127.0.0.1:{auth['join_port']}")
        sections = {"discovery": {"enabled": True, "listen_addr": "127.0.0.1:0"},
                    "dbproxy": {"enabled": True, "listen_addr": "127.0.0.1:0", "api_listen_addr": "127.0.0.1:0",
                                "redis_listen_addr": "127.0.0.1:0", "web_listen_addr": "127.0.0.1:0"}}
        infos = {}
        for service, section in sections.items():
            cfg = write_yaml(tmp_path / f"{service}.yaml", dict(
                common, health_listen_addr=f"127.0.0.1:{hp[service]}",
                join={"token": str(join_dir / f"{service}.token"), "ca_pin": str(join_dir / "ca_pin")},
                **{f"{service}_service": section}))
            p, info = start(service, cfg, tmp_path)
            procs.append(p)
            infos[service] = info[service]
            assert health(hp[service]) == "SERVING"
        assert run_cli("cachegate", "health", "--addr", f"127.0.0.1:{hp['dbproxy']}", "--service", "dbproxy",
                       check=False).stdout.strip() == "SERVING"

        # The proxy's web port: install.sh pins the wheel it serves beside it.
        ctx = ssl.create_default_context(cafile=str(tmp_path / "data" / "dbproxy" / "host_ca.pem"))
        ctx.check_hostname = False
        web = f"https://127.0.0.1:{infos['dbproxy']['web_port']}"
        script = urllib.request.urlopen(f"{web}/scripts/install.sh", context=ctx, timeout=10).read().decode()
        wheel_name = re.search(r"^WHEEL_NAME='(.+)'$", script, re.M).group(1)
        sha = re.search(r"^WHEEL_SHA256='([0-9a-f]{64})'$", script, re.M).group(1)
        assert f"BASE_URL='{web}'" in script and "BEGIN CERTIFICATE" in script
        data = urllib.request.urlopen(f"{web}/scripts/{wheel_name}", context=ctx, timeout=30).read()
        assert hashlib.sha256(data).hexdigest() == sha
    finally:
        for p in reversed(procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        codes = [p.wait(20) for p in reversed(procs)]
    assert codes == [0] * len(procs), codes
