"""Constrained decoding in the worker: one llguidance matcher per request, as a logits processor.

The grammar itself comes from :mod:`shared.grammar` (the gateway already compiled every schema
in it). Here it meets the model's tokenizer, and the matcher follows the sequence:

- it is an mlx-lm logits processor, so it rides with its request through ``BatchGenerator``,
  the solo ``generate_step`` path and every hand-over between them. Both loops call processors
  once per position, the first time after the prompt (nothing to consume yet) and then with the
  token sampled last at ``tokens[-1]``, which the matcher consumes before it masks;
- a hand-over undoes one step of lookahead (:func:`lm_solo.undo_lookahead`): the token handed
  out last is fed again on the other side, so :meth:`GrammarProcessor.rewind` makes the next
  call a first call again (the matcher has already consumed that token). The draw that was
  thrown away was never consumed, so the matcher needs no rollback;
- a prompt that ends inside thinking (the template opened ``<think>``) is not masked until the
  tokenizer's think-end marker has been generated: the grammar applies to the answer only;
- the mask is llguidance's bitmask. On Metal it is applied with ``llguidance.mlx``'s kernel;
  elsewhere (CPU, CUDA: ``mx.fast.metal_kernel`` has no back-end there) with ``mx.where``;
- once the grammar is complete (or the matcher failed) only EOS is allowed, so the request ends.

Cost: the matcher must see the last token before it can mask the next. The step's forward pass
is started first, and the matchers consume and mask on a helper thread while it runs; only
applying the mask and sampling wait for both (:mod:`grammar_mask`). On the solo path the matcher
reads the sampler's draw itself (:class:`Recorder`), which ``generate_step`` already evaluates.
In ``BatchGenerator`` a processor would also move the whole batch onto its per-row path, so
there the grammar rows are masked together, in one op (:mod:`lm_batch`).
"""

from __future__ import annotations

import json
import logging
from typing import Any

import mlx.core as mx
import numpy as np

from mlx_supervisor.shared import grammar
from mlx_supervisor.shared.protocol import Error, Generate
from mlx_supervisor.worker.engines.grammar_mask import (
    apply_mask,
    mask_rows,
    masked,
    masked_with,
    words,
)
from mlx_supervisor.worker.validation import bad_request

log = logging.getLogger("mlx_supervisor.worker")

JSON_TOOLS = "mlx_lm.tool_parsers.json_tools"
COMPILED_GRAMMARS = 64  # compiled grammars kept per engine, for requests that repeat a schema


