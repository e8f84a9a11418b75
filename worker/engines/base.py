"""What every engine (lm, vlm, embeddings, sharded, fake) shares: the interface, and the one token
step that turns decoded text into the chunks a request streams.

An engine is driven by the worker's MLX thread only: ``load``, ``submit``, ``cancel``, ``step``
and ``close`` are never called from any other thread. ``emit`` hands a message to the io thread
and is safe to call from the MLX thread. mlx is imported lazily here, so the fake engine (and a
process that only imports the factory) stays free of it.

The token step (:class:`TokenStep`): each engine decodes in its own way (``BatchGenerator`` and
a streaming detokenizer, mlx-vlm's ``stream_generate``, lockstep ranks), then hands each piece of
text here. A request's text goes through one mlx-lm ``TextStateMachine`` whose transitions are
the tokenizer's thinking markers (``normal`` <-> ``reasoning``), its tool-call markers
(``normal`` <-> ``tool``, as ``make_text_state_machine`` builds them) and the request's stop
strings (-> the end). So markup and stop strings are never sent, text that might begin one is
held back, thinking leaves as ``Chunk.reasoning``, and each finished tool-call block is parsed
with the tokenizer's own ``tool_parser`` into ``Chunk.tool_calls``.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import msgspec

from mlx_supervisor.shared.protocol import (
    Chunk,
    Embed,
    FromWorker,
    Generate,
    Memory,
    RankInfo,
    TokenLogprob,
    ToolCall,
)

Emit = Callable[[FromWorker], None]

log = logging.getLogger("mlx_supervisor.worker")
T = TypeVar("T")


class LoadInfo(msgspec.Struct):
    kind: str
    model_id: str
    context_length: int = 0
    embedding_dims: int = 0
    ranks: list[RankInfo] = []
    """Sharded groups only: every rank, as ``Ready`` reports them."""


class Engine(Protocol):
    ranks: list[RankInfo]
    """Sharded groups: every rank, replaced whole on each memory reading (heartbeats read it)."""

    def load(self, path: str, model_id: str = "") -> LoadInfo:
        """Load weights; raise any exception with a readable message on failure. ``model_id``
        names the model in error messages (empty: the directory's name)."""
        ...

    def submit(self, req: Generate | Embed, emit: Emit) -> None:
        """Accept a request. Bad input is answered with ``emit(Error(..., status=400))``."""
        ...

    def cancel(self, request_id: str) -> None:
        """Drop a request (queued or running) before its next decode step; nothing more is
        emitted for it."""
        ...

    def pause(self, request_id: str) -> bool:
        """Flow control: the gateway's reader of this stream fell behind. An engine that can
        takes the sequence out of its steps (its state kept) and returns True; False asks the
        worker to hold the request's output instead, merged, until ``resume`` (the default for
        an engine whose requests are answered in one message). An unknown id is a no-op."""
        ...

    def resume(self, request_id: str) -> None:
        """The reader caught up: the sequence goes on with exactly the tokens it would have
        produced unpaused. An unknown or not paused id is a no-op."""
        ...

    def has_work(self) -> bool: ...

    def step(self, emit: Emit) -> None:
        """Advance every running request by about one decode step, emitting chunks/done/errors."""
        ...

    def memory(self) -> Memory:
        """Current figures; safe to call from the MLX thread between steps."""
        ...

    def close(self) -> None: ...


# ---------------------------------------------------------------- shared helpers


def mlx_memory() -> Memory:
    """MLX's own figures (active, buffer cache, peak)."""
    import mlx.core as mx

    return Memory(active=mx.get_active_memory(), cache=mx.get_cache_memory(),
                  peak=mx.get_peak_memory())


def context_length(config: dict[str, Any], override: int = 0) -> int:
    """``override`` (``--context-length``), else the config's ``max_position_embeddings`` (or its
    text model's, for multimodal configs); 0 if neither says."""
    text_cfg = config.get("text_config") or {}
    return int(override or config.get("max_position_embeddings")
               or text_cfg.get("max_position_embeddings") or 0)


def vocab_size(config: dict[str, Any], tokenizer: Any) -> int:
    text_cfg = config.get("text_config") or {}
    return int(config.get("vocab_size") or text_cfg.get("vocab_size") or len(tokenizer))


# ---------------------------------------------------------------- the token step


@dataclass(frozen=True)
class Markup:
    """A model's markup that is not answer text, as the tokenizer (mlx-lm's wrapper) names it."""

    think: tuple[str, str] | None = None
    tool: tuple[str, str | None] | None = None
    parser: Callable[[str, Any], Any] | None = None
    extra: dict[str, list[tuple[str, str]]] = field(default_factory=dict)

    @classmethod
    def of(cls, tokenizer: Any, req: Generate) -> Markup:
        """For a chat request; raw completions (``prompt``/``prompt_ids``) are text as it is.
        Tool markup is parsed only when tools were given (and not ``tool_choice: none``)."""
        if req.messages is None:
            return cls()
        think = (tokenizer.think_start, tokenizer.think_end) if tokenizer.has_thinking else None
        tool = None
        if tokenizer.has_tool_calling and req.tools and req.tool_choice != "none":
            tool = (tokenizer.tool_call_start, tokenizer.tool_call_end or None)
        extra = dict(getattr(tokenizer, "response_transitions", None) or {})
        return cls(think, tool, tokenizer.tool_parser if tool else None, extra)

    def transitions(self) -> dict[str, list[tuple[str, str | None]]]:
        """``TextStateMachine`` edges, as mlx-lm's ``make_text_state_machine`` draws them."""
        edges: dict[str, list[tuple[str, str | None]]] = {}
        if self.think is not None:
            edges.setdefault("normal", []).append((self.think[0], "reasoning"))
            edges["reasoning"] = [(self.think[1], "normal")]
        if self.tool is not None:
            start, end = self.tool
            edges.setdefault("normal", []).append((start, "tool"))
            if self.think is not None:
                edges["reasoning"].append((start, "tool"))
            edges["tool"] = [(end, "normal")] if end else []
        for state, more in self.extra.items():
            edges.setdefault(state, []).extend(more)
        return edges


NO_MARKUP = Markup()


class TokenStep:
    """One request's output: decoded text in, Chunks out.

    Text can be held back (a partial stop string or marker) while tokens keep counting, so a
    Chunk goes out when there is something to send, or at the end to carry the count.
    """

    def __init__(self, req: Generate, markup: Markup = NO_MARKUP, initial: str = "normal") -> None:
        from mlx_lm.generate import TextStateMachine

        self.req_id, self.tools, self.markup = req.id, req.tools, markup
        edges = markup.transitions()
        stops = [s for s in req.stop if s]
        for state in {*edges, "normal", initial}:
            edges.setdefault(state, []).extend((w, None) for w in stops)
        self._sm = TextStateMachine if any(edges.values()) else None
        self._state = TextStateMachine(edges).make_state(initial) if self._sm else None
        self.where: str | None = initial
        self.tokens = 0
        self.logprobs: list[TokenLogprob] = []
        self.tool_text = ""
        self.called = False
        # tool_choice required / a named function: the grammar forces calls, so text outside
        # them is only its separators, and a call cut short is no answer text either.
        self.forced = bool(req.tools) and req.tool_choice in ("required", "function")
        self._gap: str | None = None  # whitespace since the last call (None: not right after one)
        self._stops = stops
        self._keep = max((len(w) for w in stops), default=0)
        self._tail = ""  # the last raw text, enough to name the stop string that matches
        self.stop_sequence: str | None = None

    @property
    def stopped(self) -> bool:
        """A stop string has been seen: the stream ends here."""
        return self.where is None

    def take(self, text: str, emit: Emit, *, tokens: int = 1,
             logprob: TokenLogprob | None = None, finish: str | None = None,
             flush: bool = False) -> str | None:
        """Take ``tokens`` new tokens and their ``text``; emit what can be sent; return the
        finish reason (``finish``, "stop" at a stop string, "tool_calls" for a stop after calls).
        ``flush``: the end is not a stop string, so held-back text is real text (EOS, length)."""
        self.tokens += tokens
        if logprob is not None:
            self.logprobs.append(logprob)
        content, reasoning, calls = self._split(text, flush and not self.stopped)
        if self.stopped:
            finish = "stop"
        if finish is not None and self.where == "tool":  # a call cut short by the end
            more, raw = self._end_call()
            calls, content = calls + more, content + raw
        if finish == "stop" and self.called:
            finish = "tool_calls"
        if content or reasoning or calls or (finish is not None and self.tokens):
            emit(Chunk(id=self.req_id, text=content, tokens=self.tokens,
                       logprobs=self.logprobs or None, reasoning=reasoning, tool_calls=calls))
            self.tokens = 0
            self.logprobs = []
        return finish

    def _split(self, text: str, flush: bool) -> tuple[str, str, list[ToolCall]]:
        if self._sm is None:
            return text, "", []
        if self.stopped:
            return "", "", []
        tail = self._tail + text if self._keep else ""
        self._state, segments = self._sm.split(self._state, text)
        if self._state[0] is None and self._keep:  # a stop string ends the text consumed so far
            seen = tail[:len(tail) - len(self._state[3])]
            self.stop_sequence = max((w for w in self._stops if seen.endswith(w)), key=len, default=None)
        self._tail = tail[-self._keep:] if self._keep else ""
        if flush and self._state[0] is not None:
            self._state, rest, state = self._sm.flush(self._state)
            segments.append((state, rest))
        content, reasoning, calls = [], [], []
        for state, piece in segments:
            if self.where == "tool" and state != "tool":
                more, raw = self._end_call()
                calls += more
                content.append(raw)
            if state == "normal":
                content.append(self._text(piece))
            elif state == "reasoning":
                reasoning.append(piece)
            elif state == "tool":
                self.tool_text += piece
            self.where = state
        return "".join(content), "".join(reasoning), calls

    def _text(self, piece: str) -> str:
        """Answer text to send. Whitespace right after a call (the newline models and the
        grammar put between calls) is held, and is content only if more text follows."""
        if self._gap is None:
            return piece
        self._gap += piece
        if self.forced or not self._gap.strip():
            return ""
        out, self._gap = self._gap, None
        return out

    def _end_call(self) -> tuple[list[ToolCall], str]:
        """Parse the finished tool-call block: (calls, text to send instead if it is no call)."""
        text, self.tool_text = self.tool_text, ""
        parser, start = self.markup.parser, (self.markup.tool or ("", None))[0]
        try:
            assert parser is not None
            parsed = parser(text, self.tools)
        except Exception as e:  # a call cut short (length) or malformed: it stays text
            if self.forced:  # the grammar made it markup: only the end can cut it short
                log.warning("%s: forced tool call cut short (%s); dropped", self.req_id, e)
                return [], ""
            log.warning("%s: tool call not parsed (%s); sent as text", self.req_id, e)
            return [], start + text
        calls = []
        for c in parsed if isinstance(parsed, list) else [parsed]:
            args = c.get("arguments", {})
            calls.append(ToolCall(id=c.get("id") or f"call_{uuid.uuid4().hex[:24]}",
                                  name=str(c.get("name")),
                                  arguments=args if isinstance(args, str)
                                  else json.dumps(args, ensure_ascii=False)))
        self.called = self.called or bool(calls)
        self._gap = "" if calls else self._gap
        return calls, ""


class Paused(set[str]):
    """The paused ids of an engine that decodes its oldest unpaused live request, one at a time
    (vlm, sharded). ``st`` is the request's live state, or None when it is not live (queued,
    finished, cancelled): then pause and resume are no-ops, as the Engine protocol says."""

    def hold(self, request_id: str, st: Any | None) -> None:
        if st is not None and request_id not in self:
            self.add(request_id)
            log.info("%s paused after %d tokens", request_id, st.completion)

    def release(self, request_id: str, st: Any | None) -> None:
        if st is not None and request_id in self:
            self.discard(request_id)
            log.info("%s resumed after %d tokens", request_id, st.completion)

    def oldest(self, live: dict[str, T]) -> T | None:
        """The oldest live request that is not paused (``live`` is in start order)."""
        return next((st for rid, st in live.items() if rid not in self), None)
