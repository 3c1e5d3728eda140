"""The discovery service process: joins the cluster, runs the Azure and static fetchers,
publishes what they find to auth's registry, and serves its status API."""

from __future__ import annotations

import asyncio
import logging
import random
import time
from pathlib import Path

import grpc

from cachegate.auth.v1 import database_service_pb2
from cachegate.discovery.v1 import discovery_service_pb2, discovery_service_pb2_grpc
from cachegate.types.v1 import types_pb2

from services.common import heap
from services.common.authclient import AuthClient
from services.common.authz import ADMIN, HOST_AUTH, CertVerifier, Policy, rule
from services.common.config import Config, ConfigError
from services.common.grpcserver import GrpcServer, ServiceBinding
from services.common.grpcutil import paginate
from services.common.join import ensure_joined, local_addresses
from services.common.pki import cert_from_pem
from services.common.telemetry import server_interceptors, setup_metrics, setup_tracing

from .lease import LeaderElection
from .metrics import DiscoveryMetrics
from .registry import (
    AuthRegistry,
    StaticPublisher,
    azure_owner,
    static_owner,
    status_proto,
)

log = logging.getLogger("cachegate.discovery")

DISCOVERY = discovery_service_pb2.DESCRIPTOR.services_by_name["DiscoveryService"]

POLICY = Policy({
    f"/{DISCOVERY.full_name}/ListFetcherStatuses": rule(ADMIN, HOST_AUTH, resource="db", verb="list"),
    f"/{DISCOVERY.full_name}/Resync": rule(ADMIN, HOST_AUTH, resource="db", verb="create"),
})


def poll_jitter(interval: float) -> float:
    """Up to 10% of the interval (at most 30s) at random, so that hosts do not poll in step."""
    return min(interval * 0.1, 30.0)


class Discovery:
    """Everything one discovery host runs: the Azure reconciler (if matchers are configured)
    and the static publisher, on one poll loop; statuses are reported to auth."""

    def __init__(self, cfg: Config, auth: AuthClient | None, config_dir: Path | None = None):
        self.cfg = cfg
        self.dcfg = cfg.discovery_service
        self.auth = auth
        self.group = self.dcfg.discovery_group
        self.reconciler = None
        self.fetcher_set = None
        self.credential = None
        self.static = None
        self._resync = asyncio.Event()
        self._round_lock = asyncio.Lock()
        self.metrics = DiscoveryMetrics(group=self.group)
        self.election: LeaderElection | None = None
        stub = auth.databases if auth is not None else None
        if self.dcfg.static:
            self.static = StaticPublisher(stub, self.dcfg.static, static_owner(self.group), config_dir)
        if self.dcfg.azure:
            self._setup_azure(stub)

    def _setup_azure(self, stub) -> None:
        from .azure import AzureFetcherSet, make_credential
        from .matchers import AzureMatcher
        from .reconciler import Reconciler

        # DefaultAzureCredential logs its failure as a warning on every token request (once per
        # fetcher); the reconciler logs it once per round with what to check instead.
        for name in ("azure.identity._credentials.chained", "azure.identity.aio._credentials.chained"):
            logging.getLogger(name).setLevel(logging.ERROR)
        ep = self.dcfg.azure_endpoints
        ca = ep.ca_file or None
        self.credential = make_credential(authority_host=ep.authority_host or None, ca_file=ca)
        matchers = []
        for i, m in enumerate(self.dcfg.azure):
            try:
                matchers.append(AzureMatcher.model_validate(m.model_dump()))
            except ValueError as exc:
                errs = getattr(exc, "errors", None)
                msg = errs()[0]["msg"] if callable(errs) else str(exc)
                raise ConfigError(f"discovery_service.azure[{i}]: {msg}") from None
        self.fetcher_set = AzureFetcherSet(self.credential, matchers, base_url=ep.resource_manager or None,
                                           connection_verify=ca, timeout=self.dcfg.azure_timeout)
        interval = self.dcfg.poll_interval
        self.reconciler = Reconciler(self.fetcher_set, AuthRegistry(stub, azure_owner(self.group)),
                                     interval=interval, jitter=poll_jitter(interval),
                                     fetch_timeout=max(self.dcfg.azure_timeout * 4, 30.0),
                                     source_name="azure-subscriptions")
        self.reconciler.on_error = self.metrics.azure_error

    # --- status -------------------------------------------------------------------------
    def statuses(self) -> list[types_pb2.FetcherStatus]:
        out = []
        if self.reconciler is not None:
            out += [status_proto(s) for s in self.reconciler.statuses()]
        if self.static is not None:
            out.append(status_proto(self.static.status))
        return sorted(out, key=lambda s: s.name)

    async def report(self) -> None:
        if self.auth is None:
            return
        try:
            await self.auth.databases.ReportFetcherStatus(
                database_service_pb2.ReportFetcherStatusRequest(
                    statuses=self.statuses(), poll_interval_seconds=max(1, round(self.dcfg.poll_interval))), timeout=15)
        except Exception as exc:  # noqa: BLE001 - status reporting must never stop discovery
            log.warning("cannot report fetcher status to auth: %s", str(exc).splitlines()[0] if str(exc) else exc)

    # --- rounds -------------------------------------------------------------------------
    async def run_once(self) -> None:
        async with self._round_lock:  # a Resync and the poll loop never overlap
            await self._run_once()

    async def _run_once(self) -> None:
        t0 = time.monotonic()
        jobs = []
        if self.static is not None:
            jobs.append(self.static.run_once())
        if self.reconciler is not None:
            jobs.append(self.reconciler.run_once())
        results = await asyncio.gather(*jobs, return_exceptions=True)
        ok = True
        for r in results:
            if isinstance(r, Exception):
                ok = False
                log.error("discovery round failed: %s", r)
            elif r is not None:  # the reconciler's RunResult
                ok = ok and r.ok
                self.metrics.published("azure", len(r.created) + len(r.updated), len(r.deleted))
        if self.static is not None:
            ok = ok and not self.static.status.last_error
            self.metrics.published("static", *self.static.last_changes)
        self.metrics.round(ok, time.monotonic() - t0)
        log.debug("discovery round done", extra={"ok": ok, "seconds": round(time.monotonic() - t0, 3)})
        await self.report()

    def request_resync(self) -> None:
        self._resync.set()

    @property
    def leading(self) -> bool:
        return self.election is None or self.election.leading

    async def run_forever(self, stop: asyncio.Event) -> None:
        """Rounds every poll_interval while this host holds its group's lease; a standby
        waits and starts a round as soon as it takes the lease over."""
        interval = self.dcfg.poll_interval
        election = self.election
        lease_task = asyncio.create_task(election.run(stop), name="discovery-lease") if election else None
        try:
            if election is not None:  # the first answer about the lease, before any round
                await asyncio.wait([asyncio.ensure_future(election.first_answer.wait())],
                                   timeout=election.renew_interval)
            while not stop.is_set():
                self._resync.clear()
                if self.leading:
                    if election is not None:
                        election.became_leader.clear()
                    await self.run_once()
                    wait = interval + random.uniform(0, poll_jitter(interval))
                else:
                    wait = interval
                waiters = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(self._resync.wait())]
                if election is not None:
                    waiters.append(asyncio.ensure_future(election.became_leader.wait()))
                try:
                    await asyncio.wait(waiters, timeout=wait, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    for t in waiters:
                        t.cancel()
                    await asyncio.gather(*waiters, return_exceptions=True)
        finally:
            if lease_task is not None:
                lease_task.cancel()
                await asyncio.gather(lease_task, return_exceptions=True)

    def attach(self, auth: AuthClient, host_id: str = "") -> None:
        """Publish through ``auth`` (set once the host has joined); with ``host_id``, take
        part in the group's lease so that one replica reconciles at a time."""
        self.auth = auth
        if host_id:
            self.election = LeaderElection(auth.cluster, self.group, host_id, ttl=self.dcfg.lease_ttl,
                                           renew_interval=self.dcfg.lease_renew_interval,
                                           on_change=self.metrics.lease)
        if self.static is not None:
            self.static.stub = auth.databases
        if self.reconciler is not None:
            self.reconciler.registry.stub = auth.databases

    async def close(self) -> None:
        if self.fetcher_set is not None:
            await self.fetcher_set.close()
        if self.credential is not None:
            await self.credential.close()


class DiscoveryServicer(discovery_service_pb2_grpc.DiscoveryServiceServicer):
    """Status and resync of this host's fetchers."""

    def __init__(self, discovery: Discovery):
        self.discovery = discovery

    async def ListFetcherStatuses(self, request, context):
        page, nxt = paginate(self.discovery.statuses(), lambda s: s.name, request.page_size, request.page_token)
        return discovery_service_pb2.ListFetcherStatusesResponse(statuses=page, next_page_token=nxt)

    async def Resync(self, request, context):
        d = self.discovery
        if not d.leading:
            leader = d.election.holder if d.election is not None else ""
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                f"this discovery host is standing by (group {d.group!r} is reconciled by "
                                f"{leader or 'no host right now'}): resync on the leading host, see `cgctl status`")
        await self.discovery.run_once()
        return discovery_service_pb2.ResyncResponse(statuses=self.discovery.statuses())


