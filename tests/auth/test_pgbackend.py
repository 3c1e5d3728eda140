"""Auth's storage backends: the same behaviour from SQLite and from a real PostgreSQL
(started here as the ``postgres`` OS user), PostgreSQL's change notifications across
processes (HA), and real auth processes sharing one PostgreSQL database."""

from __future__ import annotations

import asyncio
import contextlib
import glob
import itertools
import json
import os
import shutil
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import psycopg
import pytest

from services.auth.backend import Change, SQLiteBackend
from services.common.config import ConfigError
from tests.helpers import free_port as _free_port  # noqa: E402

PG_PASSWORD = "pg-Secret-7731"


# --- a real PostgreSQL ------------------------------------------------------------------------
def _pg_bindir() -> str | None:
    for d in sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(Path(p).parent.name), reverse=True):
        if os.path.exists(os.path.join(d, "initdb")):
            return d
    found = shutil.which("initdb")
    return os.path.dirname(found) if found else None




class PgServer:
    def __init__(self, bindir: str):
        self.bindir = bindir
        self.root = Path(tempfile.mkdtemp(prefix="cg-pg-"))
        self.data = self.root / "data"
        self.sock = self.root / "sock"
        self.log = self.root / "postgres.log"
        self.port = _free_port()
        self._as_root = os.geteuid() == 0
        self._n = itertools.count()

    def _run(self, *cmd: str) -> None:
        full = [os.path.join(self.bindir, cmd[0]), *cmd[1:]]
        if self._as_root:  # PostgreSQL refuses to run as root
            full = ["runuser", "-u", "postgres", "--", *full]
        res = subprocess.run(full, check=False, capture_output=True, text=True, timeout=120)
        if res.returncode:
            log = self.log.read_text(errors="replace")[-2000:] if self.log.exists() else ""
            raise RuntimeError(f"{' '.join(cmd[:2])} failed ({res.returncode}):\n{res.stdout}\n{res.stderr}\n{log}")

    def start(self) -> PgServer:
        self.sock.mkdir()
        pwfile = self.root / "pw"
        pwfile.write_text(PG_PASSWORD + "\n")
        if self._as_root:
            shutil.chown(self.root, "postgres")
            shutil.chown(self.sock, "postgres")
            shutil.chown(pwfile, "postgres")
        self.root.chmod(0o755)
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "-E", "UTF8", "--locale=C",
                  "--auth-local=trust", "--auth-host=scram-sha-256", f"--pwfile={pwfile}")
        opts = (f"-p {self.port} -k {self.sock} -c listen_addresses=127.0.0.1 -c fsync=off "
                "-c synchronous_commit=off -c full_page_writes=off -c max_connections=200")
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-o", opts, "-w", "-t", "60", "start")
        return self

    def restart(self) -> None:
        """Stop (fast: every client connection is ended, as on a real restart) and start again."""
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-m", "fast", "-w", "-t", "60", "restart")

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")
        shutil.rmtree(self.root, ignore_errors=True)

    def dsn(self, dbname: str = "postgres", password: str = PG_PASSWORD) -> str:
        return f"host=127.0.0.1 port={self.port} dbname={dbname} user=postgres password={password}"

    def new_database(self) -> str:
        name = f"cg_{os.getpid()}_{next(self._n)}"
        with psycopg.connect(self.dsn(), autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        return self.dsn(name)


@pytest.fixture(scope="session")
def pg():
    bindir = _pg_bindir()
    if bindir is None:
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) are not installed: "
                    "apt-get install postgresql (CI installs them)")
    server = PgServer(bindir).start()
    yield server
    server.stop()


@pytest.fixture
def pg_dsn(pg) -> str:
    """A new, empty database on the session's server."""
    return pg.new_database()


