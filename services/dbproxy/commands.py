"""What the proxy knows about Redis commands: names, ACL categories, secrets.

Sans-io and cheap: one dictionary look-up per command on the hot path.

* :func:`lookup` gives a command's RBAC name (``GET``, or ``CLIENT|KILL`` for a
  subcommand) and its ACL categories (``@read``, ``@admin``...) from the table
  generated from a real redis-server (:mod:`._command_table`). A command the
  table does not know (a module's, a newer server's) has no categories: only a
  role naming it (or ``'*'``) allows it.
* :func:`audit_args` turns a command into what the audit log keeps: secrets
  (AUTH and HELLO passwords, MIGRATE AUTH, CONFIG SET requirepass, ACL SETUSER
  passwords) replaced by ``<redacted>``, long arguments cut with their length
  kept, and at most a bounded number of arguments.
* :func:`referenced_dbs` lists the logical databases a command reaches besides
  the session's own (MOVE, SWAPDB, COPY ... DB n), so they are checked against
  the role's ``db_names`` like SELECT.
* The proxy's own credentials are its business: :func:`proxy_refusal` names the
  commands it never forwards whatever the roles say (ACL user management, CONFIG
  SET of a secret parameter, MIGRATE with AUTH), and :func:`redact_config_reply`
  blanks secret parameters in CONFIG GET replies.
* Scripts: :data:`SCRIPT_RUNNERS` run or load code that calls commands inside
  Redis, where the proxy does not see them; :data:`SCRIPT_CALLABLE` are the
  commands such code may call (those without Redis's ``noscript`` flag).
* :func:`own_client_lines` keeps a session's own line of a CLIENT LIST reply.
"""

from __future__ import annotations

from typing import NamedTuple

from services.dbproxy._command_table import COMMANDS, REDIS_VERSION, SUBCOMMANDS

__all__ = [
    "REDACTED",
    "SCRIPT_CALLABLE",
    "SCRIPT_RUNNERS",
    "SECRET_CONFIG_PARAMS",
    "own_client_lines",
    "proxy_refusal",
    "redact_config_reply",
    "REDIS_VERSION",
    "KNOWN_NAMES",
    "SECRET_COMMANDS",
    "SUBCOMMAND_PARENTS",
    "CommandInfo",
    "arity_ok",
    "audit_args",
    "audit_text",
    "lookup",
    "referenced_dbs",
]

REDACTED = "<redacted>"


class CommandInfo(NamedTuple):
    """``name`` is what RBAC checks (``GET``, ``CLIENT|KILL``); ``categories`` a frozenset
    of ``@category`` strings (hashable, so the RBAC cache is hit without normalizing);
    ``arity`` as Redis gives it (negative: at least that many, name included), 0 unknown."""

    name: str
    arity: int
    flags: frozenset[str]
    categories: frozenset[str]
    known: bool


def _info(name: str, entry: tuple) -> CommandInfo:
    arity, flags, cats = entry
    return CommandInfo(name, arity, frozenset(flags), frozenset(cats), True)


_TABLE: dict[str, CommandInfo] = {n: _info(n, e) for n, e in COMMANDS.items()}
_SUBS: dict[str, dict[str, CommandInfo]] = {
    parent: {sub: _info(parent + "|" + sub, e) for sub, e in subs.items()}
    for parent, subs in SUBCOMMANDS.items()
}
# Commands whose RBAC name depends on their second argument (``CLIENT|KILL``).
SUBCOMMAND_PARENTS = frozenset(_SUBS)
# Every RBAC name the table knows (``GET``, ``CLIENT|KILL``).
KNOWN_NAMES = frozenset(_TABLE) | frozenset(i.name for subs in _SUBS.values() for i in subs.values())
_UNKNOWN: dict[str, CommandInfo] = {}
_UNKNOWN_MAX = 1024


def lookup(name: str, argv: list[bytes]) -> CommandInfo:
    """The command ``argv`` (whose uppercased first argument is ``name``)."""
    subs = _SUBS.get(name)
    if subs is not None and len(argv) > 1:
        sub = argv[1]
        if len(sub) <= 64:
            info = subs.get(sub.decode("latin-1").upper())
            if info is not None:
                return info
    info = _TABLE.get(name)
    if info is not None:
        return info
    info = _UNKNOWN.get(name)
    if info is None:
        info = CommandInfo(name[:64] if name else "", 0, frozenset(), frozenset(), False)
        if len(_UNKNOWN) < _UNKNOWN_MAX and len(name) <= 64:
            _UNKNOWN[name] = info
    return info


def arity_ok(info: CommandInfo, argc: int) -> bool:
    a = info.arity
    if a == 0:
        return True
    return argc == a if a > 0 else argc >= -a


# --------------------------------------------------------------------------------------------
# Audit: secrets masked, long arguments cut

