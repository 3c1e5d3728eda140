"""The sans-io core of a RESP session: bytes in, bytes and events out.

:class:`SessionCore` holds everything a session knows about the protocol and decides
everything about each command, without sockets or asyncio:

* ``feed_client(data)`` takes bytes from the client and returns ``(to_upstream,
  to_client)``: the allowed commands' bytes (forwarded unchanged), and the proxy's own
  replies that go out at once (a denied command's error when nothing is pending).
* ``feed_upstream(data)`` takes bytes from the database and returns the bytes for the
  client: reply frames forwarded as they came, local replies placed between them, the
  proxy's own replies swallowed, some replies rewritten (CONFIG GET without secrets,
  CLIENT LIST without other connections).
* ``ending`` is set when the session must end: at once (a bad reply from the database),
  or once the replies already due have reached the client (``after_replies``: QUIT, a
  protocol error from the client, whose error reply is queued first).

Commands are framed by :class:`~services.dbproxy.resp.CommandParser`, checked against the
session's roles (:class:`~services.common.rbac.DatabaseAccess`), audited through the
injected query stream, and placed in a queue of expected replies (run-length counted), so
that every local reply lands exactly where the client expects it. Protocol state followed:
RESP2/RESP3 (HELLO), Pub/Sub (in RESP2, message frames are out of band), MULTI/EXEC (a
denied command aborts the transaction like a queueing error), SELECT (checked against
``db_names``), MONITOR, RESET (the proxy authenticates again), CLIENT REPLY, QUIT.

The asyncio shell (:mod:`services.dbproxy.session`) only moves bytes, and tests drive the
core with byte strings.
"""

from __future__ import annotations

import re
import time
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from services.common.rbac import DatabaseAccess, Decision, RoleSet
from services.dbproxy.commands import (
    SCRIPT_CALLABLE,
    SCRIPT_RUNNERS,
    SUBCOMMAND_PARENTS,
    lookup,
    own_client_lines,
    proxy_refusal,
    redact_config_reply,
    referenced_dbs,
)
from services.dbproxy.resp import (
    Command,
    CommandParser,
    Limits,
    ProtocolError,
    ReplyFramer,
    encode_command,
    encode_error,
)

__all__ = ["End", "Queries", "SessionCore"]


class Queries(Protocol):
    """A session's ``db.session.query`` events (:class:`~.auditspool.QueryStream`)."""

    def commands(self, when: float, logical_db: int, cmds: list[Command], size: int = -1) -> None: ...

    def query(self, when: float, logical_db: int, cmd: Command, name: str, error: str = "") -> None: ...


