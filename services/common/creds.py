"""Credentials on disk: a host's (or user's) key, certificate and the cluster CAs.

Hosts keep them in ``<data_dir>/<service>/`` (files 0600 in a 0700 folder).
An *identity file* is one PEM file: certificate, private key, host CA
certificate; ``cgctl -i FILE`` and ``grpcurl`` (split) use it.
"""

from __future__ import annotations

import os
import stat
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc

from cachegate.types.v1 import types_pb2
from services.common import identity as idmod
from services.common.pki import cert_from_pem

PEM_BLOCK = re.compile(rb"-----BEGIN ([A-Z ]+)-----\r?\n.*?-----END \1-----\r?\n?", re.S)

# Name every cluster server certificate carries, so that clients can verify the
# server whatever address they dialled: "<role>.cachegate.internal".
INTERNAL_DOMAIN = "cachegate.internal"


def internal_name(role: str) -> str:
    return f"{role}.{INTERNAL_DOMAIN}"


def private_dir(path: Path, *, tighten_files: bool = False) -> Path:
    """Create ``path`` (and missing parents) 0700, and make an existing one 0700; with
    ``tighten_files``, files in it readable by others become 0600. Only for Cachegate's own
    folders (data, spool, profiles), never a folder a user named for one file."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(path, 0o700)
    if tighten_files:
        for f in path.iterdir():
            try:
                st = f.lstat()
            except OSError:
                continue
            if stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) & 0o077:
                os.chmod(f, 0o600)
    return path


def write_private(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


@dataclass
class Creds:
    key_pem: bytes
    cert_pem: bytes
    host_ca_pem: bytes
    user_ca_pem: bytes = b""

    @property
    def cert(self):
        return cert_from_pem(self.cert_pem)

    @property
    def identity(self) -> types_pb2.Identity:
        return idmod.identity_from_cert(self.cert)

    # --- host credentials folder -------------------------------------------------
    FILES = {"key_pem": "host.key", "cert_pem": "host.crt", "host_ca_pem": "host_ca.pem", "user_ca_pem": "user_ca.pem"}

    def save_dir(self, folder: Path) -> None:
        private_dir(folder)
        for attr, name in self.FILES.items():
            write_private(folder / name, getattr(self, attr))

    @classmethod
    def load_dir(cls, folder: Path) -> "Creds | None":
        paths = {attr: folder / name for attr, name in cls.FILES.items()}
        if not all(p.exists() for p in paths.values()):
            return None
        return cls(**{attr: p.read_bytes() for attr, p in paths.items()})

    # --- identity file ---------------------------------------------------------
    def identity_file_bytes(self) -> bytes:
        return (b"# Cachegate identity file: certificate, private key, host CA. Keep it secret.\n"
                + self.cert_pem + self.key_pem + self.host_ca_pem)

    @classmethod
    def from_identity_file(cls, path: str | Path) -> "Creds":
        data = Path(path).read_bytes()
        certs, key = [], None
        for m in PEM_BLOCK.finditer(data):
            if m.group(1).endswith(b"PRIVATE KEY"):
                key = m.group(0)
            elif m.group(1) == b"CERTIFICATE":
                certs.append(m.group(0))
        if key is None or len(certs) < 2:
            raise ValueError(f"{path} is not a Cachegate identity file (certificate, key and CA expected)")
        return cls(key_pem=key, cert_pem=certs[0], host_ca_pem=b"".join(certs[1:]))

    # --- gRPC credentials ----------------------------------------------------------
    def server_credentials(self, require_client_auth: bool = True) -> grpc.ServerCredentials:
        chain = self.cert_pem + self.host_ca_pem
        if require_client_auth:
            return grpc.ssl_server_credentials(
                [(self.key_pem, chain)],
                root_certificates=self.host_ca_pem + self.user_ca_pem,
                require_client_auth=True,
            )
        return grpc.ssl_server_credentials([(self.key_pem, chain)])

    def channel_credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=self.host_ca_pem, private_key=self.key_pem, certificate_chain=self.cert_pem)


def channel_options(server_role: str, service_config: str = "",
                    extra_options: Sequence[tuple[str, object]] = ()) -> list[tuple[str, object]]:
    from services.common import keepalive

    opts: list[tuple[str, object]] = [("grpc.ssl_target_name_override", internal_name(server_role)),
                                      *keepalive.client_options()]
    if service_config:
        opts.append(("grpc.service_config", service_config))
    return opts + list(extra_options)


def secure_channel(addr: str, creds: grpc.ChannelCredentials, server_role: str, interceptors=None,
                   service_config: str = "", extra_options: Sequence[tuple[str, object]] = ()) -> grpc.aio.Channel:
    return grpc.aio.secure_channel(addr, creds, options=channel_options(server_role, service_config, extra_options),
                                   interceptors=interceptors)


def server_only_channel(addr: str, ca_pem: bytes, server_role: str, interceptors=None) -> grpc.aio.Channel:
    """A TLS channel that verifies the server but presents no certificate."""
    return secure_channel(addr, grpc.ssl_channel_credentials(root_certificates=ca_pem), server_role, interceptors)
