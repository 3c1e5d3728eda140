"""Redis Cluster behind one endpoint: the sans-io router between a session and the shards.

A database whose clustering policy is ``OSSCluster`` (Azure Managed Redis by default, or a
static database with ``cluster: true``) is a Redis Cluster: each key lives on the primary
that serves its hash slot. :class:`ClusterRouter` stands where the single upstream
connection of a session would be. The session core (RBAC, audit, reply bookkeeping) feeds
it the bytes it would send the database; the router splits them into commands, sends each
to the primary of its slot (over one connection per primary), follows ``MOVED`` and ``ASK``,
and gives back one reply stream in the order of the commands, as a single Redis would.

* Keys: :func:`key_slot` (CRC16 with ``{hash tags}``), :func:`command_keys` (the generated
  key table plus the commands whose keys move).
* Multi-key commands Redis allows across slots on one endpoint (MGET, MSET, DEL, UNLINK,
  EXISTS, TOUCH) are split per slot and their replies merged; other commands whose keys
  span slots get Redis's own ``CROSSSLOT`` error.
* KEYS, SCAN (one cursor across the shards: :func:`encode_scan_cursor`), DBSIZE, FLUSHDB,
  FLUSHALL, RANDOMKEY and INFO (keyspace summed) run on every primary; SCRIPT/FUNCTION
  loading, CONFIG SET, CLIENT SETNAME/TRACKING, HELLO, AUTH, RESET and SELECT go to every
  connection so that each one is in the session's state.
* MULTI/EXEC and WATCH run on the primary of the transaction's slot; a command of another
  slot inside it is a queueing error (``CROSSSLOT``), so that EXEC answers ``EXECABORT``. A
  transaction whose slot moves meanwhile runs again where the slot is (a watched one fails
  as a WATCH conflict: its WATCH cannot move with it).
* Subscriptions of a lost connection are made again on the new primary; CLIENT REPLY is
  followed here.
* SUBSCRIBE/PSUBSCRIBE go to one primary (Redis Cluster delivers PUBLISH to every node);
  SSUBSCRIBE and SPUBLISH to the channel's shard. Messages from any shard are passed on.
* CLUSTER SLOTS, SHARDS, NODES, INFO and MYID are answered here: one node, the proxy
  itself, serves every slot, so cluster-aware clients (``redis-cli -c``, ``RedisCluster``)
  keep talking to the proxy; READONLY, READWRITE and ASKING are accepted.
* Retries are bounded: at most :data:`MAX_REDIRECTS` redirections per try of a command, and
  ``TRYAGAIN``/``CLUSTERDOWN`` or a shard that cannot be reached are tried again (a new try)
  for at most :data:`RETRY_WINDOW` seconds; then the client gets one clear error.

The asyncio shell (:mod:`services.dbproxy.clusterconn`) only connects, moves bytes, and
fetches the slot map when :attr:`ClusterRouter.wants_refresh` says so.
"""

from __future__ import annotations

import hashlib
import random
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import hiredis

from services.dbproxy._key_table import KEYS
from services.dbproxy.commands import SUBCOMMAND_PARENTS
from services.dbproxy.resp import (
    Command,
    CommandParser,
    Limits,
    ReplyFramer,
    encode_bulk,
    encode_command,
    encode_error,
)

__all__ = [
    "CROSSSLOT",
    "ClusterRouter",
    "SlotMap",
    "command_keys",
    "decode_scan_cursor",
    "encode_scan_cursor",
    "key_slot",
    "parse_cluster_slots",
]

SLOTS = 16384
MAX_REDIRECTS = 5
RETRY_WINDOW = 10.0  # seconds a command may wait for a shard (failover, resharding)
RETRY_DELAY = 0.1
# Redirections the routers of this process followed (tests and metrics read them).
REDIRECTS = {"MOVED": 0, "ASK": 0}
CROSSSLOT = b"-CROSSSLOT Keys in request don't hash to the same slot\r\n"
_OK = b"+OK\r\n"
_EXEC = b"*1\r\n$4\r\nEXEC\r\n"

# --------------------------------------------------------------------------------------------
# Slots and keys


def _crc16_table() -> list[int]:
    table = []
    for i in range(256):
        crc = i << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) if crc & 0x8000 else crc << 1
        table.append(crc & 0xFFFF)
    return table


_CRC = _crc16_table()


def crc16(data: bytes) -> int:
    crc = 0
    for b in data:
        crc = ((crc << 8) & 0xFFFF) ^ _CRC[((crc >> 8) ^ b) & 0xFF]
    return crc


def key_slot(key: bytes) -> int:
    """The hash slot of ``key``: CRC16 of the key, or of its first non-empty ``{tag}``."""
    start = key.find(b"{")
    if start >= 0:
        end = key.find(b"}", start + 1)
        if end > start + 1:
            key = key[start + 1:end]
    return crc16(key) % SLOTS


def _int(arg: bytes) -> int | None:
    try:
        return int(arg)
    except ValueError:
        return None


def _numkeys(argv: list[bytes], at: int) -> list[bytes]:
    n = _int(argv[at]) if len(argv) > at else None
    if n is None or n < 0:
        return []
    return argv[at + 1:at + 1 + n]


