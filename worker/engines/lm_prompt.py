"""Turning a ``Generate`` into prompt token ids, with every check a text engine makes first.

Shared by the batched engine (engine_lm) and the sharded one (engine_sharded), so both refuse
the same requests with the same 400s.
"""

from __future__ import annotations

from typing import Any

from mlx_supervisor.shared.protocol import Embed, Error, Generate
from mlx_supervisor.worker.engines.grammar import check_tools
from mlx_supervisor.worker.validation import (
    bad_request,
    check_generate,
    check_prompt_length,
    clamp_max_tokens,
)


def tokenize(tokenizer: Any, req: Generate) -> list[int]:
    """Ids as given, an encoded raw prompt, or the chat template applied to the messages."""
    if req.prompt_ids is not None:
        return list(req.prompt_ids)
    if req.prompt is not None:
        return list(tokenizer.encode(req.prompt))
    messages = [{**m, "content": m.get("content") or ""} for m in req.messages or []]
    if tokenizer.has_chat_template:
        kwargs = dict(req.chat_template_kwargs or {})
        if req.tools and req.tool_choice != "none":  # "none": the model is not shown them
            kwargs["tools"] = req.tools
        return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                  tokenize=True, **kwargs))
    text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"
    return list(tokenizer.encode(text))


def prepare(req: Generate | Embed, tokenizer: Any, vocab_size: int,
            context_length: int) -> tuple[list[int], int] | Error:
    """``(prompt ids, max_tokens clamped to the context)``, or the Error to answer with."""
    # Config vocab sizes are often padded past the tokenizer: a sampled id the tokenizer lacks
    # would crash its streaming detokenizer, so ids must be valid for both.
    vocab_size = min(vocab_size, len(tokenizer)) if hasattr(tokenizer, "__len__") else vocab_size
    if isinstance(req, Embed):
        return bad_request(req.id, "this model generates text; it does not embed",
                           code="model_not_supported")
    err = check_generate(req)
    if err is None and req.images:
        err = bad_request(req.id, "this model does not take images", param="messages")
    if err is None:
        err = check_tools(req, tokenizer)
    if err is None and req.logit_bias and any(not 0 <= t < vocab_size for t in req.logit_bias):
        err = bad_request(req.id, f"logit_bias token ids must be in [0, {vocab_size})",
                          param="logit_bias")
    if err is not None:
        return err
    try:
        ids = tokenize(tokenizer, req)
    except Exception as e:
        return bad_request(req.id, f"could not build the prompt: {e}", param="messages")
    if any(not 0 <= t < vocab_size for t in ids):
        return bad_request(req.id, f"prompt_ids must be in [0, {vocab_size})", param="prompt")
    err = check_prompt_length(req.id, len(ids), context_length)
    if err is not None:
        return err
    return ids, clamp_max_tokens(req.max_tokens, len(ids), context_length)
