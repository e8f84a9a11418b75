"""Sharded text generation on ``mlx.distributed``: one logical worker spread over N ranks.

The gateway starts the group with ``mlx.launch`` (see :mod:`group_launch`): every rank runs
``python -m mlx_supervisor.worker ... --ranks N --hosts a,b --parallel tensor|pipeline``.

- **Rank 0** is an ordinary worker to the gateway (DEALER, Hello/Ready/heartbeats): its MLX
  thread runs :class:`ShardedEngine`.
- **The other ranks** never talk to the gateway (:func:`shard_group.follower_main`). They
  receive every command from rank 0 over ``mx.distributed`` (one ``all_sum`` per command, as
  ``_share_object`` in mlx_lm/server.py does) and step the same generators in lockstep, so
  every collective inside the sharded model meets its peers (the group and its commands:
  :mod:`shard_group`).

One request decodes at a time (no ``BatchGenerator``); the others wait in rank 0's queue. Every
rank samples with the same seeded key stream, so every rank feeds the model the same tokens.
Only rank 0 emits.

Flow control, as in the VLM engine: every started request has its own generator (its KV cache
inside it) in its own slot on every rank. ``pause`` takes a request out of turn: rank 0 sends
no STEP for its slot, so no rank decodes it, and the next queued request starts meanwhile (a
client that stopped reading does not hold the group from the others). ``resume`` puts it back
in line and it goes on from the same token: greedy and seeded output (each request has its own
key stream) equals an unpaused run. The oldest unpaused request is the one that decodes. A
cancel while paused drops the slot on every rank.

Formation: with the ring backend ``mx.distributed.init`` blocks for good (holding the GIL)
while a peer is missing, so a real-time timer bounds it (``--formation-timeout``): the rank
ends by SIGALRM and the launcher reports the group that did not form. A lost peer makes the
next collective raise: rank 0 then fails its requests and ends its process
(:class:`GroupLost`), and the gateway kills what is left of the group. No prompt cache across
requests (each request prefills from scratch).
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import random
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import msgspec
import psutil

from mlx_supervisor.shared.protocol import (
    Done,
    Embed,
    Error,
    Generate,
    Memory,
    RankInfo,
    Started,
    encode,
)
from mlx_supervisor.worker.engines.base import (
    Emit,
    LoadInfo,
    Markup,
    Paused,
    TokenStep,
    context_length,
    vocab_size,
)
from mlx_supervisor.worker.engines.grammar import Grammars, initial_state
from mlx_supervisor.worker.engines.lm_prompt import prepare
from mlx_supervisor.worker.engines.lm_sampling import token_logprob
from mlx_supervisor.worker.engines.shard_group import (
    JOB,
    SHUTDOWN,
    STEP,
    STOP,
    Channel,
    GroupLost,
    form_group,
    gather_ranks,
    load_shard,
    start_generation,
)
from mlx_supervisor.worker.sharding import ShardSpec

log = logging.getLogger("mlx_supervisor.worker")


@dataclass
class _Running:
    """A started request: its slot on every rank and rank 0's own generator."""

    req: Generate
    slot: int
    it: Any
    prompt_tokens: int
    out: TokenStep
    completion: int = 0
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
        self.live: dict[str, _Running] = {}  # started, oldest first; paused ones wait here
        self.paused = Paused()
        self._slots = 0
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
        """Queued: forgotten. Started (paused or not): dropped on every rank at the next step
        (a STOP is a collective, so it goes out with the steps, not from here)."""
        for queued in list(self.queue):
            if queued[0].id == request_id:
                self.queue.remove(queued)
        st = self.live.get(request_id)
        if st is not None:
            st.cancelled = True
            self.paused.discard(request_id)

    def pause(self, request_id: str) -> bool:
        """Flow control: no rank decodes this request until ``resume``; its slot (and KV cache)
        waits as it is on every rank."""
        st = self.live.get(request_id)
        self.paused.hold(request_id, None if st is None or st.cancelled else st)
        return True

    def resume(self, request_id: str) -> None:
        self.paused.release(request_id, self.live.get(request_id))

    def has_work(self) -> bool:
        return bool(self.queue) or any(rid not in self.paused for rid in self.live)

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
        """Drop what was cancelled, start the next request if none decodes unpaused, then take
        one token of the oldest unpaused one, on every rank."""
        for st in [s for s in self.live.values() if s.cancelled]:
            self._drop(st)
        active = self.paused.oldest(self.live)
        if active is None and not self.queue:
            return
        st = active if active is not None else self._start(emit)
        assert self.chan is not None
        self.chan.send(STEP, st.slot)
        r = next(st.it)
        eos = r.finish_reason == "stop"
        st.completion = int(r.generation_tokens)
        logprob = None
        if not eos and st.req.logprobs:
            logprob = token_logprob(self.tokenizer, r.logprobs, r.token, st.req.top_logprobs)
        finish = st.out.take(r.text, emit, tokens=0 if eos else 1, logprob=logprob,
                             finish=r.finish_reason, flush=r.finish_reason is not None)
        if finish is None:
            return
        if r.finish_reason is None:
            self._drop(st)  # a stop string: the other ranks are still mid-generation
        else:
            self._forget(st)  # every rank's generator ended with this token
        emit(Done(id=st.req.id, finish_reason=str(finish), prompt_tokens=st.prompt_tokens,
                  completion_tokens=st.completion, stop_sequence=st.out.stop_sequence))

    def _start(self, emit: Emit) -> _Running:
        """The next queued request, in a new slot on every rank."""
        assert self.chan is not None and self.grammars is not None
        job, out = self.queue.popleft()
        self._slots = (self._slots + 1) % 2**31
        self.chan.send(JOB, self._slots, encode(job))
        it = start_generation(self.model, self.tokenizer, job, self.grammars)
        st = self.live[job.id] = _Running(job, self._slots, it, len(job.prompt_ids or []), out)
        log.info("%s started prompt=%d max_tokens=%d", job.id, st.prompt_tokens, job.max_tokens)
        emit(Started(id=job.id, prompt_tokens=st.prompt_tokens))
        return st

    def _drop(self, st: _Running) -> None:
        """Stop a request's generation on every rank (a cancel or a stop string)."""
        assert self.chan is not None
        self.chan.send(STOP, st.slot)
        if st.cancelled:
            log.info("%s dropped on every rank after %d tokens", st.req.id, st.completion)
        self._forget(st)

    def _forget(self, st: _Running) -> None:
        st.it.close()
        self.live.pop(st.req.id, None)
        self.paused.discard(st.req.id)
        if not self.queue and not self.live:
            mx.clear_cache()

    def _fail_all(self, emit: Emit, why: str) -> None:
        jobs = [st.req for st in self.live.values() if not st.cancelled] \
            + [job for job, _ in self.queue]
        self.live.clear()
        self.paused.clear()
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