def _movable(name: str, argv: list[bytes]) -> list[bytes] | None:
    if name in ("EVAL", "EVALSHA", "EVAL_RO", "EVALSHA_RO", "FCALL", "FCALL_RO"):
        return _numkeys(argv, 2)
    if name in ("ZUNIONSTORE", "ZINTERSTORE", "ZDIFFSTORE"):
        return argv[1:2] + _numkeys(argv, 2)
    if name in ("ZUNION", "ZINTER", "ZDIFF", "ZINTERCARD", "SINTERCARD", "LMPOP", "ZMPOP"):
        return _numkeys(argv, 1)
    if name in ("BLMPOP", "BZMPOP"):
        return _numkeys(argv, 2)
    if name in ("XREAD", "XREADGROUP"):
        upper = [a.upper() for a in argv]
        if b"STREAMS" not in upper:
            return []
        i = upper.index(b"STREAMS") + 1
        rest = argv[i:]
        return rest[:len(rest) // 2]
    if name in ("SORT", "SORT_RO"):
        keys = argv[1:2]
        upper = [a.upper() for a in argv]
        if b"STORE" in upper and upper.index(b"STORE") + 1 < len(argv):
            keys.append(argv[upper.index(b"STORE") + 1])
        return keys
    if name in ("GEORADIUS", "GEORADIUSBYMEMBER"):
        keys = argv[1:2]
        upper = [a.upper() for a in argv]
        for word in (b"STORE", b"STOREDIST"):
            if word in upper and upper.index(word) + 1 < len(argv):
                keys.append(argv[upper.index(word) + 1])
        return keys
    if name == "MIGRATE":
        return []
    return None


def command_keys(name: str, argv: list[bytes]) -> list[bytes]:
    """The keys (or shard channels) of a command, in order; [] for a command without keys."""
    moved = _movable(name, argv)
    if moved is not None:
        return moved
    spec = None
    if name in SUBCOMMAND_PARENTS and len(argv) > 1:
        spec = KEYS.get(name + "|" + argv[1].decode("latin-1").upper())
    if spec is None:
        spec = KEYS.get(name)
    if spec is None:
        return []
    first, last, step = spec
    end = len(argv) + last if last < 0 else last
    return argv[first:end + 1:step] if first < len(argv) else []


# --------------------------------------------------------------------------------------------
# The slot map


@dataclass
class SlotMap:
    """Which primary (``host:port``) serves each slot; ``primaries`` ordered by first slot."""

    owner: list[str | None] = field(default_factory=lambda: [None] * SLOTS)

    @property
    def primaries(self) -> list[str]:
        seen: dict[str, None] = {}
        for node in self.owner:
            if node is not None and node not in seen:
                seen[node] = None
        return list(seen)

    def node_for(self, slot: int) -> str | None:
        return self.owner[slot]

    @property
    def complete(self) -> bool:
        return all(n is not None for n in self.owner)


def _text(x: object) -> str:
    return x.decode("utf-8", "replace") if isinstance(x, bytes) else str(x)


def node_name(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def split_name(name: str) -> tuple[str, int]:
    host, _, port = name.rpartition(":")
    return host.strip("[]"), int(port)


def parse_cluster_slots(reply: object, default_host: str) -> SlotMap:
    """A :class:`SlotMap` from a CLUSTER SLOTS reply as hiredis parses it (an empty or
    ``?`` host is the host the reply came from)."""
    if not isinstance(reply, list):
        raise ValueError("CLUSTER SLOTS did not answer an array")
    m = SlotMap()
    for entry in reply:
        if not isinstance(entry, list) or len(entry) < 3 or not isinstance(entry[2], list):
            raise ValueError("unexpected CLUSTER SLOTS entry")
        lo, hi = int(entry[0]), int(entry[1])
        host = _text(entry[2][0]) if entry[2] and entry[2][0] is not None else ""
        if host in ("", "?"):
            host = default_host
        name = node_name(host, int(entry[2][1]))
        for s in range(max(lo, 0), min(hi, SLOTS - 1) + 1):
            m.owner[s] = name
    return m


# --------------------------------------------------------------------------------------------
# SCAN across the shards: one cursor holds the shard's position and its own cursor.

_SHARD_BITS = 10  # up to 1024 primaries


def encode_scan_cursor(shard: int, cursor: int) -> bytes:
    return b"%d" % ((cursor << _SHARD_BITS) | shard)


def decode_scan_cursor(value: bytes) -> tuple[int, int] | None:
    n = _int(value)
    if n is None or n < 0:
        return None
    return n & ((1 << _SHARD_BITS) - 1), n >> _SHARD_BITS


# --------------------------------------------------------------------------------------------
# Reply helpers


def _parse(frame: bytes) -> object:
    r = hiredis.Reader(notEnoughData=Ellipsis)
    r.feed(frame)
    return r.gets()


def _is_error(frame: bytes) -> bool:
    return frame[:1] == b"-" or frame[:1] == b"!"


def _array(items: list[bytes]) -> bytes:
    return b"*%d\r\n" % len(items) + b"".join(items)


def _encode(value: object, proto: int) -> bytes:
    """A parsed reply value back to RESP (MGET/KEYS/SCAN elements: strings, nil, lists)."""
    if value is None:
        return b"_\r\n" if proto >= 3 else b"$-1\r\n"
    if isinstance(value, list):
        return _array([_encode(v, proto) for v in value])
    if isinstance(value, int):
        return b":%d\r\n" % value
    if isinstance(value, str):
        value = value.encode()
    return encode_bulk(value)


def _merge_first_error(frames: list[bytes]) -> bytes:
    for f in frames:
        if _is_error(f):
            return f
    return frames[0]


def _merge_sum(frames: list[bytes]) -> bytes:
    total = 0
    for f in frames:
        if _is_error(f):
            return f
        v = _parse(f)
        total += v if isinstance(v, int) else 0
    return b":%d\r\n" % total


def _merge_concat_arrays(proto: int) -> Callable[[list[bytes]], bytes]:
    def merge(frames: list[bytes]) -> bytes:
        items: list[object] = []
        for f in frames:
            if _is_error(f):
                return f
            v = _parse(f)
            if isinstance(v, list):
                items.extend(v)
        return _encode(items, proto)
    return merge


def _merge_random(frames: list[bytes]) -> bytes:
    for f in frames:
        if _is_error(f):
            return f
    found = [f for f in frames if f not in (b"$-1\r\n", b"_\r\n")]
    return random.choice(found) if found else frames[0]


def _merge_info(frames: list[bytes]) -> bytes:
    for f in frames:
        if _is_error(f):
            return f
    texts = [_text(_parse(f)) for f in frames]
    totals: dict[str, list[int]] = {}
    for t in texts:
        section = ""
        for line in t.splitlines():
            if line.startswith("#"):
                section = line[1:].strip().lower()
                continue
            if section == "keyspace" and line.startswith("db") and ":" in line:
                db, _, rest = line.partition(":")
                fields = dict(kv.split("=", 1) for kv in rest.split(",") if "=" in kv)
                agg = totals.setdefault(db, [0, 0, 0])
                agg[0] += int(fields.get("keys", 0))
                agg[1] += int(fields.get("expires", 0))
                agg[2] = max(agg[2], int(fields.get("avg_ttl", 0)))
    out: list[str] = []
    section = ""
    replaced = False
    for line in texts[0].splitlines():
        if line.startswith("#"):
            section = line[1:].strip().lower()
            out.append(line)
            if section == "keyspace" and not replaced:
                replaced = True
                for db in sorted(totals, key=lambda d: int(d[2:]) if d[2:].isdigit() else 0):
                    k, e, a = totals[db]
                    out.append(f"{db}:keys={k},expires={e},avg_ttl={a}")
            continue
        if section == "keyspace":
            continue
        out.append(line)
    return encode_bulk(("\r\n".join(out) + "\r\n").encode())


def _merge_mget(order: list[list[int]], n: int, proto: int) -> Callable[[list[bytes]], bytes]:
    """MGET split per slot: part i holds the keys at positions ``order[i]``."""
    def merge(frames: list[bytes]) -> bytes:
        values: list[bytes] = [b""] * n
        for positions, f in zip(order, frames):
            if _is_error(f):
                return f
            v = _parse(f)
            if not isinstance(v, list) or len(v) != len(positions):
                return encode_error("ERR Cachegate got an unexpected MGET reply from a shard")
            for pos, item in zip(positions, v):
                values[pos] = _encode(item, proto)
        return _array(values)
    return merge


# --------------------------------------------------------------------------------------------
# Commands in flight


class _Op:
    """One command of the session: its parts' replies, merged in order."""

    __slots__ = ("parts", "frames", "left", "merge", "local", "callback", "silent")

    def __init__(self, nparts: int, merge: Callable[[list[bytes]], bytes] | None = None,
                 local: bytes | None = None) -> None:
        self.parts: list[_Part] = []
        self.frames: list[bytes] = [b""] * nparts
        self.left = nparts
        self.merge = merge
        self.local = local
        self.callback: Callable[[bytes], None] | None = None  # the router's own command
        self.silent = False  # CLIENT REPLY OFF/SKIP: its reply is not given


class _Part:
    """What goes to one shard for an op: ``raw`` bytes, the slot (None: any node given),
    how many reply frames it takes (``n``), redirections so far."""

    __slots__ = ("op", "index", "raw", "slot", "node", "n", "got", "redirects", "deadline",
                 "asking", "push", "hook", "retry_at", "retryable", "txn", "txn_kind", "pre")

    def __init__(self, op: _Op, index: int, raw: bytes, slot: int | None, node: str | None = None,
                 n: int = 1, push: bool = False, hook: Callable[[str, bytes], None] | None = None,
                 retryable: bool = True) -> None:
        self.op, self.index, self.raw, self.slot, self.node, self.n = op, index, raw, slot, node, n
        self.got: list[bytes] = []
        self.redirects = 0
        self.deadline = 0.0
        self.asking = False
        self.push = push  # RESP3 (un)subscribe: its confirmations are push frames
        self.hook = hook  # called with (node, frame) for each reply frame
        self.retry_at = 0.0
        self.retryable = retryable
        self.txn: dict | None = None  # the transaction it is part of
        self.txn_kind = ""  # "multi", "cmd" or "exec"
        self.pre = 0  # replies of the router's own that come before this part's (a replay)


class _Sent:
    __slots__ = ("part", "swallow", "txn")

    def __init__(self, part: _Part | None, swallow: bool = False, txn: dict | None = None) -> None:
        self.part = part
        self.swallow = swallow
        self.txn = txn  # a replayed transaction's own replies: a redirection among them counts


class _Node:
    def __init__(self, name: str, max_line: int) -> None:
        self.name = name
        self.framer = ReplyFramer(max_line=max_line)
        self.chunks: list[bytes] = []  # an incomplete frame's bytes so far
        self.carry_len = 0
        self.sent: deque[_Sent] = deque()
        self.out: list[bytes] = []  # bytes to write
        self.waiting: list[_Part] = []  # parts for a node not connected yet
        self.connected = False
        self.sub2 = False  # RESP2 subscribed: message arrays are out of band
        self.subs = 0  # classic subscriptions (channels and patterns) on this connection
        self.shard_subs = 0
        self.ssubs: set[bytes] = set()
        self.monitor = False


_CONFIRMATIONS = frozenset((b"subscribe", b"psubscribe", b"ssubscribe",
                            b"unsubscribe", b"punsubscribe", b"sunsubscribe"))
_MESSAGES = frozenset((b"message", b"pmessage", b"smessage"))
# Split per slot and merged.
_SPLIT = {"MGET": 1, "MSET": 2, "DEL": 1, "UNLINK": 1, "EXISTS": 1, "TOUCH": 1}
# To every connection: (merge) the connection's state, or data every shard needs.
_EVERY_CONNECTION = frozenset(("AUTH", "HELLO", "RESET", "SELECT", "CLIENT|SETNAME", "CLIENT|SETINFO",
                               "CLIENT|TRACKING", "CLIENT|NO-EVICT", "CLIENT|NO-TOUCH", "SCRIPT|LOAD",
                               "SCRIPT|FLUSH", "FUNCTION|LOAD", "FUNCTION|DELETE", "FUNCTION|FLUSH",
                               "FUNCTION|RESTORE", "CONFIG|SET", "CONFIG|RESETSTAT", "FLUSHDB", "FLUSHALL"))
_CONNECTION_STATE = frozenset(("AUTH", "HELLO", "RESET", "SELECT", "CLIENT|SETNAME", "CLIENT|SETINFO",
                               "CLIENT|TRACKING", "CLIENT|NO-EVICT", "CLIENT|NO-TOUCH"))
_PUBSUB = frozenset(("SUBSCRIBE", "PSUBSCRIBE", "UNSUBSCRIBE", "PUNSUBSCRIBE"))
_LOCAL_OK = frozenset(("READONLY", "READWRITE", "ASKING"))


def _rbac_name(cmd: Command) -> str:
    if cmd.name in SUBCOMMAND_PARENTS and len(cmd.argv) > 1:
        return cmd.name + "|" + cmd.argv[1].decode("latin-1").upper()
    return cmd.name


class ClusterRouter:
    """See the module doc. ``address`` is the proxy's own (host, port) as the client reached
    it (what CLUSTER SLOTS and NODES name); ``node_id`` the id they give it."""

    def __init__(self, slot_map: SlotMap, *, address: tuple[str, int], node_id: str,
                 clock: Callable[[], float] = time.monotonic, max_reply_line: int = 1 << 20,
                 allow_node: Callable[[str], bool] | None = None,
                 on_map: Callable[[SlotMap], None] | None = None) -> None:
        self.map = slot_map
        self._on_map = on_map
        self.address = address
        self.node_id = node_id
        self.clock = clock
        self._max_line = max_reply_line
        self._allow = allow_node or (lambda name: True)
        self._parser = CommandParser(Limits(max_array_len=1 << 30, max_bulk_len=1 << 40,
                                            max_inline_len=1 << 30))
        self._ops: deque[_Op] = deque()
        self._nodes: dict[str, _Node] = {}
        self._down: list[bytes] = []
        self._retry: list[_Part] = []
        self.proto = 2
        self.wants_refresh = False
        self.redirects_seen = {"MOVED": 0, "ASK": 0}
        self._hello: bytes | None = None  # the last HELLO that worked (new connections get it)
        self._name: bytes | None = None
        self._txn: dict | None = None  # {"slot", "node", "buffer": [parts], "bad"}
        self._watch: tuple[int, str] | None = None
        self._pubsub_node: str | None = None
        self._chans: set[bytes] = set()
        self._reply_off = False
        self._skip = False
        self._pats: set[bytes] = set()
        self.default = slot_map.primaries[0] if slot_map.primaries else ""

    # -- the shell's side -------------------------------------------------------------------

    def node(self, name: str) -> _Node:
        n = self._nodes.get(name)
        if n is None:
            n = self._nodes[name] = _Node(name, self._max_line)
        return n

    @property
    def nodes_wanted(self) -> list[str]:
        """Nodes that have bytes waiting but no connection."""
        return [n.name for n in self._nodes.values() if not n.connected and (n.waiting or n.out)]

    def connected(self, name: str) -> bytes:
        """``name`` is connected (and authenticated); returns its first bytes to write."""
        n = self.node(name)
        n.connected = True
        setup: list[bytes] = []
        if self._hello is not None:
            setup.append(self._hello)
            n.sent.append(_Sent(None, swallow=True))
        if self._name:
            setup.append(encode_command("CLIENT", "SETNAME", self._name))
            n.sent.append(_Sent(None, swallow=True))
        n.framer.protocol = self.proto
        waiting, n.waiting = n.waiting, []
        for part in waiting:
            setup.append(self._register(n, part))
        return b"".join(setup)

    def connect_failed(self, name: str, why: str) -> None:
        """A connection to ``name`` could not be made: its parts wait for a new map."""
        n = self._nodes.pop(name, None)
        if n is None:
            return
        self.wants_refresh = True
        for part in n.waiting:
            self._again(part, why)

    def lost(self, name: str) -> None:
        """The connection to ``name`` is gone: each command in flight there gets one error
        (it may or may not have run); waiting ones are routed again."""
        n = self._nodes.pop(name, None)
        if n is None:
            return
        self.wants_refresh = True
        if self._pubsub_node == name:
            self._pubsub_node = None
        err = encode_error(f"ERR Cachegate lost its connection to cluster node {name} while this command ran "
                           "(it may or may not have run); retry it")
        for s in n.sent:
            if s.part is not None and not s.swallow:
                self._answer(s.part, err, final=True)
        for part in n.waiting:
            self._again(part, "connection lost")
        self._resubscribe(n)
        self._emit()

    def _resubscribe(self, lost: _Node) -> None:
        """The subscriptions of a lost connection are made again elsewhere (the new primary of
        a shard channel's slot, another node for classic ones), their confirmations kept from
        the client, so that a subscribed client goes on receiving messages after a failover."""
        again: list[tuple[bytes, list[bytes], int | None]] = []
        if lost.subs:
            if self._chans:
                again.append((b"SUBSCRIBE", sorted(self._chans), None))
            if self._pats:
                again.append((b"PSUBSCRIBE", sorted(self._pats), None))
        groups: dict[int, list[bytes]] = {}
        for c in lost.ssubs:
            groups.setdefault(key_slot(c), []).append(c)
        again += [(b"SSUBSCRIBE", sorted(chans), slot) for slot, chans in groups.items()]
        for verb, chans, slot in again:
            op = _Op(1)
            op.callback = lambda frame: None
            part = _Part(op, 0, encode_command(verb, *chans), slot, None, n=len(chans), push=self.proto >= 3,
                         hook=self._resub_hook(chans if slot is not None else None))
            op.parts.append(part)
            self._route(part)

    def _resub_hook(self, shard_channels: list[bytes] | None) -> Callable[[str, bytes], None]:
        def hook(node: str, frame: bytes) -> None:
            if node != self._pubsub_node and shard_channels is None:
                self._pubsub_node = node
            if shard_channels is not None and node in self._nodes:
                self._nodes[node].ssubs.update(shard_channels)
            self._sub_hook(node, frame)
        return hook

    def update_map(self, slot_map: SlotMap) -> None:
        self.map = slot_map
        self.wants_refresh = False
        if self._on_map is not None:
            self._on_map(slot_map)
        if slot_map.primaries and self.default not in slot_map.primaries:
            self.default = slot_map.primaries[0]
        self.run_retries(force=True)

    def run_retries(self, force: bool = False) -> None:
        now = self.clock()
        due, self._retry = [p for p in self._retry if force or p.retry_at <= now], \
            [p for p in self._retry if not (force or p.retry_at <= now)]
        for part in due:
            self._route(part)

    @property
    def next_retry(self) -> float | None:
        return min((p.retry_at for p in self._retry), default=None)

    def take_writes(self) -> dict[str, bytes]:
        out = {}
        for n in self._nodes.values():
            if n.out and n.connected:
                out[n.name] = b"".join(n.out)
                n.out = []
        return out

    def take_replies(self) -> bytes:
        down, self._down = self._down, []
        return b"".join(down)

    @property
    def idle(self) -> bool:
        return not self._ops

    # -- commands from the session -----------------------------------------------------------

    def send(self, data: bytes) -> None:
        for cmd in self._parser.feed(data):
            self._command(cmd)
        self._emit()

    def _command(self, cmd: Command) -> None:
        name = _rbac_name(cmd)
        argv = cmd.argv
        txn = self._txn
        if txn is not None:
            self._in_txn(cmd, name)
            return
        if name == "MULTI":
            self._txn = {"slot": None, "node": None, "buffer": [], "bad": False, "raws": [], "moved": None,
                         "watched": self._watch is not None}
            if self._watch is not None:
                self._txn["slot"], self._txn["node"] = self._watch
            self._txn_part(cmd.raw, kind="multi")
            return
        if cmd.name == "CLUSTER":
            self._cluster(cmd, name)
            return
        if name in _LOCAL_OK:
            self._local(_OK)
            return
        if name == "CLIENT|REPLY":
            self._client_reply(cmd)
            return
        if name in _EVERY_CONNECTION:
            self._every(cmd, name)
            return
        if name in _PUBSUB:
            self._pubsub(cmd, name)
            return
        if name in ("SSUBSCRIBE", "SUNSUBSCRIBE"):
            self._shard_pubsub(cmd, name)
            return
        if name in ("DBSIZE", "KEYS", "RANDOMKEY") or (name == "INFO" and _info_has_keyspace(argv)):
            merge = {"DBSIZE": _merge_sum, "KEYS": _merge_concat_arrays(self.proto),
                     "RANDOMKEY": _merge_random, "INFO": _merge_info}[name]
            self._broadcast(cmd.raw, merge)
            return
        if name == "SCAN":
            self._scan(cmd)
            return
        if name == "UNWATCH":  # where the WATCH was
            node = self._watch[1] if self._watch is not None else self.default
            self._watch = None
            self._single(cmd.raw, None, node)
            return
        if name == "MONITOR":
            part = self._single(cmd.raw, None, self.default)
            part.hook = self._monitor_hook
            return
        keys = command_keys(cmd.name, argv)
        if not keys:
            self._single(cmd.raw, None, self.default)
            return
        slots = {key_slot(k) for k in keys}
        if len(slots) == 1:
            slot = slots.pop()
            if name == "WATCH":
                node = self.map.node_for(slot) or self.default
                self._watch = (slot, node)
                self._single(cmd.raw, slot, node)
                return
            self._single(cmd.raw, slot)
            return
        if name in _SPLIT:
            self._split(cmd, name)
            return
        self._local(CROSSSLOT)

    # -- shapes of routing -------------------------------------------------------------------

    def _add(self, op: _Op) -> None:
        if self._reply_off or self._skip:
            op.silent = True
            self._skip = False
        self._ops.append(op)

    def _client_reply(self, cmd: Command) -> None:
        """CLIENT REPLY is followed here, not on the shards: the replies of later commands
        are dropped (OFF), or the next one's (SKIP), as Redis would."""
        mode = cmd.argv[2].upper() if len(cmd.argv) == 3 else b""
        if mode == b"ON":
            self._reply_off = self._skip = False
            self._add(_Op(0, local=_OK))
        elif mode == b"OFF":
            self._reply_off = True
        elif mode == b"SKIP":
            if not self._reply_off:
                self._skip = True
        else:
            self._add(_Op(0, local=encode_error("ERR syntax error")))

    def _local(self, reply: bytes) -> None:
        self._add(_Op(0, local=reply))

    def _single(self, raw: bytes, slot: int | None, node: str | None = None, **kw) -> _Part:
        op = _Op(1)
        part = _Part(op, 0, raw, slot, node, **kw)
        op.parts.append(part)
        self._add(op)
        self._route(part)
        return part

    def _broadcast(self, raw: bytes, merge: Callable[[list[bytes]], bytes],
                   nodes: Iterable[str] | None = None) -> None:
        targets = list(nodes) if nodes is not None else self._all_nodes()
        if not targets:
            self._local(encode_error("CLUSTERDOWN The cluster is down (Cachegate knows no primary)"))
            return
        op = _Op(len(targets), merge=merge)
        for i, node in enumerate(targets):
            part = _Part(op, i, raw, None, node, retryable=False)
            op.parts.append(part)
        self._add(op)
        for part in op.parts:
            self._route(part)

    def _all_nodes(self) -> list[str]:
        """Every primary: where data commands (DBSIZE, KEYS, FLUSHDB, SCRIPT LOAD...) go."""
        return list(self.map.primaries)

    def _all_connections(self) -> list[str]:
        """Every primary and every other open connection (a primary demoted since): where the
        connection's own state (AUTH, HELLO, RESET, CLIENT SETNAME) goes."""
        names = list(self.map.primaries)
        for n in self._nodes:
            if n not in names and self._nodes[n].connected:
                names.append(n)
        return names

    def _every(self, cmd: Command, name: str) -> None:
        raw = cmd.raw
        if name == "HELLO":
            def remember(node: str, frame: bytes, raw=raw) -> None:
                if not _is_error(frame):
                    self._hello = raw
                    ver = _int(cmd.argv[1]) if len(cmd.argv) > 1 else None
                    if ver in (2, 3):
                        self.proto = ver
                    for n in self._nodes.values():
                        n.framer.protocol = self.proto
            self._broadcast_hooked(raw, _merge_first_error, remember)
            return
        if name == "RESET":
            self._hello, self._name = None, None
            self._watch = None
            self._chans.clear()
            self._pats.clear()

            def reset(node: str, frame: bytes) -> None:
                self.proto = 2
                n = self._nodes.get(node)
                if n is not None:
                    n.framer.protocol, n.sub2, n.subs, n.ssubs, n.monitor = 2, False, 0, set(), False
                    n.shard_subs = 0
            self._broadcast_hooked(raw, _merge_first_error, reset)
            return
        if name == "CLIENT|SETNAME" and len(cmd.argv) == 3:
            self._name = cmd.argv[2] or None
        state = name in _CONNECTION_STATE
        self._broadcast(raw, _merge_first_error, self._all_connections() if state else None)

    def _broadcast_hooked(self, raw: bytes, merge, hook) -> None:
        self._broadcast(raw, merge, self._all_connections())
        for part in self._ops[-1].parts:
            part.hook = hook

    def _split(self, cmd: Command, name: str) -> None:
        step = _SPLIT[name]
        argv = cmd.argv
        groups: dict[int, list[int]] = {}
        for i in range(1, len(argv), step):
            groups.setdefault(key_slot(argv[i]), []).append(i)
        order = list(groups.values())
        if name == "MGET":
            merge = _merge_mget([[(i - 1) for i in idx] for idx in order], len(argv) - 1, self.proto)
        elif name == "MSET":
            merge = _merge_first_error
        else:
            merge = _merge_sum
        op = _Op(len(order), merge=merge)
        for j, (slot, idx) in enumerate(groups.items()):
            args = [argv[0]]
            for i in idx:
                args.extend(argv[i:i + step])
            op.parts.append(_Part(op, j, encode_command(*args), slot))
        self._add(op)
        for part in op.parts:
            self._route(part)

    def _scan(self, cmd: Command) -> None:
        argv = cmd.argv
        shards = self.map.primaries
        pos = decode_scan_cursor(argv[1]) if len(argv) > 1 else None
        if pos is None or not shards:
            self._single(cmd.raw, None, self.default)  # Redis's own error
            return
        shard, cursor = pos
        if shard >= len(shards):
            self._local(encode_error("ERR invalid cursor"))
            return
        raw = encode_command(argv[0], b"%d" % cursor, *argv[2:])
        proto = self.proto

        def merge(frames: list[bytes], shard=shard) -> bytes:
            f = frames[0]
            if _is_error(f):
                return f
            v = _parse(f)
            if not isinstance(v, list) or len(v) != 2:
                return f
            nxt = int(v[0])
            if nxt == 0:
                out = b"0" if shard + 1 >= len(shards) else encode_scan_cursor(shard + 1, 0)
            else:
                out = encode_scan_cursor(shard, nxt)
            return _array([encode_bulk(out), _encode(v[1], proto)])

        op = _Op(1, merge=merge)
        part = _Part(op, 0, raw, None, shards[shard], retryable=False)
        op.parts.append(part)
        self._add(op)
        self._route(part)

    def _pubsub(self, cmd: Command, name: str) -> None:
        node = self._pubsub_node or self.default
        self._pubsub_node = node
        chans = cmd.argv[1:]
        kind = self._chans if name in ("SUBSCRIBE", "UNSUBSCRIBE") else self._pats
        if name in ("SUBSCRIBE", "PSUBSCRIBE"):
            kind.update(chans)
            count = len(chans) or 1
        elif chans:
            kind.difference_update(chans)
            count = len(chans)
        else:
            count = max(1, len(kind))
            kind.clear()
        self._single(cmd.raw, None, node, n=count, push=self.proto >= 3, hook=self._sub_hook)

    def _shard_pubsub(self, cmd: Command, name: str) -> None:
        channels = cmd.argv[1:]
        if channels:
            # Per slot (one endpoint takes channels of any slot; each shard only its own).
            groups: dict[int, list[bytes]] = {}
            for c in channels:
                groups.setdefault(key_slot(c), []).append(c)
            op = _Op(len(groups), merge=b"".join)
            for i, (slot, chans) in enumerate(groups.items()):
                if name == "SSUBSCRIBE":
                    node = self.map.node_for(slot)
                    if node is not None:
                        self.node(node).ssubs.update(chans)
                else:
                    for n in self._nodes.values():
                        n.ssubs.difference_update(chans)
                op.parts.append(_Part(op, i, encode_command(cmd.argv[0], *chans), slot, n=len(chans),
                                      push=self.proto >= 3, hook=self._sub_hook))
            self._add(op)
            for part in op.parts:
                self._route(part)
            return
        holders = [n for n in self._nodes.values() if n.ssubs]
        if not holders:
            self._single(cmd.raw, None, self.default, push=self.proto >= 3, hook=self._sub_hook)
            return
        op = _Op(len(holders), merge=b"".join)
        for i, n in enumerate(holders):
            op.parts.append(_Part(op, i, cmd.raw, None, n.name, n=len(n.ssubs), push=self.proto >= 3,
                                  hook=self._sub_hook, retryable=False))
            n.ssubs = set()
        self._add(op)
        for part in op.parts:
            self._route(part)

    def _sub_hook(self, node: str, frame: bytes) -> None:
        n = self._nodes.get(node)
        if n is None or _is_error(frame):
            return
        v = _parse(frame)
        if isinstance(v, list) and len(v) == 3 and isinstance(v[2], int):
            # The count is of the connection's classic (channels and patterns) or of its shard
            # subscriptions, after this one; in RESP2 either keeps it in subscribed mode.
            if _text(v[0]).lower().startswith("s"):
                n.shard_subs = v[2]
            else:
                n.subs = v[2]
            n.sub2 = self.proto == 2 and (n.subs > 0 or n.shard_subs > 0)

    def _monitor_hook(self, node: str, frame: bytes) -> None:
        n = self._nodes.get(node)
        if n is not None and not _is_error(frame):
            n.monitor = True

    def _cluster(self, cmd: Command, name: str) -> None:
        sub = name.partition("|")[2]
        host, port = self.address
        nid = self.node_id
        if sub == "SLOTS":
            self._local(_array([_array([b":0\r\n", b":%d\r\n" % (SLOTS - 1),
                                        _array([encode_bulk(b""), b":%d\r\n" % port, encode_bulk(nid)])])]))
        elif sub == "SHARDS":
            node = [b"id", nid, b"port", port, b"ip", host, b"endpoint", host, b"role", b"master",
                    b"replication-offset", 0, b"health", b"online"]
            shard = [b"slots", [0, SLOTS - 1], b"nodes", [node]]
            self._local(_array([_encode_map(shard, self.proto)]))
        elif sub == "NODES":
            line = f"{nid} {host}:{port}@{port} myself,master - 0 0 1 connected 0-{SLOTS - 1}\n"
            self._local(encode_bulk(line))
        elif sub == "INFO":
            text = ("cluster_enabled:1\r\ncluster_state:ok\r\ncluster_slots_assigned:16384\r\n"
                    "cluster_slots_ok:16384\r\ncluster_slots_pfail:0\r\ncluster_slots_fail:0\r\n"
                    "cluster_known_nodes:1\r\ncluster_size:1\r\ncluster_current_epoch:1\r\n"
                    "cluster_my_epoch:1\r\n")
            self._local(encode_bulk(text))
        elif sub == "MYID":
            self._local(encode_bulk(nid))
        elif sub == "KEYSLOT" and len(cmd.argv) == 3:
            self._local(b":%d\r\n" % key_slot(cmd.argv[2]))
        elif sub in ("COUNTKEYSINSLOT", "GETKEYSINSLOT") and len(cmd.argv) >= 3 and _int(cmd.argv[2]) is not None \
                and 0 <= int(cmd.argv[2]) < SLOTS:
            self._single(cmd.raw, int(cmd.argv[2]))
        else:
            self._single(cmd.raw, None, self.default)

    # -- transactions ------------------------------------------------------------------------

    def _txn_part(self, raw: bytes, slot: int | None = None, final: bool = False, kind: str = "cmd") -> None:
        txn = self._txn
        assert txn is not None
        op = _Op(1)
        part = _Part(op, 0, raw, None, None, retryable=False)
        part.txn, part.txn_kind = txn, kind
        if kind == "cmd":
            txn["raws"].append(raw)
        op.parts.append(part)
        self._add(op)
        if txn["node"] is None and slot is not None:
            txn["slot"], txn["node"] = slot, self.map.node_for(slot) or self.default
        if txn["node"] is None and final:
            txn["node"] = self.default
        if txn["node"] is None:
            txn["buffer"].append(part)
            return
        for p in txn["buffer"]:
            p.node = txn["node"]
            self._route(p)
        txn["buffer"] = []
        part.node = txn["node"]
        self._route(part)

    def _in_txn(self, cmd: Command, name: str) -> None:
        txn = self._txn
        assert txn is not None
        if name in ("EXEC", "DISCARD"):
            self._watch = None
            if txn["bad"] and name == "EXEC":
                self._txn_part(encode_command("DISCARD"), final=True, kind="discard")
                self._ops[-1].local = None
                self._ops[-1].merge = lambda frames: b"-EXECABORT Transaction discarded because of previous errors.\r\n"
            else:
                self._txn_part(cmd.raw, final=True, kind="exec" if name == "EXEC" else "discard")
            self._txn = None
            return
        if name == "MULTI":
            self._txn_part(cmd.raw, kind="nested")
            return
        keys = command_keys(cmd.name, cmd.argv)
        slots = {key_slot(k) for k in keys}
        if len(slots) > 1 or (slots and txn["slot"] is not None and slots != {txn["slot"]}):
            txn["bad"] = True
            self._local(CROSSSLOT)
            return
        self._txn_part(cmd.raw, slots.pop() if slots else None)

    # -- sending -----------------------------------------------------------------------------

    def _route(self, part: _Part) -> None:
        if part.deadline == 0.0:
            part.deadline = self.clock() + RETRY_WINDOW
        node = part.node
        if part.slot is not None and node is None:
            node = self.map.node_for(part.slot)
            if node is None:
                self._again(part, "no node serves the slot")
                return
        if node is None:
            node = self.default
        if not self._allow(node):
            self._answer(part, encode_error(
                f"ERR Cachegate does not connect to cluster node {node}: it is not the database's "
                "configured host (see docs/compatibility.md#redis-cluster)"), final=True)
            return
        n = self.node(node)
        if not n.connected:
            n.waiting.append(part)
            return
        n.out.append(self._register(n, part))

    def _register(self, n: _Node, part: _Part) -> bytes:
        part.got = []
        for _ in range(part.pre):
            n.sent.append(_Sent(None, swallow=True, txn=part.txn))
        if part.asking:
            n.sent.append(_Sent(None, swallow=True))
            n.sent.append(_Sent(part))
            return b"*1\r\n$6\r\nASKING\r\n" + part.raw
        n.sent.append(_Sent(part))
        return part.raw

    def _again(self, part: _Part, why: str) -> None:
        """Retry ``part`` after a moment, within its window; else its error."""
        now = self.clock()
        if not part.retryable or now >= part.deadline:
            self._answer(part, encode_error(f"CLUSTERDOWN Cachegate could not reach the cluster node for this "
                                            f"command within {RETRY_WINDOW:g}s ({why}); retry later"),
                         final=True)
            self._emit()
            return
        part.node = None
        part.retry_at = now + RETRY_DELAY
        self._retry.append(part)

    # -- replies from the shards ------------------------------------------------------------

    def feed(self, name: str, data: bytes) -> None:
        n = self._nodes.get(name)
        if n is None:
            return
        frames = n.framer.feed(data)
        if not frames:
            # The start of a frame: kept in chunks (one join when it completes, not one
            # copy of everything so far per chunk).
            n.chunks.append(data)
            n.carry_len += len(data)
            return
        base = n.carry_len
        buf = b"".join(n.chunks) + data if n.chunks else data
        last = 0
        for f in frames:
            end = base + f.end
            frame = buf[end - f.raw_len:end]
            last = end
            self._frame(n, f, frame)
        rest = buf[last:]
        n.chunks, n.carry_len = ([rest], len(rest)) if rest else ([], 0)
        self._emit()

    def _frame(self, n: _Node, f, frame: bytes) -> None:
        k = f.kind
        head = n.sent[0] if n.sent else None
        if n.monitor or k == "|":
            self._down.append(frame)
            return
        if k == ">":
            if not (head is not None and head.part is not None and head.part.push and f.tag in _CONFIRMATIONS):
                self._down.append(frame)  # a message, an invalidation: out of band
                return
        elif n.sub2 and k == "*" and f.tag in _MESSAGES:
            self._down.append(frame)
            return
        if head is None:
            return  # nothing expected (a connection's stray reply): dropped
        if head.swallow:
            n.sent.popleft()
            if head.txn is not None and k == "-":
                self._txn_redirected(n, head.txn, frame)
            return
        part = head.part
        assert part is not None
        if part.hook is not None:
            part.hook(n.name, frame)
        if k == "-" and part.txn is not None and self._txn_frame(n, part, frame):
            n.sent.popleft()
            return
        if k == "-" and self._redirect(n, part, frame):
            n.sent.popleft()
            return
        part.got.append(frame)
        if len(part.got) >= part.n:
            n.sent.popleft()
            self._answer(part, b"".join(part.got), final=True)

    # -- transactions that meet a slot on the move ------------------------------------------

    def _txn_redirected(self, n: _Node, txn: dict, frame: bytes) -> bool:
        """A MOVED/ASK for a command of ``txn``: remembered, the transaction runs again there."""
        bits = frame[:-2].split(b" ")
        if bits[0] == b"-TRYAGAIN":  # keys of the slot on both sides of a migration: wait a moment
            txn["moved"] = ("TRYAGAIN", "")
            return True
        if len(bits) < 3 or bits[0] not in (b"-MOVED", b"-ASK"):
            return False
        host, port = split_name(bits[2].decode("latin-1"))
        target = node_name(host or split_name(n.name)[0], port)
        word = bits[0][1:].decode()
        self.redirects_seen[word] += 1
        REDIRECTS[word] += 1
        if word == "MOVED":
            self.wants_refresh = True
            slot = _int(bits[1])
            if slot is not None and 0 <= slot < SLOTS:
                self.map.owner[slot] = target
        txn["moved"] = (word, target)
        return True

    def _txn_frame(self, n: _Node, part: _Part, frame: bytes) -> bool:
        """A transaction's queued command redirected: the client is told +QUEUED (it will be
        queued where the slot is now); its EXEC (an EXECABORT, or a redirection itself) sends
        MULTI, the commands and EXEC again to that node, the client sees that EXEC's reply."""
        txn = part.txn
        assert txn is not None
        if part.txn_kind == "cmd" and self._txn_redirected(n, txn, frame):
            self._answer(part, b"+QUEUED\r\n", final=True)
            return True
        if part.txn_kind != "exec" or part.redirects >= MAX_REDIRECTS:
            return False
        if not (frame.startswith(b"-EXECABORT") and txn["moved"]) and not self._txn_redirected(n, txn, frame):
            return False
        if txn["watched"]:
            # Its WATCH was on the old node: it cannot be carried over, so EXEC fails as a WATCH
            # conflict does (nothing ran) and the client runs the transaction again.
            self._answer(part, b"_\r\n" if self.proto >= 3 else b"*-1\r\n", final=True)
            return True
        word, target = txn["moved"]
        txn["moved"] = None
        if word == "TRYAGAIN":
            if self.clock() >= part.deadline:
                return False
            part.raw = b"".join([b"*1\r\n$5\r\nMULTI\r\n", *txn["raws"], part.raw if not part.pre else _EXEC])
            part.pre = 1 + len(txn["raws"])
            part.slot, part.node, part.asking = txn["slot"], None, False
            # A new try from the slot's owner once the moment passed (a migration moving keys a
            # few at a time asks it back and forth until the last key moved): its redirections
            # are counted afresh, and the time window bounds the whole.
            part.redirects = 0
            part.retry_at = self.clock() + RETRY_DELAY
            self._retry.append(part)
            return True
        # ASKING before MULTI: inside a transaction ASKING would be queued, and the flag it sets
        # lasts until EXEC (Redis clears it after each command only outside MULTI).
        asking = [b"*1\r\n$6\r\nASKING\r\n"] if word == "ASK" else []
        replay = [*asking, b"*1\r\n$5\r\nMULTI\r\n", *txn["raws"], part.raw if not part.pre else _EXEC]
        part.raw = b"".join(replay)
        part.pre = len(asking) + 1 + len(txn["raws"])
        part.redirects += 1
        part.asking = False
        part.node = target
        self._route(part)
        return True

    def _redirect(self, n: _Node, part: _Part, frame: bytes) -> bool:
        """MOVED, ASK, TRYAGAIN, CLUSTERDOWN: sent again (True), within the budget."""
        if not part.retryable or part.got:
            return False
        word = frame[1:frame.find(b" ")] if b" " in frame[:16] else frame[1:-2]
        if word in (b"MOVED", b"ASK"):
            if part.redirects >= MAX_REDIRECTS:
                return False
            bits = frame[:-2].split(b" ")
            if len(bits) < 3:
                return False
            target = bits[2].decode("latin-1")
            host, port = split_name(target)
            if not host:
                host = split_name(n.name)[0]
            target = node_name(host, port)
            part.redirects += 1
            self.redirects_seen[word.decode()] += 1
            REDIRECTS[word.decode()] += 1
            if word == b"MOVED":
                self.wants_refresh = True
                slot = _int(bits[1])
                if slot is not None and 0 <= slot < SLOTS:
                    self.map.owner[slot] = target
                part.asking = False
            else:
                part.asking = True
            part.node = target
            self._route(part)
            part.node = None if part.slot is not None else target
            return True
        if word in (b"TRYAGAIN", b"CLUSTERDOWN", b"LOADING", b"MASTERDOWN"):
            if self.clock() >= part.deadline:
                return False
            if word != b"TRYAGAIN":
                self.wants_refresh = True
            part.asking = False
            part.node = None
            part.redirects = 0  # a new try (see _txn_frame); RETRY_WINDOW bounds them
            part.retry_at = self.clock() + RETRY_DELAY
            self._retry.append(part)
            return True
        return False

    def _answer(self, part: _Part, frame: bytes, final: bool) -> None:
        op = part.op
        if op.frames[part.index] == b"" and op.left > 0:
            op.frames[part.index] = frame
            op.left -= 1
            if op.left == 0 and op.callback is not None:
                op.callback(frame)

    # -- the router's own commands ---------------------------------------------------------------

    def refresh_node(self) -> str | None:
        """A connected node with nothing in flight to ask for the slot map (a reply behind a
        blocking command could be long in coming); None: the shell asks on a connection of
        its own."""
        free = [n for n in self._nodes.values() if n.connected and not n.sent and not n.monitor and not n.sub2]
        for n in free:
            if n.name == self.default:
                return n.name
        return free[0].name if free else None

    def request_map(self, node: str, on_map: Callable[[SlotMap | None], None]) -> None:
        """Ask ``node`` for CLUSTER SLOTS on its connection; ``on_map`` gets the new map (None:
        the node could not answer one)."""
        op = _Op(1)
        part = _Part(op, 0, encode_command("CLUSTER", "SLOTS"), None, node, retryable=False)
        op.parts.append(part)
        host = split_name(node)[0]

        def got(frame: bytes) -> None:
            try:
                m = parse_cluster_slots(_parse(frame), host) if not _is_error(frame) else None
            except (ValueError, TypeError, IndexError):
                m = None
            if m is not None and m.primaries:
                self.update_map(m)
            on_map(m)

        op.callback = got
        self.wants_refresh = False
        self._route(part)

    def _emit(self) -> None:
        ops = self._ops
        while ops:
            op = ops[0]
            if op.silent:
                if op.left and op.local is None:
                    return
            elif op.local is not None:
                self._down.append(op.local)
            elif op.left:
                return
            elif op.merge is not None:
                self._down.append(op.merge(op.frames))
            else:
                self._down.append(op.frames[0])
            ops.popleft()


def _info_has_keyspace(argv: list[bytes]) -> bool:
    sections = {a.lower() for a in argv[1:]}
    return not sections or bool(sections & {b"keyspace", b"all", b"everything", b"default"})


def _encode_map(pairs: list, proto: int) -> bytes:
    """A flat key/value list as a RESP3 map (an array in RESP2), nested values as maps too
    when they are the node lists of CLUSTER SHARDS."""
    items: list[bytes] = []
    for i in range(0, len(pairs), 2):
        k, v = pairs[i], pairs[i + 1]
        items.append(encode_bulk(k))
        if isinstance(v, list) and v and isinstance(v[0], list):
            items.append(_array([_encode_map(x, proto) for x in v]))
        elif isinstance(v, list):
            items.append(_array([b":%d\r\n" % x for x in v]))
        elif isinstance(v, int):
            items.append(b":%d\r\n" % v)
        else:
            items.append(encode_bulk(v))
    if proto >= 3:
        return b"%%%d\r\n" % (len(items) // 2) + b"".join(items)
    return _array(items)


def proxy_node_id(database: str) -> str:
    """The id CLUSTER MYID/SLOTS/NODES give the proxy for ``database`` (40 hex digits)."""
    return hashlib.sha1(b"cachegate-cluster:" + database.encode()).hexdigest()
