"""Fuzz targets: each takes bytes and raises AssertionError (or anything unexpected) when an
invariant breaks. The same functions run under hypothesis in CI (tests/fuzz/test_fuzz.py,
bounded) and under atheris for long runs (``python -m tests.fuzz.run TARGET``); inputs that
broke one are kept in tests/fuzz/corpus/TARGET/ and replayed by every test run.

Invariants:

- ``resp_parser``: the command parser gives the same commands (and the same error, or
  none) whether the bytes arrive at once, split at any one point, or one byte at a time;
  the bytes it forwards parse back to the same commands; only
  ProtocolError is raised; what it holds for an incomplete command stays within its limit.
- ``reply_framer``: the same for the reply framer (frames, their sizes, the error), and
  frames cover exactly the bytes consumed; for well-formed RESP2 it agrees with hiredis on
  how many replies there are.
- ``session_core``: the session state machine fed random bytes from both sides raises
  nothing but its End, and what it sends either way stays proportional to what it got.
- ``identity_cert``: the identity-certificate decoder, given a PEM or a certificate whose
  identity extension holds arbitrary bytes, returns an Identity or raises ValueError.
- ``role_yaml``: the role loader returns roles or raises RoleError.
- ``config``: the config loader returns a Config or raises ConfigError.
"""

from __future__ import annotations

import datetime as dt
import functools
import os
import tempfile
from pathlib import Path

import hiredis

from services.dbproxy.resp import CommandParser, Limits, ProtocolError, ReplyFramer

# Small limits, so that "too big" paths are reached by small inputs.
LIMITS = Limits(max_bulk_len=512, max_array_len=64, max_inline_len=256, max_buffer=1024)
MAX_LINE = 256
# Every split point is tried for inputs up to this size (quadratic), a sample beyond.
ALL_SPLITS = 512


