"""The sans-io RESP core: command parser and reply framer, checked against hiredis."""

from __future__ import annotations

import random
import re

import hiredis
import pytest

from services.dbproxy.resp import (
    CommandParser,
    Limits,
    ProtocolError,
    ReplyFramer,
    encode_array,
    encode_bulk,
    encode_command,
    encode_error,
    encode_push,
    split_inline,
)


def feed_split(parser, data: bytes, rng: random.Random, max_piece: int = 40):
    out = []
    i = 0
    while i < len(data):
        n = rng.randint(1, max_piece)
        out += parser.feed(data[i : i + n])
        i += n
    return out


# -- command parser ------------------------------------------------------------------------


def test_commands_keep_raw_bytes_and_names():
    p = CommandParser()
    data = encode_command("get", "k") + encode_command("SET", "k", b"v\r\nx")
    cmds = p.feed(data)
    assert [c.name for c in cmds] == ["GET", "SET"]
    assert cmds[1].argv == [b"SET", b"k", b"v\r\nx"]
    assert b"".join(c.raw for c in cmds) == data


@pytest.mark.parametrize("seed", range(20))
def test_random_split_points_give_the_same_commands(seed):
    rng = random.Random(seed)
    cmds = []
    for _ in range(200):
        argc = rng.randint(1, 6)
        argv = [rng.choice([b"GET", b"SET", b"hset", b"x"])] + [
            rng.randbytes(rng.choice([0, 1, 5, 100, 5000])) for _ in range(argc - 1)
        ]
        cmds.append(argv)
    data = b"".join(encode_command(*a) for a in cmds)
    got = feed_split(CommandParser(), data, rng, max_piece=rng.choice([3, 64, 4096]))
    assert [c.argv for c in got] == cmds
    assert b"".join(c.raw for c in got) == data


def test_inline_commands_are_reencoded():
    p = CommandParser()
    cmds = p.feed(b'set k "a\\x41 b"\r\nPING\n\r\n  \r\nget \'it\\\'s\'\r\n')
    assert [c.argv for c in cmds] == [[b"set", b"k", b"aA b"], [b"PING"], [b"get", b"it's"]]
    assert cmds[0].raw == encode_command("set", "k", "aA b")


def test_inline_unbalanced_quotes():
    with pytest.raises(ProtocolError, match="unbalanced quotes"):
        CommandParser().feed(b'SET "a\r\n')
    assert split_inline(b"  a  b ") == [b"a", b"b"]


@pytest.mark.parametrize(
    "data, message",
    [
        (b"*1\r\n$99999999999\r\n", "invalid bulk length"),
        (b"*1\r\n$-1\r\n", "invalid bulk length"),
        (b"*1\r\n$01\r\na\r\n", "invalid bulk length"),
        (b"*99999999999\r\n", "multibulk"),
        (b"*x\r\n", "invalid multibulk length"),
        (b"*1\r\n+OK\r\n", "expected '$'"),
        (b"*1\r\n$1\r\nab\r\n", "expected CRLF"),
        (b"A" * 70000, "too big inline request"),
    ],
)
def test_malformed_input(data, message):
    p = CommandParser(Limits(max_bulk_len=1 << 20, max_array_len=1000, max_inline_len=65536))
    with pytest.raises(ProtocolError, match=re.escape(message)):
        p.feed(data)
    with pytest.raises(ProtocolError):  # stays failed
        p.feed(b"PING\r\n")


def test_limits_apply_before_buffering():
    p = CommandParser(Limits(max_bulk_len=1000, max_buffer=4096))
    with pytest.raises(ProtocolError, match="bulk length"):
        p.feed(b"*2\r\n$3\r\nSET\r\n$1001\r\n")
    p = CommandParser(Limits(max_bulk_len=10_000, max_buffer=4096))
    with pytest.raises(ProtocolError, match="too big request"):
        p.feed(b"*2\r\n$3\r\nSET\r\n$5000\r\n")
    # Partial headers are judged as soon as they cannot become valid.
    p = CommandParser(Limits(max_bulk_len=1000))
    with pytest.raises(ProtocolError):
        p.feed(b"*2\r\n$3\r\nSET\r\n$99999")


def test_protocol_error_keeps_preceding_commands():
    p = CommandParser()
    with pytest.raises(ProtocolError) as exc:
        p.feed(encode_command("PING") + encode_command("GET", "a") + b"*1\r\n$x\r\n")
    assert [c.name for c in exc.value.commands] == ["PING", "GET"]
    assert exc.value.reply().startswith(b"-ERR Protocol error: ")


def test_empty_arrays_are_ignored():
    assert CommandParser().feed(b"*0\r\n*-1\r\n" + encode_command("PING"))[0].name == "PING"


