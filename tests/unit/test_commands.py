"""Command table, RBAC names and categories, audit masking."""

from __future__ import annotations

from services.common.rbac import RoleSet, load_role_yaml
from services.dbproxy.commands import REDACTED, arity_ok, audit_args, lookup, referenced_dbs
from services.dbproxy.limits import ProxyLimits, parse_size


def test_lookup_categories_and_subcommands():
    get = lookup("GET", [b"GET", b"k"])
    assert get.name == "GET" and "@read" in get.categories and get.arity == 2
    kill = lookup("CLIENT", [b"CLIENT", b"kill", b"ID", b"1"])
    assert kill.name == "CLIENT|KILL" and {"@admin", "@dangerous"} <= kill.categories
    assert lookup("CLIENT", [b"CLIENT"]).name == "CLIENT"
    assert lookup("CLIENT", [b"CLIENT", b"NOPE"]).name == "CLIENT"
    unknown = lookup("FT.SEARCH", [b"FT.SEARCH", b"idx"])
    assert not unknown.known and unknown.categories == frozenset()
    assert "@dangerous" in lookup("FLUSHALL", [b"FLUSHALL"]).categories
    assert "@blocking" in lookup("BLPOP", [b"BLPOP", b"l", b"0"]).categories


def test_arity():
    assert arity_ok(lookup("GET", [b"GET"]), 2) and not arity_ok(lookup("GET", [b"GET"]), 3)
    assert arity_ok(lookup("SUBSCRIBE", [b"SUBSCRIBE"]), 3) and not arity_ok(lookup("SUBSCRIBE", []), 1)


def test_rbac_with_table_categories():
    role = load_role_yaml("""
kind: role
version: v1
metadata: {name: ro}
spec:
  allow: {db_labels: {'*': '*'}, db_users: ['*'], db_commands: ['@read', '@connection']}
  deny: {db_commands: ['CLIENT|KILL']}
""")
    acc = RoleSet([role]).for_database("db", {}, "default")
    for argv, ok in [([b"GET", b"k"], True), ([b"SET", b"k", b"v"], False), ([b"PING"], True),
                     ([b"CLIENT", b"SETNAME", b"x"], True), ([b"CLIENT", b"KILL", b"ID", b"1"], False)]:
        info = lookup(argv[0].decode().upper(), argv)
        assert bool(acc.check_command(info.name, info.categories)) is ok, argv


def test_audit_masks_secrets():
    assert audit_args("AUTH", [b"AUTH", b"pw"]) == ["AUTH", REDACTED]
    assert audit_args("AUTH", [b"AUTH", b"u", b"pw"]) == ["AUTH", "u", REDACTED]
    assert audit_args("HELLO", [b"HELLO", b"3", b"AUTH", b"u", b"pw", b"SETNAME", b"n"]) == [
        "HELLO", "3", "AUTH", "u", REDACTED, "SETNAME", "n"]
    m = audit_args("MIGRATE", [b"MIGRATE", b"h", b"1", b"", b"0", b"5", b"KEYS", b"a", b"AUTH2", b"u", b"pw"])
    assert m[-1] == REDACTED and m[-2] == "u"
    assert audit_args("MIGRATE", [b"MIGRATE", b"h", b"1", b"k", b"0", b"5", b"AUTH", b"pw"])[-1] == REDACTED
    assert audit_args("CONFIG", [b"CONFIG", b"SET", b"maxmemory", b"1", b"requirepass", b"pw"]) == [
        "CONFIG", "SET", "maxmemory", "1", "requirepass", REDACTED]
    assert audit_args("ACL", [b"ACL", b"SETUSER", b"u", b"on", b">pw", b"#abc", b"~*"]) == [
        "ACL", "SETUSER", "u", "on", REDACTED, REDACTED, "~*"]


def test_audit_cuts_long_arguments():
    out = audit_args("SET", [b"SET", b"k", b"x" * 1000], max_arg=10)
    assert out == ["SET", "k", "xxxxxxxxxx...(1000 bytes)"]
    out = audit_args("DEL", [b"DEL"] + [b"k"] * 100, max_args=5)
    assert out[-1] == "...(96 more arguments)" and len(out) == 6
    assert audit_args("GET", [b"GET", b"\xff\x00"]) == ["GET", "\\xff\x00"]


