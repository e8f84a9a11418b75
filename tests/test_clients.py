"""Issue 16's "done when": every client agents use gets a valid forced tool call and a valid
``json_schema`` object from a real ``mlx-supervisor serve``, plain and streamed, several at once.

One server (the tiny random-weight tool model) serves the whole module. Each client runs the
same matrix at once: {forced call, json_schema object} x {plain, streamed} x 2, and every
answer is checked with ``jsonschema``. Random weights: only the grammar makes them valid.

The random model, free to, calls again and again after its first call; so each client asks for
one call per turn (``parallel_tool_calls: false``) in its own way. What else each needed is
said at its test. The Node clients (npm ``openai``, the Vercel AI SDK) are scripts in
tests/clients/, installed by ``make node-deps`` (``npm ci``), run here with the system node.
"""

from __future__ import annotations

import ast
import asyncio
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal

import jsonschema
import openai
import pydantic
import pytest

from mlx_supervisor.gateway.testing.sdk import StreamedCalls
from mlx_supervisor.gateway.testing.server import ServerProcess

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # no fetch of the price list

CLIENTS = Path(__file__).parent / "clients"
SCHEMAS = json.loads((CLIENTS / "schemas.json").read_text())
WEATHER, ANSWER = SCHEMAS["weather"], SCHEMAS["answer"]
TOOLS: Any = [{"type": "function", "function": {"name": "get_weather",
                                                "description": "Weather in a city",
                                                "parameters": WEATHER}}]
NAMED: Any = {"type": "function", "function": {"name": "get_weather"}}
ASK: Any = [{"role": "user", "content": "What is the weather in Paris?"}]
FORMAT: Any = {"type": "json_schema",
               "json_schema": {"name": "answer", "schema": ANSWER, "strict": True}}
MARKUP = ("<tool_call>", "</tool_call>")
Job = tuple[str, bool]  # ("call" | "object", streamed)
MATRIX: list[Job] = [(kind, stream) for stream in (False, True) for kind in ("call", "object")] * 2


@pytest.fixture(scope="module")
def srv(tools_model_dir: Path) -> Iterator[ServerProcess]:
    # "forced": the same model, configured to force a call on requests that send tools but no
    # tool_choice (llm's), as a user would for a client that cannot ask for one.
    with ServerProcess({"tools": {"path": str(tools_model_dir)},
                        "forced": {"path": str(tools_model_dir), "tool_choice": "required"}},
                       {"heartbeat_interval": 0.2}) as s:
        yield s
    assert s.orphans == []


def _call(name: str, args: str | dict[str, Any], call_id: str | None = None) -> dict[str, Any]:
    """A forced call: the named function, arguments valid against its schema."""
    assert name == "get_weather"
    assert call_id is None or call_id.startswith("call_")
    parsed = json.loads(args) if isinstance(args, str) else args
    jsonschema.validate(parsed, WEATHER)
    return parsed


def _object(value: str | dict[str, Any]) -> dict[str, Any]:
    parsed = json.loads(value) if isinstance(value, str) else value
    jsonschema.validate(parsed, ANSWER)
    return parsed


def _all_at_once(run: Callable[[str, bool], None]) -> None:
    """The matrix, every job in its own thread, all in flight together."""
    with ThreadPoolExecutor(len(MATRIX)) as pool:
        for f in [pool.submit(run, kind, stream) for kind, stream in MATRIX]:
            f.result()


# ---------------------------------------------------------------- the openai SDK, sync and async


def _openai_sync(client: openai.OpenAI, kind: str, stream: bool) -> None:
    extra: Any = ({"tools": TOOLS, "tool_choice": NAMED, "parallel_tool_calls": False}
                  if kind == "call" else {"response_format": FORMAT})
    kw: Any = {"model": "tools", "messages": ASK, "temperature": 0, "max_tokens": 120, **extra}
    if not stream:
        choice = client.chat.completions.create(**kw).choices[0]
        msg: Any = choice.message
        finish = choice.finish_reason
    else:
        with client.chat.completions.stream(**kw) as s:
            for _ in s:
                pass
            done = s.get_final_completion().choices[0]
        msg, finish = done.message, done.finish_reason
    if kind == "call":
        assert finish == "tool_calls" and not msg.content
        (c,) = msg.tool_calls
        _call(c.function.name, c.function.arguments, c.id)
    else:
        assert finish == "stop"
        _object(msg.content)


