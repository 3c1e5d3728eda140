"""The sans-io cluster router, driven with byte strings: slots, splitting and merging,
redirections, retries, the proxy's own CLUSTER replies."""

from __future__ import annotations

import hiredis
import pytest

from services.dbproxy import cluster as cl
from services.dbproxy.cluster import (
    ClusterRouter,
    SlotMap,
    command_keys,
    decode_scan_cursor,
    encode_scan_cursor,
    key_slot,
    parse_cluster_slots,
)
from services.dbproxy.resp import encode_command as cmd

A, B, C = "10.0.0.1:7000", "10.0.0.2:7000", "10.0.0.3:7000"


def three() -> SlotMap:
    return parse_cluster_slots([[0, 5460, [b"10.0.0.1", 7000, b"a"]], [5461, 10922, [b"10.0.0.2", 7000, b"b"]],
                                [10923, 16383, [b"10.0.0.3", 7000, b"c"]]], "seed")


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def router(clock=None) -> ClusterRouter:
    r = ClusterRouter(three(), address=("127.0.0.1", 3081), node_id="f" * 40, clock=clock or Clock())
    for n in (A, B, C):
        r.connected(n)
    return r


def parse(data: bytes) -> list:
    rd = hiredis.Reader(notEnoughData=Ellipsis)
    rd.feed(data)
    out = []
    while (x := rd.gets()) is not Ellipsis:
        out.append(x)
    return out


def node_of(key: bytes) -> str:
    s = key_slot(key)
    return A if s <= 5460 else B if s <= 10922 else C


def test_key_slot_is_redis_crc16_with_hash_tags():
    assert cl.crc16(b"123456789") == 0x31C3  # the CRC16-XMODEM check value Redis documents
    assert key_slot(b"foo") == 12182 and key_slot(b"bar") == 5061  # CLUSTER KEYSLOT on a real server
    assert key_slot(b"{user1000}.following") == key_slot(b"{user1000}.followers") == key_slot(b"user1000")
    assert key_slot(b"foo{}{bar}") == key_slot(b"foo{}{bar}") != key_slot(b"bar")  # an empty tag is no tag
    assert key_slot(b"foo{{bar}}zap") == key_slot(b"{bar")


def test_command_keys_from_the_table_and_movable_keys():
    assert command_keys("GET", [b"GET", b"k"]) == [b"k"]
    assert command_keys("MSET", [b"MSET", b"a", b"1", b"b", b"2"]) == [b"a", b"b"]
    assert command_keys("BLPOP", [b"BLPOP", b"a", b"b", b"0"]) == [b"a", b"b"]
    assert command_keys("EVAL", [b"EVAL", b"s", b"2", b"x", b"y", b"arg"]) == [b"x", b"y"]
    assert command_keys("XREAD", [b"XREAD", b"COUNT", b"1", b"STREAMS", b"s1", b"s2", b"0", b"0"]) == [b"s1", b"s2"]
    assert command_keys("ZUNIONSTORE", [b"ZUNIONSTORE", b"d", b"2", b"a", b"b"]) == [b"d", b"a", b"b"]
    assert command_keys("OBJECT", [b"OBJECT", b"ENCODING", b"k"]) == [b"k"]
    assert command_keys("PING", [b"PING"]) == []


def test_scan_cursor_round_trip():
    assert decode_scan_cursor(b"0") == (0, 0)
    for shard, cur in ((0, 5), (2, 0), (1, 2**63)):
        assert decode_scan_cursor(encode_scan_cursor(shard, cur)) == (shard, cur)
    assert decode_scan_cursor(b"nope") is None


def test_keyed_commands_go_to_their_primary_and_replies_keep_client_order():
    r = router()
    r.send(cmd("SET", "foo", "1") + cmd("SET", "bar", "2"))  # foo on C, bar on A
    w = r.take_writes()
    assert w == {C: cmd("SET", "foo", "1"), A: cmd("SET", "bar", "2")}
    r.feed(A, b"+OK-bar\r\n")  # the second command's reply first
    assert r.take_replies() == b""
    r.feed(C, b"+OK-foo\r\n")
    assert r.take_replies() == b"+OK-foo\r\n+OK-bar\r\n"


