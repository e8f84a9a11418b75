"""Vision-language generation with mlx-vlm: one request at a time, streamed token by token.

mlx-vlm's ``stream_generate`` serves one prompt (with its images) per call, and images make
requests hard to batch (mlx-lm's server also serves them alone), so requests queue here and
run one after another; :meth:`VLMEngine.step` pulls one token from the running generator, so
cancels and new arrivals are seen between tokens.

Flow control: each started request keeps its own live generator (its KV cache inside it).
``pause`` leaves a request's generator where it is, and the next one in the queue starts, so a
client that stopped reading does not hold the model from the others; ``resume`` puts it back in
line, and it goes on from the same token (seeded sampling in mlx-vlm is keyed by position, so
the tokens are the ones it would have given unpaused). The oldest unpaused request is the one
that runs. (mlx-vlm 0.7 also has a ``BatchGenerator``; moving to it would batch requests, a
separate change from pausing them.)

How a ``Generate`` is used:

- ``messages``: OpenAI-style. Content is a string or a list of parts; the gateway has put the
  image bytes in ``Generate.images`` (in order) and replaced each image part with a placeholder
  part ``{"type": "image"}`` (``image_url``/``input_image`` parts are accepted too, whatever
  they still hold). The prompt comes from mlx-vlm's ``apply_chat_template`` with
  ``num_images``, so each model family gets its own image tokens. Images without placeholders
  go to the last user message, as mlx-vlm does. ``prompt``/``prompt_ids`` work text-only.
- Images are decoded with mlx-vlm's ``load_image`` when the request arrives, so an undecodable
  one is a 400 at once, not after the queue; ``prepare_inputs`` (image processor + tokenizer)
  runs when the request starts, and ``Started`` carries the real prompt length (image tokens
  included).
- Sampling (temperature, top_p, top_k, min_p, penalties, logit_bias, seed) is mlx-vlm's own
  (``generate_step``); a seeded request draws from its own key stream.
- Context: the text model's ``max_position_embeddings``; longer prompts are a 400
  ``context_length_exceeded`` and ``max_tokens`` is clamped to what fits, as in the lm engine.
- Stops: EOS (mlx-vlm's stopping criteria) ends with "stop"; stop strings are matched on the
  decoded text (the shared :class:`base.TokenStep`) and never sent. mlx-vlm has no
  token-level stop strings. ``completion_tokens`` counts every generated token, EOS included.
"""

from __future__ import annotations

import io
import logging
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import msgspec

from mlx_supervisor.shared.protocol import (
    Done,
    Embed,
    Error,
    Generate,
    Memory,
    RankInfo,
    Started,
)
from mlx_supervisor.worker.engines.base import Emit, LoadInfo, Paused, TokenStep, mlx_memory
from mlx_supervisor.worker.engines.grammar import Grammars
from mlx_supervisor.worker.engines.lm_sampling import token_logprob
from mlx_supervisor.worker.validation import (
    bad_request,
    check_generate,
    check_prompt_length,
    clamp_max_tokens,
)

log = logging.getLogger("mlx_supervisor.worker")

IMAGE_PARTS = ("image", "image_url", "input_image")
TEXT_PARTS = ("text", "input_text", "output_text")


@dataclass
class _Queued:
    req: Generate
    images: list[Any]  # decoded PIL images, in order


@dataclass
class _Running:
    req: Generate
    gen: Iterator[Any]
    prompt_tokens: int
    out: TokenStep
    completion: int = 0