def test_openai_sync(srv: ServerProcess) -> None:
    client = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0, timeout=120)
    _all_at_once(lambda kind, stream: _openai_sync(client, kind, stream))


async def _openai_async(client: openai.AsyncOpenAI, kind: str, stream: bool) -> None:
    extra: Any = ({"tools": TOOLS, "tool_choice": "required", "parallel_tool_calls": False}
                  if kind == "call" else {"response_format": FORMAT})
    kw: Any = {"model": "tools", "messages": ASK, "temperature": 0, "max_tokens": 120, **extra}
    if not stream:
        r = await client.chat.completions.create(**kw)
        msg, finish = r.choices[0].message, r.choices[0].finish_reason
        args = [(c.function.name, c.function.arguments, c.id) for c in msg.tool_calls or []]
        text = msg.content or ""
    else:
        got = StreamedCalls()
        async for chunk in await client.chat.completions.create(**kw, stream=True):
            got.add(chunk)
        args, text, finish = got.calls(), got.text, got.finish
    if kind == "call":
        assert finish == "tool_calls" and not text and len(args) == 1
        _call(*args[0])
    else:
        assert finish == "stop" and not args
        _object(text)


async def test_openai_async(srv: ServerProcess) -> None:
    client = openai.AsyncOpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0, timeout=120)
    await asyncio.gather(*(_openai_async(client, kind, stream) for kind, stream in MATRIX))
    await client.close()


# ---------------------------------------------------------------- LangChain ChatOpenAI


class GetWeather(pydantic.BaseModel):
    """Weather in a city"""

    city: str = pydantic.Field(max_length=12)
    unit: Literal["c", "f"]


class Answer(pydantic.BaseModel):
    ok: bool
    n: int = pydantic.Field(ge=10, le=20)


@pytest.mark.filterwarnings("ignore:Pydantic serializer warnings")  # LangChain's own
async def test_langchain_chat_openai(srv: ServerProcess) -> None:
    # bind_tools needs parallel_tool_calls=False (LangChain leaves it unset: parallel);
    # with_structured_output(method="json_schema") sends strict json_schema as it is.
    from langchain_core.messages import AIMessageChunk
    from langchain_openai import ChatOpenAI

    chat = ChatOpenAI(base_url=srv.url + "/v1", api_key=pydantic.SecretStr("x"), model="tools",
                      temperature=0, max_completion_tokens=120, max_retries=0, timeout=120)
    tools = chat.bind_tools([GetWeather], tool_choice="GetWeather", parallel_tool_calls=False)
    structured = chat.with_structured_output(Answer, method="json_schema")

    async def one(kind: str, stream: bool) -> None:
        if kind == "call":
            if stream:
                msg: Any = None
                async for piece in tools.astream("What is the weather in Paris?"):
                    assert isinstance(piece, AIMessageChunk)
                    msg = piece if msg is None else msg + piece
            else:
                msg = await tools.ainvoke("What is the weather in Paris?")
            assert msg.response_metadata["finish_reason"] == "tool_calls"
            assert not msg.content and not msg.invalid_tool_calls
            (c,) = msg.tool_calls
            _call(c["name"].replace("GetWeather", "get_weather"), c["args"], c["id"])
            GetWeather.model_validate(c["args"])
        else:
            if stream:
                out = [x async for x in structured.astream("Answer.")][-1]
            else:
                out = await structured.ainvoke("Answer.")
            assert isinstance(out, Answer)
            _object(out.model_dump())

    await asyncio.gather(*(one(kind, stream) for kind, stream in MATRIX))


