"""AuditService: batches from other services, and search."""

from __future__ import annotations

import sqlite3
import time
import uuid

import grpc
import pytest
from cachegate.auth.v1 import audit_service_pb2 as au
from cachegate.types.v1 import types_pb2
from google.protobuf import struct_pb2

from services.auth.audit import AuditLog
from services.auth.backend import SQLiteBackend
from services.common.grpcutil import from_ts, ts


def event(type_="db.session.query", actor="alice", when=None, id_="", **fields) -> types_pb2.AuditEvent:
    st = struct_pb2.Struct()
    st.update(fields)
    ev = types_pb2.AuditEvent(id=id_, type=type_, actor=actor, source_addr="198.51.100.9", success=True, fields=st)
    if when is not None:
        ev.time.CopyFrom(ts(when))
    return ev


async def search(env, **kw) -> au.SearchAuditEventsResponse:
    env.as_admin()
    return await env.call(env.audit.SearchAuditEvents, au.SearchAuditEventsRequest(**kw))


async def test_batch_is_stored_as_given_with_server_checked_ids(env):
    env.as_proxy()
    given = str(uuid.uuid4())
    t0 = time.time() - 60
    resp = await env.call(env.audit.EmitAuditEvents, au.EmitAuditEventsRequest(events=[
        event(id_=given, when=t0, command="GET", db="redis1"),
        event(type_="db.session.start", actor="bob"),
    ]))
    assert resp.stored == 2
    found = (await search(env, types=["db.session.*"])).events
    assert len(found) == 2
    first = found[0]
    assert first.id == given and from_ts(first.time) == pytest.approx(t0, abs=0.001)
    assert first.actor == "alice" and first.source_addr == "198.51.100.9" and first.fields["command"] == "GET"
    assert first.code == "T5001I" and first.cluster_name == "unit"
    second = found[1]
    assert uuid.UUID(second.id) and from_ts(second.time) > t0  # id and time set by the server
    # a retried batch (same ids) is stored once
    env.as_proxy()
    await env.call(env.audit.EmitAuditEvents, au.EmitAuditEventsRequest(events=[
        event(id_=given, when=t0, command="GET")]))
    assert len((await search(env, types=["db.session.query"])).events) == 1


async def test_a_complete_event_is_stored_as_the_bytes_sent_and_the_others_filled_in(env):
    """Auth keeps a complete event's own bytes (no serializing again) and fills in only
    what is missing or not its own; a sender cannot claim another cluster's name."""
    env.as_proxy()
    complete = event(id_=str(uuid.uuid4()), when=time.time() - 5, command="SET")
    complete.code, complete.cluster_name = "T5001I", "unit"
    foreign = event(id_=str(uuid.uuid4()).upper(), when=time.time() - 4, command="DEL")
    foreign.code, foreign.cluster_name = "T5001I", "someone-else"
    missing = event(command="GET")
    sent = complete.SerializeToString()
    req = au.EmitAuditEventsRequest(events=[complete, foreign, missing]).SerializeToString()
    assert (await env.call(env.audit.EmitAuditEvents, req)).stored == 3
    rows = await env.state.backend.search_audit(None, None, ["db.session.query"], "", None, 10)
    stored = {}
    for _when, event_id, data in rows:
        stored[event_id] = (data, types_pb2.AuditEvent.FromString(data))
    assert stored[complete.id][0] == sent
    got_foreign = stored[foreign.id.lower()][1]
    assert got_foreign.cluster_name == "unit" and got_foreign.fields["command"] == "DEL"
    (got_missing,) = [ev for _d, ev in stored.values() if ev.fields["command"] == "GET"]
    assert got_missing.code == "T5001I" and got_missing.cluster_name == "unit" and got_missing.HasField("time")
    # bytes that are no batch at all: one line, nothing stored
    err = await env.fails(env.audit.EmitAuditEvents, b"\x0a\x05abc")
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT and "not a valid EmitAuditEventsRequest" in err.details
    assert len(await env.state.backend.search_audit(None, None, [], "", None, 10)) == 3


