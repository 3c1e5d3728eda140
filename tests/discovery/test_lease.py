"""A discovery replica's view of its group's lease when auth answers, refuses, is away, or
is too old to have leases."""

from __future__ import annotations

import grpc
from grpc.aio import Metadata

from cachegate.auth.v1 import cluster_service_pb2 as cs
from services.discovery.lease import LeaderElection
from services.discovery.metrics import LEADER, STANDBY


def _err(code: grpc.StatusCode) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, Metadata(), Metadata(), details="auth went away")


class Auth:
    """ClusterService as a replica sees it: answers set by the test."""

    def __init__(self):
        self.answer: object = None

    async def AcquireLease(self, request, timeout=None):
        if isinstance(self.answer, Exception):
            raise self.answer
        return self.answer

    async def ReleaseLease(self, request, timeout=None):
        return cs.ReleaseLeaseResponse(released=True)


def _granted(holder: str, ok: bool) -> cs.AcquireLeaseResponse:
    return cs.AcquireLeaseResponse(acquired=ok, lease=cs.Lease(name="discovery/g", holder=holder))


async def test_a_leader_that_cannot_renew_stops_once_its_lease_may_have_run_out(caplog):
    now = [100.0]
    auth = Auth()
    changes = []
    el = LeaderElection(auth, "g", "me", ttl=15, renew_interval=5, on_change=changes.append, clock=lambda: now[0])
    auth.answer = _granted("me", True)
    await el.step()
    assert el.leading and el.became_leader.is_set()
    auth.answer = _err(grpc.StatusCode.UNAVAILABLE)
    now[0] = 110.0
    await el.step()
    assert el.leading  # 10 s after the last renewal: still ours
    now[0] = 115.0
    assert not el.leading  # the lease may have gone to another replica: no more rounds
    await el.step()
    assert el.state == STANDBY and changes == [LEADER, STANDBY]
    assert "cannot renew the lease" in caplog.text


async def test_a_standby_names_the_leader_and_takes_over_when_granted(caplog):
    import logging

    caplog.set_level(logging.INFO)
    auth = Auth()
    el = LeaderElection(auth, "g", "me", ttl=3, renew_interval=1)
    auth.answer = _granted("other-host", False)
    await el.step()
    assert not el.leading and el.holder == "other-host"
    assert "standing by" in caplog.text and "other-host" in str([r.__dict__ for r in caplog.records])
    auth.answer = _granted("me", True)
    await el.step()
    assert el.leading


async def test_an_auth_without_leases_means_a_single_replica_that_leads(caplog):
    auth = Auth()
    auth.answer = _err(grpc.StatusCode.UNIMPLEMENTED)
    el = LeaderElection(auth, "g", "me")
    await el.step()
    assert el.leading and "older version" in caplog.text
