"""Unit tests for services.common.rbac: role documents, built-in roles, the evaluator."""

from __future__ import annotations

import json
import textwrap

import pydantic
import pytest

from services.common import rbac
from services.common.rbac import (
    BUILTIN_ROLES,
    DEFAULT_MAX_SESSION_TTL,
    Decision,
    Role,
    RoleConditions,
    RoleError,
    RoleOptions,
    RoleSet,
    Rule,
    format_duration,
    is_builtin,
    label_value_matcher,
    load_role_yaml,
    load_roles_yaml,
    match_labels,
    parse_duration,
    validate_label_value,
)

EXAMPLE = textwrap.dedent(
    """\
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
        db_labels:
          env: [prod, staging]
          region: '^east.*$'
          'team': 'cache-*'
        db_users: ['{{internal.db_users}}', default]
        db_names: ['{{internal.db_names}}', '0']
        db_commands: ['@read', '@connection', 'SET']
        rules:
          - resources: [user, role]
            verbs: [list, read]
      deny:
        db_labels: {env: prod}
        db_users: [admin]
        db_commands: ['@dangerous', FLUSHALL]
    """
)

MINIMAL = "kind: role\nversion: v1\nmetadata:\n  name: minimal\n"


def role(
    name: str = "r", *, allow: dict | None = None, deny: dict | None = None, **options
) -> Role:
    return Role(name=name, allow=allow or {}, deny=deny or {}, options=options)


PROD = {"env": "prod", "region": "eastus"}
DEV = {"env": "dev", "region": "westus"}


# --------------------------------------------------------------------------------------------
# Durations


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("30s", 30),
        ("15m", 900),
        ("8h", 28800),
        ("1h30m", 5400),
        ("2d", 172800),
        ("500ms", 0.5),
        ("1.5h", 5400),
        ("1d2h3m4s", 93784),
        (" 1h 30m ", 5400),
        ("8H", 28800),
        ("3600", 3600),
        ("0", 0),
        (90, 90),
        (2.5, 2.5),
    ],
)
def test_parse_duration(text, seconds):
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize(
    "text", ["", "8 hours", "-1h", "h", "1x", "1h-30m", "1.2.3s", True, None, float("inf"), -5]
)
def test_parse_duration_rejects(text):
    with pytest.raises(ValueError):
        parse_duration(text)


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0, "0s"),
        (30, "30s"),
        (900, "15m"),
        (5400, "1h30m"),
        (43200, "12h"),
        (172800, "2d"),
        (93784.5, "1d2h3m4s500ms"),
    ],
)
def test_format_duration(seconds, text):
    assert format_duration(seconds) == text
    assert parse_duration(text) == pytest.approx(seconds)


def test_format_duration_rejects_negative():
    with pytest.raises(ValueError):
        format_duration(-1)


# --------------------------------------------------------------------------------------------
# Loading documents


def test_load_example_document():
    r = load_role_yaml(EXAMPLE)
    assert r.name == "redis-readonly"
    assert r.description == "read-only access to prod caches"
    assert r.options == RoleOptions(
        max_session_ttl=28800, disconnect_expired_cert=True, client_idle_timeout=1800
    )
    assert r.allow.db_labels == {
        "env": ["prod", "staging"],
        "region": ["^east.*$"],
        "team": ["cache-*"],
    }
    assert r.allow.db_users == ["{{internal.db_users}}", "default"]
    assert r.allow.db_names == ["{{internal.db_names}}", "0"]
    assert r.allow.db_commands == ["@read", "@connection", "SET"]
    assert r.allow.rules == [Rule(resources=["user", "role"], verbs=["list", "read"])]
    assert r.deny.db_labels == {"env": ["prod"]}
    assert r.deny.db_users == ["admin"]
    assert r.deny.db_commands == ["@dangerous", "FLUSHALL"]


def test_minimal_document_has_defaults():
    r = load_role_yaml(MINIMAL)
    assert r.description == ""
    assert r.options.max_session_ttl == DEFAULT_MAX_SESSION_TTL == 12 * 3600
    assert r.options.disconnect_expired_cert is True  # a session ends with its certificate
    assert r.options.client_idle_timeout == 0
    assert r.options.max_connections == 0
    assert r.allow == RoleConditions() and r.deny == RoleConditions()
    assert r.allow.is_empty


def test_null_blocks_and_fields_mean_empty_or_default():
    r = load_role_yaml(
        MINIMAL
        + "  description:\nspec:\n  options:\n    max_session_ttl:\n"
        + "  allow:\n    db_users:\n    rules:\n  deny:\n"
    )
    assert r.options.max_session_ttl == DEFAULT_MAX_SESSION_TTL
    assert r.allow.db_users == [] and r.allow.rules == [] and r.deny == RoleConditions()
    assert load_role_yaml(MINIMAL + "spec:\n").allow == RoleConditions()


def test_scalars_stay_strings_as_written():
    r = load_role_yaml(
        MINIMAL
        + "spec:\n  allow:\n    db_labels: {enabled: on, version: 1.10, since: 2024-01-01, n: 7}\n"
        + "    db_names: [0, 015]\n    db_users: [yes]\n"
    )
    assert r.allow.db_labels == {
        "enabled": ["on"],
        "version": ["1.10"],
        "since": ["2024-01-01"],
        "n": ["7"],
    }
    assert r.allow.db_names == ["0", "15"]
    assert r.allow.db_users == ["yes"]


@pytest.mark.parametrize(
    ("text", "expected"), [("true", True), ("yes", True), ("false", False), ("off", False)]
)
def test_boolean_option_spellings(text, expected):
    r = load_role_yaml(MINIMAL + f"spec:\n  options:\n    disconnect_expired_cert: {text}\n")
    assert r.options.disconnect_expired_cert is expected


def test_single_strings_become_lists():
    r = load_role_yaml(
        MINIMAL
        + "spec:\n  allow:\n    db_labels: {env: prod}\n    db_users: default\n    db_names: '3'\n"
        + "    db_commands: GET\n    rules: [{resources: user, verbs: list}]\n"
    )
    assert r.allow.db_labels == {"env": ["prod"]}
    assert r.allow.db_users == ["default"]
    assert r.allow.db_names == ["3"]
    assert r.allow.db_commands == ["GET"]
    assert r.allow.rules == [Rule(resources=["user"], verbs=["list"])]


@pytest.mark.parametrize(
    ("entry", "normalized"),
    [
        ("get", "GET"),
        ("client kill", "CLIENT|KILL"),
        ("Client|Kill", "CLIENT|KILL"),
        ("@READ", "@read"),
        ("*", "*"),
        ("@all", "@all"),
        ("json.get", "JSON.GET"),
    ],
)
def test_command_entries_are_normalized(entry, normalized):
    assert RoleConditions(db_commands=[entry]).db_commands == [normalized]


