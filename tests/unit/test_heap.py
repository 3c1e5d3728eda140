"""The collector's ageing policy (services/common/heap.py), on the real collector."""

from __future__ import annotations

import gc
import weakref

import pytest

from services.common import heap


class Node:
    def __init__(self):
        self.other = None


def _visible(obj) -> bool:
    """The collector still walks ``obj`` (frozen objects are not in gc.get_objects())."""
    return any(o is obj for o in gc.get_objects())


def _cycle():
    a, b = Node(), Node()
    a.other, b.other = b, a
    return a, weakref.ref(a)


@pytest.fixture
def ageing():
    now = [0.0]
    policy = heap._Ageing(sweep_every=900, clock=lambda: now[0])
    # A service started in this process earlier has its own policy: out of the way meanwhile.
    others = [cb for cb in gc.callbacks if isinstance(cb, heap._Ageing)]
    for cb in others:
        gc.callbacks.remove(cb)
    gc.collect()
    gc.callbacks.append(policy)
    try:
        yield policy, now
    finally:
        gc.callbacks.remove(policy)
        gc.callbacks.extend(others)
        gc.unfreeze()
        gc.collect()


def test_what_outlives_a_middle_collection_leaves_the_collectors_view(ageing):
    live = Node()
    assert _visible(live)
    gc.collect(0)  # a young collection only ages it
    assert _visible(live)
    gc.collect(1)
    assert not _visible(live)  # frozen: later collections do not walk it again
    # Garbage made afterwards is still found young, and a frozen object is still freed
    # when nothing refers to it any more.
    a, ref = _cycle()
    del a
    gc.collect(0)
    assert ref() is None
    gone = weakref.ref(live)
    del live
    assert gone() is None


def test_every_sweep_period_everything_is_walked_once_and_a_frozen_cycle_is_freed(ageing):
    policy, now = ageing
    a, ref = _cycle()
    gc.collect(1)
    assert not _visible(a)
    del a  # a cycle among frozen objects: no collection sees it until the sweep
    gc.collect(1)
    assert ref() is not None
    now[0] = 901
    gc.collect(1)  # due: everything is thawed for the next full collection
    assert policy.sweeping and ref() is not None
    gc.collect(1)  # meanwhile nothing is frozen
    survivor = Node()
    gc.collect(1)
    assert _visible(survivor)
    gc.collect(2)
    assert ref() is None and not policy.sweeping and policy.sweeps == 1
    assert not _visible(survivor)  # frozen again after the sweep
    now[0] = 1000
    gc.collect(1)
    assert not policy.sweeping  # the next sweep is SWEEP_EVERY after this one


def test_settle_after_start_sets_the_thresholds_and_registers_the_policy_once(monkeypatch):
    monkeypatch.setattr(heap, "_ageing", None)
    before, callbacks = gc.get_threshold(), list(gc.callbacks)
    try:
        heap.settle_after_start()
        heap.settle_after_start()
        assert gc.get_threshold() == heap.THRESHOLDS
        new = [cb for cb in gc.callbacks if cb not in callbacks]
        assert len(new) == 1 and isinstance(new[0], heap._Ageing)
    finally:
        gc.callbacks[:] = callbacks
        gc.set_threshold(*before)
        gc.unfreeze()
