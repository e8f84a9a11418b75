"""Embeddings engine: sentence vectors from an encoder model loaded with mlx-embeddings.

The vectors are what sentence-transformers gives for models such as all-MiniLM-L6-v2: the
encoder's last hidden state, mean-pooled over the attention mask, then L2-normalized. That is
the ``text_embeds`` that mlx-embeddings' models return; a model that returns no
``text_embeds`` gets the same pooling from mlx-embeddings' own helpers.

Inputs and their limits:

- ``texts`` are tokenized with the model's tokenizer (special tokens added). ``token_ids`` are
  fed to the encoder as given, so a client that wants the same vector as for the text must
  include the model's special tokens, as ``tokenizer.encode(text)`` does.
- An input longer than the model's maximum (``max_position_embeddings``, 512 for BERT) is cut
  to that many tokens, keeping the start (a text keeps its closing ``[SEP]``). OpenAI's API
  refuses such input instead; we truncate, as sentence-transformers and mlx-embeddings do.
  (sentence-transformers cuts all-MiniLM-L6-v2 at its trained 256 tokens; we allow the
  position table's 512.) ``prompt_tokens`` counts the tokens actually used.
- ``dimensions`` smaller than the model's width keeps the first ``dimensions`` components and
  renormalizes them (Matryoshka-style); larger is a 400.

One request is split into forward passes of at most :data:`TOKENS_PER_PASS` padded tokens
(inputs sorted by length so that a pass pads little); :meth:`EmbeddingsEngine.step` runs one
pass, so a huge request neither holds the MLX thread for long nor builds a giant attention
tensor, and a cancel lands between passes.
"""

from __future__ import annotations

import os
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np
import psutil

from mlx_supervisor.shared.protocol import Embed, Embeddings, Error, Generate, Memory, RankInfo
from mlx_supervisor.worker.engines.base import Emit, LoadInfo
from mlx_supervisor.worker.engines.wired import Wired
from mlx_supervisor.worker.validation import bad_request

TOKENS_PER_PASS = 8192
"""Padded tokens (batch x longest input) per forward pass: about 200 MB of attention scores
for a 12-head model at 512 tokens."""


@dataclass
class _Job:
    """One Embed request: its token ids, and the vectors computed so far."""

    req: Embed
    ids: list[list[int]] | None = None
    batches: deque[list[int]] = field(default_factory=deque)
    vectors: dict[int, np.ndarray] = field(default_factory=dict)


def mlx_memory() -> Memory:
    """MLX buffers plus process RSS: what the supervisor's memory ledger charges."""
    rss = psutil.Process(os.getpid()).memory_info().rss
    return Memory(
        active=mx.get_active_memory(),
        cache=mx.get_cache_memory(),
        peak=mx.get_peak_memory(),
        rss=rss,
    )