def test_entries_are_deduplicated_in_order():
    c = RoleConditions(
        db_commands=["get", "GET", "set"], db_users=["a", "b", "a"], db_names=["1", "01", "0"]
    )
    assert c.db_commands == ["GET", "SET"]
    assert c.db_users == ["a", "b"]
    assert c.db_names == ["1", "0"]


@pytest.mark.parametrize(
    ("template", "normalized"),
    [
        ("{{internal.db_users}}", "{{internal.db_users}}"),
        ("{{ internal.db_users }}", "{{internal.db_users}}"),
        ("{{internal.db_names}}", "{{internal.db_names}}"),
        ("{{ external.groups }}", "{{external.groups}}"),
    ],
)
def test_trait_templates_are_normalized(template, normalized):
    assert RoleConditions(db_users=[template]).db_users == [normalized]


def _mutate(old: str, new: str) -> str:
    assert old in EXAMPLE, old
    return EXAMPLE.replace(old, new)


@pytest.mark.parametrize(
    ("document", "message"),
    [
        (
            _mutate("'^east.*$'", "'^(east$'"),
            'role "redis-readonly": spec.allow.db_labels.region: '
            "invalid regex '^(east$': missing ), unterminated subpattern at position 1",
        ),
        (
            _mutate("'^east.*$'", "'^east'"),
            "spec.allow.db_labels.region: regex '^east' must end with '$'",
        ),
        (
            _mutate("db_users: [admin]", "db_user: [admin]"),
            "spec.deny: unknown key 'db_user' (expected one of: db_labels,",
        ),
        (
            _mutate("  options:", "  extras: 1\n  options:"),
            "spec: unknown key 'extras' (expected one of: options, allow, deny)",
        ),
        (
            _mutate("kind: role", "kind: role\ncolor: red"),
            "role \"redis-readonly\": unknown key 'color'",
        ),
        (
            _mutate("  description:", "  labels: {}\n  description:"),
            "metadata: unknown key 'labels'",
        ),
        (
            _mutate("    client_idle_timeout: 30m", "    idle: 30m"),
            "spec.options: unknown key 'idle'",
        ),
        (
            _mutate("        verbs: [list, read]", "        verbs: [list]\n        when: now"),
            "spec.allow.rules[0]: unknown key 'when'",
        ),
        (_mutate("version: v1", "version: v2"), "version: unsupported version 'v2' (use v1)"),
        (_mutate("kind: role", "kind: user"), "kind: expected 'role', got 'user'"),
        (_mutate("kind: role\n", ""), "missing required key 'kind': add 'kind: role'"),
        (_mutate("version: v1\n", ""), "missing required key 'version': add 'version: v1'"),
        (
            _mutate("name: redis-readonly", "name: Redis_RO"),
            "role \"Redis_RO\": metadata.name: invalid role name 'Redis_RO'",
        ),
        (_mutate("name: redis-readonly", "name: -x"), "metadata.name: invalid role name '-x'"),
        (_mutate("name: redis-readonly", "name: " + "a" * 64), "metadata.name: invalid role name"),
        (
            _mutate("  name: redis-readonly\n", ""),
            "role document: metadata: missing required key 'name'",
        ),
        (
            _mutate("max_session_ttl: 8h", "max_session_ttl: 8 hours"),
            "spec.options.max_session_ttl: invalid duration '8 hours': use a number and a unit",
        ),
        (
            _mutate("max_session_ttl: 8h", "max_session_ttl: 0s"),
            "spec.options.max_session_ttl: must be longer than 0s",
        ),
        (
            _mutate("client_idle_timeout: 30m", "client_idle_timeout: soon"),
            "spec.options.client_idle_timeout: invalid duration 'soon'",
        ),
        (
            _mutate("disconnect_expired_cert: true", "disconnect_expired_cert: maybe"),
            "spec.options.disconnect_expired_cert: expected true or false, got 'maybe'",
        ),
        (
            _mutate("'@read'", "'@reed'"),
            "spec.allow.db_commands: unknown command category '@reed' (known: @admin,",
        ),
        (
            _mutate("FLUSHALL]", "'-@all']"),
            "spec.deny.db_commands: invalid command '-@all': write a command (GET)",
        ),
        (
            _mutate("'SET'", "'CLIENT KILL NOW'"),
            "spec.allow.db_commands: invalid command 'CLIENT KILL NOW'",
        ),
        (
            _mutate("verbs: [list, read]", "verbs: []"),
            "spec.allow.rules[0].verbs: list at least one verb (or '*')",
        ),
        (
            _mutate("resources: [user, role]", "resources: [User Things]"),
            "spec.allow.rules[0].resources: invalid resource 'User Things'",
        ),
        (
            _mutate("      - resources: [user, role]\n        verbs", "      - verbs"),
            "spec.allow.rules[0]: missing required key 'resources'",
        ),
        (
            _mutate("env: [prod, staging]", "env: []"),
            "spec.allow.db_labels.env: list at least one value (or '*')",
        ),
        (
            _mutate("env: [prod, staging]", "env:"),
            "spec.allow.db_labels.env: missing value (write '*' to match any value)",
        ),
        (
            _mutate("env: [prod, staging]", "env: [prod, {a: 1}]"),
            "spec.allow.db_labels.env: expected a string, got a mapping",
        ),
        (
            _mutate("env: [prod, staging]", "'*': prod"),
            "spec.allow.db_labels.*: the '*' key only takes the value '*'",
        ),
        (
            _mutate("env: [prod, staging]", "env: '{{internal.db_users}}'"),
            "spec.allow.db_labels.env: traits are not expanded in db_labels",
        ),
        (
            _mutate("db_labels: {env: prod}", "db_labels: [env]"),
            "spec.deny.db_labels: expected a mapping of label key to value(s), got a list",
        ),
        (
            _mutate("'{{internal.db_names}}', '0'", "'{{internal.logins}}'"),
            "spec.allow.db_names: unknown trait '{{internal.logins}}'",
        ),
        (
            _mutate("'{{internal.db_users}}', default", "'x-{{internal.db_users}}'"),
            "spec.allow.db_users: malformed trait 'x-{{internal.db_users}}'",
        ),
        (
            _mutate("'{{internal.db_names}}', '0'", "main"),
            "spec.allow.db_names: invalid db name 'main': logical databases are numbers",
        ),
        (
            _mutate("db_users: [admin]", "db_users: ['bad user']"),
            "spec.deny.db_users: invalid db user 'bad user'",
        ),
        (
            _mutate("db_users: [admin]", "db_users: {a: b}"),
            "spec.deny.db_users: expected a list of strings, got a mapping",
        ),
        (
            MINIMAL + "spec:\n  allow: [1]\n",
            'role "minimal": spec.allow: expected a mapping, got a list',
        ),
        (MINIMAL + "spec: 3\n", 'role "minimal": spec: expected a mapping, got a string'),
        (
            _mutate("  deny:\n", "  allow:\n"),
            "role document: invalid YAML at line 22, column 3: duplicate key 'allow'",
        ),
        (
            "- kind: role\n",
            "role document: expected a mapping with kind, version, metadata and spec, got a list",
        ),
        ("kind: [role\n", "role document: invalid YAML at line 2, column 1:"),
        ("", "role document: empty"),
        (EXAMPLE + "---\n" + MINIMAL, "role document: expected one document, found 2"),
    ],
)
def test_document_errors(document, message):
    with pytest.raises(RoleError) as info:
        load_role_yaml(document)
    text = str(info.value)
    assert message in text
    assert "\n" not in text
    assert text.startswith(('role "', "role document"))
    assert isinstance(info.value, ValueError)