async def run_discovery(cfg: Config, stop: asyncio.Event, ready=None) -> None:
    tracing = setup_tracing("discovery", cfg.telemetry)
    setup_metrics("discovery", cfg.telemetry)
    discovery = Discovery(cfg, None)  # checks the matchers before joining
    try:
        await _serve(cfg, discovery, tracing, stop, ready)
    finally:
        await discovery.close()


async def _serve(cfg: Config, discovery: Discovery, tracing, stop: asyncio.Event, ready) -> None:
    dcfg = cfg.discovery_service
    creds = await ensure_joined(cfg.service_dir("discovery"), cfg.join_address(), cfg.join.token, cfg.join.ca_pin,
                                types_pb2.SERVICE_ROLE_DISCOVERY, local_addresses(dcfg.listen_addr, *dcfg.public_addrs))
    verifier = CertVerifier(cert_from_pem(creds.host_ca_pem), cert_from_pem(creds.user_ca_pem))
    auth = AuthClient(cfg.auth_server, creds, tracing)
    discovery.attach(auth, creds.identity.name)
    servicer = DiscoveryServicer(discovery)
    server = GrpcServer("discovery", [ServiceBinding(
        discovery_service_pb2_grpc.add_DiscoveryServiceServicer_to_server, servicer, DISCOVERY)],
        POLICY, creds.server_credentials(True), lambda: verifier, extra_interceptors=server_interceptors(tracing))
    port = await server.start(dcfg.listen_addr)
    heap.settle_after_start()
    log.info("discovery service ready", extra={
        "host_id": creds.identity.name, "port": port, "azure_matchers": len(dcfg.azure),
        "static_databases": len(dcfg.static), "poll_interval": dcfg.poll_interval})
    if ready:
        ready({"service": "discovery", "port": port, "host_id": creds.identity.name})
    loop = asyncio.create_task(discovery.run_forever(stop), name="discovery-loop")
    try:
        await stop.wait()
    finally:
        loop.cancel()
        await asyncio.gather(loop, return_exceptions=True)
        if discovery.election is not None:
            await discovery.election.release()
        await server.stop(5.0)
        await auth.close()
