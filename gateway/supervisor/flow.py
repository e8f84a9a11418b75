"""Slow readers and concurrency slots: when a running request gives its slot up (it is parked:
paused in its worker, not counted against ``max_concurrency``) and when it takes one again.

Two signals reach the loop for a running request:

- ``Behind``: its client's connection stopped taking bytes (the kernel refused a write; with
  ``TCP_NOTSENT_LOWAT`` that is after about 16 KiB unsent plus the client's receive window,
  ``connections.py``), or took them all again;
- ``Park``: its stream fell ``stream_buffer`` messages behind the route (and paused it itself,
  to bound the gateway's memory), or caught up.

The rule (``parks``, pure): a request is parked while its stream is backlogged, or while its
client is behind *and someone waits for a slot*; once parked for being behind it stays parked
until its client has taken everything (no flapping while the waiter it yielded to runs). When a
request queues, every behind request of that model yields at once. A parked request whose
client drains takes its slot back at once, over the limit if need be: a legitimate stream never
waits behind the requests it lent its slot to, and waiters cannot starve, because a stream over
the limit only holds it while its client keeps reading (it yields again the moment the client
falls behind while someone waits) and every stream ends at its ``max_tokens``.
"""

from __future__ import annotations

from mlx_supervisor.gateway.supervisor import core as c
from mlx_supervisor.gateway.supervisor.model import Behind, Lease, Park, Slot
from mlx_supervisor.gateway.supervisor.states import State


def parks(parked: bool, backlog: bool, behind: bool, waiting: bool) -> bool:
    """Whether a running request should be parked now. ``parked``: it is; ``backlog``: its
    stream fell ``stream_buffer`` behind; ``behind``: its client refuses bytes; ``waiting``:
    requests are queued for a slot of its model."""
    if backlog:
        return True
    return behind and (parked or waiting)


def settle(core: c.Core, lease: Lease) -> None:
    """Park or unpark ``lease`` as ``parks`` says; a park lends the slot to the next waiter."""
    worker = core.workers.get(lease.worker_id)
    if worker is None or lease.released:
        return
    slot = core.slots.get(worker.model_id)
    waiting = bool(slot and slot.waiters)
    want = parks(lease.parked, lease.backlog, lease.behind, waiting)
    if want == lease.parked:
        return
    lease.parked = want
    worker.parked += 1 if want else -1
    core.fx.hold(lease.request_id, want)
    if want and slot is not None and worker.state is State.READY:
        c.pump(core, slot)


def yield_to_waiters(core: c.Core, slot: Slot) -> None:
    """Requests queued for ``slot``: every running request whose client is behind parks now."""
    worker = slot.worker
    if worker is None or not slot.waiters:
        return
    for lease in list(worker.behind):
        if not lease.parked:
            settle(core, lease)


def on_behind(core: c.Core, e: Behind) -> None:
    lease, worker = e.lease, core.workers.get(e.lease.worker_id)
    if worker is None or lease.released or lease.behind == e.behind:
        return
    lease.behind = e.behind
    if e.behind:
        worker.behind.add(lease)
    else:
        worker.behind.discard(lease)
    settle(core, lease)


def on_park(core: c.Core, e: Park) -> None:
    lease = e.lease
    if lease.released or lease.backlog == e.parked:
        return
    lease.backlog = e.parked
    settle(core, lease)


def forget(core: c.Core, lease: Lease) -> None:
    """A released lease: it holds nothing any more (its counts go down once)."""
    worker = core.workers.get(lease.worker_id)
    if worker is None:
        return
    worker.behind.discard(lease)
    if lease.parked:
        lease.parked = False
        worker.parked = max(0, worker.parked - 1)
