"""`cachegate dev` heals: kill -9 any of its processes and it is back within 10 s (a session
works again) while the others keep running; a second `cachegate dev` finds the first and leaves
it alone. About 40-60 s on two cores."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.helpers import REPO, env, run_cli

pytestmark = pytest.mark.slow

BACK_WITHIN = 10.0  # the process is started again and ready (its new pid in cluster.json)
SESSION_WITHIN = 20.0  # and a session through the proxy works, counted from the kill too


def start_dev(home, *args):
    proc = subprocess.Popen([sys.executable, "-m", "services.cli.daemon", "dev", "--free-ports", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env(CACHEGATE_HOME=home), cwd=REPO)
    lines = []
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if line.strip() == "cluster ready":
            return proc
    proc.kill()
    raise AssertionError("".join(lines))


def session(home, db: str = "my-azure-redis") -> subprocess.CompletedProcess:
    return run_cli("cgate", "db", "connect", db, input="PING\nSET heal ok\nGET heal\n", check=False,
                   timeout=20, extra_env={"CACHEGATE_HOME": str(home)})


def session_works(home, deadline: float, db: str = "my-azure-redis") -> float:
    """When a session works (PING, SET, GET through the proxy), trying until ``deadline``."""
    last = None
    while time.monotonic() < deadline:
        last = session(home, db)
        if last.stdout.split() == ["PONG", "OK", "ok"]:
            return time.monotonic()
        time.sleep(0.3)
    raise AssertionError(f"no working session to {db}: {last}")


def discovery_resync_errors(home) -> list[str]:
    """A discovery round now (Resync on discovery's own port, with the admin identity): the
    errors of its fetchers. None after the stand-in came back means it accepts the token
    discovery holds and serves a CA discovery trusts."""
    import asyncio

    from cachegate.discovery.v1 import discovery_service_pb2 as dpb
    from cachegate.discovery.v1 import discovery_service_pb2_grpc as dgrpc

    from services.common.creds import Creds, secure_channel

    info = json.loads((home / "dev" / "cluster.json").read_text())

    async def go():
        creds = Creds.from_identity_file(info["admin_identity"])
        async with secure_channel(info["discovery"], creds.channel_credentials(), "discovery") as ch:
            return (await dgrpc.DiscoveryServiceStub(ch).Resync(dpb.ResyncRequest(), timeout=30)).statuses

    statuses = asyncio.run(go())
    assert statuses
    return [f"{st.name}: {st.last_error}" for st in statuses if st.last_error]


def state_digest(home) -> dict:
    """What a second `cachegate dev` must not rewrite: the stand-in's CA, redis.conf,
    state.yaml, the cluster's CAs and the services' configs."""
    files = [home / "dev" / "azure" / n for n in ("ca.pem", "redis.conf", "state.yaml", "redis-ca.pem")]
    files += sorted((home / "dev").glob("*.yaml")) + sorted((home / "dev" / "data").rglob("*.pem"))
    return {str(f): hashlib.sha256(f.read_bytes()).hexdigest() for f in files if f.is_file()}


def pids(home) -> dict:
    return json.loads((home / "dev" / "cluster.json").read_text())["pids"]


def test_dev_restarts_each_process_killed_and_a_second_dev_leaves_it_running(tmp_path):
    home = tmp_path / "home"
    dev = start_dev(home)
    try:
        session_works(home, time.monotonic() + 30)

        # A second `cachegate dev` (and one with --reset) finds the running one, says so in one
        # line and changes nothing.
        before = state_digest(home)
        for extra in ([], ["--reset"]):
            second = subprocess.run([sys.executable, "-m", "services.cli.daemon", "dev", "--free-ports", *extra],
                                    capture_output=True, text=True, timeout=60, env=env(CACHEGATE_HOME=home),
                                    cwd=REPO)
            assert second.returncode == 1, second
            err = second.stderr.strip()
            assert len(err.splitlines()) == 1 and ("already running" in err or "stop it first" in err), err
            assert f"pid {dev.pid}" in err, err
            assert "--reset" in err if extra else "cgate db ls" in err
            assert second.stdout == ""
        assert state_digest(home) == before
        session_works(home, time.monotonic() + 20)

        # kill -9 each process in turn: it is back within 10 s and a session works again.
        took, back = {}, {}
        for name in ("auth", "dbproxy", "discovery", "redis-server", "azure-standin"):
            old = pids(home)[name]
            others = {n: p for n, p in pids(home).items() if n != name}
            os.kill(old, signal.SIGKILL)
            t0 = time.monotonic()
            deadline = t0 + BACK_WITHIN
            while time.monotonic() < deadline and pids(home)[name] == old:
                time.sleep(0.1)
            assert pids(home)[name] != old, f"{name} was not restarted within {BACK_WITHIN:g}s"
            back[name] = time.monotonic() - t0
            took[name] = session_works(home, t0 + SESSION_WITHIN) - t0
            if name in ("redis-server", "azure-standin"):
                # Entra ID: the stand-in puts the ACL users (and the tokens it issued) back.
                session_works(home, time.monotonic() + 15, "my-azure-redis-entra")
            if name == "azure-standin":
                assert discovery_resync_errors(home) == []
            # The others kept running: same processes as before.
            assert {n: p for n, p in pids(home).items() if n != name} == others
            for p in others.values():
                os.kill(p, 0)
        print("after kill -9, back (s):", {n: round(t, 1) for n, t in back.items()},
              "a session works (s):", {n: round(t, 1) for n, t in took.items()})
    finally:
        dev.send_signal(signal.SIGTERM)
        rest, _ = dev.communicate(timeout=60)
    assert dev.returncode == 0, rest
    for name in ("auth", "dbproxy", "discovery", "redis-server", "azure-standin"):
        assert f"{name} exited (code -9); restarting it" in rest, rest
        assert f"{name} is running again" in rest, rest
    assert "dev cluster stopped" in rest