def test_langchain_default_parallel_calls_are_all_valid(srv: ServerProcess) -> None:
    # LangChain's default (parallel_tool_calls unset): the random model calls until max_tokens;
    # every complete call is valid, the cut one is dropped, and nothing is content.
    from langchain_openai import ChatOpenAI

    chat = ChatOpenAI(base_url=srv.url + "/v1", api_key=pydantic.SecretStr("x"), model="tools",
                      temperature=0, max_completion_tokens=120, max_retries=0, timeout=120)
    msg: Any = chat.bind_tools([GetWeather], tool_choice="GetWeather").invoke("Weather?")
    assert msg.response_metadata["finish_reason"] == "length"
    assert msg.content == "" and not msg.invalid_tool_calls and len(msg.tool_calls) >= 2
    for c in msg.tool_calls:
        GetWeather.model_validate(c["args"])


# ---------------------------------------------------------------- litellm


def test_litellm(srv: ServerProcess) -> None:
    # An "openai/" model with api_base: litellm's OpenAI-compatible path; it passes tools,
    # tool_choice, parallel_tool_calls and response_format through unchanged.
    import litellm

    base: Any = {"model": "openai/tools", "api_base": srv.url + "/v1", "api_key": "x",
                 "messages": ASK, "temperature": 0, "max_tokens": 120, "num_retries": 0}

    def one(kind: str, stream: bool) -> None:
        extra: Any = ({"tools": TOOLS, "tool_choice": NAMED, "parallel_tool_calls": False}
                      if kind == "call" else {"response_format": FORMAT})
        r: Any = litellm.completion(**base, **extra, stream=stream)
        if stream:
            r = litellm.stream_chunk_builder(list(r))
        choice = r.choices[0]
        if kind == "call":
            assert choice.finish_reason == "tool_calls" and not choice.message.content
            (c,) = choice.message.tool_calls
            _call(c.function.name, c.function.arguments, c.id)
        else:
            assert choice.finish_reason == "stop"
            _object(choice.message.content)

    _all_at_once(one)


# ---------------------------------------------------------------- llm (Simon Willison's)


