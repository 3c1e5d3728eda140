"""The sans-io session core, driven with byte strings: no sockets, no event loop."""

from __future__ import annotations

import random

import pytest

from services.common.rbac import BUILTIN_ROLES, RoleSet, load_role_yaml
from services.dbproxy.resp import encode_command
from services.dbproxy.sessioncore import SessionCore

C = encode_command

LIMITED = load_role_yaml("""
kind: role
version: v1
metadata: {name: limited}
spec:
  allow:
    db_labels: {'*': '*'}
    db_users: ['*']
    db_names: ['0', '1']
    db_commands: ['*']
  deny:
    db_commands: [FLUSHALL]
""")


class Recorder:
    def __init__(self) -> None:
        self.events: list[tuple[str, str]] = []
        self.held = 0  # the bytes of the commands given, as the core counted them

    def commands(self, when, logical_db, cmds, size=-1):
        assert size == sum(len(c.raw) for c in cmds)
        self.held += size
        self.events += [(c.name, "") for c in cmds]

    def query(self, when, logical_db, cmd, name, error=""):
        self.events.append((name, error))


OPS = load_role_yaml("""
kind: role
version: v1
metadata: {name: ops}
spec:
  allow:
    db_labels: {'*': '*'}
    db_users: ['*']
    db_names: ['*']
    db_commands: [MONITOR]
""")


def core(roles=("access",), db_names=("*",)) -> tuple[SessionCore, Recorder]:
    rec = Recorder()
    known = {"access": BUILTIN_ROLES["access"], "limited": LIMITED, "ops": OPS}
    rs = RoleSet([known[r] for r in roles],
                 {"db_users": ["*"], "db_names": list(db_names)})
    c = SessionCore(database="d", db_user="default", db_name="", roles=rs, db_labels={}, queries=rec)
    c.upstream_auth, c.client_id = C("AUTH", "secret"), 7
    return c, rec


def test_allowed_commands_are_forwarded_unchanged_and_replies_pass_through():
    c, rec = core()
    data = C("SET", "k", "v") + C("GET", "k")
    assert c.feed_client(data) == (data, b"")
    assert not c.idle
    assert c.feed_upstream(b"+OK\r\n$1\r\nv\r\n") == b"+OK\r\n$1\r\nv\r\n"
    assert c.idle and rec.events == [("SET", ""), ("GET", "")]


def test_a_denied_command_gets_its_error_in_its_place():
    c, rec = core(roles=("limited",))
    up, down = c.feed_client(C("GET", "a") + C("FLUSHALL") + C("GET", "b"))
    assert up == C("GET", "a") + C("GET", "b") and down == b""
    out = c.feed_upstream(b"$1\r\n1\r\n") + c.feed_upstream(b"$1\r\n2\r\n")
    assert out.startswith(b"$1\r\n1\r\n-ERR command FLUSHALL denied") and out.endswith(b"$1\r\n2\r\n")
    assert [e[0] for e in rec.events] == ["GET", "FLUSHALL", "GET"] and rec.events[1][1]
    # Nothing pending: the error goes out at once.
    assert c.feed_client(C("FLUSHALL"))[1].startswith(b"-ERR command FLUSHALL denied")


@pytest.mark.parametrize("protocol", [2, 3])
def test_config_get_is_redacted_at_every_split(protocol):
    if protocol == 2:
        reply = b"*4\r\n$11\r\nrequirepass\r\n$6\r\nsecret\r\n$4\r\nsave\r\n$0\r\n\r\n"
    else:
        reply = b"%2\r\n$11\r\nrequirepass\r\n$6\r\nsecret\r\n$4\r\nsave\r\n$0\r\n\r\n"
    for cut in range(1, len(reply)):
        c, _ = core()
        c.feed_client(C("CONFIG", "GET", "*") + C("PING"))
        out = c.feed_upstream(reply[:cut]) + c.feed_upstream(reply[cut:] + b"+PONG\r\n")
        assert b"secret" not in out and b"<redacted>" in out and out.endswith(b"+PONG\r\n"), cut
        assert c.idle


def test_client_list_keeps_the_own_line():
    c, _ = core()
    c.feed_client(C("CLIENT", "LIST"))
    text = b"id=5 name=other\nid=7 name=me\n"
    out = c.feed_upstream(b"$%d\r\n%s\r\n" % (len(text), text))
    assert out == b"$13\r\nid=7 name=me\n\r\n"


