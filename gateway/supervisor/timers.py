"""The timers, run on every ``Tick``: ``due(core, now)`` is a pure function from the state and
the time to a list of actions (heartbeat loss, load timeouts, idle ttl, pings, backoff expiry,
memory growth over the budget, the warm spare); ``on_tick`` applies them."""

from __future__ import annotations

from dataclasses import dataclass

from mlx_supervisor.gateway.supervisor import admin, admission, recycle, spare
from mlx_supervisor.gateway.supervisor import core as c
from mlx_supervisor.gateway.supervisor import events as ev
from mlx_supervisor.gateway.supervisor.eviction import Usage, relieve
from mlx_supervisor.gateway.supervisor.model import Slot, Tick, Worker
from mlx_supervisor.gateway.supervisor.states import EXITING, LEAVING, SlotState, State
from mlx_supervisor.shared import protocol as p
from mlx_supervisor.shared.sizes import format_size


@dataclass(frozen=True)
class Kill:
    worker_id: str
    reason: str


@dataclass(frozen=True)
class Drain:
    worker_id: str
    reason: str
    why: str = ""  # "ttl" | "over_budget" | "recycle": what the observers hear


@dataclass(frozen=True)
class Ping:
    pass


@dataclass(frozen=True)
class Admit:
    model_id: str
    backoff_over: bool = False  # a pending admission's respawn time has come


@dataclass(frozen=True)
class Recover:
    """A failed model's backoff is over."""

    model_id: str


@dataclass(frozen=True)
class StartSpare:
    pass


Action = Kill | Drain | Ping | Admit | Recover | StartSpare


def due(core: c.Core, now: float) -> list[Action]:
    acts: list[Action] = []
    for w in core.workers.values():
        acts += _worker_due(core, w, now)
    if now - core.last_ping >= core.cfg.heartbeat_interval:
        acts.append(Ping())
    for slot in core.slots.values():
        acts += _slot_due(core, slot, now)
    acts += _budget_due(core)
    if spare.wanted(core, admission.holders(core, spare.SPARE), now):
        acts.append(StartSpare())
    return acts


def _worker_due(core: c.Core, w: Worker, now: float) -> list[Action]:
    if w.proc is None or w.proc.exited or w.state in EXITING:
        return []
    cfg = core.cfg
    silent = now - w.last_heartbeat
    if w.kill_reason and w.state is not State.DRAINING:
        # A failed loader that did not exit by itself.
        return [Kill(w.worker_id, w.kill_reason)] if silent > 1.0 else []
    if w.state is State.STARTING:
        # No Hello yet: the interpreter is still importing (15 s for mlx_lm on some machines),
        # so only load_timeout applies, not the heartbeat timeout.
        if now - w.load_started > cfg.load_timeout:
            return [Kill(w.worker_id, f"did not start within load_timeout ({cfg.load_timeout:g}s)")]
        return []
    if silent > cfg.heartbeat_timeout:
        return [Kill(w.worker_id, f"missed heartbeats for {silent:.1f}s (hung?)")]
    if w.state is State.UNLOADING and now - w.load_started > recycle.UNLOAD_TIMEOUT:
        return [Kill(w.worker_id, f"did not unload within {recycle.UNLOAD_TIMEOUT:g}s")]
    if w.state is State.LOADING and now - w.load_started > cfg.load_timeout:
        return [Kill(w.worker_id, f"did not load within load_timeout ({cfg.load_timeout:g}s)")]
    if w.state is State.READY and w.inflight == 0:
        slot = core.slots.get(w.model_id)
        if (slot and not slot.waiters and not slot.pinned and slot.entry.ttl > 0
                and now - w.last_used_mono >= slot.entry.ttl):
            return [Drain(w.worker_id, f"idle for {slot.entry.ttl:g}s (ttl)", "ttl")]
    return []


def _slot_due(core: c.Core, slot: Slot, now: float) -> list[Action]:
    if slot.state is SlotState.FAILED:
        return [Recover(slot.entry.id)] if slot.failed_until <= now else []
    if slot.pending and slot.respawn_at <= now:
        return [Admit(slot.entry.id, backoff_over=True)]
    if slot.state is SlotState.WAITING:  # a holder's turn may have run out
        return [Admit(slot.entry.id)]
    if slot.pinned and slot.worker is None and not core.closing and not slot.pending:
        return [Admit(slot.entry.id)]
    return []


def _budget_due(core: c.Core) -> list[Action]:
    """``eviction.relieve`` when measured growth puts the ledger over the budget."""
    over = core.used_bytes() - core.budget
    if over <= 0:
        return []
    usages = [Usage(w.worker_id, w.bytes, w.estimate, -1.0 if w.spare else w.last_used_mono,
                    idle=(w.state is State.READY and w.inflight == 0) or w.state is State.IDLE,
                    pinned=bool(w.model_id in core.slots and core.slots[w.model_id].pinned),
                    stopping=w.state in LEAVING, ready=w.state is State.READY,
                    recycling=w.recycle)
              for w in core.workers.values()]
    evict, recycle = relieve(usages, core.budget)
    acts: list[Action] = [Drain(wid, f"evicted: memory over budget by {format_size(over)}",
                                "over_budget") for wid in evict]
    if recycle is not None:
        acts.append(Drain(recycle, "recycled: grew past its memory share", "recycle"))
    return acts


def on_tick(core: c.Core, e: Tick) -> None:
    now = core.now()
    for act in due(core, now):
        apply(core, act, now)
    for slot in core.slots.values():  # queue waiters whose client gave up
        for w in [w for w in slot.waiters if w.fut.done()]:
            slot.waiters.remove(w)
    admin.check_shutdown(core)


def apply(core: c.Core, act: Action, now: float) -> None:
    if isinstance(act, Ping):
        core.last_ping = now
        for w in core.workers.values():
            if w.pid is not None:
                core.fx.send(w.worker_id, p.Ping())
    elif isinstance(act, StartSpare):
        spare.start(core)
    elif isinstance(act, Admit | Recover):
        slot = core.slots[act.model_id]
        if isinstance(act, Recover):
            c.move_slot(slot, SlotState.COLD, "backoff over")
            wanted = slot.pinned or slot.waiters or slot.load_waiters
            if not wanted or slot.worker is not None or core.closing:
                return
        if isinstance(act, Admit) and act.backoff_over:
            slot.respawn_at = 0.0
        if slot.state is not SlotState.WAITING:
            c.move_slot(slot, SlotState.COLD, "admitting")
        admission.admit(core, slot)
    elif (w := core.workers.get(act.worker_id)) is not None:
        if isinstance(act, Kill):
            c.kill(core, w, act.reason)
        else:
            _drain(core, w, act, now)


def _drain(core: c.Core, w: Worker, act: Drain, now: float) -> None:
    if act.why == "recycle":
        w.recycle = True
        c.log.warning("model=%s pid=%s grew to %s (estimate %s) and the ledger is over budget: "
                      "recycling it when its requests finish", w.model_id, w.pid,
                      format_size(w.bytes), format_size(w.estimate))
        if w.inflight:
            return
    elif act.why == "ttl":
        core.fx.emit(ev.TtlExpired(model=w.model_id, pid=w.pid))
    else:
        c.log.warning("%s: evicting %s", act.reason, w.model_id)
        core.fx.emit(ev.Evicted(model=w.model_id, pid=w.pid, reason="over budget"))
    c.drain(core, w, act.reason)
