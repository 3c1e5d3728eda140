"""Throw-away certificate authority for the Azure stand-in.

Generates a CA and a server certificate for the loopback names (127.0.0.1, ::1, localhost)
with the project's PKI (services/common/pki.py). Nothing here is meant to protect anything: the stand-in only needs
HTTPS because the Azure SDK's bearer-token policy refuses plain http.
"""

from __future__ import annotations

import datetime as _dt
import os
import ssl
import tempfile
from dataclasses import dataclass
from pathlib import Path

from services.common import pki

LOOPBACK_NAMES = ("localhost",)
LOOPBACK_IPS = ("127.0.0.1", "::1")


@dataclass
class CertBundle:
    ca_pem: bytes
    cert_pem: bytes
    key_pem: bytes

    def server_ssl_context(self) -> ssl.SSLContext:
        """An SSLContext for the HTTPS listener (the key only ever touches a private temp dir)."""
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        with tempfile.TemporaryDirectory(prefix="standin-tls-") as tmp:
            cert_path = Path(tmp, "server.pem")
            key_path = Path(tmp, "server.key")
            cert_path.write_bytes(self.cert_pem + self.ca_pem)
            fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as fh:
                fh.write(self.key_pem)
            ctx.load_cert_chain(str(cert_path), str(key_path))
        return ctx


def generate_certs(
    dns_names: tuple[str, ...] = LOOPBACK_NAMES,
    ip_addresses: tuple[str, ...] = LOOPBACK_IPS,
    valid_days: int = 30,
) -> CertBundle:
    """A new CA and a server certificate for the loopback names, made with the project's PKI."""
    ca = pki.CertAuthority.create("Cachegate Azure stand-in CA", "Cachegate test", years=1)
    key = pki.new_key()
    cert = ca.sign(key.public_key(), "localhost", None, _dt.timedelta(days=valid_days),
                   dns_names=list(dns_names), ips=list(ip_addresses), server=True)
    return CertBundle(ca_pem=ca.cert_pem, cert_pem=pki.cert_to_pem(cert), key_pem=pki.key_to_pem(key))
