"""Property-based fuzzing of what reads untrusted bytes (tests/fuzz/targets.py says what each
target checks), bounded for CI; ``CACHEGATE_RELIABILITY=full`` runs 20 times as many
examples. Every input in tests/fuzz/corpus/ (found by atheris or hypothesis, or written by
hand) is replayed first. A hang shows as a hypothesis deadline or the pytest timeout; memory
growth is checked by running the targets many times under tracemalloc."""

from __future__ import annotations

import gc
import os
import random
import tracemalloc
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.dbproxy.resp import encode_command
from tests.fuzz import targets

pytestmark = pytest.mark.reliability

FULL = os.environ.get("CACHEGATE_RELIABILITY", "").lower() == "full"
CORPUS = Path(__file__).parent / "corpus"
EXAMPLES = {"resp_parser": 80, "reply_framer": 80, "session_core": 60, "identity_cert": 40,
            "role_yaml": 80, "config": 60}


def fuzz_settings(target: str):
    n = EXAMPLES[target] * (20 if FULL else 1)
    # database=None: nothing written to the checkout; a failure prints its input (add it to
    # the corpus). The deadline is the hang check of one input.
    return settings(max_examples=n, deadline=3000, database=None, derandomize=not FULL,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def corpus_cases():
    for d in sorted(CORPUS.iterdir()) if CORPUS.exists() else []:
        for f in sorted(d.iterdir()):
            yield pytest.param(d.name, f, id=f"{d.name}/{f.name}")


@pytest.mark.parametrize("target,path", list(corpus_cases()))
def test_corpus_inputs_stay_fixed(target, path):
    targets.TARGETS[target](path.read_bytes())


# --- inputs that look like the protocol, then are broken ----------------------------------------
_words = st.sampled_from([b"GET", b"SET", b"hset", b"PING", b"MULTI", b"EXEC", b"SUBSCRIBE", b"HELLO", b"3",
                          b"SELECT", b"1", b"AUTH", b"CLIENT", b"REPLY", b"OFF", b"QUIT", b"k", b"", b"x" * 300])
_args = st.lists(st.one_of(_words, st.binary(max_size=40)), min_size=1, max_size=6)
_command = _args.map(lambda a: encode_command(*a))
_inline = st.lists(st.one_of(_words, st.text(max_size=10).map(str.encode)), min_size=1, max_size=4).map(
    lambda a: b" ".join(a) + st_choice_end())


def st_choice_end() -> bytes:
    return b"\r\n"


_header = st.sampled_from([b"*", b"$", b"*-1", b"$-1", b"*0", b"$0", b"*99999999999", b"$-5", b"*1\r\n$", b"\r\n",
                           b"\n", b"\r", b"\x00", b"*2\r\n", b"$3\r\nabc"])


@st.composite
def mutated(draw, pieces):
    parts = draw(st.lists(st.one_of(pieces, _header, st.binary(max_size=20)), max_size=12))
    data = bytearray(b"".join(parts))
    for _ in range(draw(st.integers(0, 3))):
        if not data:
            break
        i = draw(st.integers(0, len(data) - 1))
        op = draw(st.integers(0, 2))
        if op == 0:
            del data[i]
        elif op == 1:
            data[i] = draw(st.integers(0, 255))
        else:
            data[i:i] = draw(st.binary(min_size=1, max_size=4))
    return bytes(data)


_reply_piece = st.sampled_from([
    b"+OK\r\n", b"-ERR x\r\n", b":1\r\n", b"$3\r\nabc\r\n", b"$-1\r\n", b"*2\r\n:1\r\n:2\r\n", b"*-1\r\n",
    b"_\r\n", b",1.5\r\n", b"#t\r\n", b"(123\r\n", b"!3\r\nerr\r\n", b"=7\r\ntxt:abc\r\n",
    b"%1\r\n+a\r\n:1\r\n", b"~1\r\n+a\r\n", b">3\r\n$7\r\nmessage\r\n$1\r\nc\r\n$1\r\nm\r\n",
    b"|1\r\n+k\r\n+v\r\n", b"$?\r\n;3\r\nabc\r\n;0\r\n", b"*?\r\n:1\r\n.\r\n", b"*3\r\n$9\r\nsubscribe\r\n$1\r\nc\r\n:1\r\n",
])


@given(mutated(st.one_of(_command, _inline)))
@fuzz_settings("resp_parser")
def test_resp_parser(data):
    targets.resp_parser(data)


@given(st.binary(max_size=600))
@fuzz_settings("resp_parser")
def test_resp_parser_random_bytes(data):
    targets.resp_parser(data)


@given(mutated(_reply_piece))
@fuzz_settings("reply_framer")
def test_reply_framer(data):
    targets.reply_framer(data)


@given(st.lists(_reply_piece, max_size=30).map(b"".join))
@fuzz_settings("reply_framer")
def test_reply_framer_on_valid_replies_splits_anywhere(data):
    targets.reply_framer(data)


@given(st.lists(st.tuples(st.integers(0, 1), st.one_of(mutated(_command), mutated(_reply_piece))), max_size=12)
       .map(lambda ps: b"\xff".join(bytes([side]) + body.replace(b"\xff", b"") for side, body in ps)))
@fuzz_settings("session_core")
def test_session_core(data):
    targets.session_core(data)


@given(st.binary(max_size=300))
@fuzz_settings("identity_cert")
def test_identity_cert_extension(data):
    targets.identity_cert(data)


@given(st.builds(lambda b: b"-----BEGIN CERTIFICATE-----\n" + b + b"\n-----END CERTIFICATE-----\n",
                 st.binary(max_size=400)))
@fuzz_settings("identity_cert")
def test_identity_cert_pem(data):
    targets.identity_cert(data)


_yaml_piece = st.sampled_from([
    "kind: role\n", "version: v1\n", "metadata:\n  name: r\n", "spec:\n", "  allow:\n", "  deny:\n",
    "    db_labels: {'*': '*'}\n", "    db_users: ['{{internal.db_users}}']\n", "    db_names: [0, '*']\n",
    "    db_commands: ['@admin', GET]\n", "  options:\n    max_session_ttl: 8h\n", "---\n", "&a [*a]\n",
    "- x\n", "? \n", "!!python/object:os.system\n", "a: &x 1\nb: *x\n", "<<: {a: 1}\n", "\t", ": :\n",
])


@given(st.lists(st.one_of(_yaml_piece, st.text(max_size=15)), max_size=12).map(lambda p: "".join(p).encode()))
@fuzz_settings("role_yaml")
def test_role_yaml(data):
    targets.role_yaml(data)


_config_piece = st.sampled_from([
    "version: v1\n", "data_dir: /tmp/x\n", "auth_server: 127.0.0.1:3025\n", "auth_service:\n  enabled: true\n",
    "dbproxy_service:\n  enabled: true\n  limits:\n    max_bulk_len: 1MiB\n", "  heartbeat_interval: 0s\n",
    "discovery_service:\n  poll_interval: -1\n  azure:\n  - types: [redis]\n    regions: ['*']\n",
    "log: {level: loud}\n", "telemetry: {metrics: prometheus}\n", "join: {token: /tmp/t}\n", "---\n", "[1, 2]\n",
    "auth_service: {storage: {type: postgres}}\n", "- \n", "x: !!binary AAAA\n", "a: &a [*a]\n",
])


@given(st.lists(st.one_of(_config_piece, st.text(max_size=15)), max_size=10).map(lambda p: "".join(p).encode()))
@fuzz_settings("config")
def test_config(data):
    targets.config(data)


# --- memory ------------------------------------------------------------------------------------
def test_memory_does_not_grow_over_many_inputs():
    """Thousands of random and broken inputs through the parser, the framer and the session
    core: what stays allocated afterwards does not grow with the number of inputs."""
    rng = random.Random(7)
    pieces = [encode_command("SET", "k", "v" * 50), b"*3\r\n$3\r\nSET\r\n", b"+OK\r\n", b"$5\r\nab", b"\x00\r\n",
              b"*99999\r\n", b"PING\r\n", b">2\r\n+a\r\n"]

    def batch(n):
        for _ in range(n):
            data = b"".join(rng.choice(pieces) for _ in range(rng.randint(1, 8))) + rng.randbytes(rng.randint(0, 20))
            targets._parse([data])  # noqa: SLF001 (one feed each: no split search here)
            targets._frames([data])  # noqa: SLF001
            targets.session_core(bytes([rng.randint(0, 1)]) + data)

    batch(200)  # warm caches (command table, role set)
    gc.collect()
    tracemalloc.start()
    try:
        batch(300)
        gc.collect()
        first = tracemalloc.get_traced_memory()[0]
        batch(20000 if FULL else 1000)
        gc.collect()
        second = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    assert second - first < 256 * 1024, (first, second)