def test_mget_split_per_slot_and_merged_in_key_order():
    r = router()
    keys = [b"foo", b"bar", b"baz", b"qux"]
    r.send(cmd("MGET", *keys))
    w = r.take_writes()
    sent = {n: parse(data) for n, data in w.items()}
    assert sorted(k for cmds in sent.values() for c in cmds for k in c[1:]) == sorted(keys)
    assert all(len({key_slot(k) for k in c[1:]}) == 1 for cmds in sent.values() for c in cmds)  # one slot each
    for n, cmds in sent.items():
        for one in cmds:
            values = [b"val-" + k for k in one[1:]]
            r.feed(n, b"*%d\r\n" % len(values) + b"".join(b"$%d\r\n%s\r\n" % (len(v), v) for v in values))
    assert parse(r.take_replies()) == [[b"val-" + k for k in keys]]


def test_del_sums_and_an_error_wins():
    r = router()
    r.send(cmd("DEL", "foo", "bar"))
    w = r.take_writes()
    r.feed(A, b":1\r\n")
    r.feed(C, b":1\r\n")
    assert r.take_replies() == b":2\r\n"
    r.send(cmd("MSET", "foo", "1", "bar", "2"))
    r.take_writes()
    r.feed(A, b"-OOM no memory\r\n")
    r.feed(C, b"+OK\r\n")
    assert r.take_replies() == b"-OOM no memory\r\n"
    assert set(w) == {A, C}


def test_crossslot_for_commands_that_cannot_span_slots():
    r = router()
    r.send(cmd("SUNIONSTORE", "d", "a", "b") + cmd("GET", "foo"))
    assert r.take_writes() == {C: cmd("GET", "foo")}
    r.feed(C, b"$1\r\nx\r\n")
    assert r.take_replies() == cl.CROSSSLOT + b"$1\r\nx\r\n"


def test_moved_is_followed_and_the_map_learns_it():
    r = router()
    r.send(cmd("GET", "foo"))
    r.take_writes()
    r.feed(C, b"-MOVED 12182 10.0.0.2:7000\r\n")
    assert r.take_replies() == b""  # never to the client
    assert r.take_writes() == {B: cmd("GET", "foo")}
    assert r.wants_refresh and r.map.node_for(12182) == B
    r.feed(B, b"$1\r\nv\r\n")
    assert r.take_replies() == b"$1\r\nv\r\n"
    r.send(cmd("GET", "foo"))
    assert r.take_writes() == {B: cmd("GET", "foo")}


def test_ask_sends_asking_first_and_does_not_change_the_map():
    r = router()
    r.send(cmd("GET", "foo"))
    r.take_writes()
    r.feed(C, b"-ASK 12182 10.0.0.1:7000\r\n")
    assert r.take_writes() == {A: b"*1\r\n$6\r\nASKING\r\n" + cmd("GET", "foo")}
    r.feed(A, b"+OK\r\n$1\r\nv\r\n")  # ASKING's +OK is the router's own
    assert r.take_replies() == b"$1\r\nv\r\n"
    assert r.map.node_for(12182) == C


def test_redirections_are_bounded():
    r = router()
    r.send(cmd("GET", "foo"))
    r.take_writes()
    for _ in range(cl.MAX_REDIRECTS):
        r.feed(C, b"-MOVED 12182 10.0.0.3:7000\r\n")
        assert r.take_writes() == {C: cmd("GET", "foo")}
    r.feed(C, b"-MOVED 12182 10.0.0.3:7000\r\n")
    assert r.take_replies() == b"-MOVED 12182 10.0.0.3:7000\r\n"


def test_tryagain_is_retried_after_a_moment_within_the_window():
    clock = Clock()
    r = router(clock)
    r.send(cmd("MGET", "{t}a", "{t}b"))
    (node,) = r.take_writes()
    r.feed(node, b"-TRYAGAIN Multiple keys request during rehashing of slot\r\n")
    assert r.take_writes() == {} and r.next_retry is not None
    clock.t += cl.RETRY_DELAY
    r.run_retries()
    assert r.take_writes() == {node: cmd("MGET", "{t}a", "{t}b")}
    clock.t += cl.RETRY_WINDOW
    r.feed(node, b"-TRYAGAIN again\r\n")
    assert r.take_replies() == b"-TRYAGAIN again\r\n"  # past its window: the client is told


