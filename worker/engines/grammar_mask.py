"""Masks for grammar rows: llguidance's matchers take each row's last token and fill one
bitmask for the batch, which one op applies to the logits (the Metal kernel where present, else
``mx.where``). The matchers run on a helper thread while the MLX thread starts the forward pass
(:func:`masked`); the solo path and the batch (:mod:`lm_batch`) both mask here."""

from __future__ import annotations

import logging
import threading
from queue import Empty, SimpleQueue
from typing import TYPE_CHECKING, Any

import mlx.core as mx
import numpy as np

if TYPE_CHECKING:
    from mlx_supervisor.worker.engines.grammar import GrammarProcessor

log = logging.getLogger("mlx_supervisor.worker")

_METAL = mx.metal.is_available()


def masked(rows: list[tuple[int, GrammarProcessor]], last: mx.array, logits: mx.array
           ) -> mx.array:
    """``logits`` (the step's forward pass, not yet run) masked for ``rows``, whose matchers
    first take ``last`` (the tokens sampled the step before).

    Once the tokens are known, llguidance consumes and masks on a helper thread while this one
    starts the forward pass: on the CPU backend ``async_eval`` returns only near the end of the
    graph, with the GIL released. (bench/RESULTS.md, run 8: 16 rows' steps took 1.5x as long
    before.)"""
    return masked_with(rows, last, logits)


def masked_with(rows: list[tuple[int, GrammarProcessor]], last: mx.array, logits: mx.array
                ) -> mx.array:
    """The matchers take ``last`` and mask on the helper thread while this one runs
    ``async_eval(logits)``; then the mask is applied.

    The helper waits on its own array (``stop_gradient`` of ``last``, scheduled here), never on
    ``last``: ``last`` is an input of the forward pass, and waiting on an array rewrites its
    event and status while this thread's ``async_eval`` walks the graph that holds it (the
    likely cause of a worker's SIGSEGV seen once under load). Its own evaluation is queued
    first, so it does not wait for the whole pass either."""
    mine = mx.stop_gradient(last)
    mx.async_eval(mine)
    helper = _helper()
    helper.start(rows, mine, logits.shape[0], logits.shape[-1])
    try:
        mx.async_eval(logits)
    finally:
        ok = helper.result()  # always collected: the next step must not read this one
    if isinstance(ok, np.ndarray):  # not unpacked on the helper (a GPU's arrays stay here)
        ok = allowed(ok, logits.shape[-1])
    return logits if ok is None else apply_allowed(logits, ok)


class _Helper:
    """The thread that reads a step's last tokens and runs the matchers while the MLX thread
    sits in ``async_eval`` (one per process, one job at a time). Two C queues and no futures:
    right after handing its result back the thread blocks again. (A ThreadPoolExecutor's
    worker went on running Python for tens of µs after setting a result, holding the GIL the
    MLX thread needed right then: bench/RESULTS.md, run 10.)"""

    def __init__(self) -> None:
        self.jobs: SimpleQueue[tuple[list[tuple[int, GrammarProcessor]], mx.array, int, int]]
        self.jobs = SimpleQueue()
        self.done: SimpleQueue[tuple[Any, BaseException | None]] = SimpleQueue()
        self.taken = 0  # jobs done on the MLX thread after all (:meth:`result`)
        threading.Thread(target=self._run, name="grammar", daemon=True).start()

    def _run(self) -> None:
        get, put, work = self.jobs.get, self.done.put, self._work
        while True:
            put(work(get()))

    @staticmethod
    def _work(job: tuple[list[tuple[int, GrammarProcessor]], mx.array, int, int]
              ) -> tuple[Any, BaseException | None]:
        rows, last, n_rows, n = job
        try:
            tokens: Any = last.tolist()  # already scheduled: this only waits for its event
            out: Any = mask_rows(rows, tokens, n_rows)
            if out is not None and mx.default_device() == mx.cpu:
                out = allowed(out, n)
            return out, None
        except BaseException as e:  # noqa: BLE001 - raised on the MLX thread instead
            return None, e

    def start(self, rows: list[tuple[int, GrammarProcessor]], last: mx.array, n_rows: int,
              n: int) -> None:
        self.jobs.put((rows, last, n_rows, n))

    def result(self) -> Any:
        """The mask as :func:`allowed` makes it (on the CPU backend), else the bitmask, or
        None (no row masks yet). A job the helper has not picked up yet (on a box with no
        core free for it) is taken back and done here: waiting for the helper to be scheduled
        would cost more than the work."""
        try:
            job = self.jobs.get_nowait()
        except Empty:
            ok, err = self.done.get()
        else:
            self.taken += 1
            ok, err = self._work(job)
        if err is not None:
            raise err
        return ok


_HELPER: _Helper | None = None


def _helper() -> _Helper:
    global _HELPER
    if _HELPER is None:
        _HELPER = _Helper()
    return _HELPER