class End(Exception):
    """The session ends: ``reason`` for the audit, ``message`` for the client (or None).
    ``after_replies``: once every reply already due has reached the client.
    ``input_refused``: over what the client sent (a protocol error, a command past a limit),
    which it may still be sending: nothing more it sends is read as commands."""

    def __init__(self, reason: str, message: str | None = None, *, after_replies: bool = False,
                 input_refused: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.message = message
        self.after_replies = after_replies
        self.input_refused = input_refused


# --------------------------------------------------------------------------------------------
# Reply bookkeeping


class _Entry:
    """Replies expected from upstream, in order. ``plain`` entries are run-length merged.
    ``local``: bytes written to the client when this entry completes (after its frames,
    or at once when ``n`` is 0). ``swallow``: its frames are not forwarded. ``hook``:
    called as ``hook(kind, done)`` for each of its reply frames. ``transform``: each
    reply frame is held whole and what ``transform(frame)`` returns goes in its place
    (CONFIG GET without secrets, CLIENT LIST without other connections)."""

    __slots__ = ("n", "plain", "local", "swallow", "hook", "push", "transform")

    def __init__(self, n: int, plain: bool = True, local: bytes | None = None,
                 swallow: bool = False, hook: Callable[[str, bool], None] | None = None,
                 push: bool = False, transform: Callable[[bytes], bytes] | None = None) -> None:
        self.n = n
        self.plain = plain
        self.local = local
        self.swallow = swallow
        self.hook = hook
        self.push = push  # RESP3 (un)subscribe: counts its confirmation push frames
        self.transform = transform


_OOB_KINDS = frozenset((">", "|"))
_PUBSUB_MESSAGES = frozenset((b"message", b"pmessage", b"smessage"))
_CONFIRMATIONS = frozenset((b"subscribe", b"psubscribe", b"ssubscribe",
                            b"unsubscribe", b"punsubscribe", b"sunsubscribe"))
_EXECABORT = encode_error("EXECABORT Transaction discarded because of previous errors.")
_OK = b"+OK\r\n"
_MAX_HELD = 1 << 20
_MAX_TRANSFORMED = 64 << 20  # a CLIENT LIST of many thousand connections fits

_REPLY_OFF, _REPLY_SKIP = 1, 2
_DISCARD = encode_command("DISCARD")
_MULTI = encode_command("MULTI")
_MAX_REPLAY = 16 << 20  # a transaction larger than this is not replayed (AUTH after its EXEC)
_NILS = frozenset((b"*-1\r\n", b"$-1\r\n", b"_\r\n"))
_SUBSCRIBE = {"SUBSCRIBE": 0, "PSUBSCRIBE": 1, "SSUBSCRIBE": 2}
_UNSUBSCRIBE = {"UNSUBSCRIBE": 0, "PUNSUBSCRIBE": 1, "SUNSUBSCRIBE": 2}


class _Blocked:
    """A blocking command sent with a capped timeout: its arguments, where its timeout is
    (``millis``: XREAD's BLOCK), and when the client's own timeout ends (None: never)."""

    __slots__ = ("argv", "index", "millis", "deadline", "hold_from", "entry")

    def __init__(self, argv: list[bytes], index: int, millis: bool, deadline: float | None) -> None:
        self.argv, self.index, self.millis, self.deadline = argv, index, millis, deadline
        self.hold_from = 0
        self.entry: _Entry | None = None  # its place in the reply queue

    def capped(self, cap: float, now: float) -> bytes:
        left = cap if self.deadline is None else max(min(cap, self.deadline - now), 0.001)
        argv = list(self.argv)
        argv[self.index] = (b"%d" % max(int(left * 1000), 1)) if self.millis else (b"%.3f" % left)
        return encode_command(*argv)


# Blocking commands: where their timeout is (an index, or the word before it) and its unit.
_LAST = -1
_BLOCKING = {"BLPOP": _LAST, "BRPOP": _LAST, "BZPOPMIN": _LAST, "BZPOPMAX": _LAST,
             "BRPOPLPUSH": _LAST, "BLMOVE": _LAST, "BLMPOP": 1, "BZMPOP": 1,
             "XREAD": b"BLOCK", "XREADGROUP": b"BLOCK"}


def _block_timeout(cmd: Command) -> tuple[int, float, bool] | None:
    """(index of the timeout, seconds (0: forever), in milliseconds?) of a blocking command,
    or None when it does not block or its timeout is not a plain number (Redis's error)."""
    where = _BLOCKING.get(cmd.name)
    argv = cmd.argv
    if where is None or len(argv) < 3:
        return None
    if isinstance(where, bytes):
        index = next((i + 1 for i in range(1, len(argv) - 1) if argv[i].upper() == where), None)
        if index is None or index >= len(argv):
            return None
        millis = True
    else:
        index = where if where > 0 else len(argv) + where
        millis = False
    try:
        value = float(argv[index])
    except ValueError:
        return None
    if value < 0 or value != value:
        return None
    return index, value / 1000 if millis else value, millis


class SessionCore:
    """One session's protocol state; see the module doc.

    ``roles``/``db_labels`` as the session starts (:meth:`update_access` changes them);
    ``queries`` receives the audit events of the commands, ``on_protocol_error(logical_db,
    error)`` the client's malformed input. ``upstream_auth`` (the proxy's
    AUTH command, never logged) and ``client_id`` are set once the upstream is connected.
    """

    def __init__(self, *, database: str, db_user: str, db_name: str, roles: RoleSet,
                 db_labels: Mapping[str, str], queries: Queries,
                 on_protocol_error: Callable[[int, str], None] | None = None,
                 resp_limits: Limits | None = None, max_reply_line: int = 1 << 20,
                 count_commands: bool = False) -> None:
        self.database = database
        self.db_user = db_user
        self.roles = roles
        self.db_labels = db_labels
        self._aq = queries
        self._on_protocol_error = on_protocol_error
        self.upstream_auth = b""
        self.client_id = -1
        self.commands = 0
        self.ending: End | None = None
        # Command side state.
        self._parser = CommandParser(resp_limits)
        self._proto = 2
        # No HELLO 3 was sent on this connection: every frame from the database is a RESP2
        # reply or (subscribed) message, never a push (stays False once RESP3 was asked for).
        self._resp2 = True
        self._in_multi = False
        self._multi_bad = False
        self._subs: tuple[set[bytes], set[bytes], set[bytes]] = (set(), set(), set())
        self._monitor_cmd = False
        # CLIENT REPLY: 0 on, _REPLY_OFF, or _REPLY_SKIP (this command's reply is skipped);
        # while not on, the proxy expects no reply and gives none of its own.
        self._noreply = 0
        self._skip_next = False
        self._closing = False
        text = (db_name or "0").strip()
        route_db = int(text) if text.isdigit() else -1
        self.route_db = route_db  # -1: the route's logical database is not a number
        self._initial_db_number = max(route_db, 0)
        self._logical_db = self._initial_db_number
        # A route without a logical database connects to 0 without checking db_names
        # (users without db_names traits can connect); SELECT is always checked.
        self._initial_db: int | None = route_db if (db_name or "").strip() else None
        self._access_cache: dict[int | None, DatabaseAccess] = {}
        self._script_check: tuple[DatabaseAccess, bool] | None = None
        self._access_db = self._initial_db  # the key ``_access`` was computed for
        self._access = self._access_for(self._initial_db)
        # Plain commands ``_access`` allowed, by name (those whose RBAC name does not depend
        # on their arguments): name -> RBAC name. Emptied whenever ``_access`` changes.
        self._allowed: dict[str, str] = {}
        # Reply side state.
        self._framer = ReplyFramer(max_line=max_reply_line)
        self._q: deque[_Entry] = deque()
        self._held = b""
        self._sub2 = False  # RESP2 subscribed mode: message arrays are out of band
        self._monitor = False
        self._down: list[bytes] = []  # local replies that go out at once
        self._up_out: list[bytes] = []  # bytes for the database decided on the reply side
        # Re-authentication in band (Entra ID tokens): what a RESET or a MULTI replay needs.
        self._client_name: bytes | None = None
        self._multi_cmds: list[bytes] = []  # raw commands queued in the open MULTI
        self._multi_size = 0
        self._watching = False
        self._watch_broken = False  # the open transaction's WATCH was lost to a replay
        self._monitor_oks = 0  # +OK replies of the proxy's AUTH still to drop in MONITOR mode
        self._reauth_after_exec: bytes | None = None
        # Blocking commands are capped at this many seconds (None: as sent) so that an AUTH
        # queued behind one runs in time; later commands wait in the proxy meanwhile.
        self.block_cap: float | None = None
        self.clock: Callable[[], float] = time.monotonic
        self._blocked: _Blocked | None = None
        self._held_up: list[bytes] = []
        self.held_bytes = 0  # bytes of client commands waiting in the proxy behind a capped block
        # Per-command counts for the metrics (read and reset by the shell).
        self._m_on = count_commands
        self.allowed_counts: dict[str, int] = {}
        self.denied_counts: dict[str, int] = {}
        # Only plain commands (and SELECT, AUTH, QUIT) were sent: nothing set connection state
        # that RESET might not undo (CLIENT SETINFO, say), so the database connection may serve
        # another session after RESET (:attr:`reusable`).
        self._clean = True

    # -- state the shell reads -------------------------------------------------------------

    @property
    def access(self) -> DatabaseAccess:
        return self._access

    @property
    def logical_db(self) -> int:
        return self._logical_db

    @property
    def idle(self) -> bool:
        """No reply is due from the database (nor in the middle of one)."""
        return not self._q and not self._framer.in_frame

    @property
    def reusable(self) -> bool:
        """The session's database connection may be reset and given to another session: only
        plain commands, SELECT, AUTH (answered here) and QUIT were sent, every reply due has
        come, and nothing waits, blocks or streams (Pub/Sub, MONITOR, MULTI, CLIENT REPLY)."""
        return (self._clean and not self._q and not self._framer.in_frame and not self._held
                and not self._in_multi and not self._monitor and not self._monitor_cmd
                and not self._noreply and self._blocked is None and not self._held_up
                and not any(self._subs) and not self._sub2)

    @property
    def parkable(self) -> bool:
        """:attr:`reusable`, and no command is half read: between two commands the session
        may give its connection back and take another (RESET and authenticated again, in its
        logical database) for the next one, and the client cannot tell."""
        return not self._parser.pending and self.reusable

    @property
    def pending(self) -> int:
        """Bytes held for an incomplete command from the client."""
        return self._parser.pending

    def discard(self, reason: str) -> None:
        """Drop the incomplete command (its memory goes now); the session must end."""
        self._parser.discard(reason)

    def detach(self) -> None:
        """The session ended: drop what refers back to it (callbacks, queued reply hooks)."""
        self._on_protocol_error = None
        self._q.clear()
        self._blocked = None
        self._held_up, self.held_bytes = [], 0

    def reply_local(self, data: bytes) -> bytes:
        """A reply of the proxy's own in its place; returns what goes to the client now."""
        self._local(data)
        return self._take_down() if self._down else b""

    @property
    def mid_reply(self) -> bool:
        """The client is in the middle of a reply: nothing of the proxy's may be written now."""
        return self._framer.in_frame or bool(self._held)

    # -- access ------------------------------------------------------------------------------

    def update_access(self, roles: RoleSet, db_labels: Mapping[str, str]) -> Decision:
        """Check the next commands against ``roles`` and ``db_labels`` as they are now; returns
        the decision for the session's current logical database."""
        self.roles = roles
        self.db_labels = db_labels
        self._access_cache.clear()
        self._set_access(self._access_db)
        return self._access.decision

    def _access_for(self, logical_db: int | None) -> DatabaseAccess:
        acc = self._access_cache.get(logical_db)
        if acc is None:
            acc = self.roles.for_database(self.database, self.db_labels, self.db_user, logical_db)
            if len(self._access_cache) > 64:
                self._access_cache.clear()
            self._access_cache[logical_db] = acc
        return acc

    def _set_access(self, logical_db: int | None) -> None:
        """Check commands against ``logical_db``'s access from now on (None: the route's)."""
        self._access_db = logical_db
        self._access = self._access_for(logical_db)
        self._allowed = {}

    def _scripts_allowed(self, name: str) -> bool:
        """May this session run (or load) scripts? Cached per access (SELECT changes it)."""
        acc = self._access
        cached = self._script_check
        if cached is not None and cached[0] is acc:
            contained = cached[1]
        else:
            contained = acc.every_logical_db and not acc.denies_any(SCRIPT_CALLABLE)
            self._script_check = (acc, contained)
        return contained or acc.explicitly_allows(name, ("@scripting",))

    # -- audit -------------------------------------------------------------------------------


    def _audit_query(self, cmd: Command, name: str, decision: Decision | None, error: str = "") -> None:
        denied = decision is not None and not decision.allowed
        if denied and not error:
            error = decision.reason
        self._aq.query(time.time(), self._logical_db, cmd, name, error)
        if self._m_on:
            counts = self.denied_counts if denied else self.allowed_counts
            counts[name] = counts.get(name, 0) + 1

    # -- bytes in, bytes out ------------------------------------------------------------------

    def feed_client(self, data: bytes) -> tuple[bytes, bytes]:
        """Bytes from the client -> (bytes for the database, bytes for the client now)."""
        try:
            cmds = self._parser.feed(data)
        except ProtocolError as err:
            # The commands before the bad frame run (as on the server), then the error.
            out = self._handle(err.commands) if err.commands else []
            if self._on_protocol_error is not None:
                self._on_protocol_error(self._logical_db, f"protocol error: {err}")
            self._local(err.reply())
            self.ending = End(f"protocol error: {err}", after_replies=True, input_refused=True)
            return b"".join(out), self._take_down()
        if not cmds:
            return b"", b""
        out = self._handle(cmds)
        if self._closing and self.ending is None:
            self.ending = End("client quit", after_replies=True)
        up = out[0] if len(out) == 1 else b"".join(out)
        return up, self._take_down() if self._down else b""

    def feed_upstream(self, data: bytes) -> bytes:
        """Bytes from the database -> bytes for the client."""
        q = self._q
        plain = q and q[0].plain and not self._held and not self._monitor
        if plain and self._resp2 and not self._sub2:
            # Hottest path: whole RESP2 replies, each answering a command, counted in C.
            replies = self._framer.whole_replies(data)
            if replies > 0:
                head = q[0]
                if head.n > replies:
                    head.n -= replies
                    return data
                if head.n == replies and len(q) == 1:
                    q.popleft()
                    return data
                # Replies for more than the head entry: framed below (the framer saw nothing).
        try:
            frames = self._framer.feed(data)
        except ProtocolError as err:
            self.ending = End(f"bad reply from the database: {err}")
            return b""
        # Hot path: every complete reply belongs to the plain entry at the head.
        if plain:
            head = q[0]
            sub2 = self._sub2
            replies = 0
            for f in frames:
                k = f.kind
                if k == ">" or k == "|" or (sub2 and k == "*" and f.tag in _PUBSUB_MESSAGES):
                    continue
                replies += 1
            if head.n > replies:
                head.n -= replies
                return data
            if head.n == replies and len(q) == 1:  # every reply due, and nothing waits after
                q.popleft()
                return data
        try:
            out = self._route(data, frames)
        except End as end:
            self.ending = end
            return b""
        return out[0] if len(out) == 1 else b"".join(out)

    def _take_down(self) -> bytes:
        down = self._down
        self._down = []
        return down[0] if len(down) == 1 else b"".join(down)

    def swallowed(self, command: bytes) -> bytes:
        """A command of the proxy's own, sent now, whose reply the client never sees."""
        self._q.append(_Entry(1, False, swallow=True))
        return command

    def take_upstream(self) -> bytes:
        """Bytes for the database that the replies decided (a re-issued blocking command, the
        commands held behind it): the shell sends them after each :meth:`feed_upstream`."""
        if not self._up_out:
            return b""
        out = self._up_out
        self._up_out = []
        return b"".join(out)

    # -- re-authentication in band ------------------------------------------------------------

    def reauth(self, auth_cmd: bytes) -> bytes:
        """Bytes for the database that authenticate this connection again (a fresh Entra ID
        token) without the client seeing anything, whatever state the session is in:

        * plain, RESP3 subscribed, MONITOR: AUTH, its reply dropped;
        * RESP2 subscribed (where Redis takes no AUTH): RESET, AUTH, SELECT, CLIENT SETNAME and
          the subscriptions again, in one write, so no message is lost in between;
        * inside MULTI (where AUTH would be queued): DISCARD, AUTH, MULTI and the queued
          commands again; a WATCH of that transaction cannot be carried over, so its EXEC
          fails as a WATCH conflict does (the client retries);
        * behind a blocking command: AUTH waits in the database's input behind it, and runs
          when the capped block ends (:attr:`block_cap`).
        """
        self.upstream_auth = auth_cmd
        if self._noreply == _REPLY_OFF:
            return auth_cmd  # no reply will come
        if self._noreply == _REPLY_SKIP:
            self._noreply = 0  # the AUTH is the command whose reply is skipped
            return auth_cmd
        if self._monitor or self._monitor_cmd:
            self._monitor_oks += 1
            return auth_cmd
        if self._in_multi:
            return self._reauth_in_multi(auth_cmd)
        if self._proto == 2 and any(self._subs):
            return self._reauth_subscribed(auth_cmd)
        entry = _Entry(1, False, swallow=True, hook=self._reauth_answered)
        if self._blocked is None:
            self._q.append(entry)
        else:
            # It waits in the database's input right behind the blocking command, before the
            # commands the proxy holds: its reply comes right after the block's.
            self._insert_after_block(self._blocked.entry, entry)
        return auth_cmd

    def _reauth_answered(self, kind: str, done: bool) -> None:
        if kind == "-" and self.ending is None:
            self.ending = End("the database refused the proxy's new credentials",
                              "Cachegate ended this session: the database refused the proxy's renewed "
                              "Entra ID token; connect again")

    def _insert_after_block(self, block_entry: _Entry, entry: _Entry) -> None:
        q = self._q
        try:
            i = q.index(block_entry) + 1
        except ValueError:
            i = 0
        while i < len(q) and q[i].swallow:
            i += 1
        q.insert(i, entry)

    def _end_multi(self) -> None:
        self._in_multi = self._multi_bad = False
        self._watching = self._watch_broken = False
        self._multi_cmds, self._multi_size = [], 0

    def _forward_and_end_multi(self, cmd: Command, name: str, out: list[bytes]) -> None:
        """EXEC or DISCARD, then an AUTH that had to wait for the transaction's end."""
        self._end_multi()
        _Handlers._forward(self, cmd, name, out)
        auth, self._reauth_after_exec = self._reauth_after_exec, None
        if auth is not None:
            out.append(auth)
            self._expect(1, swallow=True)

    def _block_reply(self, blocked: _Blocked, frame: bytes) -> bytes:
        """The reply of a capped blocking command: a timeout the client did not ask for is
        dropped and the command sent again (after what waited, the proxy's AUTH); anything
        else is the client's reply, and the commands held behind the block go out."""
        now = self.clock()
        if frame in _NILS and (blocked.deadline is None or now < blocked.deadline - 0.001):
            entry = _Entry(1, False, transform=lambda f: self._block_reply(blocked, f))
            # After the swallowed replies already due (the AUTH behind the block), before
            # any local reply of a later command. (The block's own entry is at the head.)
            self._insert_after_block(blocked.entry, entry)
            blocked.entry = entry
            self._up_out.append(blocked.capped(self.block_cap or 0, now))
            return b""
        self._blocked = None
        if self._held_up:
            self._up_out += self._held_up
            self._held_up, self.held_bytes = [], 0
        return frame

    def _reauth_subscribed(self, auth_cmd: bytes) -> bytes:
        out = [encode_command("RESET"), auth_cmd]
        n = 2
        if self._logical_db:
            out.append(encode_command("SELECT", str(self._logical_db)))
            n += 1
        if self._client_name:
            out.append(encode_command("CLIENT", "SETNAME", self._client_name))
            n += 1
        for verb, chans in zip((b"SUBSCRIBE", b"PSUBSCRIBE", b"SSUBSCRIBE"), self._subs):
            if chans:
                out.append(encode_command(verb, *sorted(chans)))
                n += len(chans)
        self._q.append(_Entry(n, False, swallow=True))
        return b"".join(out)

    def _reauth_in_multi(self, auth_cmd: bytes) -> bytes:
        if self._multi_size > _MAX_REPLAY:
            self._reauth_after_exec = auth_cmd  # too big to replay: right after EXEC/DISCARD
            return b""
        replay = self._multi_cmds
        self._q.append(_Entry(3 + len(replay), False, swallow=True))
        if self._watching:
            self._watch_broken = True
        return b"".join([_DISCARD, auth_cmd, _MULTI, *replay])

    def _local(self, data: bytes) -> None:
        """A reply the proxy gives itself, in its place in the reply stream."""
        if self._noreply:
            return
        if not self._q and not self._framer.in_frame and not self._held:
            self._down.append(data)
        else:
            self._q.append(_Entry(0, False, data))

    def _expect(self, n: int, *, local: bytes | None = None, swallow: bool = False,
                hook: Callable[[str, bool], None] | None = None, push: bool = False,
                transform: Callable[[bytes], bytes] | None = None) -> None:
        if n <= 0 and local is None:
            return
        if self._noreply:  # no reply will come: the command is taken to have worked
            if hook is not None:
                hook("+", True)
            return
        self._q.append(_Entry(n, False, local, swallow, hook, push, transform))

    def _deny(self, cmd: Command, name: str, reason: str) -> None:
        self._audit_query(cmd, name, Decision(False, reason))
        if self._in_multi:
            self._multi_bad = True
        self._local(encode_error(reason))


    def _handle(self, cmds: list[Command]) -> list[bytes]:
        """Check, audit and route each command; returns the bytes for upstream.

        Allowed plain commands are audited together (one queue entry for the run of
        them); a command with protocol meaning or a denial first queues the run so far,
        so the audit keeps the order and each event its logical database."""
        out: list[bytes] = []
        append = out.append
        q = self._q
        check = self._access.check_command
        allowed = self._allowed
        special = _SPECIAL
        audited: list[Command] = []
        held = 0  # their bytes, which the audit queue holds until they are encoded
        now = time.time()
        m_on = self._m_on
        m_allowed = self.allowed_counts
        self.commands += len(cmds)
        unusual = self._monitor_cmd or self._noreply or self._in_multi
        for cmd in cmds:
            name = cmd.name
            handler = special.get(name)
            if handler is not None or unusual:
                if name not in _KEEP_CLEAN:
                    self._clean = False
                if audited:
                    self._aq.commands(now, self._logical_db, audited, held)
                    audited, held = [], 0
                if self._monitor_cmd and name != "QUIT":
                    handler = _Handlers.other_in_monitor
                elif handler is None:
                    handler = _Handlers.plain
                skipping = self._noreply == _REPLY_SKIP
                handler(self, cmd, out)
                if skipping and self._noreply == _REPLY_SKIP:
                    self._noreply = 0
                if self._skip_next:
                    self._skip_next = False
                    self._noreply = _REPLY_SKIP
                check = self._access.check_command  # SELECT/RESET may have changed it
                allowed = self._allowed
                unusual = self._monitor_cmd or self._noreply or self._in_multi
                continue
            rbac_name = allowed.get(name)
            if rbac_name is None:
                info = lookup(name, cmd.argv)
                decision = check(info.name, info.categories)
                if not decision.allowed:
                    if audited:
                        self._aq.commands(now, self._logical_db, audited, held)
                        audited, held = [], 0
                    self._deny(cmd, info.name, decision.reason)
                    continue
                rbac_name = info.name
                if name not in SUBCOMMAND_PARENTS and len(allowed) < _ALLOWED_MAX:
                    allowed[name] = rbac_name
            audited.append(cmd)
            raw = cmd.raw
            append(raw)
            held += len(raw)
            if m_on:
                m_allowed[rbac_name] = m_allowed.get(rbac_name, 0) + 1
            if q:
                last = q[-1]
                if last.plain:
                    last.n += 1
                    continue
            q.append(_Entry(1))
        if audited:
            self._aq.commands(now, self._logical_db, audited, held)
        if self._blocked is not None:
            # Behind a blocking command the database would not run these yet either: they wait
            # here, so that the block can be re-issued before them.
            start = self._blocked.hold_from
            self._blocked.hold_from = 0
            held = out[start:]
            del out[start:]
            for b in held:
                self.held_bytes += len(b)
            self._held_up += held
        return out


    def _route(self, data: bytes, frames: list) -> list[bytes]:
        """The general case: place local replies, drop swallowed frames, run hooks."""
        q = self._q
        out: list[bytes] = []
        pos = 0  # data[pos:] not yet placed in out
        held = self._held
        for f in frames:
            end = f.end
            k = f.kind
            if k == ">":
                oob = not (q and q[0].push and f.tag in _CONFIRMATIONS) or self._monitor
            else:
                oob = (self._monitor or k == "|"
                       or (self._sub2 and k == "*" and f.tag in _PUBSUB_MESSAGES))
            if self._monitor_oks and k == "+" and f.raw_len == 5 and end >= 5 and data[end - 5:end] == b"+OK\r\n":
                # The reply to the proxy's own AUTH, among MONITOR's lines.
                self._monitor_oks -= 1
                if end - 5 > pos:
                    out.append(data[pos:end - 5])
                pos = end
                continue
            if oob or not q or q[0].n == 0:
                if held:
                    out.append(held)
                    held = b""
            else:
                e = q[0]
                start = end - f.raw_len
                if e.transform is not None:
                    if start > pos:
                        out.append(data[pos:start])
                    # A frame begun in an earlier chunk has its start held.
                    frame = held + data[:end] if start < 0 else data[start:end]
                    held = b""
                    pos = end
                    out.append(e.transform(frame))
                elif e.swallow:
                    if start > pos:
                        out.append(data[pos:start])
                    held = b""
                    pos = end
                elif held:
                    out.append(held)
                    held = b""
                e.n -= 1
                if e.hook is not None:
                    e.hook(k, e.n == 0)
                if e.n == 0:
                    q.popleft()
                    if e.local is not None:
                        if end > pos:
                            out.append(data[pos:end])
                        pos = end
                        out.append(e.local)
            # Local replies now at the head go right after this frame.
            while q and q[0].n == 0:
                e = q.popleft()
                if end > pos:
                    out.append(data[pos:end])
                pos = end
                if e.local is not None:
                    out.append(e.local)
        tail = data[pos:]
        if tail:
            if q and (q[0].swallow or q[0].transform is not None) and not self._monitor:
                # Only the incomplete frame at the end is the swallowed (or rewritten) reply's
                # start; complete frames before it (pushes, messages) go out now.
                last = frames[-1].end if frames else 0
                if last > pos:
                    if held:
                        out.append(held)
                        held = b""
                    out.append(data[pos:last])
                    tail = data[last:]
                held += tail
                if len(held) > (_MAX_HELD if q[0].transform is None else _MAX_TRANSFORMED):
                    raise End("bad reply from the database: oversized internal reply",
                               "Cachegate ended this session: the reply was too large to check")
            else:
                if held:
                    out.append(held)
                    held = b""
                out.append(tail)
        self._held = held
        return out


# --------------------------------------------------------------------------------------------
# Commands with protocol meaning


# An integer as Redis reads one (string2ll): no sign but "-", no leading zeros, no blanks.
_INTEGER = re.compile(rb"-?[1-9][0-9]{0,18}|0")


def _parse_int(arg: bytes) -> int | None:
    if arg.isdigit() and len(arg) < 12:
        return int(arg)
    return None


class _Handlers:
    """Each takes (session, command, out) and either appends the command's bytes to
    ``out`` with the reply expectation, or answers locally."""

    @staticmethod
    def _rbac(s: SessionCore, cmd: Command) -> tuple[str, bool]:
        info = lookup(cmd.name, cmd.argv)
        decision = s._access.check_command(info.name, info.categories)
        if not decision.allowed:
            s._deny(cmd, info.name, decision.reason)
            return info.name, False
        return info.name, True

    @staticmethod
    def _rbac_outside_multi(s: SessionCore, cmd: Command, hint: str = "") -> str | None:
        """The command's name when the role allows it and no MULTI is open; else it is
        denied (with the reason) and None."""
        name, ok = _Handlers._rbac(s, cmd)
        if not ok:
            return None
        if s._in_multi:
            s._deny(cmd, name, f"{name} inside MULTI is not supported by Cachegate{hint}")
            return None
        return name

    @staticmethod
    def _forward(s: SessionCore, cmd: Command, name: str, out: list[bytes], n: int = 1, **kw: Any) -> None:
        s._audit_query(cmd, name, None)
        out.append(cmd.raw)
        if s._in_multi and name != "MULTI":
            s._multi_cmds.append(cmd.raw)
            s._multi_size += len(cmd.raw)
        s._expect(n, **kw)

    @staticmethod
    def plain(s: SessionCore, cmd: Command, out: list[bytes]) -> None:
        """A command without protocol meaning, off the hot path (while CLIENT REPLY is off)."""
        name, ok = _Handlers._rbac(s, cmd)
        if ok:
            _Handlers._forward(s, cmd, name, out)

    @staticmethod
    def other_in_monitor(s: SessionCore, cmd: Command, out: list[bytes]) -> None:
        s._deny(cmd, cmd.name, "only QUIT is accepted after MONITOR")

    @staticmethod
    def auth(s: SessionCore, cmd: Command, out: list[bytes]) -> None:
        argv = cmd.argv
        if len(argv) not in (2, 3):
            s._audit_query(cmd, "AUTH", None, error="wrong number of arguments")
            s._local(encode_error("ERR wrong number of arguments for 'auth' command"))
            return
        user = argv[1].decode("utf-8", "replace") if len(argv) == 3 else "default"
        err = _own_user_error(s, user)
        if err:
            s._audit_query(cmd, "AUTH", Decision(False, err))
            s._local(encode_error(err))
            return
        s._audit_query(cmd, "AUTH", None)
        s._local(_OK)

    @staticmethod
    def hello(s: SessionCore, cmd: Command, out: list[bytes]) -> None:
        argv = cmd.argv
        if len(argv) == 1:
            _Handlers._forward(s, cmd, "HELLO", out)
            return
        ver = _parse_int(argv[1])
        if ver is None and not _INTEGER.fullmatch(argv[1]):
            s._audit_query(cmd, "HELLO", None, error="protocol version is not an integer")
            s._local(encode_error("ERR Protocol version is not an integer or out of range"))
            return
        if ver not in (2, 3):
            s._audit_query(cmd, "HELLO", None, error="unsupported protocol version")
            s._local(encode_error("NOPROTO unsupported protocol version"))
            return
        forward: list[bytes] = [b"HELLO", argv[1]]
        i = 2
        while i < len(argv):
            opt = argv[i].upper()
            if opt == b"AUTH" and i + 2 < len(argv):
                err = _own_user_error(s, argv[i + 1].decode("utf-8", "replace"))
                if err:
                    s._audit_query(cmd, "HELLO", Decision(False, err))
                    s._local(encode_error(err))
                    return
                i += 3
            elif opt == b"SETNAME" and i + 1 < len(argv):
                forward += [b"SETNAME", argv[i + 1]]
                s._client_name = argv[i + 1] or None
                i += 2
            else:
                s._audit_query(cmd, "HELLO", None, error="syntax error")
                s._local(encode_error(
                    f"ERR Syntax error in HELLO option '{argv[i].decode('utf-8', 'replace')[:64]}'"))
                return
        before = s._proto
        s._proto = ver
        if ver >= 3:
            s._resp2 = False

        def hook(kind: str, done: bool) -> None:
            if kind == "-":
                s._proto = before
            else:
                s._framer.protocol = ver

        s._audit_query(cmd, "HELLO", None)
        out.append(encode_command(*forward))
        s._expect(1, hook=hook)

    @staticmethod
    def select(s: SessionCore, cmd: Command, out: list[bytes]) -> None:
        name = _Handlers._rbac_outside_multi(s, cmd, "; SELECT before MULTI")
        if name is None:
            return
        n = _parse_int(cmd.argv[1]) if len(cmd.argv) == 2 else None
        if n is None:
            _Handlers._forward(s, cmd, name, out)  # the server's own error
            return
        decision = s.roles.check_database(s.database, s.db_labels, s.db_user, n)
        if not decision:
            s._deny(cmd, name, decision.reason)
            return
        previous = (s._logical_db, s._access_db)
        s._logical_db = n
        s._set_access(n)

        def hook(kind: str, done: bool) -> None:
            if kind == "-" and s._logical_db == n:
                # Recomputed, not restored: the roles may have changed meanwhile.
                s._logical_db = previous[0]
                s._set_access(previous[1])

        _Handlers._forward(s, cmd, name, out, hook=hook)

    @staticmethod
    def other_db(s: SessionCore, cmd: Command, out: list[bytes]) -> None:
        """MOVE, SWAPDB, COPY ... DB n: the other logical databases must be allowed too."""
        name, ok = _Handlers._rbac(s, cmd)
        if ok and _Handlers._other_dbs_allowed(s, cmd, name):
            _Handlers._forward(s, cmd, name, out)

    @staticmethod
    def _other_dbs_allowed(s: SessionCore, cmd: Command, name: str) -> bool:
        """The logical databases the command reaches besides the session's own are allowed
        too; else it is denied (with the reason)."""
        for arg in referenced_dbs(cmd.name, cmd.argv):
            n = _parse_int(arg)
            if n is None:
                continue
            decision = s.roles.check_database(s.database, s.db_labels, s.db_user, n)
            if not decision:
                s._deny(cmd, name, decision.reason)
                return False
        return True

    @staticmethod
    def flushall(s: SessionCore, cmd: Command, out: list[bytes]) -> None:
        """FLUSHALL empties every logical database: only for sessions allowed them all."""
        name, ok = _Handlers._rbac(s, cmd)
        if not ok:
            return
        if not s._access.every_logical_db:
            s._deny(cmd, name, "FLUSHALL empties every logical database and your roles allow only "
                    "some of them; use FLUSHDB in each one you may use")
            return
        _Handlers._forward(s, cmd, name, out)

    @staticmethod
    def multi(s: SessionCore, cmd: Command, out: list[bytes]) -> None:
        name, ok = _Handlers._rbac(s, cmd)
        if ok:
            if not s._in_multi:
                s._in_multi, s._multi_bad = True, False
                s._multi_cmds, s._multi_size = [], 0
            _Handlers._forward(s, cmd, name, out)

    @staticmethod
    def exec_(s: SessionCore, cmd: Command, out: list[bytes]) -> None:
        name, ok = _Handlers._rbac(s, cmd)
        if not ok:
            return
        if s._in_multi and s._multi_bad:
            s._end_multi()
            s._audit_query(cmd, name, None, error="transaction aborted: a command in it was denied")
            out.append(_DISCARD)
            s._expect(1, swallow=True, local=_EXECABORT)
            return
        if s._in_multi and s._watch_broken:
            s._end_multi()
            s._audit_query(cmd, name, None, error="transaction aborted: its WATCH did not survive "
                           "the proxy's re-authentication")
            out.append(_DISCARD)
            s._expect(1, swallow=True, local=b"_\r\n" if s._proto >= 3 else b"*-1\r\n")
            return
        s._forward_and_end_multi(cmd, name, out)

    @staticmethod
    def discard(s: SessionCore, cmd: Command, out: list[bytes]) -> None:
        name, ok = _Handlers._rbac(s, cmd)
        if ok:
            s._forward_and_end_multi(cmd, name, out)

    @staticmethod
    def watch(s: SessionCore, cmd: Command, out: list[bytes]) -> None:
        """WATCH and UNWATCH: whether keys are watched (a MULTI replay cannot keep them)."""
        name, ok = _Handlers._rbac(s, cmd)
        if ok:
            if not s._in_multi:
                s._watching = cmd.name == "WATCH"
            _Handlers._forward(s, cmd, name, out)

    @staticmethod
    def blocking(s: SessionCore, cmd: Command, out: list[bytes]) -> None:
        """BLPOP, XREAD BLOCK...: with :attr:`SessionCore.block_cap` set, a longer block is
        sent capped and sent again (for the time left) when the cap ends it, so that what
        waits behind it (the proxy's AUTH) runs in time; the client sees one command."""
        name, ok = _Handlers._rbac(s, cmd)
        if not ok:
            return
        cap = s.block_cap
        spec = _block_timeout(cmd) if cap is not None and not s._in_multi and not s._noreply else None
        if spec is None:
            _Handlers._forward(s, cmd, name, out)
            return
        index, seconds, millis = spec
        s._audit_query(cmd, name, None)
        blocked = _Blocked(cmd.argv, index, millis, None if seconds == 0 else s.clock() + seconds)
        out.append(blocked.capped(cap, s.clock()))
        s._blocked = blocked
        blocked.hold_from = len(out)
        blocked.entry = _Entry(1, False, transform=lambda frame: s._block_reply(blocked, frame))
        s._q.append(blocked.entry)

    @staticmethod
    def subscribe(s: SessionCore, cmd: Command, out: list[bytes]) -> None:
        name = _Handlers._rbac_outside_multi(s, cmd)
        if name is None:
            return
        channels = cmd.argv[1:]
        if not channels:
            _Handlers._forward(s, cmd, name, out)  # arity error: one reply
            return
        s._subs[_SUBSCRIBE[name]].update(channels)
        if s._proto >= 3:  # confirmations are push frames, one per channel
            _Handlers._forward(s, cmd, name, out, n=len(channels), push=True)
            return

        def hook(kind: str, done: bool) -> None:
            if kind != "-":
                s._sub2 = True

        _Handlers._forward(s, cmd, name, out, n=len(channels), hook=hook)

    @staticmethod
    def unsubscribe(s: SessionCore, cmd: Command, out: list[bytes]) -> None:
        name = _Handlers._rbac_outside_multi(s, cmd)
        if name is None:
            return
        kind_set = s._subs[_UNSUBSCRIBE[name]]
        channels = cmd.argv[1:]
        if channels:
            n = len(channels)
            kind_set.difference_update(channels)
        else:
            n = max(1, len(kind_set))
            kind_set.clear()
        if s._proto >= 3:
            _Handlers._forward(s, cmd, name, out, n=n, push=True)
            return
        remaining = sum(len(x) for x in s._subs)

        def hook(kind: str, done: bool) -> None:
            if done:
                s._sub2 = remaining > 0

        _Handlers._forward(s, cmd, name, out, n=n, hook=hook)

    @staticmethod
    def monitor(s: SessionCore, cmd: Command, out: list[bytes]) -> None:
        name = _Handlers._rbac_outside_multi(s, cmd)
        if name is None:
            return
        s._monitor_cmd = True

        def hook(kind: str, done: bool) -> None:
            if kind == "-":
                s._monitor_cmd = False
            else:
                s._monitor = True

        _Handlers._forward(s, cmd, name, out, hook=hook)

    @staticmethod
    def reset(s: SessionCore, cmd: Command, out: list[bytes]) -> None:
        if s._monitor_cmd:
            s._deny(cmd, "RESET", "only QUIT is accepted after MONITOR")
            return
        name, ok = _Handlers._rbac(s, cmd)
        if not ok:
            return
        initial = s._initial_db_number

        def hook(kind: str, done: bool) -> None:
            if kind != "-":
                s._sub2 = False
                s._framer.protocol = 2

        s._proto = 2
        s._watching = s._watch_broken = False
        s._client_name = None
        s._noreply = 0  # RESET turns replies back on, and answers
        s._skip_next = False
        s._in_multi = s._multi_bad = False
        for x in s._subs:
            x.clear()
        s._logical_db = initial
        s._set_access(s._initial_db)
        _Handlers._forward(s, cmd, name, out, hook=hook)
        # RESET logs the connection out: the proxy authenticates again, silently.
        if s.upstream_auth:
            out.append(s.upstream_auth)
            s._expect(1, swallow=True)
        if initial:
            out.append(encode_command("SELECT", str(initial)))
            s._expect(1, swallow=True)

    @staticmethod
    def quit(s: SessionCore, cmd: Command, out: list[bytes]) -> None:
        s._audit_query(cmd, "QUIT", None)
        s._local(_OK)
        s._closing = True

    @staticmethod
    def client(s: SessionCore, cmd: Command, out: list[bytes]) -> None:
        name, ok = _Handlers._rbac(s, cmd)
        if not ok:
            return
        if name == "CLIENT|REPLY":
            if s._in_multi:  # queued, it would take effect at EXEC
                s._deny(cmd, name, "CLIENT REPLY inside MULTI is not supported by Cachegate; "
                        "send it outside the transaction")
                return
            mode = cmd.argv[2].upper() if len(cmd.argv) == 3 else b""
            if mode == b"ON":
                s._noreply = 0  # its +OK comes
            elif mode == b"OFF":
                s._noreply = _REPLY_OFF
            elif mode == b"SKIP":
                if s._noreply != _REPLY_OFF:
                    s._skip_next = True
                _Handlers._forward(s, cmd, name, out, n=0)
                return
            _Handlers._forward(s, cmd, name, out)
            return
        if name == "CLIENT|SETNAME" and len(cmd.argv) == 3:
            s._client_name = cmd.argv[2] or None  # set again after a RESET of the proxy's
        if name == "CLIENT|LIST" and not s._access.explicitly_allows(name, lookup(cmd.name, cmd.argv).categories):
            # Every session reaches the database as the proxy: other connections are other
            # people's sessions. Only a role that names CLIENT LIST sees them.
            if s._in_multi:
                s._deny(cmd, name, "CLIENT LIST inside MULTI is not supported by Cachegate; "
                        "send it outside the transaction")
                return
            client_id = s.client_id
            _Handlers._forward(s, cmd, name, out, transform=lambda f: own_client_lines(f, client_id))
            return
        _Handlers._forward(s, cmd, name, out)

    @staticmethod
    def proxy_business(s: SessionCore, cmd: Command, out: list[bytes]) -> None:
        """ACL, CONFIG, MIGRATE: what touches the proxy's credentials is refused whatever
        the roles say; CONFIG GET replies lose the values of secret parameters."""
        refusal = proxy_refusal(cmd.name, cmd.argv)
        if refusal is not None:
            s._deny(cmd, lookup(cmd.name, cmd.argv).name, refusal)
            return
        name, ok = _Handlers._rbac(s, cmd)
        if not ok:
            return
        if name == "CONFIG|GET":
            if s._in_multi:
                s._deny(cmd, name, "CONFIG GET inside MULTI is not supported by Cachegate; "
                        "send it outside the transaction")
                return
            _Handlers._forward(s, cmd, name, out, transform=redact_config_reply)
            return
        if name == "MIGRATE" and not _Handlers._other_dbs_allowed(s, cmd, name):
            return
        _Handlers._forward(s, cmd, name, out)

    @staticmethod
    def script(s: SessionCore, cmd: Command, out: list[bytes]) -> None:
        """EVAL, FCALL, SCRIPT/FUNCTION LOAD...: Redis runs a script's commands without the
        proxy seeing them, so scripts run only where they cannot do more than the roles
        allow (no deny of a command a script may call, every logical database allowed), or
        where a role allows them explicitly (@scripting or the command by name)."""
        info = lookup(cmd.name, cmd.argv)
        name, ok = _Handlers._rbac(s, cmd)
        if not ok:
            return
        if info.name in SCRIPT_RUNNERS and not s._scripts_allowed(info.name):
            s._deny(cmd, name, f"{name.replace('|', ' ')} is refused by Cachegate: your roles deny "
                    "some commands or limit the logical databases, and Redis runs a script's commands "
                    "without the proxy seeing them; ask an administrator for a role that allows "
                    "@scripting explicitly (see docs/rbac.md)")
            return
        _Handlers._forward(s, cmd, name, out)

    @staticmethod
    def replication(s: SessionCore, cmd: Command, out: list[bytes]) -> None:
        s._deny(cmd, cmd.name, f"{cmd.name} (replication) is not supported by Cachegate")


def _own_user_error(s: SessionCore, user: str) -> str | None:
    if user == s.db_user:
        return None
    return (f'ERR AUTH as db user "{user[:64]}" is not allowed: this Cachegate session is db user '
            f'"{s.db_user}" (Cachegate authenticates for you; connect with --db-user to change)')


# Commands after which a connection may still serve another session once RESET (which
# selects database 0 and logs it out; the proxy authenticates it again). AUTH and QUIT are
# answered by the proxy itself.
_KEEP_CLEAN = frozenset(("SELECT", "AUTH", "QUIT"))

_ALLOWED_MAX = 256  # names remembered per access (a client sending made-up names gets no more)

_SPECIAL: dict[str, Callable[[SessionCore, Command, list[bytes]], None]] = {
    "AUTH": _Handlers.auth,
    "HELLO": _Handlers.hello,
    "SELECT": _Handlers.select,
    "MOVE": _Handlers.other_db,
    "SWAPDB": _Handlers.other_db,
    "COPY": _Handlers.other_db,
    "FLUSHALL": _Handlers.flushall,
    "MULTI": _Handlers.multi,
    "WATCH": _Handlers.watch,
    "UNWATCH": _Handlers.watch,
    **{name: _Handlers.blocking for name in _BLOCKING},
    "EXEC": _Handlers.exec_,
    "DISCARD": _Handlers.discard,
    "SUBSCRIBE": _Handlers.subscribe,
    "PSUBSCRIBE": _Handlers.subscribe,
    "SSUBSCRIBE": _Handlers.subscribe,
    "UNSUBSCRIBE": _Handlers.unsubscribe,
    "PUNSUBSCRIBE": _Handlers.unsubscribe,
    "SUNSUBSCRIBE": _Handlers.unsubscribe,
    "MONITOR": _Handlers.monitor,
    "RESET": _Handlers.reset,
    "QUIT": _Handlers.quit,
    "CLIENT": _Handlers.client,
    "ACL": _Handlers.proxy_business,
    "CONFIG": _Handlers.proxy_business,
    "MIGRATE": _Handlers.proxy_business,
    "EVAL": _Handlers.script,
    "EVALSHA": _Handlers.script,
    "EVAL_RO": _Handlers.script,
    "EVALSHA_RO": _Handlers.script,
    "FCALL": _Handlers.script,
    "FCALL_RO": _Handlers.script,
    "SCRIPT": _Handlers.script,
    "FUNCTION": _Handlers.script,
    # WAIT and WAITAOF count the writes of this connection: a session that uses them keeps it
    # (never :attr:`SessionCore.reusable`), so that they count the writes it made before.
    "WAIT": _Handlers.plain,
    "WAITAOF": _Handlers.plain,
    "SYNC": _Handlers.replication,
    "PSYNC": _Handlers.replication,
    "REPLCONF": _Handlers.replication,
}

