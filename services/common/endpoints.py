"""Several auth addresses: how a service reaches any of a set of auth processes.

``auth_server`` and ``join_server`` take one ``host:port``, several (a YAML list, or one
string with commas), or one DNS name that resolves to several addresses. For gRPC
channels the set becomes one target that gRPC balances with ``round_robin``: every call
goes to the next connected auth process, a dead one is skipped at once (its subchannel
leaves the READY set when its connection drops) and taken back when it answers again
(gRPC reconnects with backoff: 1 s at first, then at most every 5 s). For joining, each
address (each resolved address of a name) is tried in turn.

This module is pure (no I/O) except :func:`resolve`, which asks the system resolver.
"""

from __future__ import annotations

import ipaddress
import json
import socket
from typing import Iterable

from services.common.config import ConfigError, join_hostport, parse_addresses, split_hostport

# Auth methods a client may send again when the auth process it reached went away mid-call
# (UNAVAILABLE): reads, watches (before their first message), and writes whose repetition
# changes nothing. Creating users or tokens and redeeming invites are left out: a repeat
# could act twice or fail with "already exists" after the first one worked.
RETRYABLE_AUTH_METHODS = {
    "cachegate.auth.v1.ClusterService": ["GetClusterInfo", "AcquireLease", "ReleaseLease", "ListLeases"],
    "cachegate.auth.v1.UserService": ["GetUser", "ListUsers", "Login", "GenerateDatabaseCert", "WatchUsers"],
    "cachegate.auth.v1.RoleService": ["GetRole", "ListRoles", "WatchRoles", "UpsertRole"],
    "cachegate.auth.v1.LockService": ["ListLocks", "WatchLocks"],
    "cachegate.auth.v1.DatabaseService": ["GetDatabase", "ListDatabases", "WatchDatabases", "UpsertDatabase",
                                          "ReportFetcherStatus", "ListFetcherStatuses"],
    "cachegate.auth.v1.AuditService": ["EmitAuditEvents", "SearchAuditEvents"],
    "cachegate.auth.v1.TokenService": ["ListTokens"],
}


# An auth process that comes back gets calls again within 5 s of answering: gRPC's reconnect
# backoff starts at 1 s and would grow to 120 s; a handful of auth addresses can afford a try
# every 5 s.
RECONNECT_OPTIONS = [("grpc.initial_reconnect_backoff_ms", 1000), ("grpc.max_reconnect_backoff_ms", 5000)]


def _ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def resolve(host: str, port: int) -> list[str]:
    """The addresses ``host`` resolves to, IPv4 first, without repeats."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise ConfigError(f"cannot resolve the auth address {host!r}: {exc.strerror}; check the name and DNS") from None
    seen: list[str] = []
    for fam in (socket.AF_INET, socket.AF_INET6):
        for f, _, _, _, sa in infos:
            if f == fam and sa[0] not in seen:
                seen.append(sa[0])
    return seen


def grpc_target(addrs: str | Iterable[str], default_port: int, resolver=resolve) -> str:
    """One gRPC target for a set of auth addresses.

    - one IP address: ``ip:port``; one name: ``dns:///name:port`` (gRPC resolves it, uses
      every address it has and resolves again when connections fail);
    - several: ``ipv4:a:p,b:p`` (or ``ipv6:``), names resolved here, once. IPv4 and IPv6
      addresses cannot share one target, so a mixed list keeps the IPv4 ones."""
    hp = parse_addresses(addrs, default_port)
    if len(hp) == 1:
        host, port = split_hostport(hp[0], default_port)
        return hp[0] if _ip(host) else f"dns:///{hp[0]}"
    v4: list[str] = []
    v6: list[str] = []
    for a in hp:
        host, port = split_hostport(a, default_port)
        ips = [host] if _ip(host) else resolver(host, port)
        for ip in ips:
            (v4 if _ip(ip).version == 4 else v6).append(join_hostport(ip, port))  # type: ignore[union-attr]
    if v4:
        return "ipv4:" + ",".join(dict.fromkeys(v4))
    return "ipv6:" + ",".join(dict.fromkeys(v6))


def expand(addrs: str | Iterable[str], default_port: int, resolver=resolve) -> list[tuple[str, int]]:
    """Every (ip or host, port) to try, in order: each listed address, a name as each of its
    addresses (a name that does not resolve is kept, so that its error names it)."""
    out: list[tuple[str, int]] = []
    for a in parse_addresses(addrs, default_port, "join_server"):
        host, port = split_hostport(a, default_port)
        if _ip(host):
            ips = [host]
        else:
            try:
                ips = resolver(host, port) or [host]
            except ConfigError:
                ips = [host]
        for ip in ips:
            if (ip, port) not in out:
                out.append((ip, port))
    return out


def service_config(retry_methods: dict[str, list[str]] | None = None) -> str:
    """gRPC service config: round_robin over the target's addresses and, for
    ``retry_methods``, up to 4 attempts on UNAVAILABLE (another auth process takes it)."""
    cfg: dict = {"loadBalancingConfig": [{"round_robin": {}}]}
    if retry_methods:
        cfg["methodConfig"] = [{
            "name": [{"service": s, "method": m} for s, ms in sorted(retry_methods.items()) for m in ms],
            "retryPolicy": {"maxAttempts": 4, "initialBackoff": "0.1s", "maxBackoff": "1s",
                            "backoffMultiplier": 2, "retryableStatusCodes": ["UNAVAILABLE"]},
        }]
    return json.dumps(cfg, separators=(",", ":"))
