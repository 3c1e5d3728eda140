"""Roles: the YAML role document, the built-in roles and the access evaluator.

A role document is what admins write and ``cgctl create -f role.yaml`` sends::

    kind: role
    version: v1
    metadata:
      name: redis-readonly
      description: read-only access to prod caches
    spec:
      options:
        max_session_ttl: 8h
        disconnect_expired_cert: true
        client_idle_timeout: 30m
      allow:
        db_labels: {env: [prod, staging], region: '^east.*$'}
        db_users: ['{{internal.db_users}}', default]
        db_names: ['{{internal.db_names}}', '0']
        db_commands: ['@read', '@connection', SET]
        rules:
          - resources: [user, role]
            verbs: [list, read]
      deny:
        db_users: [admin]
        db_commands: ['@dangerous']

Semantics (deny by default, deny wins)
--------------------------------------
Databases.
  A role's ``allow`` block grants the databases its ``db_labels`` select, as the db users in
  ``db_users``, in the logical databases in ``db_names``, for the commands in ``db_commands``.
  A database request is allowed when ONE role's allow block matches every part being checked
  (labels, db user, logical database) and no role's deny block denies it.

  In ``allow`` an empty ``db_labels`` map selects no database. In ``deny`` an empty map selects
  every database. Within the databases a deny block selects, each of ``db_users``, ``db_names``
  and ``db_commands`` independently denies what it lists; a deny block that has ``db_labels``
  but none of those three denies the selected databases entirely (a "label-only" deny: such
  databases are not even listed).

Labels.
  Every key of the role's map must match the database's label of that key (a database without
  that label does not match); a key with several values matches when any value does. A value
  is matched exactly, as a glob when it contains ``*`` (only ``*`` is special), or as a regular
  expression (full match) when it is written ``^...$``. The key ``'*'`` takes only the value
  ``'*'`` and matches every database, even one with no labels.

Db users and db names.
  Exact match (db names are logical database numbers, compared as numbers); a literal ``'*'``
  matches anything. ``{{internal.db_users}}`` and ``{{internal.db_names}}`` expand to the
  user's traits of those names, ``{{external.NAME}}`` to the trait NAME; a missing or empty
  trait expands to nothing. A template must be the whole value.

Commands.
  Entries are command names (``GET``), subcommands (``CLIENT|KILL``, also written
  ``CLIENT KILL``), ACL categories (``@read``) or ``'*'`` (``@all`` is the same). Matching is
  case-insensitive; a command name also covers all its subcommands. A command is allowed when a
  role whose allow block grants the database (as that db user, in that logical database) lists
  it, and no deny block selecting the database lists it. A role without ``db_commands`` allows
  no command.

  Server administration (:data:`SERVER_ADMIN_COMMANDS`: replication, persistence, shutdown,
  DEBUG, MODULE, CONFIG SET/REWRITE/RESETSTAT, MONITOR, the CLIENT subcommands that act on
  other connections, ACL LOG, cluster changes...) is not covered by ``'*'`` or ``@all`` on the
  allow side: a role must name the command (or subcommand) or one of its categories, such as
  ``@admin``. So the built-in ``access`` role keeps every data command and none of these. On
  the deny side ``'*'`` still denies everything.

Admin API.
  ``rules`` pair resources with verbs (``'*'`` matches any). Allowed when some allow rule
  matches and no deny rule does.

Options.
  Over a set of roles: the shortest ``max_session_ttl``, ``disconnect_expired_cert`` if any
  role has it (on unless a role document says ``false``: a session ends with its
  certificate), the shortest non-zero ``client_idle_timeout``, the smallest non-zero
  ``max_connections`` (concurrent sessions per user; none set: the proxy's default).

Models are immutable (frozen); :class:`RoleSet` compiles a user's roles and traits once, so
every check is a few set look-ups. Label matchers are compiled once per distinct value.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, get_args

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

__all__ = [
    "BUILTIN_ROLES",
    "SERVER_ADMIN_COMMANDS",
    "DEFAULT_MAX_SESSION_TTL",
    "KNOWN_COMMAND_CATEGORIES",
    "DatabaseAccess",
    "Decision",
    "Role",
    "RoleConditions",
    "RoleError",
    "RoleOptions",
    "RoleSet",
    "Rule",
    "format_duration",
    "is_builtin",
    "label_value_matcher",
    "load_role_yaml",
    "load_roles_yaml",
    "match_labels",
    "parse_duration",
    "validate_label_value",
]

# Commands that change or inspect the server rather than the data: '*' and '@all' in an
# allow block do not cover them (a role must name them, or a category of theirs). Each is
# one Redis refuses inside scripts (the ``noscript`` flag) except CLUSTER's changes, which
# Azure refuses itself; a script therefore cannot reach them either.
SERVER_ADMIN_COMMANDS = frozenset({
    "REPLICAOF", "SLAVEOF", "FAILOVER", "SYNC", "PSYNC", "REPLCONF",
    "SAVE", "BGSAVE", "BGREWRITEAOF", "SHUTDOWN", "DEBUG", "MODULE", "MONITOR",
    "CONFIG|SET", "CONFIG|REWRITE", "CONFIG|RESETSTAT",
    "CLIENT|KILL", "CLIENT|PAUSE", "CLIENT|UNPAUSE", "CLIENT|NO-EVICT", "CLIENT|UNBLOCK",
    "ACL|LOG", "ACL|SETUSER", "ACL|DELUSER", "ACL|GETUSER", "ACL|LIST", "ACL|SAVE", "ACL|LOAD",
    "ACL|DRYRUN", "LATENCY|RESET", "SCRIPT|KILL", "SCRIPT|DEBUG", "FUNCTION|KILL",
    "CLUSTER|ADDSLOTS", "CLUSTER|ADDSLOTSRANGE", "CLUSTER|BUMPEPOCH", "CLUSTER|DELSLOTS",
    "CLUSTER|DELSLOTSRANGE", "CLUSTER|FAILOVER", "CLUSTER|FLUSHSLOTS", "CLUSTER|FORGET",
    "CLUSTER|MEET", "CLUSTER|REPLICATE", "CLUSTER|RESET", "CLUSTER|SAVECONFIG",
    "CLUSTER|SET-CONFIG-EPOCH", "CLUSTER|SETSLOT",
})

KIND = "role"
VERSION = "v1"
DEFAULT_MAX_SESSION_TTL = 12 * 3600.0
MAX_DOCUMENT_BYTES = 1 << 20
ROLE_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")
WILDCARD = "*"

# Redis ACL categories (the server's own, then those its bundled modules add). Unknown
# categories are rejected: a misspelt category in a deny block would otherwise deny nothing.
KNOWN_COMMAND_CATEGORIES = frozenset(
    "@" + c
    for c in (
        "all keyspace read write set sortedset list hash string bitmap hyperloglog geo stream "
        "pubsub admin fast slow blocking dangerous connection transaction scripting "
        "search json timeseries bloom cuckoo cms topk tdigest"
    ).split()
)


class RoleError(ValueError):
    """An invalid role document. ``str()`` is one line naming the field and what to do."""


class _Problem(ValueError):
    """Raised inside validators: ``subpath`` extends the pydantic location of the error."""

    def __init__(self, message: str, *subpath: str | int) -> None:
        super().__init__(message)
        self.message = message
        self.subpath = subpath


# --------------------------------------------------------------------------------------------
# Durations


from services.common.durations import format_duration, parse_duration  # noqa: E402,F401 (re-exported)


# --------------------------------------------------------------------------------------------
# Value helpers


def _type_name(value: Any) -> str:
    if value is None:
        return "nothing"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, (list, tuple)):
        return "a list"
    return f"a {type(value).__name__}"


def _as_str(value: Any, *subpath: str | int) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    raise _Problem(f"expected a string, got {_type_name(value)} (quote the value)", *subpath)


def _as_list(value: Any) -> list[Any]:
    if value is None:
        return []
    if isinstance(value, (str, int)) and not isinstance(value, bool):
        return [value]
    if isinstance(value, (list, tuple)):
        return list(value)
    raise _Problem(f"expected a list of strings, got {_type_name(value)}")


def _dedupe(items: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(items))


# --------------------------------------------------------------------------------------------
# Labels


def _label_value_kind(value: str) -> str:
    if value == WILDCARD:
        return "any"
    if value.startswith("^") and value.endswith("$") and len(value) >= 2:
        return "regex"
    if WILDCARD in value:
        return "glob"
    return "exact"


def validate_label_value(value: str) -> str:
    """Check one label value of a role (exact, glob with ``*``, or ``^regex$``); return it.

    Raises ``ValueError`` with a one-line message.
    """
    if not isinstance(value, str):
        raise ValueError(f"expected a string, got {_type_name(value)} (quote the value)")
    if "{{" in value or "}}" in value:
        raise ValueError(
            f"traits are not expanded in db_labels ({value!r}); use them in db_users or db_names"
        )
    kind = _label_value_kind(value)
    if kind == "regex":
        try:
            re.compile(value)
        except re.error as exc:
            raise ValueError(f"invalid regex {value!r}: {exc}") from None
    elif value.startswith("^"):
        raise ValueError(
            f"regex {value!r} must end with '$' (write it as '^...$' to match the whole value)"
        )
    return value


def _match_any(_: str) -> bool:
    return True


@functools.lru_cache(maxsize=4096)
def label_value_matcher(value: str) -> Callable[[str], bool]:
    """A compiled predicate for one (valid) label value; cached per distinct value."""
    validate_label_value(value)
    kind = _label_value_kind(value)
    if kind == "any":
        return _match_any
    if kind == "regex":
        rx = re.compile(value)
    elif kind == "glob":
        rx = re.compile(
            "".join(
                ".*" if part == WILDCARD else re.escape(part) for part in re.split(r"(\*)", value)
            ),
            re.DOTALL,
        )
    else:
        return lambda v: v == value
    return lambda v: rx.fullmatch(v) is not None


_Selector = tuple[tuple[str, tuple[Callable[[str], bool], ...]], ...]


def _compile_selector(selector: Mapping[str, Sequence[str]]) -> _Selector:
    return tuple(
        (key, tuple(label_value_matcher(v) for v in values)) for key, values in selector.items()
    )


def _selector_matches(selector: _Selector, labels: Mapping[str, str]) -> bool:
    for key, matchers in selector:
        if key == WILDCARD:
            continue
        value = labels.get(key)
        if value is None or not any(m(value) for m in matchers):
            return False
    return True


def match_labels(
    selector: Mapping[str, Sequence[str]], labels: Mapping[str, str], *, empty_matches: bool = False
) -> bool:
    """Whether a role's ``db_labels`` map selects a database with ``labels``.

    An empty selector matches nothing (as in ``allow``) unless ``empty_matches`` (as in ``deny``).
    """
    if not selector:
        return empty_matches
    return _selector_matches(_compile_selector(selector), labels or {})


# --------------------------------------------------------------------------------------------
# Traits, db users, db names, commands

_TEMPLATE_RE = re.compile(r"^\{\{\s*(internal|external)\.([^\s{}]+)\s*\}\}$")
_INTERNAL_TRAITS = ("db_users", "db_names")
_TEMPLATE_HINT = "write {{internal.db_users}}, {{internal.db_names}} or {{external.NAME}}"


def _normalize_template(value: str) -> str | None:
    """``'{{ internal.db_users }}'`` -> ``'{{internal.db_users}}'``; None for a literal."""
    if "{{" not in value and "}}" not in value:
        return None
    m = _TEMPLATE_RE.match(value.strip())
    if not m:
        raise ValueError(f"malformed trait {value!r}: {_TEMPLATE_HINT} as the whole value")
    namespace, name = m.groups()
    if namespace == "internal" and name not in _INTERNAL_TRAITS:
        raise ValueError(f"unknown trait {value!r}: {_TEMPLATE_HINT}")
    return "{{" + namespace + "." + name + "}}"


def _trait_name(value: str) -> str | None:
    m = _TEMPLATE_RE.match(value)
    return m.group(2) if m else None


def _norm_db_name(value: str | int) -> str:
    text = str(value).strip()
    return str(int(text)) if text.isdigit() else text


_COMMAND_PART = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.:-]*$")
_COMMAND_HINT = "write a command (GET), a subcommand (CLIENT|KILL), an ACL category (@read) or '*'"


def _normalize_command_entry(value: str) -> str:
    text = value.strip()
    if text == WILDCARD:
        return WILDCARD
    if text.startswith("@"):
        category = text.lower()
        if category not in KNOWN_COMMAND_CATEGORIES:
            known = ", ".join(sorted(KNOWN_COMMAND_CATEGORIES))
            raise ValueError(f"unknown command category {value!r} (known: {known})")
        return category
    parts = [p for p in re.split(r"[\s|]+", text) if p]
    if not parts or len(parts) > 2 or not all(_COMMAND_PART.match(p) for p in parts):
        raise ValueError(f"invalid command {value!r}: {_COMMAND_HINT}")
    return "|".join(p.upper() for p in parts)


def _split_command(command: str) -> tuple[str, str] | None:
    """``"client kill"`` / ``"CLIENT|KILL"`` -> (``"CLIENT|KILL"``, ``"CLIENT"``)."""
    parts = [p for p in re.split(r"[\s|]+", command.strip()) if p]
    if not parts:
        return None
    parent = parts[0].upper()
    full = parent + "|" + parts[1].upper() if len(parts) > 1 else parent
    return full, parent


def _norm_category(category: str) -> str:
    c = category.strip().lower()
    return c if c.startswith("@") else "@" + c


# --------------------------------------------------------------------------------------------
# Models


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Rule(_Model):
    """An admin API permission: these verbs on these resources (``'*'`` = any)."""

    resources: list[str]
    verbs: list[str]

    @field_validator("resources", "verbs", mode="before")
    @classmethod
    def _v_names(cls, value: Any, info: Any) -> list[str]:
        what = "resource" if info.field_name == "resources" else "verb"
        out = []
        for raw in _as_list(value):
            name = _as_str(raw).strip().lower()
            if name != WILDCARD and not re.fullmatch(r"[a-z][a-z0-9_.-]*", name):
                raise _Problem(f"invalid {what} {raw!r}: use a lower-case name or '*'")
            out.append(name)
        if not out:
            raise _Problem(f"list at least one {what} (or '*')")
        return _dedupe(out)

    def to_dict(self) -> dict[str, Any]:
        return {"resources": list(self.resources), "verbs": list(self.verbs)}


class RoleOptions(_Model):
    """Session options. Durations are seconds (documents write them as ``8h``, ``30m``...)."""

    max_session_ttl: float = DEFAULT_MAX_SESSION_TTL
    disconnect_expired_cert: bool = True
    client_idle_timeout: float = 0.0  # 0: no idle timeout
    max_connections: int = 0  # concurrent sessions per user; 0: the proxy's default

    @field_validator("max_session_ttl", "client_idle_timeout", mode="before")
    @classmethod
    def _v_duration(cls, value: Any, info: Any) -> float:
        if value is None:
            return cls.model_fields[info.field_name].default
        try:
            seconds = parse_duration(value)
        except ValueError as exc:
            raise _Problem(str(exc)) from None
        if info.field_name == "max_session_ttl" and seconds <= 0:
            raise _Problem("must be longer than 0s (the default is 12h)")
        return seconds

    @field_validator("disconnect_expired_cert", mode="before")
    @classmethod
    def _v_bool(cls, value: Any) -> Any:
        return True if value is None else value

    @field_validator("max_connections", mode="before")
    @classmethod
    def _v_count(cls, value: Any) -> Any:
        if value is None:
            return 0
        if isinstance(value, str) and value.strip().isdigit():  # role YAML keeps scalars as strings
            return int(value)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise _Problem(f"expected a whole number of sessions (0: the proxy's default), got {value!r}")
        return value

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "max_session_ttl": format_duration(self.max_session_ttl),
            "disconnect_expired_cert": self.disconnect_expired_cert,
            "client_idle_timeout": format_duration(self.client_idle_timeout),
        }
        if self.max_connections:
            out["max_connections"] = self.max_connections
        return out


class RoleConditions(_Model):
    """One ``allow`` or ``deny`` block. Values are stored normalized (see the module doc)."""

    db_labels: dict[str, list[str]] = {}
    db_users: list[str] = []
    db_names: list[str] = []
    db_commands: list[str] = []
    rules: list[Rule] = []

    @field_validator("db_labels", mode="before")
    @classmethod
    def _v_labels(cls, value: Any) -> dict[str, list[str]]:
        if value is None:
            return {}
        if not isinstance(value, Mapping):
            raise _Problem(f"expected a mapping of label key to value(s), got {_type_name(value)}")
        out: dict[str, list[str]] = {}
        for raw_key, raw_values in value.items():
            key = _as_str(raw_key)
            if not key.strip():
                raise _Problem("label keys must not be empty")
            if key in out:
                raise _Problem(f"label key {key!r} appears twice", key)
            if raw_values is None:
                raise _Problem("missing value (write '*' to match any value)", key)
            values = raw_values if isinstance(raw_values, (list, tuple)) else [raw_values]
            if not values:
                raise _Problem("list at least one value (or '*')", key)
            checked = []
            for raw in values:
                text = _as_str(raw, key)
                try:
                    checked.append(validate_label_value(text))
                except ValueError as exc:
                    raise _Problem(str(exc), key) from None
            checked = _dedupe(checked)
            if key == WILDCARD and checked != [WILDCARD]:
                raise _Problem(
                    "the '*' key only takes the value '*' (it matches every database)", key
                )
            out[key] = checked
        return out

    @field_validator("db_users", mode="before")
    @classmethod
    def _v_users(cls, value: Any) -> list[str]:
        out = []
        for raw in _as_list(value):
            text = _as_str(raw)
            try:
                template = _normalize_template(text)
            except ValueError as exc:
                raise _Problem(str(exc)) from None
            if template is not None:
                out.append(template)
                continue
            if not text or any(ch.isspace() or not ch.isprintable() for ch in text):
                raise _Problem(
                    f"invalid db user {text!r}: use a user name, '*' or {{{{internal.db_users}}}}"
                )
            out.append(text)
        return _dedupe(out)

    @field_validator("db_names", mode="before")
    @classmethod
    def _v_names(cls, value: Any) -> list[str]:
        out = []
        for raw in _as_list(value):
            text = _as_str(raw).strip()
            try:
                template = _normalize_template(text)
            except ValueError as exc:
                raise _Problem(str(exc)) from None
            if template is not None:
                out.append(template)
            elif text == WILDCARD:
                out.append(text)
            elif text.isdigit():
                out.append(_norm_db_name(text))
            else:
                raise _Problem(
                    f"invalid db name {text!r}: logical databases are numbers (0, 1, ...), "
                    "'*' or {{internal.db_names}}"
                )
        return _dedupe(out)

    @field_validator("db_commands", mode="before")
    @classmethod
    def _v_commands(cls, value: Any) -> list[str]:
        out = []
        for raw in _as_list(value):
            text = _as_str(raw)
            if "{{" in text or "}}" in text:
                raise _Problem(f"traits are not expanded in db_commands ({text!r})")
            try:
                out.append(_normalize_command_entry(text))
            except ValueError as exc:
                raise _Problem(str(exc)) from None
        return _dedupe(out)

    @field_validator("rules", mode="before")
    @classmethod
    def _v_rules(cls, value: Any) -> Any:
        return [] if value is None else value

    @property
    def is_empty(self) -> bool:
        return not (
            self.db_labels or self.db_users or self.db_names or self.db_commands or self.rules
        )

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.db_labels:
            out["db_labels"] = {k: list(v) for k, v in self.db_labels.items()}
        for field in ("db_users", "db_names", "db_commands"):
            if getattr(self, field):
                out[field] = list(getattr(self, field))
        if self.rules:
            out["rules"] = [r.to_dict() for r in self.rules]
        return out


def _check_role_name(value: Any) -> str:
    name = _as_str(value)
    if not ROLE_NAME_RE.match(name):
        raise _Problem(
            f"invalid role name {name!r}: use 1 to 63 lower-case letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return name


def _check_description(value: Any) -> str:
    return "" if value is None else _as_str(value)


def _none_to_empty(value: Any) -> Any:
    return {} if value is None else value


class Role(_Model):
    """A role. Build one from a document with :func:`load_role_yaml` or :meth:`from_dict`."""

    name: str
    description: str = ""
    options: RoleOptions = RoleOptions()
    allow: RoleConditions = RoleConditions()
    deny: RoleConditions = RoleConditions()

    @field_validator("name", mode="before")
    @classmethod
    def _v_name(cls, value: Any) -> str:
        return _check_role_name(value)

    @field_validator("description", mode="before")
    @classmethod
    def _v_description(cls, value: Any) -> str:
        return _check_description(value)

    @field_validator("options", "allow", "deny", mode="before")
    @classmethod
    def _v_blocks(cls, value: Any) -> Any:
        return _none_to_empty(value)

    @classmethod
    def from_dict(cls, data: Any) -> Role:
        """Validate a role document (``kind``/``version``/``metadata``/``spec``); RoleError."""
        return _role_from_document(data)

    def to_dict(self) -> dict[str, Any]:
        """The role as a document; ``Role.from_dict(role.to_dict()) == role``."""
        metadata: dict[str, Any] = {"name": self.name}
        if self.description:
            metadata["description"] = self.description
        return {
            "kind": KIND,
            "version": VERSION,
            "metadata": metadata,
            "spec": {
                "options": self.options.to_dict(),
                "allow": self.allow.to_dict(),
                "deny": self.deny.to_dict(),
            },
        }

    def to_yaml(self) -> str:
        """The role as a YAML document; ``load_role_yaml(role.to_yaml()) == role``."""
        return yaml.dump(
            self.to_dict(),
            Dumper=_RoleDumper,
            sort_keys=False,
            default_flow_style=False,
            allow_unicode=True,
        )


class _RoleDumper(yaml.SafeDumper):
    """Lists of plain strings in flow style (``env: [prod, staging]``), as admins write them."""

    def represent_list(self, data: Any) -> yaml.SequenceNode:
        flow = bool(data) and all(isinstance(item, str) for item in data)
        return self.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flow)


_RoleDumper.add_representer(list, _RoleDumper.represent_list)


class _Metadata(_Model):
    name: str
    description: str = ""

    @field_validator("name", mode="before")
    @classmethod
    def _v_name(cls, value: Any) -> str:
        return _check_role_name(value)

    @field_validator("description", mode="before")
    @classmethod
    def _v_description(cls, value: Any) -> str:
        return _check_description(value)


class _Spec(_Model):
    options: RoleOptions = RoleOptions()
    allow: RoleConditions = RoleConditions()
    deny: RoleConditions = RoleConditions()

    @field_validator("options", "allow", "deny", mode="before")
    @classmethod
    def _v_blocks(cls, value: Any) -> Any:
        return _none_to_empty(value)


class _Document(_Model):
    kind: str
    version: str
    metadata: _Metadata
    spec: _Spec = _Spec()

    @field_validator("kind", mode="before")
    @classmethod
    def _v_kind(cls, value: Any) -> str:
        if value != KIND:
            raise _Problem(f"expected {KIND!r}, got {value!r} (this document is not a role)")
        return value

    @field_validator("version", mode="before")
    @classmethod
    def _v_version(cls, value: Any) -> str:
        if value != VERSION:
            raise _Problem(f"unsupported version {value!r} (use {VERSION})")
        return value

    @field_validator("spec", mode="before")
    @classmethod
    def _v_spec(cls, value: Any) -> Any:
        return _none_to_empty(value)


# --------------------------------------------------------------------------------------------
# Documents and errors

_MISSING_HINTS = {
    ("kind",): "add 'kind: role'",
    ("version",): "add 'version: v1'",
    ("metadata",): "add 'metadata: {name: ...}'",
}


def _model_at(loc: Sequence[str | int]) -> type[BaseModel] | None:
    cls: type[BaseModel] | None = _Document
    for part in loc:
        if isinstance(part, int):
            continue
        if cls is None or part not in cls.model_fields:
            return None
        cls = _inner_model(cls.model_fields[part].annotation)
    return cls


def _inner_model(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in get_args(annotation):
        found = _inner_model(arg)
        if found is not None:
            return found
    return None


def _path(loc: Sequence[str | int]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out


def _describe_error(err: Mapping[str, Any]) -> tuple[str, str]:
    """(path, message) for one pydantic error of a :class:`_Document` validation."""
    loc = [p for p in err["loc"] if p != "[key]"]
    kind = err["type"]
    problem = (err.get("ctx") or {}).get("error")
    if isinstance(problem, _Problem):
        return _path([*loc, *problem.subpath]), problem.message
    if kind == "extra_forbidden":
        parent, key = loc[:-1], loc[-1]
        model = _model_at(parent)
        expected = f" (expected one of: {', '.join(model.model_fields)})" if model else ""
        return _path(parent), f"unknown key {key!r}{expected}"
    if kind == "missing":
        parent, key = loc[:-1], loc[-1]
        hint = _MISSING_HINTS.get(tuple(loc), "")
        return _path(parent), f"missing required key {key!r}" + (f": {hint}" if hint else "")
    if kind in ("string_type", "str_type"):
        return _path(loc), f"expected a string, got {_type_name(err.get('input'))}"
    if kind in ("list_type", "tuple_type"):
        return _path(loc), f"expected a list, got {_type_name(err.get('input'))}"
    if kind in ("dict_type", "model_type", "model_attributes_type", "mapping_type"):
        return _path(loc), f"expected a mapping, got {_type_name(err.get('input'))}"
    if kind in ("bool_parsing", "bool_type"):
        return _path(loc), f"expected true or false, got {err.get('input')!r}"
    message = str(err.get("msg", "invalid value"))
    message = message.removeprefix("Value error, ")
    return _path(loc), message


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _role_from_document(data: Any, where: str = "") -> Role:
    name = None
    if isinstance(data, Mapping) and isinstance(data.get("metadata"), Mapping):
        raw_name = data["metadata"].get("name")
        if isinstance(raw_name, str) and raw_name:
            name = raw_name
    prefix = (f'role "{name}"' if name else "role document") + where
    if not isinstance(data, Mapping):
        raise RoleError(
            f"{prefix}: expected a mapping with kind, version, metadata and spec, "
            f"got {_type_name(data)}"
        )
    try:
        doc = _Document.model_validate(data)
    except ValidationError as exc:
        errors = exc.errors()
        path, message = _describe_error(errors[0])
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        raise RoleError(
            _one_line(f"{prefix}: {path + ': ' if path else ''}{message}{more}")
        ) from None
    return Role(
        name=doc.metadata.name,
        description=doc.metadata.description,
        options=doc.spec.options,
        allow=doc.spec.allow,
        deny=doc.spec.deny,
    )


class _DuplicateKeyError(yaml.MarkedYAMLError):
    pass


class _RoleLoader(yaml.SafeLoader):
    """Safe loader that keeps every scalar but null a string (``env: on``, ``db_names: [0]``,
    ``version: 1.10`` stay as written) and refuses duplicate keys (a second ``allow:`` would
    otherwise silently replace the first)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[str] = set()
        for key_node, _ in node.value:
            if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
                if key_node.value in seen:
                    raise _DuplicateKeyError(
                        None, None, f"duplicate key {key_node.value!r}", key_node.start_mark
                    )
                seen.add(key_node.value)
        return super().construct_mapping(node, deep=deep)