@pytest.mark.parametrize("seed", range(10))
def test_random_garbage_never_crashes(seed):
    rng = random.Random(seed)
    for _ in range(200):
        p = CommandParser(Limits(max_bulk_len=1 << 16, max_array_len=1024, max_inline_len=4096,
                                 max_buffer=1 << 18))
        data = bytes(rng.choice(b"*$\r\n0123456789-abc \"'\\x") for _ in range(rng.randint(1, 300)))
        try:
            feed_split(p, data, rng)
        except ProtocolError:
            pass


# -- reply framer --------------------------------------------------------------------------


def _simple_reply(rng: random.Random, kind: int) -> bytes:
    """Kinds 0 to 3: a status, an error, an integer, a bulk string (RESP2 and RESP3 alike)."""
    if kind == 0:
        return b"+OK\r\n"
    if kind == 1:
        return b"-ERR bad\r\n"
    if kind == 2:
        return b":%d\r\n" % rng.randint(-5, 10**12)
    return encode_bulk(rng.randbytes(rng.choice([0, 3, 40, 70000])))


def _random_reply(rng: random.Random, depth: int = 0) -> bytes:
    kind = rng.randrange(13 if depth < 3 else 7)
    if kind <= 3:
        return _simple_reply(rng, kind)
    if kind == 4:
        return b"$-1\r\n" if rng.random() < 0.5 else b"_\r\n"
    if kind == 5:
        return rng.choice([b",3.14\r\n", b"#t\r\n", b"(12345678901234567890\r\n"])
    if kind == 6:
        return b"=8\r\ntxt:abcd\r\n"
    n = rng.randint(0, 4)
    items = b"".join(_random_reply(rng, depth + 1) for _ in range(n))
    if kind in (7, 8):
        return b"*%d\r\n" % n + items
    if kind == 9:
        return b"~%d\r\n" % n + items
    if kind == 10:
        pairs = b"".join(encode_bulk(b"k%d" % i) + _random_reply(rng, depth + 1) for i in range(n))
        return b"%%%d\r\n" % n + pairs
    if kind == 11:
        return b"*-1\r\n"
    return encode_array([b"message", b"ch", b"data"]) if depth == 0 else b":1\r\n"


@pytest.mark.parametrize("seed", range(20))
def test_framer_matches_hiredis_boundaries(seed):
    rng = random.Random(seed)
    replies = [_random_reply(rng) for _ in range(300)]
    data = b"".join(replies)
    framer = ReplyFramer(protocol=3)
    frames = []
    offset = 0
    i = 0
    while i < len(data):
        n = rng.choice([1, 7, 100, 8192])
        chunk = data[i : i + n]
        for f in framer.feed(chunk):
            frames.append((f.kind, f.raw_len, offset + f.end))
        offset += len(chunk)
        i += n
    assert not framer.in_frame
    ends = []
    pos = 0
    for r in replies:
        pos += len(r)
        ends.append(pos)
    assert [f[2] for f in frames] == ends
    assert [f[1] for f in frames] == [len(r) for r in replies]
    # And hiredis agrees there are exactly that many replies.
    reader = hiredis.Reader()
    reader.feed(data)
    count = 0
    while reader.gets() is not False:
        count += 1
    assert count == len(replies)


def test_framer_tags_push_and_attributes():
    framer = ReplyFramer(protocol=3)
    data = (encode_push([b"message", b"ch", b"x"]) + b"|1\r\n+key\r\n+val\r\n"
            + encode_array([b"subscribe", b"a", 1]) + b"+OK\r\n")
    frames = framer.feed(data)
    assert [(f.kind, f.tag) for f in frames] == [(">", b"message"), ("|", None), ("*", b"subscribe"), ("+", None)]
    assert frames[0].is_push and not frames[0].is_reply and frames[3].is_reply
    assert framer.is_out_of_band(frames[0])
    framer2 = ReplyFramer(protocol=2)
    assert framer2.is_out_of_band(framer2.feed(encode_array([b"message", b"c", b"d"]))[0], subscribed=True)


def test_framer_streamed_replies():
    framer = ReplyFramer(protocol=3)
    data = b"$?\r\n;4\r\nHell\r\n;1\r\no\r\n;0\r\n" + b"*?\r\n:1\r\n:2\r\n.\r\n" + b"+OK\r\n"
    assert [f.kind for f in framer.feed(data)] == ["$", "*", "+"]


@pytest.mark.parametrize("bad", [b"?what\r\n", b"$abc\r\n", b"$3\r\nabcXY"])
def test_framer_rejects_garbage(bad):
    with pytest.raises(ProtocolError):
        ReplyFramer().feed(bad)


def test_encoders():
    assert encode_error("no way") == b"-ERR no way\r\n"
    assert encode_error("NOPERM x\ny") == b"-NOPERM x y\r\n"
    assert encode_array([b"a", 1, None, [b"b"]]) == b"*4\r\n$1\r\na\r\n:1\r\n$-1\r\n*1\r\n$1\r\nb\r\n"
    assert encode_array(None, 3) == b"_\r\n"


