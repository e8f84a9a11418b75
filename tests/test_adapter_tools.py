"""Tools, structured output and thinking through the Anthropic and Responses adapters, as the
official ``anthropic`` and ``openai`` SDKs see them, against a real gateway and the real tiny
tool-markup models (random weights: only the grammar makes their output valid)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import jsonschema
import openai
import pytest

from mlx_supervisor.gateway.testing.server import ServerProcess

WEATHER = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 12},
                   "unit": {"type": "string", "enum": ["c", "f"]}},
    "required": ["city", "unit"], "additionalProperties": False,
}
ASK = "What is the weather in Paris?"
A_TOOLS: Any = [{"name": "get_weather", "description": "Weather in a city", "input_schema": WEATHER},
                {"name": "noop", "description": "Does nothing", "input_schema": {"type": "object"}}]
R_TOOLS: Any = [{"type": "function", "name": "get_weather", "description": "Weather in a city",
                 "parameters": WEATHER}]
T0 = {"temperature": 0}


@pytest.fixture(scope="module")
def srv(tools_model_dir: Path, thinking_model_dir: Path) -> Iterator[ServerProcess]:
    models = {"tools": {"path": str(tools_model_dir)}, "r1": {"path": str(thinking_model_dir)},
              "forced": {"path": str(tools_model_dir), "tool_choice": "required"}}
    with ServerProcess(models) as s:
        yield s
    assert s.orphans == []


@pytest.fixture
def ant(srv: ServerProcess) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=srv.url, api_key="x", max_retries=0, timeout=180)


@pytest.fixture
def oai(srv: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0, timeout=180)


# ---------------------------------------------------------------- Anthropic


def test_anthropic_forced_tool_is_a_valid_tool_use(ant: anthropic.Anthropic) -> None:
    m = ant.messages.create(model="tools", max_tokens=120, extra_body=T0, tools=A_TOOLS,
                            tool_choice={"type": "tool", "name": "get_weather",
                                         "disable_parallel_tool_use": True},
                            messages=[{"role": "user", "content": ASK}])
    assert m.stop_reason == "tool_use"
    uses = [b for b in m.content if b.type == "tool_use"]
    assert [u.name for u in uses] == ["get_weather"]  # type: ignore[union-attr]
    jsonschema.validate(uses[0].input, WEATHER)  # type: ignore[union-attr]
    # The result goes back as a tool_result block, and the conversation goes on.
    again = ant.messages.create(model="tools", max_tokens=5, extra_body=T0, tools=A_TOOLS, messages=[
        {"role": "user", "content": ASK},
        {"role": "assistant", "content": [u.model_dump() for u in uses]},  # type: ignore[misc]
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": uses[0].id,  # type: ignore[union-attr]
                                      "content": "12 degrees"}]}])
    def prompt(u: Any) -> int:
        return int(u.input_tokens + (u.cache_read_input_tokens or 0))
    assert prompt(again.usage) > prompt(m.usage)  # the call and its result are in the prompt


def test_anthropic_streamed_any_tool_sends_input_json_deltas(ant: anthropic.Anthropic) -> None:
    deltas: list[str] = []
    with ant.messages.stream(model="tools", max_tokens=120, extra_body=T0, tools=A_TOOLS[:1],
                             tool_choice={"type": "any", "disable_parallel_tool_use": True},
                             messages=[{"role": "user", "content": ASK}]) as s:
        for ev in s:
            if ev.type == "content_block_delta" and ev.delta.type == "input_json_delta":
                deltas.append(ev.delta.partial_json)
        final = s.get_final_message()
    assert final.stop_reason == "tool_use" and deltas
    use = next(b for b in final.content if b.type == "tool_use")
    assert use.input == json.loads("".join(deltas))  # type: ignore[union-attr]
    jsonschema.validate(use.input, WEATHER)  # type: ignore[union-attr]


def test_anthropic_thinking_blocks_and_json_output(ant: anthropic.Anthropic) -> None:
    m = ant.messages.create(model="r1", max_tokens=2000, extra_body=T0,
                            thinking={"type": "enabled", "budget_tokens": 1024},
                            messages=[{"role": "user", "content": "Think."}])
    assert m.content[0].type == "thinking" and m.content[0].thinking  # type: ignore[union-attr]
    hidden = ant.messages.create(model="r1", max_tokens=40, extra_body=T0,
                                 thinking={"type": "disabled"}, messages=[{"role": "user", "content": "Hi"}])
    assert all(b.type != "thinking" for b in hidden.content)
    with ant.messages.stream(model="r1", max_tokens=2000, extra_body=T0,
                             thinking={"type": "enabled", "budget_tokens": 1024},
                             messages=[{"role": "user", "content": "Think."}]) as s:
        kinds = {ev.delta.type for ev in s if ev.type == "content_block_delta"}
    assert "thinking_delta" in kinds
    j = ant.messages.create(model="tools", max_tokens=200, extra_body=T0,
                            output_config={"format": {"type": "json_schema", "schema": WEATHER}},
                            messages=[{"role": "user", "content": ASK}])
    jsonschema.validate(json.loads(j.content[0].text), WEATHER)  # type: ignore[union-attr]


# ---------------------------------------------------------------- Responses


def test_responses_forced_function_call_and_its_output(oai: openai.OpenAI) -> None:
    r = oai.responses.create(model="tools", input=ASK, tools=R_TOOLS, temperature=0, max_output_tokens=120,
                             tool_choice={"type": "function", "name": "get_weather"},
                             parallel_tool_calls=False)
    calls = [o for o in r.output if o.type == "function_call"]
    assert r.status == "completed" and [c.name for c in calls] == ["get_weather"]  # type: ignore[union-attr]
    jsonschema.validate(json.loads(calls[0].arguments), WEATHER)  # type: ignore[union-attr]
    follow = oai.responses.create(model="tools", tools=R_TOOLS, previous_response_id=r.id,
                                  max_output_tokens=5, temperature=0, input=[
                                      {"type": "function_call_output", "call_id": calls[0].call_id,  # type: ignore[union-attr]
                                       "output": "12 degrees"}])
    assert follow.usage and r.usage and follow.usage.input_tokens > r.usage.input_tokens


def test_responses_streamed_function_call_arguments(oai: openai.OpenAI) -> None:
    events = list(oai.responses.create(model="tools", input=ASK, tools=R_TOOLS, temperature=0,
                                       max_output_tokens=120, tool_choice="required", stream=True,
                                       parallel_tool_calls=False))
    kinds = [e.type for e in events]
    assert "response.function_call_arguments.delta" in kinds and kinds[-1] == "response.completed"
    args = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")  # type: ignore[union-attr]
    done = next(e for e in events if e.type == "response.output_item.done" and e.item.type == "function_call")  # type: ignore[union-attr]
    assert done.item.arguments == args  # type: ignore[union-attr]
    jsonschema.validate(json.loads(args), WEATHER)


def test_responses_text_format_json_schema_is_enforced(oai: openai.OpenAI) -> None:
    r = oai.responses.create(model="tools", input=ASK, temperature=0, max_output_tokens=200,
                             text={"format": {"type": "json_schema", "name": "weather", "schema": WEATHER,
                                              "strict": True}})
    jsonschema.validate(json.loads(r.output_text), WEATHER)
    assert r.text.format.type == "json_schema"  # type: ignore[union-attr]


def test_responses_reasoning_item(oai: openai.OpenAI) -> None:
    r = oai.responses.create(model="r1", input="Think.", temperature=0, max_output_tokens=2000)
    assert r.output[0].type == "reasoning"
    assert r.output[0].content and r.output[0].content[0].text  # type: ignore[union-attr]
    events = list(oai.responses.create(model="r1", input="Think.", temperature=0,
                                       max_output_tokens=2000, stream=True, store=False))
    text = "".join(e.delta for e in events if e.type == "response.reasoning_text.delta")  # type: ignore[union-attr]
    assert text == r.output[0].content[0].text  # type: ignore[union-attr]
    assert events[-1].response.output[0].type == "reasoning"  # type: ignore[union-attr]


def test_anthropic_count_tokens_counts_the_tools(ant: anthropic.Anthropic) -> None:
    bare = ant.messages.count_tokens(model="tools", messages=[{"role": "user", "content": ASK}])
    with_tools = ant.messages.count_tokens(model="tools", messages=[{"role": "user", "content": ASK}],
                                           tools=A_TOOLS)
    assert with_tools.input_tokens > bare.input_tokens + 20  # the schemas are in the prompt


# ---------------------------------------------------------------- a model's tool_choice default


def test_the_configured_tool_choice_reaches_both_adapters(ant: anthropic.Anthropic,
                                                          oai: openai.OpenAI) -> None:
    # "forced" is configured with tool_choice = "required": requests with tools and no
    # tool_choice get a call; an explicit choice ("none" in Anthropic, "none" in Responses) wins.
    m = ant.messages.create(model="forced", max_tokens=120, extra_body=T0, tools=A_TOOLS[:1],
                            messages=[{"role": "user", "content": ASK}])
    uses = [b for b in m.content if b.type == "tool_use"]
    assert m.stop_reason in ("tool_use", "max_tokens") and uses
    jsonschema.validate(uses[0].input, WEATHER)  # type: ignore[union-attr]
    m = ant.messages.create(model="forced", max_tokens=6, extra_body=T0, tools=A_TOOLS[:1],
                            tool_choice={"type": "none"}, messages=[{"role": "user", "content": ASK}])
    assert not [b for b in m.content if b.type == "tool_use"]
    r = oai.responses.create(model="forced", input=ASK, tools=R_TOOLS, max_output_tokens=120,
                             parallel_tool_calls=False, temperature=0)
    calls = [o for o in r.output if o.type == "function_call"]
    assert len(calls) == 1
    jsonschema.validate(json.loads(calls[0].arguments), WEATHER)  # type: ignore[union-attr]
    r = oai.responses.create(model="forced", input=ASK, tools=R_TOOLS, max_output_tokens=6,
                             tool_choice="none", temperature=0)
    assert not [o for o in r.output if o.type == "function_call"]