_STRING_ONLY_DROPPED = {
    "tag:yaml.org,2002:bool",
    "tag:yaml.org,2002:int",
    "tag:yaml.org,2002:float",
    "tag:yaml.org,2002:timestamp",
}
_RoleLoader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag not in _STRING_ONLY_DROPPED]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


def _parse_yaml_documents(text: str | bytes) -> list[Any]:
    if isinstance(text, bytes):
        text = text.decode("utf-8", errors="replace")
    if len(text) > MAX_DOCUMENT_BYTES:
        raise RoleError(
            f"role document: too large ({len(text)} bytes, at most {MAX_DOCUMENT_BYTES})"
        )
    try:
        return [d for d in yaml.load_all(text, Loader=_RoleLoader) if d is not None]
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise RoleError(
            _one_line(f"role document: invalid YAML{where}: {exc.problem or exc}")
        ) from None
    except yaml.YAMLError as exc:
        raise RoleError(_one_line(f"role document: invalid YAML: {exc}")) from None


def load_role_yaml(text: str | bytes) -> Role:
    """Parse exactly one role document. Raises :class:`RoleError`."""
    docs = _parse_yaml_documents(text)
    if not docs:
        raise RoleError(
            "role document: empty (expected kind: role, version: v1, metadata and spec)"
        )
    if len(docs) > 1:
        raise RoleError(
            f"role document: expected one document, found {len(docs)} "
            "(put each role in its own file, or load them all)"
        )
    return _role_from_document(docs[0])


