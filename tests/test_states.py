"""The state machine: legal moves only, each logged with model, pid and reason."""

import logging
from dataclasses import dataclass

import pytest

from mlx_supervisor.gateway.supervisor.states import (
    LEGAL,
    IllegalTransition,
    State,
    on_transition,
    transition,
)


@dataclass
class W:
    model_id: str = "m"
    pid: int | None = 42
    state: State = State.STARTING


def test_happy_path_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    w, seen = W(), []
    on_transition(lambda w_, old, new, why: seen.append((old, new, why)))
    caplog.set_level(logging.INFO, "mlx_supervisor.state")
    for new in (State.LOADING, State.READY, State.DRAINING, State.STOPPED):
        transition(w, new, f"to {new.value}")
    assert w.state is State.STOPPED
    assert [n for _, n, _ in seen[-4:]] == [State.LOADING, State.READY, State.DRAINING, State.STOPPED]
    assert "model=m pid=42 ready->draining reason=to draining" in caplog.text


@pytest.mark.parametrize("old", list(State))
def test_terminal_states_go_nowhere_and_crash_is_reachable_from_every_live_state(old: State) -> None:
    if old in (State.STOPPED, State.CRASHED):
        assert not LEGAL[old]
        with pytest.raises(IllegalTransition):
            transition(W(state=old), State.READY, "resurrect")
    else:
        assert State.CRASHED in LEGAL[old]


def test_ready_cannot_go_back_to_loading() -> None:
    with pytest.raises(IllegalTransition):
        transition(W(state=State.READY), State.LOADING, "no")