# Configuration parameters whose value is a credential (or names the user of one).
SECRET_CONFIG_PARAMS = frozenset(
    {"requirepass", "masterauth", "masteruser", "tls-key-file-pass", "tls-client-key-file-pass"}
)
_CONFIG_SECRETS = frozenset(p.encode() for p in SECRET_CONFIG_PARAMS)


def _migrate_auth(argv: list[bytes]) -> set[int]:
    """Indexes of MIGRATE's AUTH/AUTH2 secrets as Redis reads them (options follow the 5
    fixed arguments; KEYS ends them, so a key named "auth" is not mistaken for the option)."""
    out: set[int] = set()
    i = 6
    while i < len(argv):
        opt = argv[i].upper()
        if opt == b"AUTH" and i + 1 < len(argv):
            out.add(i + 1)
            i += 2
        elif opt == b"AUTH2" and i + 2 < len(argv):
            out.add(i + 2)
            i += 3
        elif opt == b"KEYS":
            break
        else:
            i += 1
    return out


def _secret_positions(name: str, argv: list[bytes]) -> set[int] | tuple[int, ...]:
    """Indexes of argv that hold secrets (empty for almost every command)."""
    if name == "AUTH":
        return tuple(range(len(argv) - 1, len(argv))) if len(argv) > 1 else ()
    if name == "HELLO":
        out: set[int] = set()
        for i in range(2, len(argv)):
            if argv[i].upper() == b"AUTH" and i + 2 < len(argv):
                out.add(i + 2)
        return out
    if name == "MIGRATE":
        # Conservative for the audit: anything after an AUTH word, even past KEYS.
        out = set()
        for i in range(6, len(argv)):
            opt = argv[i].upper()
            if opt == b"AUTH" and i + 1 < len(argv):
                out.add(i + 1)
            elif opt == b"AUTH2" and i + 2 < len(argv):
                out.add(i + 2)
        return out
    if name == "COMMAND" and len(argv) > 2 and argv[1].upper() in (b"GETKEYS", b"GETKEYSANDFLAGS"):
        inner = argv[2:]  # the command whose keys are asked for, with its own secrets
        inner_name = inner[0].decode("latin-1").upper()
        if inner_name in SECRET_COMMANDS:
            return {i + 2 for i in _secret_positions(inner_name, inner)}
        return ()
    if name == "CONFIG" and len(argv) > 3 and argv[1].upper() == b"SET":
        return {i + 1 for i in range(2, len(argv) - 1, 2) if argv[i].lower() in _CONFIG_SECRETS}
    if name == "ACL" and len(argv) > 3 and argv[1].upper() == b"SETUSER":
        return {i for i in range(3, len(argv)) if argv[i][:1] in (b">", b"<", b"#", b"!")}
    return ()


# Commands whose arguments may hold secrets (the only ones :func:`audit_args` inspects).
SECRET_COMMANDS = frozenset({"AUTH", "HELLO", "MIGRATE", "CONFIG", "ACL", "COMMAND"})


def audit_text(arg: bytes, max_arg: int) -> str:
    """One argument as the audit log keeps it: UTF-8 (invalid bytes escaped), cut to
    ``max_arg`` bytes with its length kept."""
    if len(arg) > max_arg:
        return arg[:max_arg].decode("utf-8", "backslashreplace") + f"...({len(arg)} bytes)"
    return arg.decode("utf-8", "backslashreplace")


def audit_args(name: str, argv: list[bytes], *, max_arg: int = 256, max_args: int = 64) -> list[str]:
    """The arguments as the audit log keeps them (the command name included)."""
    secret = _secret_positions(name, argv) if name in SECRET_COMMANDS else ()
    n = len(argv)
    shown = argv if n <= max_args else argv[:max_args]
    if secret:
        out = [REDACTED if i in secret else audit_text(a, max_arg) for i, a in enumerate(shown)]
    else:
        out = [audit_text(a, max_arg) for a in shown]
    if n > max_args:
        out.append(f"...({n - max_args} more arguments)")
    return out


# --------------------------------------------------------------------------------------------
# Logical databases a command reaches


def referenced_dbs(name: str, argv: list[bytes]) -> list[bytes]:
    """Logical database arguments other than the session's own (not SELECT)."""
    if name == "MOVE" and len(argv) == 3:
        return [argv[2]]
    if name == "SWAPDB" and len(argv) == 3:
        return [argv[1], argv[2]]
    if name == "MIGRATE" and len(argv) > 4:
        return [argv[4]]  # destination-db: the same server's, when it points back here
    if name == "COPY":
        for i in range(3, len(argv) - 1):
            if argv[i].upper() == b"DB":
                return [argv[i + 1]]
    return []