def _term(tokenizer: Any, text: str) -> str:
    """A Lark term for a markup string: the token itself when it is one token."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    return f"<[{ids[0]}]>" if len(ids) == 1 else json.dumps(text)


def call_terms(tokenizer: Any) -> tuple[str, str] | None:
    """Lark terms around one tool call, for the formats a grammar can force (JSON bodies)."""
    parser = getattr(tokenizer, "tool_parser", None)
    if getattr(parser, "__module__", None) != JSON_TOOLS or not tokenizer.tool_call_end:
        return None
    return _term(tokenizer, tokenizer.tool_call_start), _term(tokenizer, tokenizer.tool_call_end)


def check_tools(req: Generate, tokenizer: Any) -> Error | None:
    """What only the model can answer: can it call tools, can its calls be forced."""
    if not req.tools or req.tool_choice == "none":
        return None
    if not tokenizer.has_tool_calling or not tokenizer.has_chat_template:
        return bad_request(req.id, "this model has no tool-call parser (its tokenizer config "
                           "names none and none could be inferred from its chat template), so "
                           "it cannot take tools", code="tools_not_supported", param="tools")
    enforced = req.tool_choice in ("required", "function") or req.json_format is not None
    if enforced and call_terms(tokenizer) is None:
        return bad_request(req.id, "this model's tool-call format cannot be enforced (only JSON "
                           "tool calls, as in json_tools, can); use tool_choice 'auto'",
                           code="tools_not_supported", param="tool_choice")
    return None


def initial_state(tokenizer: Any, ids: list[int]) -> str:
    """``reasoning`` when the prompt ends inside thinking, else ``normal`` (as mlx-lm's server)."""
    if not getattr(tokenizer, "has_thinking", False):
        return "normal"
    if tokenizer.rfind_think_start(ids) > tokenizer.rfind_think_end(ids):
        return "reasoning"
    return "normal"


class Grammars:
    """An engine's grammar factory; llguidance's tokenizer is built on first use (it is costly).
    ``tokenizer`` is mlx-lm's wrapper (markup, thinking) or a bare HF one (vlm); ``hf`` is the
    Hugging Face fast tokenizer inside it, which llguidance reads."""

    def __init__(self, tokenizer: Any, vocab_size: int, hf: Any, eos: list[int]) -> None:
        self.tokenizer, self.hf, self.eos, self.vocab_size = tokenizer, hf, eos, vocab_size
        self.n_vocab = max(vocab_size, len(hf))  # llguidance's vocabulary, so its masks' size
        self._llg: Any = None
        self._compiled: dict[str, Any] = {}  # lark text -> a matcher never fed (oldest first)

    @classmethod
    def of_lm(cls, tokenizer: Any, vocab_size: int) -> Grammars:
        """For mlx-lm's wrapper, which keeps the HF tokenizer as ``_tokenizer``."""
        return cls(tokenizer, vocab_size, tokenizer._tokenizer, sorted(tokenizer.eos_token_ids))

    def processor(self, req: Generate, ids: list[int]) -> GrammarProcessor | None:
        """The request's processor, or None if nothing is enforced; ValueError if the grammar
        does not compile for this tokenizer."""
        terms = call_terms(self.tokenizer) if req.tools else None
        lark = grammar.lark(req, *(terms or (None, None)))
        if lark is None:
            return None
        thinking = initial_state(self.tokenizer, ids) == "reasoning"
        think_end = tuple(self.tokenizer.think_end_tokens) if thinking else None
        return GrammarProcessor(self.matcher(lark), self.vocab_size, self.eos, think_end,
                                self.n_vocab)

    def build(self, req: Generate, ids: list[int]) -> GrammarProcessor | Error | None:
        """:meth:`processor`, with a grammar that does not compile as the 400 to answer."""
        try:
            return self.processor(req, ids)
        except ValueError as e:
            return bad_request(req.id, f"the grammar does not compile for this model: {e}",
                               param="response_format")

    def matcher(self, lark: str) -> Any:
        """A fresh matcher for ``lark``: a copy of one compiled before (agents send the same
        schema again and again; compiling costs ~1.5 ms, a copy ~3 µs)."""
        proto = self._compiled.get(lark)
        if proto is None:
            from llguidance import LLMatcher

            proto = LLMatcher(self._tokenizer(), LLMatcher.grammar_from_lark(lark), log_level=0)
            if proto.is_error():
                raise ValueError(proto.get_error())
            if len(self._compiled) >= COMPILED_GRAMMARS:
                self._compiled.pop(next(iter(self._compiled)))
            self._compiled[lark] = proto
        return proto.deep_copy()

    def _tokenizer(self) -> Any:
        if self._llg is None:
            import llguidance.hf

            self._llg = llguidance.hf.from_tokenizer(self.hf, n_vocab=self.n_vocab,
                                                     eos_token=self.eos)
        return self._llg


class GrammarProcessor:
    """One request's matcher as a logits processor ``(tokens, logits) -> logits``.

    In ``BatchGenerator`` it is not called per row: :class:`lm_batch.MaskedBatch` hands every
    grammar row to :func:`mask_rows` at once. The call is for the solo path and a batch's first
    step (one row each)."""

    def __init__(self, matcher: Any, vocab_size: int, eos: list[int],
                 think_end: tuple[int, ...] | None, n_vocab: int = 0) -> None:
        self.matcher = matcher
        self.n_vocab = max(n_vocab, vocab_size)  # llguidance's vocabulary: its mask's size
        eos_only = np.zeros(words(self.n_vocab) * 32, dtype=bool)
        eos_only[[e for e in eos if e < vocab_size]] = True
        self.eos_words = np.packbits(eos_only, bitorder="little").view(np.int32)
        self.think_end = think_end  # None: the grammar applies now
        self.recent: list[int] = []
        self.fresh = True
        self.sampled: mx.array | None = None  # the solo sampler's last draw (:class:`Recorder`)
        self.buffer: np.ndarray | None = None  # this row's mask, reused on the solo path

    def rewind(self) -> None:
        """The last token handed out will be fed again: don't consume it twice."""
        self.fresh, self.sampled = True, None

    def __call__(self, tokens: mx.array, logits: mx.array) -> mx.array:
        if self.fresh:
            bitmask = mask_rows([(0, self)], [0], 1)
        elif self.sampled is not None:  # the solo path: the draw, already being evaluated
            return masked_with([(0, self)], self.sampled, logits)
        else:
            return masked([(0, self)], tokens[-1:], logits)
        return logits if bitmask is None else apply_mask(logits, bitmask)

    def to_consume(self, last: int) -> int | None:
        """What the matcher must consume of ``last``, the token sampled last: nothing on a
        first call, while thinking (which it follows here) or once the matcher is done."""
        if self.fresh:
            self.fresh = False
            return None
        if self.think_end is not None:
            self.recent = (self.recent + [last])[-len(self.think_end):]
            if tuple(self.recent) == self.think_end:
                self.think_end = None
            return None
        return None if self.matcher.is_stopped() or self.matcher.is_error() else last

    def idle(self) -> bool:
        """Not masked now: thinking (or, for :class:`lm_lazy.LazyCall`, between calls)."""
        return self.think_end is not None


class Recorder:
    """The solo sampler, which hands each draw to the request's grammar for the next step's
    mask. ``generate_step`` evaluates the draw already, so the matcher just reads it (rather
    than a slice of the token history ``generate_step`` keeps: an op and an evaluation more
    per token, and the history's concatenation is then never evaluated)."""

    def __init__(self, sampler: Any, grammar: GrammarProcessor) -> None:
        self.sampler, self.grammar = sampler, grammar

    def __call__(self, logprobs: mx.array) -> mx.array:
        y = self.sampler(logprobs)
        self.grammar.sampled = y
        return y