def _postgres_backend(dsn: str):
    from services.auth.pgbackend import PostgresBackend

    return PostgresBackend(dsn)


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.slow)])
async def backend(request, tmp_path):
    if request.param == "sqlite":
        b = SQLiteBackend(tmp_path / "auth.db")
    else:
        b = _postgres_backend(request.getfixturevalue("pg_dsn"))
        await b.start()
    yield b
    await b.close()


class Recorder:
    def __init__(self):
        self.changes: list[Change] = []
        self.event = asyncio.Event()

    def __call__(self, change: Change) -> None:
        self.changes.append(change)
        self.event.set()

    async def wait_for(self, n: int, timeout: float = 10.0) -> list[Change]:
        deadline = time.monotonic() + timeout
        while len(self.changes) < n:
            left = deadline - time.monotonic()
            assert left > 0, f"got {len(self.changes)} of {n} changes: {self.changes}"
            self.event.clear()
            try:
                await asyncio.wait_for(self.event.wait(), left)
            except TimeoutError:
                pass
        return self.changes


# --- the same behaviour from both backends -----------------------------------------------------
async def test_get_put_overwrite(backend):
    assert await backend.get("a/1") is None
    await backend.put("a/1", b"one")
    item = await backend.get("a/1")
    assert item.key == "a/1" and item.value == b"one" and item.expires is None
    await backend.put("a/1", b"\x00\xffbinary", expires=time.time() + 60)
    item = await backend.get("a/1")
    assert item.value == b"\x00\xffbinary" and item.expires > time.time()
    await backend.put("a/1", b"no expiry again")
    assert (await backend.get("a/1")).expires is None


async def test_expired_items_are_gone_and_can_be_created_again(backend):
    await backend.put("t/old", b"x", expires=time.time() - 1)
    assert await backend.get("t/old") is None
    assert [i.key for i in await backend.list("t/")] == []
    assert await backend.create("t/old", b"new", expires=time.time() + 0.3)
    assert (await backend.get("t/old")).value == b"new"
    assert not await backend.create("t/old", b"other")
    await asyncio.sleep(0.4)
    assert await backend.get("t/old") is None
    assert await backend.create("t/old", b"third")
    assert (await backend.get("t/old")).value == b"third"


async def test_create_only_once(backend):
    assert await backend.create("k", b"1")
    assert not await backend.create("k", b"2")
    assert (await backend.get("k")).value == b"1"
    results = await asyncio.gather(*(backend.create("race", str(i).encode()) for i in range(8)))
    assert sum(results) == 1


async def test_compare_and_swap(backend):
    assert not await backend.compare_and_swap("c", b"a", b"b")  # absent
    await backend.put("c", b"a")
    assert not await backend.compare_and_swap("c", b"wrong", b"b")
    assert (await backend.get("c")).value == b"a"
    assert await backend.compare_and_swap("c", b"a", b"b", expires=time.time() + 60)
    item = await backend.get("c")
    assert item.value == b"b" and item.expires is not None
    assert await backend.compare_and_swap("c", b"b", b"c")
    assert (await backend.get("c")).expires is None


async def test_delete(backend):
    assert not await backend.delete("d")
    await backend.put("d", b"1")
    assert await backend.delete("d")
    assert await backend.get("d") is None
    assert not await backend.delete("d")


async def test_list_prefix_order_and_paging(backend):
    keys = ["users/bob", "users/alice", "users/carol", "users/dave", "usersx", "user", "roles/a", "users/Zed",
            "users/é"]
    for k in keys:
        await backend.put(k, k.encode())
    listed = [i.key for i in await backend.list("users/")]
    assert listed == ["users/Zed", "users/alice", "users/bob", "users/carol", "users/dave", "users/é"]
    assert [i.value for i in await backend.list("users/")] == [k.encode() for k in listed]
    # Pages: after is exclusive, limit caps.
    assert [i.key for i in await backend.list("users/", limit=2)] == ["users/Zed", "users/alice"]
    assert [i.key for i in await backend.list("users/", after="users/alice", limit=2)] == ["users/bob", "users/carol"]
    assert [i.key for i in await backend.list("users/", after="users/dave")] == ["users/é"]
    assert [i.key for i in await backend.list("users/", after="users/é")] == []
    # An 'after' before the prefix starts at the prefix.
    assert [i.key for i in await backend.list("users/", after="a", limit=1)] == ["users/Zed"]
    # Everything.
    assert len(await backend.list("")) == len(keys)
    assert [i.key for i in await backend.list("nothing/")] == []