def load_roles_yaml(text: str | bytes) -> list[Role]:
    """Parse any number of ``---``-separated role documents (empty ones are skipped)."""
    docs = _parse_yaml_documents(text)
    roles: list[Role] = []
    first_seen: dict[str, int] = {}
    for index, doc in enumerate(docs, start=1):
        where = f" (document {index})" if len(docs) > 1 else ""
        role = _role_from_document(doc, where)
        if role.name in first_seen:
            raise RoleError(
                f'role "{role.name}"{where}: duplicate name '
                f"(also in document {first_seen[role.name]})"
            )
        first_seen[role.name] = index
        roles.append(role)
    return roles


# --------------------------------------------------------------------------------------------
# Built-in roles

_BUILTIN_LIST = (
    Role(
        name="access",
        description="connect to every database as the db users and db names in your traits",
        allow=RoleConditions(
            db_labels={WILDCARD: [WILDCARD]},
            db_users=["{{internal.db_users}}"],
            db_names=["{{internal.db_names}}"],
            db_commands=[WILDCARD],
        ),
    ),
    Role(
        name="editor",
        description="manage every resource of the admin API; no database access",
        allow=RoleConditions(rules=[Rule(resources=[WILDCARD], verbs=[WILDCARD])]),
    ),
    Role(
        name="auditor",
        description="read the audit log and sessions",
        allow=RoleConditions(rules=[Rule(resources=["event", "session"], verbs=["list", "read"])]),
    ),
)

