"""Batched audit delivery with the on-disk spool (no processes)."""

from __future__ import annotations

import asyncio
import os
import time

from services.dbproxy.auditspool import AuditSpool, read_spool_file


class FlakySink:
    def __init__(self) -> None:
        self.up = True
        self.events: list = []
        self.calls = 0

    async def send(self, batch):
        self.calls += 1
        if not self.up:
            raise ConnectionError("down")
        self.events.extend(batch)


async def _until(pred, timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not pred():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.02)


async def test_batches_and_fields(tmp_path):
    sink = FlakySink()
    spool = AuditSpool(sink.send, tmp_path, batch_size=100, flush_interval=0.05, cluster_name="c1")
    await spool.start()
    for i in range(250):
        spool.emit("db.session.query", "alice", source_addr="1.2.3.4:5", fields={"n": i, "args": ["GET", "k"]})
    await _until(lambda: len(sink.events) == 250)
    assert sink.calls <= 5
    ev = sink.events[0]
    assert ev.type == "db.session.query" and ev.code == "T5001I" and ev.cluster_name == "c1" and ev.id
    assert [e.fields["n"] for e in sink.events] == list(range(250))
    assert list(ev.fields["args"]) == ["GET", "k"]
    await spool.close()


async def test_spools_while_down_and_delivers_in_order(tmp_path):
    sink = FlakySink()
    sink.up = False
    spool = AuditSpool(sink.send, tmp_path, batch_size=10, flush_interval=0.02, retry_interval=0.05)
    await spool.start()
    for i in range(30):
        spool.emit("db.session.query", "a", fields={"n": i})
    await _until(lambda: spool.spooled == 30)
    files = sorted(tmp_path.glob("*.batch"))
    assert files and sum(len(read_spool_file(f)) for f in files) == 30
    for i in range(30, 35):
        spool.emit("db.session.query", "a", fields={"n": i})
    await asyncio.sleep(0.1)
    sink.up = True
    await _until(lambda: len(sink.events) == 35)
    assert [e.fields["n"] for e in sink.events] == list(range(35))
    # A file goes once its send has returned: just after the sink has the events, not before.
    await _until(lambda: not list(tmp_path.glob("*.batch")))
    assert spool.lost == 0
    await spool.close()


async def test_spool_survives_restart(tmp_path):
    sink = FlakySink()
    sink.up = False
    spool = AuditSpool(sink.send, tmp_path, flush_interval=0.02)
    await spool.start()
    spool.emit("db.session.end", "a", fields={"commands": 3})
    await spool.close(timeout=2)
    assert list(tmp_path.glob("*.batch"))
    sink.up = True
    spool2 = AuditSpool(sink.send, tmp_path, flush_interval=0.02, retry_interval=0.05)
    await spool2.start()
    await _until(lambda: len(sink.events) == 1)
    assert sink.events[0].type == "db.session.end"
    await spool2.close()


async def test_overflow_spills_to_disk_not_memory(tmp_path):
    sink = FlakySink()
    spool = AuditSpool(sink.send, tmp_path, max_queue=50, flush_interval=10)
    await spool.start()
    for i in range(120):
        spool.emit("db.session.query", "a", fields={"n": i})
    assert spool.queued <= 50 and spool.spooling + spool.spooled >= 51  # at once: the rest left memory
    await spool.written()  # and the writer thread has put it on disk
    assert spool.spooled >= 51
    await spool.close()


async def test_unwritable_spool_is_logged_not_silent(tmp_path, caplog):
    sink = FlakySink()
    sink.up = False
    blocker = tmp_path / "file"
    blocker.write_text("x")
    spool = AuditSpool(sink.send, blocker / "spool", flush_interval=0.02)
    spool._wake = asyncio.Event()  # start() would fail on mkdir: drive it by hand
    spool.emit("db.session.query", "a")
    await spool.flush(5)
    assert spool.lost == 1
    assert "AUDIT EVENTS LOST" in caplog.text


async def test_a_batch_the_receiver_rejects_is_set_aside_and_later_events_flow(tmp_path, caplog):
    from services.dbproxy.auditspool import AuditRejected

    sink = FlakySink()

    async def send(batch):
        if any(e.fields["n"] < 5 for e in batch):  # the receiver refuses these, every time
            raise AuditRejected("event type not allowed")
        await sink.send(batch)

    spool = AuditSpool(send, tmp_path, batch_size=10, flush_interval=0.02, retry_interval=0.05)
    await spool.start()
    for i in range(5):
        spool.emit("db.session.query", "a", fields={"n": i})
    await _until(lambda: spool.rejected == 5)
    for i in range(5, 8):
        spool.emit("db.session.query", "a", fields={"n": i})
    await _until(lambda: len(sink.events) == 3)
    assert [e.fields["n"] for e in sink.events] == [5, 6, 7]
    aside = list(tmp_path.glob("*.rejected"))
    assert aside and sum(len(read_spool_file(f)) for f in aside) == 5  # kept, not dropped
    assert "AUDIT EVENTS REJECTED" in caplog.text and spool.lost == 0
    await spool.close()