async def test_audit_append_and_search(backend):
    t0 = 1_700_000_000.0
    events = [("e1", t0, "user.login", "alice"), ("e2", t0 + 1, "db.session.start", "alice"),
              ("e3", t0 + 1, "db.session.query", "bob"), ("e0", t0 + 1, "db.session.end", "alice"),
              ("e4", t0 + 2.5, "role.put", "admin"), ("e5", t0 + 3, "db_x", "bob")]
    for eid, when, type_, actor in events:
        await backend.append_audit(eid, when, type_, actor, f"data-{eid}".encode())
    await backend.append_audit("e1", t0 + 99, "dup", "x", b"ignored")  # same id: kept once, unchanged

    every = await backend.search_audit(None, None, [], "", None, 100)
    assert [r[1] for r in every] == ["e1", "e0", "e2", "e3", "e4", "e5"]  # by time, then id
    assert every[0] == (t0, "e1", b"data-e1")
    # Time window (inclusive).
    assert [r[1] for r in await backend.search_audit(t0 + 1, t0 + 2.5, [], "", None, 100)] == ["e0", "e2", "e3", "e4"]
    # Actor.
    assert [r[1] for r in await backend.search_audit(None, None, [], "bob", None, 100)] == ["e3", "e5"]
    # Types: exact and prefix ("db.*" does not match "db_x").
    assert [r[1] for r in await backend.search_audit(None, None, ["db.*"], "", None, 100)] == ["e0", "e2", "e3"]
    assert [r[1] for r in await backend.search_audit(None, None, ["role.put", "user.*"], "", None, 100)] == \
        ["e1", "e4"]
    assert [r[1] for r in await backend.search_audit(None, None, ["db.session.start"], "alice", None, 100)] == ["e2"]
    # Paging with the (time, id) cursor.
    page1 = await backend.search_audit(None, None, [], "", None, 2)
    assert [r[1] for r in page1] == ["e1", "e0"]
    page2 = await backend.search_audit(None, None, [], "", (page1[-1][0], page1[-1][1]), 2)
    assert [r[1] for r in page2] == ["e2", "e3"]
    page3 = await backend.search_audit(None, None, [], "", (page2[-1][0], page2[-1][1]), 2)
    assert [r[1] for r in page3] == ["e4", "e5"]
    assert await backend.search_audit(None, None, [], "", (page3[-1][0], page3[-1][1]), 2) == []
    # Real timestamps round-trip exactly (the cursor compares them for equality).
    now = time.time()
    await backend.append_audit("n1", now, "x", "y", b"")
    await backend.append_audit("n2", now, "x", "y", b"")
    got = await backend.search_audit(now, now, [], "", None, 10)
    assert [r[:2] for r in got] == [(now, "n1"), (now, "n2")]
    assert [r[1] for r in await backend.search_audit(None, None, [], "", (now, "n1"), 10)] == ["n2"]


# --- audit batches: one transaction each ----------------------------------------------------------
async def _fail_audit_insert_of(backend, event_id: str) -> None:
    """Make the database itself refuse to store the event ``event_id`` (a trigger), so that
    a batch fails in its middle, after the rows before it were inserted."""
    if isinstance(backend, SQLiteBackend):
        backend._db.execute(f"CREATE TRIGGER fail_audit BEFORE INSERT ON audit WHEN NEW.id = '{event_id}' "
                            "BEGIN SELECT RAISE(ABORT, 'injected storage failure'); END")
    else:
        from services.auth.pgbackend import AUDIT

        await backend._fetch(
            "CREATE FUNCTION fail_audit() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
            "RAISE EXCEPTION 'injected storage failure'; END $$", ())
        await backend._fetch(f"CREATE TRIGGER fail_audit BEFORE INSERT ON {AUDIT} FOR EACH ROW "
                             f"WHEN (NEW.id = '{event_id}') EXECUTE FUNCTION fail_audit()", ())


