"""OpenAI Responses: ``POST /v1/responses``, ``GET``/``DELETE /v1/responses/{id}``,
``POST /v1/responses/{id}/cancel``.

An adapter, not a second generation path: ``input`` (after the stored conversation that
``previous_response_id`` names) and ``instructions`` become an OpenAI ``ChatRequest`` that
:mod:`chat` runs exactly as ``/v1/chat/completions`` runs it; :mod:`responses_out` shapes the
answer. Answers sent with ``store: true`` (the default) are kept in the ledger's SQLite file
(:mod:`observe.response_store`); ``store: false`` keeps nothing.
"""

from __future__ import annotations

import weakref
from typing import Any

import msgspec
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from mlx_supervisor.gateway.api import chat
from mlx_supervisor.gateway.api import responses_out as out
from mlx_supervisor.gateway.api import schemas as t
from mlx_supervisor.gateway.api.gateway import Gateway, json_response, read_body
from mlx_supervisor.gateway.api.respond import Deferred, SSEStream
from mlx_supervisor.gateway.api.responses_schemas import Item, Part, ResponsesRequest
from mlx_supervisor.gateway.errors import APIError, bad_request
from mlx_supervisor.gateway.observe.ledger import Ledger, LedgerError
from mlx_supervisor.gateway.observe.response_store import ResponseStore

PREFIX = "resp_"
_stores: weakref.WeakKeyDictionary[Ledger, ResponseStore] = weakref.WeakKeyDictionary()


def _gw(request: Request) -> Gateway:
    gw: Gateway = request.app.state.gateway
    return gw


def store_of(gw: Gateway) -> ResponseStore | None:
    """The response store, when the ledger is up (it is the ledger's file)."""
    ledger = gw.jobs.ledger if gw.jobs is not None else None
    if ledger is None or ledger.failed:
        return None
    if ledger not in _stores:
        _stores[ledger] = ResponseStore(ledger, gw.cfg.ledger.response_retention_days)
    return _stores[ledger]


def _content(content: str | list[Part] | None, at: str) -> str | list[dict[str, Any]]:
    if content is None or isinstance(content, str):
        return content or ""
    parts: list[dict[str, Any]] = []
    for j, part in enumerate(content):
        if part.type in ("input_text", "output_text", "text", "refusal"):
            parts.append({"type": "text", "text": part.text or ""})
        elif part.type == "input_image" and part.image_url:
            parts.append({"type": "image_url", "image_url": {"url": part.image_url}})
        else:
            raise bad_request(f"{at}[{j}]: unsupported content part {part.type!r} (input_text, "
                              "output_text and input_image with image_url are)", f"{at}[{j}].type")
    return parts


def _items(items: list[Item]) -> list[dict[str, Any]]:
    """Input items as chat messages; consecutive function calls join one assistant message."""
    msgs: list[dict[str, Any]] = []
    for i, it in enumerate(items):
        at = f"input[{i}]"
        kind = it.type or "message"
        if kind == "message":
            if it.role not in ("user", "assistant", "system", "developer"):
                raise bad_request(f"{at}.role must be user, assistant, system or developer, got "
                                  f"{it.role!r}", f"{at}.role")
            msgs.append({"role": it.role, "content": _content(it.content, f"{at}.content")})
        elif kind == "function_call":
            if not it.call_id or not it.name:
                raise bad_request(f"{at}: a function_call needs call_id and name", at)
            call = {"id": it.call_id, "type": "function",
                    "function": {"name": it.name, "arguments": it.arguments or "{}"}}
            last = msgs[-1] if msgs else None
            if last is not None and last["role"] == "assistant" and "tool_calls" in last:
                last["tool_calls"].append(call)
            else:
                msgs.append({"role": "assistant", "content": "", "tool_calls": [call]})
        elif kind == "function_call_output":
            output = it.output if isinstance(it.output, str) else _content(it.output, f"{at}.output")
            text = output if isinstance(output, str) else "\n".join(p["text"] for p in output if "text" in p)
            msgs.append({"role": "tool", "tool_call_id": it.call_id or "", "content": text})
        elif kind == "reasoning":
            continue  # earlier turns' reasoning: chat templates drop it from the prompt too
        else:
            raise bad_request(f"{at}.type {kind!r} is not supported (message, function_call, "
                              "function_call_output, reasoning are)", f"{at}.type")
    return msgs


def _tools(req: ResponsesRequest) -> dict[str, Any]:
    fields: dict[str, Any] = {}
    if req.tools:
        tools = []
        for k, tool in enumerate(req.tools):
            if tool.type != "function" or not tool.name:
                raise bad_request(f"tools[{k}]: only function tools (with a name) are supported, "
                                  f"got {tool.type!r}", f"tools[{k}].type")
            fn: dict[str, Any] = {"name": tool.name, "parameters": tool.parameters or {"type": "object"}}
            if tool.description:
                fn["description"] = tool.description
            if tool.strict is not None:
                fn["strict"] = tool.strict
            tools.append({"type": "function", "function": fn})
        fields["tools"] = tools
    tc = req.tool_choice
    if isinstance(tc, str) and (tc != "auto" or req.tools):  # an explicit auto beats the
        # model's configured default; without tools it says nothing (clients send it anyway)
        fields["tool_choice"] = tc
    elif tc is not None and not isinstance(tc, str):
        if tc.type != "function" or not tc.name:
            raise bad_request("tool_choice must be auto, none, required or {type: function, name}",
                              "tool_choice")
        fields["tool_choice"] = {"type": "function", "function": {"name": tc.name}}
    if req.parallel_tool_calls is not None:
        fields["parallel_tool_calls"] = req.parallel_tool_calls
    f = req.text.format if req.text is not None else None
    if f is not None and f.type == "json_schema":
        if f.schema is None:
            raise bad_request("text.format.schema is required for json_schema", "text.format.schema")
        spec: dict[str, Any] = {"name": f.name or "response", "schema": f.schema}
        if f.strict is not None:
            spec["strict"] = f.strict
        fields["response_format"] = {"type": "json_schema", "json_schema": spec}
    elif f is not None and f.type == "json_object":
        fields["response_format"] = {"type": "json_object"}
    elif f is not None and f.type != "text":
        raise bad_request("text.format.type must be text, json_object or json_schema", "text.format.type")
    return fields


