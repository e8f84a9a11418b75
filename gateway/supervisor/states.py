"""The worker state machine: one enum, one table of legal moves, one ``transition()``."""

from __future__ import annotations

import enum
import logging
from collections.abc import Callable
from typing import Protocol

log = logging.getLogger("mlx_supervisor.state")


class State(str, enum.Enum):
    STARTING = "starting"  # process spawned, not yet connected
    LOADING = "loading"  # connected, weights loading
    READY = "ready"  # serving; may have requests in flight
    DRAINING = "draining"  # no new requests; stopped once the in-flight ones finish
    STOPPED = "stopped"  # process exited after we asked it to
    CRASHED = "crashed"  # exited unasked, failed to load, or missed heartbeats


S = State
LEGAL: dict[State, frozenset[State]] = {
    S.STARTING: frozenset({S.LOADING, S.READY, S.DRAINING, S.CRASHED}),
    S.LOADING: frozenset({S.READY, S.DRAINING, S.CRASHED}),
    S.READY: frozenset({S.DRAINING, S.CRASHED}),
    S.DRAINING: frozenset({S.STOPPED, S.CRASHED}),
    S.STOPPED: frozenset(),
    S.CRASHED: frozenset(),
}
HOT = frozenset({S.STARTING, S.LOADING, S.READY, S.DRAINING})


class HasState(Protocol):
    model_id: str
    pid: int | None
    state: State


class IllegalTransition(RuntimeError):
    pass


Listener = Callable[[HasState, State, State, str], None]
_listeners: list[Listener] = []


def on_transition(fn: Listener) -> Listener:
    """Subscribe to every transition (metrics, the event stream of the status page)."""
    _listeners.append(fn)
    return fn


def off_transition(fn: Listener) -> None:
    """Unsubscribe (a gateway that shuts down in a process that lives on, as in tests)."""
    if fn in _listeners:
        _listeners.remove(fn)


def transition(w: HasState, new: State, reason: str) -> None:
    old = w.state
    if new not in LEGAL[old]:
        raise IllegalTransition(f"{w.model_id}: {old.value} -> {new.value} ({reason})")
    w.state = new
    log.info("model=%s pid=%s %s->%s reason=%s", w.model_id, w.pid, old.value, new.value, reason)
    for fn in list(_listeners):
        try:
            fn(w, old, new, reason)
        except Exception:  # a broken listener must not break the supervisor
            log.exception("transition listener failed")
