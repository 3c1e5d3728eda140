"""gRPC keepalive: the one place client and server settings are chosen, so that they agree.

gRPC's rules (doc/keepalive.md): a server counts a ping that arrives sooner than
``grpc.http2.min_ping_interval_without_data_ms`` after the previous one, while it has sent
no data, as a strike; after ``grpc.http2.max_ping_strikes`` strikes it sends GOAWAY
ENHANCE_YOUR_CALM "too_many_pings". With no call open, a server that does not permit pings
without calls counts every ping (interval 2 h). Quiet watch streams are exactly "no data",
so clients may ping at most as often as the server allows, with room for timer jitter.

Clients ping every 30 s (10 s to answer) so a dead auth or proxy is noticed within a minute,
also on an idle channel; servers accept a ping every 10 s, calls open or not, and ping
their clients every 60 s to drop dead watchers.
"""

from __future__ import annotations

CLIENT_KEEPALIVE_TIME_MS = 30_000
CLIENT_KEEPALIVE_TIMEOUT_MS = 10_000
SERVER_MIN_PING_INTERVAL_MS = 10_000
SERVER_KEEPALIVE_TIME_MS = 60_000
SERVER_KEEPALIVE_TIMEOUT_MS = 20_000
MAX_PING_STRIKES = 2
# gRPC's server default when no call is open and pings without calls are not permitted.
_IDLE_INTERVAL_NOT_PERMITTED_MS = 2 * 3600 * 1000
_DEFAULT_MIN_RECV_MS = 5 * 60 * 1000


def client_options(time_ms: int = CLIENT_KEEPALIVE_TIME_MS,
                   timeout_ms: int = CLIENT_KEEPALIVE_TIMEOUT_MS) -> list[tuple[str, int]]:
    return [
        ("grpc.keepalive_time_ms", time_ms),
        ("grpc.keepalive_timeout_ms", timeout_ms),
        ("grpc.keepalive_permit_without_calls", 1),
        # Keep pinging on a quiet stream (the default stops after 2 pings without data).
        ("grpc.http2.max_pings_without_data", 0),
    ]


def server_options(min_ping_interval_ms: int = SERVER_MIN_PING_INTERVAL_MS,
                   time_ms: int = SERVER_KEEPALIVE_TIME_MS,
                   timeout_ms: int = SERVER_KEEPALIVE_TIMEOUT_MS) -> list[tuple[str, int]]:
    return [
        # GRPC_ARG_HTTP2_MIN_RECV_PING_INTERVAL_WITHOUT_DATA_MS
        ("grpc.http2.min_ping_interval_without_data_ms", min_ping_interval_ms),
        ("grpc.http2.max_ping_strikes", MAX_PING_STRIKES),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.keepalive_time_ms", time_ms),
        ("grpc.keepalive_timeout_ms", timeout_ms),
        ("grpc.http2.max_pings_without_data", 0),
    ]


def disagreements(client: list[tuple[str, int]], server: list[tuple[str, int]]) -> list[str]:
    """Why a client with these options would earn too_many_pings from a server with these
    (empty when they agree)."""
    c, s = dict(client), dict(server)
    out = []
    ping_ms = c.get("grpc.keepalive_time_ms")
    if ping_ms is None:
        return out  # the client sends no keepalive pings
    min_recv = s.get("grpc.http2.min_ping_interval_without_data_ms", _DEFAULT_MIN_RECV_MS)
    if ping_ms < min_recv:
        out.append(f"client keepalive_time {ping_ms} ms is shorter than the server's min ping interval "
                   f"{min_recv} ms")
    elif ping_ms < 2 * min_recv:
        out.append(f"client keepalive_time {ping_ms} ms leaves no room for timer jitter above the server's "
                   f"min ping interval {min_recv} ms (use at least twice)")
    if c.get("grpc.keepalive_permit_without_calls", 0) and not s.get("grpc.keepalive_permit_without_calls", 0):
        if ping_ms < _IDLE_INTERVAL_NOT_PERMITTED_MS:
            out.append("client pings without calls but the server does not permit it "
                       "(grpc.keepalive_permit_without_calls)")
    if c.get("grpc.keepalive_timeout_ms", 20_000) >= ping_ms:
        out.append("client keepalive_timeout must be shorter than keepalive_time")
    if s.get("grpc.keepalive_timeout_ms", 20_000) >= s.get("grpc.keepalive_time_ms", 7_200_000):
        out.append("server keepalive_timeout must be shorter than keepalive_time")
    return out
