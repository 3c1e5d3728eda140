"""The supervisor of `cachegate dev` with real short-lived processes: restarts with backoff,
one line per event, and the lock that keeps a second `cachegate dev` away."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

from services.cli.supervisor import AlreadyRunning, DevLock, Supervisor


def test_a_process_that_keeps_dying_waits_longer_each_time_and_one_that_ran_starts_at_once():
    lines: list[str] = []
    starts: list[float] = []

    def start() -> subprocess.Popen:
        starts.append(time.monotonic())
        return subprocess.Popen(["sh", "-c", "exit 3"])

    sup = Supervisor(lines.append, first=0.05, cap=0.2, healthy_after=60)
    first = start()
    first.wait()
    sup.add("flaky", first, start, log=Path("/dev/null"))
    deadline = time.monotonic() + 10
    while len(starts) < 5 and time.monotonic() < deadline:
        sup.tick()
        time.sleep(0.01)
    for u in sup.units.values():
        u.proc.wait()
    gaps = [b - a for a, b in zip(starts[1:], starts[2:])]
    assert len(starts) == 5, lines
    # 0.05, 0.1, 0.2, 0.2 (capped), each measured from the previous death
    assert gaps[0] >= 0.09 and gaps[1] >= 0.19 and gaps[2] >= 0.19 and gaps[2] < 1.0, gaps
    assert lines[0] == "flaky exited (code 3); restarting it in 0.05s (log: /dev/null)"
    assert "flaky is running again (pid " in lines[1] and "restart 1)" in lines[1]
    assert "restarting it in 0.2s" in lines[-2] or "restarting it in 0.2s" in lines[-1]

    # One that ran longer than healthy_after starts again after the first delay.
    u = sup.units["flaky"]
    u.due, u.started = None, time.monotonic() - 120
    sup.tick()
    assert u.delay == 0.05


def test_a_start_that_fails_is_tried_again_later_and_said():
    lines: list[str] = []
    calls = {"n": 0}

    def start() -> subprocess.Popen:
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("port 6380 is taken\nmore detail")
        return subprocess.Popen(["sleep", "5"])

    dead = subprocess.Popen(["true"])
    dead.wait()
    sup = Supervisor(lines.append, first=0.01, cap=0.05)
    sup.add("redis-server", dead, start, log=Path("/tmp/r.log"))
    deadline = time.monotonic() + 5
    while "running again" not in "".join(lines) and time.monotonic() < deadline:
        sup.tick()
        time.sleep(0.01)
    try:
        assert any(ln.startswith("redis-server did not start again (port 6380 is taken); next try in") for ln in lines)
        assert sup.units["redis-server"].proc.poll() is None
    finally:
        sup.units["redis-server"].proc.kill()
        sup.units["redis-server"].proc.wait()


def test_the_dev_lock_is_held_once_and_names_its_holder(tmp_path):
    one = DevLock(tmp_path)
    one.acquire()
    one.write([])
    with pytest.raises(AlreadyRunning) as exc:
        DevLock(tmp_path).acquire()
    assert exc.value.pid == os.getpid()
    one.release()
    again = DevLock(tmp_path)
    again.acquire()  # released: free again
    # A holder killed hard leaves its processes behind: the next one refuses to start over them.
    child = subprocess.Popen(["sleep", "30"], cwd=tmp_path)
    try:
        again.write([child.pid])
        again.release()
        # `sleep` is no process of a dev cluster (neither redis-server nor naming the folder)...
        third = DevLock(tmp_path)
        third.acquire()
        third.write([child.pid])
        third.release()
    finally:
        child.kill()
        child.wait()
    left = subprocess.Popen(["sh", "-c", "sleep 30; :", str(tmp_path / "auth.yaml")])  # names the folder
    try:
        time.sleep(0.2)
        lock = DevLock(tmp_path)
        lock.acquire()
        lock.write([left.pid])
        lock.release()
        with pytest.raises(AlreadyRunning) as exc:
            DevLock(tmp_path).acquire()
        assert exc.value.pid is None and str(left.pid) in exc.value.why
    finally:
        left.kill()
        left.wait()