def test_quit_and_protocol_errors_end_after_the_replies_due():
    c, _ = core()
    up, down = c.feed_client(C("GET", "a") + C("QUIT"))
    assert up == C("GET", "a") and c.ending is not None and c.ending.after_replies
    assert c.feed_upstream(b"$-1\r\n") == b"$-1\r\n+OK\r\n"
    errors = []
    c2 = SessionCore(database="d", db_user="default", db_name="", roles=core()[0].roles, db_labels={},
                     queries=Recorder(), on_protocol_error=lambda db, e: errors.append(e))
    up, down = c2.feed_client(C("PING") + b"*abc\r\n")
    assert up == C("PING") and c2.ending.reason.startswith("protocol error")
    assert c2.feed_upstream(b"+PONG\r\n") == b"+PONG\r\n-ERR Protocol error: invalid multibulk length\r\n"
    assert errors == ["protocol error: invalid multibulk length"]


def test_client_reply_off_expects_no_replies_and_gives_none():
    c, rec = core(roles=("limited",))
    up, down = c.feed_client(C("CLIENT", "REPLY", "OFF") + C("SET", "k", "1") + C("FLUSHALL")
                             + C("CLIENT", "REPLY", "ON"))
    assert b"FLUSHALL" not in up and down == b""
    assert c.feed_upstream(b"+OK\r\n") == b"+OK\r\n" and c.idle
    assert ("FLUSHALL", 'command FLUSHALL denied by role "limited" (deny FLUSHALL)') in rec.events


def test_reset_authenticates_again_silently():
    c, _ = core()
    up, _ = c.feed_client(C("RESET"))
    assert up == C("RESET") + C("AUTH", "secret")
    assert c.feed_upstream(b"+RESET\r\n+OK\r\n") == b"+RESET\r\n" and c.idle


def test_update_access_narrows_the_next_command():
    c, _ = core()
    assert c.feed_client(C("FLUSHALL"))[0] == C("FLUSHALL")
    c.feed_upstream(b"+OK\r\n")
    narrowed = RoleSet([LIMITED], {"db_users": ["*"], "db_names": ["*"]})
    assert c.update_access(narrowed, {})
    up, down = c.feed_client(C("FLUSHALL"))
    assert up == b"" and down.startswith(b"-ERR command FLUSHALL denied")



NO_GET = load_role_yaml("""
kind: role
version: v1
metadata: {name: no-get}
spec:
  allow:
    db_labels: {'*': '*'}
    db_users: ['*']
    db_names: ['*']
    db_commands: ['*']
  deny:
    db_commands: [GET]
""")


def test_a_command_allowed_before_is_checked_again_once_the_roles_change():
    c, rec = core()
    for _ in range(3):  # allowed plain commands are remembered by name after the first
        assert c.feed_client(C("GET", "k"))[0] == C("GET", "k")
        assert c.feed_upstream(b"$-1\r\n") == b"$-1\r\n"
    assert c.update_access(RoleSet([NO_GET], {"db_users": ["*"], "db_names": ["*"]}), {})
    up, down = c.feed_client(C("GET", "k"))
    assert up == b"" and down.startswith(b"-ERR command GET denied")
    assert c.feed_client(C("SET", "k", "v"))[0] == C("SET", "k", "v")
    assert rec.events[-2][0] == "GET" and rec.events[-2][1]  # audited as denied


# -- re-authentication in band (Entra ID tokens) ---------------------------------------------

AUTH2 = C("AUTH", "oid", "token-2")


def test_reauth_when_plain_is_invisible_to_the_client():
    c, _ = core()
    assert c.feed_client(C("GET", "k")) == (C("GET", "k"), b"")
    assert c.reauth(AUTH2) == AUTH2
    assert c.feed_upstream(b"$1\r\nv\r\n+OK\r\n") == b"$1\r\nv\r\n" and c.idle
    assert c.feed_client(C("RESET"))[0] == C("RESET") + AUTH2  # a later RESET uses the new token


