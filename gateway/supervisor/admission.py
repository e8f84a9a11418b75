"""Admission: make room for a model (``eviction.plan_admission``), then start its worker, or
fail its waiters with the reason. An admission that must wait for reaps stays PENDING (or
BACKING_OFF after crashes) and is retried on every reap and tick."""

from __future__ import annotations

import logging

from mlx_supervisor.gateway.errors import APIError
from mlx_supervisor.gateway.supervisor import core as c
from mlx_supervisor.gateway.supervisor import events as ev
from mlx_supervisor.gateway.supervisor import spare
from mlx_supervisor.gateway.supervisor.eviction import Holder, Plan, plan_admission
from mlx_supervisor.gateway.supervisor.model import Slot, Worker
from mlx_supervisor.gateway.supervisor.states import EXITING, LEAVING, SlotState, State
from mlx_supervisor.shared.sizes import format_size

log = logging.getLogger("mlx_supervisor.supervisor")


def _holder(core: c.Core, w: Worker) -> Holder:
    slot = core.slots.get(w.model_id)
    loading = w.state in (State.STARTING, State.LOADING)
    queued = bool(slot and slot.waiters and w.state not in EXITING)
    return Holder(w.model_id, w.bytes, -1.0 if w.spare else w.last_used_mono,
                  pinned=slot.pinned if slot else False,
                  busy=not w.spare and (w.inflight > 0 or loading or queued),
                  stopping=w.state in LEAVING)


def holders(core: c.Core, exclude: str) -> list[Holder]:
    out = [_holder(core, w) for w in core.workers.values()]
    # Admissions already waiting for reaps hold a reservation nobody may take.
    out += [Holder(s.entry.id + "#reserved", s.entry.estimate, 0.0, busy=True)
            for s in core.slots.values() if s.pending and s.entry.id != exclude]
    return out


def _refuse(slot: Slot, err: APIError) -> None:
    c.fail_waiters(slot, err)
    c.move_slot(slot, SlotState.COLD, err.message)


def admit(core: c.Core, slot: Slot) -> None:
    """Make room for ``slot``'s model and spawn it, or fail its waiters with the reason."""
    if slot.state is SlotState.FAILED:
        if slot.failed_until > core.now():
            return  # its waiters were told; admission resumes once the backoff is over
        c.move_slot(slot, SlotState.COLD, "backoff over")
    if core.closing:
        return _refuse(slot, APIError(503, "server is shutting down", code="shutting_down"))
    if slot.worker is not None and slot.worker.state is not State.DRAINING:
        return  # already starting or hot
    if slot.respawn_at > core.now():
        return c.move_slot(slot, SlotState.BACKING_OFF, f"respawn at {slot.respawn_at:.1f}")
    need = slot.entry.estimate
    if need > core.budget:
        return _refuse(slot, APIError(
            503, f"model {slot.entry.id!r} needs {format_size(need)}, more than the whole memory "
            f"budget of {format_size(core.budget)}", code="insufficient_memory"))
    hs = holders(core, slot.entry.id)
    plan = plan_admission(need, hs, core.budget, core.max_models)
    if not plan.fits:
        return _refuse(slot, _no_room(core, slot, hs))
    _evict(core, slot, plan)
    if plan.wait or slot.worker is not None:
        return c.move_slot(slot, SlotState.PENDING, "waiting for reaps")  # retried on every reap
    c.move_slot(slot, SlotState.COLD, "admitted")
    start(core, slot)


def _no_room(core: c.Core, slot: Slot, hs: list[Holder]) -> APIError:
    held = ", ".join(f"{h.model_id} {format_size(h.bytes)}"
                     + (" (pinned)" if h.pinned else " (busy)" if h.busy else "")
                     for h in hs) or "nothing"
    need = slot.entry.estimate
    return APIError(
        503, f"not enough memory for model {slot.entry.id!r}: needs {format_size(need)}, "
        f"budget {format_size(core.budget)}, {format_size(core.used_bytes())} in use by: {held}",
        code="insufficient_memory", retry_after=10)


def _evict(core: c.Core, slot: Slot, plan: Plan) -> None:
    for victim_id in plan.victims:
        victim = core.spare if victim_id == spare.SPARE else core.slots[victim_id].worker
        if victim is not None:
            core.fx.emit(ev.Evicted(model=victim_id, pid=victim.pid,
                                    reason=f"making room for {slot.entry.id}"))
            c.drain(core, victim, f"evicted (LRU) to make room for {slot.entry.id}")


def retry(core: c.Core) -> None:
    """After a reap (or a failed spawn): every waiting admission tries again."""
    for slot in core.slots.values():
        if slot.pending:
            c.move_slot(slot, SlotState.COLD, "retrying")
            admit(core, slot)


def start(core: c.Core, slot: Slot) -> None:
    """A worker for ``slot``: the warm spare when it can take the model, else a new process."""
    e = slot.entry
    if spare.adopt(core, slot):
        return
    w = core.new_worker(e.id, e.id, e, e.estimate, e.kind)
    slot.worker = w
    slot.loads += 1
    core.fx.emit(ev.Spawning(model=e.id))
    log.info("model=%s spawning worker %s (estimate %s, ledger %s of %s)", e.id, w.worker_id,
             format_size(e.estimate), format_size(core.used_bytes()), format_size(core.budget))
    core.fx.spawn(w, e)
