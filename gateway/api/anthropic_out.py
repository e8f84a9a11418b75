"""OpenAI chat results -> Anthropic Messages results: one ``message`` object, or the named SSE
event sequence (``message_start``, ``ping``, ``content_block_start`` / ``_delta`` / ``_stop``,
``message_delta``, ``message_stop``; ``error`` mid-stream)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import msgspec

from mlx_supervisor.gateway.api import chat
from mlx_supervisor.gateway.api.run import Run

STOP_REASONS = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use"}
# OpenAI error types (gateway/errors.py) -> Anthropic's, for an error event mid-stream.
ERROR_TYPES = {"invalid_request_error": "invalid_request_error", "not_found_error": "not_found_error",
               "rate_limit_error": "rate_limit_error", "service_unavailable": "overloaded_error",
               "authentication_error": "authentication_error", "server_error": "api_error"}


@dataclass
class Shape:
    """What the translation needs from the request."""

    model: str
    thinking: bool = True
    """Show the model's reasoning as ``thinking`` blocks (off for ``thinking: disabled``)."""


def usage(run: Run) -> dict[str, int]:
    """Anthropic counts cache reads apart from the input tokens it had to process."""
    o = run.outcome
    return {"input_tokens": o.prompt_tokens - o.cached_tokens, "output_tokens": o.completion_tokens,
            "cache_read_input_tokens": o.cached_tokens, "cache_creation_input_tokens": 0}


def stop_reason(finish: str | None, stop_sequence: str | None = None) -> tuple[str, str | None]:
    """Anthropic's stop_reason and stop_sequence for a chat finish_reason (and vLLM-style
    ``stop_reason``: the stop string that matched)."""
    if finish == "stop" and stop_sequence:
        return "stop_sequence", stop_sequence
    return STOP_REASONS.get(finish or "stop", "end_turn"), None


def _input(arguments: str) -> Any:
    try:
        return msgspec.json.decode(arguments or "{}")
    except msgspec.DecodeError:
        return {"_raw": arguments}  # a model that broke JSON under tool_choice auto


def message(body: dict[str, Any], run: Run, shape: Shape) -> dict[str, Any]:
    """A ``chat.completion`` body as an Anthropic ``message``."""
    choice = body["choices"][0]
    msg = choice["message"]
    content: list[dict[str, Any]] = []
    if shape.thinking and msg.get("reasoning_content"):
        content.append({"type": "thinking", "thinking": msg["reasoning_content"], "signature": ""})
    if msg.get("content") or not msg.get("tool_calls"):
        content.append({"type": "text", "text": msg.get("content") or ""})
    for tc in msg.get("tool_calls") or []:
        content.append({"type": "tool_use", "id": tc["id"], "name": tc["function"]["name"],
                        "input": _input(tc["function"]["arguments"])})
    reason, seq = stop_reason(choice["finish_reason"], choice.get("stop_reason"))
    return {"id": "msg_" + run.msg.id, "type": "message", "role": "assistant", "model": shape.model,
            "content": content, "stop_reason": reason, "stop_sequence": seq, "usage": usage(run)}


def _event(name: str, data: dict[str, Any]) -> bytes:
    return b"event: " + name.encode() + b"\ndata: " + msgspec.json.encode(data) + b"\n\n"


class _Blocks:
    """Open/close content blocks as the deltas change kind (thinking, text, each tool call)."""

    def __init__(self) -> None:
        self.index = -1
        self.open: str | None = None  # "thinking", "text", or "tool:<openai index>"

    def switch(self, key: str, start: dict[str, Any]) -> list[bytes]:
        if self.open == key:
            return []
        evs = self.close()
        self.index += 1
        self.open = key
        evs.append(_event("content_block_start", {"type": "content_block_start", "index": self.index,
                                                  "content_block": start}))
        return evs

    def close(self) -> list[bytes]:
        if self.open is None:
            return []
        evs = []
        if self.open == "thinking":
            evs.append(self.delta({"type": "signature_delta", "signature": ""}))
        self.open = None
        evs.append(_event("content_block_stop", {"type": "content_block_stop", "index": self.index}))
        return evs

    def delta(self, d: dict[str, Any]) -> bytes:
        return _event("content_block_delta", {"type": "content_block_delta", "index": self.index, "delta": d})


def _delta_events(blocks: _Blocks, delta: dict[str, Any], shape: Shape) -> list[bytes]:
    evs: list[bytes] = []
    if shape.thinking and delta.get("reasoning_content"):
        evs += blocks.switch("thinking", {"type": "thinking", "thinking": "", "signature": ""})
        evs.append(blocks.delta({"type": "thinking_delta", "thinking": delta["reasoning_content"]}))
    if delta.get("content"):
        evs += blocks.switch("text", {"type": "text", "text": ""})
        evs.append(blocks.delta({"type": "text_delta", "text": delta["content"]}))
    for tc in delta.get("tool_calls") or []:
        fn = tc.get("function") or {}
        key = f"tool:{tc.get('index', 0)}"
        if blocks.open != key:
            evs += blocks.switch(key, {"type": "tool_use", "id": tc.get("id") or "",
                                       "name": fn.get("name") or "", "input": {}})
        if fn.get("arguments"):
            evs.append(blocks.delta({"type": "input_json_delta", "partial_json": fn["arguments"]}))
    return evs


async def events(run: Run, shape: Shape) -> AsyncIterator[bytes]:
    """The run's chunks as Anthropic's stream. ``message_start`` waits for the first chunk, by
    when the worker has reported the prompt's size."""
    blocks = _Blocks()
    started = False
    async for choice in chat.chat_choices(run):
        if "error" in choice:
            err = choice["error"]
            kind = ERROR_TYPES.get(err.get("type"), "api_error")
            yield _event("error", {"type": "error", "error": {"type": kind, "message": err["message"]}})
            return
        if not started:
            started = True
            yield _event("message_start", {"type": "message_start", "message": {
                "id": "msg_" + run.msg.id, "type": "message", "role": "assistant", "model": shape.model,
                "content": [], "stop_reason": None, "stop_sequence": None,
                "usage": {**usage(run), "output_tokens": 0}}})
            yield _event("ping", {"type": "ping"})
        for ev in _delta_events(blocks, choice.get("delta") or {}, shape):
            yield ev
        if choice.get("finish_reason") is not None:
            for ev in blocks.close():
                yield ev
            reason, seq = stop_reason(choice["finish_reason"], choice.get("stop_reason"))
            yield _event("message_delta", {"type": "message_delta",
                                           "delta": {"stop_reason": reason, "stop_sequence": seq},
                                           "usage": usage(run)})
            yield _event("message_stop", {"type": "message_stop"})
