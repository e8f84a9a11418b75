"""Tools, structured output and reasoning, as the official ``openai`` client sees them, against a
real gateway and real tiny models (random weights: only the grammar makes their output valid)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import httpx
import jsonschema
import msgspec
import openai
import pydantic
import pytest
from tokenizers import Tokenizer

from mlx_supervisor.gateway.testing.server import ServerProcess

WEATHER = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 12},
                   "unit": {"type": "string", "enum": ["c", "f"]}},
    "required": ["city", "unit"], "additionalProperties": False,
}
TOOLS: Any = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                      "parameters": WEATHER}},
    {"type": "function", "function": {"name": "add", "description": "Add two small numbers",
                                      "parameters": {
                                          "type": "object",
                                          "properties": {"a": {"type": "integer", "minimum": 0,
                                                               "maximum": 99},
                                                         "b": {"type": "integer", "minimum": 0,
                                                               "maximum": 99}},
                                          "required": ["a", "b"],
                                          "additionalProperties": False}}},
]
SCHEMAS = {tool["function"]["name"]: tool["function"]["parameters"] for tool in TOOLS}
ASK: Any = [{"role": "user", "content": "What is the weather in Paris?"}]
MARKUP = ("<tool_call>", "</tool_call>", "<think>", "</think>")


@pytest.fixture(scope="module")
def srv(tools_model_dir: Path, thinking_model_dir: Path, demo_model_dir: Path,
        embeddings_model_dir: Path) -> Iterator[ServerProcess]:
    models = {"tools": {"path": str(tools_model_dir)}, "r1": {"path": str(thinking_model_dir)},
              "forced": {"path": str(tools_model_dir), "tool_choice": "required"},
              "plain": {"path": str(demo_model_dir)},
              "emb": {"path": str(embeddings_model_dir), "kind": "embeddings"}}
    with ServerProcess(models, {"heartbeat_interval": 0.2}) as s:
        yield s
    assert s.orphans == []


@pytest.fixture
def client(srv: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0, timeout=120)


def _valid_call(call: Any) -> dict[str, Any]:
    assert call.type == "function" and call.id.startswith("call_")
    args = json.loads(call.function.arguments)
    jsonschema.validate(args, SCHEMAS[call.function.name])
    return args


def test_a_named_tool_choice_forces_a_valid_call(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(
        model="tools", messages=ASK, tools=TOOLS, temperature=0, max_tokens=120,
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        parallel_tool_calls=False)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    calls = choice.message.tool_calls or []
    assert [c.function.name for c in calls] == ["get_weather"]
    _valid_call(calls[0])


def test_required_streams_calls_as_openai_does(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model="tools", messages=ASK, tools=TOOLS, tool_choice="required", temperature=0,
        max_tokens=120, parallel_tool_calls=False, stream=True)
    deltas = [(c.choices[0].delta, c.choices[0].finish_reason) for c in stream if c.choices]
    assert deltas[-1][1] == "tool_calls"
    assert all(not d.content for d, _ in deltas)  # no markup (nor anything) leaks into content
    calls = [tc for d, _ in deltas for tc in d.tool_calls or []]
    head, rest = calls[0], calls[1:]
    assert head.index == 0 and head.id and head.id.startswith("call_") and head.type == "function"
    assert head.function and head.function.name in SCHEMAS and head.function.arguments == ""
    assert rest and all(tc.index == 0 and tc.id is None and tc.function for tc in rest)
    args = json.loads("".join(tc.function.arguments or "" for tc in rest if tc.function))
    jsonschema.validate(args, SCHEMAS[head.function.name])


@pytest.mark.parametrize("stream", [False, True])
def test_parallel_calls_cut_short_leave_no_markup_in_content(client: openai.OpenAI,
                                                              stream: bool) -> None:
    # parallel_tool_calls left out, as LangChain, litellm and the AI SDK send it: the random
    # model calls again and again, so max_tokens cuts its second call. The complete call
    # comes back; neither the cut one nor the newline between calls is content.
    kw: Any = {"model": "tools", "messages": ASK, "tools": TOOLS, "tool_choice": "required",
               "temperature": 0, "max_tokens": 60}
    if stream:
        chunks = [c.choices[0] for c in client.chat.completions.create(**kw, stream=True)
                  if c.choices]
        finish, content = chunks[-1].finish_reason, "".join(c.delta.content or "" for c in chunks)
        heads = [tc for c in chunks for tc in c.delta.tool_calls or [] if tc.id]
        assert len(heads) == 1 and heads[0].function and heads[0].function.name in SCHEMAS
        args = "".join(tc.function.arguments or "" for c in chunks
                       for tc in c.delta.tool_calls or [] if tc.function)
        jsonschema.validate(json.loads(args), SCHEMAS[heads[0].function.name])
    else:
        choice = client.chat.completions.create(**kw).choices[0]
        finish, content = choice.finish_reason, choice.message.content or ""
        (call,) = choice.message.tool_calls or []
        _valid_call(call)
    assert finish == "length"
    assert content == ""


def test_a_tool_schema_as_pydantic_writes_it_still_gives_a_valid_call(client: openai.OpenAI) -> None:
    # No additionalProperties, as LangChain and pydantic send it: the object is closed for
    # generation, else the random model would ramble into one endless extra key.
    params = Order.model_json_schema()
    assert "additionalProperties" not in params
    r = client.chat.completions.create(
        model="tools", messages=ASK, temperature=0, max_tokens=120, parallel_tool_calls=False,
        tools=[{"type": "function", "function": {"name": "order", "parameters": params}}],
        tool_choice="required")
    (call,) = r.choices[0].message.tool_calls or []
    Order.model_validate_json(call.function.arguments)


def test_tool_choice_auto_lets_the_model_answer(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(model="tools", messages=ASK, tools=TOOLS, temperature=0,
                                       max_tokens=8)
    assert r.choices[0].finish_reason in ("stop", "length", "tool_calls")


def test_a_models_configured_tool_choice_applies_when_the_request_sends_none(
        client: openai.OpenAI) -> None:
    # "forced" is configured with tool_choice = "required": a request with tools and no
    # tool_choice gets a forced call; the request's own tool_choice wins ("none": no call).
    r = client.chat.completions.create(model="forced", messages=ASK, tools=TOOLS, temperature=0,
                                       max_tokens=120, parallel_tool_calls=False)
    assert r.choices[0].finish_reason == "tool_calls"
    (call,) = r.choices[0].message.tool_calls or []
    _valid_call(call)
    r = client.chat.completions.create(model="forced", messages=ASK, tools=TOOLS, temperature=0,
                                       max_tokens=8, tool_choice="none")
    assert not r.choices[0].message.tool_calls and r.choices[0].finish_reason == "length"


def test_the_configured_default_is_only_a_default() -> None:
    from mlx_supervisor.gateway.api import schemas as t
    from mlx_supervisor.gateway.api.tools import generate_fields

    def choice(**kw: Any) -> str:
        req = msgspec.convert({"model": "m", "messages": ASK, **kw}, t.ChatRequest)
        return generate_fields(req, "lm", "required").get("tool_choice", "-")

    assert choice(tools=TOOLS) == "required"
    assert choice(tools=TOOLS, tool_choice="auto") == "auto"
    assert choice(tools=TOOLS, tool_choice="none") == "none"
    assert choice(tools=TOOLS, tool_choice={"type": "function",
                                            "function": {"name": "add"}}) == "function"
    assert choice() == "-"  # no tools: nothing to choose


class Order(pydantic.BaseModel):
    item: Literal["apple", "pear", "plum"]
    count: int = pydantic.Field(ge=1, le=9)
    note: str = pydantic.Field(max_length=10)


def test_parse_with_a_pydantic_model(client: openai.OpenAI) -> None:
    r = client.chat.completions.parse(model="tools", messages=ASK, response_format=Order,
                                      temperature=0, max_tokens=80)
    parsed = r.choices[0].message.parsed
    assert isinstance(parsed, Order)
    assert 1 <= parsed.count <= 9


def _schema(i: int) -> dict[str, Any]:
    return [
        {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
         "additionalProperties": False},
        {"type": "object", "properties": {"n": {"type": "integer", "minimum": 10, "maximum": 20}},
         "required": ["n"], "additionalProperties": False},
        {"type": "array", "items": {"enum": ["x", "y"]}, "minItems": 2, "maxItems": 3},
        {"type": "object", "properties": {"tag": {"type": "string", "pattern": "^[a-c]{3}$"}},
         "required": ["tag"], "additionalProperties": False},
    ][i]


async def test_four_concurrent_requests_with_different_schemas(srv: ServerProcess) -> None:
    client = openai.AsyncOpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0, timeout=120)

    async def one(i: int) -> None:
        r = await client.chat.completions.create(
            model="tools", messages=ASK, temperature=1.0, seed=i, max_tokens=60,
            response_format={"type": "json_schema",
                             "json_schema": {"name": f"s{i}", "schema": _schema(i),
                                             "strict": True}})
        assert r.choices[0].finish_reason == "stop"
        jsonschema.validate(json.loads(r.choices[0].message.content or ""), _schema(i))

    await asyncio.gather(*(one(i) for i in range(4)))
    await client.close()


def test_json_object_streamed(client: openai.OpenAI, tools_model_dir: Path) -> None:
    # Any object will do; the random model would write one endless key, so a bias on '{' and
    # '}' makes it close the object at once. Without the grammar the text would go on.
    tok = Tokenizer.from_file(str(tools_model_dir / "tokenizer.json"))
    bias = {str(tok.token_to_id(c)): 30 for c in "{}"}
    stream = client.chat.completions.create(model="tools", messages=ASK, temperature=0,
                                            max_tokens=60, stream=True, logit_bias=bias,
                                            response_format={"type": "json_object"})
    chunks = [c.choices[0] for c in stream if c.choices]
    assert chunks[-1].finish_reason == "stop"
    assert isinstance(json.loads("".join(c.delta.content or "" for c in chunks)), dict)


def test_tool_call_history_reaches_the_template(client: openai.OpenAI) -> None:
    call = {"id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "c"}'}}
    history: Any = [*ASK, {"role": "assistant", "content": None, "tool_calls": [call]},
                    {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 degrees"}]

    def prompt_tokens(messages: Any) -> int:
        r = client.chat.completions.create(model="tools", messages=messages, tools=TOOLS,
                                           max_tokens=1)
        assert r.usage is not None
        return r.usage.prompt_tokens

    bare = prompt_tokens([*ASK, {"role": "assistant", "content": ""},
                          {"role": "tool", "tool_call_id": "call_1", "content": ""}])
    with_call = prompt_tokens(history)
    longer = prompt_tokens([*history[:2], {**history[2], "content": "sunny, 21 degrees, calm"}])
    assert bare < with_call < longer


def _think_end(model_dir: Path) -> int:
    tid = Tokenizer.from_file(str(model_dir / "tokenizer.json")).token_to_id("</think>")
    assert tid is not None
    return int(tid)


def test_reasoning_is_split_and_the_grammar_starts_after_it(
        client: openai.OpenAI, thinking_model_dir: Path) -> None:
    # The prompt opens <think>; a bias makes the random model close it after a few tokens.
    bias = {str(_think_end(thinking_model_dir)): 6}
    fmt: Any = {"type": "json_schema", "json_schema": {"name": "ok", "schema": _schema(0)}}
    r = client.chat.completions.create(model="r1", messages=ASK, temperature=1.0, seed=3,
                                       max_tokens=80, logit_bias=bias, response_format=fmt)
    msg: Any = r.choices[0].message
    assert msg.reasoning_content and not any(m in msg.reasoning_content for m in MARKUP[2:])
    jsonschema.validate(json.loads(msg.content), _schema(0))

    stream = client.chat.completions.create(model="r1", messages=ASK, temperature=1.0, seed=3,
                                            max_tokens=80, logit_bias=bias, response_format=fmt,
                                            stream=True)
    deltas: Any = [c.choices[0].delta for c in stream if c.choices]
    thought = "".join(getattr(d, "reasoning_content", None) or "" for d in deltas)
    answer = "".join(d.content or "" for d in deltas)
    assert (thought, answer) == (msg.reasoning_content, msg.content)


def test_reasoning_effort_none_turns_thinking_off(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(model="r1", messages=ASK, temperature=0, max_tokens=12,
                                       reasoning_effort="none")
    msg: Any = r.choices[0].message
    assert getattr(msg, "reasoning_content", None) is None and msg.content
    on = client.chat.completions.create(model="r1", messages=ASK, temperature=0, max_tokens=12)
    assert getattr(on.choices[0].message, "reasoning_content", None)


@pytest.mark.parametrize(("model", "extra", "param"), [
    ("tools", {"response_format": {"type": "json_schema",
                                   "json_schema": {"name": "x", "schema": {"type": "frob"}}}},
     "response_format.json_schema.schema"),
    ("tools", {"tools": [{"type": "function", "function": {
        "name": "f", "parameters": {"type": "object", "properties": {"a": {"type": 7}}}}}]},
     "tools[0].function.parameters"),
    ("tools", {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     "tool_choice.function.name"),
    ("tools", {"tool_choice": "required"}, "tool_choice"),
    ("tools", {"tools": [{"type": "retrieval"}]}, "tools[0].type"),
    ("tools", {"tools": [{"type": "function", "function": {"name": "has space"}}]},
     "tools[0].function.name"),
    ("tools", {"tools": [{"type": "function"}]}, "tools[0].function"),
    ("emb", {"tools": TOOLS}, "tools"),
    ("plain", {"tools": TOOLS}, "tools"),
])
def test_bad_input_is_a_400_naming_the_parameter(srv: ServerProcess, model: str,
                                                 extra: dict[str, Any], param: str) -> None:
    r = httpx.post(srv.url + "/v1/chat/completions", timeout=60,
                   json={"model": model, "messages": ASK, "max_tokens": 4, **extra})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param
