"""DatabaseTLS: one TLS client context per database CA bundle, made again when a
``database_ca_files`` file changes (a rotated bundle needs no restart)."""

from __future__ import annotations

import os

from services.common.pki import CertAuthority
from services.dbproxy.upstream import DatabaseTLS


def _ca_pem(name: str) -> str:
    return CertAuthority.create(name, "test").cert_pem.decode()


def _subjects(ctx) -> set[str]:
    return {dict(x[0] for x in c["subject"])["commonName"] for c in ctx.get_ca_certs()}


def test_a_bundle_is_parsed_once_and_each_bundle_trusts_only_its_own_cas(tmp_path):
    tls = DatabaseTLS()
    a, b = _ca_pem("ca-a"), _ca_pem("ca-b")
    ctx_a = tls.context(a)
    assert tls.context(a) is ctx_a  # the next session of that database reuses it
    ctx_b = tls.context(b)
    assert ctx_b is not ctx_a
    assert _subjects(ctx_a) == {"ca-a"} and _subjects(ctx_b) == {"ca-b"}
    assert ctx_a.check_hostname and ctx_a.verify_mode.name == "CERT_REQUIRED"


def test_a_rotated_ca_file_is_trusted_without_a_restart(tmp_path):
    extra = tmp_path / "extra.pem"
    extra.write_text(_ca_pem("old-extra"))
    tls = DatabaseTLS([str(extra)])
    own = _ca_pem("own")
    first = tls.context(own)
    assert _subjects(first) == {"own", "old-extra"}
    extra.write_text(_ca_pem("new-extra"))
    st = extra.stat()
    os.utime(extra, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))  # whatever the clock's grain
    second = tls.context(own)
    assert second is not first
    assert _subjects(second) == {"own", "new-extra"}


def test_contexts_kept_are_bounded():
    tls = DatabaseTLS()
    pems = [_ca_pem(f"ca-{i}") for i in range(DatabaseTLS.MAX + 3)]
    for pem in pems:
        tls.context(pem)
    assert len(tls._made) == DatabaseTLS.MAX  # noqa: SLF001
    assert _subjects(tls.context(pems[-1])) == {f"ca-{DatabaseTLS.MAX + 2}"}


class _Conn:
    """What remember() reads of a connection's SSLObject; reading ``session`` is counted
    (it is the expensive part: Python copies the session through DER)."""

    def __init__(self, reused: bool, ticket: bool = True) -> None:
        self.session_reused = reused
        self.reads = 0
        self._ticket = ticket

    @property
    def session(self):
        self.reads += 1
        return type("S", (), {"has_ticket": self._ticket})()


def test_a_kept_session_that_still_resumes_is_not_read_again_until_it_is_old():
    ctx = DatabaseTLS().context(None)
    first = _Conn(reused=False)
    ctx.remember(first, "db.example")
    kept = ctx._sessions["db.example"][0]
    again = _Conn(reused=True)
    for _ in range(5):
        ctx.remember(again, "db.example")
    assert first.reads == 1 and again.reads == 0 and ctx._sessions["db.example"][0] is kept
    ctx.REFRESH = 0.0  # old: the next connection's session replaces it
    ctx.remember(again, "db.example")
    assert again.reads == 1 and ctx._sessions["db.example"][0] is not kept


def test_a_session_that_no_longer_resumes_is_replaced_or_dropped():
    ctx = DatabaseTLS().context(None)
    ctx.remember(_Conn(reused=False), "db.example")
    old = ctx._sessions["db.example"][0]
    ctx.remember(_Conn(reused=False), "db.example")  # the server did not take it (new ticket keys)
    assert ctx._sessions["db.example"][0] is not old
    ctx.remember(_Conn(reused=False, ticket=False), "db.example")  # and no ticket to keep instead
    assert "db.example" not in ctx._sessions
