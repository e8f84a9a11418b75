"""Admission: make room for a model (``eviction.plan_admission``), then start its worker, or
fail its waiters with the reason. An admission that must wait for reaps stays PENDING (or
BACKING_OFF after crashes) and is retried on every reap and tick. One whose memory is held by
busy models is WAITING for a turn (``turns.py``): the first in turn order makes holders that
have had ``turn_seconds`` yield, and only a need that can never fit is refused at once."""

from __future__ import annotations

import logging

from mlx_supervisor.gateway.errors import APIError
from mlx_supervisor.gateway.supervisor import core as c
from mlx_supervisor.gateway.supervisor import events as ev
from mlx_supervisor.gateway.supervisor import recycle, spare, turns
from mlx_supervisor.gateway.supervisor.eviction import Holder, Plan, plan_admission
from mlx_supervisor.gateway.supervisor.model import Slot, Worker
from mlx_supervisor.gateway.supervisor.states import EXITING, LEAVING, SlotState, State
from mlx_supervisor.shared.sizes import format_size

log = logging.getLogger("mlx_supervisor.supervisor")
TURN_DRAIN = 2.0  # seconds a yielding holder is expected to take to finish, exit and be replaced


def _holder(core: c.Core, w: Worker) -> Holder:
    slot = core.slots.get(w.model_id)
    loading = w.state in (State.STARTING, State.LOADING)
    queued = bool(slot and slot.waiters and w.state not in EXITING)
    return Holder(w.model_id, w.bytes, -1.0 if w.spare else w.last_used_mono,
                  pinned=slot.pinned if slot else False,
                  busy=not w.spare and (w.inflight > 0 or loading or queued),
                  stopping=w.state in LEAVING)


def holders(core: c.Core, exclude: str, adopting: Worker | None = None) -> list[Holder]:
    """What holds memory, as eviction sees it; ``adopting`` (the spare that will become the
    admitted model's worker) is left out: its bytes turn into the model's charge."""
    out = [_holder(core, w) for w in core.workers.values() if w is not adopting]
    # Admissions already waiting for reaps hold a reservation nobody may take.
    out += [Holder(s.entry.id + "#reserved", s.need, 0.0, busy=True)
            for s in core.slots.values() if s.pending and s.entry.id != exclude]
    held = core.held()  # the zygote: charged, never evicted for a model
    if held:
        out.append(Holder("(zygote)", held, -2.0, pinned=True))
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
    need = slot.need
    if need > core.budget:
        return _refuse(slot, APIError(
            503, f"model {slot.entry.id!r} needs {format_size(need)}, more than the whole memory "
            f"budget of {format_size(core.budget)}", code="insufficient_memory"))
    if slot.state is SlotState.WAITING and not (slot.waiters or slot.load_waiters or slot.pinned):
        return c.move_slot(slot, SlotState.COLD, "nothing waits for it any more")
    # A spare that can take this model is not a victim: evicting it would only make the load
    # wait for a fresh process.
    keep = next((s for s in core.spares if spare.can_adopt(s, slot.entry)), None)
    hs = holders(core, slot.entry.id, keep)
    plan = plan_admission(need, hs, core.budget, core.max_models)
    ahead = _ahead(core, slot)
    if not plan.fits or (ahead and not _fits_behind(core, slot, ahead, plan)):
        return _wait_for_turn(core, slot, hs, ahead)
    _evict(core, slot, plan)
    if plan.wait or slot.worker is not None:
        return c.move_slot(slot, SlotState.PENDING, "waiting for reaps")  # retried on every reap
    c.move_slot(slot, SlotState.COLD, "admitted")
    start(core, slot)


def served_total(core: c.Core, s: Slot) -> float:
    """Seconds the model has held memory in all: past turns plus the current one."""
    w = s.worker
    now_turn = core.now() - w.ready_mono if w is not None and w.ready_mono is not None else 0.0
    return s.served_seconds + now_turn


def _candidate(core: c.Core, s: Slot) -> turns.Candidate:
    return turns.Candidate(s.entry.id, served_total(core, s),
                           s.waiters[0].since if s.waiters else core.now())


def _ahead(core: c.Core, slot: Slot) -> list[Slot]:
    """The WAITING models before ``slot`` in turn order."""
    waiting = {s.entry.id: s for s in core.slots.values()
               if s.state is SlotState.WAITING and s is not slot}
    if not waiting:
        return []
    order = turns.turn_order([_candidate(core, s) for s in [*waiting.values(), slot]])
    return [waiting[m] for m in order[:order.index(slot.entry.id)]]


def _fits_behind(core: c.Core, slot: Slot, ahead: list[Slot], plan: Plan) -> bool:
    """A model behind others in turn order starts only in memory that is free now and that
    they do not need: it never takes what is being freed for them."""
    if plan.victims or plan.wait:
        return False
    free = core.budget - core.used_bytes() - sum(h.bytes for h in holders(core, slot.entry.id)
                                                 if h.model_id.endswith("#reserved"))
    return slot.need + sum(s.need for s in ahead) <= free