def test_error_names_the_role_and_counts_more_errors():
    doc = _mutate("version: v1", "version: v9").replace("8h", "8 hours")
    with pytest.raises(RoleError) as info:
        load_role_yaml(doc)
    text = str(info.value)
    assert text.startswith('role "redis-readonly": version:')
    assert text.endswith("(and 1 more)")


def test_oversized_document_is_refused():
    with pytest.raises(RoleError, match="too large"):
        load_role_yaml(MINIMAL + "#" * (rbac.MAX_DOCUMENT_BYTES + 1))


def test_load_roles_yaml_multi_document():
    text = "---\n" + EXAMPLE + "---\n" + MINIMAL + "---\n"
    roles = load_roles_yaml(text)
    assert [r.name for r in roles] == ["redis-readonly", "minimal"]
    assert load_roles_yaml("") == []
    assert load_roles_yaml(b"kind: role\nversion: v1\nmetadata: {name: b}\n")[0].name == "b"


def test_load_roles_yaml_names_the_failing_document():
    text = (
        MINIMAL
        + "---\n"
        + MINIMAL.replace("minimal", "second")
        + "spec:\n  allow:\n    db_names: [x]\n"
    )
    with pytest.raises(
        RoleError, match=r'^role "second" \(document 2\): spec\.allow\.db_names: invalid db name'
    ):
        load_roles_yaml(text)


def test_load_roles_yaml_refuses_duplicate_names():
    with pytest.raises(
        RoleError, match=r'^role "minimal" \(document 2\): duplicate name \(also in document 1\)$'
    ):
        load_roles_yaml(MINIMAL + "---\n" + MINIMAL)


def test_from_dict_accepts_python_values_and_reports_errors():
    r = Role.from_dict(
        {
            "kind": "role",
            "version": "v1",
            "metadata": {"name": "py"},
            "spec": {
                "allow": {"db_labels": {"shard": 3}, "db_names": [0, 1]},
                "options": {"max_session_ttl": 600},
            },
        }
    )
    assert r.allow.db_labels == {"shard": ["3"]} and r.allow.db_names == ["0", "1"]
    assert r.options.max_session_ttl == 600
    with pytest.raises(
        RoleError,
        match=r"spec\.allow\.db_labels\.on: expected a string, got a boolean \(quote the value\)",
    ):
        Role.from_dict(
            {
                "kind": "role",
                "version": "v1",
                "metadata": {"name": "py"},
                "spec": {"allow": {"db_labels": {"on": True}}},
            }
        )
    with pytest.raises(RoleError, match=r"^role document: expected a mapping"):
        Role.from_dict("kind: role")


def test_models_validate_and_are_frozen():
    with pytest.raises(pydantic.ValidationError):
        Role(name="Bad Name")
    with pytest.raises(pydantic.ValidationError):
        RoleConditions(db_labels={"region": "^(x$"})
    with pytest.raises(pydantic.ValidationError):
        RoleConditions(unknown=1)
    r = role(allow={"db_users": ["a"]})
    with pytest.raises(pydantic.ValidationError):
        r.name = "other"


# --------------------------------------------------------------------------------------------
# Round trip


ROUND_TRIP_ROLES = [
    load_role_yaml(EXAMPLE),
    load_role_yaml(MINIMAL),
    *BUILTIN_ROLES.values(),
    role(
        "odd.values_1",
        allow={
            "db_labels": {"on": "yes", "v": ["1.10", "0x1F"], "k": ""},
            "db_names": ["*"],
            "db_commands": ["@all"],
        },
        deny={"db_users": ["{{external.blocked}}", "*"], "db_commands": ["CLIENT|KILL"]},
        max_session_ttl="1h30m",
        client_idle_timeout="90s",
        disconnect_expired_cert=True,
    ),
    role("described", allow={"rules": [{"resources": ["*"], "verbs": ["list"]}]}).model_copy(
        update={"description": "multi\nline: with 'quotes' and #hash"}
    ),
]


@pytest.mark.parametrize("r", ROUND_TRIP_ROLES, ids=lambda r: r.name)
def test_round_trip(r):
    assert load_role_yaml(r.to_yaml()) == r
    assert Role.from_dict(r.to_dict()) == r
    assert load_role_yaml(r.to_yaml()).to_yaml() == r.to_yaml()


def test_to_dict_shape():
    d = load_role_yaml(EXAMPLE).to_dict()
    assert list(d) == ["kind", "version", "metadata", "spec"]
    assert d["metadata"] == {
        "name": "redis-readonly",
        "description": "read-only access to prod caches",
    }
    assert d["spec"]["options"] == {
        "max_session_ttl": "8h",
        "disconnect_expired_cert": True,
        "client_idle_timeout": "30m",
    }
    assert d["spec"]["deny"] == {
        "db_labels": {"env": ["prod"]},
        "db_users": ["admin"],
        "db_commands": ["@dangerous", "FLUSHALL"],
    }
    assert "description" not in load_role_yaml(MINIMAL).to_dict()["metadata"]
    assert load_role_yaml(MINIMAL).to_dict()["spec"]["allow"] == {}


def test_to_yaml_writes_short_lists_inline():
    text = load_role_yaml(EXAMPLE).to_yaml()
    assert "env: [prod, staging]" in text
    assert "db_users: ['{{internal.db_users}}', default]" in text


# --------------------------------------------------------------------------------------------
# Labels


