"""Sans-io RESP protocol core of the dbproxy data plane.

Nothing here touches sockets or asyncio: the listener feeds bytes in and gets
parsed commands (client -> proxy) or reply frame boundaries (upstream -> client)
out, so the same code serves the TLS listener, the tunnel and the tests.

* `CommandParser` turns the client byte stream into `Command` objects. A command
  sent as a RESP array keeps its exact bytes in `Command.raw` (forwarded
  unchanged when allowed); an inline command is re-encoded as RESP so the
  upstream only ever sees RESP. The parser is strict: it accepts only the
  canonical encoding (no leading zeros, CRLF everywhere, bulk strings only), so
  the bytes it forwards mean to the server exactly what was checked. Limits are
  enforced from the headers, before the announced data is buffered.
* `ReplyFramer` follows the reply stream without building values: it reports
  where each top-level frame ends, and tells replies apart from RESP3 push and
  attribute frames (and, for RESP2 subscribed mode, pub/sub messages). Its
  `whole_replies` counts, at C speed (hiredis's reader), the replies of a chunk
  that is nothing but whole RESP2 replies: the common case, where every frame
  answers a command and the chunk needs no boundaries.
* `encode_*` helpers build the replies the proxy sends itself.

Speed: the hot path splits each fed chunk once on CRLF (one C call) and then
handles a canonical command with a few dictionary lookups per argument; only
unusual input (large or CRLF-carrying arguments, inline commands, commands cut
by the chunk boundary, errors) takes the byte-by-header slow path.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Iterable, NamedTuple

import hiredis

__all__ = [
    "Command",
    "CommandParser",
    "Frame",
    "Limits",
    "ProtocolError",
    "ReplyFramer",
    "encode_array",
    "encode_bulk",
    "encode_command",
    "encode_error",
    "encode_integer",
    "encode_null",
    "encode_push",
    "encode_simple",
    "is_pubsub_message",
    "split_inline",
]

CRLF = b"\r\n"

_MiB = 1024 * 1024


@dataclass(frozen=True, slots=True)
class Limits:
    """Bounds on what one client may send.

    max_buffer bounds the bytes held for one incomplete command, so it is also
    the largest single request accepted (whatever max_bulk_len allows): raise
    it together with max_bulk_len to accept values larger than 16 MiB.
    """

    max_bulk_len: int = 512 * _MiB
    max_array_len: int = 1024 * 1024
    max_inline_len: int = 64 * 1024
    max_buffer: int = 16 * _MiB


class ProtocolError(Exception):
    """Malformed or oversized input; the session must end after replying.

    `str(err)` is one line, e.g. "invalid bulk length"; `err.reply()` is the
    error reply for the client (`-ERR Protocol error: ...`). `commands` holds
    the well-formed commands that preceded the error in the same feed (the
    server would have run them before failing), so the caller may still handle
    them in order.
    """

    def __init__(self, message: str, commands: list[Command] | None = None) -> None:
        super().__init__(message)
        self.commands: list[Command] = commands if commands is not None else []

    def reply(self) -> bytes:
        return encode_error("Protocol error: " + str(self))


class Command(NamedTuple):
    """One client command: its arguments, its RESP bytes, its uppercased name."""

    argv: list[bytes]
    raw: bytes
    name: str


_new_tuple = tuple.__new__

# Canonical header lines the fast path knows (anything else takes the slow path).
_FAST_MAX_ARGS = 1024
_FAST_MAX_BULK = 4095


@lru_cache(maxsize=8)
def _fast_tables(max_array_len: int, max_bulk_len: int) -> tuple[dict[bytes, int], dict[bytes, int]]:
    arrays = {b"*%d" % i: i for i in range(1, min(_FAST_MAX_ARGS, max_array_len) + 1)}
    bulks = {b"$%d" % i: i for i in range(0, min(_FAST_MAX_BULK, max_bulk_len) + 1)}
    return arrays, bulks


# Command names seen so far (bytes as sent -> uppercased str); bounded so odd
# input cannot grow it without end.
_NAMES: dict[bytes, str] = {}
_NAMES_MAX = 4096


def _name_of(first: bytes) -> str:
    name = first.upper().decode("latin-1")
    if len(_NAMES) < _NAMES_MAX and len(first) <= 64:
        _NAMES[first] = name
    return name


def _show_byte(b: int) -> str:
    return chr(b) if 0x20 <= b < 0x7F else "\\x%02x" % b


def _parse_len(line: bytes | bytearray, allow_null: bool) -> int | None:
    """Strict RESP length: "0", or digits without a leading zero; with ``allow_null``
    also a negative number written the same way (the server ignores ``*-10`` as it
    ignores ``*-1``)."""
    if line.isdigit():
        if line[0] == 0x30 and len(line) > 1:
            return None
        return int(line)
    if allow_null and line[:1] == b"-" and line[1:].isdigit() and line[1:2] != b"0":
        return int(line)
    return None


# The server's largest multibulk count (INT_MAX): beyond it, its "invalid multibulk length".
_INT_MAX = 2**31 - 1


# The longest header line worth waiting for: "*" or "$" plus 20 digits.
_MAX_HEADER = 21


def _check_partial(part: bytes | bytearray, allow_null: bool, limit: int, invalid: str, too_big: str) -> None:
    """Reject an unfinished header line as soon as it cannot become valid."""
    if part[-1:] == b"\r":
        part = part[:-1]
    if not part or (allow_null and part == b"-"):
        return
    if len(part) > _MAX_HEADER - 1 or _parse_len(part, allow_null) is None:
        raise ProtocolError(invalid)
    value = int(part)
    if value > _INT_MAX:
        raise ProtocolError(invalid)
    if value > limit:
        raise ProtocolError(too_big)

# Inline argument splitting -------------------------------------------------

# Characters that need the full splitter (quotes, and whitespace that only the
# leading-blank skip treats as a separator).
_INLINE_SPECIAL = re.compile(rb"[\"'\x0b\x0c]")
_HEX = b"0123456789abcdefABCDEF"
_ESCAPES = {ord("n"): 10, ord("r"): 13, ord("t"): 9, ord("b"): 8, ord("a"): 7}
_BLANKS = b" \t\n\r\x0b\x0c"  # what the server's isspace() skips between arguments
_ENDS = b" \n\r\t"  # what ends an unquoted argument


def split_inline(line: bytes) -> list[bytes]:
    """Split one inline request line the way the server does.

    Arguments are separated by blanks; "double quotes" take \\n \\r \\t \\b \\a,
    \\xHH and \\<any> escapes, 'single quotes' take only \\'; a closing quote
    must be followed by a blank or the end of the line. Raises ProtocolError
    ("unbalanced quotes in request") otherwise.
    """
    if b"\0" in line:
        line = line[: line.index(b"\0")]  # the server reads the line as a C string
    if _INLINE_SPECIAL.search(line) is None:
        return line.split()
    out: list[bytes] = []
    n = len(line)
    p = 0
    while True:
        while p < n and line[p] in _BLANKS:
            p += 1
        if p >= n:
            return out
        cur = bytearray()
        inq = insq = False
        while True:
            c = line[p] if p < n else 0
            if inq:
                if c == 0x5C and p + 3 < n and line[p + 1] == 0x78 and line[p + 2] in _HEX and line[p + 3] in _HEX:
                    cur.append(int(line[p + 2 : p + 4], 16))
                    p += 3
                elif c == 0x5C and p + 1 < n:
                    p += 1
                    e = line[p]
                    cur.append(_ESCAPES.get(e, e))
                elif c == 0x22:
                    if p + 1 < n and line[p + 1] not in _BLANKS:
                        raise ProtocolError("unbalanced quotes in request")
                    p += 1
                    break
                elif p >= n:
                    raise ProtocolError("unbalanced quotes in request")
                else:
                    cur.append(c)
            elif insq:
                if c == 0x5C and p + 1 < n and line[p + 1] == 0x27:
                    p += 1
                    cur.append(0x27)
                elif c == 0x27:
                    if p + 1 < n and line[p + 1] not in _BLANKS:
                        raise ProtocolError("unbalanced quotes in request")
                    p += 1
                    break
                elif p >= n:
                    raise ProtocolError("unbalanced quotes in request")
                else:
                    cur.append(c)
            else:
                if p >= n or c in _ENDS:
                    break
                if c == 0x22:
                    inq = True
                elif c == 0x27:
                    insq = True
                else:
                    cur.append(c)
            p += 1
        out.append(bytes(cur))


# Command parser ------------------------------------------------------------

_INLINE = -2  # state marker: the pending bytes are an inline line


class CommandParser:
    """Incremental parser of the client -> proxy byte stream.

    `feed(data)` returns the commands completed by `data`, in order. Input may
    be split anywhere. After a ProtocolError the parser stays failed: the
    session must end (reply with `err.reply()` first).
    """

    def __init__(self, limits: Limits | None = None) -> None:
        self.limits = limits = limits or Limits()
        self._arrays, self._bulks = _fast_tables(limits.max_array_len, limits.max_bulk_len)
        self._max_buffer = limits.max_buffer
        self._error: ProtocolError | None = None
        # State of one incomplete command (None when there is none).
        self._pend: bytearray | None = None
        self._k = 0  # arguments still to read; -1 before the "*N" header; _INLINE
        self._off = 0  # next offset to parse in _pend
        self._need = 0  # _pend must reach this length before parsing can progress
        # Chunks received for _pend while it cannot progress, joined once it can (a large
        # value arriving slowly is not copied again with every chunk).
        self._tail: list[bytes] = []
        self._tail_len = 0
        self._argv: list[bytes] = []

    @property
    def pending(self) -> int:
        """Bytes held for an incomplete command."""
        return len(self._pend) + self._tail_len if self._pend is not None else 0

    def discard(self, reason: str) -> None:
        """Drop the incomplete command (its memory goes now); later feeds raise ``reason``."""
        self._pend = None
        self._tail, self._tail_len = [], 0
        self._argv = []
        self._error = ProtocolError(reason)

    def feed(self, data: bytes) -> list[Command]:
        if self._error is not None:
            raise self._error
        out: list[Command] = []
        try:
            if self._pend is not None:
                pend = self._pend
                have = len(pend) + self._tail_len + len(data)
                if have < self._need:
                    if have > self._max_buffer:  # pragma: no cover - need is bounded by it
                        raise ProtocolError("too big request")
                    if len(data) >= 4096 or self._tail:
                        self._tail.append(bytes(data))
                        self._tail_len += len(data)
                    else:
                        pend += data
                    return out
                if self._tail:
                    self._tail.append(data)
                    pend += b"".join(self._tail)
                    self._tail, self._tail_len = [], 0
                else:
                    pend += data
                end = self._resume(out)
                if end < 0:
                    return out
                data = bytes(pend[end:])
                self._pend = None
                if not data:
                    return out
            # The hot path (here, not in a function of its own: it runs for every read):
            # split the chunk on CRLF once, take each canonical command from the pieces.
            buf = data if type(data) is bytes else bytes(data)
            append = out.append
            arrays = self._arrays.get
            bulks = self._bulks.get
            names = _NAMES.get
            maxbuf = self._max_buffer
            new = _new_tuple
            t = buf.split(b"\r\n")
            last = len(t) - 1  # t[last] is not followed by CRLF
            n = len(buf)
            i = 0
            pos = 0  # byte offset of t[i]
            while pos < n:
                if i < last:
                    head = t[i]
                    k = arrays(head)
                    if k is not None:
                        j = i + 1 + 2 * k
                        if j <= last:
                            size = len(head) + 2
                            argv = []
                            h = i + 1
                            while h < j:
                                hd = t[h]
                                ln = bulks(hd)
                                v = t[h + 1]
                                if ln != len(v):
                                    break
                                argv.append(v)
                                size += len(hd) + ln + 4
                                h += 2
                            else:
                                if size > maxbuf:
                                    raise ProtocolError("too big request")
                                end = pos + size
                                first = argv[0]
                                name = names(first)
                                if name is None:
                                    name = _name_of(first)
                                append(new(Command, (argv, buf[pos:end], name)))
                                pos = end
                                i = j
                                continue
                # Anything else: one unit by headers, then find our place in t again.
                end = self._slow(buf, pos, out)
                if end < 0:
                    return out
                off = pos
                while i < last and off + len(t[i]) + 2 <= end:
                    off += len(t[i]) + 2
                    i += 1
                if off < end:  # the unit ended inside t[i] (an inline line ended by a bare LF)
                    t[i] = t[i][end - off :]
                pos = end
        except ProtocolError as err:
            self._pend = None
            self._tail, self._tail_len = [], 0
            err.commands = out
            self._error = err
            raise
        return out

    # -- slow path ----------------------------------------------------------
    def _slow(self, buf: bytes, start: int, out: list[Command]) -> int:
        """Parse one unit at buf[start:]; return its end, or -1 after saving it as pending."""
        if buf[start] == 0x2A:  # '*'
            end = self._multibulk(buf, start, start, -1, [], out)
        else:
            end = self._inline(buf, start, start, out)
        if end < 0:
            # Keep the incomplete unit (offsets rebased to it).
            self._pend = bytearray(buf[start:]) if start else bytearray(buf)
            self._off -= start
            self._need -= start
        return end

    def _resume(self, out: list[Command]) -> int:
        pend = self._pend
        assert pend is not None
        if self._k == _INLINE:
            return self._inline(pend, 0, self._off, out)
        return self._multibulk(pend, 0, self._off, self._k, self._argv, out)

    def _suspend(self, off: int, k: int, argv: list[bytes], need: int) -> int:
        self._off, self._k, self._argv, self._need = off, k, argv, need
        return -1

    def _multibulk(self, buf, start: int, off: int, k: int, argv: list[bytes], out: list[Command]) -> int:
        lim = self.limits
        maxbuf = self._max_buffer
        n = len(buf)
        if k < 0:
            nl = buf.find(b"\r\n", off, off + _MAX_HEADER + 2)
            if nl < 0:
                _check_partial(buf[off + 1 : n], True, lim.max_array_len, "invalid multibulk length", "too big multibulk count")
                return self._suspend(off, -1, argv, n + 1)
            k = _parse_len(buf[off + 1 : nl], True)
            if k is None or k > _INT_MAX:
                raise ProtocolError("invalid multibulk length")
            off = nl + 2
            if k <= 0:  # "*0" and "*-1" or "*-10": nothing to run (the server ignores them too)
                return off
            if k > lim.max_array_len:
                raise ProtocolError("too big multibulk count")
            if off - start + 6 * k > maxbuf:
                raise ProtocolError("too big request")
            argv = []
        while k:
            if off >= n:
                return self._suspend(off, k, argv, n + 1)
            c = buf[off]
            if c != 0x24:  # '$'
                raise ProtocolError("expected '$', got '%s'" % _show_byte(c))
            nl = buf.find(b"\r\n", off, off + _MAX_HEADER + 2)
            if nl < 0:
                _check_partial(buf[off + 1 : n], False, lim.max_bulk_len, "invalid bulk length", "invalid bulk length")
                return self._suspend(off, k, argv, n + 1)
            ln = _parse_len(buf[off + 1 : nl], False)
            if ln is None or ln > lim.max_bulk_len:
                raise ProtocolError("invalid bulk length")
            data = nl + 2
            end = data + ln
            if end + 2 - start > maxbuf:
                raise ProtocolError("too big request")
            if end + 2 > n:
                return self._suspend(off, k, argv, end + 2)
            if buf[end] != 0x0D or buf[end + 1] != 0x0A:
                raise ProtocolError("expected CRLF after bulk string")
            argv.append(bytes(buf[data:end]))
            off = end + 2
            k -= 1
        out.append(_new_tuple(Command, (argv, bytes(buf[start:off]), _names_get(argv[0]))))
        return off

    def _inline(self, buf, start: int, off: int, out: list[Command]) -> int:
        maxlen = self.limits.max_inline_len
        n = len(buf)
        nl = buf.find(b"\n", off, start + maxlen + 1)
        if nl < 0:
            if n - start > maxlen:
                raise ProtocolError("too big inline request")
            return self._suspend(n, _INLINE, [], n + 1)
        end = nl + 1
        if nl > start and buf[nl - 1] == 0x0D:
            nl -= 1
        line = bytes(buf[start:nl])
        if 0 in line:
            # The server never runs such a line (it would wait for more input).
            raise ProtocolError("invalid inline request")
        argv = split_inline(line)
        if argv:
            out.append(_new_tuple(Command, (argv, encode_command(*argv), _names_get(argv[0]))))
        return end


def _names_get(first: bytes) -> str:
    name = _NAMES.get(first)
    return name if name is not None else _name_of(first)


# Reply framer -------------------------------------------------------------


class Frame(NamedTuple):
    """One complete top-level item of the reply stream.

    kind: the type byte of the frame ("+", "-", ":", "$", "*", "_", ",", "#",
    "!", "=", "(", "%", "~", ">" push, "|" attribute). raw_len: its size in
    bytes (it may have started in an earlier feed). end: the offset just past
    it in the chunk given to the `feed` call that completed it. tag: the first
    element of an array or push frame when it is a short string (b"message",
    b"pmessage", b"subscribe", b"invalidate"...), else None.
    """

    kind: str
    raw_len: int
    end: int
    is_push: bool
    tag: bytes | None

    @property
    def is_attribute(self) -> bool:
        return self.kind == "|"

    @property
    def is_reply(self) -> bool:
        """True for a reply to a command (not a push or an attribute)."""
        return self.kind != ">" and self.kind != "|"


_PUBSUB_MESSAGES = frozenset((b"message", b"pmessage", b"smessage"))


def is_pubsub_message(frame: Frame) -> bool:
    """Is this a pub/sub message (not a reply)?

    A push frame is never a reply; a RESP2 array whose first element is
    "message", "pmessage" or "smessage" is a pub/sub message only while the
    session is subscribed (then no command can return such an array).
    """
    return frame.kind == ">" or (frame.kind == "*" and frame.tag in _PUBSUB_MESSAGES)


_LINE_TYPES = frozenset(b"+-:,#_(")
_BLOB_TYPES = frozenset(b"$!=")
_AGG_TYPES = frozenset(b"*~>")
_PAIR_TYPES = frozenset(b"%|")
_ATTR = 1
_STREAM_STR = 2
_TAG_MAX = 32  # first elements up to this size are remembered as the frame's tag


def _new_counter() -> hiredis.Reader:
    return hiredis.Reader(notEnoughData=Ellipsis)


_COUNTER = _new_counter()  # ReplyFramer.whole_replies: empty between calls
_END_PROBE_VALUE = b"cachegate:end-of-chunk"
_END_PROBE = b"+" + _END_PROBE_VALUE + b"\r\n"


class ReplyFramer:
    """Follows the upstream -> client byte stream without building values.

    Bulk payloads are skipped, not copied, so memory stays bounded by the
    longest header line (max_line). Accepts RESP2 and RESP3 (including
    attributes and streamed strings/aggregates) whatever `protocol` says; the
    attribute is there for the caller to record what the session negotiated.
    """

    def __init__(self, protocol: int = 2, *, max_line: int = _MiB, max_depth: int = 100_000) -> None:
        self.protocol = protocol
        self.max_line = max_line
        self.max_depth = max_depth
        self._error: ProtocolError | None = None
        self._line = b""  # a partial header (or small first element) carried over
        self._stack: list[list[int]] = []  # [remaining elements, flags] per open aggregate
        self._skip = 0  # payload bytes (with CRLF) still to skip
        self._skip_elem = False  # does the skipped payload end an element?
        self._tail = b""  # the last bytes skipped so far: the payload's CRLF is checked at its end
        self._acc = 0  # bytes of the current frame consumed in earlier feeds
        self._kind = ""  # type of the current top-level frame
        self._tag: bytes | None = None
        self._want_tag = False

    @property
    def in_frame(self) -> bool:
        """True while a top-level frame is incomplete."""
        return bool(self._stack or self._skip or self._line)

    def whole_replies(self, data: bytes) -> int:
        """How many replies ``data`` holds when it begins where the last fed chunk ended a
        frame and is nothing but whole frames; -1 otherwise (a frame begun before or cut at
        its end, or bytes hiredis refuses), and then nothing was consumed: :meth:`feed` it.

        Only for a RESP2 stream outside subscribed mode, where every frame answers a
        command. hiredis's reader (one per process, empty between calls) builds the values
        and they are dropped: for a chunk of small replies that is many times quicker than
        :meth:`feed`. hiredis does not check the CRLF after a bulk payload: such a reply is
        counted where its length says it ends, as clients read it, instead of ending the
        session."""
        global _COUNTER
        if self._line or self._stack or self._skip:
            return -1
        counter = _COUNTER
        n = 0
        try:
            counter.feed(data)
            gets = counter.gets
            while gets() is not Ellipsis:
                n += 1
            # Did the chunk end where a frame ends? has_data() cannot tell: it is False once
            # hiredis has taken a lone type byte or the elements so far of an array that is
            # cut. A frame of our own after it can: only at a frame's end is it read back as
            # itself (inside a cut frame it is part of that frame, and a bulk of it would
            # begin with the "+"), with nothing left over.
            counter.feed(_END_PROBE)
            whole = gets() == _END_PROBE_VALUE and not counter.has_data()
        except hiredis.ProtocolError:
            whole = False
        if not whole:
            _COUNTER = _new_counter()  # what was fed is dropped with it
            return -1
        return n

    def is_out_of_band(self, frame: Frame, subscribed: bool = False) -> bool:
        """True when `frame` does not answer a command: push, attribute, or
        (RESP2 while subscribed) a pub/sub message."""
        if frame.kind == ">" or frame.kind == "|":
            return True
        return subscribed and self.protocol == 2 and frame.kind == "*" and frame.tag in _PUBSUB_MESSAGES

    def feed(self, chunk: bytes) -> list[Frame]:
        if self._error is not None:
            raise self._error
        try:
            out: list[Frame] = []
            append = out.append
            new = _new_tuple
            stack = self._stack
            data = chunk
            base = 0
            if self._line:
                base = len(self._line)
                data = self._line + chunk
                self._line = b""
            n = len(data)
            pos = 0
            fstart = 0  # where the current frame starts in data (0: it began earlier)
            done = False
            if self._skip:
                if self._skip > n:
                    self._skip -= n
                    self._acc += n
                    self._tail = (self._tail + data[-2:])[-2:]
                    return out
                pos = self._skip
                self._skip = 0
                if (self._tail + data[max(0, pos - 2):pos])[-2:] != b"\r\n":
                    raise ProtocolError("expected CRLF after bulk string in reply")
                done = self._skip_elem
            find = data.find
            while True:
                if done:
                    # One element (or a whole top-level item) is complete at pos.
                    done = False
                    complete = True
                    while stack:
                        top = stack[-1]
                        top[0] -= 1
                        if top[0]:
                            complete = False
                            break
                        stack.pop()
                        if top[1] == _ATTR and stack:
                            complete = False  # an attribute is not an element of its parent
                            break
                        if top[1] == _ATTR:
                            break  # a top-level attribute is its own frame
                    if complete:
                        append(new(Frame, (self._kind, self._acc + pos - fstart, pos - base, self._kind == ">", self._tag)))
                        self._acc = 0
                        self._tag = None
                        fstart = pos
                if pos >= n:
                    break
                nl = find(b"\r\n", pos)
                if nl < 0:
                    self._carry(data, pos)
                    break
                c = data[pos]
                if not stack:
                    self._kind = chr(c)
                    self._tag = None
                if c in _LINE_TYPES:
                    if self._want_tag:
                        self._want_tag = False
                        if c == 0x2B and nl - pos <= _TAG_MAX:
                            self._tag = data[pos + 1 : nl].lower()
                    pos = nl + 2
                    done = True
                    continue
                if c in _BLOB_TYPES:
                    head = data[pos + 1 : nl]
                    ln = _LENGTHS.get(head)
                    if ln is None:
                        if c == 0x24 and head == b"?":  # streamed string: ";n" chunks up to ";0"
                            self._want_tag = False
                            self._push(stack, -1, _STREAM_STR)
                            pos = nl + 2
                            continue
                        ln = _reply_len(head)
                    if ln < 0:
                        if ln != -1 or c != 0x24:
                            raise ProtocolError("invalid bulk length in reply")
                        self._want_tag = False
                        pos = nl + 2
                        done = True
                        continue
                    end = nl + 4 + ln
                    if end <= n:
                        if data[end - 2] != 0x0D or data[end - 1] != 0x0A:
                            raise ProtocolError("expected CRLF after bulk string in reply")
                        if self._want_tag:
                            self._want_tag = False
                            if c == 0x24 and ln <= _TAG_MAX:
                                self._tag = data[nl + 2 : end - 2].lower()
                        pos = end
                        done = True
                        continue
                    if self._want_tag and ln <= _TAG_MAX:
                        # Keep the small first element whole so its tag can be read.
                        self._carry(data, pos)
                        break
                    self._want_tag = False
                    self._skip = end - n
                    self._skip_elem = True
                    self._tail = data[nl + 2:n][-2:]
                    pos = n
                    break
                if c in _AGG_TYPES or c in _PAIR_TYPES:
                    head = data[pos + 1 : nl]
                    cnt = _LENGTHS.get(head)
                    if cnt is None:
                        cnt = -3 if head == b"?" else _reply_len(head)
                    pos = nl + 2
                    if self._want_tag:
                        self._want_tag = False
                    if cnt == -3:  # streamed aggregate, ended by "."
                        self._push(stack, -1, 0)
                        continue
                    if cnt <= 0:
                        if cnt < -1 or (cnt == -1 and c != 0x2A):
                            raise ProtocolError("invalid aggregate length in reply")
                        if c == 0x7C and stack:
                            continue  # an empty attribute inside an aggregate: no element
                        done = True
                        continue
                    if c in _PAIR_TYPES:
                        cnt *= 2
                    self._push(stack, cnt, _ATTR if c == 0x7C else 0)
                    if len(stack) == 1 and (c == 0x2A or c == 0x3E):
                        self._want_tag = True
                    continue
                if c == 0x3B:  # ';' streamed string chunk
                    if not stack or stack[-1][1] != _STREAM_STR:
                        raise ProtocolError("unexpected streamed string chunk in reply")
                    ln = _reply_len(data[pos + 1 : nl])
                    if ln < 0:
                        raise ProtocolError("invalid bulk length in reply")
                    if ln == 0:
                        stack[-1][0] = 1  # the next decrement closes it
                        pos = nl + 2
                        done = True
                        continue
                    end = nl + 4 + ln
                    if end <= n:
                        if data[end - 2] != 0x0D or data[end - 1] != 0x0A:
                            raise ProtocolError("expected CRLF after bulk string in reply")
                        pos = end
                        continue
                    self._skip = end - n
                    self._skip_elem = False
                    self._tail = data[nl + 2:n][-2:]
                    pos = n
                    break
                if c == 0x2E:  # '.' end of a streamed aggregate
                    if not stack or stack[-1][0] >= 0 or stack[-1][1] == _STREAM_STR:
                        raise ProtocolError("unexpected end of aggregate in reply")
                    stack[-1][0] = 1
                    pos = nl + 2
                    done = True
                    continue
                raise ProtocolError("unexpected type byte %r in reply" % _show_byte(c))
            self._acc += pos - fstart
            return out
        except ProtocolError as err:
            self._error = err
            raise

    def _carry(self, data: bytes, pos: int) -> None:
        part = data[pos:]
        if len(part) > self.max_line:
            raise ProtocolError("reply line too long")
        self._line = part

    def _push(self, stack: list[list[int]], count: int, flags: int) -> None:
        if len(stack) >= self.max_depth:
            raise ProtocolError("reply nested too deeply")
        stack.append([count, flags])


_LENGTHS = {b"%d" % i: i for i in range(-1, 4096)}


def _reply_len(head: bytes) -> int:
    try:
        value = int(head)
    except ValueError:
        raise ProtocolError("invalid length in reply") from None
    if not head.lstrip(b"-").isdigit():
        raise ProtocolError("invalid length in reply")
    return value


# Encoding -----------------------------------------------------------------


def _as_bytes(arg: object) -> bytes:
    if isinstance(arg, bytes):
        return arg
    if isinstance(arg, str):
        return arg.encode("utf-8")
    if isinstance(arg, (bytearray, memoryview)):
        return bytes(arg)
    if isinstance(arg, bool):
        raise TypeError("bool is not a RESP argument")
    if isinstance(arg, (int, float)):
        return repr(arg).encode("ascii")
    raise TypeError(f"cannot encode {type(arg).__name__} as a RESP argument")


def encode_command(*args: bytes | str | int | float) -> bytes:
    """A command as a RESP array of bulk strings (what clients send)."""
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        b = _as_bytes(arg)
        parts.append(b"$%d\r\n" % len(b))
        parts.append(b)
        parts.append(CRLF)
    return b"".join(parts)


def _one_line(text: str) -> str:
    return text.replace("\r\n", " ").replace("\r", " ").replace("\n", " ")


_ERROR_CODE = re.compile(r"[A-Z][A-Z0-9_]+(?: |$)")


def encode_error(msg: str) -> bytes:
    """`-ERR msg` (one line), or `-CODE rest` when msg starts with an error
    code word such as NOPERM or WRONGPASS."""
    msg = _one_line(msg).lstrip("-")
    if not _ERROR_CODE.match(msg):
        msg = "ERR " + msg
    return b"-" + msg.encode("utf-8", "replace") + CRLF


def encode_simple(text: str | bytes) -> bytes:
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    return b"+" + _one_line(text).encode("utf-8") + CRLF


def encode_integer(value: int) -> bytes:
    return b":%d\r\n" % value


def encode_null(protocol: int = 2) -> bytes:
    return b"_\r\n" if protocol >= 3 else b"$-1\r\n"


def encode_bulk(value: bytes | str | None, protocol: int = 2) -> bytes:
    if value is None:
        return encode_null(protocol)
    b = _as_bytes(value)
    return b"$%d\r\n%s\r\n" % (len(b), b)


def _encode_item(item: object, protocol: int) -> bytes:
    if item is None:
        return encode_null(protocol)
    if isinstance(item, bool):
        if protocol >= 3:
            return b"#t\r\n" if item else b"#f\r\n"
        return b":1\r\n" if item else b":0\r\n"
    if isinstance(item, int):
        return encode_integer(item)
    if isinstance(item, (list, tuple)):
        return encode_array(item, protocol)
    return encode_bulk(item)  # type: ignore[arg-type]


def encode_array(items: Iterable[object] | None, protocol: int = 2) -> bytes:
    """An array: bytes/str items as bulk strings, ints as integers, None as
    null, lists nested. `items=None` is the null array."""
    if items is None:
        return b"_\r\n" if protocol >= 3 else b"*-1\r\n"
    items = list(items)
    return b"*%d\r\n" % len(items) + b"".join(_encode_item(i, protocol) for i in items)


def encode_push(items: Iterable[object]) -> bytes:
    """A RESP3 push frame (pub/sub messages and other out-of-band data)."""
    items = list(items)
    return b">%d\r\n" % len(items) + b"".join(_encode_item(i, 3) for i in items)
