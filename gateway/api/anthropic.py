"""Anthropic Messages: ``POST /v1/messages`` and ``POST /v1/messages/count_tokens``.

An adapter, not a second generation path: the request is translated into an OpenAI
``ChatRequest`` and run by :mod:`chat` exactly as ``/v1/chat/completions`` runs it (same
supervisor, workers, sampling, grammars); the answer is translated back by
:mod:`anthropic_out`. Errors leave in Anthropic's shape (``gateway.error_response`` picks it by
path), auth takes ``x-api-key`` as well as ``Authorization: Bearer``.
"""

from __future__ import annotations

from typing import Any

import msgspec
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from mlx_supervisor.gateway.api import anthropic_out as out
from mlx_supervisor.gateway.api import chat
from mlx_supervisor.gateway.api import schemas as t
from mlx_supervisor.gateway.api.anthropic_schemas import (
    Block,
    CountTokensRequest,
    Message,
    MessagesRequest,
)
from mlx_supervisor.gateway.api.gateway import Gateway, json_response, read_body
from mlx_supervisor.gateway.api.respond import Deferred, SSEStream
from mlx_supervisor.gateway.errors import bad_request

MIN_THINKING_BUDGET = 1024  # Anthropic's own floor for thinking.budget_tokens


def _gw(request: Request) -> Gateway:
    gw: Gateway = request.app.state.gateway
    return gw


def _text_of(blocks: str | list[Block] | None, at: str) -> str:
    """Text blocks joined (system prompts, tool results); any other block is a 400."""
    if blocks is None or isinstance(blocks, str):
        return blocks or ""
    parts = []
    for j, b in enumerate(blocks):
        if b.type != "text":
            raise bad_request(f"{at}[{j}]: only text blocks are supported here, got {b.type!r}",
                              f"{at}[{j}].type")
        parts.append(b.text or "")
    return "\n".join(parts)


def _image_url(b: Block, at: str) -> str:
    s = b.source
    if s is not None and s.type == "base64" and s.media_type and s.data:
        return f"data:{s.media_type};base64,{s.data}"
    if s is not None and s.type == "url" and s.url:
        return s.url
    raise bad_request(f"{at}.source must be {{type: base64, media_type, data}} or {{type: url, url}}",
                      f"{at}.source")


def _message(m: Message, i: int) -> list[dict[str, Any]]:
    """One Anthropic message as OpenAI chat messages: tool results become ``tool`` messages
    (before the user's own text, as Anthropic orders them), tool uses ``tool_calls``."""
    at = f"messages[{i}]"
    if m.role not in ("user", "assistant"):
        raise bad_request(f"{at}.role must be user or assistant, got {m.role!r}", f"{at}.role")
    if isinstance(m.content, str):
        return [{"role": m.role, "content": m.content}]
    msgs: list[dict[str, Any]] = []
    parts: list[dict[str, Any]] = []
    calls: list[dict[str, Any]] = []
    for j, b in enumerate(m.content):
        where = f"{at}.content[{j}]"
        if b.type == "text":
            parts.append({"type": "text", "text": b.text or ""})
        elif b.type == "image" and m.role == "user":
            parts.append({"type": "image_url", "image_url": {"url": _image_url(b, where)}})
        elif b.type == "tool_result" and m.role == "user":
            text = _text_of(b.content, f"{where}.content")
            msgs.append({"role": "tool", "tool_call_id": b.tool_use_id or "",
                         "content": ("Error: " + text) if b.is_error else text})
        elif b.type == "tool_use" and m.role == "assistant":
            if not b.id or not b.name:
                raise bad_request(f"{where}: a tool_use block needs id and name", where)
            calls.append({"id": b.id, "type": "function", "function": {
                "name": b.name, "arguments": msgspec.json.encode(b.input or {}).decode()}})
        elif b.type in ("thinking", "redacted_thinking") and m.role == "assistant":
            continue  # earlier turns' reasoning: chat templates drop it from the prompt too
        else:
            raise bad_request(f"{where}: a {m.role} message cannot hold a {b.type!r} block",
                              f"{where}.type")
    if parts or calls or not msgs:
        msg: dict[str, Any] = {"role": m.role, "content": parts or ("" if calls else parts)}
        if calls:
            msg["tool_calls"] = calls
        msgs.append(msg)
    return msgs


def _tools(req: CountTokensRequest) -> dict[str, Any]:
    """``tools`` and ``tool_choice`` in OpenAI's shape (enforced by the chat run's grammar)."""
    if not req.tools:
        if req.tool_choice is not None and req.tool_choice.type not in ("auto", "none"):
            raise bad_request("tool_choice needs tools", "tool_choice")
        return {}
    tools = []
    for k, tool in enumerate(req.tools):
        if tool.type not in (None, "custom"):
            raise bad_request(f"tools[{k}]: server tool {tool.type!r} is not supported; define a "
                              "client tool with input_schema", f"tools[{k}].type")
        if tool.input_schema is None:
            raise bad_request(f"tools[{k}].input_schema is required", f"tools[{k}].input_schema")
        fn: dict[str, Any] = {"name": tool.name, "parameters": tool.input_schema}
        if tool.description:
            fn["description"] = tool.description
        tools.append({"type": "function", "function": fn})
    fields: dict[str, Any] = {"tools": tools}
    tc = req.tool_choice
    if tc is not None:
        names = {tool.name for tool in req.tools}
        if tc.type == "tool" and tc.name not in names:
            raise bad_request(f"tool_choice.name must name one of the tools, got {tc.name!r}",
                              "tool_choice.name")
        choice = {"auto": "auto", "any": "required", "none": "none"}.get(tc.type)
        if tc.type == "tool":
            fields["tool_choice"] = {"type": "function", "function": {"name": tc.name}}
        elif choice is None:
            raise bad_request("tool_choice.type must be auto, any, tool or none", "tool_choice.type")
        else:
            fields["tool_choice"] = choice
        if tc.disable_parallel_tool_use:
            fields["parallel_tool_calls"] = False
    return fields