BUILTIN_ROLES: Mapping[str, Role] = MappingProxyType({r.name: r for r in _BUILTIN_LIST})


def is_builtin(name: str) -> bool:
    """Built-in roles cannot be created, overwritten or deleted."""
    return name in BUILTIN_ROLES


# --------------------------------------------------------------------------------------------
# Evaluation


@dataclass(frozen=True)
class Decision:
    """The outcome of a check. ``reason`` is one human line (for allowed: which role)."""

    allowed: bool
    reason: str = ""

    def __bool__(self) -> bool:
        return self.allowed


@dataclass(frozen=True, slots=True)
class _CommandSet:
    every: str | None  # "*" or "@all" when present
    names: frozenset[str]
    categories: frozenset[str]

    @classmethod
    def build(cls, entries: Iterable[str]) -> _CommandSet:
        every, names, categories = None, set(), set()
        for e in entries:
            if e in (WILDCARD, "@all"):
                every = every or e
            elif e.startswith("@"):
                categories.add(e)
            else:
                names.add(e)
        return cls(every, frozenset(names), frozenset(categories))

    def __bool__(self) -> bool:
        return bool(self.every or self.names or self.categories)

    def match(self, full: str, parent: str, categories: frozenset[str],
              wildcard: bool = True) -> str | None:
        """The entry that covers the command, or None; ``wildcard`` False: an entry other
        than ``'*'``/``@all``."""
        if self.every and wildcard:
            return self.every
        if full in self.names:
            return full
        if parent in self.names:
            return parent
        hit = self.categories & categories
        return min(hit) if hit else None