def test_a_lost_node_gives_one_clear_error_per_command_in_flight():
    r = router()
    r.send(cmd("GET", "foo") + cmd("GET", "bar"))
    r.take_writes()
    r.lost(C)
    r.feed(A, b"$1\r\nb\r\n")
    out = parse(r.take_replies())
    assert len(out) == 2 and isinstance(out[0], hiredis.ReplyError)
    assert "lost its connection to cluster node 10.0.0.3:7000" in str(out[0]) and "retry" in str(out[0])
    assert out[1] == b"b" and r.wants_refresh


def test_everything_commands_and_merges():
    r = router()
    r.send(cmd("DBSIZE"))
    assert set(r.take_writes()) == {A, B, C}
    for n, v in ((A, 1), (B, 2), (C, 3)):
        r.feed(n, b":%d\r\n" % v)
    assert r.take_replies() == b":6\r\n"
    r.send(cmd("INFO", "keyspace"))
    r.take_writes()
    for n, k in ((A, 1), (B, 2), (C, 3)):
        text = b"# Keyspace\r\ndb0:keys=%d,expires=1,avg_ttl=0\r\n" % k
        r.feed(n, b"$%d\r\n%s\r\n" % (len(text), text))
    (info,) = parse(r.take_replies())
    assert b"db0:keys=6,expires=3,avg_ttl=0" in info


def test_scan_walks_each_shard_with_one_cursor():
    r = router()
    seen = []
    cursor = b"0"
    for _ in range(10):
        r.send(cmd("SCAN", cursor, "COUNT", "10"))
        ((node, data),) = r.take_writes().items()
        sent = parse(data)[0]
        nxt = b"7" if sent[1] == b"0" else b"0"  # two pages per shard
        r.feed(node, b"*2\r\n$%d\r\n%s\r\n*1\r\n$%d\r\n%s\r\n" % (len(nxt), nxt, len(node), node.encode()))
        cursor, keys = parse(r.take_replies())[0]
        seen += keys
        if cursor == b"0":
            break
    assert seen == [n.encode() for n in (A, A, B, B, C, C)]


def test_transaction_is_pinned_and_another_slot_aborts_it():
    r = router()
    r.send(cmd("MULTI") + cmd("SET", "{u}a", "1"))
    node = node_of(b"u")
    assert r.take_writes() == {node: cmd("MULTI") + cmd("SET", "{u}a", "1")}
    other = next(k for k in (b"foo", b"bar", b"zz") if node_of(k) != node)
    r.send(cmd("SET", other, "2") + cmd("EXEC"))
    assert r.take_writes() == {node: cmd("DISCARD")}  # not EXEC: nothing of it runs


def test_transaction_replies_in_order_with_the_queueing_error():
    r = router()
    node = node_of(b"u")
    other = next(k for k in (b"foo", b"bar", b"zz") if node_of(k) != node)
    r.send(cmd("MULTI") + cmd("SET", "{u}a", "1") + cmd("SET", other, "2") + cmd("EXEC"))
    r.take_writes()
    r.feed(node, b"+OK\r\n+QUEUED\r\n+OK\r\n")
    assert r.take_replies() == (b"+OK\r\n+QUEUED\r\n" + cl.CROSSSLOT
                                + b"-EXECABORT Transaction discarded because of previous errors.\r\n")


def test_cluster_commands_answer_for_the_proxy_itself():
    r = router()
    r.send(cmd("CLUSTER", "SLOTS") + cmd("CLUSTER", "MYID") + cmd("READONLY") + cmd("CLUSTER", "KEYSLOT", "foo")
           + cmd("CLUSTER", "INFO") + cmd("CLUSTER", "NODES"))
    assert r.take_writes() == {}
    slots, myid, ok, slot, info, nodes = parse(r.take_replies())
    assert slots == [[0, 16383, [b"", 3081, b"f" * 40]]]
    assert myid == b"f" * 40 and ok == b"OK" and slot == 12182
    assert b"cluster_state:ok" in info and b"127.0.0.1:3081@3081 myself,master" in nodes


