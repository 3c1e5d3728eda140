"""Client and server keepalive settings agree with gRPC's rules: no GOAWAY too_many_pings on
quiet watch streams."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest

from services.common import keepalive
from services.common.creds import channel_options


def test_our_client_and_server_options_agree():
    client = dict(keepalive.client_options())
    server = dict(keepalive.server_options())
    assert keepalive.disagreements(keepalive.client_options(), keepalive.server_options()) == []
    # gRPC's rules, spelled out.
    assert client["grpc.keepalive_time_ms"] >= server["grpc.http2.min_ping_interval_without_data_ms"]
    assert client["grpc.keepalive_permit_without_calls"] <= server["grpc.keepalive_permit_without_calls"]
    assert client["grpc.keepalive_timeout_ms"] < client["grpc.keepalive_time_ms"]
    # The channels every service and CLI uses carry them.
    assert set(keepalive.client_options()) <= set(channel_options("auth"))


def test_the_old_settings_are_caught():
    old_client = [("grpc.keepalive_time_ms", 30_000), ("grpc.keepalive_timeout_ms", 10_000)]
    problems = keepalive.disagreements(old_client, [])  # a server with gRPC's defaults
    assert problems and "min ping interval" in problems[0]
    idle = keepalive.client_options()
    assert any("permit" in p for p in keepalive.disagreements(
        idle, [("grpc.http2.min_ping_interval_without_data_ms", 10_000)]))


def _handler():
    async def quiet(request, context):
        await asyncio.sleep(4)  # a watch stream with nothing to say
        yield b"done"

    return grpc.method_handlers_generic_handler("t.T", {
        "Watch": grpc.unary_stream_rpc_method_handler(quiet, lambda b: b, lambda b: b)})


async def _watch(server_opts, ping_ms: int) -> tuple[list, str]:
    server = grpc.aio.server(options=server_opts)
    server.add_generic_rpc_handlers((_handler(),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}",
                                             options=keepalive.client_options(ping_ms, ping_ms // 2)) as ch:
            call = ch.unary_stream("/t.T/Watch", request_serializer=lambda b: b, response_deserializer=lambda b: b)(b"")
            try:
                return [m async for m in call], ""
            except grpc.aio.AioRpcError as exc:
                return [], exc.details() or ""
    finally:
        await server.stop(0)


def test_quiet_stream_is_not_called_too_many_pings():
    # Scaled down (times / 30): our ratio of client ping time to server min interval.
    ratio = keepalive.CLIENT_KEEPALIVE_TIME_MS / keepalive.SERVER_MIN_PING_INTERVAL_MS
    ping_ms = 600
    t0 = time.monotonic()
    msgs, err = asyncio.run(_watch(keepalive.server_options(int(ping_ms / ratio), 2_000, 1_000), ping_ms))
    assert (msgs, err) == ([b"done"], "")
    assert time.monotonic() - t0 < 10