class EmbeddingsEngine:
    """Serves ``Embed`` requests in arrival order, one forward pass per :meth:`step`."""

    def __init__(self, max_length: int | None = None, tokens_per_pass: int = TOKENS_PER_PASS):
        """``max_length`` lowers the truncation limit below the model's own (tests use it)."""
        self.model_id = "model"
        self.ranks: list[RankInfo] = []  # a single process: no ranks
        """Named in error messages; the worker may set it, ``load`` defaults it to the dir name."""
        self._model: Any = None
        self._tokenizer: Any = None
        self.wired = Wired()  # wired memory on Metal while loaded (see engines/wired.py)
        self._dims = 0
        self._max_len = max_length or 0
        self._tokens_per_pass = tokens_per_pass
        self._vocab = 0
        self._pad_id = 0
        self._jobs: deque[_Job] = deque()

    # ------------------------------------------------------------------ lifecycle

    def load(self, path: str, model_id: str = "") -> LoadInfo:
        from mlx_embeddings import load

        if not Path(path, "config.json").is_file():  # else mlx-embeddings tries the Hub
            raise FileNotFoundError(f"no config.json in model directory {path}")
        self.model_id = model_id or Path(path).name
        self._model, self._tokenizer = load(path)
        config = self._model.config
        limit = int(
            getattr(config, "max_position_embeddings", 0)
            or min(getattr(self._tokenizer, "model_max_length", 512), 8192)
        )
        if getattr(config, "model_type", "") in ("roberta", "xlm-roberta", "camembert"):
            # RoBERTa numbers positions from padding_idx + 1: the table holds that many fewer.
            limit -= int(getattr(config, "pad_token_id", 1) or 1) + 1
        self._max_len = min(self._max_len or limit, limit)
        self._vocab = int(getattr(config, "vocab_size", 0) or len(self._tokenizer))
        self._pad_id = int(getattr(self._tokenizer, "pad_token_id", None) or 0)
        # One tiny pass finds the output width (a projection may differ from hidden_size)
        # and compiles nothing later requests would pay for.
        probe = self._encode([self._tokenizer.encode("hello")])
        self._dims = int(probe.shape[-1])
        self.wired.hold(self._model)
        return LoadInfo(kind="embeddings", model_id=self.model_id, context_length=self._max_len,
                        embedding_dims=self._dims)

    def close(self) -> None:
        self._jobs.clear()
        self.wired.release()
        self._model = self._tokenizer = None
        mx.clear_cache()

    def memory(self) -> Memory:
        return mlx_memory()

    # ------------------------------------------------------------------ requests

    def submit(self, req: Generate | Embed, emit: Emit) -> None:
        if isinstance(req, Generate):
            emit(bad_request(req.id, f"model {self.model_id} is an embeddings model",
                             code="model_not_supported", param="model"))
            return
        problem = self._validate(req)
        if problem is not None:
            emit(problem)
            return
        self._jobs.append(_Job(req))

    def _validate(self, req: Embed) -> Error | None:
        def bad(message: str, param: str = "input") -> Error:
            return bad_request(req.id, message, param=param)

        if (req.texts is None) == (req.token_ids is None):
            return bad("give exactly one of texts or token_ids")
        items: list[Any] = req.texts if req.texts is not None else req.token_ids
        if not items:
            return bad("input must not be empty")
        for i, item in enumerate(items):
            if len(item) == 0:
                return bad(f"input[{i}] is empty")
        for i, ids in enumerate(req.token_ids or []):
            if min(ids) < 0 or max(ids) >= self._vocab:
                return bad(f"input[{i}] has a token id outside 0..{self._vocab - 1}")
        if req.dimensions is not None and not 1 <= req.dimensions <= self._dims:
            return bad(f"dimensions must be between 1 and {self._dims} for model "
                       f"{self.model_id}", "dimensions")
        return None

    def cancel(self, request_id: str) -> None:
        self._jobs = deque(j for j in self._jobs if j.req.id != request_id)

    def pause(self, request_id: str) -> bool:
        """An embeddings request is answered in one message: nothing to take out of a step,
        so the worker holds that message until ``resume`` (the Engine default)."""
        return False

    def resume(self, request_id: str) -> None:
        pass

    def has_work(self) -> bool:
        return bool(self._jobs)

    def step(self, emit: Emit) -> None:
        """Run one forward pass of the oldest request; answer it when its last pass is done."""
        if not self._jobs:
            return
        job = self._jobs[0]
        try:
            if job.ids is None:
                self._plan(job)
            assert job.ids is not None
            batch = job.batches.popleft()
            out = np.array(self._encode([job.ids[i] for i in batch]), dtype=np.float32)
            job.vectors.update(zip(batch, out, strict=True))
            if job.batches:
                return
            self._jobs.popleft()
            emit(self._answer(job))
        except Exception as exc:  # a failed pass fails its request, never the worker
            if self._jobs and self._jobs[0] is job:
                self._jobs.popleft()
            emit(Error(id=job.req.id, message=f"embedding failed: {exc}", status=500))

    # ------------------------------------------------------------------ internals

    def _plan(self, job: _Job) -> None:
        """Tokenize (truncating) and group inputs by length into passes under the token budget."""
        req = job.req
        if req.texts is not None:
            enc = self._tokenizer(req.texts, truncation=True, max_length=self._max_len)
            job.ids = [list(ids) for ids in enc["input_ids"]]
        else:
            job.ids = [list(ids[: self._max_len]) for ids in req.token_ids or []]
        order = sorted(range(len(job.ids)), key=lambda i: len(job.ids[i]))  # type: ignore[index]
        batch: list[int] = []
        for i in order:
            # Sorted ascending, so this input is the longest the batch would hold.
            if batch and (len(batch) + 1) * len(job.ids[i]) > self._tokens_per_pass:
                job.batches.append(batch)
                batch = []
            batch.append(i)
        job.batches.append(batch)

    def _encode(self, ids: list[list[int]]) -> mx.array:
        """One padded forward pass; returns mean-pooled, L2-normalized float32 vectors."""
        longest = max(len(x) for x in ids)
        input_ids = np.full((len(ids), longest), self._pad_id, dtype=np.int32)
        mask = np.zeros((len(ids), longest), dtype=np.int32)
        for row, x in enumerate(ids):
            input_ids[row, : len(x)] = x
            mask[row, : len(x)] = 1
        attention_mask = mx.array(mask)
        out = self._model(mx.array(input_ids), attention_mask=attention_mask)
        embeds = getattr(out, "text_embeds", None)
        if embeds is None:
            from mlx_embeddings.models.base import mean_pooling, normalize_embeddings

            embeds = normalize_embeddings(mean_pooling(out.last_hidden_state, attention_mask))
        embeds = embeds.astype(mx.float32)
        mx.eval(embeds)
        return embeds

    def _answer(self, job: _Job) -> Embeddings:
        assert job.ids is not None
        vecs = np.stack([job.vectors[i] for i in range(len(job.ids))])
        dims = job.req.dimensions or self._dims
        if dims < vecs.shape[1]:
            vecs = vecs[:, :dims]
            vecs = vecs / np.maximum(np.linalg.norm(vecs, axis=1, keepdims=True), 1e-12)
        vecs = vecs.astype("<f4", copy=False)
        return Embeddings(
            id=job.req.id,
            vectors=[v.tobytes() for v in vecs],
            dims=dims,
            prompt_tokens=sum(len(x) for x in job.ids),
        )
