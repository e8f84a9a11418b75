"""Text generation with mlx-lm: continuous batching through ``BatchGenerator``.

The pattern is mlx-lm server's ``ResponseGenerator``: requests join the running batch as they
arrive and leave as they finish or are cancelled (``BatchGenerator.remove``); each has its own
sampler, logits processors, max_tokens and stop sequences. Seeded requests have their own key
stream (see :mod:`lm_sampling`), so they are batched too and still reproduce.

Decisions worth knowing:

- Context: ``--context-length`` or the config's ``max_position_embeddings``. A prompt that
  leaves no room for one new token is a 400 ``context_length_exceeded``; otherwise
  ``max_tokens`` is *clamped* to what fits and the request ends with finish_reason "length".
- Stops: EOS and the request's stop strings end generation at the token level
  (``make_stop_sequences``); a decoded-text check (:class:`base.TokenStep`) also ends the
  stream when a stop string appears with another tokenization. Stop strings and EOS are never sent.
  ``completion_tokens`` counts every generated token, the final stop token included.
- Prompt cache: mlx-lm's ``LRUPromptCache`` (a token trie); a follow-up turn that shares a
  prefix with an earlier prompt + completion prefills only the rest (``cached_tokens``).
- Whenever exactly one request is decoding it runs alone with ``generate_step``
  (:mod:`lm_solo`), at ``stream_generate``'s speed: a request arriving to an idle engine starts
  there, is handed to the batch mid-stream when a second arrives, and the last one left in the
  batch goes on alone again. Each move undoes one step of lookahead, so the text is the same.
- Started is sent when the request joins the batch (its prefill starts with the next step).
- Output: the shared token step (:class:`base.TokenStep`) splits thinking (``Chunk.reasoning``)
  and tool calls (``Chunk.tool_calls``, parsed by the tokenizer's tool parser) off the text.
- Grammars (tool_choice required/named, response_format): one llguidance matcher per request,
  the last of its logits processors (:mod:`grammar`); a hand-over rewinds it with the sampler.
  ``tool_choice`` auto gets one only once the model opens a call (:mod:`lm_lazy`).
  In the batch all grammar rows are masked in one op (:mod:`lm_batch`'s ``Generator``).
- Flow control (:mod:`lm_flow`): a paused sequence sits out of the steps with its KV cache.
- Chunks: one per request per decode step; text held back (a partial stop string or an
  incomplete UTF-8 character) rides with a later chunk, whose ``tokens`` counts it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx_lm
from mlx_lm.generate import StopSequences, make_stop_sequences
from mlx_lm.models.cache import LRUPromptCache
from mlx_lm.sample_utils import make_logits_processors

from mlx_supervisor.shared.protocol import (
    Done,
    Embed,
    Error,
    Generate,
    Memory,
    RankInfo,
    Started,
)
from mlx_supervisor.worker.engines.base import (
    Emit,
    LoadInfo,
    Markup,
    TokenStep,
    context_length,
    mlx_memory,
    vocab_size,
)
from mlx_supervisor.worker.engines.grammar import Grammars, initial_state
from mlx_supervisor.worker.engines.lm_batch import Generator
from mlx_supervisor.worker.engines.lm_flow import FlowControl, Paused
from mlx_supervisor.worker.engines.lm_lazy import LazyCalls, trigger
from mlx_supervisor.worker.engines.lm_prompt import prepare
from mlx_supervisor.worker.engines.lm_sampling import PENALTY_CONTEXT, sampler_for, token_logprob
from mlx_supervisor.worker.engines.lm_solo import Solo, refeed_last, undo_lookahead
from mlx_supervisor.worker.engines.wired import Wired

log = logging.getLogger("mlx_supervisor.worker")


@dataclass
class _Running:
    req: Generate
    uid: int
    prompt_tokens: int
    cached_tokens: int
    detok: Any
    out: TokenStep
    max_tokens: int
    sampler: Any
    processors: list[Any]
    stop_seqs: StopSequences
    completion: int = 0
    here: int = 0  # tokens since it joined the batch or went solo (> 0: past its prefill there)
    trigger: int | None = None  # tool_choice auto: the start token that arms its grammar


class LMEngine(FlowControl, LazyCalls):
    def __init__(self, context_length: int = 0, prompt_cache_entries: int = 10,
                 prompt_cache_bytes: int = 1 << 30, completion_batch_size: int = 32,
                 prefill_batch_size: int = 8, prefill_step_size: int = 512) -> None:
        self.context_length_override = context_length
        self.context_length = context_length
        self.prompt_cache = LRUPromptCache(max_size=prompt_cache_entries,
                                           max_bytes=prompt_cache_bytes)
        self.batch_sizes = (completion_batch_size, prefill_batch_size, prefill_step_size)
        self.model: Any = None
        self.tokenizer: Any = None
        self.gen: Generator | None = None
        self.key = ""
        self.vocab_size = 0
        self.model_id = "model"
        self.ranks: list[RankInfo] = []  # a single process: no ranks
        self.grammars: Grammars | None = None
        self.running: dict[int, _Running] = {}
        self.by_id: dict[str, int] = {}
        self.paused: dict[str, Paused] = {}
        self.pausing: set[str] = set()
        self.arming: list[tuple[_Running, int]] = []
        self._stop_seqs: dict[tuple[str, ...], StopSequences] = {}
        self.solo: Solo | None = None
        self._solo_uids = 0  # negative, so never a BatchGenerator uid
        self.wired = Wired()  # solo and batch alike run inside the wired limit (Metal)

    # ---------------------------------------------------------------- load

    def load(self, path: str, model_id: str = "") -> LoadInfo:
        p = Path(path)
        self.model_id = model_id or p.name
        if not path or not p.is_dir():
            raise FileNotFoundError(f"model directory {path!r} does not exist")
        if not (p / "config.json").is_file():
            raise FileNotFoundError(f"{path} has no config.json")
        loaded: Any = mlx_lm.load(path, return_config=True)
        model, tokenizer, config = loaded
        self.model, self.tokenizer, self.key = model, tokenizer, str(p.resolve())
        self.context_length = context_length(config, self.context_length_override)
        self.vocab_size = vocab_size(config, tokenizer)
        self.grammars = Grammars.of_lm(tokenizer, self.vocab_size)
        self.wired.hold(model)  # before the generator, which nests its own limit inside
        self._new_generator()
        return LoadInfo(kind="lm", model_id=self.model_id, context_length=self.context_length)

    def _new_generator(self) -> None:
        # The stream of *this* thread: mlx-lm's default generation stream is thread-local.
        completion, prefill, step = self.batch_sizes
        self.stream = mx.default_stream(mx.default_device())
        self.gen = Generator(self.model, stream=self.stream,
                             completion_batch_size=completion, prefill_batch_size=prefill,
                             prefill_step_size=step)

    # ---------------------------------------------------------------- requests

    def submit(self, req: Generate | Embed, emit: Emit) -> None:
        ready = prepare(req, self.tokenizer, self.vocab_size, self.context_length)
        if isinstance(ready, Error):
            emit(ready)
            return
        assert isinstance(req, Generate)
        ids, max_tokens = ready

        cache, rest = self.prompt_cache.fetch_nearest_cache(self.key, ids)
        if cache is not None and not rest:  # exact hit: the last token must still be fed
            rest, cache, _ = refeed_last(cache, ids)
        cached = len(ids) - len(rest)
        stops = tuple(s for s in req.stop if s)
        stop_seqs = self._stop_seqs.get(stops)
        if stop_seqs is None:
            if len(self._stop_seqs) > 100:
                self._stop_seqs.clear()
            stop_seqs = self._stop_seqs[stops] = make_stop_sequences(self.tokenizer, stops)
        n = PENALTY_CONTEXT
        processors = make_logits_processors(req.logit_bias, req.repetition_penalty, n,
                                            req.presence_penalty, n, req.frequency_penalty, n)
        assert self.grammars is not None
        constrained = self.grammars.build(req, ids)
        if isinstance(constrained, Error):
            emit(constrained)
            return
        if constrained is not None:
            processors.append(constrained)  # last: nothing may lift its mask
        start = initial_state(self.tokenizer, ids)
        out = TokenStep(req, Markup.of(self.tokenizer, req), start)
        st = _Running(req, 0, len(ids), cached, self.tokenizer.detokenizer, out, max_tokens,
                      sampler_for(req, self.vocab_size), processors, stop_seqs)
        st.trigger = trigger(self.grammars, req) if constrained is None else None
        if self.running:
            self._handover()
            self._insert(st, rest, cache, ids[:cached], max_tokens)
        else:
            self._go_solo(st, rest, cache, ids[:cached], max_tokens)
        log.info("%s started prompt=%d cached=%d max_tokens=%d", req.id, len(ids), cached,
                 max_tokens)
        emit(Started(id=req.id, prompt_tokens=len(ids)))

    def _track(self, st: _Running, uid: int) -> None:
        if self.running.get(st.uid) is st:
            del self.running[st.uid]
        st.uid, st.here = uid, 0
        self.running[uid] = st
        self.by_id[st.req.id] = uid

    def _insert(self, st: _Running, rest: list[int], cache: Any, cached: list[int],
                max_tokens: int) -> None:
        assert self.gen is not None
        (uid,) = self.gen.insert([rest], max_tokens=[max_tokens], caches=[cache],
                                 all_tokens=[cached], samplers=[st.sampler],
                                 logits_processors=[st.processors],
                                 stop_sequences=[st.stop_seqs])
        self._track(st, int(uid))

    def _go_solo(self, st: _Running, rest: list[int], cache: Any, cached: list[int],
                 max_tokens: int) -> None:
        self._solo_uids -= 1
        self.solo = Solo(self.model, self.stream, self._solo_uids, rest, cache, cached,
                         max_tokens, st.sampler, st.processors, st.stop_seqs,
                         self.batch_sizes[2])
        self._track(st, self._solo_uids)

    def _handover(self) -> None:
        """Move the request decoding alone into the batch, where it goes on exactly."""
        solo, self.solo = self.solo, None
        if solo is None:
            return
        rest, cache, cached, left = solo.handover()
        st = self.running[solo.uid]
        self._insert(st, rest, cache, cached, left)
        log.info("%s joins the batch after %d tokens", st.req.id, st.completion)

    def _leave_batch(self) -> None:
        """The last request left in the batch goes on alone, at ``generate_step``'s speed, once
        it is decoding (one still prefilling starts in the batch)."""
        if self.solo is not None or len(self.running) != 1 or self.gen is None:
            return
        st = next(iter(self.running.values()))
        if st.here == 0:
            return
        cache, tokens = self.gen.remove([st.uid], return_prompt_caches=True)[st.uid]
        rest, kept, cached = undo_lookahead(cache, list(tokens), st.sampler, st.processors)
        self._go_solo(st, rest, kept, cached, st.max_tokens - st.completion)
        log.info("%s goes on alone after %d tokens", st.req.id, st.completion)

    def cancel(self, request_id: str) -> None:
        if self._drop_paused(request_id):
            return
        uid = self.by_id.pop(request_id, None)
        if uid is not None:
            self.running.pop(uid, None)
            if self.solo is not None and self.solo.uid == uid:
                self.solo.end()
                self.solo = None
            elif self.gen is not None:
                self.gen.remove([uid])
                self._leave_batch()
            self._maybe_idle()

    def has_work(self) -> bool:
        return bool(self.running)

    # ---------------------------------------------------------------- decoding

    def step(self, emit: Emit) -> None:
        assert self.gen is not None
        solo = self.solo
        try:
            responses = solo.next() if solo is not None else self.gen.next()[1]
        except Exception as e:
            log.exception("decode step failed; failing %d requests", len(self.running))
            for failed in self.running.values():
                emit(Error(id=failed.req.id, message=f"generation failed: {e}", status=500))
            self.running.clear()
            self.by_id.clear()
            self.pausing.clear()
            self.solo = None
            if solo is None:
                try:
                    self.gen.close()
                except Exception:
                    log.exception("closing the failed batch generator failed")
                self._new_generator()
            self._maybe_idle()
            return
        stopped_by_text: list[int] = []
        for r in responses:
            st = self.running.get(r.uid)
            if st is None:
                continue
            try:
                finish = self._advance(st, r, emit)
            except Exception as e:  # this request's text handling failed: end it alone
                log.exception("%s failed while decoding", st.req.id)
                emit(Error(id=st.req.id, message=f"generation failed: {e}", status=500))
                self._forget(st)
                if r.finish_reason is None:
                    stopped_by_text.append(r.uid)
                continue
            if finish is None:
                continue
            if r.finish_reason is None:
                stopped_by_text.append(r.uid)
            elif r.prompt_cache is not None:
                self.prompt_cache.insert_cache(self.key, list(r.all_tokens), r.prompt_cache)
            self._forget(st)
            emit(Done(id=st.req.id, finish_reason=finish, prompt_tokens=st.prompt_tokens,
                      completion_tokens=st.completion, cached_tokens=st.cached_tokens,
                      stop_sequence=st.out.stop_sequence))
        if stopped_by_text and solo is not None:
            cache, tokens = solo.end()
            self.prompt_cache.insert_cache(self.key, tokens, cache)
        elif stopped_by_text:
            caches = self.gen.remove(stopped_by_text, return_prompt_caches=True)
            for cache, tokens in caches.values():
                self.prompt_cache.insert_cache(self.key, list(tokens), cache)
        self._arm()
        self._pause_pending()
        self._leave_batch()
        self._maybe_idle()

    def _forget(self, st: _Running) -> None:
        del self.running[st.uid]
        self.by_id.pop(st.req.id, None)
        if self.solo is not None and self.solo.uid == st.uid:
            self.solo = None

    def _advance(self, st: _Running, r: Any, emit: Emit) -> str | None:
        """Take one generated token; emit its text; return the finish reason, if any."""
        st.completion += 1
        st.here += 1
        finish = r.finish_reason
        logprob = None
        eos = finish == "stop" and r.token in self.tokenizer.eos_token_ids
        if eos:  # EOS is not text
            st.detok.finalize()
        else:
            # A stop word's last token (matched by token ids) goes through the text check too,
            # which drops the word and names it (Done.stop_sequence).
            st.detok.add_token(r.token)
            if finish is not None:
                st.detok.finalize()
            if st.req.logprobs and finish != "stop":
                logprob = token_logprob(self.tokenizer, r.logprobs, r.token, st.req.top_logprobs)
        before = st.out.where
        out = st.out.take(st.detok.last_segment, emit, tokens=0 if finish == "stop" else 1,
                          logprob=logprob, finish=finish, flush=finish == "length" or eos)
        if out is None and st.trigger is not None:
            self._saw(st, r.token, before)
        return out

    def _maybe_idle(self) -> None:
        if not self.running:
            mx.clear_cache()  # freed KV buffers go back, so the reported footprint is honest

    # ---------------------------------------------------------------- housekeeping

    def memory(self) -> Memory:
        return mlx_memory()

    def close(self) -> None:
        if self.gen is not None:
            self.gen.close()
        self.gen = None
        if self.solo is not None:
            self.solo.end()
        self.solo = None
        self.running.clear()
        self.by_id.clear()
        self.paused.clear()
        self.pausing.clear()
        self.prompt_cache = LRUPromptCache(max_size=1)
        self.wired.release()
        self.model = self.tokenizer = None
        # No gc.collect(): close comes right before the process exits (the OS takes every byte
        # back), and a collection took 170 ms here, on the path of every eviction.
        mx.clear_cache()