@pytest.mark.parametrize(
    ("selector", "labels", "expected"),
    [
        ({"env": ["prod"]}, {"env": "prod"}, True),
        ({"env": ["prod"]}, {"env": "production"}, False),
        ({"env": ["prod"]}, {"env": "PROD"}, False),
        ({"env": ["prod"]}, {}, False),
        ({"env": ["prod", "staging"]}, {"env": "staging"}, True),
        ({"env": ["prod", "staging"]}, {"env": "dev"}, False),
        ({"team": ["cache-*"]}, {"team": "cache-blue"}, True),
        ({"team": ["cache-*"]}, {"team": "cache-"}, True),
        ({"team": ["cache-*"]}, {"team": "web-cache-blue"}, False),
        ({"team": ["*-ops-*"]}, {"team": "a-ops-b"}, True),
        ({"team": ["a?c"]}, {"team": "abc"}, False),  # only * is special in globs
        ({"team": ["a?c*"]}, {"team": "a?cd"}, True),
        ({"team": ["[ab]*"]}, {"team": "a1"}, False),
        ({"region": ["^east.*$"]}, {"region": "eastus2"}, True),
        ({"region": ["^east.*$"]}, {"region": "northeast"}, False),
        ({"region": ["^east$"]}, {"region": "east\n"}, False),  # full match, no trailing newline
        ({"region": ["^(east|west)us$"]}, {"region": "westus"}, True),
        ({"env": ["*"]}, {"env": "anything"}, True),
        ({"env": ["*"]}, {"other": "x"}, False),  # '*' value still needs the key
        ({"*": ["*"]}, {}, True),
        ({"*": ["*"]}, {"env": "prod"}, True),
        ({"*": ["*"], "env": ["prod"]}, {"env": "dev"}, False),
        ({"env": ["prod"], "region": ["^east.*$"]}, {"env": "prod", "region": "eastus"}, True),
        ({"env": ["prod"], "region": ["^east.*$"]}, {"env": "prod", "region": "westus"}, False),
        ({"env": ["prod"], "region": ["^east.*$"]}, {"env": "prod"}, False),
        ({"k": [""]}, {"k": ""}, True),
    ],
)
def test_match_labels(selector, labels, expected):
    assert match_labels(selector, labels) is expected
    # The same answer through the evaluator.
    rs = RoleSet([role(allow={"db_labels": selector})])
    assert rs.can_see_database("db", labels) is expected


def test_empty_selector_matches_nothing_in_allow_and_everything_in_deny():
    assert match_labels({}, {"env": "prod"}) is False
    assert match_labels({}, {"env": "prod"}, empty_matches=True) is True


@pytest.mark.parametrize("value", ["prod", "cache-*", "*", "^east.*$", ""])
def test_validate_label_value_accepts(value):
    assert validate_label_value(value) == value


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("^(", "regex '^(' must end with '$'"),
        ("^($", "invalid regex '^($': missing ), unterminated subpattern"),
        ("^[a-$", "invalid regex"),
        ("{{internal.db_users}}", "traits are not expanded in db_labels"),
        (3, "expected a string"),
    ],
)
def test_validate_label_value_rejects(value, message):
    with pytest.raises(
        ValueError,
        match=message.replace("(", r"\(")
        .replace(")", r"\)")
        .replace("[", r"\[")
        .replace("$", r"\$")
        .replace("^", r"\^"),
    ):
        validate_label_value(value)


def test_label_matchers_are_compiled_once():
    assert label_value_matcher("^cache-[0-9]+$") is label_value_matcher("^cache-[0-9]+$")
    before = label_value_matcher.cache_info().hits
    rs = RoleSet([role(allow={"db_labels": {"name": "^cache-[0-9]+$"}})])
    for _ in range(3):
        rs.check_database("db", {"name": "cache-1"})
    assert (
        label_value_matcher.cache_info().hits >= before + 1
    )  # compiled at RoleSet build, not per check


# --------------------------------------------------------------------------------------------
# Databases


def test_no_roles_deny_everything():
    rs = RoleSet([], {})
    d = rs.check_database("my-azure-redis", PROD)
    assert d == Decision(False, 'access to database "my-azure-redis" denied by your roles')
    assert not d
    assert rs.check_command("GET", ["@read"]).allowed is False
    assert rs.check_admin("user", "list").allowed is False


def test_role_without_labels_grants_no_database():
    rs = RoleSet([role(allow={"db_users": ["*"], "db_names": ["*"], "db_commands": ["*"]})])
    assert not rs.check_database("db", PROD, "alice", "0")
    assert not rs.can_see_database("db", {})


def test_allow_by_labels_user_and_logical_db():
    rs = RoleSet(
        [role(allow={"db_labels": {"env": "prod"}, "db_users": ["alice"], "db_names": ["0", "2"]})]
    )
    assert rs.check_database("db", PROD).allowed
    assert rs.check_database("db", PROD, "alice").allowed
    assert rs.check_database("db", PROD, "alice", "2").allowed
    assert rs.check_database("db", PROD, None, 0).allowed
    assert rs.check_database("db", PROD, "alice", "02").allowed  # numbers compare as numbers
    assert rs.check_database("db", PROD, "alice").reason == 'allowed by role "r"'


@pytest.mark.parametrize(
    ("labels", "user", "ldb", "reason"),
    [
        (DEV, None, None, 'access to database "my-azure-redis" denied by your roles'),
        (DEV, "alice", "0", 'access to database "my-azure-redis" denied by your roles'),
        (PROD, "bob", None, 'access to db user "bob" on "my-azure-redis" denied by your roles'),
        (PROD, "bob", "0", 'access to db user "bob" on "my-azure-redis" denied by your roles'),
        (PROD, "Alice", None, 'access to db user "Alice" on "my-azure-redis" denied by your roles'),
        (
            PROD,
            "alice",
            "1",
            'access to logical database 1 as db user "alice" on "my-azure-redis" '
            "denied by your roles",
        ),
        (PROD, None, 5, 'access to logical database 5 on "my-azure-redis" denied by your roles'),
    ],
)
def test_database_denials_and_reasons(labels, user, ldb, reason):
    rs = RoleSet(
        [role(allow={"db_labels": {"env": "prod"}, "db_users": ["alice"], "db_names": ["0"]})]
    )
    assert rs.check_database("my-azure-redis", labels, user, ldb) == Decision(False, reason)


def test_one_role_must_match_every_part():
    rs = RoleSet(
        [
            role(
                "dev", allow={"db_labels": {"env": "dev"}, "db_users": ["alice"], "db_names": ["0"]}
            ),
            role(
                "prod", allow={"db_labels": {"env": "prod"}, "db_users": ["bob"], "db_names": ["1"]}
            ),
        ]
    )
    assert rs.check_database("d", DEV, "alice", "0")
    assert rs.check_database("p", PROD, "bob", "1")
    assert not rs.check_database("d", DEV, "bob")  # bob is only allowed where env=prod
    assert not rs.check_database("p", PROD, "bob", "0")  # db 0 only where env=dev
    assert not rs.check_database("p", PROD, "alice", "1")


def test_role_with_labels_but_no_users_allows_listing_not_connecting():
    rs = RoleSet([role(allow={"db_labels": {"*": "*"}})])
    assert rs.can_see_database("db", PROD)
    assert not rs.check_database("db", PROD, "default")
    assert not rs.check_database("db", PROD, None, "0")