class VLMEngine:
    """Serves ``Generate`` requests (text, or text with images) one at a time, in order."""

    def __init__(self) -> None:
        self.model_id = "model"
        self.ranks: list[RankInfo] = []  # a single process: no ranks
        """Named in error messages; the worker may set it, ``load`` defaults it to the dir name."""
        self.model: Any = None
        self.processor: Any = None
        self.context_length = 0
        self.vocab_size = 0
        self.queue: deque[_Queued] = deque()
        self.live: dict[str, _Running] = {}  # started, oldest first; paused ones wait here
        self.paused = Paused()
        self.grammars: Grammars | None = None

    # ---------------------------------------------------------------- lifecycle

    def load(self, path: str, model_id: str = "") -> LoadInfo:
        from mlx_vlm import load
        from transformers.utils import logging as hf_logging

        # mlx-vlm asks for this with TRANSFORMERS_VERBOSITY=error at import, too late when
        # mlx-lm imported transformers first; without it every chat request logs a warning.
        hf_logging.set_verbosity_error()
        if not path or not Path(path, "config.json").is_file():  # else mlx-vlm tries the Hub
            raise FileNotFoundError(f"no config.json in model directory {path!r}")
        self.model_id = model_id or Path(path).name
        self.model, self.processor = load(path)
        text = getattr(self.model.config, "text_config", None) or self.model.config
        self.context_length = int(getattr(text, "max_position_embeddings", 0) or 0)
        self.vocab_size = int(getattr(text, "vocab_size", 0) or len(self._tokenizer))
        tok = self._tokenizer
        self.grammars = Grammars(tok, self.vocab_size, tok, [tok.eos_token_id])
        return LoadInfo(kind="vlm", model_id=self.model_id, context_length=self.context_length)

    @property
    def _tokenizer(self) -> Any:
        return getattr(self.processor, "tokenizer", self.processor)

    def close(self) -> None:
        for rid in list(self.live):
            self._finish_generator(rid)
        self.queue.clear()
        self.model = self.processor = None
        mx.clear_cache()  # no gc.collect(): the process exits next (see LMEngine.close)

    def memory(self) -> Memory:
        return mlx_memory()

    # ---------------------------------------------------------------- requests

    def submit(self, req: Generate | Embed, emit: Emit) -> None:
        if isinstance(req, Embed):
            emit(bad_request(req.id, f"model {self.model_id} is not an embeddings model",
                             code="model_not_supported", param="model"))
            return
        err = self._check(req)
        if err is not None:
            emit(err)
            return
        from mlx_vlm.utils import load_image

        images = []
        for i, data in enumerate(req.images):
            try:
                images.append(load_image(io.BytesIO(data)))
            except Exception as e:  # PIL raises many types; every one means a bad image
                emit(bad_request(req.id, f"image {i + 1} could not be read as an image: {e}",
                                 code="invalid_image", param="messages"))
                return
        self.queue.append(_Queued(req, images))

    def _check(self, req: Generate) -> Error | None:
        # check_generate wants string content (text models); parts are checked below.
        flat = None if req.messages is None else [
            {**m, "content": ""} if isinstance(m, dict) else m for m in req.messages]
        err = check_generate(msgspec.structs.replace(req, messages=flat))
        if err is not None:
            return err
        if req.images and req.messages is None:
            return bad_request(req.id, "images need chat messages", param="messages")
        if req.prompt_ids is not None and any(
                not 0 <= t < self.vocab_size for t in req.prompt_ids):
            return bad_request(req.id, f"prompt_ids must be in [0, {self.vocab_size})",
                               param="prompt")
        if req.logit_bias and any(not 0 <= t < self.vocab_size for t in req.logit_bias):
            return bad_request(req.id, f"logit_bias token ids must be in [0, {self.vocab_size})",
                               param="logit_bias")
        placeholders = 0
        for i, m in enumerate(req.messages or []):
            content = m.get("content")
            if content is None or isinstance(content, str):
                continue
            if not isinstance(content, list) or not all(
                    isinstance(p, dict) and p.get("type") in IMAGE_PARTS + TEXT_PARTS
                    for p in content):
                return bad_request(req.id, f"messages[{i}].content must be a string or a list "
                                   "of text and image parts", param="messages")
            placeholders += sum(p["type"] in IMAGE_PARTS for p in content)
        if placeholders and placeholders != len(req.images):
            return bad_request(req.id, f"the messages have {placeholders} image parts but "
                               f"{len(req.images)} images came with them", param="messages")
        return None

    def cancel(self, request_id: str) -> None:
        if request_id in self.live:
            self._finish_generator(request_id)
        self.queue = deque(q for q in self.queue if q.req.id != request_id)

    def pause(self, request_id: str) -> bool:
        """Flow control: stop taking tokens for this request (its generator waits as it is)."""
        self.paused.hold(request_id, self.live.get(request_id))
        return True

    def resume(self, request_id: str) -> None:
        self.paused.release(request_id, self.live.get(request_id))

    def has_work(self) -> bool:
        return self._active() is not None or bool(self.queue)

    def _active(self) -> _Running | None:
        """The oldest started request that is not paused."""
        return self.paused.oldest(self.live)

    # ---------------------------------------------------------------- decoding

    def step(self, emit: Emit) -> None:
        """Start the next request if none runs unpaused, then take one token of the one that
        runs."""
        st = self._active()
        if st is None:
            if not self.queue:
                return
            job = self.queue.popleft()
            try:
                started = self._start(job, emit)
            except Exception as e:  # this request could not start: fail it alone
                log.exception("%s could not start", job.req.id)
                self._finish_generator(job.req.id)
                emit(Error(id=job.req.id, message=f"generation failed: {e}", status=500))
                return
            if not started:
                return
            st = self.live[job.req.id]
        first = st.completion == 0
        try:
            r = next(st.gen)
        except Exception as e:
            log.exception("%s generation failed", st.req.id)
            self._finish_generator(st.req.id)
            # A model that rejects its inputs does so at prefill, with a ValueError.
            status = 400 if first and isinstance(e, ValueError) else 500
            emit(Error(id=st.req.id, message=f"generation failed: {e}", status=status))
            return
        finish = self._advance(st, r, emit)
        if finish is not None:
            self._finish_generator(st.req.id)
            emit(Done(id=st.req.id, finish_reason=finish, prompt_tokens=st.prompt_tokens,
                      completion_tokens=st.completion, stop_sequence=st.out.stop_sequence))

    def _start(self, q: _Queued, emit: Emit) -> bool:
        """Build the inputs and the generator; False (after an Error) if the request fails."""
        from mlx_vlm import prepare_inputs, stream_generate
        from mlx_vlm.prompt_utils import apply_chat_template
        from mlx_vlm.utils import should_add_special_tokens

        req, config = q.req, self.model.config
        try:
            if req.prompt_ids is not None:
                inputs: dict[str, Any] = {"input_ids": mx.array([req.prompt_ids])}
            else:
                prompt = req.prompt if req.messages is None else apply_chat_template(
                    self.processor, config, req.messages, num_images=len(q.images))
                inputs = dict(prepare_inputs(
                    self.processor, images=q.images or None, prompts=prompt,
                    image_token_index=getattr(config, "image_token_index", None),
                    add_special_tokens=should_add_special_tokens(config.model_type,
                                                                 self.processor)))
        except Exception as e:
            emit(bad_request(req.id, f"could not build the prompt: {e}", param="messages"))
            return False
        input_ids = inputs.pop("input_ids")
        n_prompt = int(input_ids.size)
        err = check_prompt_length(req.id, n_prompt, self.context_length)
        if err is not None:
            emit(err)
            return False
        assert self.grammars is not None
        constrained = self.grammars.build(req, [])  # response_format, as in the lm engine
        if isinstance(constrained, Error):
            emit(constrained)
            return False
        if req.seed is not None:
            mx.random.seed(req.seed & 0xFFFFFFFFFFFFFFFF)  # for samplers mlx-vlm does not key by seed
        gen = stream_generate(
            self.model, self.processor, "", input_ids=input_ids,
            pixel_values=inputs.pop("pixel_values", None),
            mask=inputs.pop("attention_mask", None),
            max_tokens=clamp_max_tokens(req.max_tokens, n_prompt, self.context_length),
            temperature=req.temperature, top_p=req.top_p, top_k=req.top_k, min_p=req.min_p,
            repetition_penalty=req.repetition_penalty, presence_penalty=req.presence_penalty,
            frequency_penalty=req.frequency_penalty, logit_bias=req.logit_bias,
            seed=req.seed, logits_processors=[constrained] if constrained else None,
            **inputs)  # the rest (image_grid_thw, ...) goes to the model
        self.live[req.id] = _Running(req, gen, n_prompt, TokenStep(req))
        log.info("%s started prompt=%d images=%d", req.id, n_prompt, len(q.images))
        emit(Started(id=req.id, prompt_tokens=n_prompt))
        return True

    def _advance(self, st: _Running, r: Any, emit: Emit) -> str | None:
        """Emit the text of one ``GenerationResult``; return the finish reason, if any.

        stream_generate yields one result per token and then a last one (``finish_reason``
        set) carrying the detokenizer's remainder; on EOS that last one *is* the EOS token.
        """
        new = max(0, int(r.generation_tokens) - st.completion)
        st.completion += new
        finish = r.finish_reason
        text_token = bool(new) and finish != "stop" and r.token is not None
        logprob = None
        if text_token and st.req.logprobs and r.logprobs is not None:
            logprob = token_logprob(self._tokenizer, r.logprobs, int(r.token), st.req.top_logprobs)
        # Any end but a stop string makes a held-back partial stop string real text.
        return st.out.take(r.text or "", emit, tokens=new if text_token else 0, logprob=logprob,
                           finish=None if finish is None else str(finish),
                           flush=finish is not None)

    def _finish_generator(self, request_id: str) -> None:
        """Close a request's generator (mlx-vlm's cleanup runs) and forget it."""
        st = self.live.pop(request_id, None)
        self.paused.discard(request_id)
        if st is not None:
            close = getattr(st.gen, "close", None)
            if close is not None:
                close()
        mx.clear_cache()  # freed KV buffers go back, so the reported footprint is honest
