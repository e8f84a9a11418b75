"""A fake engine for supervisor logic and gateway load tests: no mlx, deterministic, fast.

Output: the words ``tok0 tok1 tok2 ...`` (one token each), until ``max_tokens`` ("length") or a
stop string ("stop"; the stop string and whatever follows is never sent). Prompt token count is
the number of whitespace-separated words in the prompt (or ``len(prompt_ids)``). ``Embed``
answers deterministic unit vectors (``dimensions`` or 8 floats) derived from a hash of the text.

Environment knobs (read at construction):

- ``FAKE_LOAD_SECONDS``: sleep this long in ``load`` (default 0).
- ``FAKE_LOAD_FAIL=msg``: ``load`` raises with ``msg`` -> ``LoadFailed(msg)``, exit 3.
- ``FAKE_CRASH_AT_LOAD=1``: ``load`` writes a line to stderr and ``os._exit(1)``.
- ``FAKE_TOKEN_DELAY``: seconds per decode step, i.e. between tokens (default 0).
- ``FAKE_MEMORY_BYTES``: reported active memory (default 100 MB = 100_000_000).
- ``FAKE_MEMORY_GROWTH``: bytes added to that per finished request (default 0).
- ``FAKE_HANG_WORD``: a request whose prompt/messages contain this word makes the whole process
  hang: the MLX thread blocks forever and the io loop stops heartbeating and answering.
- ``FAKE_CONTEXT_LENGTH``: the context length reported and enforced (default 4096; the
  ``--context-length`` argument wins).
"""

from __future__ import annotations

import hashlib
import logging
import os
import struct
import sys
import time
from dataclasses import dataclass, field

from mlx_supervisor.shared.protocol import (
    Chunk,
    Done,
    Embed,
    Embeddings,
    Generate,
    Memory,
    RankInfo,
    Started,
)
from mlx_supervisor.worker import process_guard
from mlx_supervisor.worker.engines.base import Emit, LoadInfo
from mlx_supervisor.worker.validation import (
    bad_request,
    check_generate,
    check_prompt_length,
    clamp_max_tokens,
)

log = logging.getLogger("mlx_supervisor.worker")


def _env_float(name: str, default: float) -> float:
    v = os.environ.get(name, "")
    return float(v) if v.strip() else default


@dataclass
class _Req:
    id: str
    max_tokens: int
    stop: list[str]
    prompt_tokens: int
    produced: int = 0
    text: str = ""
    sent: int = 0  # characters of ``text`` already emitted
    pending_tokens: int = field(default=0)


