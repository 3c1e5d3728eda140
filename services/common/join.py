"""Joining the cluster: a new service host proves a join token, gets a host certificate.

Before anything is sent, the auth server's certificate chain is checked against
the CA pin the operator got with the token, so a token never reaches a server
that is not the cluster's auth server.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import socket
from pathlib import Path

import grpc

from cachegate.auth.v1 import cluster_service_pb2, cluster_service_pb2_grpc
from cachegate.types.v1 import types_pb2
from services.common import identity as idmod
from services.common import endpoints
from services.common.config import DEFAULT_JOIN_PORT, ConfigError, join_hostport, split_hostport
from services.common.creds import Creds, private_dir, server_only_channel
from services.common.pki import (
    CertAuthority, cert_to_pem, fetch_unverified_chain, key_to_pem, make_csr, new_key, normalize_pin, spki_pin,
)

log = logging.getLogger("cachegate.join")


class JoinError(Exception):
    """Joining failed; the message is one line that says what to do."""


class JoinUnreachable(JoinError):
    """This join address did not answer (the next one, if any, is tried)."""


def read_token(value: str) -> str:
    """A token given as the value itself or as a path to a file holding it."""
    value = (value or "").strip()
    if not value:
        return ""
    p = Path(value)
    try:
        if p.is_file():
            return p.read_text().strip()
    except OSError:
        pass
    if "/" in value:
        raise JoinError(f"join token file {value} does not exist: write the token printed by `cgctl tokens add` there")
    return value


def read_pin(value: str) -> str:
    """A CA pin given as ``sha256:<hex>`` or as the path of a file that holds it (a mounted
    Secret, a file a one-shot join step wrote)."""
    value = (value or "").strip()
    if value.startswith("/") or value.startswith("./"):
        try:
            return Path(value).read_text().strip()
        except OSError as exc:
            raise JoinError(f"cannot read the CA pin file {value}: {exc.strerror}; write the pin printed by "
                            "`cgctl tokens add` there") from None
    return value


def verify_pin(join_addr: str, ca_pin: str) -> bytes:
    """Return the host CA (PEM) that the server at ``join_addr`` chains to, if it matches the pin."""
    host, port = split_hostport(join_addr, 3026)
    try:
        chain = fetch_unverified_chain(host, port)
    except (OSError, socket.timeout) as exc:
        raise JoinUnreachable(f"cannot reach the auth join port at {join_addr}: {exc}; check the address and run "
                              f"`nc -zv {host} {port}`") from None
    if not chain:
        raise JoinError(f"the server at {join_addr} presented no certificate")
    want = normalize_pin(ca_pin)
    leaf = chain[0]
    for cert in chain[1:] + chain[:1]:
        if spki_pin(cert) == want:
            if cert is not leaf and not CertAuthority(cert, None).issued(leaf):  # type: ignore[arg-type]
                break
            return cert_to_pem(cert)
    got = ", ".join(spki_pin(c) for c in chain[1:]) or "none"
    raise JoinError(
        f"the auth server at {join_addr} does not match the CA pin {want} (it presented {got}): "
        "check --ca-pin against `cgctl status` and the address you joined")


async def join(join_addr: str | list[str], token: str, ca_pin: str, role: int, addresses: list[str],
               timeout: float = 15.0) -> Creds:
    """Join through the first auth join port that answers: ``join_addr`` is one address or
    several (a list, commas, or a name with several addresses), tried in turn. A refusal
    (bad token, wrong pin) is final; an address that cannot be reached moves on to the next."""
    if not token:
        raise JoinError("this host has not joined the cluster yet: pass --token (from `cgctl tokens add`) and --ca-pin")
    if not ca_pin:
        raise JoinError("no CA pin: pass --ca-pin (printed by `cgctl tokens add`) so the auth server can be verified")
    try:
        targets = [join_hostport(h, p) for h, p in endpoints.expand(join_addr, DEFAULT_JOIN_PORT)]
    except ConfigError as exc:
        raise JoinError(str(exc)) from None
    unreachable: list[str] = []
    for i, addr in enumerate(targets):
        last = i == len(targets) - 1
        try:
            return await _join_one(addr, token, ca_pin, role, addresses, timeout)
        except JoinUnreachable as exc:
            unreachable.append(str(exc))
            if not last:
                log.warning("auth join port did not answer; trying the next one",
                            extra={"addr": addr, "error": str(exc), "next": targets[i + 1]})
    if len(unreachable) == 1:
        raise JoinError(unreachable[0])
    raise JoinError(f"no auth join port answered ({', '.join(targets)}): {unreachable[-1]}")


async def _join_one(join_addr: str, token: str, ca_pin: str, role: int, addresses: list[str],
                    timeout: float) -> Creds:
    ca_pem = await asyncio.to_thread(verify_pin, join_addr, ca_pin)
    key = new_key()
    csr = make_csr(key, idmod.role_name(role))
    req = cluster_service_pb2.JoinServiceRequest(token=token, role=role, csr_pem=csr.decode(), addresses=addresses)
    async with server_only_channel(join_addr, ca_pem, "auth") as ch:
        stub = cluster_service_pb2_grpc.ClusterServiceStub(ch)
        try:
            resp = await stub.JoinService(req, timeout=timeout)
        except grpc.aio.AioRpcError as exc:
            if exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                raise JoinUnreachable(f"the auth join port at {join_addr} did not answer: {exc.details()}") from None
            raise JoinError(f"joining the cluster failed: {exc.details()}") from None
    creds = Creds(key_pem=key_to_pem(key), cert_pem=resp.cert_pem.encode(),
                  host_ca_pem=resp.host_ca_pem.encode(), user_ca_pem=resp.user_ca_pem.encode())
    log.info("joined the cluster", extra={"host_id": resp.host_id, "role": idmod.role_name(role),
                                          "cluster": resp.cluster_name, "auth": join_addr})
    return creds


async def ensure_joined(folder: Path, join_addr: str | list[str], token_value: str, ca_pin: str, role: int,
                        addresses: list[str]) -> Creds:
    """Use the saved host credentials, or join with the token and save them."""
    private_dir(folder, tighten_files=True)  # host key and certificate: the owner's only
    creds = Creds.load_dir(folder)
    if creds is not None:
        cert = creds.cert
        if cert.not_valid_after_utc > dt.datetime.now(dt.timezone.utc) + dt.timedelta(minutes=5):
            ident = creds.identity
            if ident.service_role == role:
                return creds
            log.warning("saved host certificate is for another role; joining again")
        else:
            log.warning("saved host certificate has expired; joining again with the token")
    try:
        token = read_token(token_value)
    except JoinError:
        raise
    creds = await join(join_addr, token, read_pin(ca_pin), role, addresses)
    creds.save_dir(folder)
    return creds


def local_addresses(*extra: str) -> list[str]:
    out = ["localhost", "127.0.0.1", "::1", socket.gethostname()]
    for e in extra:
        if not e:
            continue
        try:
            host, _ = split_hostport(e, 0)
        except ConfigError:
            host = e
        if host and host not in ("0.0.0.0", "::"):
            out.append(host)
    seen, uniq = set(), []
    for a in out:
        if a not in seen:
            seen.add(a)
            uniq.append(a)
    return uniq


ROLE = types_pb2.ServiceRole
