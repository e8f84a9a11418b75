"""``tool_choice`` auto, enforced lazily: a call the model opens itself comes back as a valid
call. A ``logit_bias`` on the tool-call start token makes the random-weight model open calls;
without the lazy grammar its calls are not JSON and come back as text."""

from __future__ import annotations

import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import jsonschema
import openai
import pytest
from tokenizers import Tokenizer

from mlx_supervisor.gateway.testing.sdk import StreamedCalls
from mlx_supervisor.gateway.testing.server import ServerProcess
from tests.test_tools import ASK, SCHEMAS, TOOLS


@pytest.fixture(scope="module")
def srv(tools_model_dir: Path) -> Iterator[ServerProcess]:
    with ServerProcess({"tools": {"path": str(tools_model_dir)}},
                       {"heartbeat_interval": 0.2}) as s:
        yield s
    assert s.orphans == []


@pytest.fixture(scope="module")
def client(srv: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def opens_a_call(tools_model_dir: Path) -> dict[str, int]:
    """A logit_bias that makes the model sample ``<tool_call>`` whenever it may."""
    start = Tokenizer.from_file(str(tools_model_dir / "tokenizer.json")).token_to_id("<tool_call>")
    assert start is not None
    return {str(start): 100}


def _ask(client: openai.OpenAI, bias: dict[str, int], stream: bool, parallel: bool = False,
         **kw: Any) -> tuple[list[tuple[str, str, str]], str, str | None]:
    """(calls as (name, arguments, id), content, finish_reason), streamed or not."""
    args: Any = {"model": "tools", "messages": ASK, "tools": TOOLS, "tool_choice": "auto",
                 "temperature": 0, "max_tokens": 120, "logit_bias": bias,
                 "parallel_tool_calls": parallel, **kw}
    if not stream:
        choice = client.chat.completions.create(**args).choices[0]
        calls = [(c.function.name, c.function.arguments, c.id)
                 for c in choice.message.tool_calls or []]
        return calls, choice.message.content or "", choice.finish_reason
    got = StreamedCalls()
    for chunk in client.chat.completions.create(**args, stream=True):
        got.add(chunk)
    return got.calls(), got.text, got.finish


def _valid(name: str, arguments: str, call_id: str) -> None:
    assert call_id.startswith("call_")
    jsonschema.validate(json.loads(arguments), SCHEMAS[name])


@pytest.mark.parametrize("stream", [False, True])
def test_a_call_the_model_opens_is_a_valid_call(client: openai.OpenAI, opens_a_call: Any,
                                                stream: bool) -> None:
    calls, content, finish = _ask(client, opens_a_call, stream)
    assert finish == "tool_calls" and not content and "<tool_call>" not in content
    (call,) = calls
    _valid(*call)


def test_parallel_calls_are_each_enforced(client: openai.OpenAI, opens_a_call: Any) -> None:
    # After a call the model is free again; the bias opens call after call, each enforced,
    # until max_tokens cuts the last one short (that one stays text, as auto promises).
    calls, _, finish = _ask(client, opens_a_call, False, parallel=True, max_tokens=200)
    assert len(calls) >= 2 and finish == "length"
    for call in calls:
        _valid(*call)


def test_several_at_once_seeded_and_not(client: openai.OpenAI, opens_a_call: Any) -> None:
    # Batched together, solo -> batch hand-overs included; seeded sampling repeats exactly.
    jobs = [(stream, seed) for stream in (False, True) for seed in (None, 7, 7)]
    with ThreadPoolExecutor(len(jobs)) as pool:
        futures = [pool.submit(_ask, client, opens_a_call, stream,
                               **({} if seed is None else {"seed": seed, "temperature": 1.0}))
                   for stream, seed in jobs]
        results = [f.result() for f in futures]
    for calls, content, finish in results:
        assert finish == "tool_calls" and not content
        (call,) = calls
        _valid(*call)
    seeded = [json.loads(r[0][0][1]) for (_, seed), r in zip(jobs, results, strict=True) if seed]
    assert all(s == seeded[0] for s in seeded)


def test_without_the_start_token_nothing_is_enforced(client: openai.OpenAI) -> None:
    # No bias: whatever the model writes (a call opened by chance is enforced too).
    calls, _, finish = _ask(client, {}, False, max_tokens=16)
    assert finish in ("stop", "length", "tool_calls")
    for call in calls:
        _valid(*call)