@pytest.mark.parametrize(
    ("deny", "labels", "user", "ldb", "reason"),
    [
        (
            {"db_labels": {"env": "prod"}},
            PROD,
            None,
            None,
            'access to database "db" denied by role "deny"',
        ),
        (
            {"db_labels": {"env": "prod"}},
            PROD,
            "alice",
            "0",
            'access to database "db" denied by role "deny"',
        ),
        (
            {"db_users": ["admin"]},
            PROD,
            "admin",
            None,
            'access to db user "admin" on "db" denied by role "deny"',
        ),
        (
            {"db_users": ["admin"]},
            DEV,
            "admin",
            "0",
            'access to db user "admin" on "db" denied by role "deny"',
        ),
        (
            {"db_users": ["*"]},
            DEV,
            "alice",
            None,
            'access to db user "alice" on "db" denied by role "deny"',
        ),
        (
            {"db_labels": {"env": "prod"}, "db_users": ["admin"]},
            PROD,
            "admin",
            None,
            'access to db user "admin" on "db" denied by role "deny"',
        ),
        (
            {"db_names": ["15"]},
            DEV,
            "alice",
            "15",
            'access to logical database 15 on "db" denied by role "deny"',
        ),
        (
            {"db_labels": {"*": "*"}},
            {},
            None,
            None,
            'access to database "db" denied by role "deny"',
        ),
    ],
)
def test_deny_wins(deny, labels, user, ldb, reason):
    grant = role(
        "grant",
        allow={"db_labels": {"*": "*"}, "db_users": ["*"], "db_names": ["*"], "db_commands": ["*"]},
    )
    rs = RoleSet([grant, role("deny", deny=deny)])
    assert rs.check_database("db", labels, user, ldb) == Decision(False, reason)


@pytest.mark.parametrize(
    ("deny", "labels", "user", "ldb"),
    [
        (
            {"db_labels": {"env": "prod"}, "db_users": ["admin"]},
            DEV,
            "admin",
            None,
        ),  # deny scoped to prod
        (
            {"db_labels": {"env": "prod"}, "db_users": ["admin"]},
            PROD,
            "alice",
            None,
        ),  # another user
        (
            {"db_labels": {"env": "prod"}, "db_users": ["admin"]},
            PROD,
            None,
            None,
        ),  # user not checked
        ({"db_users": ["admin"]}, PROD, None, "0"),
        ({"db_names": ["15"]}, PROD, "alice", "1"),
        ({"db_names": ["15"]}, PROD, "alice", None),  # logical db not checked
        (
            {"db_labels": {"env": "prod"}, "db_commands": ["FLUSHALL"]},
            PROD,
            "alice",
            "0",
        ),  # commands only
        ({"db_commands": ["*"]}, PROD, "alice", "0"),
        ({"rules": [{"resources": ["*"], "verbs": ["*"]}]}, PROD, "alice", "0"),  # admin rules only
        ({"db_labels": {"env": "prod"}}, DEV, "alice", "0"),
    ],
)
def test_deny_that_does_not_apply(deny, labels, user, ldb):
    grant = role("grant", allow={"db_labels": {"*": "*"}, "db_users": ["*"], "db_names": ["*"]})
    assert RoleSet([grant, role("deny", deny=deny)]).check_database("db", labels, user, ldb).allowed


def test_deny_role_order_does_not_matter():
    grant = role("grant", allow={"db_labels": {"*": "*"}, "db_users": ["*"]})
    deny = role("deny", deny={"db_users": ["root"]})
    assert not RoleSet([grant, deny]).check_database("db", PROD, "root")
    assert not RoleSet([deny, grant]).check_database("db", PROD, "root")


# --------------------------------------------------------------------------------------------
# Traits


TRAIT_ROLE = role(
    "traits",
    allow={
        "db_labels": {"*": "*"},
        "db_users": ["{{internal.db_users}}", "{{external.extra_users}}"],
        "db_names": ["{{ internal.db_names }}"],
    },
)


@pytest.mark.parametrize(
    ("traits", "user", "ldb", "expected"),
    [
        ({"db_users": ["alice", "bob"], "db_names": ["0"]}, "alice", "0", True),
        ({"db_users": ["alice", "bob"], "db_names": ["0"]}, "bob", "0", True),
        ({"db_users": ["alice", "bob"], "db_names": ["0"]}, "carol", "0", False),
        ({"db_users": ["alice"], "db_names": ["0"]}, "alice", "1", False),
        ({"db_users": ["alice"], "db_names": ["00"]}, "alice", "0", True),
        ({"db_users": ["*"], "db_names": ["*"]}, "anyone", "9", True),
        ({"db_users": [], "db_names": []}, "alice", None, False),
        ({"db_users": [""], "db_names": []}, "", None, False),
        ({}, "alice", None, False),
        ({}, None, "0", False),
        ({"extra_users": ["svc"]}, "svc", None, True),
        (
            {"db_users": ["alice"]},
            "{{internal.db_users}}",
            None,
            False,
        ),  # templates never match literally
    ],
)
def test_trait_expansion(traits, user, ldb, expected):
    assert RoleSet([TRAIT_ROLE], traits).check_database("db", PROD, user, ldb).allowed is expected


def test_traits_expand_in_deny_too():
    grant = role("grant", allow={"db_labels": {"*": "*"}, "db_users": ["*"]})
    deny = role("deny", deny={"db_users": ["{{external.blocked}}"]})
    rs = RoleSet([grant, deny], {"blocked": ["root"]})
    assert not rs.check_database("db", PROD, "root")
    assert rs.check_database("db", PROD, "alice")
    # An empty trait denies nothing, and does not turn the block into a whole-database deny.
    deny_scoped = role(
        "deny", deny={"db_labels": {"env": "prod"}, "db_users": ["{{external.blocked}}"]}
    )
    rs = RoleSet([grant, deny_scoped], {})
    assert rs.check_database("db", PROD, "root")
    assert rs.can_see_database("db", PROD)


def test_a_trait_given_as_one_string_is_one_value():
    rs = RoleSet([TRAIT_ROLE], {"db_users": "alice", "db_names": "0"})
    assert rs.check_database("db", PROD, "alice", "0")
    assert not rs.check_database("db", PROD, "a")


def test_roleset_keeps_its_own_copy_of_traits():
    traits = {"db_users": ["alice"]}
    rs = RoleSet([TRAIT_ROLE], traits)
    traits["db_users"].append("mallory")
    assert not rs.check_database("db", PROD, "mallory")


# --------------------------------------------------------------------------------------------
# Listing: allowed users / names, visibility


def test_allowed_db_users_wildcard_with_exceptions():
    rs = RoleSet(
        [
            role("grant", allow={"db_labels": {"*": "*"}, "db_users": ["*", "alice"]}),
            role("deny", deny={"db_users": ["root", "admin"]}),
        ]
    )
    assert rs.allowed_db_users("db", PROD) == (["*"], ["admin", "root"])


def test_allowed_db_users_explicit_lists_only_from_matching_roles():
    rs = RoleSet(
        [
            role(
                "prod",
                allow={"db_labels": {"env": "prod"}, "db_users": ["{{internal.db_users}}", "root"]},
            ),
            role("dev", allow={"db_labels": {"env": "dev"}, "db_users": ["devuser"]}),
            role("deny", deny={"db_labels": {"env": "prod"}, "db_users": ["root"]}),
        ],
        {"db_users": ["bob", "alice"]},
    )
    assert rs.allowed_db_users("p", PROD) == (["alice", "bob"], ["root"])
    assert rs.allowed_db_users("d", DEV) == (["devuser"], [])
    assert rs.allowed_db_users("x", {"env": "qa"}) == ([], [])


