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
"""

from __future__ import annotations

from typing import NamedTuple

from services.dbproxy._command_table import COMMANDS, REDIS_VERSION, SUBCOMMANDS

__all__ = [
    "REDACTED",
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

_CONFIG_SECRETS = frozenset(
    {b"requirepass", b"masterauth", b"tls-key-file-pass", b"tls-client-key-file-pass"}
)


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
        out = set()
        for i in range(6, len(argv)):
            opt = argv[i].upper()
            if opt == b"AUTH" and i + 1 < len(argv):
                out.add(i + 1)
            elif opt == b"AUTH2" and i + 2 < len(argv):
                out.add(i + 2)
        return out
    if name == "CONFIG" and len(argv) > 3 and argv[1].upper() == b"SET":
        return {i + 1 for i in range(2, len(argv) - 1, 2) if argv[i].lower() in _CONFIG_SECRETS}
    if name == "ACL" and len(argv) > 3 and argv[1].upper() == b"SETUSER":
        return {i for i in range(3, len(argv)) if argv[i][:1] in (b">", b"<", b"#", b"!")}
    return ()


# Commands whose arguments may hold secrets (the only ones :func:`audit_args` inspects).
SECRET_COMMANDS = frozenset({"AUTH", "HELLO", "MIGRATE", "CONFIG", "ACL"})


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
    if name == "COPY":
        for i in range(3, len(argv) - 1):
            if argv[i].upper() == b"DB":
                return [argv[i + 1]]
    return []
