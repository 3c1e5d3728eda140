"""Leases in auth's storage: which one of several replicas does a job alone.

Discovery replicas of one group share the lease ``discovery/<group>``; only its holder
reconciles. A lease is one item (``leases/<name>``) that expires after its TTL unless
the holder renews it, so a holder that dies loses it within the TTL. Taking a free or
expired lease is the backends' atomic ``create`` (it replaces an expired item); a renewal
is a compare-and-swap on the value the holder read, so two replicas never both hold it.
The same code serves SQLite and PostgreSQL; with several auth processes on one
PostgreSQL database the lease is shared by all of them (expiry by the writing auth's
clock)."""

from __future__ import annotations

import json
import logging
import re
import time
from dataclasses import dataclass

from services.auth.backend import Backend

log = logging.getLogger("cachegate.auth")

PREFIX = "leases/"
MIN_TTL = 1.0
MAX_TTL = 300.0
NAME = re.compile(r"discovery/[A-Za-z0-9._-]{1,64}")


class LeaseError(ValueError):
    """A lease request was refused; the message says why."""


@dataclass
class Lease:
    name: str
    holder: str
    acquired: float
    expires: float

    def dumps(self) -> bytes:
        return json.dumps({"name": self.name, "holder": self.holder, "acquired": self.acquired,
                           "expires": self.expires}, separators=(",", ":")).encode()

    @classmethod
    def loads(cls, raw: bytes) -> "Lease":
        d = json.loads(raw)
        return cls(d["name"], d["holder"], float(d["acquired"]), float(d["expires"]))


def check(name: str, ttl: float | None = None) -> None:
    if not NAME.fullmatch(name or ""):
        raise LeaseError(f"invalid lease name {name!r}: use discovery/<discovery_group>")
    if ttl is not None and not MIN_TTL <= ttl <= MAX_TTL:
        raise LeaseError(f"lease ttl must be between {MIN_TTL:g}s and {MAX_TTL:g}s, got {ttl:g}s")


class Leases:
    def __init__(self, backend: Backend, clock=time.time):
        self.backend = backend
        self.clock = clock

    async def acquire(self, name: str, holder: str, ttl: float) -> tuple[bool, Lease | None]:
        """Take or renew ``name`` for ``holder``: (whether it holds it now, the lease as it is)."""
        check(name, ttl)
        key = PREFIX + name
        current: Lease | None = None
        for _ in range(3):  # a lost race with an expiry or another replica: read again
            now = self.clock()
            new = Lease(name, holder, now, now + ttl)
            if await self.backend.create(key, new.dumps(), expires=new.expires):
                log.info("lease taken", extra={"lease": name, "holder": holder, "ttl": ttl})
                return True, new
            item = await self.backend.get(key)
            if item is None:
                continue
            current = Lease.loads(item.value)
            if current.holder != holder:
                return False, current
            renewed = Lease(name, holder, current.acquired, now + ttl)
            if await self.backend.compare_and_swap(key, item.value, renewed.dumps(), expires=renewed.expires):
                return True, renewed
        return False, current

    async def release(self, name: str, holder: str) -> bool:
        """End ``holder``'s lease now (it is left expired, which ``acquire`` replaces)."""
        check(name)
        key = PREFIX + name
        item = await self.backend.get(key)
        if item is None:
            return False
        cur = Lease.loads(item.value)
        if cur.holder != holder:
            return False
        now = self.clock()
        ended = Lease(name, holder, cur.acquired, now)
        ok = await self.backend.compare_and_swap(key, item.value, ended.dumps(), expires=now)
        if ok:
            log.info("lease released", extra={"lease": name, "holder": holder})
        return ok

    async def list(self) -> list[Lease]:
        now = self.clock()
        out = [Lease.loads(i.value) for i in await self.backend.list(PREFIX)]
        return sorted((lease for lease in out if lease.expires > now), key=lambda lease: lease.name)