@pytest.fixture
def llm_home(srv: ServerProcess, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    (tmp_path / "extra-openai-models.yaml").write_text(
        f"- model_id: mlx-tools\n  model_name: tools\n  api_base: {srv.url}/v1\n"
        "  supports_schema: true\n  supports_tools: true\n"
        f"- model_id: mlx-forced\n  model_name: forced\n  api_base: {srv.url}/v1\n"
        "  supports_tools: true\n")
    monkeypatch.setenv("LLM_USER_PATH", str(tmp_path))
    monkeypatch.setenv("OPENAI_API_KEY", "x")
    return tmp_path


def test_llm_schema_library_and_cli(llm_home: Path) -> None:
    # llm 0.36 sends schema= as response_format json_schema (plain and streamed).
    import llm

    model = llm.get_model("mlx-tools")

    def one(kind: str, stream: bool) -> None:
        r = model.prompt("Answer.", schema=ANSWER, stream=stream, temperature=0, max_tokens=60)
        _object(r.text())

    _all_at_once(lambda kind, stream: one(kind, stream))
    cli = subprocess.run(
        [sys.executable, "-m", "llm", "-m", "mlx-tools", "--schema",
         json.dumps(ANSWER), "-o", "max_tokens", "60", "-o", "temperature", "0", "Answer."],
        capture_output=True, text=True, timeout=120, env=os.environ.copy())
    assert cli.returncode == 0, cli.stderr
    _object(cli.stdout)


def get_weather(city: str, unit: str) -> str:
    """Weather in a city"""
    return "sunny"


def _llm_tool() -> Any:
    """get_weather with the test's schema (llm's schema from the signature would leave ``city``
    unbounded: a random model never ends that string)."""
    import llm

    return llm.Tool(name="get_weather", description="Weather in a city", input_schema=WEATHER,
                    implementation=get_weather)


def test_llm_forced_call_library(llm_home: Path) -> None:
    # llm 0.36 sends tools but never tool_choice (its options forbid unknown keys), nor
    # parallel_tool_calls: the "forced" model's config (tool_choice = "required") forces the
    # call. The random model then calls again until max_tokens; every complete call is valid.
    import llm

    model = llm.get_model("mlx-forced")

    def one(kind: str, stream: bool) -> None:
        r = model.prompt("Weather in Paris?", tools=[_llm_tool()], stream=stream,
                         temperature=0, max_tokens=120)
        r.text()
        calls = r.tool_calls()
        assert calls, "no tool call"
        for c in calls:
            _call(c.name, c.arguments, c.tool_call_id)

    _all_at_once(one)


def test_llm_forced_call_cli(llm_home: Path) -> None:
    # The CLI runs a --functions tool for each call (a chain) and shows each with --td. Every
    # turn of the "forced" model must call, so the chain ends at --chain-limit (exit 1): with
    # the CLI, force only to get one call; leave tool_choice "auto" for agent loops.
    cli = subprocess.run(
        [sys.executable, "-m", "llm", "-m", "mlx-forced", "--functions", CLI_TOOL, "--td",
         "--chain-limit", "2", "-o", "max_tokens", "60", "-o", "temperature", "0",
         "Weather in Paris?"],
        capture_output=True, text=True, timeout=120, env=os.environ.copy())
    assert "Chain limit of 2 exceeded" in cli.stderr, cli.stderr
    shown = [line.removeprefix("Tool call: get_weather(")[:-1]
             for line in (cli.stdout + cli.stderr).splitlines()
             if line.startswith("Tool call: get_weather(")]
    assert shown, cli.stdout + cli.stderr
    for args in shown:
        jsonschema.validate(ast.literal_eval(args), CLI_SCHEMA)


CLI_TOOL = ('def get_weather(celsius: bool) -> str:\n'
            '    """Weather here"""\n    return "sunny"\n')
CLI_SCHEMA = {"type": "object", "properties": {"celsius": {"type": "boolean"}},
              "required": ["celsius"], "additionalProperties": False}


def test_llm_tools_reach_the_model(llm_home: Path) -> None:
    import llm

    model = llm.get_model("mlx-tools")
    bare = model.prompt("Weather?", temperature=0, max_tokens=1, stream=False)
    tooled = model.prompt("Weather?", tools=[get_weather], temperature=0, max_tokens=1,
                          stream=False)
    assert (tooled.usage().input or 0) > (bare.usage().input or 0)


# ---------------------------------------------------------------- Node clients


def _node(script: str, srv: ServerProcess) -> list[dict[str, Any]]:
    node = shutil.which("node")
    assert node, "node is needed: scripts/system-deps.sh installs it"
    assert (CLIENTS / "node_modules" / ".package-lock.json").exists(), \
        "tests/clients/node_modules is missing: run `make node-deps` (npm ci)"
    out = subprocess.run([node, str(CLIENTS / script), srv.url + "/v1"], capture_output=True,
                         text=True, timeout=180, cwd=CLIENTS)
    assert out.returncode == 0, out.stderr
    results: list[dict[str, Any]] = json.loads(out.stdout.strip().splitlines()[-1])
    assert sorted((r["kind"], r["stream"]) for r in results) == sorted(MATRIX)
    return results


def test_npm_openai(srv: ServerProcess) -> None:
    for r in _node("openai_client.mjs", srv):
        if r["kind"] == "call":
            assert r["finish"] == "tool_calls" and not r["content"]
            (c,) = r["calls"]
            _call(c["name"], c["arguments"], c["id"])
        else:
            assert r["finish"] == "stop"
            _object(r["text"])


def test_vercel_ai_sdk(srv: ServerProcess) -> None:
    # @ai-sdk/openai-compatible needs supportsStructuredOutputs: true to send json_schema (else
    # json_object); parallel_tool_calls goes through providerOptions, passed as they are.
    for r in _node("ai_sdk.mjs", srv):
        if r["kind"] == "call":
            assert r["finish"] == "tool-calls" and not r["text"]
            (c,) = r["calls"]
            _call(c["name"], c["arguments"], c["id"])
        else:
            assert r["finish"] == "stop"
            _object(r["object"])
            assert not r["stream"] or r["partials"] >= 1