async def _drop_audit_failure(backend) -> None:
    if isinstance(backend, SQLiteBackend):
        backend._db.execute("DROP TRIGGER fail_audit")
    else:
        from services.auth.pgbackend import AUDIT

        await backend._fetch(f"DROP TRIGGER fail_audit ON {AUDIT}", ())


async def test_audit_batch_stores_a_repeated_id_once(backend):
    t0 = 1_700_000_000.0
    await backend.append_audit_many([("a", t0, "db.session.query", "alice", b"a-first"),
                                     ("b", t0 + 1, "db.session.query", "alice", b"b"),
                                     ("a", t0 + 2, "db.session.query", "alice", b"a-again"),  # in the batch
                                     ("c", t0 + 3, "db.session.query", "bob", b"c")])
    # A retried batch, partly stored already, and a new event.
    await backend.append_audit_many([("b", t0 + 9, "x", "y", b"b-retried"), ("d", t0 + 4, "db.session.end", "bob", b"d"),
                                     ("c", t0 + 9, "x", "y", b"c-retried")])
    await backend.append_audit("d", t0, "x", "y", b"d-single")  # the single-event path agrees
    got = await backend.search_audit(None, None, [], "", None, 100)
    assert got == [(t0, "a", b"a-first"), (t0 + 1, "b", b"b"), (t0 + 3, "c", b"c"), (t0 + 4, "d", b"d")]
    await backend.append_audit_many([])  # nothing to do
    assert len(await backend.search_audit(None, None, [], "", None, 100)) == 4


async def test_audit_batch_storage_failure_in_the_middle_stores_nothing_and_raises(backend):
    t0 = 1_700_000_000.0
    await backend.append_audit("old", t0 - 1, "x", "y", b"old")
    await _fail_audit_insert_of(backend, "e3")
    rows = [(f"e{i}", t0 + i, "db.session.query", "alice", b"data") for i in range(6)]
    with pytest.raises(Exception, match="injected storage failure"):
        await backend.append_audit_many(rows)
    assert [r[1] for r in await backend.search_audit(None, None, [], "", None, 100)] == ["old"]
    # The backend is still usable, and the retried batch is stored whole once the cause is gone.
    await _drop_audit_failure(backend)
    await backend.append_audit_many(rows)
    assert [r[1] for r in await backend.search_audit(None, None, [], "", None, 100)] == \
        ["old", "e0", "e1", "e2", "e3", "e4", "e5"]


async def test_audit_log_ingest_is_all_or_nothing(backend):
    """AuditLog.ingest over each backend: one bad event refuses the batch, a storage failure
    stores nothing of it and raises, repeated ids are stored once."""
    from cachegate.types.v1 import types_pb2

    from services.auth.audit import AuditError, AuditLog
    from services.common.grpcutil import ts

    audit = AuditLog(backend, "unit")
    ids = [str(uuid.uuid4()) for _ in range(5)]

    def batch(event_ids, bad_at=None, start=0):
        evs = [types_pb2.AuditEvent(id=i, type="db.session.query", actor="alice", time=ts(1_700_000_000 + start + n))
               for n, i in enumerate(event_ids)]
        if bad_at is not None:
            evs[bad_at].id = "not-a-uuid"
        return evs

    with pytest.raises(AuditError, match=r"^event 2: id 'not-a-uuid' is not a UUID"):
        await audit.ingest(batch(ids, bad_at=2))
    assert await backend.search_audit(None, None, [], "", None, 100) == []

    await _fail_audit_insert_of(backend, ids[2])
    with pytest.raises(Exception, match="injected storage failure"):
        await audit.ingest(batch(ids), in_place=True)
    assert await backend.search_audit(None, None, [], "", None, 100) == []
    await _drop_audit_failure(backend)

    assert await audit.ingest(batch(ids[:3] + ids[:1])) == 4  # a repeated id inside the batch
    assert await audit.ingest(batch(ids[1:], start=10), in_place=True) == 4  # a retry overlapping the first
    got = await backend.search_audit(None, None, [], "", None, 100)
    assert [r[1] for r in got] == ids
    assert [r[0] for r in got] == [1_700_000_000.0 + n for n in (0, 1, 2, 12, 13)]  # first stored wins


