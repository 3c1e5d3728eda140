"""Which discovery replica of a group reconciles: the holder of the group's lease in auth.

Every replica asks auth for the lease ``discovery/<group>`` every ``renew_interval``; auth
gives it to one host and keeps it for ``ttl`` after each renewal. The holder reconciles;
the others stand by (and say so in their log) and take over within ``ttl +
renew_interval`` of the holder's death. A holder that cannot renew stops reconciling once
its lease may have run out (counted from when it sent the last renewal that succeeded),
so two replicas never reconcile at once. An auth without leases (UNIMPLEMENTED) means a
single replica: it leads."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Callable

import grpc

from cachegate.auth.v1 import cluster_service_pb2
from services.common.grpcutil import dur

from .metrics import LEADER, STANDBY, UNKNOWN

log = logging.getLogger("cachegate.discovery")


class LeaderElection:
    def __init__(self, stub, group: str, host_id: str, ttl: float = 15.0, renew_interval: float = 5.0,
                 on_change: Callable[[int], None] | None = None, clock=time.monotonic):
        self.stub = stub  # ClusterServiceStub
        self.name = f"discovery/{group}"
        self.host_id = host_id
        self.ttl = ttl
        self.renew_interval = renew_interval
        self.on_change = on_change
        self.clock = clock
        self.state = UNKNOWN
        self.holder = ""
        self._valid_until = 0.0
        self._no_leases = False
        self.became_leader = asyncio.Event()
        self.first_answer = asyncio.Event()

    @property
    def leading(self) -> bool:
        if self._no_leases:
            return True
        return self.state == LEADER and self.clock() < self._valid_until

    def _set(self, state: int, holder: str, why: str = "") -> None:
        if state == self.state and holder == self.holder:
            return
        old, self.state, self.holder = self.state, state, holder
        if state == LEADER:
            log.info("discovery: this host leads its group and reconciles",
                     extra={"lease": self.name, "host_id": self.host_id})
            self.became_leader.set()
        elif state == STANDBY:
            if holder:
                log.info("discovery: standing by: another discovery host of this group reconciles",
                         extra={"lease": self.name, "leader": holder})
            else:
                log.warning("discovery: standing by: %s", why or "the lease could not be renewed",
                            extra={"lease": self.name, "was_leader": old == LEADER})
        if self.on_change is not None:
            self.on_change(state)

    async def step(self) -> None:
        """One acquire-or-renew call; updates the state."""
        try:
            await self._step()
        finally:
            self.first_answer.set()

    async def _step(self) -> None:
        sent = self.clock()
        try:
            resp = await self.stub.AcquireLease(
                cluster_service_pb2.AcquireLeaseRequest(name=self.name, ttl=dur(self.ttl)),
                timeout=max(1.0, min(self.renew_interval, self.ttl / 2)))
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.UNIMPLEMENTED:
                if not self._no_leases:
                    log.warning("discovery: auth has no leases (an older version): this host reconciles as if "
                                "it were the only one; run one discovery host per group until auth is upgraded")
                self._no_leases = True
                self._set(LEADER, self.host_id)
                return
            # Auth unreachable: keep leading only while the lease we hold may still be ours.
            if self.state == LEADER and self.clock() >= self._valid_until:
                self._set(STANDBY, "", f"cannot renew the lease ({exc.code().name}: {exc.details()}); "
                                       "stopped reconciling until auth answers")
            elif self.state == UNKNOWN:
                self._set(STANDBY, "", f"cannot reach auth for the lease ({exc.code().name}): not reconciling "
                                       "until it answers")
            return
        self._no_leases = False
        if resp.acquired:
            # The lease runs from when auth wrote it, after we sent the request.
            self._valid_until = sent + self.ttl
            self._set(LEADER, self.host_id)
        else:
            self._valid_until = 0.0
            self._set(STANDBY, resp.lease.holder)

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            await self.step()
            try:
                await asyncio.wait_for(stop.wait(), self.renew_interval)
            except TimeoutError:
                pass

    async def release(self) -> None:
        if self.state != LEADER or self._no_leases:
            return
        try:
            await self.stub.ReleaseLease(cluster_service_pb2.ReleaseLeaseRequest(name=self.name), timeout=3)
            log.info("discovery: lease released for another host of this group", extra={"lease": self.name})
        except grpc.aio.AioRpcError as exc:
            log.warning("discovery: could not release the lease; another host takes over when it expires",
                        extra={"lease": self.name, "error": exc.details()})
        self.state = STANDBY
