"""The OpenAI-compatible routes: chat, completions, embeddings, models."""

from __future__ import annotations

import base64
import time
from collections.abc import AsyncIterator
from typing import Any

import msgspec
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from mlx_supervisor.gateway.api import schemas as t
from mlx_supervisor.gateway.api.gateway import Gateway, error_response, json_response, read_body
from mlx_supervisor.gateway.api.run import SSE_DONE, Outcome, Run, sse, until_disconnect
from mlx_supervisor.gateway.errors import APIError, bad_request
from mlx_supervisor.shared import protocol as p

DEFAULT_MAX_TOKENS = 1024
FINGERPRINT = "mlx-supervisor-0.1"


def _gw(request: Request) -> Gateway:
    gw: Gateway = request.app.state.gateway
    return gw


async def _start(request: Request, gw: Gateway, model_id: str, route: str,
                 msg: p.Generate | p.Embed) -> Run:
    """Queue for a worker, send the request, wait for its first reply; all cancellable by disconnect."""
    # The request id keys the worker's stream and the ledger row: two live requests must not
    # share one (a client may reuse x-request-id). Checked and claimed with no await between.
    if msg.id in gw.active_ids:
        raise APIError(409, f"a request with id {msg.id!r} is already in flight; send a unique "
                       "x-request-id", param="x-request-id", code="duplicate_request_id")
    gw.active_ids.add(msg.id)
    outcome = Outcome(request_id=msg.id, model=model_id, route=route,
                      t_received=request.state.t_received)
    outcome.client, outcome.body = (request.client.host if request.client else None), msg
    request.state.outcome = outcome
    gw.observe("queued", outcome)
    runs: list[Run] = []

    async def go() -> Run:
        lease = await gw.sup.acquire(model_id, msg.id)
        run = Run(gw.sup, lease, msg, outcome, gw.observers)
        runs.append(run)
        await run.start()
        return run

    try:
        return await until_disconnect(request, go())
    except BaseException as e:
        if runs and runs[0].closed:
            raise  # the run already reported how it finished
        outcome.status = "cancelled" if not isinstance(e, APIError) or e.status == 499 else "failed"
        if isinstance(e, APIError):
            outcome.error, outcome.error_type = e.message, e.code
        outcome.t_finished = time.time()
        gw.observe("finished", outcome)
        raise


# ---------------------------------------------------------------- chat


def _flatten(messages: list[t.ChatMessage]) -> tuple[list[dict[str, Any]], list[str]]:
    """OpenAI messages -> template-ready dicts with string content, plus image URLs in order."""
    out: list[dict[str, Any]] = []
    images: list[str] = []
    for i, m in enumerate(messages):
        if m.role not in ("system", "user", "assistant", "tool", "developer"):
            raise bad_request(f"messages[{i}].role must be system, user, assistant, tool or developer, "
                              f"got {m.role!r}", f"messages[{i}].role")
        role = "system" if m.role == "developer" else m.role
        if m.content is None or isinstance(m.content, str):
            out.append({"role": role, "content": m.content or ""})
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
            out.append({"role": role, "content": parts})
        else:  # text-only: one string, which every chat template understands
            out.append({"role": role, "content": "\n".join(p_["text"] for p_ in parts)})
    if not out:
        raise bad_request("messages must not be empty", "messages")
    return out, images


def _sampling(r: t.Sampling, rid: str, max_tokens: int | None) -> dict[str, Any]:
    return dict(
        id=rid, max_tokens=max_tokens or DEFAULT_MAX_TOKENS,
        temperature=1.0 if r.temperature is None else r.temperature,
        top_p=1.0 if r.top_p is None else r.top_p, top_k=r.top_k or 0, min_p=r.min_p or 0.0,
        seed=r.seed, stop=t.stop_list(r.stop), repetition_penalty=r.repetition_penalty,
        presence_penalty=r.presence_penalty, frequency_penalty=r.frequency_penalty,
        logit_bias=t.logit_bias(r),
    )


async def chat_completions(request: Request) -> Response:
    gw = _gw(request)
    req = t.decode(await read_body(request, gw.cfg.max_body_bytes), t.ChatRequest)
    entry = gw.entry(req.model)
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    t.validate_sampling(req, max_tokens)
    if req.top_logprobs is not None and not 0 <= req.top_logprobs <= 20:
        raise bad_request("top_logprobs must be in [0, 20]", "top_logprobs")
    messages, image_urls = _flatten(req.messages)
    if entry.kind == "embeddings":
        raise bad_request(f"model {entry.id!r} is an embeddings model; use /v1/embeddings", "model",
                          code="wrong_model_kind")
    images: list[bytes] = []
    if image_urls:
        if entry.kind != "vlm":
            raise bad_request(f"model {entry.id!r} is a text-only ({entry.kind}) model and cannot take "
                              "images", "messages", code="wrong_model_kind")
        images = await gw.fetch_images(image_urls)
    rid = request.state.request_id
    msg = p.Generate(messages=messages, images=images, logprobs=bool(req.logprobs),
                     top_logprobs=req.top_logprobs or 0, **_sampling(req, rid, max_tokens))
    run = await _start(request, gw, entry.id, "chat", msg)
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    return _respond(run, entry.id, req.stream, include_usage, chat=True, logprobs=bool(req.logprobs))


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
    prompt: str | None = None
    ids: list[int] | None = None
    pr = req.prompt
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
    rid = request.state.request_id
    msg = p.Generate(prompt=prompt, prompt_ids=ids, logprobs=req.logprobs is not None,
                     top_logprobs=req.logprobs or 0, **_sampling(req, rid, req.max_tokens))
    run = await _start(request, gw, entry.id, "completions", msg)
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    return _respond(run, entry.id, req.stream, include_usage, chat=False,
                    logprobs=req.logprobs is not None)


