"""The one chat run every chat-like surface shares.

A validated ``ChatRequest`` becomes a ``Generate`` on a leased worker; its answer comes back in
OpenAI's shapes: one ``chat.completion`` body, or a stream of ``chat.completion.chunk`` choices.
The OpenAI chat route writes those out as they are; Anthropic Messages and OpenAI Responses
translate their requests into a ``ChatRequest`` and these shapes into theirs, so there is one
generation path whatever the client speaks.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

from starlette.requests import Request

from mlx_supervisor.gateway.api import schemas as t
from mlx_supervisor.gateway.api import tools
from mlx_supervisor.gateway.api.gateway import Gateway
from mlx_supervisor.gateway.api.respond import start_run
from mlx_supervisor.gateway.api.run import Run
from mlx_supervisor.gateway.errors import APIError, bad_request
from mlx_supervisor.shared import protocol as p

DEFAULT_MAX_TOKENS = 1024
FINGERPRINT = "mlx-supervisor-0.1"


def flatten(messages: list[t.ChatMessage]) -> tuple[list[dict[str, Any]], list[str]]:
    """OpenAI messages -> template-ready dicts with string content, plus image URLs in order."""
    out: list[dict[str, Any]] = []
    images: list[str] = []
    for i, m in enumerate(messages):
        if m.role not in ("system", "user", "assistant", "tool", "developer"):
            raise bad_request(f"messages[{i}].role must be system, user, assistant, tool or developer, "
                              f"got {m.role!r}", f"messages[{i}].role")
        role = "system" if m.role == "developer" else m.role
        extra: dict[str, Any] = {}  # what templates render for tool turns
        if m.tool_calls:
            extra["tool_calls"] = tools.tool_calls_in(i, m.tool_calls)
        if m.tool_call_id is not None:
            extra["tool_call_id"] = m.tool_call_id
        if m.name is not None:
            extra["name"] = m.name
        if m.content is None or isinstance(m.content, str):
            out.append({"role": role, "content": m.content or "", **extra})
            continue
        parts: list[dict[str, Any]] = []
        for j, part in enumerate(m.content):
            if part.type == "text":
                parts.append({"type": "text", "text": part.text or ""})
            elif part.type == "image_url" and part.image_url is not None:
                url = part.image_url if isinstance(part.image_url, str) else part.image_url.url
                images.append(url)
                parts.append({"type": "image"})  # the bytes travel in Generate.images, in order
            else:
                raise bad_request(f"messages[{i}].content[{j}]: unsupported content part type "
                                  f"{part.type!r}", f"messages[{i}].content[{j}].type")
        if any(p_["type"] == "image" for p_ in parts):
            out.append({"role": role, "content": parts, **extra})
        else:  # text-only: one string, which every chat template understands
            out.append({"role": role, "content": "\n".join(p_["text"] for p_ in parts), **extra})
    if not out:
        raise bad_request("messages must not be empty", "messages")
    return out, images


def sampling(r: t.Sampling, rid: str, max_tokens: int | None) -> dict[str, Any]:
    """The ``Generate`` fields every text request shares, with our defaults filled in."""
    return dict(
        id=rid, max_tokens=max_tokens or DEFAULT_MAX_TOKENS,
        temperature=1.0 if r.temperature is None else r.temperature,
        top_p=1.0 if r.top_p is None else r.top_p, top_k=r.top_k or 0, min_p=r.min_p or 0.0,
        seed=r.seed, stop=t.stop_list(r.stop), repetition_penalty=r.repetition_penalty,
        presence_penalty=r.presence_penalty, frequency_penalty=r.frequency_penalty,
        logit_bias=t.logit_bias(r),
    )


async def start_chat(request: Request, gw: Gateway, req: t.ChatRequest, route: str = "chat") -> tuple[Run, str]:
    """Validate ``req`` (400s name the parameter), then queue it for its model's worker and send
    it. Returns the started run and the model's catalog id."""
    entry = gw.entry(req.model)
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    t.validate_sampling(req, max_tokens)
    if req.top_logprobs is not None and not 0 <= req.top_logprobs <= 20:
        raise bad_request("top_logprobs must be in [0, 20]", "top_logprobs")
    messages, image_urls = flatten(req.messages)
    if entry.kind == "embeddings":
        raise bad_request(f"model {entry.id!r} is an embeddings model; use /v1/embeddings",
                          "tools" if req.tools else "model", code="wrong_model_kind")
    default_choice = entry.source.tool_choice if entry.source is not None else "auto"
    extra = tools.generate_fields(req, entry.kind, default_choice)
    images: list[bytes] = []
    if image_urls:
        if entry.kind != "vlm":
            raise bad_request(f"model {entry.id!r} is a text-only ({entry.kind}) model and cannot take "
                              "images", "messages", code="wrong_model_kind")
        images = await gw.fetch_images(image_urls)
    rid = request.state.request_id
    msg = p.Generate(messages=messages, images=images, logprobs=bool(req.logprobs),
                     top_logprobs=req.top_logprobs or 0, **sampling(req, rid, max_tokens), **extra)
    return await start_run(request, gw, entry.id, route, msg), entry.id