def _turn_holders(core: c.Core, exclude: str) -> list[turns.Holder]:
    now = core.now()
    out = [turns.Holder(h.model_id, h.bytes, _served(w, now), pinned=h.pinned, busy=h.busy,
                        stopping=h.stopping,
                        total=served_total(core, core.slots[w.model_id]) if w.model_id in core.slots
                        else 0.0)
           for w in core.workers.values() for h in [_holder(core, w)]]
    out += [turns.Holder(s.entry.id + "#reserved", s.need, None)
            for s in core.slots.values() if s.pending and s.entry.id != exclude]
    return out


def _served(w: Worker, now: float) -> float | None:
    if w.spare:
        return float("inf")  # the warm spare yields at once
    if w.state is State.READY and w.ready_mono is not None:
        return now - w.ready_mono
    return None


def _wait_for_turn(core: c.Core, slot: Slot, hs: list[Holder], ahead: list[Slot]) -> None:
    """Queue ``slot`` for a turn; the first in turn order makes the holders yield."""
    th = _turn_holders(core, slot.entry.id)
    turn = turns.plan_turn(slot.need, th, core.budget, core.max_models,
                           min_turn=core.cfg.turn_seconds, drain=TURN_DRAIN)
    if not turn.fits_ever:
        return _refuse(slot, _no_room(core, slot, hs, never=True))
    c.move_slot(slot, SlotState.WAITING, "memory held by busy models: waiting for a turn")
    slot.eta = max((s.eta for s in ahead), default=core.now()) + turn.wait
    if ahead:
        return
    for victim_id in turn.victims:
        victim = spare.victim(core) if victim_id == spare.SPARE else core.slots[victim_id].worker
        if victim is not None and victim.state is State.READY:
            reason = f"yielding its turn to {slot.entry.id} (held its memory {core.cfg.turn_seconds:g}s+)"
            core.fx.emit(ev.Evicted(model=victim_id, pid=victim.pid, reason=reason))
            c.drain(core, victim, reason)


def _no_room(core: c.Core, slot: Slot, hs: list[Holder], never: bool = False) -> APIError:
    held = ", ".join(f"{h.model_id} {format_size(h.bytes)}"
                     + (" (pinned)" if h.pinned else " (busy)" if h.busy else "")
                     for h in hs) or "nothing"
    need = slot.need
    why = " (pinned models leave too little, whatever is evicted)" if never else ""
    return APIError(
        503, f"not enough memory for model {slot.entry.id!r}{why}: needs {format_size(need)}, "
        f"budget {format_size(core.budget)}, {format_size(core.used_bytes())} in use by: {held}",
        code="insufficient_memory", retry_after=None if never else 10)


def _evict(core: c.Core, slot: Slot, plan: Plan) -> None:
    """Drain the plan's victims; one idle victim that can take the model is recycled instead
    (``recycle.py``): it unloads and becomes the spare this admission adopts."""
    reuse = recycle.choose(core, slot, plan.victims)
    for victim_id in plan.victims:
        victim = spare.victim(core) if victim_id == spare.SPARE else core.slots[victim_id].worker
        if victim is not None:
            core.fx.emit(ev.Evicted(model=victim_id, pid=victim.pid,
                                    reason=f"making room for {slot.entry.id}"))
            why = f"evicted (LRU) to make room for {slot.entry.id}"
            if victim is reuse:
                recycle.begin(core, victim, why + ": recycling its process")
            else:
                c.drain(core, victim, why)


def retry(core: c.Core) -> None:
    """After a reap (or a failed spawn): every waiting admission tries again; those admitted
    (PENDING) first, then the ones WAITING for a turn, in turn order."""
    for slot in core.slots.values():
        if slot.pending:
            c.move_slot(slot, SlotState.COLD, "retrying")
            admit(core, slot)
    waiting = {s.entry.id: s for s in core.slots.values() if s.state is SlotState.WAITING}
    for model_id in turns.turn_order([_candidate(core, s) for s in waiting.values()]):
        admit(core, waiting[model_id])


def start(core: c.Core, slot: Slot) -> None:
    """A worker for ``slot``: the warm spare when it can take the model, else a new process."""
    e = slot.entry
    if spare.adopt(core, slot):
        return
    w = core.new_worker(e.id, e.id, e, slot.need, e.kind)
    slot.worker = w
    slot.loads += 1
    core.fx.emit(ev.Spawning(model=e.id))
    log.info("model=%s spawning worker %s (%s %s, ledger %s of %s)", e.id, w.worker_id,
             "learned" if slot.need != e.estimate else "estimate", format_size(slot.need),
             format_size(core.used_bytes()), format_size(core.budget))
    core.fx.spawn(w, e)