def test_reauth_resp2_subscribed_resubscribes_in_one_write():
    c, _ = core()
    c.feed_client(C("SELECT", "2") + C("CLIENT", "SETNAME", "app") + C("SUBSCRIBE", "a", "b")
                  + C("PSUBSCRIBE", "p*"))
    confirm = (b"*3\r\n$9\r\nsubscribe\r\n$1\r\na\r\n:1\r\n*3\r\n$9\r\nsubscribe\r\n$1\r\nb\r\n:2\r\n"
               b"*3\r\n$10\r\npsubscribe\r\n$2\r\np*\r\n:3\r\n")
    assert c.feed_upstream(b"+OK\r\n+OK\r\n" + confirm) == b"+OK\r\n+OK\r\n" + confirm
    up = c.reauth(AUTH2)
    assert up == (C("RESET") + AUTH2 + C("SELECT", "2") + C("CLIENT", "SETNAME", "app")
                  + C("SUBSCRIBE", "a", "b") + C("PSUBSCRIBE", "p*"))
    message = b"*3\r\n$7\r\nmessage\r\n$1\r\na\r\n$2\r\nhi\r\n"
    assert c.feed_upstream(b"+RESET\r\n+OK\r\n+OK\r\n+OK\r\n" + confirm + message) == message
    assert c.idle


def test_reauth_inside_multi_replays_the_transaction():
    c, _ = core()
    c.feed_client(C("MULTI") + C("SET", "k", "1") + C("INCR", "k"))
    assert c.feed_upstream(b"+OK\r\n+QUEUED\r\n+QUEUED\r\n") == b"+OK\r\n+QUEUED\r\n+QUEUED\r\n"
    up = c.reauth(AUTH2)
    assert up == C("DISCARD") + AUTH2 + C("MULTI") + C("SET", "k", "1") + C("INCR", "k")
    assert c.feed_upstream(b"+OK\r\n+OK\r\n+OK\r\n+QUEUED\r\n+QUEUED\r\n") == b""
    assert c.feed_client(C("EXEC"))[0] == C("EXEC")
    assert c.feed_upstream(b"*2\r\n+OK\r\n:2\r\n") == b"*2\r\n+OK\r\n:2\r\n" and c.idle


def test_reauth_inside_a_watched_multi_fails_exec_like_a_conflict():
    c, _ = core()
    c.feed_client(C("WATCH", "k") + C("MULTI") + C("SET", "k", "1"))
    c.feed_upstream(b"+OK\r\n+OK\r\n+QUEUED\r\n")
    c.reauth(AUTH2)
    c.feed_upstream(b"+OK\r\n+OK\r\n+OK\r\n+QUEUED\r\n")
    up, down = c.feed_client(C("EXEC"))
    assert up == C("DISCARD")
    assert c.feed_upstream(b"+OK\r\n") == b"*-1\r\n" and c.idle


def test_reauth_behind_a_blocking_command():
    c, _ = core()
    t = [100.0]
    c.clock = lambda: t[0]
    c.block_cap = 5.0
    up, _ = c.feed_client(C("BLPOP", "q", "0") + C("GET", "x"))
    assert up == C("BLPOP", "q", "5.000")  # GET waits in the proxy, as it would in Redis
    assert c.reauth(AUTH2) == AUTH2  # queued behind the block in the database's input
    t[0] += 5
    assert c.feed_upstream(b"*-1\r\n+OK\r\n") == b""  # the cap's timeout and the AUTH: dropped
    assert c.take_upstream() == C("BLPOP", "q", "5.000")
    value = b"*2\r\n$1\r\nq\r\n$1\r\nv\r\n"
    assert c.feed_upstream(value) == value
    assert c.take_upstream() == C("GET", "x")
    assert c.feed_upstream(b"$-1\r\n") == b"$-1\r\n" and c.idle


def test_a_capped_block_keeps_the_clients_own_timeout():
    c, _ = core()
    t = [0.0]
    c.clock = lambda: t[0]
    c.block_cap = 5.0
    assert c.feed_client(C("XREAD", "BLOCK", "7000", "STREAMS", "s", "$"))[0] == C(
        "XREAD", "BLOCK", "5000", "STREAMS", "s", "$")
    t[0] = 5.0
    assert c.feed_upstream(b"*-1\r\n") == b""
    assert c.take_upstream() == C("XREAD", "BLOCK", "2000", "STREAMS", "s", "$")
    t[0] = 7.0
    assert c.feed_upstream(b"*-1\r\n") == b"*-1\r\n" and c.idle  # the client's own timeout


def test_reauth_in_monitor_drops_only_its_ok():
    c, _ = core(roles=("access", "ops"))
    c.feed_client(C("MONITOR"))
    c.feed_upstream(b"+OK\r\n")
    c.reauth(AUTH2)
    line = b'+1700000000.123456 [0 127.0.0.1:5000] "GET" "k"\r\n'
    assert c.feed_upstream(line + b"+OK\r\n" + line) == line + line