def complete(type_="db.session.query", when=None, **fields) -> types_pb2.AuditEvent:
    """An event as dbproxy sends it: nothing left for auth to fill in."""
    ev = event(type_=type_, id_=str(uuid.uuid4()), when=when or time.time() - 1, **fields)
    ev.code, ev.cluster_name = "T5001I", "unit"
    return ev


async def test_a_batch_of_complete_events_is_stored_as_sent_and_still_checked_event_by_event(env):
    """A batch in which every event is complete is checked a field at a time over the whole
    batch: the same checks, the same refusals (naming the event), the bytes as sent."""
    evs = [complete(n=i) for i in range(3)]
    env.as_proxy()
    assert (await env.call(env.audit.EmitAuditEvents, au.EmitAuditEventsRequest(events=evs))).stored == 3
    rows = await env.state.backend.search_audit(None, None, [], "", None, 10)
    assert sorted(data for _w, _id, data in rows) == sorted(ev.SerializeToString() for ev in evs)
    one, two, upper = str(uuid.uuid4()), str(uuid.uuid4()), str(uuid.uuid4())
    for bad, expect in [
        # two canonical ids in one, newline-joined: the batch's ids joined look canonical
        ({"id": one + "\n" + two}, "event 1: id"),
        ({"id": upper.upper()}, None),  # not canonical: filled in (made canonical), not refused
        ({"type": "user.login"}, "event 1: events of type user.login are recorded by auth itself"),
        ({"type": "db.session.query\n"}, "event 1: invalid event type"),
        ({"big": "x" * (256 * 1024)}, "event 1: event is larger than 256 KiB"),
    ]:
        batch = [complete(), complete(big=bad.pop("big")) if "big" in bad else complete(), complete()]
        for k, v in bad.items():
            setattr(batch[1], k, v)
        env.as_proxy()
        if expect is None:
            assert (await env.call(env.audit.EmitAuditEvents, au.EmitAuditEventsRequest(events=batch))).stored == 3
            continue
        err = await env.fails(env.audit.EmitAuditEvents, au.EmitAuditEventsRequest(events=batch))
        assert err.code == grpc.StatusCode.INVALID_ARGUMENT and err.details.startswith(expect), (bad, err.details)
    stored = {event_id for _w, event_id, _d in await env.state.backend.search_audit(None, None, [], "", None, 20)}
    assert upper in stored and not {one, two} & stored
    assert len(stored) == 6  # the first batch and the one with an id filled in; nothing of the refused


async def test_bad_batches_are_refused_whole(env):
    env.as_proxy()
    for bad, expect in [
        (event(id_="not-a-uuid"), "is not a UUID"),
        (event(type_="user.login"), "recorded by auth itself"),
        (event(type_="lock.delete"), "recorded by auth itself"),
        (event(type_="Bad Type"), "invalid event type"),
        (event(type_=""), "invalid event type"),
    ]:
        err = await env.fails(env.audit.EmitAuditEvents, au.EmitAuditEventsRequest(events=[event(), bad]))
        assert err.code == grpc.StatusCode.INVALID_ARGUMENT and expect in err.details, (bad, err.details)
    assert (await search(env)).events == []  # nothing of a refused batch was stored


async def test_repeated_ids_are_stored_once_within_a_batch_and_across_batches(env):
    env.as_proxy()
    a, b, c = (str(uuid.uuid4()) for _ in range(3))
    t0 = time.time() - 60
    resp = await env.call(env.audit.EmitAuditEvents, au.EmitAuditEventsRequest(events=[
        event(id_=a, when=t0, n=0), event(id_=b, when=t0 + 1, n=1),
        event(id_=a.upper(), when=t0 + 2, n=2),  # the same UUID, written differently
        event(id_="{" + b + "}", when=t0 + 3, n=3)]))
    assert resp.stored == 4  # all were taken (and are safely stored), duplicates once
    env.as_proxy()
    await env.call(env.audit.EmitAuditEvents, au.EmitAuditEventsRequest(events=[
        event(id_=b, when=t0 + 4, n=4), event(id_=c, when=t0 + 5, n=5)]))
    found = (await search(env, types=["db.session.query"])).events
    assert [(e.id, int(e.fields["n"])) for e in found] == [(a, 0), (b, 1), (c, 5)]  # the first stored wins