async def test_watchers_see_writes_under_their_prefix(backend):
    rec, other = Recorder(), Recorder()
    cancel = backend.subscribe("locks/", rec)
    backend.subscribe("roles/", other)
    await backend.put("locks/1", b"a")
    assert await backend.create("locks/2", b"b")
    assert not await backend.create("locks/2", b"again")  # no change, no event
    assert await backend.compare_and_swap("locks/1", b"a", b"c")
    assert not await backend.compare_and_swap("locks/1", b"zzz", b"d")
    assert await backend.delete("locks/2")
    assert not await backend.delete("locks/2")
    await backend.put("users/x", b"not watched")
    assert [(c.kind, c.key, c.value) for c in rec.changes] == [
        ("put", "locks/1", b"a"), ("put", "locks/2", b"b"), ("put", "locks/1", b"c"), ("delete", "locks/2", None)]
    cancel()
    await backend.put("locks/3", b"after cancel")
    assert len(rec.changes) == 4 and other.changes == []


# --- PostgreSQL only ---------------------------------------------------------------------------
async def _converges(rec: "Recorder", want: dict, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        state: dict = {}
        for c in rec.changes:
            if c.kind == "put":
                state[c.key] = c.value
            elif c.kind == "delete":
                state.pop(c.key, None)
        if state == want:
            return
        assert time.monotonic() < deadline, f"watchers saw {state}, not {want}"
        await asyncio.sleep(0.05)


@pytest.mark.slow
async def test_two_backends_on_one_database_see_each_others_writes(pg_dsn):
    a, b = _postgres_backend(pg_dsn), _postgres_backend(pg_dsn)
    await a.start()
    await b.start()
    try:
        rec_b, rec_a = Recorder(), Recorder()
        b.subscribe("databases/", rec_b)
        a.subscribe("databases/", rec_a)
        await a.put("databases/redis1", b"v1")
        await a.put("other/x", b"not watched")
        assert await a.create("databases/redis2", b"v2")
        assert await a.compare_and_swap("databases/redis1", b"v1", b"v1b")
        assert await a.delete("databases/redis2")
        # b reads each changed item when its notification arrives, so under load it may see a
        # later value, or skip a put whose item is already gone: what must hold is that its
        # watchers end with a's state, and see the delete.
        await _converges(rec_b, {"databases/redis1": b"v1b"})
        assert ("delete", "databases/redis2") in [(c.kind, c.key) for c in rec_b.changes]
        assert all(c.key.startswith("databases/") for c in rec_b.changes)
        # Writes via b reach a's watchers; a's own writes were passed once each (not again via NOTIFY).
        seen_b = len(rec_b.changes)
        await b.put("databases/redis3", b"v3")
        await rec_a.wait_for(5)
        await asyncio.sleep(0.3)
        assert [(c.kind, c.key) for c in rec_a.changes] == [
            ("put", "databases/redis1"), ("put", "databases/redis2"), ("put", "databases/redis1"),
            ("delete", "databases/redis2"), ("put", "databases/redis3")]
        assert len(rec_b.changes) == seen_b + 1  # its own put, once
        # And the data itself is shared.
        assert (await b.get("databases/redis1")).value == b"v1b"
        assert not await b.create("databases/redis1", b"taken")
    finally:
        await a.close()
        await b.close()


@pytest.mark.slow
async def test_listener_reconnects_after_losing_its_connection(pg, pg_dsn):
    a, b = _postgres_backend(pg_dsn), _postgres_backend(pg_dsn)
    a._listen_reconnect = 0.1
    await a.start()
    await b.start()
    try:
        rec = Recorder()
        a.subscribe("k/", rec)
        pid = a._listen_conn.info.backend_pid
        with psycopg.connect(pg.dsn(), autocommit=True) as admin:
            admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
        deadline = time.monotonic() + 10
        while a._listen_conn is None or a._listen_conn.info.backend_pid == pid or a._listen_conn.broken:
            assert time.monotonic() < deadline, "the listener did not reconnect"
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.2)
        await b.put("k/1", b"after")
        # First a "reset" (changes may have been missed: watch streams start over), then the put.
        assert [(c.kind, c.key, c.value) for c in await rec.wait_for(2)] == [
            ("reset", "k/", None), ("put", "k/1", b"after")]
        # The pool also replaces broken connections.
        for conn in list(a._idle):
            with psycopg.connect(pg.dsn(), autocommit=True) as admin:
                admin.execute("SELECT pg_terminate_backend(%s)", (conn.info.backend_pid,))
        for _ in range(3):
            try:
                await a.get("k/1")
                break
            except psycopg.OperationalError:
                continue
        assert (await a.get("k/1")).value == b"after"
    finally:
        await a.close()
        await b.close()