def _held_back(text: str, stops: list[str]) -> int:
    """Length of the longest suffix of ``text`` that could start a stop string."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best


class FakeEngine:
    def __init__(self, context_length: int = 0) -> None:
        self.ranks: list[RankInfo] = []
        self.load_seconds = _env_float("FAKE_LOAD_SECONDS", 0.0)
        self.load_fail = os.environ.get("FAKE_LOAD_FAIL", "")
        self.crash_at_load = os.environ.get("FAKE_CRASH_AT_LOAD", "") not in ("", "0")
        self.token_delay = _env_float("FAKE_TOKEN_DELAY", 0.0)
        self.base_memory = int(_env_float("FAKE_MEMORY_BYTES", 100_000_000))
        self.growth = int(_env_float("FAKE_MEMORY_GROWTH", 0))
        self.hang_word = os.environ.get("FAKE_HANG_WORD", "")
        self.context_length = context_length or int(_env_float("FAKE_CONTEXT_LENGTH", 4096))
        self.finished = 0
        self.peak = 0
        self.active: dict[str, _Req] = {}
        self.paused: dict[str, _Req] = {}

    def load(self, path: str, model_id: str = "") -> LoadInfo:
        if self.crash_at_load:
            # A detail line for the operator's tail, then the cause line a client is given.
            print("fake engine: FAKE_CRASH_AT_LOAD set, crashing now", file=sys.stderr, flush=True)
            print("RuntimeError: fake engine crashing at load", file=sys.stderr, flush=True)
            os._exit(1)
        if self.load_seconds > 0:
            time.sleep(self.load_seconds)
        if self.load_fail:
            raise RuntimeError(self.load_fail)
        return LoadInfo(kind="fake", model_id=model_id or "fake", context_length=self.context_length,
                        embedding_dims=8)

    def submit(self, req: Generate | Embed, emit: Emit) -> None:
        if isinstance(req, Embed):
            self._embed(req, emit)
            return
        err = check_generate(req)
        if err is not None:
            emit(err)
            return
        if req.prompt_ids is not None:
            words: list[str] = [str(t) for t in req.prompt_ids]
        elif req.prompt is not None:
            words = req.prompt.split()
        else:
            words = " ".join(str(m.get("content") or "") for m in req.messages or []).split()
        if self.hang_word and self.hang_word in words:
            log.warning("%s: FAKE_HANG_WORD seen, hanging the whole process", req.id)
            process_guard.hang_forever()
        err = check_prompt_length(req.id, len(words), self.context_length)
        if err is not None:
            emit(err)
            return
        max_tokens = clamp_max_tokens(req.max_tokens, len(words), self.context_length)
        self.active[req.id] = _Req(req.id, max_tokens, [s for s in req.stop if s], len(words))
        emit(Started(id=req.id, prompt_tokens=len(words)))

    def _embed(self, req: Embed, emit: Emit) -> None:
        texts = req.texts if req.texts is not None else [
            " ".join(map(str, ids)) for ids in req.token_ids or []]
        if not texts:
            emit(bad_request(req.id, "input must not be empty", param="input"))
            return
        dims = req.dimensions or 8
        vectors = []
        for t in texts:
            raw = hashlib.sha256(t.encode()).digest() * (dims // 32 + 1)
            v = [b - 127.5 for b in raw[:dims]]
            norm = sum(x * x for x in v) ** 0.5 or 1.0
            vectors.append(struct.pack(f"<{dims}f", *(x / norm for x in v)))
        self.finished += 1
        emit(Embeddings(id=req.id, vectors=vectors, dims=dims,
                        prompt_tokens=sum(len(t.split()) for t in texts)))

    def cancel(self, request_id: str) -> None:
        self.active.pop(request_id, None)
        self.paused.pop(request_id, None)

    def pause(self, request_id: str) -> bool:
        """Flow control: the sequence sits out of the steps until ``resume``."""
        r = self.active.pop(request_id, None)
        if r is not None:
            self.paused[request_id] = r
        return True

    def resume(self, request_id: str) -> None:
        r = self.paused.pop(request_id, None)
        if r is not None:
            self.active[request_id] = r

    def has_work(self) -> bool:
        return bool(self.active)

    def step(self, emit: Emit) -> None:
        if self.token_delay > 0:
            time.sleep(self.token_delay)
        for r in list(self.active.values()):
            r.text += ("" if r.produced == 0 else " ") + f"tok{r.produced}"
            r.produced += 1
            r.pending_tokens += 1
            finish = "length" if r.produced >= r.max_tokens else None
            found = [(i, s) for s in r.stop if (i := r.text.find(s, max(0, r.sent - len(s)))) >= 0]
            cut, word = min(found) if found else (-1, None)
            if cut >= 0:
                end, finish = cut, "stop"
            elif finish:
                end = len(r.text)
            else:
                end = len(r.text) - _held_back(r.text, r.stop)
            if end > r.sent:
                emit(Chunk(id=r.id, text=r.text[r.sent:end], tokens=r.pending_tokens))
                r.sent, r.pending_tokens = end, 0
            if finish:
                del self.active[r.id]
                self.finished += 1
                emit(Done(id=r.id, finish_reason=finish, prompt_tokens=r.prompt_tokens,
                          completion_tokens=r.produced, stop_sequence=word))

    def memory(self) -> Memory:
        active = self.base_memory + self.growth * self.finished
        self.peak = max(self.peak, active)
        return Memory(active=active, cache=0, peak=self.peak)

    def close(self) -> None:
        self.active.clear()
        self.paused.clear()