async def test_a_bad_event_in_the_middle_refuses_the_whole_batch(env):
    env.as_proxy()
    evs = [event(id_=str(uuid.uuid4()), n=i) for i in range(5)]
    evs[2].id = "0" * 31
    err = await env.fails(env.audit.EmitAuditEvents, au.EmitAuditEventsRequest(events=evs))
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT
    assert err.details == f"event 2: id {'0' * 31!r} is not a UUID (leave it empty to have one set)"
    evs[2].id = ""
    evs[3].type = "db.session.query\n"  # not a dotted lower-case name, even with the newline at the end
    err = await env.fails(env.audit.EmitAuditEvents, au.EmitAuditEventsRequest(events=evs))
    assert err.details.startswith("event 3: invalid event type")
    evs[3].type = "role.put"
    err = await env.fails(env.audit.EmitAuditEvents, au.EmitAuditEventsRequest(events=evs))
    assert err.details == "event 3: events of type role.put are recorded by auth itself"
    evs[3].type = "db.session.query"
    evs[4].fields["big"] = "x" * (256 * 1024)
    err = await env.fails(env.audit.EmitAuditEvents, au.EmitAuditEventsRequest(events=evs))
    assert err.details == "event 4: event is larger than 256 KiB: shorten its fields"
    assert (await search(env)).events == []  # nothing of a refused batch was stored


async def test_check_batch_leaves_the_callers_events_alone_unless_in_place(env):
    given = [event(), event(id_=str(uuid.uuid4()).upper())]
    before = [e.SerializeToString() for e in given]
    checked = env.state.audit.check_batch(given)
    assert [e.SerializeToString() for e in given] == before
    assert all(e.cluster_name == "unit" and e.code == "T5001I" and e.id == str(uuid.UUID(e.id)) for e in checked)
    filled = env.state.audit.check_batch(given, in_place=True)
    assert [e.SerializeToString() for e in filled] == [e.SerializeToString() for e in given]
    assert given[1].id == given[1].id.lower() and given[0].cluster_name == "unit" and given[0].HasField("time")


async def test_storage_failure_in_the_middle_of_a_batch_stores_nothing_of_it(env):
    ids = [str(uuid.uuid4()) for _ in range(5)]
    env.backend._db.execute(f"CREATE TRIGGER fail_audit BEFORE INSERT ON audit WHEN NEW.id = '{ids[3]}' "
                            "BEGIN SELECT RAISE(ABORT, 'disk full'); END")
    env.as_proxy()
    req = au.EmitAuditEventsRequest(events=[event(id_=i) for i in ids])
    err = await env.fails(env.audit.EmitAuditEvents, req)
    assert err.code == grpc.StatusCode.UNAVAILABLE and "send them again" in err.details
    assert (await search(env)).events == []
    env.backend._db.execute("DROP TRIGGER fail_audit")
    env.as_proxy()
    assert (await env.call(env.audit.EmitAuditEvents, req)).stored == 5  # the sender's retry
    assert [e.id for e in (await search(env, types=["db.*"])).events] == ids


class BrokenBackend(SQLiteBackend):
    async def append_audit(self, *a, **kw):
        raise OSError("disk full")

    async def append_audit_many(self, *a, **kw):
        raise OSError("disk full")


