"""CertVerifier: a certificate's signature is verified once, and nothing else is skipped."""

from __future__ import annotations

import datetime as dt

import pytest
from cachegate.types.v1 import types_pb2
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from services.common import pki
from services.common.authz import CertVerifier
from services.common.pki import CertAuthority


def _user(ca: CertAuthority, name: str = "alice", ttl=dt.timedelta(hours=1)) -> x509.Certificate:
    ident = types_pb2.Identity(kind=types_pb2.IDENTITY_KIND_USER, name=name, roles=["access"])
    return ca.sign(pki.new_key().public_key(), name, ident, ttl)


@pytest.fixture
def cas():
    return CertAuthority.create("host CA", "t"), CertAuthority.create("user CA", "t")


def test_a_certificate_seen_again_is_not_verified_again(cas, monkeypatch):
    host, user = cas
    v = CertVerifier(host.cert, user.cert)
    cert = _user(user)
    calls = []
    real = CertAuthority.issued
    monkeypatch.setattr(CertAuthority, "issued", lambda self, c: calls.append(1) or real(self, c))
    assert v.identity(cert).name == "alice"
    assert v.identity(x509.load_der_x509_certificate(cert.public_bytes(serialization.Encoding.DER))).name == "alice"
    assert len(calls) == 1


def test_a_forged_signature_or_another_ca_or_the_other_kind_is_still_refused(cas):
    host, user = cas
    v = CertVerifier(host.cert, user.cert)
    good = _user(user)
    assert v.identity(good).name == "alice"
    # The same signed bytes with another signature (the last byte of the DER changed).
    der = bytearray(good.public_bytes(serialization.Encoding.DER))
    der[-1] ^= 0x01
    with pytest.raises(ValueError, match="not issued"):
        v.identity(x509.load_der_x509_certificate(bytes(der)))
    with pytest.raises(ValueError, match="not issued"):
        v.identity(_user(CertAuthority.create("rogue", "t")))
    # A user certificate signed by the host CA is not a user's, cached or not.
    with pytest.raises(ValueError, match="not issued"):
        v.identity(_user(host))


def test_expiry_is_checked_each_time(cas, monkeypatch):
    host, user = cas
    v = CertVerifier(host.cert, user.cert)
    cert = _user(user, ttl=dt.timedelta(minutes=5))
    assert v.identity(cert)
    later = dt.datetime.now(dt.timezone.utc) + dt.timedelta(hours=1)

    class Clock(dt.datetime):
        @classmethod
        def now(cls, tz=None):
            return later

    monkeypatch.setattr("services.common.authz.dt.datetime", Clock)
    with pytest.raises(ValueError, match="expired"):
        v.identity(cert)
