"""The garbage collector's settings for a long-running service, set once it has started.

CPython's collector looks at every tracked object of a generation when it runs, and it runs
on every object that outlives a young collection again and again. A service holds a few
hundred thousand long-lived objects it will never free (modules, gRPC and protobuf
machinery, configuration, caches) and, in dbproxy, about 90 more for each live session
(its coroutines, transports, futures). With the default thresholds (700, 10, 10) auth spent
about 7 % of its CPU walking its start-up heap; with young collections of 20,000 objects
instead (what we had next), a middle-generation collection in dbproxy walked every session
opened since the one before: 200 ms with 3,500 sessions being opened, every session of the
proxy waiting meanwhile, and each young collection took 8 to 22 ms.

So objects age out of the collector's view. :func:`settle_after_start` freezes what the
service made while starting (``gc.freeze``), and after each collection of the middle or the
oldest generation what survived it is frozen too: it has outlived at least two young
collections, which is where cyclic garbage is found (what the hot paths make dies young,
freed by reference counting or in a young collection). A collection then walks only what
was made since the one before, at most :data:`THRESHOLDS` [0] x [1] objects, a few ms.
Frozen objects are still freed by reference counting (an ended session is: it breaks its
own cycles); only a reference cycle among them would stay. So that none stays for long, every
:data:`SWEEP_EVERY` seconds everything is thawed (``gc.unfreeze``) and the next full
collection walks it all once (about 0.7 µs per object: some 0.35 s with 5,000 live
sessions), then it is frozen again.
"""

from __future__ import annotations

import gc
import time

# Young collections after this many new container objects (the default is 700); a
# middle-generation collection every 5 young ones, a full one every 10 middle ones.
THRESHOLDS = (5_000, 5, 10)
# How often the whole heap is walked once (all the frozen objects thawed for one full collection).
SWEEP_EVERY = 900.0


class _Ageing:
    """The ``gc.callbacks`` entry that freezes what outlived a middle or full collection."""

    def __init__(self, sweep_every: float = SWEEP_EVERY, clock=time.monotonic):
        self.sweep_every = sweep_every
        self.clock = clock
        self.last_sweep = clock()
        self.sweeping = False  # thawed: waiting for the full collection that walks everything
        self.sweeps = 0

    def __call__(self, phase: str, info: dict) -> None:
        if phase != "stop":
            return
        gen = info["generation"]
        if self.sweeping:
            if gen == 2:
                self.sweeping = False
                self.sweeps += 1
                self.last_sweep = self.clock()
                gc.freeze()
            return
        if gen == 0:
            return
        if self.clock() - self.last_sweep >= self.sweep_every:
            gc.unfreeze()  # into the oldest generation: its next collection walks it all
            self.sweeping = True
        else:
            gc.freeze()


_ageing: _Ageing | None = None


def settle_after_start() -> None:
    """Move every object made so far out of the collector's view (``gc.freeze``), collect
    young objects every :data:`THRESHOLDS` [0] new ones, and from now on freeze what outlives
    a middle or full collection (see the module's docstring). Call it once a service is
    serving; calling it again (two services in one process) only freezes what was made in
    between."""
    global _ageing
    gc.freeze()
    gc.set_threshold(*THRESHOLDS)
    if _ageing is None:
        _ageing = _Ageing()
        gc.callbacks.append(_ageing)


__all__ = ["SWEEP_EVERY", "THRESHOLDS", "settle_after_start"]
