"""Keys, certificate authorities, CSRs and the certificates the cluster issues.

Every certificate the cluster signs carries the caller's :class:`Identity` in a
private extension (see :mod:`services.common.identity`). Keys are ECDSA P-256.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from services.common.identity import IDENTITY_OID, encode_identity

UTC = dt.timezone.utc


def now() -> dt.datetime:
    return dt.datetime.now(UTC)


def new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def key_to_pem(key) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def key_from_pem(data: bytes):
    return serialization.load_pem_private_key(data, password=None)


def cert_to_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def cert_from_pem(data: bytes | str) -> x509.Certificate:
    if isinstance(data, str):
        data = data.encode()
    return x509.load_pem_x509_certificate(data)


def certs_from_pem(data: bytes | str) -> list[x509.Certificate]:
    if isinstance(data, str):
        data = data.encode()
    return x509.load_pem_x509_certificates(data)


def spki_pin(cert: x509.Certificate) -> str:
    """The CA pin: ``sha256:`` + hex SHA-256 of the SubjectPublicKeyInfo."""
    spki = cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return "sha256:" + hashlib.sha256(spki).hexdigest()


def normalize_pin(pin: str) -> str:
    pin = pin.strip().lower()
    return pin if pin.startswith("sha256:") else "sha256:" + pin


@dataclass
class CertAuthority:
    """A CA held in memory: its certificate and private key."""

    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    @classmethod
    def create(cls, common_name: str, org: str, years: int = 10) -> "CertAuthority":
        key = new_key()
        name = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, org),
                x509.NameAttribute(NameOID.COMMON_NAME, common_name),
            ]
        )
        start = now() - dt.timedelta(minutes=5)
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(start + dt.timedelta(days=365 * years))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    key_cert_sign=True,
                    crl_sign=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256())
        )
        return cls(cert, key)

    @property
    def cert_pem(self) -> bytes:
        return cert_to_pem(self.cert)

    @property
    def pin(self) -> str:
        return spki_pin(self.cert)

    def issued(self, cert: x509.Certificate) -> bool:
        """Whether ``cert`` was signed by this CA."""
        try:
            cert.verify_directly_issued_by(self.cert)
        except (ValueError, TypeError, Exception):  # InvalidSignature and friends
            return False
        return True

    def sign(
        self,
        public_key,
        common_name: str,
        identity,
        ttl: dt.timedelta,
        *,
        dns_names: list[str] | None = None,
        ips: list[str] | None = None,
        server: bool = False,
        not_after: dt.datetime | None = None,
    ) -> x509.Certificate:
        """Sign a certificate valid for ``ttl`` from now (``not_after`` fixes the end)."""
        start = now() - dt.timedelta(minutes=1)
        end = not_after or (start + dt.timedelta(minutes=1) + ttl)
        start = min(start, end - ttl)
        end = min(end, self.cert.not_valid_after_utc)
        usages = [ExtendedKeyUsageOID.CLIENT_AUTH]
        if server:
            usages.append(ExtendedKeyUsageOID.SERVER_AUTH)
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
            .issuer_name(self.cert.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), critical=False
            )
        )
        if identity is not None:  # None: a plain server certificate (dev Redis, the Azure stand-in)
            builder = builder.add_extension(
                x509.UnrecognizedExtension(IDENTITY_OID, encode_identity(identity)), critical=False)
        sans: list[x509.GeneralName] = [x509.DNSName(n) for n in (dns_names or [])]
        for ip in ips or []:
            sans.append(x509.IPAddress(ipaddress.ip_address(ip)))
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        return builder.sign(self.key, hashes.SHA256())


def read_ca_file(path: str | Path, base_dir: Path | None = None) -> tuple[Path, str]:
    """A CA bundle file named in a config or document (relative to ``base_dir``): its path
    and text. OSError when it cannot be read; check the text with :func:`holds_certificate`."""
    p = Path(path)
    if base_dir is not None and not p.is_absolute():
        p = base_dir / p
    return p, p.read_text()


def holds_certificate(pem: str) -> bool:
    return "-----BEGIN CERTIFICATE-----" in pem


def make_csr(key, common_name: str) -> bytes:
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM)


def load_csr(pem: str | bytes) -> x509.CertificateSigningRequest:
    """Parse a CSR and check its self-signature (proof the caller holds the key)."""
    if isinstance(pem, str):
        pem = pem.encode()
    try:
        csr = x509.load_pem_x509_csr(pem)
    except ValueError as exc:
        raise ValueError("csr_pem is not a PEM certificate signing request") from exc
    if not csr.is_signature_valid:
        raise ValueError("the certificate signing request's signature does not verify")
    return csr


def split_addresses(addresses: list[str]) -> tuple[list[str], list[str]]:
    """Split host names from IP literals (for subjectAltName)."""
    dns, ips = [], []
    for a in addresses:
        a = a.strip().strip("[]")
        if not a:
            continue
        try:
            ipaddress.ip_address(a)
            ips.append(a)
        except ValueError:
            dns.append(a)
    return dns, ips


def fetch_unverified_chain(host: str, port: int, timeout: float = 10.0) -> list[x509.Certificate]:
    """The certificate chain a TLS server presents, read without verifying it.

    Used only before joining, so that the caller can check the chain against a
    CA pin it got out of band; nothing is sent on this connection.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_alpn_protocols(["h2"])
    with socket.create_connection((host, port), timeout=timeout) as raw:
        with ctx.wrap_socket(raw, server_hostname=host if not _is_ip(host) else None) as tls:
            getter = getattr(tls, "get_unverified_chain", None) or tls._sslobj.get_unverified_chain  # py<3.13
            chain = getter() or []
    out = []
    for c in chain:
        der = c.public_bytes(ssl._ssl.ENCODING_DER) if hasattr(c, "public_bytes") else c
        out.append(x509.load_der_x509_certificate(der))
    return out


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host.strip("[]"))
        return True
    except ValueError:
        return False
