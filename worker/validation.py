"""Request checks shared by the engines (no mlx here, so the fake engine can use them too).

Each check returns an :class:`Error` to emit (status 400: the caller's fault) or None.
"""

from __future__ import annotations

from mlx_supervisor.shared.protocol import Error, Generate


def bad_request(req_id: str, message: str, code: str = "invalid_request_error",
                param: str | None = None) -> Error:
    return Error(id=req_id, message=message, status=400, code=code, param=param)


def check_generate(req: Generate) -> Error | None:
    """Checks that need no tokenizer: one prompt form, sane sampling parameters."""
    given = [n for n in ("messages", "prompt", "prompt_ids") if getattr(req, n) is not None]
    if len(given) != 1:
        return bad_request(req.id, "exactly one of messages, prompt or prompt_ids is required "
                           f"(got {', '.join(given) or 'none'})", param="messages")
    if req.max_tokens < 1:
        return bad_request(req.id, f"max_tokens must be at least 1, got {req.max_tokens}",
                           param="max_tokens")
    if req.temperature < 0:
        return bad_request(req.id, f"temperature must be >= 0, got {req.temperature}",
                           param="temperature")
    if not 0 < req.top_p <= 1:
        return bad_request(req.id, f"top_p must be in (0, 1], got {req.top_p}", param="top_p")
    if not 0 <= req.min_p <= 1:
        return bad_request(req.id, f"min_p must be in [0, 1], got {req.min_p}", param="min_p")
    if req.top_k < 0:
        return bad_request(req.id, f"top_k must be >= 0, got {req.top_k}", param="top_k")
    if req.top_logprobs < 0 or req.top_logprobs > 20:
        return bad_request(req.id, f"top_logprobs must be in [0, 20], got {req.top_logprobs}",
                           param="top_logprobs")
    if req.messages is not None:
        if not req.messages:
            return bad_request(req.id, "messages must not be empty", param="messages")
        for i, m in enumerate(req.messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str):
                return bad_request(req.id, f"messages[{i}] needs a string 'role'",
                                   param="messages")
            if not isinstance(m.get("content", ""), str | None):
                return bad_request(req.id, f"messages[{i}].content must be a string",
                                   param="messages")
    return None


def check_prompt_length(req_id: str, n_prompt: int, context_length: int) -> Error | None:
    """An empty prompt, or one that leaves no room for a single new token, is refused."""
    if n_prompt == 0:
        return bad_request(req_id, "the prompt is empty", param="messages")
    if context_length and n_prompt >= context_length:
        return bad_request(
            req_id,
            f"This model's maximum context length is {context_length} tokens, but the prompt "
            f"has {n_prompt} tokens (at least one token must remain for the completion).",
            code="context_length_exceeded", param="messages")
    return None


def clamp_max_tokens(max_tokens: int, n_prompt: int, context_length: int) -> int:
    """``max_tokens`` cut so prompt + completion fits the context (the request then ends with
    finish_reason "length"); we clamp rather than refuse, as many clients send a large default."""
    if not context_length:
        return max_tokens
    return max(1, min(max_tokens, context_length - n_prompt))
