"""Handlers for a request's lease: ``Acquire`` (grant, queue, refuse or admit), ``Abandon``
(the client left) and ``Release`` (parking a slow reader is ``flow.py``'s). The in-flight count grows only on a grant and shrinks only
on a release."""

from __future__ import annotations

import time

from mlx_supervisor.gateway.errors import APIError
from mlx_supervisor.gateway.supervisor import admin, admission, flow
from mlx_supervisor.gateway.supervisor import core as c
from mlx_supervisor.gateway.supervisor import events as ev
from mlx_supervisor.gateway.supervisor.model import Abandon, Acquire, Release
from mlx_supervisor.gateway.supervisor.states import State


def on_acquire(core: c.Core, e: Acquire) -> None:
    slot = core.slots.get(e.model_id)
    w = e.waiter
    if w.fut.done():
        return
    if slot is None:
        return w.fut.set_exception(c.not_found(e.model_id))
    if core.closing:
        return w.fut.set_exception(c.shutting_down())
    err = c.failed_error(core, slot)
    if err:
        return w.fut.set_exception(err)
    worker = slot.worker
    if (worker and worker.state is State.READY and not slot.waiters
            and worker.inflight - worker.parked < slot.entry.max_concurrency):
        return c.grant(core, slot, worker, w)
    if len(slot.waiters) >= slot.entry.max_queue:
        return w.fut.set_exception(APIError(
            429, f"model {e.model_id!r} is at capacity: {slot.entry.max_concurrency} in flight "
            f"and {len(slot.waiters)} queued (max_queue)", code="queue_full", retry_after=1))
    slot.waiters.append(w)
    core.fx.emit(ev.Queued(model=slot.entry.id, request_id=w.request_id))
    if worker is None or worker.state is State.DRAINING:
        admission.admit(core, slot)
    elif worker.state is State.READY:
        flow.yield_to_waiters(core, slot)  # a client that is behind lends its slot now


def on_abandon(core: c.Core, e: Abandon) -> None:
    slot = core.slots.get(e.model_id)
    if slot and e.waiter in slot.waiters:
        slot.waiters.remove(e.waiter)
    fut = e.waiter.fut
    if fut.done() and not fut.cancelled() and fut.exception() is None:
        fut.result().release()
    elif not fut.done():
        fut.cancel()


def on_release(core: c.Core, e: Release) -> None:
    worker = core.workers.get(e.lease.worker_id)
    if worker is None:
        return
    worker.inflight = max(0, worker.inflight - 1)  # shutdown may have zeroed it
    flow.forget(core, e.lease)
    worker.last_used_mono = core.now()
    slot = core.slots.get(worker.model_id)
    if slot is not None:
        slot.last_used_wall = time.time()
        if worker.state is State.READY:
            c.pump(core, slot)
    if worker.state is State.READY and worker.recycle and worker.inflight == 0:
        c.drain(core, worker, "recycled: grew past its memory share")
    if worker.state is State.DRAINING and worker.inflight == 0:
        c.stop(core, worker, worker.stop_reason or "drained")
    admin.check_shutdown(core)
