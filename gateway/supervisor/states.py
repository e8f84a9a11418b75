"""The state machines: one enum and one table of legal moves for a worker, one for a model's
slot, and one ``transition()`` for each that checks the move and logs it. Observers hear of a
move through the gateway's bus (``core.move`` publishes it); nothing here is process-global."""

from __future__ import annotations

import enum
import logging
from typing import Protocol

log = logging.getLogger("mlx_supervisor.state")


class State(str, enum.Enum):
    STARTING = "starting"  # process spawned, not yet connected
    IDLE = "idle"  # a warm spare: connected, imports done, no model yet
    LOADING = "loading"  # connected, weights loading
    READY = "ready"  # serving; may have requests in flight
    UNLOADING = "unloading"  # evicted while idle: dropping its model, to be recycled (recycle.py)
    DRAINING = "draining"  # no new requests; stopped once the in-flight ones finish
    STOPPING = "stopping"  # asked to exit (Shutdown, then SIGTERM, then SIGKILL); not yet reaped
    KILLING = "killing"  # no longer trusted (hung, failed load): SIGKILLed, not yet reaped
    STOPPED = "stopped"  # process exited after we asked it to
    CRASHED = "crashed"  # exited unasked, failed to load, or killed


S = State
_ENDS = frozenset({S.KILLING, S.CRASHED})
LEGAL: dict[State, frozenset[State]] = {
    S.STARTING: frozenset({S.IDLE, S.LOADING, S.READY, S.DRAINING, S.STOPPING}) | _ENDS,
    S.IDLE: frozenset({S.LOADING, S.DRAINING, S.STOPPING}) | _ENDS,
    S.LOADING: frozenset({S.READY, S.DRAINING, S.STOPPING}) | _ENDS,
    S.READY: frozenset({S.UNLOADING, S.DRAINING, S.STOPPING}) | _ENDS,
    S.UNLOADING: frozenset({S.IDLE, S.DRAINING, S.STOPPING}) | _ENDS,
    S.DRAINING: frozenset({S.STOPPING, S.STOPPED}) | _ENDS,
    S.STOPPING: frozenset({S.STOPPED}) | _ENDS,
    S.KILLING: frozenset({S.CRASHED}),
    S.STOPPED: frozenset(),
    S.CRASHED: frozenset(),
}
HOT = frozenset({S.STARTING, S.IDLE, S.LOADING, S.READY, S.UNLOADING, S.DRAINING, S.STOPPING,
                 S.KILLING})
# On its way out (its bytes free soon); an unloading worker's model bytes free, and the process
# that stays is the admitted model's (recycle.py).
LEAVING = frozenset({S.UNLOADING, S.DRAINING, S.STOPPING, S.KILLING})
EXITING = frozenset({S.STOPPING, S.KILLING})  # the stop or kill path already runs


class SlotState(str, enum.Enum):
    """A model's admission, whatever its worker does."""

    COLD = "cold"  # nothing wanted, or admitted (the worker, if any, says the rest)
    PENDING = "pending"  # admitted, waiting for the reaps that make room
    WAITING = "waiting"  # its memory is held by busy models: queued for a turn (turns.py)
    BACKING_OFF = "backing_off"  # crashed recently: the respawn waits for ``respawn_at``
    FAILED = "failed"  # crashed ``max_crashes`` times: refused until ``failed_until``


_W = SlotState.WAITING
SLOT_LEGAL: dict[SlotState, frozenset[SlotState]] = {
    SlotState.COLD: frozenset({SlotState.PENDING, SlotState.BACKING_OFF, SlotState.FAILED, _W}),
    SlotState.PENDING: frozenset({SlotState.COLD, SlotState.BACKING_OFF, SlotState.FAILED, _W}),
    SlotState.BACKING_OFF: frozenset({SlotState.COLD, SlotState.PENDING, SlotState.FAILED, _W}),
    SlotState.FAILED: frozenset({SlotState.COLD}),
    _W: frozenset({SlotState.COLD, SlotState.PENDING, SlotState.BACKING_OFF, SlotState.FAILED}),
}


class HasState(Protocol):
    model_id: str
    pid: int | None
    state: State


class HasSlotState(Protocol):
    @property
    def model_id(self) -> str: ...
    state: SlotState


class IllegalTransition(RuntimeError):
    pass


def transition(w: HasState, new: State, reason: str) -> State:
    """Check and make one move; returns the old state."""
    old = w.state
    if new not in LEGAL[old]:
        raise IllegalTransition(f"{w.model_id}: {old.value} -> {new.value} ({reason})")
    w.state = new
    log.info("model=%s pid=%s %s->%s reason=%s", w.model_id, w.pid, old.value, new.value, reason)
    return old


def slot_transition(s: HasSlotState, new: SlotState, reason: str) -> None:
    """The slot's move; staying put is no move (admission is retried often)."""
    old = s.state
    if new is old:
        return
    if new not in SLOT_LEGAL[old]:
        raise IllegalTransition(f"{s.model_id}: slot {old.value} -> {new.value} ({reason})")
    s.state = new
    log.info("model=%s slot %s->%s reason=%s", s.model_id, old.value, new.value, reason)
