"""The query events the spool writes by hand in the protobuf wire format are exactly
what building AuditEvent messages would give (fields, masking, cutting, sizes)."""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest
from google.protobuf import json_format

from cachegate.auth.v1 import audit_service_pb2
from services.dbproxy.auditspool import AuditSpool, read_spool_file
from services.dbproxy.commands import audit_args, lookup
from services.dbproxy.resp import CommandParser, encode_command

BASE = {"session_id": str(uuid.uuid4()), "db_service": "cache-ü", "db_user": "default",
        "db_uri": "x.redis.cache.windows.net:6380"}

ARGVS = [
    [b"GET", b"k"],
    [b"get", b"lower"],
    [b"SET", b"k", b"v" * 125],
    [b"SET", b"k", b"v" * 126],
    [b"SET", b"k", b"v" * 127],
    [b"SET", b"k", b"v" * 128],
    [b"SET", b"k", b"v" * 256],
    [b"SET", b"k", b"v" * 257],
    [b"SET", b"k", b"x" * 100_000],
    [b"SET", "ключ-ü-€".encode(), "значение".encode() * 40],
    [b"SET", b"bad\xff\xfeutf8", b"\xc3"],
    [b"SET", b"k", ("é" * 200).encode()],  # cut in the middle of a character
    [b"SET", b"", b"\x00\x01\r\n"],
    [b"MSET"] + [b"k%d" % i for i in range(100)],
    [b"MSET"] + [b"k%d" % i for i in range(63)],
    [b"RPUSH", b"l"] + [b"y" * 256] * 63,  # fields over 16 KiB: 3-byte lengths
    [b"AUTH", b"secret-pw"],
    [b"AUTH", b"user", b"secret-pw"],
    [b"HELLO", b"3", b"AUTH", b"default", b"secret-pw", b"SETNAME", b"x"],
    [b"CONFIG", b"SET", b"requirepass", b"secret-pw"],
    [b"CONFIG", b"GET", b"maxmemory"],
    [b"ACL", b"SETUSER", b"bob", b"on", b">secret-pw"],
    [b"MIGRATE", b"h", b"1", b"k", b"0", b"100", b"AUTH", b"secret-pw"],
    [b"CLIENT", b"KILL", b"ID", b"1"],
    [b"client", b"list"],
    [b"XINFO", b"STREAM", b"s"],
    [b"NOSUCHCOMMAND", b"a"],
    [b"\xff\xfe"],
]


class Sink:
    def __init__(self, encoded: bool) -> None:
        self.encoded = encoded
        self.events: list = []

    async def send(self, batch) -> None:
        if self.encoded:
            assert isinstance(batch, bytes)
            batch = list(audit_service_pb2.EmitAuditEventsRequest.FromString(batch).events)
        self.events.extend(batch)


def _commands(argvs):
    parser = CommandParser()
    return parser.feed(b"".join(encode_command(*a) for a in argvs))


def _expected(argv, db, name=None, max_arg=256, max_args=64):
    cmd_name = argv[0].upper().decode("latin-1")
    return dict(BASE, db_name=str(db), command=name or lookup(cmd_name, argv).name,
                args=audit_args(cmd_name, argv, max_arg=max_arg, max_args=max_args))


@pytest.mark.parametrize("encoded", [False, True])
async def test_hand_encoded_query_events_match(tmp_path, encoded):
    sink = Sink(encoded)
    spool = AuditSpool(sink.send, tmp_path, cluster_name="prod-ü", flush_interval=0.01, encoded=encoded)
    await spool.start()
    stream = spool.query_stream("alice", "10.0.0.1:5000", BASE)
    cmds = _commands(ARGVS)
    assert len(cmds) == len(ARGVS)
    when = time.time()
    stream.commands(when, 3, cmds[:10])
    stream.query(when, 5, cmds[10], "SET", "")
    stream.query(when, 5, cmds[11], "SET", "command SET denied by role \"x\" (deny SET)")
    stream.commands(when + 1, 0, cmds[12:])
    small = spool.query_stream("bob", "", BASE, max_arg=8, max_args=3)
    small.commands(when, 0, cmds[:3] + cmds[9:10] + cmds[13:14])
    spool.emit("db.session.end", "alice", fields=dict(BASE, commands=3, reason="closed"))
    await spool.flush(5)
    await spool.close()

    evs = sink.events
    assert len(evs) == len(ARGVS) + 5 + 1
    queries, tail, end = evs[:len(ARGVS)], evs[len(ARGVS):-1], evs[-1]
    for i, (ev, argv) in enumerate(zip(queries, ARGVS)):
        db = 3 if i < 10 else 5 if i < 12 else 0
        assert ev.type == "db.session.query" and ev.code == "T5001I"
        assert ev.actor == "alice" and ev.source_addr == "10.0.0.1:5000" and ev.cluster_name == "prod-ü"
        assert json_format.MessageToDict(ev.fields) == _expected(argv, db), argv[:3]
        assert ev.success == (i != 11)
        assert ev.error == ("" if i != 11 else "command SET denied by role \"x\" (deny SET)")
        assert abs(ev.time.ToNanoseconds() / 1e9 - (when + (1 if i >= 12 else 0))) < 1e-6
        uuid.UUID(ev.id)
    assert len({e.id for e in evs}) == len(evs)
    for ev, argv in zip(tail, ARGVS[:3] + ARGVS[9:10] + ARGVS[13:14]):
        assert ev.actor == "bob" and ev.source_addr == ""
        assert json_format.MessageToDict(ev.fields) == _expected(argv, 0, max_arg=8, max_args=3)
    assert end.type == "db.session.end" and end.fields["commands"] == 3
    for ev in evs:
        assert "secret-pw" not in str(ev)
    # What goes to auth is a canonical request: serializing the parsed events again gives
    # the same messages.
    again = audit_service_pb2.EmitAuditEventsRequest(events=evs).SerializeToString()
    assert list(audit_service_pb2.EmitAuditEventsRequest.FromString(again).events) == evs