def mask_rows(rows: list[tuple[int, GrammarProcessor]], last: list[int],
              n_rows: int) -> np.ndarray | None:
    """Feed each grammar row (batch index, processor) its last token and return the batch's
    llguidance bitmask (rows without a grammar allow everything), or None if no row masks yet.
    Several rows go to llguidance's executor in one call each step; a single row is served on
    this thread (the executor's hand-off costs more than one row's mask: ~30 vs ~8 µs here)."""
    from llguidance.numpy import allocate_token_bitmask

    if n_rows == 1 and len(rows) == 1:
        return _mask_one(rows[0][1], last[0])
    eat = [(g, t) for e, g in rows if (t := g.to_consume(last[e])) is not None]
    for (g, t), ok in zip(eat, _consume(eat), strict=True):
        if not ok:
            log.warning("grammar refused token %d: %s", t, g.matcher.get_error())
    masking = [(e, g) for e, g in rows if not g.idle()]
    if not masking:
        return None
    bitmask = allocate_token_bitmask(n_rows, masking[0][1].n_vocab)
    live = []
    for e, g in masking:
        if g.matcher.is_stopped() or g.matcher.is_error():
            bitmask[e] = g.eos_words  # done or failed: only EOS, so the request ends
        else:
            live.append((g.matcher, e))
    _fill(live, bitmask)
    return bitmask


def _mask_one(g: GrammarProcessor, last: int) -> np.ndarray | None:
    """:func:`mask_rows` for a batch of one (the solo path): the same steps without the lists,
    into one buffer per request (every mask is copied into MLX before the next is filled)."""
    from llguidance.numpy import allocate_token_bitmask, fill_next_token_bitmask

    t, m = g.to_consume(last), g.matcher  # in this order: a lazy call's next call has a new one
    if t is not None and not m.consume_token(t):
        log.warning("grammar refused token %d: %s", t, m.get_error())
    if g.idle():
        return None
    if g.buffer is None:
        g.buffer = allocate_token_bitmask(1, g.n_vocab)
    if m.is_stopped() or m.is_error():
        g.buffer[0] = g.eos_words  # done or failed: only EOS, so the request ends
    else:
        fill_next_token_bitmask(m, g.buffer, 0)
    return g.buffer


def _consume(eat: list[tuple[GrammarProcessor, int]]) -> list[bool]:
    if len(eat) == 1:
        g, t = eat[0]
        return [bool(g.matcher.consume_token(t))]
    if not eat:
        return []
    from llguidance.numpy import consume_token_par

    return list(consume_token_par(_executor(), [(g.matcher, t) for g, t in eat]))


def _fill(live: list[tuple[Any, int]], bitmask: np.ndarray) -> None:
    from llguidance.numpy import fill_next_token_bitmask, fill_next_token_bitmask_par

    if len(live) == 1:
        fill_next_token_bitmask(live[0][0], bitmask, live[0][1])
    elif live:
        fill_next_token_bitmask_par(_executor(), live, bitmask)


_EXECUTOR: Any = None


def _executor() -> Any:
    """llguidance's thread pool for a batch's matchers (one per process)."""
    global _EXECUTOR
    if _EXECUTOR is None:
        from llguidance import LLExecutor

        _EXECUTOR = LLExecutor()
    return _EXECUTOR


def words(n_vocab: int) -> int:
    """32-bit words in a mask over ``n_vocab`` tokens."""
    return (n_vocab + 31) // 32


def apply_mask(logits: mx.array, bitmask: np.ndarray) -> mx.array:
    """``logits`` (rows x vocab, or rows x 1 x vocab) with every token that ``bitmask``'s row
    (llguidance's int32 bit words) forbids at -inf: one op for the whole batch."""
    return apply_allowed(logits, allowed(bitmask, logits.shape[-1]))


def allowed(bitmask: np.ndarray, n: int) -> Any:
    """``bitmask`` as :func:`apply_allowed` takes it for ``n`` logits: the bit words for the
    Metal kernel, else the tokens allowed as a bool array (unpacked and copied into MLX; on the
    hot path on the helper thread, off the MLX thread's way)."""
    if _METAL:
        return bitmask
    # count pads with zeros: tokens beyond llguidance's vocabulary are never allowed
    bits = np.unpackbits(bitmask.view(np.uint8), axis=1, count=n, bitorder="little")
    return mx.array(bits.view(np.bool_))


def apply_allowed(logits: mx.array, ok: Any) -> mx.array:
    """:func:`apply_mask` for a mask made by :func:`allowed`."""
    shape = logits.shape
    flat = logits if logits.ndim == 2 else logits.reshape(shape[0], shape[-1])
    if _METAL:
        from llguidance.mlx import apply_token_bitmask

        out = apply_token_bitmask(flat, ok)
    else:
        out = mx.where(ok, flat, -mx.inf)
    return out if logits.ndim == 2 else out.reshape(shape)