def _check(req: ResponsesRequest) -> None:
    """Refuse what this server cannot honour, naming the parameter."""
    if req.background:
        raise bad_request("background responses are not supported", "background", code="unsupported_value")
    if req.truncation not in (None, "disabled"):
        raise bad_request("truncation must be 'disabled' (a prompt over the context is a 400)",
                          "truncation", code="unsupported_value")
    if req.top_logprobs:
        raise bad_request("top_logprobs is not supported on /v1/responses (use chat completions)",
                          "top_logprobs", code="unsupported_value")


def to_chat(req: ResponsesRequest, history: list[dict[str, Any]]) -> tuple[t.ChatRequest, list[dict[str, Any]]]:
    """The ``ChatRequest`` that runs ``req`` after ``history``, and the conversation (without
    the instructions) that a continuation of this answer starts from."""
    new = ([{"role": "user", "content": req.input}] if isinstance(req.input, str) else _items(req.input))
    conversation = history + new
    if not conversation:
        raise bad_request("input must not be empty", "input")
    system = [{"role": "system", "content": req.instructions}] if req.instructions else []
    body: dict[str, Any] = {
        "model": req.model, "messages": system + conversation, **_tools(req),
        "max_completion_tokens": req.max_output_tokens, "temperature": req.temperature,
        "top_p": req.top_p, "user": req.user or req.safety_identifier, "stream": req.stream}
    if req.reasoning is not None and req.reasoning.effort is not None:
        body["reasoning_effort"] = req.reasoning.effort
    try:
        return msgspec.convert(body, t.ChatRequest), conversation
    except msgspec.ValidationError as e:
        raise bad_request(f"invalid request: {e}", None) from None


async def _history(gw: Gateway, req: ResponsesRequest) -> list[dict[str, Any]]:
    pid = req.previous_response_id
    if pid is None:
        return []
    store = store_of(gw)
    found = await store.get(pid) if store is not None and pid.startswith(PREFIX) else None
    if found is None:
        raise APIError(404, f"previous response {pid[:200]!r} not found", param="previous_response_id",
                       code="previous_response_not_found")
    return found.messages


async def create(request: Request) -> Response:
    gw = _gw(request)
    req = t.decode(await read_body(request, gw.cfg.max_body_bytes), ResponsesRequest)
    _check(req)
    chat_req, conversation = to_chat(req, await _history(gw, req))
    run, model = await chat.start_chat(request, gw, chat_req, route="responses")
    store = store_of(gw) if req.store else None
    shape = out.Shape(req, model, PREFIX + run.msg.id, store, conversation)
    if req.stream:
        return SSEStream(run, out.events(run, shape))

    async def collect() -> Response:
        return json_response(await out.collect(run, shape), headers={"x-request-id": run.msg.id})
    return Deferred(run, collect)


async def one(request: Request) -> Response:
    gw = _gw(request)
    rid = request.path_params["response_id"]
    store = store_of(gw)
    if store is None:
        raise APIError(404, f"no stored response {rid[:200]!r} (the ledger is disabled)",
                       param="response_id", code="response_not_found")
    try:
        if request.method == "DELETE":
            if not await store.delete(rid):
                raise _not_found(rid)
            return json_response({"id": rid, "object": "response", "deleted": True})
        found = await store.get(rid)
    except LedgerError as e:
        raise APIError(503, str(e), code="ledger_disabled") from None
    if found is None:
        raise _not_found(rid)
    return json_response(found.response)


async def cancel(request: Request) -> Response:
    """Stop a response still being generated (it ends ``cancelled``); 409 once it finished."""
    gw = _gw(request)
    rid = request.path_params["response_id"]
    if gw.jobs is None or not rid.startswith(PREFIX):
        raise _not_found(rid)
    request_id = rid[len(PREFIX):]
    if request_id not in gw.jobs.live:
        store = store_of(gw)
        found = await store.get(rid) if store is not None else None
        if found is None:
            raise _not_found(rid)
        raise APIError(409, f"response {rid} already finished ({found.response['status']})",
                       code="response_finished")
    await gw.jobs.cancel(request_id)
    return json_response({"id": rid, "object": "response", "status": "cancelled"})


def _not_found(rid: str) -> APIError:
    return APIError(404, f"no stored response {rid[:200]!r}", param="response_id",
                    code="response_not_found")


routes = [
    Route("/v1/responses", create, methods=["POST"]),
    Route("/v1/responses/{response_id}", one, methods=["GET", "DELETE"]),
    Route("/v1/responses/{response_id}/cancel", cancel, methods=["POST"]),
]
