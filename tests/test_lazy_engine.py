"""``tool_choice`` auto's lazy grammar in the LM engine, in-process on the tiny tool-calling
llama: armed when the model samples ``<tool_call>`` (a logit_bias makes it), solo or in the
batch, it survives the hand-overs, a pause, the prompt cache and cancels (the calls are those
of the request alone, and valid); with ``parallel_tool_calls`` each call opened is enforced."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from tokenizers import Tokenizer

from mlx_supervisor.shared.protocol import Done, Generate
from mlx_supervisor.worker.engines.lm import LMEngine
from mlx_supervisor.worker.testing import run_script
from tests.test_grammar_engine import ASK, SCHEMA, TOOLS, calls


@pytest.fixture(scope="module")
def engine(tools_model_dir: Path):
    e = LMEngine()
    e.load(str(tools_model_dir))
    yield e
    e.close()


@pytest.fixture(scope="module")
def start(tools_model_dir: Path) -> int:
    tok = Tokenizer.from_file(str(tools_model_dir / "tokenizer.json"))
    return int(tok.token_to_id("<tool_call>"))


def auto(rid: str, start: int, **kw: Any) -> Generate:
    return Generate(id=rid, **{"messages": ASK, "tools": TOOLS, "tool_choice": "auto",
                               "parallel_tool_calls": False, "max_tokens": 120,
                               "temperature": 1.0, "seed": 9, "logit_bias": {start: 100.0},
                               **kw})


def valid(out: list[Any], n: int = 1) -> list[tuple[str, str]]:
    got = calls(out)
    assert len(got) >= n, out
    for name, args in got:
        assert name == "lookup"
        jsonschema.validate(json.loads(args), SCHEMA)
    return got


def test_armed_alone_or_in_the_batch_and_handed_over(engine: LMEngine, start: int):
    a = auto("a", start)
    alone = run_script(engine, {0: [a]})[0]["a"]
    assert isinstance(alone[-1], Done) and alone[-1].finish_reason == "tool_calls"
    want = valid(alone)
    noise = Generate(id="n", messages=ASK, max_tokens=8, temperature=1.0)
    for at in (1, 3, 6):  # armed solo, then handed into the batch (mid-call) and back
        out, _ = run_script(engine, {0: [a], at: [noise]})
        assert calls(out["a"]) == want, at
    long_noise = Generate(id="n", messages=ASK, max_tokens=40, temperature=1.0)
    out, _ = run_script(engine, {0: [long_noise], 1: [a]})  # armed in the batch
    assert calls(out["a"]) == want


def test_a_pause_the_prompt_cache_and_a_cancel(engine: LMEngine, start: int):
    a = auto("a", start)
    want = valid(run_script(engine, {0: [a]})[0]["a"])
    noise = Generate(id="n", messages=ASK, max_tokens=30, temperature=1.0)
    for at in (2, 5):
        out, _ = run_script(engine, {0: [a, noise], at: [("pause", "a")],
                                     at + 4: [("resume", "a")]})
        assert calls(out["a"]) == want, at
    again, _ = run_script(engine, {0: [a]})
    assert again["a"][-1].cached_tokens > 0 and calls(again["a"]) == want
    out, _ = run_script(engine, {0: [auto("x", start, seed=1), a], 3: ["x"]})
    assert not any(isinstance(m, Done) for m in out["x"]) and calls(out["a"]) == want


def test_parallel_calls_are_each_enforced(engine: LMEngine, start: int):
    out, _ = run_script(engine, {0: [auto("p", start, parallel_tool_calls=True,
                                          max_tokens=160)]})
    valid(out["p"], n=2)


def test_a_call_opened_inside_thinking_is_not_enforced(thinking_model_dir: Path, start: int,
                                                       caplog: pytest.LogCaptureFixture):
    # The prompt opens <think>: a grammar applies after thinking only, so the start token the
    # bias forces there (and again inside that call) arms nothing.
    e = LMEngine()
    e.load(str(thinking_model_dir))
    try:
        with caplog.at_level(logging.INFO, logger="mlx_supervisor.worker"):
            out, _ = run_script(e, {0: [auto("t", start, max_tokens=12)]})
    finally:
        e.close()
    assert isinstance(out["t"][-1], Done) and out["t"][-1].finish_reason == "length"
    assert not any("opened a tool call" in r.getMessage() for r in caplog.records)
    assert not calls(out["t"])


def test_the_arming_is_logged(engine: LMEngine, start: int, caplog: pytest.LogCaptureFixture):
    # The converse of the test above, so its "nothing logged" means something.
    with caplog.at_level(logging.INFO, logger="mlx_supervisor.worker"):
        run_script(engine, {0: [auto("l", start)]})
    assert any("opened a tool call" in r.getMessage() for r in caplog.records)
