"""The one grpc.aio server runtime every Cachegate service uses.

- TLS always: mutual TLS (client certificate required, verified against the
  cluster CAs) on mesh ports; server-only TLS on the few public ports.
- grpc.health.v1 and server reflection on every server.
- The authorization interceptor (identity from the verified certificate only,
  per-RPC policy), OpenTelemetry when enabled, and an access log.
- Graceful stop: health goes NOT_SERVING, in-flight calls drain, then stop.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from dataclasses import dataclass
from typing import Callable

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from services.common import keepalive
from services.common.authz import AuthzInterceptor, CertVerifier, Policy, default_admin_check

log = logging.getLogger("cachegate.grpc")

MAX_MESSAGE = 16 * 1024 * 1024


@dataclass
class ServiceBinding:
    """A servicer and the generated function that adds it to a server."""

    add_to_server: Callable
    servicer: object
    descriptor: object  # the ServiceDescriptor (from *_pb2.DESCRIPTOR.services_by_name)


class AccessLogInterceptor(grpc.aio.ServerInterceptor):
    async def intercept_service(self, continuation, details):
        log.debug("rpc", extra={"method": details.method})
        return await continuation(details)


class GrpcServer:
    def __init__(self, name: str, bindings: list[ServiceBinding], policy: Policy,
                 server_credentials: grpc.ServerCredentials, verifier: Callable[[], CertVerifier],
                 admin_check=default_admin_check, extra_interceptors: list | None = None):
        self.name = name
        self.bindings = bindings
        self.health = health.aio.HealthServicer()
        interceptors = list(extra_interceptors or []) + [
            AccessLogInterceptor(), AuthzInterceptor(policy, verifier, admin_check)]
        self.server = grpc.aio.server(
            interceptors=interceptors,
            options=[
                ("grpc.max_receive_message_length", MAX_MESSAGE),
                ("grpc.max_send_message_length", MAX_MESSAGE),
                ("grpc.so_reuseport", 0),
                *keepalive.server_options(),
            ],
        )
        self.credentials = server_credentials
        names = [health.SERVICE_NAME, reflection.SERVICE_NAME]
        for b in bindings:
            b.add_to_server(b.servicer, self.server)
            names.append(b.descriptor.full_name)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(names, self.server)
        self.port = 0

    async def start(self, addr: str) -> int:
        self.port = self.server.add_secure_port(addr, self.credentials)
        if not self.port:
            raise OSError(f"{self.name}: cannot listen on {addr} (address in use or not local?)")
        await self.server.start()
        await self.health.set("", health_pb2.HealthCheckResponse.SERVING)
        for b in self.bindings:
            await self.health.set(b.descriptor.full_name, health_pb2.HealthCheckResponse.SERVING)
        log.info("listening", extra={"server": self.name, "addr": addr, "port": self.port})
        return self.port

    async def stop(self, grace: float = 5.0) -> None:
        await self.health.enter_graceful_shutdown()
        t0 = time.monotonic()
        await self.server.stop(grace)
        log.info("stopped", extra={"server": self.name, "seconds": round(time.monotonic() - t0, 3)})


def bind_host(addr: str, port: int) -> str:
    """Replace the port of ``addr`` (used when a server was bound to port 0)."""
    host = addr.rsplit(":", 1)[0]
    return f"{host}:{port}"


def install_signal_handlers(stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):
            pass
