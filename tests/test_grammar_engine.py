"""Grammar state in the LM engine, in-process on the tiny tool-calling llama: one matcher per
request survives the solo path, the hand-over into the batch and back, the prompt cache, seeded
sampling, stop strings and cancels (the output is the same as the request alone, and valid)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from mlx_supervisor.shared.protocol import Chunk, Done, Generate, JsonFormat
from mlx_supervisor.worker.engines.lm import LMEngine
from mlx_supervisor.worker.testing import run_script, text

ASK = [{"role": "user", "content": "Give me a small record."}]
SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 8},
                   "size": {"type": "integer", "minimum": 0, "maximum": 999},
                   "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3}},
    "required": ["name", "size", "tags"], "additionalProperties": False,
}
TOOLS = [{"type": "function", "function": {"name": "lookup", "parameters": SCHEMA}}]


@pytest.fixture(scope="module")
def engine(tools_model_dir: Path):
    e = LMEngine()
    e.load(str(tools_model_dir))
    yield e
    e.close()


def calls(msgs: list) -> list[tuple[str, str]]:
    return [(c.name, c.arguments) for m in msgs if isinstance(m, Chunk) for c in m.tool_calls]


def json_req(rid: str, **kw: Any) -> Generate:
    return Generate(id=rid, **{"messages": ASK, "max_tokens": 120, "temperature": 1.0,
                               "seed": 11, "json_format": JsonFormat(schema=SCHEMA), **kw})


def test_a_grammar_survives_the_hand_over_into_the_batch_and_back(engine: LMEngine):
    a = json_req("a")
    alone = text(run_script(engine, {0: [a]})[0]["a"])
    jsonschema.validate(json.loads(alone), SCHEMA)
    noise = Generate(id="n", messages=ASK, max_tokens=6, temperature=1.0)
    for at in (1, 3, 6):  # a hands over at its first tokens, and later
        out, steps = run_script(engine, {0: [a], at: [noise]})
        assert text(out["a"]) == alone, at
        solo_steps = [s.alone for s in steps]
        assert solo_steps[0] and not all(solo_steps) and solo_steps[-2]  # alone, batch, alone


def test_a_forced_call_survives_batching_beside_another_grammar(engine: LMEngine):
    c = Generate(id="c", messages=ASK, tools=TOOLS, tool_choice="required",
                 parallel_tool_calls=False, max_tokens=120, temperature=1.0, seed=4)
    alone = run_script(engine, {0: [c]})[0]["c"]
    out, _ = run_script(engine, {0: [c], 2: [json_req("j", seed=5)]})
    assert calls(out["c"]) == calls(alone) and len(calls(alone)) == 1
    assert isinstance(out["c"][-1], Done) and out["c"][-1].finish_reason == "tool_calls"
    name, args = calls(alone)[0]
    assert name == "lookup"
    jsonschema.validate(json.loads(args), SCHEMA)
    jsonschema.validate(json.loads(text(out["j"])), SCHEMA)


def test_the_prompt_cache_and_a_cancel_leave_grammars_fresh(engine: LMEngine):
    first, _ = run_script(engine, {0: [json_req("p")]})
    again, _ = run_script(engine, {0: [json_req("p")]})
    assert again["p"][-1].cached_tokens > 0 and text(again["p"]) == text(first["p"])
    out, _ = run_script(engine, {0: [json_req("x", seed=1), json_req("y", seed=2)], 4: ["x"]})
    assert not any(isinstance(m, Done) for m in out["x"])
    alone = text(run_script(engine, {0: [json_req("y", seed=2)]})[0]["y"])
    assert text(out["y"]) == alone


def test_a_stop_string_ends_a_constrained_answer(engine: LMEngine):
    out, _ = run_script(engine, {0: [json_req("s", stop=[","])]})
    assert out["s"][-1].finish_reason == "stop"
    assert text(out["s"]).startswith("{") and "," not in text(out["s"])
