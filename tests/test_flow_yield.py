"""Slow readers yield their concurrency slot while others wait (``gateway/supervisor/flow.py``):
the pure rule, then the handlers driven in-process with the fake ``Effects`` and clock of
``test_supervisor_unit`` (no process, no socket)."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any

import pytest

from mlx_supervisor.gateway.supervisor.flow import parks
from mlx_supervisor.gateway.supervisor.model import Behind, Park
from tests.test_supervisor_unit import Sim, entry, lease_of


@pytest.fixture
def make() -> Iterator[Any]:
    sims: list[Sim] = []

    def _make(*entries: Any, **kw: Any) -> Sim:
        sims.append(Sim(*entries, **kw))
        return sims[-1]

    yield _make
    for s in sims:
        s.close()


def test_the_rule_parks_a_backlog_always_and_a_client_behind_only_while_others_wait() -> None:
    for parked, backlog, behind, waiting in itertools.product((False, True), repeat=4):
        want = backlog or (behind and (parked or waiting))
        assert parks(parked, backlog, behind, waiting) is want, (parked, backlog, behind, waiting)
    assert not parks(parked=False, backlog=False, behind=True, waiting=False)  # nobody to lend to
    assert parks(parked=True, backlog=False, behind=True, waiting=False)  # no flapping
    assert not parks(parked=True, backlog=False, behind=False, waiting=True)  # it reads: runs


def test_a_client_behind_keeps_its_slot_until_a_request_queues_then_yields_at_once(make: Any) -> None:
    sim = make(entry("a", max_concurrency=1, max_queue=8))
    sim.acquire("a", "slow")
    sim.boot("a")
    slow, w = sim.lease("a"), sim.worker("a")
    sim.send(Behind(slow, True))
    assert not slow.parked and sim.fx.held == []  # nobody waits: it keeps its slot
    good = sim.acquire("a", "good")
    assert lease_of(good) and slow.parked  # the arrival made it yield, no release needed
    assert sim.fx.held == [("slow", True)] and (w.inflight, w.parked) == (2, 1)
    third = sim.acquire("a", "third")
    assert not third.fut.done()  # good, a reading client, holds the one slot
    sim.send(Behind(slow, False))  # its client drained: it runs again, over the limit
    assert not slow.parked and sim.fx.held[-1] == ("slow", False)
    assert (w.inflight, w.parked) == (2, 0) and not third.fut.done()
    sim.send(Behind(slow, True))  # behind again while third waits: yields again at once
    assert slow.parked and not third.fut.done()  # it was over the limit: good still holds it
    sim.release(lease_of(good))
    assert lease_of(third)
    sim.release(slow)  # cut off while parked: its counts go down once
    assert (w.inflight, w.parked) == (1, 0) and w.behind == set()


def test_a_backlogged_stream_stays_parked_while_its_client_is_behind(make: Any) -> None:
    sim = make(entry("a", max_concurrency=1, max_queue=8))
    sim.acquire("a", "slow")
    sim.boot("a")
    slow = sim.lease("a")
    sim.send(Park(slow, True))  # the stream fell stream_buffer behind: parked, nobody waiting
    assert slow.parked and sim.fx.held == [("slow", True)]
    sim.send(Behind(slow, True))
    sim.send(Park(slow, False))  # the route took its backlog, but the client takes nothing
    assert slow.parked and sim.fx.held == [("slow", True)]
    sim.send(Behind(slow, False))
    assert not slow.parked and sim.fx.held == [("slow", True), ("slow", False)]


def test_a_reader_queued_behind_non_readers_and_their_replacements_is_never_starved(
        make: Any) -> None:
    """The attack: more non-readers than slots, each one cut (released) is replaced at once. Each
    non-reader granted yields as soon as its client is behind, so the reader, queued in order,
    is granted after those ahead of it have each been seen behind once, with no release."""
    sim = make(entry("a", max_concurrency=2, max_queue=64))
    first = sim.acquire("a", "nr0")
    sim.boot("a")
    ahead = [first] + [sim.acquire("a", f"nr{i}") for i in range(1, 10)]
    reader = sim.acquire("a", "reader")
    late = [sim.acquire("a", f"late{i}") for i in range(5)]  # replacements, queued after it
    seen: set[str] = set()
    while not reader.fut.done():
        granted = [lease_of(x) for x in ahead if x.fut.done() and x.fut.result().request_id not in seen]
        assert granted, "the reader waits and no non-reader holds a slot it could yield"
        seen.add(granted[0].request_id)
        sim.send(Behind(granted[0], True))
    assert lease_of(reader).request_id == "reader"
    assert len(seen) == 9  # of the ten non-readers, nine yielded; one holds the other slot
    assert not any(x.fut.done() for x in late)  # nothing queued after the reader overtook it