@dataclass(frozen=True, slots=True)
class _Entries:
    """Expanded db users or db names: exact values plus whether '*' is among them."""

    values: frozenset[str]
    every: bool

    def match(self, value: str) -> bool:
        return self.every or value in self.values


@dataclass(frozen=True, slots=True)
class _Block:
    has_labels: bool
    selector: _Selector
    users: _Entries
    names: _Entries
    commands: _CommandSet
    rules: tuple[tuple[frozenset[str], frozenset[str]], ...]
    expanded_users: tuple[str, ...]
    expanded_names: tuple[str, ...]

    def selects(self, labels: Mapping[str, str], *, deny: bool) -> bool:
        if not self.has_labels:
            return deny
        return _selector_matches(self.selector, labels)

    def rule_matches(self, resource: str, verb: str) -> bool:
        return any(
            (WILDCARD in res or resource in res) and (WILDCARD in verbs or verb in verbs)
            for res, verbs in self.rules
        )


@dataclass(frozen=True, slots=True)
class _CompiledRole:
    name: str
    allow: _Block
    deny: _Block
    deny_whole_database: bool  # deny has db_labels and no users, names or commands


def _expand(
    entries: Iterable[str], traits: Mapping[str, Sequence[str]], *, db_names: bool
) -> tuple[str, ...]:
    out: list[str] = []
    for entry in entries:
        trait = _trait_name(entry)
        values = list(traits.get(trait, ())) if trait is not None else [entry]
        for v in values:
            if not isinstance(v, str):
                v = str(v)
            v = v.strip()
            if v:
                out.append(_norm_db_name(v) if db_names else v)
    return tuple(dict.fromkeys(out))