async def test_spool_is_readable_by_its_owner_only(tmp_path):
    import os
    import stat

    mode = lambda p: stat.S_IMODE(p.stat().st_mode)  # noqa: E731
    spool_dir = tmp_path / "audit-spool"
    sink = FlakySink()
    sink.up = False
    spool = AuditSpool(sink.send, spool_dir, flush_interval=0.02, retry_interval=10)
    await spool.start()
    spool.emit("db.session.query", "alice", fields={"args": ["SET", "k", "secret value"]})
    await _until(lambda: spool.spooled == 1)
    assert mode(spool_dir) == 0o700
    [first] = list(spool_dir.glob("*.batch"))
    assert mode(first) == 0o600
    await spool.close(timeout=1)
    # A spool left world-readable (by an older version) is tightened on start.
    os.chmod(spool_dir, 0o755)
    os.chmod(first, 0o644)
    spool = AuditSpool(sink.send, spool_dir, flush_interval=0.02, retry_interval=10)
    await spool.start()
    assert mode(spool_dir) == 0o700 and mode(first) == 0o600
    await spool.close(timeout=1)


async def test_a_full_spool_drains_several_files_at_a_time_and_keeps_what_failed(tmp_path):
    # Under load a spool that drained one file per round trip fell behind the sessions and
    # spilled again and again; files now go max_in_flight at a time.
    in_flight, peak, got = [0], [0], []
    fail_n = {7}

    async def send(batch):
        in_flight[0] += 1
        peak[0] = max(peak[0], in_flight[0])
        try:
            await asyncio.sleep(0.02)
            ns = [e.fields["n"] for e in batch]
            if fail_n & set(ns):
                raise ConnectionError("one call fails")
            got.extend(ns)
        finally:
            in_flight[0] -= 1

    down = FlakySink()
    down.up = False
    spool = AuditSpool(down.send, tmp_path, batch_size=1, flush_interval=0.02, retry_interval=30)
    await spool.start()
    for i in range(20):  # one file each
        spool.emit("db.session.query", "a", fields={"n": i})
        await _until(lambda: spool.spooled == i + 1)
    await spool.close()
    assert len(list(tmp_path.glob("*.batch"))) == 20
    spool2 = AuditSpool(send, tmp_path, flush_interval=0.02, retry_interval=30, max_in_flight=4)
    await spool2.start()
    await _until(lambda: len(got) >= 4)
    await asyncio.sleep(0.3)
    # The first four went together; the chunk with the failing one stopped there, and its
    # file waits for the retry: nothing was dropped and nothing after it was reordered.
    assert peak[0] == 4
    assert sorted(got) == [0, 1, 2, 3, 4, 5, 6] and len(list(tmp_path.glob("*.batch"))) == 13
    fail_n.clear()
    await spool2.close(timeout=2)


def test_a_command_that_cannot_be_encoded_loses_only_its_own_events(tmp_path, caplog):
    from cachegate.auth.v1 import audit_service_pb2
    from services.common.auditwire import event_spans
    from services.dbproxy.resp import Command

    spool = AuditSpool(FlakySink().send, tmp_path, encoded=True)
    s = spool.query_stream("alice", "127.0.0.1:1", {"session_id": "s1"})
    good = Command([b"GET", b"k"], b"", "GET")
    bad = Command([b"GET", 7], b"", "GET")  # not bytes: a bug upstream of the encoder
    s.commands(1.0, 0, [good, good])
    s.commands(2.0, 0, [bad, good])
    s.commands(3.0, 1, [good])
    s.query(4.0, 0, good, "GET", "denied")
    s.commands(5.0, 0, [good])
    batches = spool._take()
    data = b"".join(b"".join(b) for b in batches)
    assert len(event_spans(data)) == 5
    events = audit_service_pb2.EmitAuditEventsRequest.FromString(data).events
    assert [e.time.seconds for e in events] == [1, 1, 3, 4, 5]  # in order, the bad entry's two gone
    assert [e.success for e in events] == [True, True, True, False, True]
    assert len({e.id for e in events}) == 5
    assert spool.lost == 2 and spool.queued == 0
    assert "AUDIT EVENTS LOST: 2 events" in caplog.text


async def test_a_long_queue_is_encoded_a_batch_at_a_time_with_the_sessions_running_between(tmp_path):
    """When auth fell behind, tens of thousands of events wait: encoding them all in one turn
    of the event loop held every session up for 100 ms and more. Each batch is encoded when it
    can go, and the loop runs between two batches."""
    from services.dbproxy.resp import Command

    sink = FlakySink()
    spool = AuditSpool(sink.send, tmp_path, batch_size=500, max_batch_events=500, max_in_flight=2,
                       flush_interval=10, max_queue=100_000)
    await spool.start()
    stream = spool.query_stream("alice", "1.2.3.4:5", {"session_id": "s", "db_service": "d"})
    get = Command([b"GET", b"k"], b"", "GET")
    for _ in range(8_000):  # what the sessions queued while a batch was on its way
        stream.commands(1.0, 0, [get])
    ticks = 0
    seen: list[int] = []
    take = spool._take

    def counted_take():
        seen.append(ticks)
        return take()

    spool._take = counted_take

    async def session():
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0)

    other = asyncio.create_task(session())
    await spool.flush(30)
    other.cancel()
    assert len(sink.events) == 8_000 and spool.lost == 0
    assert len(seen) >= 16  # 500 events a batch
    # Between any two batches the other task ran: no turn of the loop encoded two.
    assert all(b > a for a, b in zip(seen, seen[1:])), seen
    await spool.close()