async def test_batches_split_by_bytes_and_spooled_in_order(tmp_path):
    sent: list = []
    up = [False]

    async def send(batch):
        if not up[0]:
            raise ConnectionError("down")
        sent.append(audit_service_pb2.EmitAuditEventsRequest.FromString(batch).events)

    spool = AuditSpool(send, tmp_path, flush_interval=0.01, retry_interval=0.05, max_batch_bytes=64 * 1024,
                       encoded=True)
    await spool.start()
    stream = spool.query_stream("alice", "", BASE)
    cmds = _commands([[b"SET", b"k%d" % i, b"v" * 300] for i in range(1000)])
    stream.commands(time.time(), 0, cmds)
    deadline = time.monotonic() + 5
    while spool.spooled < 1000:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.01)
    files = sorted(tmp_path.glob("*.batch"))
    assert len(files) > 1 and all(f.stat().st_size <= 64 * 1024 for f in files)
    assert [e.fields["args"][1] for f in files for e in read_spool_file(f)] == [f"k{i}" for i in range(1000)]
    up[0] = True
    while sum(len(b) for b in sent) < 1000 or list(tmp_path.glob("*.batch")):
        assert time.monotonic() < deadline
        await asyncio.sleep(0.01)
    assert [e.fields["args"][1] for b in sent for e in b] == [f"k{i}" for i in range(1000)]
    assert not list(tmp_path.glob("*.batch")) and spool.lost == 0
    await spool.close()


async def test_spool_files_of_the_earlier_format_are_delivered(tmp_path):
    import struct

    from cachegate.types.v1 import types_pb2

    ev = types_pb2.AuditEvent(id=str(uuid.uuid4()), type="db.session.query", actor="old")
    data = ev.SerializeToString()
    (tmp_path / "00000000000000000001-1-000001.batch").write_bytes(struct.pack(">I", len(data)) + data)
    got: list = []

    async def send(batch):
        got.extend(batch)

    spool = AuditSpool(send, tmp_path, flush_interval=0.01, retry_interval=0.01)
    await spool.start()
    deadline = time.monotonic() + 5
    while not got:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.01)
    assert got[0].actor == "old" and not list(tmp_path.glob("*.batch"))
    await spool.close()


@pytest.mark.parametrize("encoded", [False, True])
async def test_an_event_that_does_not_parse_is_counted_not_blocking(tmp_path, caplog, encoded):
    from services.dbproxy.auditspool import _frame

    got: list = []

    async def send(batch):
        if encoded:
            batch = audit_service_pb2.EmitAuditEventsRequest.FromString(batch).events  # as auth would
        got.extend(batch)

    spool = AuditSpool(send, tmp_path, encoded=encoded)
    stream = spool.query_stream("alice", "", BASE)
    stream.commands(time.time(), 0, _commands([[b"GET", b"a"], [b"GET", b"b"]]))
    good = spool._take()[0]
    bad = _frame(b"\x2a\x02\xff\xfe")  # actor: not UTF-8
    ok, kept = await spool._try_send([good[0], bad, good[1]])
    assert ok and len(kept) == 2 and spool.lost == 1 and spool.sent == 2
    assert [list(e.fields["args"]) for e in got] == [["GET", "a"], ["GET", "b"]]
    assert "AUDIT EVENT LOST" in caplog.text
