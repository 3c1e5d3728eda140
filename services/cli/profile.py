"""The user's login profile: private key, session certificate, cluster CAs, proxy.

One folder per proxy under ``$CACHEGATE_HOME/profiles/`` (0700, files 0600);
``$CACHEGATE_HOME/current-profile`` names the one in use. The private key is
made here and never leaves this machine: the proxy gets a CSR.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import grpc
from cryptography import x509

from services.cli.common import CLIError, cachegate_home, fmt_time
from services.common import identity as idmod
from services.common.config import DEFAULT_PROXY_PORT, join_hostport, split_hostport
from services.common.creds import private_dir, secure_channel, server_only_channel, write_private
from services.common.pki import cert_from_pem


def normalize_proxy(addr: str) -> str:
    addr = (addr or "").strip()
    for scheme in ("https://", "http://"):
        if addr.startswith(scheme):
            addr = addr[len(scheme):]
    addr = addr.rstrip("/")
    if not addr:
        raise CLIError("no proxy: pass --proxy=HOST:PORT (the dbproxy public address, port 3080 by default)")
    try:
        host, port = split_hostport(addr, DEFAULT_PROXY_PORT)
    except ValueError as exc:
        raise CLIError(f"--proxy: {exc}") from None
    return join_hostport(host, port)


def profiles_dir() -> Path:
    return cachegate_home() / "profiles"


def _folder_name(proxy: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", proxy)


@dataclass
class Profile:
    folder: Path
    meta: dict

    # --- files ------------------------------------------------------------------
    @property
    def proxy(self) -> str:
        return self.meta["proxy"]

    @property
    def host_ca_pem(self) -> bytes:
        return (self.folder / "cas.pem").read_bytes()

    @property
    def user_ca_pem(self) -> bytes:
        p = self.folder / "user_ca.pem"
        return p.read_bytes() if p.exists() else b""

    @property
    def key_pem(self) -> bytes:
        return (self.folder / "key.pem").read_bytes()

    @property
    def cert_pem(self) -> bytes | None:
        p = self.folder / "cert.pem"
        return p.read_bytes() if p.exists() else None

    @property
    def cert(self) -> x509.Certificate | None:
        pem = self.cert_pem
        return cert_from_pem(pem) if pem else None

    @property
    def identity(self) -> idmod.Identity | None:
        cert = self.cert
        return idmod.identity_from_cert(cert) if cert is not None else None

    @property
    def expires(self) -> dt.datetime | None:
        cert = self.cert
        return cert.not_valid_after_utc if cert is not None else None

    def expired(self) -> bool:
        exp = self.expires
        return exp is None or exp <= dt.datetime.now(dt.timezone.utc)

    def login_hint(self) -> str:
        user = self.meta.get("user")
        return f"cgate login --proxy={self.proxy}" + (f" --user={user}" if user else "")

    def require_session(self) -> "Profile":
        if self.cert is None:
            raise CLIError(f"not logged in to {self.proxy}: run `{self.login_hint()}`")
        if self.expired():
            raise CLIError(f"your session on {self.proxy} expired at {fmt_time(self.expires)}: "
                           f"log in again with `{self.login_hint()}`")
        return self

    # --- writing -----------------------------------------------------------------
    def save_meta(self) -> None:
        write_private(self.folder / "profile.json", json.dumps(self.meta, indent=2).encode())

    def save_session(self, key_pem: bytes, cert_pem: bytes, user_ca_pem: bytes) -> None:
        write_private(self.folder / "key.pem", key_pem)
        write_private(self.folder / "cert.pem", cert_pem)
        if user_ca_pem:
            write_private(self.folder / "user_ca.pem", user_ca_pem)
        self.save_meta()

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)
        cur = current_file()
        if cur.exists() and cur.read_text().strip() == self.folder.name:
            cur.unlink()

    # --- channels -----------------------------------------------------------------
    def public_channel(self, interceptors=None) -> grpc.aio.Channel:
        """Server-verified TLS to the proxy's public port (login, cluster info)."""
        return server_only_channel(self.proxy, self.host_ca_pem, "dbproxy", interceptors)

    def api_channel(self) -> grpc.aio.Channel:
        """Mutual TLS to the proxy's API port with the session certificate."""
        self.require_session()
        addr = self.meta.get("api_addr") or self.proxy
        creds = grpc.ssl_channel_credentials(root_certificates=self.host_ca_pem, private_key=self.key_pem,
                                             certificate_chain=self.cert_pem)
        return secure_channel(addr, creds, "dbproxy")


def current_file() -> Path:
    return cachegate_home() / "current-profile"


def open_profile(proxy: str, create: bool = False) -> Profile | None:
    folder = profiles_dir() / _folder_name(proxy)
    meta_file = folder / "profile.json"
    if meta_file.exists():
        return Profile(folder, json.loads(meta_file.read_text()))
    if not create:
        return None
    private_dir(cachegate_home())
    private_dir(profiles_dir())
    private_dir(folder)
    return Profile(folder, {"proxy": proxy})


def set_current(profile: Profile) -> None:
    write_private(current_file(), profile.folder.name.encode())


def current_profile(proxy: str | None = None) -> Profile:
    """The profile for --proxy (or CACHEGATE_PROXY), else the current one."""
    proxy = proxy or os.environ.get("CACHEGATE_PROXY")
    if proxy:
        prof = open_profile(normalize_proxy(proxy))
        if prof is None:
            raise CLIError(f"not logged in to {normalize_proxy(proxy)}: run `cgate login --proxy={proxy}`")
        return prof
    cur = current_file()
    if cur.exists():
        folder = profiles_dir() / cur.read_text().strip()
        if (folder / "profile.json").exists():
            return Profile(folder, json.loads((folder / "profile.json").read_text()))
    raise CLIError("not logged in: run `cgate login --proxy=HOST:PORT --user=NAME`")


def all_profiles() -> list[Profile]:
    root = profiles_dir()
    if not root.exists():
        return []
    return [Profile(f, json.loads((f / "profile.json").read_text()))
            for f in sorted(root.iterdir()) if (f / "profile.json").exists()]

