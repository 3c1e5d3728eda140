"""Auth's storage: a small key/value store plus the audit log table.

SQLite (a file in the data dir) is the default; PostgreSQL (HA) implements the
same interface. Values are bytes (JSON or serialized protobuf); items may
expire. Writes publish change events to in-process watchers.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import sqlite3
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

log = logging.getLogger("cachegate.auth.storage")


class StorageError(Exception):
    """The storage cannot do what was asked (full, read-only, failing disk): a one-line message
    for the caller that says what to do. gRPC handlers answer it as UNAVAILABLE."""

    def __init__(self, message: str):
        super().__init__(message)
        import grpc

        self.grpc_status = grpc.StatusCode.UNAVAILABLE


def sqlite_error(exc: sqlite3.Error, path: Path) -> StorageError:
    text = str(exc).lower()
    if "full" in text:
        msg = (f"auth's storage is full ({path.parent}): free space on that file system (or move "
               "auth_service.storage.path), then try again")
    elif "readonly" in text or "read-only" in text:
        msg = (f"auth's storage is read-only ({path.parent}): make that file system writable again "
               "(mounts, permissions), then try again")
    elif "locked" in text or "busy" in text:
        msg = f"auth's storage is busy ({path}): another process holds a lock on it; try again"
    elif "i/o" in text:
        msg = f"auth's storage failed with an I/O error ({path}): check the disk, then try again"
    else:
        msg = f"auth's storage failed ({path}): {' '.join(str(exc).split())}"
    return StorageError(msg)


# One audit event as the backends store it: (id, time, type, actor, serialized AuditEvent).
AuditRow = tuple[str, float, str, str, bytes]


@dataclass
class Item:
    key: str
    value: bytes
    expires: float | None = None


@dataclass
class Change:
    kind: str  # "put" | "delete" | "reset" (changes may have been missed: start over)
    key: str
    value: bytes | None


class Backend:
    """Interface. All methods are coroutines; keys are '/'-separated strings."""

    async def get(self, key: str) -> Item | None: ...
    async def put(self, key: str, value: bytes, expires: float | None = None) -> None: ...
    async def create(self, key: str, value: bytes, expires: float | None = None) -> bool: ...
    async def compare_and_swap(self, key: str, old: bytes, new: bytes, expires: float | None = None) -> bool: ...
    async def delete(self, key: str) -> bool: ...
    async def list(self, prefix: str, after: str = "", limit: int = 0) -> list[Item]: ...
    async def append_audit(self, event_id: str, when: float, type_: str, actor: str, data: bytes) -> None: ...

    async def append_audit_many(self, rows: Sequence[AuditRow]) -> None:
        """Store a batch of audit events, ``(id, time, type, actor, data)`` each, in one
        transaction: all of them or (raising) none. An id already stored, or repeated in
        ``rows``, is kept once (the first one stored wins), so a retried batch is not
        duplicated."""
        raise NotImplementedError(f"{type(self).__name__} does not store audit batches")

    async def search_audit(self, since: float | None, until: float | None, types: list[str], actor: str,
                           after: tuple[float, str] | None, limit: int,
                           desc: bool = False) -> list[tuple[float, str, bytes]]: ...
    async def close(self) -> None: ...

    # --- watchers -------------------------------------------------------------
    def _init_watchers(self) -> None:
        self._watchers: list[tuple[str, Callable[[Change], None]]] = []

    def subscribe(self, prefix: str, callback: Callable[[Change], None]) -> Callable[[], None]:
        entry = (prefix, callback)
        self._watchers.append(entry)
        return lambda: self._watchers.remove(entry) if entry in self._watchers else None

    def _notify_reset(self) -> None:
        """Tell every watcher that changes may have been missed (a storage listener was
        away): watch streams end so that their clients start over from the current state."""
        for prefix, cb in list(self._watchers):
            cb(Change("reset", prefix, None))

    def _notify(self, change: Change) -> None:
        for prefix, cb in list(self._watchers):
            if change.key.startswith(prefix):
                cb(change)


def audit_search_sql(table: str, ph: str, since, until, types, actor, after, limit,
                     desc: bool = False) -> tuple[str, list]:
    """The audit search query of both backends (``ph``: the driver's placeholder), oldest
    (``desc``: newest) first with a (time, id) cursor; a type ending in ``*`` is an exact,
    case-sensitive prefix."""
    sql = f"SELECT time, id, data FROM {table} WHERE 1=1"
    args: list = []
    if since is not None:
        sql += f" AND time >= {ph}"
        args.append(since)
    if until is not None:
        sql += f" AND time <= {ph}"
        args.append(until)
    if after is not None:
        op = "<" if desc else ">"
        sql += f" AND (time {op} {ph} OR (time = {ph} AND id {op} {ph}))"
        args += [after[0], after[0], after[1]]
    if actor:
        sql += f" AND actor = {ph}"
        args.append(actor)
    if types:
        parts = []
        for t in types:
            if t.endswith("*"):
                parts.append(f"substr(type, 1, {ph}) = {ph}")
                args += [len(t) - 1, t[:-1]]
            else:
                parts.append(f"type = {ph}")
                args.append(t)
        sql += " AND (" + " OR ".join(parts) + ")"
    sql += f" ORDER BY time DESC, id DESC LIMIT {ph}" if desc else f" ORDER BY time, id LIMIT {ph}"
    args.append(limit)
    return sql, args


class SQLiteBackend(Backend):
    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            self._open()
        except OSError as exc:
            if exc.errno == errno.EROFS:
                raise sqlite_error(sqlite3.OperationalError("readonly"), self.path) from None
            if exc.errno == errno.ENOSPC:
                raise sqlite_error(sqlite3.OperationalError("full"), self.path) from None
            raise StorageError(f"cannot open auth's storage {self.path}: {exc.strerror}; make "
                               f"{self.path.parent} writable by this user, or set auth_service.storage.path") from None
        except sqlite3.OperationalError as exc:
            raise sqlite_error(exc, self.path) from None
        self._init_watchers()

    def _open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        # Created 0600 before SQLite opens it (its -wal and -shm files take the same mode).
        os.close(os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600))
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None)
        self._insert_rows: dict[int, str] = {}
        self._max_params = min(self._db.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER), 32766)
        self.path.chmod(0o600)
        # 16 KiB pages (SQLite's default is 4): the audit table and its two indexes take
        # thousands of rows a second, and fuller pages split less often (about a tenth less
        # CPU per stored event). Only a new, empty database takes it; one made before keeps its size.
        self._db.execute("PRAGMA page_size=16384")
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("PRAGMA busy_timeout=5000")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS items (key TEXT PRIMARY KEY, value BLOB NOT NULL, expires REAL)")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS audit (id TEXT PRIMARY KEY, time REAL NOT NULL, type TEXT NOT NULL, "
            "actor TEXT NOT NULL, data BLOB NOT NULL)")
        self._db.execute("CREATE INDEX IF NOT EXISTS audit_time ON audit (time, id)")

    @contextmanager
    def _errors(self):
        """A failing storage as a StorageError that says what to do (logged once per call)."""
        try:
            yield
        except sqlite3.OperationalError as exc:
            err = sqlite_error(exc, self.path)
            log.error("%s", err)
            raise err from None

    def _live(self, row) -> Item | None:
        if row is None:
            return None
        key, value, expires = row
        if expires is not None and expires <= time.time():
            return None
        return Item(key, bytes(value), expires)

    async def get(self, key: str) -> Item | None:
        with self._lock, self._errors():
            row = self._db.execute("SELECT key, value, expires FROM items WHERE key=?", (key,)).fetchone()
        return self._live(row)

    async def put(self, key: str, value: bytes, expires: float | None = None) -> None:
        with self._lock, self._errors():
            self._db.execute("INSERT INTO items (key, value, expires) VALUES (?, ?, ?) "
                             "ON CONFLICT(key) DO UPDATE SET value=excluded.value, expires=excluded.expires",
                             (key, value, expires))
        self._notify(Change("put", key, value))

    async def create(self, key: str, value: bytes, expires: float | None = None) -> bool:
        now = time.time()
        with self._lock, self._errors():
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.execute("DELETE FROM items WHERE key=? AND expires IS NOT NULL AND expires<=?", (key, now))
                cur = self._db.execute("INSERT OR IGNORE INTO items (key, value, expires) VALUES (?, ?, ?)",
                                       (key, value, expires))
                self._db.execute("COMMIT")
            except BaseException:
                if self._db.in_transaction:  # SQLite may have rolled back already (a full disk)
                    self._db.execute("ROLLBACK")
                raise
        if cur.rowcount:
            self._notify(Change("put", key, value))
        return bool(cur.rowcount)

    async def compare_and_swap(self, key: str, old: bytes, new: bytes, expires: float | None = None) -> bool:
        with self._lock, self._errors():
            cur = self._db.execute("UPDATE items SET value=?, expires=? WHERE key=? AND value=?",
                                   (new, expires, key, old))
        if cur.rowcount:
            self._notify(Change("put", key, new))
        return bool(cur.rowcount)

    async def delete(self, key: str) -> bool:
        with self._lock, self._errors():
            cur = self._db.execute("DELETE FROM items WHERE key=?", (key,))
        if cur.rowcount:
            self._notify(Change("delete", key, None))
        return bool(cur.rowcount)

    async def list(self, prefix: str, after: str = "", limit: int = 0) -> list[Item]:
        hi = prefix + "\uffff"
        lo = max(prefix, after)
        op = ">" if after and after >= prefix else ">="
        # Expired items are left out in the query, so that a page of ``limit`` is full.
        sql = (f"SELECT key, value, expires FROM items WHERE key {op} ? AND key < ? "
               "AND (expires IS NULL OR expires > ?) ORDER BY key")
        args: list = [lo, hi, time.time()]
        if limit:
            sql += " LIMIT ?"
            args.append(limit)
        with self._lock, self._errors():
            rows = self._db.execute(sql, args).fetchall()
        return [i for i in (self._live(r) for r in rows) if i is not None]

    _INSERT_AUDIT = "INSERT OR IGNORE INTO audit (id, time, type, actor, data) VALUES (?, ?, ?, ?, ?)"

    async def append_audit(self, event_id: str, when: float, type_: str, actor: str, data: bytes) -> None:
        with self._lock, self._errors():
            self._db.execute(self._INSERT_AUDIT, (event_id, when, type_, actor, data))

    async def append_audit_many(self, rows: Sequence[AuditRow]) -> None:
        if not rows:
            return
        # In a thread: SQLite lets go of the GIL while it writes, so the event loop checks the
        # next batch (and answers logins) meanwhile instead of waiting for the commit.
        await asyncio.to_thread(self._append_audit_many, rows)

    def _insert_audit_rows(self, n: int) -> str:
        """``INSERT OR IGNORE`` of ``n`` rows in one statement (kept compiled by the driver)."""
        sql = self._insert_rows.get(n)
        if sql is None:
            sql = self._insert_rows[n] = (
                "INSERT OR IGNORE INTO audit (id, time, type, actor, data) VALUES " + ",".join(["(?,?,?,?,?)"] * n))
        return sql

    def _append_audit_many(self, rows: Sequence[AuditRow]) -> None:
        # The whole batch is one INSERT of many rows: one statement is one transaction in
        # autocommit mode (all or nothing), and the driver lets go of the GIL once for it. With
        # executemany it let go and took it back for every row, and each time it waited for the
        # event loop's thread to give it up: under load that made a row cost milliseconds.
        # The row count is rounded up (to a power of two up to 64, then to a multiple of 64) by
        # repeating the last row, which OR IGNORE stores once: a few statement shapes, cached.
        n = len(rows)
        size = 1 << (n - 1).bit_length() if n <= 64 else -(-n // 64) * 64
        with self._lock, self._errors():
            if size * 5 <= self._max_params:
                params = [x for row in rows for x in row]
                if size > n:
                    params += list(rows[-1]) * (size - n)
                self._db.execute(self._insert_audit_rows(size), params)
                return
            # More rows than one statement may bind: one transaction of chunks.
            chunk = self._max_params // 5
            self._db.execute("BEGIN IMMEDIATE")
            try:
                for k in range(0, n, chunk):
                    part = rows[k:k + chunk]
                    self._db.execute(self._insert_audit_rows(len(part)), [x for row in part for x in row])
                self._db.execute("COMMIT")
            except BaseException:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise

    async def search_audit(self, since, until, types, actor, after, limit, desc=False):
        sql, args = audit_search_sql("audit", "?", since, until, types, actor, after, limit, desc)
        with self._lock, self._errors():
            rows = self._db.execute(sql, args).fetchall()
        return [(r[0], r[1], bytes(r[2])) for r in rows]

    async def close(self) -> None:
        with self._lock, self._errors():
            self._db.close()


def open_backend(storage, data_dir: Path) -> Backend:
    if storage.type == "sqlite":
        return SQLiteBackend(storage.path or (data_dir / "cachegate.db"))
    from services.auth.pgbackend import PostgresBackend  # noqa: PLC0415 (optional HA backend)

    return PostgresBackend(storage.conn_string)