# ---------------------------------------------------------------- shared response shaping


def _chat_logprobs(lps: list[p.TokenLogprob]) -> list[dict[str, Any]]:
    return [{"token": lp.token, "logprob": lp.logprob, "bytes": list(lp.token.encode()),
             "top_logprobs": [{"token": tk, "logprob": v, "bytes": list(tk.encode())} for tk, v in lp.top]}
            for lp in lps]


def _completion_logprobs(lps: list[p.TokenLogprob], offset: int) -> dict[str, Any]:
    offsets, pos = [], offset
    for lp in lps:
        offsets.append(pos)
        pos += len(lp.token)
    return {"tokens": [lp.token for lp in lps], "token_logprobs": [lp.logprob for lp in lps],
            "top_logprobs": [dict(lp.top) for lp in lps], "text_offset": offsets}


def _usage(run: Run) -> dict[str, Any]:
    o = run.outcome
    u: dict[str, Any] = {"prompt_tokens": o.prompt_tokens, "completion_tokens": o.completion_tokens,
                         "total_tokens": o.prompt_tokens + o.completion_tokens}
    if o.cached_tokens:
        u["prompt_tokens_details"] = {"cached_tokens": o.cached_tokens}
    return u


def _error_body(e: p.Error) -> dict[str, Any]:
    return APIError(e.status, e.message, code=e.code, param=e.param).body()


def _respond(run: Run, model: str, stream: bool, include_usage: bool, *, chat: bool,
             logprobs: bool) -> Response:
    rid = run.msg.id
    cid = ("chatcmpl-" if chat else "cmpl-") + rid
    created = int(time.time())
    obj = "chat.completion" if chat else "text_completion"
    headers = {"x-request-id": rid}

    if stream:
        async def events() -> AsyncIterator[bytes]:
            base = {"id": cid, "object": obj + ".chunk" if chat else obj, "created": created,
                    "model": model, "system_fingerprint": FINGERPRINT}
            # Every event is ``{**base, "choices": [...]}`` (or usage): encode ``base`` once.
            head = b"data: " + msgspec.json.encode(base)[:-1] + b',"choices":'

            def event(choice: dict[str, Any]) -> bytes:
                return head + msgspec.json.encode([choice]) + b"}\n\n"

            first, offset = True, 0
            out: list[bytes] = []  # events not yet written
            async for msg in run.messages():
                if isinstance(msg, p.Chunk):
                    lp = None
                    if logprobs and msg.logprobs:
                        lp = ({"content": _chat_logprobs(msg.logprobs)} if chat
                              else _completion_logprobs(msg.logprobs, offset))
                    if chat:
                        delta: dict[str, Any] = {"content": msg.text}
                        if first:
                            delta["role"] = "assistant"
                        choice = {"index": 0, "delta": delta, "logprobs": lp, "finish_reason": None}
                    else:
                        choice = {"index": 0, "text": msg.text, "logprobs": lp, "finish_reason": None}
                    offset += len(msg.text)
                    first = False
                    out.append(event(choice))
                elif isinstance(msg, p.Done):
                    end = ({"index": 0, "delta": {} if not first else {"role": "assistant", "content": ""},
                            "logprobs": None, "finish_reason": msg.finish_reason} if chat else
                           {"index": 0, "text": "", "logprobs": None, "finish_reason": msg.finish_reason})
                    out.append(event(end))
                    if include_usage:
                        out.append(sse({**base, "choices": [], "usage": _usage(run)}))
                    out.append(SSE_DONE)
                elif isinstance(msg, p.Error):
                    out.append(sse(_error_body(msg)))
                # One write for everything already queued: the same bytes in fewer sends (and
                # syscalls) when the worker is ahead of us; one event per write when it is not.
                if out and (run.stream.finished or run.stream.queue.empty()):
                    yield b"".join(out)
                    out.clear()
            if out:
                yield b"".join(out)

        return _Stream(run, events(), media_type="text/event-stream",
                       headers={**headers, "Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def collect() -> Response:
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
        text = "".join(parts)
        if chat:
            choice: dict[str, Any] = {"index": 0, "message": {"role": "assistant", "content": text},
                                      "logprobs": {"content": _chat_logprobs(lps)} if logprobs else None,
                                      "finish_reason": finish}
        else:
            choice = {"index": 0, "text": text, "logprobs": _completion_logprobs(lps, 0) if logprobs else None,
                      "finish_reason": finish}
        return json_response({"id": cid, "object": obj, "created": created, "model": model,
                              "system_fingerprint": FINGERPRINT, "choices": [choice], "usage": _usage(run)},
                             headers=headers)

    return _Deferred(run, collect)


class _Stream(StreamingResponse):
    """SSE that releases its run even if the client left before the first byte was sent."""

    def __init__(self, run: Run, content: AsyncIterator[bytes], **kw: Any):
        super().__init__(content, **kw)
        self._run = run

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._run.close()


class _Deferred(Response):
    """A non-streamed answer that is collected while the response is being sent, so a client that
    disconnects meanwhile cancels the generation."""

    def __init__(self, run: Run, make: Any):
        super().__init__()
        self._run = run
        self._make = make

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        request = Request(scope, receive)
        try:
            resp = await until_disconnect(request, self._make())
        except APIError as e:
            if e.status == 499:
                return
            resp = error_response(e, scope)
        finally:
            self._run.close()
        await resp(scope, receive, send)


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
    run = await _start(request, gw, entry.id, "embeddings",
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