def test_subscribe_goes_to_one_node_and_messages_pass_from_any():
    r = router()
    r.send(cmd("SUBSCRIBE", "a", "b"))
    ((node, _),) = r.take_writes().items()
    r.feed(node, b"*3\r\n$9\r\nsubscribe\r\n$1\r\na\r\n:1\r\n*3\r\n$9\r\nsubscribe\r\n$1\r\nb\r\n:2\r\n")
    assert len(parse(r.take_replies())) == 2
    r.feed(node, b"*3\r\n$7\r\nmessage\r\n$1\r\na\r\n$2\r\nhi\r\n")
    assert parse(r.take_replies()) == [[b"message", b"a", b"hi"]]
    r.send(cmd("SSUBSCRIBE", "{s}x"))
    w = r.take_writes()
    assert list(w) == [node_of(b"s")]


def test_auth_and_hello_go_to_every_connection_and_new_ones_get_hello():
    r = router()
    r.send(cmd("HELLO", "3"))
    assert set(r.take_writes()) == {A, B, C}
    for n in (A, B, C):
        r.feed(n, b"%1\r\n+proto\r\n:3\r\n")
    assert r.take_replies() == b"%1\r\n+proto\r\n:3\r\n" and r.proto == 3
    assert r.connected("10.0.0.4:7000") == cmd("HELLO", "3")


def test_nodes_off_the_configured_host_are_refused():
    r = ClusterRouter(three(), address=("127.0.0.1", 3081), node_id="f" * 40, allow_node=lambda n: n != C)
    for n in (A, B):
        r.connected(n)
    r.send(cmd("GET", "foo"))
    (err,) = parse(r.take_replies())
    assert "does not connect to cluster node 10.0.0.3:7000" in str(err)


def test_static_cluster_true_makes_an_osscluster_record():
    from services.common.config import StaticDatabaseConfig
    from services.dbproxy.dataplane import is_cluster
    from services.discovery.registry import static_record

    rec = static_record(StaticDatabaseConfig(name="c", uri="h:7000", cluster=True, secret="env:X"), "static/x")
    assert is_cluster(rec) and rec.labels["clustering-policy"] == "OSSCluster" and rec.secret_ref == "env:X"
    assert not is_cluster(static_record(StaticDatabaseConfig(name="d", uri="h:7000"), "static/x"))


@pytest.mark.parametrize("sections,expected", [([], True), ([b"server"], False), ([b"ALL"], True)])
def test_info_keyspace_detection(sections, expected):
    assert cl._info_has_keyspace([b"INFO", *sections]) is expected


def test_client_reply_off_and_skip_are_followed_by_the_router():
    r = router()
    r.send(cmd("CLIENT", "REPLY", "SKIP") + cmd("SET", "foo", "1") + cmd("SET", "bar", "2"))
    w = r.take_writes()
    assert w == {C: cmd("SET", "foo", "1"), A: cmd("SET", "bar", "2")}  # CLIENT REPLY stays here
    r.feed(C, b"+OK\r\n")
    r.feed(A, b"+OK-bar\r\n")
    assert r.take_replies() == b"+OK-bar\r\n"  # the skipped reply is dropped
    r.send(cmd("CLIENT", "REPLY", "OFF") + cmd("SET", "foo", "1") + cmd("CLIENT", "REPLY", "ON"))
    r.feed(C, b"+OK\r\n")
    assert r.take_replies() == b"+OK\r\n"  # only ON's own +OK


def test_ssubscribe_of_channels_in_several_slots_goes_to_each_shard():
    r = router()
    a, c = next(k for k in (b"x1", b"x2", b"x3", b"x4", b"x5") if node_of(k) == A), \
        next(k for k in (b"y1", b"y2", b"y3", b"y4", b"y5", b"y6") if node_of(k) == C)
    r.send(cmd("SSUBSCRIBE", a, c))
    w = r.take_writes()
    assert w == {A: cmd("SSUBSCRIBE", a), C: cmd("SSUBSCRIBE", c)}
    r.feed(C, b"*3\r\n$10\r\nssubscribe\r\n$%d\r\n%s\r\n:1\r\n" % (len(c), c))
    r.feed(A, b"*3\r\n$10\r\nssubscribe\r\n$%d\r\n%s\r\n:1\r\n" % (len(a), a))
    assert [x[1] for x in parse(r.take_replies())] == [a, c]  # in the order asked