def _split_points(n: int) -> range | list[int]:
    if n <= ALL_SPLITS:
        return range(1, n)
    step = max(1, n // ALL_SPLITS)
    return list(range(1, n, step))


# --- the RESP command parser ----------------------------------------------------------------
def _parse(chunks: list[bytes]) -> tuple[list[list[bytes]], bytes, str | None]:
    """(commands, the bytes forwarded, the error or None; "(incomplete)" when the input
    ends inside a command)."""
    p = CommandParser(LIMITS)
    argvs: list[list[bytes]] = []
    raw = b""
    for ch in chunks:
        try:
            cmds = p.feed(ch)
        except ProtocolError as err:
            argvs += [c.argv for c in err.commands]
            raw += b"".join(c.raw for c in err.commands)
            msg = str(err)
            assert msg and "\n" not in msg and err.reply().startswith(b"-ERR Protocol error: ")
            return argvs, raw, msg
        argvs += [c.argv for c in cmds]
        raw += b"".join(c.raw for c in cmds)
        assert p.pending <= LIMITS.max_buffer + LIMITS.max_inline_len + 64, p.pending
    return argvs, raw, "(incomplete)" if p.pending else None


def _same(a, b) -> bool:
    """The same commands and bytes forwarded, and an error in both or neither. Allowed to
    differ: the wording of the error (a header refused as soon as a piece shows it is over
    a limit says "too big", the same header seen whole past INT_MAX says "invalid"), and an
    incomplete command whose header is already over a limit, refused early or not yet."""
    if a == b:
        return True
    if a[:2] != b[:2]:
        return False
    if "(incomplete)" in (a[2], b[2]):
        return True
    return (a[2] is None) == (b[2] is None)


def resp_parser(data: bytes) -> None:
    whole = _parse([data])
    argvs, raw, err = whole
    # What is forwarded (RESP; an inline command re-encoded) says the same commands again.
    again = CommandParser(Limits()).feed(raw)
    assert [c.argv for c in again] == argvs, "the forwarded bytes do not parse back to the commands"
    for a in argvs:
        assert a and len(a) <= LIMITS.max_array_len and all(len(x) <= LIMITS.max_bulk_len for x in a)
    for i in _split_points(len(data)):
        assert _same(_parse([data[:i], data[i:]]), whole), f"split at {i} differs"
    if len(data) <= 4096:
        assert _same(_parse([data[i:i + 1] for i in range(len(data))]), whole), "byte by byte differs"


# --- the reply framer -----------------------------------------------------------------------
def _frames(chunks: list[bytes], protocol: int = 3):
    f = ReplyFramer(protocol, max_line=MAX_LINE, max_depth=64)
    out = []
    for ch in chunks:
        try:
            frames = f.feed(ch)
        except ProtocolError as err:
            assert str(err) and "\n" not in str(err)
            return out, str(err)
        out += [(fr.kind, fr.raw_len, fr.is_push, fr.tag) for fr in frames]
        assert len(f._line) <= MAX_LINE + 2 and len(f._stack) <= 64 + 1  # noqa: SLF001 (bounded memory)
    return out, None


def _same_frames(split, whole) -> bool:
    """Equal; on an error, the frames completed in earlier pieces are there as well (a feed
    that fails returns none of the frames it completed before the bad byte: the session
    ends with "bad reply from the database" either way)."""
    if split == whole:
        return True
    (fs, es), (fw, ew) = split, whole
    return es is not None and ew is not None and fs[:len(fw)] == fw


def reply_framer(data: bytes) -> None:
    whole = _frames([data])
    frames, err = whole
    assert sum(fr[1] for fr in frames) <= len(data)
    for i in _split_points(len(data)):
        assert _same_frames(_frames([data[:i], data[i:]]), whole), f"split at {i} differs"
    if len(data) <= 4096:
        assert _same_frames(_frames([data[i:i + 1] for i in range(len(data))]), whole), "byte by byte differs"
    if err is None and data[:1] in (b"+", b"-", b":", b"$", b"*"):
        # Well-formed RESP2 as far as the framer is concerned: hiredis counts the same replies
        # (when hiredis takes it at all; it is stricter about some things).
        r = hiredis.Reader(notEnoughData=Ellipsis)
        r.feed(data)
        n = 0
        try:
            while (item := r.gets()) is not Ellipsis:
                n += 1
                if n > len(frames) + 1:
                    break
        except hiredis.ProtocolError:
            return
        if all(fr[0] in "+-:$*" for fr in frames):
            assert n == len(frames), (n, frames)


# --- the session core -------------------------------------------------------------------------
class _Queries:
    def __init__(self) -> None:
        self.n = 0

    def commands(self, when, logical_db, cmds, size=-1):
        assert size == sum(len(c.raw) for c in cmds), (size, cmds)  # what the audit queue holds
        self.n += len(cmds)

    def query(self, when, logical_db, cmd, name, error=""):
        self.n += 1


@functools.lru_cache(maxsize=1)
def _roles():
    from services.common.rbac import BUILTIN_ROLES, RoleSet

    return RoleSet([BUILTIN_ROLES["access"]], {"db_users": ["*"], "db_names": ["0", "1"]})


def session_core(data: bytes) -> None:
    from services.dbproxy.sessioncore import End, SessionCore

    core = SessionCore(database="d", db_user="default", db_name="", roles=_roles(), db_labels={},
                       queries=_Queries(), resp_limits=LIMITS, max_reply_line=MAX_LINE)
    core.upstream_auth, core.client_id = b"*2\r\n$4\r\nAUTH\r\n$1\r\nx\r\n", 7
    # The first byte of each piece says which side it comes from; pieces split on 0xff.
    sent_in = sent_out = 0
    for piece in data.split(b"\xff"):
        if not piece:
            continue
        side, body = piece[0] & 1, piece[1:]
        try:
            if side == 0:
                up, down = core.feed_client(body)
                sent_out += len(up) + len(down)
            else:
                sent_out += len(core.feed_upstream(body))
        except End:
            return
        sent_in += len(body)
        assert sent_out <= 64 * sent_in + 4096, (sent_out, sent_in)
        if core.ending is not None:
            return


# --- the identity-certificate decoder ---------------------------------------------------------
@functools.lru_cache(maxsize=1)
def _ca():
    from services.common import pki

    return pki.CertAuthority.create("fuzz user CA", "fuzz"), pki.new_key()


def identity_cert(data: bytes) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import NameOID

    from services.common.authz import CertVerifier
    from services.common.identity import IDENTITY_OID, identity_from_cert
    from services.common.pki import cert_from_pem

    # 1. Arbitrary bytes as a PEM certificate.
    try:
        cert = cert_from_pem(data)
    except ValueError:
        pass
    else:
        try:
            identity_from_cert(cert)
        except ValueError:
            pass
    # 2. A real certificate, signed by the cluster's CA, whose identity extension is the input.
    ca, key = _ca()
    now = dt.datetime.now(dt.timezone.utc)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fuzz")])
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(ca.cert.subject)
            .public_key(key.public_key()).serial_number(1).not_valid_before(now - dt.timedelta(minutes=1))
            .not_valid_after(now + dt.timedelta(hours=1))
            .add_extension(x509.UnrecognizedExtension(IDENTITY_OID, data[:4096]), critical=False)
            .sign(ca.key, hashes.SHA256()))
    try:
        ident = identity_from_cert(cert)
    except ValueError:
        return
    verifier = CertVerifier(ca.cert, ca.cert)
    try:
        verifier.identity(cert)
    except ValueError:
        pass
    assert ident is not None


# --- the role YAML loader and the config loader ------------------------------------------------
def role_yaml(data: bytes) -> None:
    from services.common.rbac import RoleError, load_roles_yaml

    try:
        roles = load_roles_yaml(data)
    except RoleError as exc:
        assert str(exc) and "\n" not in str(exc), repr(str(exc))
        return
    for r in roles:
        assert r.name


_CONFIG_DIR = Path(tempfile.gettempdir()) / f"cachegate-fuzz-{os.getpid()}"


def config(data: bytes) -> None:
    from services.common.config import ConfigError, load_config

    _CONFIG_DIR.mkdir(exist_ok=True)
    path = _CONFIG_DIR / "cachegate.yaml"
    path.write_bytes(data)
    try:
        load_config(path, environ={})
    except ConfigError as exc:
        assert str(exc), "an empty config error"
        return


TARGETS = {
    "resp_parser": resp_parser,
    "reply_framer": reply_framer,
    "session_core": session_core,
    "identity_cert": identity_cert,
    "role_yaml": role_yaml,
    "config": config,
}
