"""Sharded text generation on ``mlx.distributed``: one logical worker spread over N ranks.

The gateway starts the group with ``mlx.launch`` (see :mod:`group_launch`): every rank runs
``python -m mlx_supervisor.worker ... --ranks N --hosts a,b --parallel tensor|pipeline``.

- **Rank 0** is an ordinary worker to the gateway (DEALER, Hello/Ready/heartbeats): its MLX
  thread runs :class:`ShardedEngine`.
- **The other ranks** never talk to the gateway (:func:`follower_main`). They receive every
  command from rank 0 over ``mx.distributed`` (one ``all_sum`` per command, as
  ``_share_object`` in mlx_lm/server.py does) and step the same generator in lockstep, so every
  collective inside the sharded model meets its peers.

Commands from rank 0: ``JOB`` (a ``Generate`` with prompt ids, the clamped ``max_tokens`` and a
seed; every rank starts the same ``stream_generate``), ``STEP`` (every rank takes one token),
``STOP`` (drop the current generation: a cancel or a stop string) and ``SHUTDOWN``. One request
runs at a time (no ``BatchGenerator``); the others wait in rank 0's queue. Every rank samples
with the same seeded key stream, so every rank feeds the model the same tokens. Only rank 0
emits.

Formation: with the ring backend ``mx.distributed.init`` blocks for good (holding the GIL)
while a peer is missing, so a real-time timer bounds it (``--formation-timeout``): the rank
ends by SIGALRM and the launcher reports the group that did not form. A lost peer makes the next collective raise: rank 0 then
fails its requests and ends its process (:class:`GroupLost`), and the gateway kills what is left
of the group. No prompt cache across requests (each request prefills from scratch).
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import random
import signal
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import msgspec
import numpy as np
import psutil
from mlx_lm.generate import generation_stream, stream_generate
from mlx_lm.sample_utils import make_logits_processors
from mlx_lm.utils import sharded_load

from mlx_supervisor.shared.protocol import (
    EXIT_LOAD_FAILED,
    Done,
    Embed,
    Error,
    Generate,
    Memory,
    RankInfo,
    Started,
    decode_to_worker,
    encode,
)
from mlx_supervisor.worker.engines.base import (
    Emit,
    LoadInfo,
    Markup,
    TokenStep,
    context_length,
    vocab_size,
)
from mlx_supervisor.worker.engines.grammar import Grammars, initial_state
from mlx_supervisor.worker.engines.lm_prompt import prepare
from mlx_supervisor.worker.engines.lm_sampling import sampler_for, token_logprob
from mlx_supervisor.worker.sharding import ShardSpec, env_rank

log = logging.getLogger("mlx_supervisor.worker")

JOB, STEP, STOP, SHUTDOWN = 1, 2, 3, 4


class GroupLost(BaseException):  # noqa: N818 - not an error to catch and carry on from
    """A collective failed (a peer is gone) or the ranks fell out of step. It is a
    ``BaseException`` so that the MLX thread's per-step ``except Exception`` does not swallow it:
    the process ends, and with it the group, instead of serving from a broken group."""


def form_group(spec: ShardSpec) -> Any:
    """``mx.distributed.init``, bounded by ``spec.formation_timeout``.

    With the ring backend, init waits for good while a peer is missing, and it holds the GIL
    while it waits, so no Python thread (not even the io thread's heartbeats) can time it out.
    A real-time timer can: SIGALRM, left at its default action, ends the process, and mlx.launch
    (see ``group_launch``) reports the rank that ended, with the reason, and stops the others."""
    where = f"{spec.ranks} ranks on {', '.join(spec.hosts)} ({spec.backend} backend)"
    log.info("forming the group of %s; formation_timeout %gs", where, spec.formation_timeout)
    t0 = time.monotonic()
    signal.setitimer(signal.ITIMER_REAL, spec.formation_timeout)
    try:
        group = mx.distributed.init(strict=True, backend=spec.backend)
    except Exception as e:
        raise RuntimeError(f"the group of {where} could not form: {e}") from e
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
    if group.size() != spec.ranks:
        raise RuntimeError(f"the {spec.backend} backend formed a group of {group.size()} "
                           f"rank(s), expected {spec.ranks}: was the worker started by mlx.launch?")
    log.info("rank %d of %d: group formed in %.2fs", group.rank(), group.size(),
             time.monotonic() - t0)
    return group


def load_shard(path: str, spec: ShardSpec, group: Any) -> tuple[Any, Any, dict[str, Any]]:
    p = Path(path)
    if not path or not (p / "config.json").is_file():
        raise FileNotFoundError(f"model directory {path!r} has no config.json")
    tensor = group if spec.parallel == "tensor" else None
    pipeline = group if spec.parallel == "pipeline" else None
    # sharded_load ends with an all_sum barrier: every rank has its shard when it returns.
    model, tokenizer, config = sharded_load(path, pipeline_group=pipeline, tensor_group=tensor,
                                            return_config=True)
    return model, tokenizer, config


def gather_ranks(group: Any) -> list[tuple[int, int]]:
    """Every rank's (pid, MLX bytes after load), rank order; a collective, so all ranks call it."""
    mine = mx.array([os.getpid(), mx.get_active_memory() + mx.get_cache_memory()],
                    dtype=mx.int64)
    both = mx.distributed.all_gather(mine, group=group, stream=mx.cpu)
    rows: Any = np.array(both).reshape(-1, 2).tolist()
    return [(int(a), int(b)) for a, b in rows]


class Channel:
    """Rank 0 broadcasts ``(code, payload)``; the others receive it. One ``all_sum`` for the
    header, one for the payload: every other rank contributes zeros. Every rank issues the same
    collectives in the same order on one stream, which is what keeps them paired."""

    def __init__(self, group: Any) -> None:
        self.group = group

    def _sum(self, a: mx.array) -> mx.array:
        try:
            # On the generation stream, behind the model's own collectives: stream_generate
            # has always queued the next forward pass (async_eval) before it yields a token.
            # On another stream the ranks could pair this all_sum with different operations.
            with mx.stream(generation_stream):
                out = mx.distributed.all_sum(a, group=self.group)
            mx.eval(out)
        except RuntimeError as e:
            raise GroupLost(f"lost a peer of the sharded group: {e}") from e
        return out

    def send(self, code: int, payload: bytes = b"") -> None:
        self._sum(mx.array([code, len(payload)], dtype=mx.int32))
        if payload:
            self._sum(mx.array(np.frombuffer(payload, dtype=np.uint8)))

    def recv(self) -> tuple[int, bytes]:
        head: Any = self._sum(mx.zeros((2,), dtype=mx.int32)).tolist()
        code, n = int(head[0]), int(head[1])
        payload = bytes(np.array(self._sum(mx.zeros((n,), dtype=mx.uint8)))) if n else b""
        return code, payload


def start_generation(model: Any, tokenizer: Any, job: Generate, grammars: Grammars) -> Any:
    """The generator every rank steps in lockstep. ``job.seed`` is always set, so every rank
    draws the same tokens; a grammar is deterministic too, so every rank masks alike."""
    processors = make_logits_processors(job.logit_bias, job.repetition_penalty, 20,
                                        job.presence_penalty, 20, job.frequency_penalty, 20)
    ids = list(job.prompt_ids or [])
    constrained = grammars.processor(job, ids)
    if constrained is not None:
        processors.append(constrained)
    return stream_generate(model, tokenizer, ids, max_tokens=job.max_tokens,
                           sampler=sampler_for(job, grammars.vocab_size),
                           logits_processors=processors)


@dataclass
class _Current:
    req: Generate
    it: Any
    prompt_tokens: int
    out: TokenStep
    cancelled: bool = False


class ShardedEngine:
    """Rank 0's engine (the :class:`~mlx_supervisor.worker.engines.base.Engine` interface)."""

    def __init__(self, spec: ShardSpec, context_length: int = 0) -> None:
        self.spec = spec
        self.context_length = context_length
        self.model: Any = None
        self.tokenizer: Any = None
        self.vocab_size = 0
        self.chan: Channel | None = None
        self.queue: collections.deque[tuple[Generate, TokenStep]] = collections.deque()
        self.grammars: Grammars | None = None
        self.cur: _Current | None = None
        self.peers: list[tuple[int, int]] = []
        self.ranks: list[RankInfo] = []
        """Every rank (replaced whole on each reading; the io thread reads it for heartbeats)."""

    # ---------------------------------------------------------------- load

    def load(self, path: str, model_id: str = "") -> LoadInfo:
        group = form_group(self.spec)
        self.model, self.tokenizer, config = load_shard(path, self.spec, group)
        self.peers = gather_ranks(group)
        self.chan = Channel(group)
        self.context_length = context_length(config, self.context_length)
        self.vocab_size = vocab_size(config, self.tokenizer)
        self.grammars = Grammars.of_lm(self.tokenizer, self.vocab_size)
        self.memory()
        return LoadInfo(kind="lm", model_id=model_id or Path(path).name,
                        context_length=self.context_length, ranks=self.ranks)

    # ---------------------------------------------------------------- requests

    def submit(self, req: Generate | Embed, emit: Emit) -> None:
        ready = prepare(req, self.tokenizer, self.vocab_size, self.context_length)
        if isinstance(ready, Error):
            emit(ready)
            return
        assert isinstance(req, Generate)
        ids, max_tokens = ready

        assert self.grammars is not None
        err = self.grammars.build(req, ids)  # refused here, before any rank runs it
        if isinstance(err, Error):
            emit(err)
            return
        out = TokenStep(req, Markup.of(self.tokenizer, req), initial_state(self.tokenizer, ids))
        # What every rank needs to run the same generation: ids, limits and a seed.
        seed = req.seed if req.seed is not None else random.getrandbits(63)
        self.queue.append((msgspec.structs.replace(
            req, messages=None, prompt=None, prompt_ids=ids, images=[], seed=seed,
            max_tokens=max_tokens), out))

    def cancel(self, request_id: str) -> None:
        for queued in list(self.queue):
            if queued[0].id == request_id:
                self.queue.remove(queued)
        if self.cur is not None and self.cur.req.id == request_id:
            self.cur.cancelled = True

    def has_work(self) -> bool:
        return bool(self.queue) or self.cur is not None

    # ---------------------------------------------------------------- lockstep decoding

    def step(self, emit: Emit) -> None:
        assert self.chan is not None
        try:
            self._step(emit)
        except GroupLost as e:
            self._fail_all(emit, str(e))
            raise
        except Exception as e:  # the ranks may now be out of step: end the group
            log.error("sharded step failed:\n%s", traceback.format_exc())
            self._fail_all(emit, f"generation failed: {e}")
            raise GroupLost(f"generation failed: {e}") from e

    def _step(self, emit: Emit) -> None:
        assert self.chan is not None
        if self.cur is None:
            job, out = self.queue.popleft()
            self.chan.send(JOB, encode(job))
            assert self.grammars is not None
            it = start_generation(self.model, self.tokenizer, job, self.grammars)
            self.cur = _Current(job, it, len(job.prompt_ids or []), out)
            log.info("%s started prompt=%d max_tokens=%d", job.id, self.cur.prompt_tokens,
                     job.max_tokens)
            emit(Started(id=job.id, prompt_tokens=self.cur.prompt_tokens))
        cur = self.cur
        if cur.cancelled:
            self._drop(cur)
            return
        self.chan.send(STEP)
        r = next(cur.it)
        eos = r.finish_reason == "stop"
        logprob = None
        if not eos and cur.req.logprobs:
            logprob = token_logprob(self.tokenizer, r.logprobs, r.token, cur.req.top_logprobs)
        finish = cur.out.take(r.text, emit, tokens=0 if eos else 1, logprob=logprob,
                              finish=r.finish_reason, flush=r.finish_reason is not None)
        if finish is not None and r.finish_reason is None:
            self._drop(cur)  # a stop string: the other ranks are still mid-generation
        if finish is not None:
            cur.it.close()
            self.cur = None
            emit(Done(id=cur.req.id, finish_reason=str(finish), prompt_tokens=cur.prompt_tokens,
                      completion_tokens=int(r.generation_tokens), stop_sequence=cur.out.stop_sequence))
            if not self.queue:
                mx.clear_cache()

    def _drop(self, cur: _Current) -> None:
        assert self.chan is not None
        self.chan.send(STOP)
        cur.it.close()
        self.cur = None

    def _fail_all(self, emit: Emit, why: str) -> None:
        jobs = ([self.cur.req] if self.cur is not None and not self.cur.cancelled else []) \
            + [job for job, _ in self.queue]
        self.cur = None
        self.queue.clear()
        for job in jobs:
            emit(Error(id=job.id, message=f"the sharded group failed: {why}", status=500,
                       code="worker_crashed"))

    # ---------------------------------------------------------------- housekeeping

    def memory(self) -> Memory:
        """Rank 0's MLX figures; ``rss`` is the sum over the ranks on this machine (a sibling
        rank, started by the same launcher, is measured by its pid)."""
        active, cache = mx.get_active_memory(), mx.get_cache_memory()
        launcher = os.getppid()
        ranks: list[RankInfo] = []
        total = 0
        for r, (pid, loaded) in enumerate(self.peers):
            host = self.spec.hosts[r] if r < len(self.spec.hosts) else "?"
            nbytes, local = 0, False
            try:
                proc = psutil.Process(pid)
                if pid == os.getpid() or proc.ppid() == launcher:
                    local = True
                    rss = proc.memory_info().rss
                    nbytes = max(rss, active + cache if r == 0 else loaded)
            except psutil.Error:
                pass
            total += nbytes
            ranks.append(RankInfo(rank=r, host=host, pid=pid, bytes=nbytes, local=local))
        self.ranks = ranks
        return Memory(active=active, cache=cache, peak=mx.get_peak_memory(), rss=total)

    def close(self) -> None:
        if self.chan is not None:
            with contextlib.suppress(GroupLost):
                self.chan.send(SHUTDOWN)
            # Leaving at once could reset the sockets before the others read SHUTDOWN.
            peers = [r.pid for r in self.ranks if r.local and r.pid != os.getpid()]
            with contextlib.suppress(psutil.Error):
                psutil.wait_procs([psutil.Process(pid) for pid in peers if psutil.pid_exists(pid)],
                                  timeout=2.0)
        self.chan = None
        self.model = self.tokenizer = None
        mx.clear_cache()


# -------------------------------------------------------------------- ranks other than 0


def follower_main(path: str, spec: ShardSpec) -> int:
    """A rank other than 0: form, load, then do what rank 0 broadcasts until SHUTDOWN."""
    rank = env_rank()
    try:
        group = form_group(spec)
        model, tokenizer, config = load_shard(path, spec, group)
        gather_ranks(group)
    except BaseException as e:  # noqa: BLE001 - any failure ends this rank, and so the group
        log.error("rank %d: load failed: %s: %s", rank, type(e).__name__, e)
        return _exit(EXIT_LOAD_FAILED)
    log.info("rank %d: loaded; following rank 0", rank)
    chan = Channel(group)
    grammars = Grammars.of_lm(tokenizer, vocab_size(config, tokenizer))
    it: Any = None
    try:
        while True:
            code, payload = chan.recv()
            if code == SHUTDOWN:
                log.info("rank %d: shutdown", rank)
                return _exit(0)
            if code == JOB:
                job = decode_to_worker(payload)
                if not isinstance(job, Generate):
                    raise GroupLost(f"expected a Generate, got {type(job).__name__}")
                it = start_generation(model, tokenizer, job, grammars)
            elif code == STOP:
                if it is not None:
                    it.close()
                it = None
            elif code == STEP:
                if it is None:
                    raise GroupLost("STEP without a running generation")
                if next(it).finish_reason is not None:
                    it.close()
                    it = None
            else:
                raise GroupLost(f"unknown command {code}")
    except BaseException as e:  # noqa: BLE001 - the group is broken: this rank ends
        log.error("rank %d: leaving the group: %s: %s", rank, type(e).__name__, e)
        return _exit(1)


def _exit(code: int) -> int:
    """Leave without interpreter shutdown (the ring backend's threads are still running)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
