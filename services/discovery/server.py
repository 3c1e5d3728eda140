"""The discovery service process: joins the cluster, serves its status API."""

from __future__ import annotations

import asyncio
import logging

from cachegate.discovery.v1 import discovery_service_pb2, discovery_service_pb2_grpc
from cachegate.types.v1 import types_pb2
from services.common.authz import ADMIN, HOST_AUTH, CertVerifier, Policy, rule
from services.common.config import Config
from services.common.grpcserver import GrpcServer, ServiceBinding
from services.common.grpcutil import paginate
from services.common.join import ensure_joined, local_addresses
from services.common.pki import cert_from_pem
from services.common.telemetry import server_interceptors, setup_tracing

log = logging.getLogger("cachegate.discovery")

DISCOVERY = discovery_service_pb2.DESCRIPTOR.services_by_name["DiscoveryService"]

POLICY = Policy({
    f"/{DISCOVERY.full_name}/ListFetcherStatuses": rule(ADMIN, HOST_AUTH, resource="db", verb="list"),
    f"/{DISCOVERY.full_name}/Resync": rule(ADMIN, HOST_AUTH, resource="db", verb="create"),
})


class DiscoveryServicer(discovery_service_pb2_grpc.DiscoveryServiceServicer):
    """Status and resync of this host's fetchers."""

    def __init__(self, fetchers: list | None = None):
        self.fetchers = fetchers or []

    def statuses(self) -> list[types_pb2.FetcherStatus]:
        return [f.status_proto() for f in self.fetchers]

    async def ListFetcherStatuses(self, request, context):
        page, nxt = paginate(self.statuses(), lambda s: s.name, request.page_size, request.page_token)
        return discovery_service_pb2.ListFetcherStatusesResponse(statuses=page, next_page_token=nxt)

    async def Resync(self, request, context):
        await asyncio.gather(*(f.run_once() for f in self.fetchers))
        return discovery_service_pb2.ResyncResponse(statuses=self.statuses())


async def run_discovery(cfg: Config, stop: asyncio.Event, ready=None) -> None:
    tracing = setup_tracing("discovery", cfg.telemetry)
    dcfg = cfg.discovery_service
    creds = await ensure_joined(cfg.service_dir("discovery"), cfg.join_address(), cfg.join.token, cfg.join.ca_pin,
                                types_pb2.SERVICE_ROLE_DISCOVERY, local_addresses(dcfg.listen_addr, *dcfg.public_addrs))
    verifier = CertVerifier(cert_from_pem(creds.host_ca_pem), cert_from_pem(creds.user_ca_pem))
    servicer = DiscoveryServicer()
    server = GrpcServer("discovery", [ServiceBinding(
        discovery_service_pb2_grpc.add_DiscoveryServiceServicer_to_server, servicer, DISCOVERY)],
        POLICY, creds.server_credentials(True), lambda: verifier, extra_interceptors=server_interceptors(tracing))
    port = await server.start(dcfg.listen_addr)
    log.info("discovery service ready", extra={"host_id": creds.identity.name, "port": port})
    if ready:
        ready({"service": "discovery", "port": port, "host_id": creds.identity.name})
    try:
        await stop.wait()
    finally:
        await server.stop(5.0)