def test_large_values_split_anywhere_parse_the_same_and_pending_counts_what_is_held():
    import random

    from services.dbproxy.resp import CommandParser, Limits, encode_command

    rnd = random.Random(7)
    big = bytes(rnd.getrandbits(8) for _ in range(300_000))
    stream = encode_command("SET", "k", big) + encode_command("PING") + encode_command("SET", "k2", big[:5000])
    for _ in range(5):
        p = CommandParser(Limits(max_buffer=1 << 20))
        got, pos = [], 0
        while pos < len(stream):
            n = rnd.choice((1, 7, 100, 4095, 4096, 20_000, 65_536))
            got += p.feed(stream[pos:pos + n])
            pos += n
            done = sum(len(c.raw) for c in got)
            assert p.pending == min(pos, len(stream)) - done
        assert [c.argv for c in got] == [[b"SET", b"k", big], [b"PING"], [b"SET", b"k2", big[:5000]]]
        assert b"".join(c.raw for c in got) == stream


def test_whole_replies_counts_a_chunk_of_whole_replies_and_refuses_the_rest():
    framer = ReplyFramer()
    data = b"+OK\r\n$3\r\nabc\r\n-ERR no\r\n:42\r\n*2\r\n$1\r\na\r\n*-1\r\n$-1\r\n"
    assert framer.whole_replies(data) == 6  # the array holds a bulk and a null array
    # A reply cut at the end: nothing is consumed, and feed() frames the chunk as ever.
    assert framer.whole_replies(b"+OK\r\n$5\r\nab") == -1
    assert [f.kind for f in framer.feed(b"+OK\r\n$5\r\nab")] == ["+"] and framer.in_frame
    # Mid-frame (the rest of that bulk first): the framer's own state decides.
    assert framer.whole_replies(b"cde\r\n+OK\r\n") == -1
    assert [f.kind for f in framer.feed(b"cde\r\n+OK\r\n")] == ["$", "+"] and not framer.in_frame
    # The reader the refused chunk was fed to kept none of it: the next whole chunk counts alone.
    assert framer.whole_replies(b":1\r\n") == 1
    # Bytes hiredis refuses go to feed(), which names the error the session ends with.
    assert framer.whole_replies(b"$abc\r\nxyz\r\n") == -1
    with pytest.raises(ProtocolError):
        framer.feed(b"$abc\r\nxyz\r\n")


def test_whole_replies_counts_a_chunk_only_when_it_ends_where_a_reply_ends():
    """Cut anywhere, even right after a type byte or between the elements of an array (where
    hiredis has taken every byte but the reply is not whole), a chunk is counted only when
    it ends where a reply ends; a cut chunk leaves nothing behind for the next one."""
    stream = b":1\r\n*2\r\n$1\r\na\r\n*1\r\n:7\r\n$0\r\n\r\n+OK\r\n-ERR x\r\n*0\r\n$-1\r\n"
    ends = {cut for cut in range(1, len(stream) + 1) if not _cut(stream[:cut])}
    assert len(ends) == 7  # one per reply
    for cut in range(1, len(stream) + 1):
        framer = ReplyFramer()
        n = framer.whole_replies(stream[:cut])
        if cut in ends:
            assert n == len(ReplyFramer().feed(stream[:cut])), cut
        else:
            assert n == -1, (cut, stream[:cut])
        # Whatever happened, the next chunk is counted on its own.
        assert ReplyFramer().whole_replies(b":5\r\n") == 1


def _cut(data: bytes) -> bool:
    framer = ReplyFramer()
    framer.feed(data)
    return framer.in_frame


def _resp2_reply(rng: random.Random, depth: int = 0) -> bytes:
    kind = rng.randrange(7 if depth < 3 else 5)
    if kind <= 3:
        return _simple_reply(rng, kind)
    if kind == 4:
        return rng.choice([b"$-1\r\n", b"*-1\r\n", b"*0\r\n"])
    n = rng.randint(1, 4)
    return b"*%d\r\n" % n + b"".join(_resp2_reply(rng, depth + 1) for _ in range(n))


@pytest.mark.parametrize("seed", range(5))
def test_whole_replies_agrees_with_feed_on_resp2_streams(seed):
    """Chunks of whole replies, some cut in two anywhere: counted by whole_replies where it
    can, framed by feed where it refuses, the count is feed's alone."""
    rng = random.Random(seed)
    replies = [_resp2_reply(rng) for _ in range(300)]
    chunks = []
    i = 0
    while i < len(replies):
        k = rng.randint(1, 20)
        whole = b"".join(replies[i : i + k])
        i += k
        if rng.random() < 0.3:
            cut = rng.randrange(1, len(whole))
            chunks += [whole[:cut], whole[cut:]]
        else:
            chunks.append(whole)
    fast, slow = ReplyFramer(), ReplyFramer()
    counted = framed = quick = 0
    for chunk in chunks:
        framed += len(slow.feed(chunk))
        n = fast.whole_replies(chunk)
        if n >= 0:
            quick += 1
            counted += n
        else:
            counted += len(fast.feed(chunk))
    assert counted == framed == len(replies)
    assert quick and not fast.in_frame