@pytest.mark.slow
async def test_a_database_restart_is_not_seen_by_callers(pg, pg_dsn):
    """Every pooled connection dies with the restart (AdminShutdown); the first call of each
    kind right after it works, the ones that may run twice by a retry on a new connection,
    the others by checking the connection first."""
    b = _postgres_backend(pg_dsn)
    b._pool_size = 4
    try:
        await asyncio.gather(*(b.put(f"k/{i}", b"v") for i in range(4)))  # fill the pool
        assert len(b._idle) >= 2
        pg.restart()
        assert (await b.get("k/0")).value == b"v"
        pg.restart()
        assert await b.create("k/new", b"n")
        pg.restart()
        assert await b.compare_and_swap("k/1", b"v", b"w")
        pg.restart()
        await b.append_audit_many([("e1", time.time(), "t", "a", b"d")])
        pg.restart()
        assert await b.delete("k/2")
        assert [i.key for i in await b.list("k/")] == ["k/0", "k/1", "k/3", "k/new"]
        assert len(await b.search_audit(None, None, [], "", None, 10)) == 1
    finally:
        await b.close()


@pytest.mark.slow
async def test_unreachable_database_is_a_one_line_error_without_the_password(pg):
    port = _free_port()
    b = _postgres_backend(f"host=127.0.0.1 port={port} dbname=x user=u password=Hunter2-secret connect_timeout=3")
    with pytest.raises(ConfigError) as exc:
        await b.get("x")
    msg = str(exc.value)
    assert "\n" not in msg and "Hunter2-secret" not in msg
    assert f"127.0.0.1:{port}" in msg and "conn_string" in msg
    await b.close()

    wrong = _postgres_backend(f"postgresql://postgres:Wrong-pass-99@127.0.0.1:{pg.port}/postgres")
    with pytest.raises(ConfigError) as exc:
        await wrong.start()
    msg = str(exc.value)
    assert "\n" not in msg and "Wrong-pass-99" not in msg
    assert f"127.0.0.1:{pg.port}" in msg and "password authentication failed" in msg
    await wrong.close()

    bad = _postgres_backend("host=127.0.0.1 password=Hunter2-secret this is not valid")
    with pytest.raises(ConfigError) as exc:
        await bad.start()
    assert "not a valid libpq connection string" in str(exc.value) and "Hunter2" not in str(exc.value)


