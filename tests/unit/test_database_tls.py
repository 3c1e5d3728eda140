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