async def test_storage_failure_is_an_error_not_a_silent_drop(env, tmp_path):
    env.state.audit.backend = BrokenBackend(tmp_path / "broken.db")
    env.as_proxy()
    err = await env.fails(env.audit.EmitAuditEvents, au.EmitAuditEventsRequest(events=[event()]))
    assert err.code == grpc.StatusCode.UNAVAILABLE
    assert "could not store the audit events" in err.details and "send them again" in err.details


async def test_search_filters_and_pages(env):
    env.as_proxy()
    base = time.time() - 1000
    evs = [event(type_="db.session.start" if i % 3 == 0 else "db.session.query",
                 actor="alice" if i % 2 == 0 else "bob", when=base + i, n=i) for i in range(10)]
    await env.call(env.audit.EmitAuditEvents, au.EmitAuditEventsRequest(events=evs))

    got, token = [], ""
    while True:
        page = await search(env, types=["db.*"], page_size=3, page_token=token)
        assert len(page.events) <= 3
        got += [int(e.fields["n"]) for e in page.events]
        token = page.next_page_token
        if not token:
            break
    assert got == list(range(10))  # oldest first, nothing lost or repeated across pages

    assert [int(e.fields["n"]) for e in (await search(env, user="bob", types=["db.*"])).events] == [1, 3, 5, 7, 9]
    starts = (await search(env, types=["db.session.start"])).events
    assert [int(e.fields["n"]) for e in starts] == [0, 3, 6, 9]
    window = await search(env, since=ts(base + 2), until=ts(base + 4.5), types=["db.*"])
    assert [int(e.fields["n"]) for e in window.events] == [2, 3, 4]

    err = await env.fails(env.audit.SearchAuditEvents, au.SearchAuditEventsRequest(page_token="garbage!"))
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT and "page_token" in err.details
    err = await env.fails(env.audit.SearchAuditEvents, au.SearchAuditEventsRequest(since=ts(base + 5), until=ts(base)))
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT and "until is before since" in err.details


async def test_auth_events_carry_time_actor_source_and_unique_id(env):
    env.as_admin("10.9.9.9")
    from cachegate.auth.v1 import user_service_pb2 as us

    await env.call(env.users.CreateUser, us.CreateUserRequest(user=types_pb2.User(name="alice", roles=["access"])))
    await env.call(env.users.CreateUser, us.CreateUserRequest(user=types_pb2.User(name="bob", roles=["access"])))
    evs = (await search(env, types=["user.create"])).events
    assert len(evs) == 2 and len({e.id for e in evs}) == 2
    for e in evs:
        assert e.actor == "cachegate-admin" and e.source_addr == "10.9.9.9" and e.code == "T2001I"
        assert abs(from_ts(e.time) - time.time()) < 30


async def test_a_new_database_has_16_kib_pages_and_one_made_before_keeps_its_own(tmp_path):
    """Fuller pages for the audit table's inserts; a database of an earlier version (4 KiB
    pages, SQLite's default) opens, stores and finds events as before."""
    def page_size(path) -> int:
        with sqlite3.connect(path) as db:
            return db.execute("PRAGMA page_size").fetchone()[0]

    new = SQLiteBackend(tmp_path / "new.db")
    await new.close()
    assert page_size(tmp_path / "new.db") == 16384
    with sqlite3.connect(tmp_path / "old.db") as db:  # what an earlier auth left
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("CREATE TABLE audit (id TEXT PRIMARY KEY, time REAL NOT NULL, type TEXT NOT NULL, "
                   "actor TEXT NOT NULL, data BLOB NOT NULL)")
    assert page_size(tmp_path / "old.db") == 4096
    old = SQLiteBackend(tmp_path / "old.db")
    try:
        log = AuditLog(old, "unit")
        assert await log.ingest_serialized(au.EmitAuditEventsRequest(events=[complete(), complete()]).SerializeToString()) == 2
        assert len(await old.search_audit(None, None, [], "", None, 10)) == 2
    finally:
        await old.close()
    assert page_size(tmp_path / "old.db") == 4096
