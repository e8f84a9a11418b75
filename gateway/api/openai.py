"""The OpenAI-compatible routes: chat, completions, embeddings, models."""

from __future__ import annotations

import base64
import time
from collections.abc import AsyncIterator
from typing import Any

import msgspec
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from mlx_supervisor.gateway.api import chat
from mlx_supervisor.gateway.api import schemas as t
from mlx_supervisor.gateway.api.gateway import Gateway, json_response, read_body
from mlx_supervisor.gateway.api.respond import Deferred, SSEStream, start_run
from mlx_supervisor.gateway.api.run import SSE_DONE, Run, sse
from mlx_supervisor.gateway.errors import APIError, bad_request
from mlx_supervisor.shared import protocol as p


def _gw(request: Request) -> Gateway:
    gw: Gateway = request.app.state.gateway
    return gw


# ---------------------------------------------------------------- chat


async def chat_completions(request: Request) -> Response:
    gw = _gw(request)
    req = t.decode(await read_body(request, gw.cfg.max_body_bytes), t.ChatRequest)
    run, model = await chat.start_chat(request, gw, req)
    logprobs = bool(req.logprobs)
    if not req.stream:
        async def collect() -> Response:
            return json_response(await chat.chat_body(run, model, logprobs),
                                 headers={"x-request-id": run.msg.id})
        return Deferred(run, collect)
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    return SSEStream(run, _chat_events(run, model, include_usage, logprobs))


def _event_head(run: Run, obj: str, model: str) -> tuple[dict[str, Any], bytes]:
    """Every chunk is ``{**base, "choices": [...]}``: encode ``base`` once."""
    base = {"id": ("chatcmpl-" if obj.startswith("chat") else "cmpl-") + run.msg.id, "object": obj,
            "created": int(time.time()), "model": model, "system_fingerprint": chat.FINGERPRINT}
    return base, b"data: " + msgspec.json.encode(base)[:-1] + b',"choices":'


async def _chat_events(run: Run, model: str, include_usage: bool, logprobs: bool) -> AsyncIterator[bytes]:
    base, head = _event_head(run, "chat.completion.chunk", model)
    async for choice in chat.chat_choices(run, logprobs):
        if "error" in choice:
            yield sse(choice)
            continue
        yield head + msgspec.json.encode([choice]) + b"}\n\n"
        if choice["finish_reason"] is not None:
            if include_usage:
                yield sse({**base, "choices": [], "usage": chat.usage(run)})
            yield SSE_DONE


# ---------------------------------------------------------------- completions


async def completions(request: Request) -> Response:
    gw = _gw(request)
    req = t.decode(await read_body(request, gw.cfg.max_body_bytes), t.CompletionRequest)
    entry = gw.entry(req.model)
    t.validate_sampling(req, req.max_tokens)
    if req.logprobs is not None and not 0 <= req.logprobs <= 20:
        raise bad_request("logprobs must be in [0, 20]", "logprobs")
    if entry.kind == "embeddings":
        raise bad_request(f"model {entry.id!r} is an embeddings model; use /v1/embeddings", "model",
                          code="wrong_model_kind")
    prompt, ids = _prompt(req.prompt)
    rid = request.state.request_id
    msg = p.Generate(prompt=prompt, prompt_ids=ids, logprobs=req.logprobs is not None,
                     top_logprobs=req.logprobs or 0, **chat.sampling(req, rid, req.max_tokens))
    run = await start_run(request, gw, entry.id, "completions", msg)
    logprobs = req.logprobs is not None
    if not req.stream:
        return Deferred(run, lambda: _collect_completion(run, entry.id, logprobs))
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    return SSEStream(run, _completion_events(run, entry.id, include_usage, logprobs))


def _prompt(pr: str | list[Any]) -> tuple[str | None, list[int] | None]:
    """A raw prompt as text or token ids; batched prompts are refused."""
    prompt: str | None = None
    ids: list[int] | None = None
    if isinstance(pr, str):
        prompt = pr
    elif pr and all(isinstance(x, int) for x in pr):
        ids = [int(x) for x in pr]
    elif isinstance(pr, list) and len(pr) == 1:
        one = pr[0]
        prompt, ids = (one, None) if isinstance(one, str) else (None, list(one))
    else:
        raise bad_request("prompt must be a string, a list of token ids, or a list holding one of "
                          "those (batched prompts are not supported)", "prompt")
    if prompt == "" or ids == []:
        raise bad_request("prompt must not be empty", "prompt")
    if ids is not None and any(i < 0 for i in ids):
        raise bad_request("token ids must be >= 0", "prompt")
    return prompt, ids


def _completion_logprobs(lps: list[p.TokenLogprob], offset: int) -> dict[str, Any]:
    offsets, pos = [], offset
    for lp in lps:
        offsets.append(pos)
        pos += len(lp.token)
    return {"tokens": [lp.token for lp in lps], "token_logprobs": [lp.logprob for lp in lps],
            "top_logprobs": [dict(lp.top) for lp in lps], "text_offset": offsets}