def _conf(kind: bytes, ch: bytes, n: int) -> bytes:
    return b"*3\r\n$%d\r\n%s\r\n$%d\r\n%s\r\n:%d\r\n" % (len(kind), kind, len(ch), ch, n)


def test_messages_around_swallowed_replies_survive_every_split():
    """Pub/Sub messages next to the replies the proxy swallows (its RESP2 re-AUTH) reach the
    client whole, wherever the chunks are cut: complete frames are never held as the start of
    a swallowed reply."""
    msg = b"*3\r\n$7\r\nmessage\r\n$1\r\nc\r\n$6\r\nbefore\r\n"
    pmsg = b"*4\r\n$8\r\npmessage\r\n$2\r\np*\r\n$2\r\npx\r\n$5\r\nafter\r\n"
    swallowed = b"+RESET\r\n+OK\r\n" + _conf(b"subscribe", b"c", 1) + _conf(b"psubscribe", b"p*", 2)
    full = msg + swallowed + pmsg
    for cut in range(1, len(full)):
        for cut2 in range(cut, len(full), 7):
            c, _ = core()
            c.feed_client(C("SUBSCRIBE", "c") + C("PSUBSCRIBE", "p*"))
            c.feed_upstream(_conf(b"subscribe", b"c", 1) + _conf(b"psubscribe", b"p*", 2))
            c.reauth(AUTH2)
            out = c.feed_upstream(full[:cut]) + c.feed_upstream(full[cut:cut2]) + c.feed_upstream(full[cut2:])
            assert out == msg + pmsg, (cut, cut2)
            assert c.idle


def test_reusable_only_after_plain_commands_whose_replies_have_all_come():
    c, _ = core()
    assert c.reusable  # nothing sent yet
    c.feed_client(C("SELECT", "1") + C("SET", "k", "v") + C("GET", "k"))
    assert not c.reusable  # replies are due: the connection is busy
    c.feed_upstream(b"+OK\r\n+OK\r\n$1\r\n")
    assert not c.reusable  # in the middle of a reply
    c.feed_upstream(b"v\r\n")
    assert c.reusable  # SELECT is undone by RESET
    c.feed_client(C("QUIT"))
    assert c.reusable  # answered by the proxy


def test_not_parkable_in_the_middle_of_a_command():
    c, _ = core()
    whole = C("SET", "k", "v")
    c.feed_client(whole[:7])  # nothing of it went upstream: the connection could go back...
    assert c.reusable and not c.parkable  # ...but the session waits for the rest of it
    up, _ = c.feed_client(whole[7:])
    assert up == whole
    c.feed_upstream(b"+OK\r\n")
    assert c.parkable


@pytest.mark.parametrize("first", [
    C("CLIENT", "SETINFO", "LIB-NAME", "x"), C("CLIENT", "NO-EVICT", "ON"), C("HELLO", "3"),
    C("SUBSCRIBE", "ch"), C("MULTI"), C("MONITOR"), C("CLIENT", "REPLY", "OFF"), C("BLPOP", "q", "1"),
    C("WATCH", "k"), C("EVAL", "return 1", "0"), C("WAIT", "0", "0"), C("WAITAOF", "0", "0", "0"),
], ids=lambda b: "-".join(x.decode() for x in b.split(b"\r\n")[2:5:2]))
def test_not_reusable_once_a_command_set_connection_state(first):
    c, _ = core(roles=("access", "ops"))
    c.feed_client(first)
    replies = {b"HELLO": b"%1\r\n+proto\r\n:3\r\n", b"SUBSCRIBE": b"*3\r\n$9\r\nsubscribe\r\n$2\r\nch\r\n:1\r\n",
               b"BLPOP": b"*-1\r\n"}
    name = first.split(b"\r\n")[2].upper()
    if name not in (b"MONITOR",) and not first.endswith(b"OFF\r\n"):
        c.feed_upstream(replies.get(name, b"+OK\r\n"))
    assert not c.reusable


def test_a_chunk_answering_more_than_the_first_entry_is_routed_reply_by_reply():
    c, rec = core()
    c.feed_client(C("GET", "a") + C("SELECT", "1") + C("GET", "b"))
    # One chunk answers a plain command, SELECT (which the core follows) and another.
    assert c.feed_upstream(b"$1\r\nx\r\n+OK\r\n$1\r\ny\r\n") == b"$1\r\nx\r\n+OK\r\n$1\r\ny\r\n"
    assert c.idle and c.logical_db == 1
    assert [e[0] for e in rec.events] == ["GET", "SELECT", "GET"]