# --------------------------------------------------------------------------------------------
# The proxy's credentials: never forwarded, never shown

_ACL_USER_ADMIN = frozenset({b"SETUSER", b"DELUSER", b"GETUSER", b"LIST", b"SAVE", b"LOAD", b"DRYRUN"})


def proxy_refusal(name: str, argv: list[bytes]) -> str | None:
    """Why the proxy never forwards this command, whatever the roles allow, or None.

    These read or change how the proxy authenticates to the database: Redis users and
    their passwords (a user created with ACL SETUSER would log in past the proxy and its
    audit), the password parameters, and passwords sent on to another server."""
    if name == "ACL" and len(argv) > 1 and argv[1].upper() in _ACL_USER_ADMIN:
        sub = argv[1].upper().decode()
        return (f"ACL {sub} is refused by Cachegate: the database's users and passwords are "
                "the proxy's own (it authenticates for you); give people access with Cachegate "
                "roles instead (see docs/rbac.md)")
    if name == "CONFIG" and len(argv) > 2 and argv[1].upper() == b"SET":
        for i in range(2, len(argv), 2):
            if argv[i].lower() in _CONFIG_SECRETS:
                param = argv[i].lower().decode()
                return (f"CONFIG SET {param} is refused by Cachegate: the database's credentials "
                        "are the proxy's own; rotate them in Azure (the proxy follows)")
    if name == "MIGRATE" and _migrate_auth(argv):
        return ("MIGRATE with AUTH or AUTH2 is refused by Cachegate: passwords do not pass "
                "through the proxy; ask an administrator to move the keys")
    return None


def _bulk(data: bytes) -> bytes:
    return b"$%d\r\n%s\r\n" % (len(data), data)


def _parse_bulks(frame: bytes, count: int, pos: int) -> list[bytes] | None:
    out: list[bytes] = []
    for _ in range(count):
        if frame[pos:pos + 1] != b"$":
            return None
        eol = frame.find(b"\r\n", pos)
        if eol < 0:
            return None
        n = int(frame[pos + 1:eol])
        start = eol + 2
        out.append(frame[start:start + n])
        pos = start + n + 2
    return out if pos == len(frame) else None


def redact_config_reply(frame: bytes) -> bytes:
    """A CONFIG GET reply (RESP2 array or RESP3 map of names and values) with the value of
    every secret parameter replaced by ``<redacted>``; anything else in its place is
    answered with an error, never forwarded unchecked."""
    kind = frame[:1]
    if kind == b"-":
        return frame
    try:
        eol = frame.index(b"\r\n")
        n = int(frame[1:eol])
        items = _parse_bulks(frame, 2 * n if kind == b"%" else n, eol + 2) if kind in b"*%" else None
    except ValueError:
        items = None
    if items is None or len(items) % 2:
        return b"-ERR Cachegate could not check this CONFIG GET reply, so it is not shown\r\n"
    out = [frame[:eol + 2]]
    for i in range(0, len(items), 2):
        name, value = items[i], items[i + 1]
        if name.lower() in _CONFIG_SECRETS:
            value = REDACTED.encode()
        out.append(_bulk(name))
        out.append(_bulk(value))
    return b"".join(out)


def own_client_lines(frame: bytes, client_id: int) -> bytes:
    """A CLIENT LIST reply (bulk or RESP3 verbatim string) keeping only the line of the
    connection ``client_id`` (the session's own)."""
    kind = frame[:1]
    if kind not in (b"$", b"="):
        return frame
    eol = frame.find(b"\r\n")
    body = frame[eol + 2:-2]
    prefix = b""
    if kind == b"=":
        prefix, body = body[:4], body[4:]
    mine = b"id=%d " % client_id
    kept = b"".join(line + b"\n" for line in body.split(b"\n") if line.startswith(mine))
    payload = prefix + kept
    return kind + b"%d\r\n" % len(payload) + payload + b"\r\n"


# --------------------------------------------------------------------------------------------
# Scripts

# Commands that run code inside Redis (whose commands the proxy never sees) or load it.
SCRIPT_RUNNERS = frozenset({"EVAL", "EVALSHA", "EVAL_RO", "EVALSHA_RO", "FCALL", "FCALL_RO",
                            "SCRIPT|LOAD", "FUNCTION|LOAD", "FUNCTION|RESTORE"})


def _script_callable() -> tuple[tuple[str, frozenset[str]], ...]:
    out = []
    for name, info in _TABLE.items():
        subs = _SUBS.get(name)
        if subs:
            out += [(i.name, i.categories) for i in subs.values() if "noscript" not in i.flags]
        elif "noscript" not in info.flags:
            out.append((name, info.categories))
    return tuple(sorted(out))


# What a script may call: (RBAC name, categories) of every command without ``noscript``.
SCRIPT_CALLABLE = _script_callable()
