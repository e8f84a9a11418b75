"""OpenAI chat results -> Responses results: one ``response`` object with its output items
(``reasoning``, ``message`` with ``output_text``, ``function_call``), or the event stream
(``response.created`` ... ``response.completed`` / ``.incomplete`` / ``.failed``), each event
numbered by ``sequence_number``. A stored answer is written before its last event is sent, so a
client that continues it at once finds it."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import msgspec

from mlx_supervisor.gateway.api import chat
from mlx_supervisor.gateway.api.responses_schemas import ResponsesRequest
from mlx_supervisor.gateway.api.run import Run
from mlx_supervisor.gateway.observe.ledger import LedgerError
from mlx_supervisor.gateway.observe.response_store import ResponseStore

log = logging.getLogger("mlx_supervisor.responses")


@dataclass
class Shape:
    req: ResponsesRequest
    model: str
    id: str
    store: ResponseStore | None
    conversation: list[dict[str, Any]]
    created: int = field(default_factory=lambda: int(time.time()))


def response(shape: Shape, status: str, output: list[dict[str, Any]], run: Run | None = None,
             error: dict[str, Any] | None = None) -> dict[str, Any]:
    r = shape.req
    o = run.outcome if run is not None else None
    usage = None if o is None else {
        "input_tokens": o.prompt_tokens, "input_tokens_details": {"cached_tokens": o.cached_tokens},
        "output_tokens": o.completion_tokens, "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": o.prompt_tokens + o.completion_tokens}
    fmt = r.text.format if r.text is not None and r.text.format is not None else None
    return {
        "id": shape.id, "object": "response", "created_at": shape.created, "status": status,
        "background": False, "error": error,
        "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
        "instructions": r.instructions, "max_output_tokens": r.max_output_tokens, "model": shape.model,
        "output": output, "parallel_tool_calls": r.parallel_tool_calls is not False,
        "previous_response_id": r.previous_response_id,
        "reasoning": msgspec.to_builtins(r.reasoning) if r.reasoning else {"effort": None, "summary": None},
        "store": shape.store is not None, "temperature": 1.0 if r.temperature is None else r.temperature,
        "text": {"format": msgspec.to_builtins(fmt) if fmt is not None else {"type": "text"}},
        "tool_choice": msgspec.to_builtins(r.tool_choice) if r.tool_choice is not None else "auto",
        "tools": msgspec.to_builtins(r.tools or []), "top_p": 1.0 if r.top_p is None else r.top_p,
        "truncation": "disabled", "usage": usage, "user": r.user, "metadata": r.metadata or {},
    }


def _status(finish: str | None) -> str:
    return "incomplete" if finish == "length" else "completed"


def _message_item(shape: Shape, text: str, status: str = "completed") -> dict[str, Any]:
    return {"type": "message", "id": "msg_" + shape.id[5:], "status": status, "role": "assistant",
            "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}]}


def _reasoning_item(shape: Shape, text: str) -> dict[str, Any]:
    return {"type": "reasoning", "id": "rs_" + shape.id[5:], "summary": [],
            "content": [{"type": "reasoning_text", "text": text}]}


def _call_item(shape: Shape, k: int, call_id: str, name: str, arguments: str,
               status: str = "completed") -> dict[str, Any]:
    return {"type": "function_call", "id": f"fc_{shape.id[5:]}_{k}", "call_id": call_id,
            "name": name, "arguments": arguments, "status": status}


def _assistant(message: dict[str, Any]) -> dict[str, Any]:
    """The answer as a chat message, for the conversation a continuation starts from."""
    m = {"role": "assistant", "content": message.get("content") or ""}
    if message.get("tool_calls"):
        m["tool_calls"] = message["tool_calls"]
    return m


async def _keep(shape: Shape, body: dict[str, Any], message: dict[str, Any]) -> None:
    if shape.store is None:
        return
    try:
        await shape.store.put(shape.id, body, [*shape.conversation, _assistant(message)])
    except LedgerError as e:  # history never refuses traffic: the answer still goes out
        log.error("could not store response %s: %s", shape.id, e)


async def collect(run: Run, shape: Shape) -> dict[str, Any]:
    body = await chat.chat_body(run, shape.model)
    choice = body["choices"][0]
    msg = choice["message"]
    output: list[dict[str, Any]] = []
    if msg.get("reasoning_content"):
        output.append(_reasoning_item(shape, msg["reasoning_content"]))
    if msg.get("content") or not msg.get("tool_calls"):
        output.append(_message_item(shape, msg.get("content") or ""))
    for k, tc in enumerate(msg.get("tool_calls") or []):
        output.append(_call_item(shape, k, tc["id"], tc["function"]["name"], tc["function"]["arguments"]))
    result = response(shape, _status(choice["finish_reason"]), output, run)
    await _keep(shape, result, msg)
    return result


class _Items:
    """The output items being streamed, opened and closed as the deltas change kind."""

    def __init__(self, shape: Shape) -> None:
        self.shape = shape
        self.seq = 0
        self.done: list[dict[str, Any]] = []
        self.open: dict[str, Any] | None = None
        self.key: str | None = None
        self.text = ""
        self.message: dict[str, Any] = {"content": "", "tool_calls": []}

    def ev(self, kind: str, **data: Any) -> bytes:
        data = {"type": kind, "sequence_number": self.seq, **data}
        self.seq += 1
        return b"event: " + kind.encode() + b"\ndata: " + msgspec.json.encode(data) + b"\n\n"

    def switch(self, key: str, item: dict[str, Any]) -> list[bytes]:
        if self.key == key:
            return []
        evs = self.close()
        self.open, self.key, self.text = item, key, ""
        n = len(self.done)
        evs.append(self.ev("response.output_item.added", output_index=n, item=item))
        if item["type"] == "message":
            evs.append(self.ev("response.content_part.added", item_id=item["id"], output_index=n,
                               content_index=0, part={"type": "output_text", "text": "", "annotations": []}))
        return evs

    def close(self) -> list[bytes]:
        item, n, evs = self.open, len(self.done), []
        if item is None:
            return []
        iid = item["id"]
        if item["type"] == "message":
            evs.append(self.ev("response.output_text.done", item_id=iid, output_index=n,
                               content_index=0, text=self.text, logprobs=[]))
            item = _message_item(self.shape, self.text)
            evs.append(self.ev("response.content_part.done", item_id=iid, output_index=n,
                               content_index=0, part=item["content"][0]))
        elif item["type"] == "reasoning":
            evs.append(self.ev("response.reasoning_text.done", item_id=iid, output_index=n,
                               content_index=0, text=self.text))
            item = _reasoning_item(self.shape, self.text)
        else:
            evs.append(self.ev("response.function_call_arguments.done", item_id=iid, output_index=n,
                               name=item["name"], arguments=self.text))
            item = {**item, "arguments": self.text, "status": "completed"}
        evs.append(self.ev("response.output_item.done", output_index=n, item=item))
        self.done.append(item)
        self.open = self.key = None
        return evs

    def delta(self, d: dict[str, Any]) -> list[bytes]:
        evs: list[bytes] = []
        n = len(self.done)
        if d.get("reasoning_content"):
            evs += self.switch("reasoning", {**_reasoning_item(self.shape, ""), "content": []})
            n = len(self.done)
            self.text += d["reasoning_content"]
            evs.append(self.ev("response.reasoning_text.delta", item_id=self.open["id"],  # type: ignore[index]
                               output_index=n, content_index=0, delta=d["reasoning_content"]))
        if d.get("content"):
            evs += self.switch("message", {**_message_item(self.shape, "", "in_progress"), "content": []})
            n = len(self.done)
            self.text += d["content"]
            self.message["content"] += d["content"]
            evs.append(self.ev("response.output_text.delta", item_id=self.open["id"],  # type: ignore[index]
                               output_index=n, content_index=0, delta=d["content"], logprobs=[]))
        for tc in d.get("tool_calls") or []:
            fn = tc.get("function") or {}
            k = tc.get("index", 0)
            if self.key != f"call:{k}":
                evs += self.switch(f"call:{k}", _call_item(self.shape, k, tc.get("id") or "",
                                                           fn.get("name") or "", "", "in_progress"))
                self.message["tool_calls"].append({"id": tc.get("id") or "", "type": "function",
                                                   "function": {"name": fn.get("name") or "", "arguments": ""}})
            n = len(self.done)
            if fn.get("arguments"):
                self.text += fn["arguments"]
                self.message["tool_calls"][-1]["function"]["arguments"] += fn["arguments"]
                evs.append(self.ev("response.function_call_arguments.delta", item_id=self.open["id"],  # type: ignore[index]
                                   output_index=n, delta=fn["arguments"]))
        return evs


async def events(run: Run, shape: Shape) -> AsyncIterator[bytes]:
    items = _Items(shape)
    yield items.ev("response.created", response=response(shape, "in_progress", []))
    yield items.ev("response.in_progress", response=response(shape, "in_progress", []))
    async for choice in chat.chat_choices(run):
        if "error" in choice:
            err = choice["error"]
            for ev in items.close():
                yield ev
            status = "cancelled" if err.get("code") == "cancelled" else "failed"
            body = response(shape, status, items.done, run,
                            {"code": err.get("code") or "server_error", "message": err["message"]})
            await _keep(shape, body, items.message)
            yield items.ev("response.failed", response=body)
            return
        for ev in items.delta(choice.get("delta") or {}):
            yield ev
        if choice.get("finish_reason") is not None:
            for ev in items.close():
                yield ev
            if not items.done:  # nothing was said: still one (empty) message, as when collected
                empty = {**_message_item(shape, "", "in_progress"), "content": []}
                for ev in items.switch("message", empty) + items.close():
                    yield ev
            status = _status(choice["finish_reason"])
            body = response(shape, status, items.done, run)
            await _keep(shape, body, items.message)
            yield items.ev("response.completed" if status == "completed" else "response.incomplete",
                           response=body)