def test_subscriptions_of_a_lost_node_are_made_again_elsewhere():
    r = router()
    r.send(cmd("SUBSCRIBE", "news") + cmd("SSUBSCRIBE", "{s}x"))
    w = r.take_writes()
    classic = next(n for n, d in w.items() if b"SUBSCRIBE\r\n$4\r\nnews" in d)
    r.feed(classic, b"*3\r\n$9\r\nsubscribe\r\n$4\r\nnews\r\n:1\r\n")
    shard = node_of(b"s")
    r.feed(shard, b"*3\r\n$10\r\nssubscribe\r\n$4\r\n{s}x\r\n:1\r\n")
    assert len(parse(r.take_replies())) == 2
    # The shard's primary fails over: its slots now belong to another node.
    new = next(n for n in (A, B, C) if n != shard)
    m = three()
    m.owner = [new if o == shard else o for o in m.owner]
    r.update_map(m)
    r.lost(shard)
    w = r.take_writes()
    assert cmd("SSUBSCRIBE", "{s}x") in w.get(new, b"")
    r.feed(new, b"*3\r\n$10\r\nssubscribe\r\n$4\r\n{s}x\r\n:1\r\n")
    assert r.take_replies() == b""  # the confirmation is the router's own
    r.feed(new, b"*3\r\n$8\r\nsmessage\r\n$4\r\n{s}x\r\n$2\r\nhi\r\n")
    assert parse(r.take_replies()) == [[b"smessage", b"{s}x", b"hi"]]


def test_unwatch_goes_where_the_watch_was_and_frees_the_next_transaction():
    r = router()
    r.send(cmd("WATCH", "{u}a"))
    node = node_of(b"u")
    assert r.take_writes() == {node: cmd("WATCH", "{u}a")}
    r.send(cmd("UNWATCH"))
    assert r.take_writes() == {node: cmd("UNWATCH")}
    other = next(k for k in (b"foo", b"bar", b"zz") if node_of(k) != node)
    r.send(cmd("MULTI") + cmd("SET", other, "1") + cmd("EXEC"))
    assert r.take_writes() == {node_of(other): cmd("MULTI") + cmd("SET", other, "1") + cmd("EXEC")}


def test_a_demoted_primary_gets_connection_state_but_not_data_commands():
    r = router()
    m = three()
    m.owner = [B if o == C else o for o in m.owner]  # C failed over to B... and stays connected
    r.update_map(m)
    r.send(cmd("DBSIZE"))
    assert set(r.take_writes()) == {A, B}  # no key counted twice
    r.feed(A, b":1\r\n")
    r.feed(B, b":2\r\n")
    assert r.take_replies() == b":3\r\n"
    r.send(cmd("AUTH", "oid", "token"))
    assert set(r.take_writes()) == {A, B, C}


def test_a_transaction_whose_slot_moved_runs_again_where_the_slot_is():
    r = router()
    node = node_of(b"u")
    new = next(n for n in (A, B, C) if n != node)
    r.send(cmd("MULTI") + cmd("SET", "{u}a", "1") + cmd("INCR", "{u}b") + cmd("EXEC"))
    r.take_writes()
    # The slot moved: the node queues nothing and aborts EXEC.
    r.feed(node, b"+OK\r\n-MOVED %d %s\r\n-MOVED %d %s\r\n-EXECABORT Transaction discarded because of "
           b"previous errors.\r\n" % (key_slot(b"u"), new.encode(), key_slot(b"u"), new.encode()))
    assert r.take_replies() == b"+OK\r\n+QUEUED\r\n+QUEUED\r\n"
    assert r.take_writes() == {new: cmd("MULTI") + cmd("SET", "{u}a", "1") + cmd("INCR", "{u}b") + cmd("EXEC")}
    r.feed(new, b"+OK\r\n+QUEUED\r\n+QUEUED\r\n*2\r\n+OK\r\n:1\r\n")
    assert r.take_replies() == b"*2\r\n+OK\r\n:1\r\n"
    assert r.map.node_for(key_slot(b"u")) == new