# --- real auth processes on PostgreSQL ---------------------------------------------------------
def _cgctl(c, auth_proc, *args):
    from tests.helpers import run_cli

    return run_cli("cgctl", "--auth-server", f"127.0.0.1:{auth_proc.info['mesh_port']}",
                   "-i", auth_proc.info["admin_identity"], *args)


def _eventually(check, what: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, what
        time.sleep(0.2)


def _user_identity(dsn: str, path: Path, name: str, roles: list[str]) -> str:
    """A user identity file signed with the cluster's user CA, read from the shared database."""
    import datetime as dt

    from cachegate.types.v1 import types_pb2

    from services.common.creds import Creds
    from services.common.grpcutil import ts
    from services.common.pki import (
        CertAuthority,
        cert_from_pem,
        cert_to_pem,
        key_from_pem,
        key_to_pem,
        new_key,
    )

    with psycopg.connect(dsn) as conn:
        docs = {k: json.loads(v) for k, v in conn.execute(
            "SELECT key, value FROM cachegate_items WHERE key LIKE 'authorities/%'").fetchall()}
        cluster = conn.execute("SELECT value FROM cachegate_items WHERE key = 'cluster/name'").fetchone()[0]
    ca = CertAuthority(cert_from_pem(docs["authorities/user"]["cert_pem"]),
                       key_from_pem(docs["authorities/user"]["key_pem"].encode()))
    ident = types_pb2.Identity(kind=types_pb2.IDENTITY_KIND_USER, name=name, roles=roles,
                               cluster_name=bytes(cluster).decode(), issued_at=ts(time.time()))
    key = new_key()
    cert = ca.sign(key.public_key(), name, ident, dt.timedelta(hours=1))
    creds = Creds(key_pem=key_to_pem(key), cert_pem=cert_to_pem(cert),
                  host_ca_pem=docs["authorities/host"]["cert_pem"].encode())
    path.write_bytes(creds.identity_file_bytes())
    path.chmod(0o600)
    return str(path)


@pytest.mark.slow
def test_auth_processes_share_a_postgres_database(pg_dsn, tmp_path):
    from tests.helpers import Cluster, run_cli

    c = Cluster(tmp_path)
    storage = {"type": "postgres", "conn_string": pg_dsn}
    try:
        a = c.start_auth(storage=storage)
        # A second auth process: own data dir (host id, admin identity), same database.
        cfg2 = c.base(auth_service={"enabled": True, "cluster_name": "test-cluster", "listen_addr": "127.0.0.1:0",
                                    "join_listen_addr": "127.0.0.1:0", "storage": storage})
        cfg2["data_dir"] = str(tmp_path / "data2")
        b = c.proc("auth", cfg2, tag="auth2").start()
        assert a.info["ca_pin"] == b.info["ca_pin"]  # one cluster: the CAs live in the database

        token = c.cgctl("tokens", "add", "--type=db").stdout.strip()
        assert token
        listed_a = json.loads(_cgctl(c, a, "tokens", "ls", "--format=json").stdout)
        listed_b = json.loads(_cgctl(c, b, "tokens", "ls", "--format=json").stdout)
        assert len(listed_a) == 1 and listed_a == listed_b
        assert listed_a[0]["id"] in _cgctl(c, b, "tokens", "ls").stdout

        created = json.loads(_cgctl(c, b, "users", "add", "alice", "--roles=access", "--format=json").stdout)
        assert created["invite"]
        assert "alice" in _cgctl(c, a, "users", "ls").stdout
        _cgctl(c, a, "tokens", "rm", listed_a[0]["id"])
        assert json.loads(_cgctl(c, b, "tokens", "ls", "--format=json").stdout) == []

        # Roles are kept in memory by each process's admin check and updated by watching the
        # backend: a role created via b must reach a's admin check (only NOTIFY can tell it).
        reader = _user_identity(pg_dsn, tmp_path / "reader.pem", "reader", ["token-reader"])

        def reader_can_list_on_a() -> bool:
            return run_cli("cgctl", "--auth-server", f"127.0.0.1:{a.info['mesh_port']}", "-i", reader,
                           "tokens", "ls", "--format=json", check=False).returncode == 0

        assert not reader_can_list_on_a()
        role = tmp_path / "role.yaml"
        role.write_text("kind: role\nversion: v1\nmetadata: {name: token-reader}\n"
                        "spec:\n  allow:\n    rules:\n      - resources: [token]\n        verbs: [list]\n")
        _cgctl(c, b, "create", "-f", str(role))
        _eventually(reader_can_list_on_a, "a role created via the other auth process did not reach this one")
        _cgctl(c, b, "rm", "role/token-reader")
        _eventually(lambda: not reader_can_list_on_a(), "a role deleted via the other auth process still works")
    finally:
        c.stop()
    # The password is not logged.
    for p in c.procs.values():
        assert PG_PASSWORD not in p.output()


@pytest.mark.slow
def test_auth_with_unreachable_postgres_fails_with_one_line(tmp_path):
    from tests.helpers import Cluster

    c = Cluster(tmp_path)
    port = _free_port()
    cfg = c.base(auth_service={"enabled": True, "listen_addr": "127.0.0.1:0", "join_listen_addr": "127.0.0.1:0",
                               "storage": {"type": "postgres",
                                           "conn_string": f"host=127.0.0.1 port={port} password=Sekr1t-x"}})
    p = c.proc("auth", cfg).start(expect_fail=True)
    assert p.popen.wait(30) == 1
    out = p.output()
    errors = [line for line in out.splitlines() if line.startswith("ERROR:")]
    assert len(errors) == 1, out
    assert f"127.0.0.1:{port}" in errors[0] and "conn_string" in errors[0]
    assert "Sekr1t-x" not in out


@pytest.mark.slow
async def test_watch_users_on_one_auth_process_follows_user_changes_made_on_another(pg_dsn, tmp_path):
    """HA: dbproxy watches users on one auth process while an administrator changes them on
    another; the change arrives through PostgreSQL's notifications."""
    from cachegate.auth.v1 import user_service_pb2 as us
    from cachegate.types.v1 import types_pb2

    from services.auth.state import AuthState
    from services.common.config import load_config
    from tests.auth.conftest import Env

    envs = []
    for name in ("a", "b"):
        cfg = load_config(environ={}, data={"data_dir": str(tmp_path / name),
                                            "auth_service": {"cluster_name": "unit"}})
        backend = _postgres_backend(pg_dsn)
        state = AuthState(cfg, backend)
        await state.init()
        envs.append(Env(state))
    a, b = envs
    try:
        b.as_admin()
        await b.call(b.users.CreateUser, us.CreateUserRequest(user=types_pb2.User(name="alice", roles=["access"])))
        a.as_proxy()
        stream = a.users.WatchUsers(us.WatchUsersRequest(), a.ctx)

        async def nxt():
            return await asyncio.wait_for(stream.__anext__(), 10)

        assert [((e := await nxt()).type, e.user.name) for _ in range(2)] == [
            (types_pb2.WATCH_EVENT_TYPE_PUT, "alice"), (types_pb2.WATCH_EVENT_TYPE_INIT_DONE, "")]
        b.as_admin()
        await b.call(b.users.UpdateUser, us.UpdateUserRequest(
            user=types_pb2.User(name="alice", roles=["auditor"], db_names=["3"]), update_mask=["roles", "db_names"]))
        ev = await nxt()
        assert (ev.type, ev.user.name, list(ev.user.roles), list(ev.user.db_names)) == (
            types_pb2.WATCH_EVENT_TYPE_PUT, "alice", ["auditor"], ["3"])
        await b.call(b.users.DeleteUser, us.DeleteUserRequest(name="alice"))
        ev = await nxt()
        assert (ev.type, ev.user.name) == (types_pb2.WATCH_EVENT_TYPE_DELETE, "alice")
        await stream.aclose()
    finally:
        for e in envs:
            await e.backend.close()