def test_referenced_dbs():
    assert referenced_dbs("MOVE", [b"MOVE", b"k", b"3"]) == [b"3"]
    assert referenced_dbs("SWAPDB", [b"SWAPDB", b"0", b"2"]) == [b"0", b"2"]
    assert referenced_dbs("COPY", [b"COPY", b"a", b"b", b"DB", b"4", b"REPLACE"]) == [b"4"]
    assert referenced_dbs("GET", [b"GET", b"k"]) == []


def test_limits_from_config():
    lim = ProxyLimits.from_mapping({"max_bulk_len": "8MiB", "tls_handshake_timeout": "5s",
                                    "sessions_per_user": 4})
    assert lim.max_bulk_len == 8 << 20 and lim.tls_handshake_timeout == 5 and lim.sessions_per_user == 4
    assert lim.resp.max_bulk_len == 8 << 20
    assert parse_size("64KiB") == 65536
    import pytest

    with pytest.raises(ValueError, match="unknown RESP limit"):
        ProxyLimits.from_mapping({"nope": 1})
    with pytest.raises(ValueError):
        ProxyLimits.from_mapping({"max_bulk_len": "lots"})


def test_command_getkeys_masks_the_inner_commands_secrets():
    assert audit_args("COMMAND", [b"COMMAND", b"GETKEYS", b"AUTH", b"pw"]) == ["COMMAND", "GETKEYS", "AUTH", REDACTED]
    assert audit_args("COMMAND", [b"COMMAND", b"GETKEYS", b"GET", b"k"]) == ["COMMAND", "GETKEYS", "GET", "k"]


def test_proxy_refusals_follow_redis_parsing():
    from services.dbproxy.commands import proxy_refusal

    assert proxy_refusal("MIGRATE", [b"MIGRATE", b"h", b"1", b"", b"0", b"5", b"KEYS", b"auth", b"x"]) is None
    assert "MIGRATE with AUTH" in proxy_refusal("MIGRATE", [b"MIGRATE", b"h", b"1", b"k", b"0", b"5", b"AUTH", b"pw"])
    assert "CONFIG SET requirepass" in proxy_refusal("CONFIG", [b"config", b"set", b"RequirePass", b"x"])
    assert proxy_refusal("CONFIG", [b"CONFIG", b"SET", b"maxmemory", b"1"]) is None
    assert proxy_refusal("CONFIG", [b"CONFIG", b"GET", b"requirepass"]) is None
    assert "ACL SETUSER" in proxy_refusal("ACL", [b"ACL", b"setuser", b"x"])
    assert proxy_refusal("ACL", [b"ACL", b"WHOAMI"]) is None


def test_reply_rewrites():
    from services.dbproxy.commands import own_client_lines, redact_config_reply

    r2 = b"*4\r\n$11\r\nrequirepass\r\n$3\r\nkey\r\n$4\r\nsave\r\n$0\r\n\r\n"
    assert redact_config_reply(r2) == b"*4\r\n$11\r\nrequirepass\r\n$10\r\n<redacted>\r\n$4\r\nsave\r\n$0\r\n\r\n"
    r3 = b"%1\r\n$10\r\nmasterauth\r\n$3\r\nkey\r\n"
    assert redact_config_reply(r3) == b"%1\r\n$10\r\nmasterauth\r\n$10\r\n<redacted>\r\n"
    assert redact_config_reply(b"-ERR x\r\n") == b"-ERR x\r\n"
    assert redact_config_reply(b"*1\r\n:1\r\n").startswith(b"-ERR")  # unexpected: never forwarded unchecked
    text = b"id=3 addr=a\nid=31 addr=b\nid=4 addr=c\n"
    assert own_client_lines(b"$%d\r\n%s\r\n" % (len(text), text), 3) == b"$12\r\nid=3 addr=a\n\r\n"
    verbatim = b"txt:" + text
    assert own_client_lines(b"=%d\r\n%s\r\n" % (len(verbatim), verbatim), 4) == b"=16\r\ntxt:id=4 addr=c\n\r\n"
