"""The state machines: legal moves only, each logged with model, pid and reason; observers
hear of moves through the gateway's bus, so nothing here is global (or leaks between tests)."""

import logging
from dataclasses import dataclass

import pytest

from mlx_supervisor.gateway.supervisor import states
from mlx_supervisor.gateway.supervisor.states import (
    HOT,
    LEGAL,
    SLOT_LEGAL,
    IllegalTransition,
    SlotState,
    State,
    slot_transition,
    transition,
)


@dataclass
class W:
    model_id: str = "m"
    pid: int | None = 42
    state: State = State.STARTING


@dataclass
class S:
    model_id: str = "m"
    state: SlotState = SlotState.COLD


def test_happy_path_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    w = W()
    caplog.set_level(logging.INFO, "mlx_supervisor.state")
    path = (State.LOADING, State.READY, State.DRAINING, State.STOPPING, State.STOPPED)
    olds = [transition(w, new, f"to {new.value}") for new in path]
    assert w.state is State.STOPPED
    assert olds == [State.STARTING, *path[:-1]]
    assert "model=m pid=42 ready->draining reason=to draining" in caplog.text


def test_no_listener_registry_exists() -> None:
    assert not [n for n in dir(states) if "listener" in n.lower() or n == "on_transition"]


def test_a_spare_idles_then_loads_and_a_kill_ends_crashed() -> None:
    w = W()
    for new in (State.IDLE, State.LOADING, State.KILLING, State.CRASHED):
        transition(w, new, "x")
    with pytest.raises(IllegalTransition):
        transition(W(state=State.KILLING), State.STOPPED, "a killed worker did not stop cleanly")


@pytest.mark.parametrize("old", list(State))
def test_terminal_states_go_nowhere_and_crash_is_reachable_from_every_live_state(old: State) -> None:
    if old in (State.STOPPED, State.CRASHED):
        assert not LEGAL[old] and old not in HOT
        with pytest.raises(IllegalTransition):
            transition(W(state=old), State.READY, "resurrect")
    else:
        assert State.CRASHED in LEGAL[old] and old in HOT


def test_ready_cannot_go_back_to_loading() -> None:
    with pytest.raises(IllegalTransition):
        transition(W(state=State.READY), State.LOADING, "no")


def test_slot_moves_are_checked_and_staying_put_is_no_move(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "mlx_supervisor.state")
    s = S()
    slot_transition(s, SlotState.PENDING, "waiting for reaps")
    slot_transition(s, SlotState.PENDING, "again")
    assert caplog.text.count("slot cold->pending") == 1 and "again" not in caplog.text
    slot_transition(s, SlotState.FAILED, "3 crashes")
    with pytest.raises(IllegalTransition):
        slot_transition(s, SlotState.PENDING, "a failed model is not admitted")
    assert SLOT_LEGAL[SlotState.FAILED] == {SlotState.COLD}