def usage(run: Run) -> dict[str, Any]:
    o = run.outcome
    u: dict[str, Any] = {"prompt_tokens": o.prompt_tokens, "completion_tokens": o.completion_tokens,
                         "total_tokens": o.prompt_tokens + o.completion_tokens}
    if o.cached_tokens:
        u["prompt_tokens_details"] = {"cached_tokens": o.cached_tokens}
    return u


def error_body(e: p.Error) -> dict[str, Any]:
    """A worker's error mid-stream, in OpenAI's shape (``{"error": {...}}``)."""
    return APIError(e.status, e.message, code=e.code, param=e.param).body()


def chat_logprobs(lps: list[p.TokenLogprob]) -> list[dict[str, Any]]:
    return [{"token": lp.token, "logprob": lp.logprob, "bytes": list(lp.token.encode()),
             "top_logprobs": [{"token": tk, "logprob": v, "bytes": list(tk.encode())} for tk, v in lp.top]}
            for lp in lps]


def tool_call_out(c: p.ToolCall) -> dict[str, Any]:
    return {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}


def chunk_deltas(msg: p.Chunk, calls_before: int) -> list[dict[str, Any]]:
    """One worker Chunk as OpenAI stream deltas: ``reasoning_content``, ``content``, then each
    tool call as OpenAI streams one (index, id, type and name first; then its arguments)."""
    out: list[dict[str, Any]] = []
    if msg.reasoning:
        out.append({"reasoning_content": msg.reasoning})
    if msg.text or not (msg.reasoning or msg.tool_calls):
        out.append({"content": msg.text})
    for k, c in enumerate(msg.tool_calls, calls_before):
        out.append({"tool_calls": [{"index": k, "id": c.id, "type": "function",
                                    "function": {"name": c.name, "arguments": ""}}]})
        out.append({"tool_calls": [{"index": k, "function": {"arguments": c.arguments}}]})
    return out


async def chat_choices(run: Run, logprobs: bool = False) -> AsyncIterator[dict[str, Any]]:
    """The run's answer as OpenAI ``chat.completion.chunk`` choices, the last one carrying the
    ``finish_reason`` ("tool_calls" after calls). A worker error is yielded as OpenAI's error
    body and ends the stream."""
    first, calls = True, 0
    async for msg in run.messages():
        if isinstance(msg, p.Chunk):
            lp = {"content": chat_logprobs(msg.logprobs)} if logprobs and msg.logprobs else None
            for delta in chunk_deltas(msg, calls):
                if first:
                    delta = {"role": "assistant", "content": None, **delta}
                    first = False
                yield {"index": 0, "delta": delta, "logprobs": lp, "finish_reason": None}
                lp = None
            calls += len(msg.tool_calls)
        elif isinstance(msg, p.Done):
            end = {"index": 0, "delta": {"role": "assistant", "content": ""} if first else {},
                   "logprobs": None, "finish_reason": msg.finish_reason}
            if msg.stop_sequence is not None:
                end["stop_reason"] = msg.stop_sequence
            yield end
        elif isinstance(msg, p.Error):
            yield error_body(msg)


async def chat_body(run: Run, model: str, logprobs: bool = False) -> dict[str, Any]:
    """The run's whole answer as one OpenAI ``chat.completion``; a worker error raises."""
    parts: list[str] = []
    thinking: list[str] = []
    calls: list[p.ToolCall] = []
    lps: list[p.TokenLogprob] = []
    finish, stop_sequence = "stop", None
    async for msg in run.messages():
        if isinstance(msg, p.Chunk):
            parts.append(msg.text)
            thinking.append(msg.reasoning)
            calls.extend(msg.tool_calls)
            if msg.logprobs:
                lps.extend(msg.logprobs)
        elif isinstance(msg, p.Done):
            finish, stop_sequence = msg.finish_reason, msg.stop_sequence
        elif isinstance(msg, p.Error):
            raise APIError(msg.status, msg.message, code=msg.code, param=msg.param)
    text = "".join(parts)
    message: dict[str, Any] = {"role": "assistant", "content": text or (None if calls else "")}
    if any(thinking):
        message["reasoning_content"] = "".join(thinking)
    if calls:
        message["tool_calls"] = [tool_call_out(c) for c in calls]
    choice: dict[str, Any] = {"index": 0, "message": message,
                              "logprobs": {"content": chat_logprobs(lps)} if logprobs else None,
                              "finish_reason": finish}
    if stop_sequence is not None:  # vLLM's name for it: the stop string that ended the text
        choice["stop_reason"] = stop_sequence
    return {"id": "chatcmpl-" + run.msg.id, "object": "chat.completion", "created": int(time.time()),
            "model": model, "system_fingerprint": FINGERPRINT, "choices": [choice], "usage": usage(run)}
