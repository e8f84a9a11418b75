"""Tools, tool calls, structured output and reasoning fields of a chat request, checked and turned
into ``Generate`` fields.

Every check that needs no model runs here, before a worker is leased: a malformed tool, a
``tool_choice`` naming no given function (or given without tools), a ``response_format`` or tool
schema llguidance cannot compile (:mod:`shared.grammar`): each is a 400 naming its parameter.
What only the model knows (is there a tool parser, is its format one a grammar can force) the
worker checks, also with a 400. The Anthropic and Responses adapters build the same OpenAI
shapes and pass them through here.
"""

from __future__ import annotations

import json
import re
from typing import Any

import msgspec

from mlx_supervisor.gateway.api import schemas as t
from mlx_supervisor.gateway.errors import bad_request
from mlx_supervisor.shared import grammar
from mlx_supervisor.shared.protocol import JsonFormat

_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
REASONING_EFFORTS = ("none", "minimal", "low", "medium", "high")
RESERVED_KWARGS = {"conversation", "messages", "tools", "documents", "add_generation_prompt",
                   "tokenize", "return_dict", "continue_final_message"}


def _tools(tools: list[t.Tool]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    seen: set[str] = set()
    for i, tool in enumerate(tools):
        if tool.type != "function":
            raise bad_request(f"tools[{i}].type must be 'function', got {tool.type!r}",
                              f"tools[{i}].type")
        fn = tool.function
        if fn is None:
            raise bad_request(f"tools[{i}] needs a 'function'", f"tools[{i}].function")
        if not _NAME.match(fn.name):
            raise bad_request(f"tools[{i}].function.name must match ^[a-zA-Z0-9_-]{{1,64}}$, "
                              f"got {fn.name!r}", f"tools[{i}].function.name")
        if fn.name in seen:
            raise bad_request(f"tools[{i}].function.name {fn.name!r} is given twice",
                              f"tools[{i}].function.name")
        seen.add(fn.name)
        if fn.parameters is not None:
            why = grammar.schema_error(fn.parameters, strict=bool(fn.strict))
            if why is not None:
                raise bad_request(f"tools[{i}].function.parameters is not a JSON schema that can "
                                  f"be enforced: {why}", f"tools[{i}].function.parameters",
                                  code="invalid_schema")
        out.append({"type": "function", "function": msgspec.to_builtins(fn)})
    if not out:
        raise bad_request("tools must not be empty (leave it out instead)", "tools")
    return out


def _tool_choice(choice: str | t.NamedToolChoice | None, names: set[str],
                 default: str = "auto") -> tuple[str, str | None]:
    if isinstance(choice, t.NamedToolChoice):
        if choice.type != "function":
            raise bad_request(f"tool_choice.type must be 'function', got {choice.type!r}",
                              "tool_choice.type")
        if choice.function.name not in names:
            raise bad_request(f"tool_choice names function {choice.function.name!r}, which is "
                              "not in tools", "tool_choice.function.name")
        return "function", choice.function.name
    if choice is None:  # the model's configured default (``tool_choice`` in its config table)
        return default, None
    if choice not in ("auto", "none", "required"):
        raise bad_request("tool_choice must be 'auto', 'none', 'required' or "
                          f"{{'type': 'function', 'function': {{'name': ...}}}}, got {choice!r}",
                          "tool_choice")
    return choice, None


def _json_format(rf: t.ResponseFormat | None) -> JsonFormat | None:
    if rf is None or rf.type == "text":
        return None
    if rf.type == "json_object":
        return JsonFormat()
    if rf.type != "json_schema":
        raise bad_request("response_format.type must be 'text', 'json_object' or 'json_schema', "
                          f"got {rf.type!r}", "response_format.type")
    if rf.json_schema is None or rf.json_schema.schema is None:
        raise bad_request("response_format.json_schema.schema is required for type "
                          "'json_schema'", "response_format.json_schema.schema")
    strict = bool(rf.json_schema.strict)
    why = grammar.schema_error(rf.json_schema.schema, strict=strict)
    if why is not None:
        raise bad_request(f"response_format.json_schema.schema cannot be enforced: {why}",
                          "response_format.json_schema.schema", code="invalid_schema")
    return JsonFormat(schema=rf.json_schema.schema, strict=strict)


def generate_fields(req: t.ChatRequest, kind: str, default_choice: str = "auto") -> dict[str, Any]:
    """The ``Generate`` keyword arguments for tools, tool_choice, response_format and reasoning.
    ``default_choice`` is the model's configured ``tool_choice`` for a request that gives tools
    but sends none."""
    out: dict[str, Any] = {}
    if req.tools is not None:
        if kind != "lm":
            raise bad_request(f"tools need a text model with a tool-call parser; this is a {kind} "
                              "model", "tools", code="tools_not_supported")
        out["tools"] = tools = _tools(req.tools)
        choice, name = _tool_choice(req.tool_choice, {x["function"]["name"] for x in tools},
                                    default_choice)
        out["tool_choice"], out["tool_name"] = choice, name
        out["parallel_tool_calls"] = req.parallel_tool_calls is not False
    elif req.tool_choice is not None:
        raise bad_request("tool_choice is only allowed when tools are given", "tool_choice")
    out["json_format"] = _json_format(req.response_format)
    if out["json_format"] is not None and kind not in ("lm", "vlm"):
        raise bad_request(f"response_format needs a text or vision model; this is a {kind} model",
                          "response_format", code="response_format_not_supported")
    kwargs = dict(req.chat_template_kwargs or {})
    taken = sorted(set(kwargs) & RESERVED_KWARGS)
    if taken:
        raise bad_request(f"chat_template_kwargs must not set {', '.join(taken)} (the request's "
                          "own fields do)", "chat_template_kwargs")
    if req.reasoning_effort is not None:
        if req.reasoning_effort not in REASONING_EFFORTS:
            raise bad_request(f"reasoning_effort must be one of {', '.join(REASONING_EFFORTS)}, "
                              f"got {req.reasoning_effort!r}", "reasoning_effort")
        if req.reasoning_effort == "none":
            kwargs.setdefault("enable_thinking", False)
        else:  # templates that take it (gpt-oss) read it; the others ignore it
            kwargs.setdefault("reasoning_effort", req.reasoning_effort)
    out["chat_template_kwargs"] = kwargs or None
    return out


def tool_calls_in(i: int, calls: list[t.ToolCallIn]) -> list[dict[str, Any]]:
    """An assistant message's calls as chat templates expect them: ``arguments`` as an object
    (templates render it with ``tojson``), as mlx-lm's server passes them."""
    out = []
    for j, c in enumerate(calls):
        try:
            args = json.loads(c.function.arguments) if c.function.arguments else {}
        except ValueError:
            raise bad_request(f"messages[{i}].tool_calls[{j}].function.arguments is not JSON",
                              f"messages[{i}].tool_calls[{j}].function.arguments") from None
        out.append({"id": c.id, "type": "function",
                    "function": {"name": c.function.name, "arguments": args}})
    return out