async def _completion_events(run: Run, model: str, include_usage: bool,
                             logprobs: bool) -> AsyncIterator[bytes]:
    base, head = _event_head(run, "text_completion", model)
    offset = 0
    async for msg in run.messages():
        if isinstance(msg, p.Chunk):
            lp = _completion_logprobs(msg.logprobs, offset) if logprobs and msg.logprobs else None
            offset += len(msg.text)
            choice = {"index": 0, "text": msg.text, "logprobs": lp, "finish_reason": None}
            yield head + msgspec.json.encode([choice]) + b"}\n\n"
        elif isinstance(msg, p.Done):
            end = {"index": 0, "text": "", "logprobs": None, "finish_reason": msg.finish_reason}
            yield head + msgspec.json.encode([end]) + b"}\n\n"
            if include_usage:
                yield sse({**base, "choices": [], "usage": chat.usage(run)})
            yield SSE_DONE
        elif isinstance(msg, p.Error):
            yield sse(chat.error_body(msg))


async def _collect_completion(run: Run, model: str, logprobs: bool) -> Response:
    parts: list[str] = []
    lps: list[p.TokenLogprob] = []
    finish = "stop"
    async for msg in run.messages():
        if isinstance(msg, p.Chunk):
            parts.append(msg.text)
            if msg.logprobs:
                lps.extend(msg.logprobs)
        elif isinstance(msg, p.Done):
            finish = msg.finish_reason
        elif isinstance(msg, p.Error):
            raise APIError(msg.status, msg.message, code=msg.code, param=msg.param)
    choice = {"index": 0, "text": "".join(parts), "finish_reason": finish,
              "logprobs": _completion_logprobs(lps, 0) if logprobs else None}
    return json_response({"id": "cmpl-" + run.msg.id, "object": "text_completion",
                          "created": int(time.time()), "model": model,
                          "system_fingerprint": chat.FINGERPRINT, "choices": [choice],
                          "usage": chat.usage(run)}, headers={"x-request-id": run.msg.id})


# ---------------------------------------------------------------- embeddings


async def embeddings(request: Request) -> Response:
    gw = _gw(request)
    req = t.decode(await read_body(request, gw.cfg.max_body_bytes), t.EmbeddingRequest)
    entry = gw.entry(req.model)
    if entry.kind != "embeddings":
        raise bad_request(f"model {entry.id!r} is a {entry.kind} model, not an embeddings model",
                          "model", code="wrong_model_kind")
    if req.encoding_format not in ("float", "base64"):
        raise bad_request("encoding_format must be 'float' or 'base64'", "encoding_format")
    if req.dimensions is not None and req.dimensions < 1:
        raise bad_request("dimensions must be >= 1", "dimensions")
    inp = req.input
    texts: list[str] | None = None
    ids: list[list[int]] | None = None
    if isinstance(inp, str):
        texts = [inp]
    elif inp and all(isinstance(x, int) for x in inp):
        ids = [[int(x) for x in inp]]
    elif inp and all(isinstance(x, str) for x in inp):
        texts = [str(x) for x in inp]
    elif inp and all(isinstance(x, list) for x in inp):
        ids = [list(x) for x in inp]
    if not (texts or ids) or (texts and any(s == "" for s in texts)) or (ids and any(not x for x in ids)):
        raise bad_request("input must be a non-empty string, list of strings, or token arrays", "input")
    if len(texts or ids or []) > 2048:
        raise bad_request("input allows at most 2048 items", "input")
    rid = request.state.request_id
    run = await start_run(request, gw, entry.id, "embeddings",
                       p.Embed(id=rid, texts=texts, token_ids=ids, dimensions=req.dimensions))
    result: p.Embeddings | None = None
    async for msg in run.messages():
        if isinstance(msg, p.Embeddings):
            result = msg
        elif isinstance(msg, p.Error):
            raise APIError(msg.status, msg.message, code=msg.code, param=msg.param)
    assert result is not None
    import numpy as np  # the gateway's one numeric need; numpy ships with every install of ours

    data = []
    for i, raw in enumerate(result.vectors):
        emb: Any = (base64.b64encode(raw).decode() if req.encoding_format == "base64"
                    else np.frombuffer(raw, dtype="<f4").tolist())
        data.append({"object": "embedding", "index": i, "embedding": emb})
    return json_response({"object": "list", "data": data, "model": entry.id,
                          "usage": {"prompt_tokens": result.prompt_tokens, "total_tokens": result.prompt_tokens}},
                         headers={"x-request-id": rid})


# ---------------------------------------------------------------- models


def _model_card(gw: Gateway, mid: str) -> dict[str, Any]:
    return {"id": mid, "object": "model", "created": int(gw.sup.started), "owned_by": "mlx-supervisor",
            **gw.sup.model_info(mid)}


async def list_models(request: Request) -> Response:
    gw = _gw(request)
    return json_response({"object": "list", "data": [_model_card(gw, m) for m in gw.sup.slots]})


async def get_model(request: Request) -> Response:
    gw = _gw(request)
    entry = gw.entry(request.path_params["model"])
    return json_response(_model_card(gw, entry.id))


routes = [
    Route("/v1/chat/completions", chat_completions, methods=["POST"]),
    Route("/v1/completions", completions, methods=["POST"]),
    Route("/v1/embeddings", embeddings, methods=["POST"]),
    Route("/v1/models", list_models, methods=["GET"]),
    Route("/v1/models/{model:path}", get_model, methods=["GET"]),
]