def test_a_transaction_asked_elsewhere_runs_there_after_asking():
    r = router()
    node = node_of(b"u")
    new = next(n for n in (A, B, C) if n != node)
    r.send(cmd("MULTI") + cmd("GET", "{u}a") + cmd("EXEC"))
    r.take_writes()
    r.feed(node, b"+OK\r\n-ASK %d %s\r\n-EXECABORT Transaction discarded.\r\n" % (key_slot(b"u"), new.encode()))
    ask = b"*1\r\n$6\r\nASKING\r\n"
    assert r.take_writes() == {new: ask + cmd("MULTI") + cmd("GET", "{u}a") + cmd("EXEC")}
    r.feed(new, b"+OK\r\n+OK\r\n+QUEUED\r\n*1\r\n$1\r\nv\r\n")
    assert r.take_replies() == b"+OK\r\n+QUEUED\r\n*1\r\n$1\r\nv\r\n"
    assert r.map.node_for(key_slot(b"u")) == node  # ASK: the slot is not moved yet


def test_a_watched_transaction_whose_slot_moved_fails_as_a_watch_conflict():
    r = router()
    node = node_of(b"u")
    new = next(n for n in (A, B, C) if n != node)
    r.send(cmd("WATCH", "{u}a") + cmd("MULTI") + cmd("SET", "{u}a", "1") + cmd("EXEC"))
    r.take_writes()
    r.feed(node, b"+OK\r\n+OK\r\n-MOVED %d %s\r\n-EXECABORT x\r\n" % (key_slot(b"u"), new.encode()))
    assert r.take_replies() == b"+OK\r\n+OK\r\n+QUEUED\r\n*-1\r\n"
    assert r.take_writes() == {}


def test_a_transaction_meeting_tryagain_runs_again_after_a_moment():
    clock = Clock()
    r = router(clock)
    node = node_of(b"u")
    r.send(cmd("MULTI") + cmd("INCR", "{u}a") + cmd("EXEC"))
    r.take_writes()
    r.feed(node, b"+OK\r\n+QUEUED\r\n-TRYAGAIN Multiple keys request during rehashing of slot\r\n")
    assert r.take_replies() == b"+OK\r\n+QUEUED\r\n" and r.take_writes() == {}
    clock.t += cl.RETRY_DELAY
    r.run_retries()
    assert r.take_writes() == {node: cmd("MULTI") + cmd("INCR", "{u}a") + cmd("EXEC")}
    r.feed(node, b"+OK\r\n+QUEUED\r\n*1\r\n:1\r\n")
    assert r.take_replies() == b"*1\r\n:1\r\n"


def test_a_transaction_on_a_slot_being_migrated_waits_for_the_migration_to_finish():
    # Resharding moves a slot's keys a few at a time: a transaction on keys on both sides is
    # asked to the importing node, which answers TRYAGAIN until the last key is there. Each
    # round is a new try, not one more redirection of the same: the client sees the reply.
    clock = Clock()
    r = router(clock)
    node = node_of(b"u")
    new = next(n for n in (A, B, C) if n != node)
    slot = key_slot(b"u")
    r.send(cmd("MULTI") + cmd("INCR", "{u}a") + cmd("GET", "{u}b") + cmd("EXEC"))
    r.take_writes()
    ask = b"*1\r\n$6\r\nASKING\r\n"
    body = cmd("MULTI") + cmd("INCR", "{u}a") + cmd("GET", "{u}b") + cmd("EXEC")
    r.feed(node, b"+OK\r\n-ASK %d %s\r\n+QUEUED\r\n-EXECABORT Transaction discarded.\r\n" % (slot, new.encode()))
    assert r.take_replies() == b"+OK\r\n+QUEUED\r\n+QUEUED\r\n"
    for _ in range(cl.MAX_REDIRECTS + 3):
        assert r.take_writes() == {new: ask + body}
        r.feed(new, b"+OK\r\n+OK\r\n+QUEUED\r\n+QUEUED\r\n-TRYAGAIN Multiple keys request during rehashing of slot\r\n")
        assert r.take_replies() == b"" and r.take_writes() == {}
        clock.t += cl.RETRY_DELAY
        r.run_retries()
        assert r.take_writes() == {node: body}
        r.feed(node, b"+OK\r\n-ASK %d %s\r\n+QUEUED\r\n-EXECABORT Transaction discarded.\r\n" % (slot, new.encode()))
    assert r.take_writes() == {new: ask + body}
    r.feed(new, b"+OK\r\n+OK\r\n+QUEUED\r\n+QUEUED\r\n*2\r\n:1\r\n$1\r\nv\r\n")
    assert r.take_replies() == b"*2\r\n:1\r\n$1\r\nv\r\n"