def _compile_block(c: RoleConditions, traits: Mapping[str, Sequence[str]]) -> _Block:
    users = _expand(c.db_users, traits, db_names=False)
    names = _expand(c.db_names, traits, db_names=True)
    return _Block(
        has_labels=bool(c.db_labels),
        selector=_compile_selector(c.db_labels),
        users=_Entries(frozenset(users), WILDCARD in users),
        names=_Entries(frozenset(names), WILDCARD in names),
        commands=_CommandSet.build(c.db_commands),
        rules=tuple((frozenset(r.resources), frozenset(r.verbs)) for r in c.rules),
        expanded_users=users,
        expanded_names=names,
    )


def _sorted_entries(values: Iterable[str], *, numeric: bool) -> list[str]:
    def key(v: str) -> tuple[int, int, str]:
        if v == WILDCARD:
            return (0, 0, v)
        if numeric and v.isdigit():
            return (1, int(v), v)
        return (2, 0, v)

    return sorted(set(values), key=key)


class RoleSet:
    """A user's roles with their traits expanded, ready to answer access questions."""

    def __init__(
        self, roles: Iterable[Role], traits: Mapping[str, Sequence[str]] | None = None
    ) -> None:
        self.roles: tuple[Role, ...] = tuple(roles)
        self.traits: dict[str, list[str]] = {
            k: [v] if isinstance(v, str) else list(v) for k, v in (traits or {}).items()
        }
        self._compiled = tuple(
            _CompiledRole(
                name=r.name,
                allow=_compile_block(r.allow, self.traits),
                deny=_compile_block(r.deny, self.traits),
                deny_whole_database=bool(r.deny.db_labels)
                and not (r.deny.db_users or r.deny.db_names or r.deny.db_commands),
            )
            for r in self.roles
        )

    @property
    def role_names(self) -> list[str]:
        return [r.name for r in self.roles]

    # -- databases -----------------------------------------------------------------------------

    def _database_denial(
        self, db_name: str, labels: Mapping[str, str], db_user: str | None, logical_db: str | None
    ) -> Decision | None:
        for r in self._compiled:
            if not r.deny.selects(labels, deny=True):
                continue
            if r.deny_whole_database:
                return Decision(False, f'access to database "{db_name}" denied by role "{r.name}"')
            if db_user is not None and r.deny.users.match(db_user):
                return Decision(
                    False, f'access to db user "{db_user}" on "{db_name}" denied by role "{r.name}"'
                )
            if logical_db is not None and r.deny.names.match(logical_db):
                return Decision(
                    False,
                    f'access to logical database {logical_db} on "{db_name}" '
                    f'denied by role "{r.name}"',
                )
        return None

    def _granting(
        self, labels: Mapping[str, str], db_user: str | None, logical_db: str | None
    ) -> list[_CompiledRole]:
        return [
            r
            for r in self._compiled
            if r.allow.selects(labels, deny=False)
            and (db_user is None or r.allow.users.match(db_user))
            and (logical_db is None or r.allow.names.match(logical_db))
        ]

    def check_database(
        self,
        db_name: str,
        db_labels: Mapping[str, str] | None,
        db_user: str | None = None,
        logical_db: str | int | None = None,
    ) -> Decision:
        """May the user reach ``db_name`` (as ``db_user``, in ``logical_db``)?

        ``db_user`` / ``logical_db`` None means that part is not being checked.
        """
        labels = db_labels or {}
        ldb = None if logical_db is None else _norm_db_name(logical_db)
        denial = self._database_denial(db_name, labels, db_user, ldb)
        if denial is not None:
            return denial
        granting = self._granting(labels, db_user, ldb)
        if granting:
            return Decision(True, f'allowed by role "{granting[0].name}"')
        if not self._granting(labels, None, None):
            return Decision(False, f'access to database "{db_name}" denied by your roles')
        if db_user is not None and not self._granting(labels, db_user, None):
            return Decision(
                False, f'access to db user "{db_user}" on "{db_name}" denied by your roles'
            )
        as_user = f' as db user "{db_user}"' if db_user is not None else ""
        return Decision(
            False, f'access to logical database {ldb}{as_user} on "{db_name}" denied by your roles'
        )

    def can_see_database(self, db_name: str, db_labels: Mapping[str, str] | None) -> bool:
        """Some allow block selects the database and no label-only deny hides it."""
        return self.check_database(db_name, db_labels).allowed

    def _entries_for(
        self, db_name: str, db_labels: Mapping[str, str] | None, *, names: bool
    ) -> tuple[list[str], list[str]]:
        labels = db_labels or {}
        if any(r.deny_whole_database and r.deny.selects(labels, deny=True) for r in self._compiled):
            return [], [WILDCARD]
        allowed: set[str] = set()
        denied: set[str] = set()
        for r in self._compiled:
            if r.allow.selects(labels, deny=False):
                allowed.update(r.allow.expanded_names if names else r.allow.expanded_users)
            if r.deny.selects(labels, deny=True):
                denied.update(r.deny.expanded_names if names else r.deny.expanded_users)
        if WILDCARD in denied:
            return [], [WILDCARD]
        if WILDCARD in allowed:
            return [WILDCARD], _sorted_entries(denied, numeric=names)
        return (
            _sorted_entries(allowed - denied, numeric=names),
            _sorted_entries(denied, numeric=names),
        )

    def allowed_db_users(
        self, db_name: str, db_labels: Mapping[str, str] | None
    ) -> tuple[list[str], list[str]]:
        """(allowed, denied) db users on a database, sorted, '*' first.

        ``(["*"], ["root"])`` reads "[*], except: [root]". When every user is denied (a deny of
        '*' or a label-only deny) the answer is ``([], ["*"])``.
        """
        return self._entries_for(db_name, db_labels, names=False)

    def allowed_db_names(
        self, db_name: str, db_labels: Mapping[str, str] | None
    ) -> tuple[list[str], list[str]]:
        """(allowed, denied) logical databases on a database, like :meth:`allowed_db_users`."""
        return self._entries_for(db_name, db_labels, names=True)

    # -- commands ------------------------------------------------------------------------------

    def for_database(
        self,
        db_name: str,
        db_labels: Mapping[str, str] | None,
        db_user: str | None = None,
        logical_db: str | int | None = None,
    ) -> DatabaseAccess:
        """The access of one session (db user, logical database) to one database; its
        :meth:`DatabaseAccess.check_command` is what the proxy calls for every command."""
        return DatabaseAccess(self, db_name, db_labels or {}, db_user, logical_db)

    def check_command(
        self,
        command: str,
        categories: Iterable[str] = (),
        *,
        db_name: str | None = None,
        db_labels: Mapping[str, str] | None = None,
        db_user: str | None = None,
        logical_db: str | int | None = None,
    ) -> Decision:
        """May the user run ``command`` (``GET``, ``CLIENT|KILL`` or ``CLIENT KILL``) whose ACL
        categories are ``categories`` (``{"@read", "@fast"}``)?

        Pass the database (``db_labels``, and ``db_user``/``logical_db`` of the session) so that
        only roles granting that access count; the proxy should prefer :meth:`for_database`.
        Without ``db_labels`` every role granting some database counts on the allow side and
        every deny block counts on the deny side.
        """
        if db_labels is None:
            return DatabaseAccess(self, db_name or "", None, db_user, logical_db).check_command(
                command, categories
            )
        return self.for_database(db_name or "", db_labels, db_user, logical_db).check_command(
            command, categories
        )

    # -- admin API -----------------------------------------------------------------------------

    def check_admin(self, resource: str, verb: str) -> Decision:
        """May the user ``verb`` (list, read, create, update, delete...) ``resource``?"""
        res, vb = resource.strip().lower(), verb.strip().lower()
        for r in self._compiled:
            if r.deny.rule_matches(res, vb):
                return Decision(False, f'permission to {vb} {res} denied by role "{r.name}"')
        for r in self._compiled:
            if r.allow.rule_matches(res, vb):
                return Decision(True, f'allowed by role "{r.name}"')
        return Decision(False, f"permission to {vb} {res} denied by your roles")

    # -- options -------------------------------------------------------------------------------

    @property
    def max_session_ttl(self) -> float:
        """Seconds: the shortest over the roles (12h with no roles)."""
        return min((r.options.max_session_ttl for r in self.roles), default=DEFAULT_MAX_SESSION_TTL)

    @property
    def disconnect_expired_cert(self) -> bool:
        """On when any role has it on (the default): a session ends with its certificate."""
        return any(r.options.disconnect_expired_cert for r in self.roles)

    @property
    def max_connections(self) -> int | None:
        """Concurrent sessions per user: the smallest non-zero over the roles, None when no
        role sets one (the proxy's ``limits.sessions_per_user`` applies)."""
        return min((n for r in self.roles if (n := r.options.max_connections) > 0), default=None)

    @property
    def client_idle_timeout(self) -> float | None:
        """Seconds: the shortest non-zero over the roles, None when no role sets one."""
        return min(
            (t for r in self.roles if (t := r.options.client_idle_timeout) > 0), default=None
        )


