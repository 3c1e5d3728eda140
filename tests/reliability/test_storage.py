"""Auth's SQLite storage runs out of space under a running auth, or is read-only when auth
starts: an administrator gets a one-line error that says what is wrong and what to do, reads
keep working while the disk is full, writes work again once the disk does, and SQLite's
integrity check passes afterwards. The storage lives on a small tmpfs mounted in auth's own mount namespace
(``unshare -m``), so the test fills and remounts it without touching the machine.
PostgreSQL restarted under auth: tests/auth/test_pgbackend.py (listener) and the note in
docs/reliability.md."""

from __future__ import annotations

import json
import shutil
import sqlite3
import subprocess

import pytest

from tests.helpers import Cluster

pytestmark = [pytest.mark.slow, pytest.mark.reliability]

needs_unshare = pytest.mark.skipif(shutil.which("unshare") is None or shutil.which("nsenter") is None,
                                   reason="unshare/nsenter (util-linux) are needed")


def _ns(pid: int, *cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["nsenter", "-t", str(pid), "-m", *cmd], capture_output=True, text=True, timeout=60,
                          check=check)


def _probe_unshare(tmp) -> bool:
    d = tmp / "probe"
    d.mkdir()
    res = subprocess.run(["unshare", "-m", "sh", "-c", f"mount -t tmpfs -o size=1M tmpfs {d}"], capture_output=True)
    return res.returncode == 0


def _auth_cluster(tmp_path) -> tuple[Cluster, "object", "Path", "Path"]:
    """A cluster whose auth keeps its SQLite file in tmp_path/auth-store (not started)."""
    c = Cluster(tmp_path)
    store = tmp_path / "auth-store"
    store.mkdir()
    db = store / "cachegate.db"
    cfg = c.base(auth_service={"enabled": True, "cluster_name": "storage-test", "listen_addr": "127.0.0.1:0",
                               "join_listen_addr": "127.0.0.1:0", "storage": {"type": "sqlite", "path": str(db)}})
    return c, c.proc("auth", cfg), store, db


@needs_unshare
def test_storage_full_then_read_only(tmp_path):
    if not _probe_unshare(tmp_path):
        pytest.skip("this machine does not allow a private mount namespace (unshare -m needs CAP_SYS_ADMIN)")
    c, p, store, db = _auth_cluster(tmp_path)
    try:
        p.prefix = ["unshare", "-m", "sh", "-c", 'mount -t tmpfs -o size=6M tmpfs "$0" && exec "$@"', str(store)]
        p.start()
        pid = p.popen.pid
        c.cgctl("users", "add", "before")

        # Full: a file takes every free byte of the storage's file system.
        _ns(pid, "sh", "-c", f"dd if=/dev/zero of={store}/filler bs=64k 2>/dev/null; sync", check=False)
        res = c.cgctl("users", "add", "while-full", check=False)
        assert res.returncode == 1
        err = res.stderr.strip()
        assert len(err.splitlines()) == 1 and "full" in err and str(store) in err, err
        assert "Traceback" not in res.stderr and "Unexpected" not in err
        assert "before" in c.cgctl("users", "ls").stdout  # reads still work
        _ns(pid, "rm", "-f", f"{store}/filler")
        c.cgctl("users", "add", "after-full")

        users = {u["name"] for u in json.loads(c.cgctl("users", "ls", "--format=json").stdout)}
        assert {"before", "after-full"} <= users and "while-full" not in users
        check = _ns(pid, c_python(), "-c", f"import sqlite3; print(sqlite3.connect({str(db)!r})"
                    ".execute('PRAGMA integrity_check').fetchone()[0])")
        assert check.stdout.strip() == "ok", check
        assert "auth's storage is full" in p.output()  # the operator finds it in auth's log too
    finally:
        c.stop()


@needs_unshare
def test_storage_read_only_at_start(tmp_path):
    """A data directory that is read-only (a read-only root file system, a wrong mount): auth
    does not start, and says why in one line; once writable, it starts with its data intact."""
    if not _probe_unshare(tmp_path):
        pytest.skip("this machine does not allow a private mount namespace (unshare -m needs CAP_SYS_ADMIN)")
    c, p, store, db = _auth_cluster(tmp_path)
    try:
        p.start()
        c.cgctl("users", "add", "kept")
        p.stop()
        p.prefix = ["unshare", "-m", "sh", "-c", 'mount --bind "$0" "$0" && mount -o remount,bind,ro "$0" && exec "$@"',
                    str(store)]
        p.start(expect_fail=True)
        rc = p.popen.wait(30)
        out = p.output().strip().splitlines()
        assert rc != 0
        assert "read-only" in out[-1] and str(store) in out[-1] and "Traceback" not in "\n".join(out[-5:]), out[-5:]
        p.prefix = []
        p.start()
        assert "kept" in c.cgctl("users", "ls").stdout
        with sqlite3.connect(db) as conn:
            assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    finally:
        c.stop()


def c_python() -> str:
    import sys

    return sys.executable
