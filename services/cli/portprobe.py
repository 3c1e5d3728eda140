"""What listens on a port, so a user who points `cgate login` at the wrong port of the right
host is told which port it is and which to use, instead of a TLS or ALPN error.

``identify(host, port)`` opens one connection, trusts nothing and sends nothing secret: a TLS
handshake offering ALPN h2 and http/1.1, then either the HTTP/2 preface or
``GET /v1/webapi/find``. It tells apart the ports of a Cachegate cluster:

============  =========================================  ==============================
kind          what answers                               default ports
============  =========================================  ==============================
grpc          gRPC over server TLS                       3080 (proxy login), 3026 (join)
grpc-mtls     gRPC that wants a client certificate       3025 (auth), 3082, 3027
https         HTTPS                                      3443 (the proxy's web port)
resp          a RESP reply (an error) over TLS           3081 (RESP, database certs)
tls-mtls      TLS, no h2, wants a client certificate     (a Redis that checks client certs)
tls           TLS that answers neither                   (not Cachegate)
plain         not TLS at all                             3090 (health), other programs
============  =========================================  ==============================

The classification of what came back is :func:`classify` (no sockets), the probe a few
lines around it.
"""

from __future__ import annotations

import json
import socket
import ssl
from dataclasses import dataclass, field

from services.common.config import (
    DEFAULT_API_PORT, DEFAULT_AUTH_PORT, DEFAULT_DISCOVERY_PORT, DEFAULT_JOIN_PORT, DEFAULT_PROXY_PORT,
    DEFAULT_REDIS_PORT, DEFAULT_WEB_PORT, join_hostport,
)

H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"  # + empty SETTINGS


@dataclass
class PortInfo:
    kind: str
    alpn: str | None = None
    find: dict = field(default_factory=dict)  # the web port's /v1/webapi/find, when it answered


def _cert_required(exc: BaseException) -> bool:
    text = str(exc).upper()
    return "CERTIFICATE_REQUIRED" in text or "CERTIFICATE REQUIRED" in text or "HANDSHAKE_FAILURE" in text \
        or isinstance(exc, (ConnectionResetError, BrokenPipeError))


def classify(alpn: str | None, reply: bytes, error: BaseException | None) -> str:
    """The kind of a TLS port from the ALPN it chose and what it sent (or the error) after
    the first request."""
    if error is not None and _cert_required(error):
        return "grpc-mtls" if alpn == "h2" else "tls-mtls"
    if alpn == "h2":
        # A server's HTTP/2 connection starts with its SETTINGS frame (type 4).
        return "grpc" if len(reply) >= 9 and reply[3] == 4 else ("grpc-mtls" if not reply else "tls")
    if reply.startswith(b"HTTP/"):
        return "https"
    if reply[:1] in (b"-", b"+"):
        return "resp"  # a RESP error: the proxy's Redis port says a client certificate is required
    return "tls"


def _complete(out: bytes) -> bool:
    """Whether a reply read so far is whole: a RESP line, or HTTP headers and the body they announce."""
    if out[:1] in (b"-", b"+"):
        return b"\r\n" in out
    head, sep, body = out.partition(b"\r\n\r\n")
    if not sep:
        return False
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            try:
                return len(body) >= int(line.split(b":", 1)[1])
            except ValueError:
                return True
    return False  # no length: read to the end (Connection: close)


def _read(tls: ssl.SSLSocket, limit: int = 65536) -> bytes:
    out = b""
    while len(out) < limit and not _complete(out):
        chunk = tls.recv(limit - len(out))
        if not chunk:
            break
        out += chunk
    return out


def identify(host: str, port: int, timeout: float = 5.0) -> PortInfo | None:
    """What listens at host:port; None when nothing accepts a connection there."""
    try:
        raw = socket.create_connection((host, port), timeout=timeout)
    except OSError:
        return None
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.set_alpn_protocols(["h2", "http/1.1"])
    with raw:
        try:
            tls = ctx.wrap_socket(raw, server_hostname=None)
        except ssl.SSLError as exc:
            return PortInfo("tls-mtls" if _cert_required(exc) else "plain")
        except OSError:
            return PortInfo("plain")
        with tls:
            alpn = tls.selected_alpn_protocol()
            reply, error = b"", None
            try:
                if alpn == "h2":
                    tls.sendall(H2_PREFACE)
                    reply = tls.recv(9)
                else:
                    tls.sendall(f"GET /v1/webapi/find HTTP/1.1\r\nHost: {join_hostport(host, port)}\r\n"
                                "Connection: close\r\n\r\n".encode())
                    reply = _read(tls)
            except (ssl.SSLError, OSError) as exc:
                error = exc
            info = PortInfo(classify(alpn, reply, error), alpn)
            if info.kind == "https":
                body = reply.partition(b"\r\n\r\n")[2]
                try:
                    info.find = json.loads(body) if body.strip().startswith(b"{") else {}
                except ValueError:
                    pass
            return info


