"""A plaintext grpc.health.v1 port for probes that cannot present a client certificate.

Kubelet gRPC probes, `docker compose` healthchecks and load balancers call
``grpc.health.v1.Health/Check`` here without TLS. It serves nothing but health: no
reflection, no Cachegate API. The status of ``""`` is SERVING once every service of the
process is ready, and NOT_SERVING from the moment the process starts to stop; each
service name (``auth``, ``discovery``, ``dbproxy``) has its own status too.

Bind it where only probes reach it (the pod's own port, not a Service; 127.0.0.1 on a
host): it says whether the process is up, nothing more.
"""

from __future__ import annotations

import logging

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

log = logging.getLogger("cachegate.health")

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class HealthPort:
    def __init__(self, services: list[str]):
        self.services = list(services)
        self.ready: set[str] = set()
        self.health = health.aio.HealthServicer()
        self.server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self.port = 0

    async def start(self, addr: str) -> int:
        self.port = self.server.add_insecure_port(addr)
        if not self.port:
            raise OSError(f"health: cannot listen on {addr} (address in use or not local?)")
        await self.health.set("", NOT_SERVING)
        for name in self.services:
            await self.health.set(name, NOT_SERVING)
        await self.server.start()
        log.info("listening", extra={"server": "health", "addr": addr, "port": self.port})
        return self.port

    async def service_ready(self, name: str) -> None:
        self.ready.add(name)
        await self.health.set(name, SERVING)
        if self.ready >= set(self.services):
            await self.health.set("", SERVING)

    async def stopping(self) -> None:
        await self.health.enter_graceful_shutdown()

    async def stop(self) -> None:
        await self.health.enter_graceful_shutdown()
        await self.server.stop(0.5)


async def check(addr: str, service: str = "", timeout: float = 5.0) -> str:
    """The status name (SERVING, NOT_SERVING, ...) that the health port at ``addr`` reports."""
    async with grpc.aio.insecure_channel(addr) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        resp = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)
