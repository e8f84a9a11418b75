"""Flow control in the LM engine, in-process on real tiny llamas: a paused sequence leaves the
decode steps (nothing is emitted for it, the other goes on), and on resume it produces exactly
the text it would have produced unpaused (greedy, seeded, grammar-constrained). A cancel while
paused drops it."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest

from mlx_supervisor.shared.protocol import Chunk, Done, Generate, JsonFormat
from mlx_supervisor.worker.engines.lm import LMEngine
from mlx_supervisor.worker.testing import run_script, text

CHAT = [{"role": "user", "content": "Hello there, how are you today?"}]
SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8},
                                           "size": {"type": "integer", "minimum": 0, "maximum": 999}},
          "required": ["name", "size"], "additionalProperties": False}


def _engine(path: Path):
    e = LMEngine()
    e.load(str(path))
    yield e
    e.close()


@pytest.fixture(scope="module")
def engine(demo_model_dir: Path):
    yield from _engine(demo_model_dir)


@pytest.fixture(scope="module")
def tools_engine(tools_model_dir: Path):
    yield from _engine(tools_model_dir)


def done(msgs: list) -> Done:
    assert isinstance(msgs[-1], Done), msgs[-1]
    return msgs[-1]


def alone(engine: LMEngine, req: Generate) -> str:
    return text(run_script(engine, {0: [req]})[0][req.id])


def test_a_paused_sequence_sits_out_while_the_other_decodes(engine: LMEngine):
    a = Generate(id="a", prompt="Once upon a time", max_tokens=40, temperature=0.0)
    b = Generate(id="b", messages=CHAT, max_tokens=40, temperature=0.0)
    want_a, want_b = alone(engine, a), alone(engine, b)
    for at in (3, 8):  # paused in the batch, early and later
        out, steps = run_script(engine, {0: [a], 1: [b], at: [("pause", "a")],
                                         at + 20: [("resume", "a")]})
        seen = [s.got for s in steps]
        assert not any("a" in s for s in seen[at:at + 20]), at
        assert all("b" in s for s in seen[at + 2:at + 20]), at  # b decodes on, every step
        assert text(out["a"]) == want_a and text(out["b"]) == want_b, at
        assert done(out["a"]).completion_tokens == 40


def test_a_lone_paused_sequence_leaves_the_engine_idle_and_resumes_exactly(engine: LMEngine):
    a = Generate(id="a", prompt="Once upon a time", max_tokens=30, temperature=0.0)
    want = alone(engine, a)
    out, steps = run_script(engine, {0: [a], 4: [("pause", "a")], 5: [], 9: [("resume", "a")]})
    seen = [s.got for s in steps]
    assert seen[4:9] == [set()] * 5 and text(out["a"]) == want
    # resumed while another runs: it joins the batch, still exact
    b = Generate(id="b", messages=CHAT, max_tokens=30, temperature=0.0)
    out, _ = run_script(engine, {0: [a], 4: [("pause", "a")], 5: [b], 9: [("resume", "a")]})
    assert text(out["a"]) == want and text(out["b"]) == alone(engine, b)


def test_a_seeded_sequence_reproduces_across_a_pause(engine: LMEngine):
    s = Generate(id="s", prompt="Hello world", max_tokens=30, temperature=1.0, top_p=0.95,
                 seed=7)
    noise = Generate(id="n", messages=CHAT, max_tokens=40, temperature=1.0)
    want = alone(engine, s)
    for script in ({0: [s], 3: [("pause", "s")], 6: [("resume", "s")]},
                   {0: [s, noise], 5: [("pause", "s")], 12: [("resume", "s")]}):
        assert text(run_script(engine, script)[0]["s"]) == want


def test_a_pause_while_prefilling_in_the_batch_takes_at_the_first_token(engine: LMEngine):
    a = Generate(id="a", prompt="Once upon a time", max_tokens=20, temperature=0.0)
    b = Generate(id="b", messages=CHAT, max_tokens=30, temperature=0.0)
    out, steps = run_script(engine, {0: [a, b], 1: [("pause", "a")], 15: [("resume", "a")]})
    seen = [s.got for s in steps]
    assert sum(isinstance(m, Chunk) for m in out["a"][:-1]) >= 1
    assert not any("a" in s for s in seen[4:15])
    assert text(out["a"]) == alone(engine, a) and text(out["b"]) == alone(engine, b)


def test_a_grammar_keeps_its_state_across_a_pause(tools_engine: LMEngine):
    j = Generate(id="j", messages=[{"role": "user", "content": "A record."}], max_tokens=80,
                 temperature=1.0, seed=3, json_format=JsonFormat(schema=SCHEMA))
    noise = Generate(id="n", messages=CHAT, max_tokens=20, temperature=1.0)
    want = alone(tools_engine, j)
    jsonschema.validate(json.loads(want), SCHEMA)
    for at in (2, 5):
        out, _ = run_script(tools_engine, {0: [j, noise], at: [("pause", "j")],
                                           at + 6: [("resume", "j")]})
        assert text(out["j"]) == want, at


def test_cancel_while_paused_drops_it_and_the_other_goes_on(engine: LMEngine):
    a = Generate(id="a", prompt="Once upon a time", max_tokens=200, temperature=0.0)
    b = Generate(id="b", messages=CHAT, max_tokens=30, temperature=0.0)
    out, steps = run_script(engine, {0: [a, b], 5: [("pause", "a")], 8: [("cancel", "a")],
                                     9: [("resume", "a")]})
    seen = [s.got for s in steps]
    assert not any("a" in s for s in seen[5:]) and not isinstance(out["a"][-1], Done)
    assert text(out["b"]) == alone(engine, b)
    lone, _ = run_script(engine, {0: [a], 3: [("pause", "a")], 4: [("cancel", "a")]})
    assert not isinstance(lone["a"][-1], Done) and engine.prompt_cache is not None