def login_port_hint(host: str, port: int, info: PortInfo) -> str | None:
    """The one-line error for `cgate login --proxy=host:port` when that is not the proxy's
    login port, or None when it may be."""
    here = join_hostport(host, port)
    use = join_hostport(host, DEFAULT_PROXY_PORT)
    if info.kind == "https":
        public = str((info.find.get("proxy") or {}).get("public_addr") or "")
        if public and not public.startswith(("0.0.0.0:", "[::]:")):
            use = public
        return (f"{here} is the proxy's HTTPS web port (default {DEFAULT_WEB_PORT}), not its login port; "
                f"use --proxy={use}")
    if info.kind in ("resp", "tls-mtls"):
        return (f"{here} is a Redis port (the proxy's is {DEFAULT_REDIS_PORT} by default, for `cgate db connect` "
                f"after login), not the proxy's login port; use --proxy={use}")
    if info.kind == "grpc-mtls":
        return (f"{here} is not the proxy's login port: it is a Cachegate service port that takes host "
                f"certificates (auth {DEFAULT_AUTH_PORT}, dbproxy API {DEFAULT_API_PORT}, discovery "
                f"{DEFAULT_DISCOVERY_PORT} by default); use --proxy={use}")
    if info.kind == "plain":
        return f"{here} does not speak TLS, so it is not the proxy's login port; use --proxy={use}"
    if info.kind == "tls":
        return f"{here} answers TLS but not as a Cachegate proxy; use the proxy's login port, e.g. --proxy={use}"
    return None


def grpc_port_hint(host: str, port: int, service: str = "") -> str:
    """For a server-TLS gRPC port that is not the proxy's: ``service`` is the role in its
    certificate when it has one (auth's join port is the one users hit)."""
    here, use = join_hostport(host, port), join_hostport(host, DEFAULT_PROXY_PORT)
    if service == "auth":
        what = f"is auth's join port (default {DEFAULT_JOIN_PORT})"
    elif service:
        what = f"is a port of {service}"
    else:
        what = "serves gRPC but not the proxy's API, so it"
        return f"{here} {what} is not the proxy's login port; use --proxy={use}"
    return f"{here} {what}, not the proxy's login port; use --proxy={use}"


def cert_service(cert) -> str:
    """The service role a host certificate names ("auth", "dbproxy", ...), or ""."""
    from cachegate.types.v1 import types_pb2

    from services.common.identity import identity_from_cert, role_name

    try:
        ident = identity_from_cert(cert)
    except ValueError:
        return ""
    return role_name(ident.service_role) if ident.kind == types_pb2.IDENTITY_KIND_HOST else ""


def auth_port_hint(host: str, port: int) -> str | None:
    """For `cgctl --auth-server=host:port` that failed: which port that is, when it is another
    of the cluster's, and the flag to use; None when it may well be auth's mesh port."""
    info = identify(host, port)
    if info is None:
        return None
    here, use = join_hostport(host, port), f"--auth-server={join_hostport(host, DEFAULT_AUTH_PORT)}"
    if info.kind == "https":
        what = f"the proxy's HTTPS web port (default {DEFAULT_WEB_PORT})"
    elif info.kind in ("resp", "tls-mtls"):
        what = f"a Redis port (the proxy's is {DEFAULT_REDIS_PORT} by default)"
    elif info.kind == "plain":
        what = "a port that does not speak TLS"
    elif info.kind in ("grpc", "grpc-mtls"):
        from services.common.pki import fetch_unverified_chain

        try:
            chain = fetch_unverified_chain(host, port, timeout=5)
        except OSError:
            return None
        service = cert_service(chain[0]) if chain else ""
        if service == "auth" and info.kind == "grpc":
            what = f"auth's join port (default {DEFAULT_JOIN_PORT})"
        elif service == "dbproxy":
            what = (f"the proxy's login port (default {DEFAULT_PROXY_PORT})" if info.kind == "grpc"
                    else f"dbproxy's API port (default {DEFAULT_API_PORT})")
        elif service == "discovery":
            what = f"discovery's port (default {DEFAULT_DISCOVERY_PORT})"
        else:
            return None
    else:
        return None
    return f"{here} is {what}, not auth's mesh port; use {use}"
