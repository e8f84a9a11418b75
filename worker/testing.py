"""A harness that tests (and scratch measurements) use to drive an engine in-process, step by
step, the way the worker's MLX thread does: submit, cancel, pause and resume between steps."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from mlx_supervisor.shared.protocol import Chunk, Generate


@dataclass
class Step:
    """What one engine step did: whether one request was decoding alone (the solo path), and
    the ids that got a message."""

    alone: bool
    got: set[str] = field(default_factory=set)


def drive(engine: Any, script: dict[int, list[Any]], on_step: Callable[[set[str]], None],
          limit: int = 5000) -> dict[str, list[Any]]:
    """Before step n do ``script[n]`` (a Generate is submitted, a str cancelled, ``(verb, id)``
    calls ``engine.pause``/``resume``/``cancel``); step until idle, calling ``on_step`` after
    each step with the ids that got a message. Returns each request's messages."""
    out: dict[str, list[Any]] = {}
    n = 0
    while n <= max(script) or engine.has_work():
        for action in script.get(n, []):
            if isinstance(action, Generate):
                out.setdefault(action.id, [])
                engine.submit(action, lambda m: out[m.id].append(m))
            elif isinstance(action, str):
                engine.cancel(action)
            else:
                getattr(engine, action[0])(action[1])
        got: set[str] = set()

        def emit(m: Any, got: set[str] = got) -> None:
            out[m.id].append(m)
            got.add(m.id)

        if engine.has_work():
            engine.step(emit)
        on_step(got)
        n += 1
        assert n < limit, "the engine never went idle"
    return out


def run_script(engine: Any, script: dict[int, list[Any]]) -> tuple[dict[str, list[Any]], list[Step]]:
    """:func:`drive` an LM engine through ``script``, recording every step (whether a request
    decoded alone). Ends with the engine holding nothing."""
    steps: list[Step] = []
    out = drive(engine, script, lambda got: steps.append(Step(engine.solo is not None, got)))
    assert not engine.running and not engine.by_id and not engine.paused and engine.solo is None
    return out, steps


def text(msgs: list[Any]) -> str:
    """A request's streamed text."""
    return "".join(m.text for m in msgs if isinstance(m, Chunk))