# Anthropic's effort levels -> the chat run's reasoning_effort (for templates that take one).
EFFORTS = {"low": "low", "medium": "medium", "high": "high", "xhigh": "high", "max": "high"}


def _output(req: CountTokensRequest) -> dict[str, Any]:
    """``thinking``, ``output_config.format`` and ``.effort`` as chat run fields."""
    fields: dict[str, Any] = {}
    if req.thinking is not None:  # the template's switch (Qwen3-style); absent = its default
        fields["chat_template_kwargs"] = {"enable_thinking": req.thinking.type != "disabled"}
    oc = req.output_config
    if oc is not None and oc.format is not None:
        if oc.format.type != "json_schema" or oc.format.schema is None:
            raise bad_request("output_config.format must be {type: json_schema, schema}",
                              "output_config.format")
        fields["response_format"] = {"type": "json_schema", "json_schema": {
            "name": "output", "schema": oc.format.schema, "strict": True}}
    if oc is not None and oc.effort is not None:
        if oc.effort not in EFFORTS:
            raise bad_request(f"output_config.effort must be one of {', '.join(EFFORTS)}",
                              "output_config.effort")
        fields["reasoning_effort"] = EFFORTS[oc.effort]
    return fields


def _check(req: MessagesRequest) -> None:
    """Anthropic's own ranges (temperature is [0, 1] there), named as Anthropic names them."""
    if req.temperature is not None and not 0.0 <= req.temperature <= 1.0:
        raise bad_request(f"temperature must be in [0, 1], got {req.temperature}", "temperature")
    stops = req.stop_sequences or []
    if len(stops) > t.MAX_STOP or any(not s for s in stops):
        raise bad_request(f"stop_sequences takes at most {t.MAX_STOP} non-empty strings", "stop_sequences")
    th = req.thinking
    if th is not None and th.type == "enabled":
        if th.budget_tokens is None or not MIN_THINKING_BUDGET <= th.budget_tokens < req.max_tokens:
            raise bad_request(f"thinking.budget_tokens must be >= {MIN_THINKING_BUDGET} and less than "
                              "max_tokens", "thinking.budget_tokens")
    elif th is not None and th.type not in ("adaptive", "disabled"):
        raise bad_request("thinking.type must be enabled, adaptive or disabled", "thinking.type")


def to_chat(req: CountTokensRequest, **sampling: Any) -> t.ChatRequest:
    """The OpenAI ``ChatRequest`` that runs ``req`` (validated on the way in)."""
    msgs: list[dict[str, Any]] = []
    system = _text_of(req.system, "system")
    if system:
        msgs.append({"role": "system", "content": system})
    for i, m in enumerate(req.messages):
        msgs += _message(m, i)
    if not req.messages:
        raise bad_request("messages must not be empty", "messages")
    if req.messages[-1].role == "assistant":  # as Anthropic answers for models without prefill
        raise bad_request("prefill is not supported: the last message must be a user message",
                          f"messages[{len(req.messages) - 1}].role", code="unsupported_value")
    body = {"model": req.model, "messages": msgs, **_tools(req), **_output(req), **sampling}
    return msgspec.convert(body, t.ChatRequest)


async def messages(request: Request) -> Response:
    gw = _gw(request)
    req = t.decode(await read_body(request, gw.cfg.max_body_bytes), MessagesRequest)
    _check(req)
    chat_req = to_chat(req, max_tokens=req.max_tokens, stop=req.stop_sequences, stream=req.stream,
                       temperature=req.temperature, top_p=req.top_p, top_k=req.top_k,
                       user=req.metadata.user_id if req.metadata else None)
    run, model = await chat.start_chat(request, gw, chat_req, route="messages")
    shape = out.Shape(model=model, thinking=req.thinking is None or req.thinking.type != "disabled")
    if req.stream:
        return SSEStream(run, out.events(run, shape))

    async def collect() -> Response:
        return json_response(out.message(await chat.chat_body(run, model), run, shape),
                             headers={"x-request-id": run.msg.id})
    return Deferred(run, collect)


async def count_tokens(request: Request) -> Response:
    """The prompt's exact token count: the worker renders it with the model's own chat template
    (tools included) and reports the count; one token is generated and thrown away."""
    gw = _gw(request)
    req = t.decode(await read_body(request, gw.cfg.max_body_bytes), CountTokensRequest)
    run, _ = await chat.start_chat(request, gw, to_chat(req, max_tokens=1, temperature=0.0),
                                   route="count_tokens")

    async def collect() -> Response:
        await chat.chat_body(run, "")
        return json_response({"input_tokens": run.outcome.prompt_tokens},
                             headers={"x-request-id": run.msg.id})
    return Deferred(run, collect)


routes = [
    Route("/v1/messages", messages, methods=["POST"]),
    Route("/v1/messages/count_tokens", count_tokens, methods=["POST"]),
]
