"""The sharded group itself (see :mod:`mlx_supervisor.worker.engines.sharded` for rank 0's
engine): forming it, loading each rank's shard, the command channel on which rank 0 drives the
others, the generator every rank steps, and the loop of the ranks other than 0.

Commands from rank 0, each addressed to a *slot* (rank 0's number for one started request):
``JOB`` (a ``Generate`` with prompt ids, the clamped ``max_tokens`` and a seed: every rank
starts the same ``stream_generate`` in that slot), ``STEP`` (every rank takes one token of that
slot's generator), ``STOP`` (every rank drops that slot's generator: a cancel or a stop string)
and ``SHUTDOWN``. Several slots may be live at once (a paused request keeps its generator, and
with it its KV cache, while another runs), but every rank steps them in the order rank 0 says,
so every collective inside the sharded model meets its peers.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np
from mlx_lm.generate import generation_stream, stream_generate
from mlx_lm.sample_utils import make_logits_processors
from mlx_lm.utils import sharded_load

from mlx_supervisor.shared.protocol import EXIT_LOAD_FAILED, Generate, decode_to_worker
from mlx_supervisor.worker.engines.base import vocab_size
from mlx_supervisor.worker.engines.grammar import Grammars
from mlx_supervisor.worker.engines.lm_sampling import sampler_for
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
    """Rank 0 broadcasts ``(code, slot, payload)``; the others receive it. One ``all_sum`` for
    the header (a STEP is nothing more), one for the payload: every other rank contributes
    zeros. Every rank issues the same collectives in the same order on one stream, which is what
    keeps them paired."""

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

    def send(self, code: int, slot: int = 0, payload: bytes = b"") -> None:
        self._sum(mx.array([code, slot, len(payload)], dtype=mx.int32))
        if payload:
            self._sum(mx.array(np.frombuffer(payload, dtype=np.uint8)))

    def recv(self) -> tuple[int, int, bytes]:
        head: Any = self._sum(mx.zeros((3,), dtype=mx.int32)).tolist()
        code, slot, n = int(head[0]), int(head[1]), int(head[2])
        payload = bytes(np.array(self._sum(mx.zeros((n,), dtype=mx.uint8)))) if n else b""
        return code, slot, payload


def start_generation(model: Any, tokenizer: Any, job: Generate, grammars: Grammars) -> Any:
    """The generator every rank steps in lockstep. ``job.seed`` is always set, so every rank
    draws the same tokens (each request from its own key stream, whatever else is stepped in
    between); a grammar is deterministic too, so every rank masks alike."""
    processors = make_logits_processors(job.logit_bias, job.repetition_penalty, 20,
                                        job.presence_penalty, 20, job.frequency_penalty, 20)
    ids = list(job.prompt_ids or [])
    constrained = grammars.processor(job, ids)
    if constrained is not None:
        processors.append(constrained)
    return stream_generate(model, tokenizer, ids, max_tokens=job.max_tokens,
                           sampler=sampler_for(job, grammars.vocab_size),
                           logits_processors=processors)


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
    try:
        follow(chan, lambda job: start_generation(model, tokenizer, job, grammars))
        log.info("rank %d: shutdown", rank)
        return _exit(0)
    except BaseException as e:  # noqa: BLE001 - the group is broken: this rank ends
        log.error("rank %d: leaving the group: %s: %s", rank, type(e).__name__, e)
        return _exit(1)


def follow(chan: Channel, start: Any) -> None:
    """Rank 0's commands, one by one, until SHUTDOWN: each slot's generator is started, stepped
    and dropped exactly as rank 0 does with its own (a paused request's slot simply gets no
    STEP). Raises :class:`GroupLost` on a command that does not fit what this rank holds."""
    live: dict[int, Any] = {}
    try:
        while True:
            code, slot, payload = chan.recv()
            if code == SHUTDOWN:
                return
            if code == JOB:
                job = decode_to_worker(payload)
                if not isinstance(job, Generate) or slot in live:
                    raise GroupLost(f"bad JOB for slot {slot}: {type(job).__name__}")
                live[slot] = start(job)
            elif code == STOP:
                it = live.pop(slot, None)
                if it is not None:
                    it.close()
            elif code == STEP:
                it = live.get(slot)
                if it is None:
                    raise GroupLost(f"STEP for slot {slot}, which is not running")
                if next(it).finish_reason is not None:
                    del live[slot]
                    it.close()
            else:
                raise GroupLost(f"unknown command {code}")
    finally:
        for it in live.values():
            it.close()


def _exit(code: int) -> int:
    """Leave without interpreter shutdown (the ring backend's threads are still running)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