@pytest.mark.parametrize(
    "deny",
    [
        {"db_labels": {"env": "prod"}},
        {"db_users": ["*"]},
        {"db_labels": {"env": "prod"}, "db_users": ["*"]},
    ],
)
def test_allowed_db_users_everything_denied(deny):
    rs = RoleSet(
        [role("grant", allow={"db_labels": {"*": "*"}, "db_users": ["*"]}), role("deny", deny=deny)]
    )
    assert rs.allowed_db_users("p", PROD) == ([], ["*"])


def test_allowed_db_names_sorted_as_numbers():
    rs = RoleSet(
        [
            role(
                "grant",
                allow={"db_labels": {"*": "*"}, "db_names": ["10", "2", "{{internal.db_names}}"]},
            ),
            role("deny", deny={"db_names": ["2"]}),
        ],
        {"db_names": ["1", "03"]},
    )
    assert rs.allowed_db_names("db", PROD) == (["1", "3", "10"], ["2"])
    rs = RoleSet([role(allow={"db_labels": {"*": "*"}, "db_names": ["*"]})])
    assert rs.allowed_db_names("db", PROD) == (["*"], [])


@pytest.mark.parametrize(
    ("deny", "visible"),
    [
        ({}, True),
        ({"db_labels": {"env": "prod"}}, False),  # label-only deny hides
        ({"db_labels": {"env": "dev"}}, True),
        ({"db_users": ["*"]}, True),  # denies connecting as anyone, not seeing
        ({"db_labels": {"env": "prod"}, "db_users": ["admin"]}, True),
        ({"db_labels": {"env": "prod"}, "db_commands": ["*"]}, True),
        ({"db_names": ["0"]}, True),
    ],
)
def test_can_see_database(deny, visible):
    rs = RoleSet([role("grant", allow={"db_labels": {"env": "prod"}}), role("deny", deny=deny)])
    assert rs.can_see_database("db", PROD) is visible
    assert rs.can_see_database("db", DEV) is False  # no allow selects it


# --------------------------------------------------------------------------------------------
# Commands


def commands_roleset(*entries: str, deny: list[str] | None = None) -> RoleSet:
    roles = [
        role(
            "grant",
            allow={
                "db_labels": {"*": "*"},
                "db_users": ["*"],
                "db_names": ["*"],
                "db_commands": list(entries),
            },
        )
    ]
    if deny is not None:
        roles.append(role("ops", deny={"db_commands": deny}))
    return RoleSet(roles)


@pytest.mark.parametrize(
    ("entries", "command", "categories", "expected"),
    [
        (["GET"], "GET", ["@read", "@fast"], True),
        (["GET"], "get", [], True),
        (["get"], "GET", [], True),
        (["GET"], "SET", ["@write"], False),
        (["@read"], "GET", ["@read", "@fast"], True),
        (["@read"], "GET", ["read"], True),  # categories without '@'
        (["@READ"], "GET", ["@Read"], True),
        (["@read"], "SET", ["@write", "@slow"], False),
        (["*"], "FLUSHALL", ["@keyspace", "@write", "@slow", "@dangerous"], True),
        (["@all"], "DEBUG", [], False),  # server administration: '*'/@all do not cover it
        (["*"], "CONFIG|SET", ["@admin", "@slow", "@dangerous"], False),
        (["*"], "config set", ["@admin"], False),
        (["*"], "CONFIG|GET", ["@admin", "@slow", "@dangerous"], True),
        (["*"], "MODULE|LOAD", ["@admin"], False),
        (["DEBUG"], "DEBUG", [], True),
        (["CONFIG|SET"], "CONFIG|SET", ["@admin"], True),
        (["@admin"], "SHUTDOWN", ["@admin", "@slow", "@dangerous"], True),
        (["CLIENT"], "CLIENT|KILL", ["@admin"], True),  # a name covers its subcommands
        (["CLIENT"], "client kill", [], True),
        (["CLIENT|KILL"], "CLIENT KILL", [], True),
        (["CLIENT KILL"], "client|kill", [], True),
        (["CLIENT|KILL"], "CLIENT|LIST", [], False),
        (["CLIENT|KILL"], "CLIENT", [], False),
        (["JSON.GET"], "json.get", ["@json"], True),
        ([], "GET", ["@read"], False),  # no db_commands = no commands
        (["GET"], "", [], False),
        (["GET"], "   ", [], False),
    ],
)
def test_command_allow(entries, command, categories, expected):
    assert commands_roleset(*entries).check_command(command, categories).allowed is expected


@pytest.mark.parametrize(
    ("deny", "command", "categories", "reason"),
    [
        (
            ["FLUSHALL"],
            "flushall",
            ["@dangerous"],
            'command FLUSHALL denied by role "ops" (deny FLUSHALL)',
        ),
        (
            ["@dangerous"],
            "FLUSHALL",
            ["@keyspace", "@dangerous"],
            'command FLUSHALL denied by role "ops" (deny @dangerous)',
        ),
        (
            ["CONFIG"],
            "config set",
            ["@admin"],
            'command CONFIG|SET denied by role "ops" (deny CONFIG)',
        ),
        (
            ["CONFIG|SET"],
            "CONFIG|SET",
            [],
            'command CONFIG|SET denied by role "ops" (deny CONFIG|SET)',
        ),
        (["*"], "PING", ["@fast"], 'command PING denied by role "ops" (deny *)'),
    ],
)
def test_command_deny_wins(deny, command, categories, reason):
    rs = commands_roleset("*", deny=deny)
    assert rs.check_command(command, categories) == Decision(False, reason)


@pytest.mark.parametrize(
    ("command", "categories"), [("CONFIG|GET", ["@admin"]), ("GET", ["@read"]), ("CONFIG", [])]
)
def test_command_deny_is_narrow(command, categories):
    assert (
        commands_roleset("*", deny=["CONFIG|SET", "@dangerous"])
        .check_command(command, categories)
        .allowed
    )


def test_command_denial_reason_without_allow():
    rs = commands_roleset("@read")
    assert rs.check_command("SET", ["@write"]) == Decision(
        False, "command SET denied by your roles"
    )
    access = rs.for_database("my-azure-redis", PROD, "alice", "0")
    assert access.check_command("SET", ["@write"]) == Decision(
        False, 'command SET denied by your roles on "my-azure-redis"'
    )