async def test_an_overflowing_queue_spills_its_oldest_events_not_all_of_them(tmp_path):
    sink = FlakySink()
    sink.up = False
    spool = AuditSpool(sink.send, tmp_path, batch_size=100, max_batch_events=100, max_queue=1_000,
                       flush_interval=10)
    await spool.start()
    for i in range(1_500):
        spool.emit("db.session.query", "a", fields={"n": i})
    # Only what went past the bound went to disk, a batch at a time, oldest first (its files
    # are on their way to the disk: the writer thread's).
    assert spool.queued <= 1_000 and spool.queued + spool.spooling + spool.spooled == 1_500
    assert spool.spooling + spool.spooled <= 600
    await spool.written()
    first = sorted(tmp_path.glob("*.batch"))[0]
    assert [e.fields["n"] for e in read_spool_file(first)][:3] == [0, 1, 2]
    sink.up = True
    await spool.close()


async def test_a_slow_disk_holds_up_neither_the_sessions_nor_the_delivery(tmp_path, monkeypatch):
    # An fsync of 0.3 s (a slow cloud disk). Each spool file was written on the event loop's
    # thread: five of them held every session for 1.5 s.
    real_fsync = os.fsync

    def slow_fsync(fd):
        time.sleep(0.3)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", slow_fsync)
    sink = FlakySink()
    sink.up = False
    spool = AuditSpool(sink.send, tmp_path, batch_size=100, max_batch_events=100, max_queue=100,
                       flush_interval=10)
    await spool.start()
    lags: list[float] = []

    async def ticker() -> None:  # what a session waits for its turn meanwhile
        while True:
            t = time.monotonic()
            await asyncio.sleep(0.01)
            lags.append(time.monotonic() - t - 0.01)

    tick = asyncio.create_task(ticker())
    started = time.monotonic()
    for i in range(600):  # five batches past the bound of 100
        spool.emit("db.session.query", "a", fields={"n": i})
        if i % 50 == 0:
            await asyncio.sleep(0)
    assert time.monotonic() - started < 0.25
    assert spool.queued <= 100
    await spool.written()
    tick.cancel()
    # The five batches past the bound, and what the delivery task spooled meanwhile (auth down).
    assert spool.spooled >= 500 and spool.spooled + spool.queued == 600 and spool.lost == 0
    assert max(lags) < 0.2, max(lags)
    assert len(list(tmp_path.glob("*.batch"))) >= 5
    sink.up = True
    await spool.close()
    assert sorted(e.fields["n"] for e in sink.events) == list(range(600))
    assert not list(tmp_path.glob("*.batch"))


async def test_large_commands_waiting_for_a_slow_auth_are_bounded_by_their_bytes(tmp_path):
    """A query event keeps its command until it is encoded. Sessions sending large values
    while auth hangs made the queue hold every byte of them, up to 50,000 commands (50 GB of
    1 MiB values); past ``max_queue_bytes`` the oldest now go to disk, cut to ``max_arg``."""
    from services.dbproxy.resp import CommandParser

    release = asyncio.Event()
    got: list = []

    async def hung(batch):  # auth accepts the call and does not answer
        await release.wait()
        got.append(batch)

    spool = AuditSpool(hung, tmp_path, encoded=True, max_queue_bytes=4 << 20, flush_interval=30)
    await spool.start()
    stream = spool.query_stream("alice", "127.0.0.1:1", {"session_id": "s1"})
    parser = CommandParser()
    value = b"v" * (100 << 10)
    for i in range(200):  # 20 MB of SETs
        (cmd,) = parser.feed(b"*3\r\n$3\r\nSET\r\n$%d\r\nk%05d\r\n$%d\r\n%s\r\n" % (6, i, len(value), value))
        stream.commands(time.time(), 0, [cmd], len(cmd.raw))
        assert spool.queued_bytes <= (4 << 20) + len(cmd.raw)
        await asyncio.sleep(0)  # the sender's turn
    await spool.written()
    assert spool.spooled > 100  # the rest: in memory, or in the batches auth holds
    files = sorted(tmp_path.glob("*.batch"))
    assert sum(f.stat().st_size for f in files) < spool.spooled * 1024  # cut to max_arg, not 100 KiB each
    first = read_spool_file(files[0])[0]
    assert first.fields["args"][2].startswith("v" * 200) and len(first.fields["args"][2]) < 300
    release.set()
    await spool.close(timeout=10)
    assert spool.sent == 200 and spool.lost == 0 and spool.queued_bytes == 0