def test_a_reply_cut_right_after_its_type_byte_reaches_the_client_whole():
    """A chunk from the database may end anywhere: here one reply in, right after the next
    one's type byte, and the next chunk answers more than the first entry. Every reply
    reaches the client as it came (this once ended the session with "bad reply from the
    database" and lost the replies after the cut)."""
    for cut_after in (b"$", b"*", b"*2\r\n$1\r\nx\r\n"):
        c, rec = core()
        c.feed_client(C("GET", "a") + C("MGET", "a", "b") + C("SELECT", "1") + C("GET", "b"))
        replies = b"$1\r\nx\r\n*2\r\n$1\r\nx\r\n$-1\r\n+OK\r\n$1\r\ny\r\n"
        cut = replies.index(cut_after, 7) + len(cut_after)
        got = c.feed_upstream(replies[:cut]) + c.feed_upstream(replies[cut:])
        assert got == replies and c.ending is None, cut_after
        assert c.idle and c.logical_db == 1
        assert [e[0] for e in rec.events] == ["GET", "MGET", "SELECT", "GET"]


@pytest.mark.parametrize("seed", range(6))
def test_replies_cut_anywhere_reach_the_client_as_they_came(seed):
    """Plain commands, SELECTs and pipelines; the replies come in chunks of whole replies,
    some cut anywhere (right after a type byte, between an array's elements): the client
    gets every reply's bytes in order and the session is idle only at the end."""
    rng = random.Random(seed)
    c, rec = core()
    requests, replies = [], []
    for i in range(600):
        kind = rng.choice([0, 0, 1, 1, 2, 2, 2, 3])
        if kind == 0:
            requests.append(C("GET", f"k{i}"))
            replies.append(rng.choice([b"$-1\r\n", b"$3\r\nabc\r\n", b"$0\r\n\r\n"]))
        elif kind == 1:
            n = rng.randint(1, 4)
            requests.append(C("MGET", *(f"k{j}" for j in range(n))))
            replies.append(b"*%d\r\n" % n + b"".join(rng.choice([b"$-1\r\n", b"$1\r\nv\r\n"]) for _ in range(n)))
        elif kind == 2:
            requests.append(C("INCR", "n"))
            replies.append(b":%d\r\n" % i)
        else:
            requests.append(C("SELECT", str(rng.randint(0, 3))))
            replies.append(b"+OK\r\n")
    data = b"".join(requests)
    while data:  # the client's bytes come in pieces too
        k = rng.randint(1, 3000)
        c.feed_client(data[:k])
        data = data[k:]
    chunks, i, carry = [], 0, b""
    while i < len(replies):
        k = rng.randint(1, 30)
        whole = carry + b"".join(replies[i:i + k])
        i += k
        cut = len(whole)
        if i < len(replies) and rng.random() < 0.4:
            cut = rng.choice([len(whole) - len(replies[i - 1]) + 1, rng.randrange(1, len(whole))])
        chunks.append(whole[:cut])
        carry = whole[cut:]
    if carry:
        chunks.append(carry)
    got = []
    for chunk in chunks:
        assert not c.idle
        got.append(c.feed_upstream(chunk))
        assert c.ending is None
    assert b"".join(got) == b"".join(replies) and c.idle
    assert len(rec.events) == len(requests)


def test_after_hello_3_a_push_frame_is_never_taken_for_a_reply():
    c, _ = core()
    c.feed_client(C("HELLO", "3"))
    c.feed_upstream(b"%1\r\n+proto\r\n:3\r\n")
    c.feed_client(C("GET", "k"))
    push = b">2\r\n$10\r\ninvalidate\r\n*1\r\n$1\r\nk\r\n"
    assert c.feed_upstream(push) == push
    assert not c.idle  # the GET is still waiting for its reply
    assert c.feed_upstream(b"$1\r\nv\r\n") == b"$1\r\nv\r\n"
    assert c.idle
    # Back on RESP2 the pushes that may still come are told apart the same way.
    c.feed_client(C("HELLO", "2") + C("GET", "k"))
    assert c.feed_upstream(b"*2\r\n$5\r\nproto\r\n:2\r\n" + push) == b"*2\r\n$5\r\nproto\r\n:2\r\n" + push
    assert not c.idle
    assert c.feed_upstream(b"$1\r\nv\r\n") == b"$1\r\nv\r\n" and c.idle