def test_commands_come_only_from_roles_granting_this_access():
    rs = RoleSet(
        [
            role(
                "reader",
                allow={
                    "db_labels": {"env": "prod"},
                    "db_users": ["reader"],
                    "db_names": ["0"],
                    "db_commands": ["@read"],
                },
            ),
            role(
                "writer",
                allow={
                    "db_labels": {"env": "prod"},
                    "db_users": ["writer"],
                    "db_names": ["0"],
                    "db_commands": ["*"],
                },
            ),
            role(
                "dev",
                allow={
                    "db_labels": {"env": "dev"},
                    "db_users": ["*"],
                    "db_names": ["*"],
                    "db_commands": ["*"],
                },
            ),
            role(
                "scratch",
                allow={
                    "db_labels": {"env": "prod"},
                    "db_users": ["reader"],
                    "db_names": ["9"],
                    "db_commands": ["*"],
                },
            ),
        ]
    )
    ctx = {"db_name": "p", "db_labels": PROD}
    assert rs.check_command("GET", ["@read"], **ctx, db_user="reader", logical_db="0")
    assert not rs.check_command("SET", ["@write"], **ctx, db_user="reader", logical_db="0")
    assert rs.check_command("SET", ["@write"], **ctx, db_user="writer", logical_db="0")
    assert rs.check_command("SET", ["@write"], **ctx, db_user="reader", logical_db="9")
    assert rs.check_command(
        "SET", ["@write"], db_name="d", db_labels=DEV, db_user="reader", logical_db="0"
    )
    # Without a database context every role granting some database counts.
    assert rs.check_command("SET", ["@write"])


def test_command_deny_scoped_by_labels():
    rs = RoleSet(
        [
            role("grant", allow={"db_labels": {"*": "*"}, "db_users": ["*"], "db_commands": ["*"]}),
            role("ops", deny={"db_labels": {"env": "prod"}, "db_commands": ["FLUSHALL"]}),
        ]
    )
    assert not rs.check_command("FLUSHALL", [], db_name="p", db_labels=PROD)
    assert rs.check_command("FLUSHALL", [], db_name="d", db_labels=DEV)
    assert not rs.check_command("FLUSHALL", [])  # no context: every deny block counts
    assert rs.check_database("p", PROD, "alice")  # a command deny is not a database deny


def test_commands_on_a_denied_database_are_denied():
    rs = RoleSet(
        [role(allow={"db_labels": {"env": "prod"}, "db_users": ["alice"], "db_commands": ["*"]})]
    )
    access = rs.for_database("d", DEV, "alice")
    assert not access.decision
    assert access.check_command("GET", ["@read"]) == access.decision
    assert access.check_command("GET").reason == 'access to database "d" denied by your roles'


def test_database_access_caches_decisions():
    access = commands_roleset("@read", deny=["KEYS"]).for_database("db", PROD, "alice", 0)
    assert access.logical_db == "0"
    first = access.check_command("get", ("@read",))
    assert access.check_command("get", ("@read",)) is first
    assert access.check_command("GET", frozenset({"read"})) == first
    assert access.check_command("GET", ["read"]) == first
    assert not access.check_command("KEYS", ["@read"])


def test_builtin_access_role_allows_every_command_but_deny_still_wins():
    rs = RoleSet(
        [BUILTIN_ROLES["access"], role("ops", deny={"db_commands": ["@dangerous"]})],
        {"db_users": ["*"], "db_names": ["*"]},
    )
    assert rs.check_command(
        "SET", ["@write"], db_name="db", db_labels=PROD, db_user="default", logical_db=0
    )
    d = rs.check_command(
        "FLUSHALL", ["@write", "@dangerous"], db_name="db", db_labels=PROD, db_user="default"
    )
    assert d == Decision(False, 'command FLUSHALL denied by role "ops" (deny @dangerous)')


# --------------------------------------------------------------------------------------------
# Admin API


@pytest.mark.parametrize(
    ("rules", "resource", "verb", "expected"),
    [
        ([{"resources": ["user", "role"], "verbs": ["list", "read"]}], "user", "list", True),
        ([{"resources": ["user", "role"], "verbs": ["list", "read"]}], "role", "read", True),
        ([{"resources": ["user", "role"], "verbs": ["list", "read"]}], "role", "create", False),
        ([{"resources": ["user", "role"], "verbs": ["list", "read"]}], "token", "list", False),
        ([{"resources": ["*"], "verbs": ["list"]}], "anything", "list", True),
        ([{"resources": ["lock"], "verbs": ["*"]}], "lock", "delete", True),
        ([{"resources": ["lock"], "verbs": ["*"]}], "LOCK", "Delete", True),
        (
            [
                {"resources": ["user"], "verbs": ["list"]},
                {"resources": ["role"], "verbs": ["read"]},
            ],
            "user",
            "read",
            False,
        ),
        ([], "user", "list", False),
    ],
)
def test_check_admin(rules, resource, verb, expected):
    assert RoleSet([role(allow={"rules": rules})]).check_admin(resource, verb).allowed is expected


def test_check_admin_deny_wins_with_reasons():
    rs = RoleSet(
        [
            BUILTIN_ROLES["editor"],
            role("no-tokens", deny={"rules": [{"resources": ["token"], "verbs": ["*"]}]}),
        ]
    )
    assert rs.check_admin("role", "create") == Decision(True, 'allowed by role "editor"')
    assert rs.check_admin("token", "create") == Decision(
        False, 'permission to create token denied by role "no-tokens"'
    )
    assert RoleSet([]).check_admin("token", "list") == Decision(
        False, "permission to list token denied by your roles"
    )


# --------------------------------------------------------------------------------------------
# Options


@pytest.mark.parametrize(
    ("options", "ttl", "disconnect", "idle"),
    [
        ([], DEFAULT_MAX_SESSION_TTL, False, None),
        ([{}], DEFAULT_MAX_SESSION_TTL, True, None),
        ([{"disconnect_expired_cert": False}], DEFAULT_MAX_SESSION_TTL, False, None),
        ([{"max_session_ttl": "8h"}, {}], 8 * 3600, True, None),
        ([{"max_session_ttl": "8h"}, {"max_session_ttl": "30m"}], 1800, True, None),
        ([{"max_session_ttl": "30h"}, {}], DEFAULT_MAX_SESSION_TTL, True, None),
        (
            [{"disconnect_expired_cert": False}, {"disconnect_expired_cert": True}],
            DEFAULT_MAX_SESSION_TTL,
            True,
            None,
        ),
        (
            [{"client_idle_timeout": "30m"}, {"client_idle_timeout": "0s"}],
            DEFAULT_MAX_SESSION_TTL,
            True,
            1800,
        ),
        (
            [{"client_idle_timeout": "30m"}, {"client_idle_timeout": "5m"}, {}],
            DEFAULT_MAX_SESSION_TTL,
            True,
            300,
        ),
    ],
)
def test_options_combination(options, ttl, disconnect, idle):
    rs = RoleSet([role(f"r{i}", **o) for i, o in enumerate(options)])
    assert rs.max_session_ttl == ttl
    assert rs.disconnect_expired_cert is disconnect
    assert rs.client_idle_timeout == idle