class DatabaseAccess:
    """One session's access to one database, with commands checked against it (cached)."""

    _CACHE_SIZE = 2048

    def __init__(
        self,
        roleset: RoleSet,
        db_name: str,
        db_labels: Mapping[str, str] | None,
        db_user: str | None,
        logical_db: str | int | None,
    ) -> None:
        self.db_name = db_name
        self.db_user = db_user
        self.logical_db = None if logical_db is None else _norm_db_name(logical_db)
        compiled = roleset._compiled
        if db_labels is None:
            # No database context: any role granting some database, every deny block.
            self.decision = Decision(True, "")
            self._allow = [
                r.allow.commands for r in compiled if r.allow.has_labels and r.allow.commands
            ]
            self._deny = [(r.name, r.deny.commands) for r in compiled if r.deny.commands]
        else:
            self.decision = roleset.check_database(db_name, db_labels, db_user, self.logical_db)
            granting = (
                roleset._granting(db_labels, db_user, self.logical_db) if self.decision else []
            )
            self._allow = [r.allow.commands for r in granting if r.allow.commands]
            self._deny = [
                (r.name, r.deny.commands)
                for r in compiled
                if r.deny.commands and r.deny.selects(db_labels, deny=True)
            ]
        labels = db_labels or {}
        self._every_db = bool(self.decision) and not any(
            r.deny.selects(labels, deny=True) and (r.deny.names.every or r.deny.names.values)
            for r in compiled
        ) and any(
            r.allow.selects(labels, deny=False) and r.allow.names.every
            and (db_user is None or r.allow.users.match(db_user))
            for r in compiled
        )
        self._cache: dict[tuple[str, Any], Decision] = {}

    def check_command(self, command: str, categories: Iterable[str] = ()) -> Decision:
        """``command`` like ``GET``, ``CLIENT|KILL`` or ``client kill``; ``categories`` its ACL
        categories (``@read`` or ``read``). Pass categories as a tuple or frozenset to hit the
        cache without normalizing again."""
        if not self.decision:
            return self.decision
        hashable = isinstance(categories, (tuple, frozenset))
        if hashable:
            cached = self._cache.get((command, categories))
            if cached is not None:
                return cached
        split = _split_command(command)
        if split is None:
            return Decision(False, "empty command")
        full, parent = split
        cats = frozenset(_norm_category(c) for c in categories)
        decision = self._decide(full, parent, cats)
        if len(self._cache) >= self._CACHE_SIZE:
            self._cache.clear()
        if hashable:
            self._cache[(command, categories)] = decision
        return decision

    def _decide(self, full: str, parent: str, cats: frozenset[str]) -> Decision:
        for role_name, commands in self._deny:
            entry = commands.match(full, parent, cats)
            if entry is not None:
                return Decision(
                    False, f'command {full} denied by role "{role_name}" (deny {entry})'
                )
        admin = full in SERVER_ADMIN_COMMANDS or parent in SERVER_ADMIN_COMMANDS
        for commands in self._allow:
            if commands.match(full, parent, cats, wildcard=not admin) is not None:
                return Decision(True, "")
        where = f' on "{self.db_name}"' if self.db_name else ""
        if admin and any(commands.every for commands in self._allow):
            return Decision(
                False,
                f"command {full} is server administration, which '*' does not cover{where}: "
                "ask an administrator for a role that names it (see docs/rbac.md)",
            )
        return Decision(False, f"command {full} denied by your roles{where}")

    def explicitly_allows(self, command: str, categories: Iterable[str] = ()) -> bool:
        """Allowed, and by an entry other than ``'*'``/``@all`` (the command's name, its
        subcommand or one of its categories): what lets a session see other connections
        (CLIENT LIST) or run scripts despite a narrower command set."""
        if not self.check_command(command, categories):
            return False
        split = _split_command(command)
        if split is None:
            return False
        full, parent = split
        cats = frozenset(_norm_category(c) for c in categories)
        return any(c.match(full, parent, cats, wildcard=False) is not None for c in self._allow)

    def denies_any(self, commands: Iterable[tuple[str, frozenset[str]]]) -> bool:
        """Does a deny block of this access cover any of ``commands`` ((name, categories))?"""
        if not self.decision:
            return True
        for _, deny in self._deny:
            if deny.every:
                return True
            for name, cats in commands:
                full, parent = _split_command(name) or (name, name)
                if deny.match(full, parent, cats) is not None:
                    return True
        return False

    @property
    def every_logical_db(self) -> bool:
        """Every logical database is allowed (no ``db_names`` limit, no db_names deny)."""
        return self._every_db