@pytest.mark.parametrize(
    ("options", "expected"),
    [([], None), ([{}], None), ([{"max_connections": 100}, {}], 100),
     ([{"max_connections": 100}, {"max_connections": 60}], 60)],
)
def test_max_connections_is_the_smallest_set(options, expected):
    assert RoleSet([role(f"r{i}", **o) for i, o in enumerate(options)]).max_connections == expected


def test_max_connections_from_role_yaml():
    assert load_role_yaml(MINIMAL + "spec:\n  options:\n    max_connections: 2\n").options.max_connections == 2


@pytest.mark.parametrize("bad", [-1, "many", True, 1.5])
def test_max_connections_must_be_a_count(bad):
    with pytest.raises(RoleError, match="max_connections"):
        load_role_yaml(MINIMAL + f"spec:\n  options:\n    max_connections: {json.dumps(bad)}\n")


# --------------------------------------------------------------------------------------------
# Built-in roles


def test_builtin_roles_exist_and_are_protected():
    assert set(BUILTIN_ROLES) == {"access", "editor", "auditor"}
    for name in ("access", "editor", "auditor"):
        assert is_builtin(name)
    assert not is_builtin("redis-readonly")
    with pytest.raises(TypeError):
        BUILTIN_ROLES["access"] = role("access")  # type: ignore[index]


def test_builtin_access_role():
    access = BUILTIN_ROLES["access"]
    assert access.allow.db_labels == {"*": ["*"]}
    assert access.allow.db_users == ["{{internal.db_users}}"]
    assert access.allow.db_names == ["{{internal.db_names}}"]
    assert access.allow.db_commands == ["*"]
    assert access.allow.rules == [] and access.deny == RoleConditions()
    rs = RoleSet([access], {"db_users": ["alice"], "db_names": ["0"]})
    assert rs.check_database("any", {}, "alice", "0")
    assert not rs.check_database("any", {}, "root", "0")
    assert rs.allowed_db_users("any", {"env": "x"}) == (["alice"], [])
    assert not rs.check_admin("user", "list")
    assert not RoleSet([access], {}).check_database("any", {}, "alice")


def test_builtin_editor_role_has_no_database_access():
    rs = RoleSet([BUILTIN_ROLES["editor"]], {"db_users": ["*"], "db_names": ["*"]})
    assert rs.check_admin("role", "delete") and rs.check_admin("anything", "whatever")
    assert not rs.can_see_database("db", {})
    assert not rs.check_command("GET", ["@read"])


@pytest.mark.parametrize(
    ("resource", "verb", "expected"),
    [
        ("event", "list", True),
        ("session", "read", True),
        ("event", "delete", False),
        ("user", "list", False),
    ],
)
def test_builtin_auditor_role(resource, verb, expected):
    assert RoleSet([BUILTIN_ROLES["auditor"]]).check_admin(resource, verb).allowed is expected


def test_example_document_end_to_end():
    rs = RoleSet([load_role_yaml(EXAMPLE)], {"db_users": ["alice"], "db_names": ["1"]})
    staging = {"env": "staging", "region": "eastus", "team": "cache-blue"}
    assert rs.check_database("s", staging, "alice", "1")
    assert rs.check_database("s", staging, "default", "0")
    assert not rs.check_database("s", staging, "admin")  # not allowed (the deny only covers prod)
    prod = {"env": "prod", "region": "eastus", "team": "cache-blue"}
    assert rs.can_see_database("p", prod)  # the deny lists users and commands: not label-only
    assert rs.check_database("p", prod, "default", "0")
    assert rs.allowed_db_users("p", prod) == (["alice", "default"], ["admin"])
    assert not rs.check_command(
        "FLUSHALL", ["@dangerous"], db_name="p", db_labels=prod, db_user="default"
    )
    assert not rs.can_see_database(
        "w", {"env": "staging", "region": "westus", "team": "cache-blue"}
    )
    ctx = {"db_name": "s", "db_labels": staging, "db_user": "alice", "logical_db": "1"}
    assert rs.check_command("GET", ["@read", "@fast"], **ctx)
    assert rs.check_command("SET", ["@write"], **ctx)
    assert not rs.check_command("DEL", ["@write"], **ctx)
    assert rs.check_command("PING", ["@connection", "@fast"], **ctx)
    assert rs.check_admin("role", "list") and not rs.check_admin("role", "delete")
    assert (
        rs.max_session_ttl == 8 * 3600
        and rs.disconnect_expired_cert
        and rs.client_idle_timeout == 1800
    )


def test_server_admin_needs_a_role_that_names_it():
    access = RoleSet([BUILTIN_ROLES["access"]], {"db_users": ["*"], "db_names": ["*"]})
    acc = access.for_database("d", {"env": "x"}, "default", 0)
    d = acc.check_command("SHUTDOWN", ("@admin", "@slow", "@dangerous"))
    assert not d and "server administration" in d.reason and "docs/rbac.md" in d.reason
    assert acc.check_command("GET", ("@read",)) and acc.check_command("FLUSHALL", ("@write",))
    ops = role("ops", allow={"db_labels": {"*": "*"}, "db_users": ["*"], "db_names": ["*"],
                             "db_commands": ["SHUTDOWN", "CLIENT|LIST"]})
    both = RoleSet([BUILTIN_ROLES["access"], ops], {"db_users": ["*"], "db_names": ["*"]})
    acc2 = both.for_database("d", {"env": "x"}, "default", 0)
    assert acc2.check_command("SHUTDOWN", ("@admin",))
    assert acc2.explicitly_allows("CLIENT|LIST", ("@admin",))
    assert not acc.explicitly_allows("CLIENT|LIST", ("@admin",))
    assert acc.explicitly_allows("GET", ("@read",)) is False  # '*' alone is not explicit


def test_denies_any_and_every_logical_db():
    traits = {"db_users": ["*"], "db_names": ["*"]}
    access = RoleSet([BUILTIN_ROLES["access"]], traits).for_database("d", {}, "default", 0)
    assert not access.denies_any([("DEL", frozenset({"@write"}))]) and access.every_logical_db
    narrow = RoleSet([BUILTIN_ROLES["access"]], {"db_users": ["*"], "db_names": ["0"]})
    assert not narrow.for_database("d", {}, "default", 0).every_logical_db
    deny = role("nodel", deny={"db_commands": ["DEL"]})
    acc = RoleSet([BUILTIN_ROLES["access"], deny], traits).for_database("d", {}, "default", 0)
    assert acc.denies_any([("GET", frozenset({"@read"})), ("DEL", frozenset({"@write"}))])
    assert not acc.denies_any([("GET", frozenset({"@read"}))])
    cat = role("nowrite", deny={"db_commands": ["@write"]})
    acc = RoleSet([BUILTIN_ROLES["access"], cat], traits).for_database("d", {}, "default", 0)
    assert acc.denies_any([("SET", frozenset({"@write", "@string"}))])
