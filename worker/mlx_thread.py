"""The dedicated MLX thread: owns the engine; every load, generate and free runs here.

MLX streams are per thread, so the model must live and die on one thread. The thread takes
work from ``inbox`` (a ``queue.Queue`` of protocol messages the io thread decoded) and hands
messages back over an inproc PUSH socket that it alone owns; the io thread polls the matching
PULL together with the gateway's DEALER, so a token reaches the wire without a polling delay.

Frames on the PUSH socket: one frame = an encoded message to forward as is; two frames
``[b"exit", b"<code>"]`` = the io thread should exit with that code (after a load failure or
once a shutdown has been handled).
"""

from __future__ import annotations

import gc
import logging
import os
import queue
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

import psutil
import zmq

from mlx_supervisor.shared.protocol import (
    EXIT_LOAD_FAILED,
    Cancel,
    Chunk,
    Done,
    Embed,
    Embeddings,
    Error,
    FromWorker,
    Generate,
    Load,
    LoadFailed,
    Memory,
    Pause,
    Ready,
    Resume,
    Shutdown,
    Unload,
    Unloaded,
    encode,
)
from mlx_supervisor.worker.engines import make_engine
from mlx_supervisor.worker.engines.base import Engine

log = logging.getLogger("mlx_supervisor.worker")

SNAPSHOT_EVERY = 0.2  # seconds between memory readings while decoding


class MLXThread(threading.Thread):
    """Runs the engine. Public, thread-safe surface: ``inbox.put(msg)``, ``snapshot``,
    ``inflight_count``, ``queued_count``."""

    def __init__(self, zctx: zmq.Context, out_addr: str, on_model_id=None,
                 endpoint: str | None = None, data_id: bytes | None = None) -> None:
        super().__init__(name="mlx", daemon=True)
        self.zctx = zctx
        self.out_addr = out_addr
        self.endpoint = endpoint
        self.data_id = data_id
        self._data: zmq.Socket | None = None
        self.inbox: queue.Queue = queue.Queue()
        self.snapshot = Memory()
        """Latest MLX memory reading, replaced whole (an atomic reference swap)."""
        self.inflight: set[str] = set()
        self.engine: Engine | None = None
        self.on_model_id = on_model_id
        self._push: zmq.Socket | None = None
        self._last_snapshot = 0.0
        self.held: dict[str, list[FromWorker]] = {}
        """Paused requests (flow control) whose engine cannot pause: their output, merged."""

    @property
    def inflight_count(self) -> int:
        return len(self.inflight)

    @property
    def queued_count(self) -> int:
        return self.inbox.qsize()

    # ------------------------------------------------------------ thread side

    def emit(self, msg: FromWorker) -> None:
        """Send one message to the gateway (MLX thread only)."""
        held = self.held.get(getattr(msg, "id", ""))
        if held is not None and not isinstance(msg, Error):
            _hold(held, msg)
            return
        if held is not None:  # an error ends the request now: what was held is moot
            del self.held[msg.id]
        if isinstance(msg, Done | Error | Embeddings):
            self.inflight.discard(msg.id)
            if isinstance(msg, Done):
                log.info("%s done finish=%s prompt=%d completion=%d cached=%d", msg.id,
                         msg.finish_reason, msg.prompt_tokens, msg.completion_tokens,
                         msg.cached_tokens)
            elif isinstance(msg, Error):
                log.info("%s error status=%d code=%s: %s", msg.id, msg.status, msg.code,
                         msg.message)
            else:
                log.info("%s embeddings n=%d dims=%d", msg.id, len(msg.vectors), msg.dims)
        assert self._push is not None
        # Per-request replies go straight to the gateway; lifecycle messages (Ready,
        # LoadFailed) go through the io thread, which decides when the process ends.
        sock = self._data if self._data is not None and hasattr(msg, "id") else self._push
        sock.send(encode(msg))

    def _exit(self, code: int) -> None:
        assert self._push is not None
        self._push.send_multipart([b"exit", str(code).encode()])

    def _publish(self, force: bool = False) -> None:
        now = time.monotonic()
        if self.engine is not None and (force or now - self._last_snapshot >= SNAPSHOT_EVERY):
            try:
                self.snapshot = self.engine.memory()
            except Exception:  # a reading must never take the worker down
                log.exception("memory reading failed")
            self._last_snapshot = now

    def run(self) -> None:
        self._push = self.zctx.socket(zmq.PUSH)
        self._push.setsockopt(zmq.LINGER, 0)
        self._push.connect(self.out_addr)
        if self.endpoint is not None and self.data_id is not None:
            self._data = self.zctx.socket(zmq.DEALER)
            self._data.setsockopt(zmq.IDENTITY, self.data_id)
            self._data.setsockopt(zmq.LINGER, 500)  # flush the last replies before exit
            self._data.connect(self.endpoint)
        try:
            self._run()
        except Exception:
            log.critical("MLX thread died:\n%s", traceback.format_exc())
            for rid in list(self.inflight):
                self.emit(Error(id=rid, message="worker MLX thread died", status=500))
            self._exit(1)
        finally:
            if self._data is not None:
                self._data.close()
            self._push.close()

    def _run(self) -> None:
        """Wait for a model, serve it; after an ``Unload`` wait for the next one (recycled)."""
        while True:
            msg, early = self._wait_for_load()
            if isinstance(msg, Shutdown):
                for m in early:
                    if isinstance(m, Generate | Embed):
                        self.emit(Error(id=m.id, message="the worker is shutting down",
                                        status=503, code="worker_shutdown"))
                self._exit(0)
                return
            if not self._load(msg):
                return
            assert self.engine is not None
            for m in early:
                self._handle(self.engine, m)
            if not self._serve():
                return

    def _wait_for_load(self) -> tuple[Load | Shutdown, list[object]]:
        early: list[object] = []  # requests before any model (a spare without Load) wait for it
        msg = self.inbox.get()
        while not isinstance(msg, Load | Shutdown):
            if not isinstance(msg, Unload):  # already unloaded: nothing to drop
                early.append(msg)
            msg = self.inbox.get()
        return msg, early

    def _load(self, msg: Load) -> bool:
        if self.on_model_id is not None:
            self.on_model_id(msg.model_id)
        log.info("loading %s kind=%s from %s", msg.model_id, msg.kind, msg.path or "(no path)")
        t0 = time.monotonic()
        # What exists now (the imports, the io machinery) outlives every model: out of the
        # collector's sight, the collection in ``_unload`` scans only what a model made.
        gc.freeze()
        try:
            if msg.kind != "fake" and not (msg.path and Path(msg.path).exists()):
                # fail before the engine's imports: seconds sooner for a wrong path
                raise FileNotFoundError(f"model path {msg.path!r} does not exist")
            self.engine = make_engine(msg.kind, context_length=msg.context_length)
            info = self.engine.load(msg.path, msg.model_id)
        except BaseException as e:  # noqa: BLE001 - anything at all is a load failure
            reason = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
            reason = f"loading {msg.model_id} from {msg.path or '(no path)'} failed: {reason}"
            log.error("%s\n%s", reason, traceback.format_exc())
            self.emit(LoadFailed(reason=reason))
            self._exit(EXIT_LOAD_FAILED)
            return False
        seconds = time.monotonic() - t0
        self._publish(force=True)
        log.info("ready in %.2fs context_length=%d", seconds, info.context_length)
        mem = self.snapshot
        try:
            rss = psutil.Process().memory_info().rss
        except psutil.Error:
            rss = 0
        self.emit(Ready(pid=os.getpid(), kind=info.kind, load_seconds=seconds,
                        memory=Memory(active=mem.active, cache=mem.cache, peak=mem.peak,
                                      rss=max(rss, mem.rss)),
                        context_length=info.context_length,
                        embedding_dims=info.embedding_dims,
                        ranks=info.ranks))
        return True

    def _serve(self) -> bool:
        """Serve until ``Shutdown`` (False: the process ends) or ``Unload`` (True)."""
        engine = self.engine
        assert engine is not None
        while True:
            busy = engine.has_work()
            if not busy:
                self._publish(force=True)  # fresh figures before going idle
            try:
                msg = self.inbox.get_nowait() if busy else self.inbox.get(timeout=0.5)
            except queue.Empty:
                msg = None
            if msg is not None:
                if isinstance(msg, Shutdown):
                    self._shutdown(engine, msg.reason)
                    return False
                if isinstance(msg, Unload):
                    del engine
                    self._unload(msg.reason)
                    return True
                self._handle(engine, msg)
                continue  # drain the inbox before the next step: cancels land in time
            if busy:
                try:
                    engine.step(self.emit)
                except Exception:
                    log.error("engine step failed:\n%s", traceback.format_exc())
                    for rid in list(self.inflight):
                        self.emit(Error(id=rid, message="internal error during generation",
                                        status=500))
                        self._cancel_quietly(engine, rid)
                self._publish()

    def _handle(self, engine: Engine, msg: object) -> None:
        if isinstance(msg, Generate | Embed):
            log.info("%s received %s", msg.id, type(msg).__name__.lower())
            self.inflight.add(msg.id)
            try:
                engine.submit(msg, self.emit)
            except Exception:
                log.error("%s submit failed:\n%s", msg.id, traceback.format_exc())
                self._cancel_quietly(engine, msg.id)
                self.emit(Error(id=msg.id, message="internal error while starting the request",
                                status=500))
        elif isinstance(msg, Cancel):
            if msg.id in self.inflight:
                log.info("%s cancelled", msg.id)
                self.inflight.discard(msg.id)
                self.held.pop(msg.id, None)
                self._cancel_quietly(engine, msg.id)
        elif isinstance(msg, Pause | Resume):
            self._flow(engine, msg)
        elif isinstance(msg, Load):
            log.warning("ignoring Load for %s: a model is already loaded", msg.model_id)

    def _flow(self, engine: Engine, msg: Pause | Resume) -> None:
        """The gateway's reader of a request fell behind (Pause) or caught up (Resume). The
        engine takes the sequence out of its steps (``Engine.pause``), or, where it answers
        False, the output is held here, merged into as few chunks as possible, and sent on
        Resume."""
        if msg.id not in self.inflight:
            return
        if isinstance(msg, Pause):
            if not engine.pause(msg.id):
                self.held.setdefault(msg.id, [])
            return
        engine.resume(msg.id)
        for m in self.held.pop(msg.id, []):
            self.emit(m)

    def _cancel_quietly(self, engine: Engine, rid: str) -> None:
        try:
            engine.cancel(rid)
        except Exception:
            log.exception("%s cancel failed", rid)

    def _unload(self, reason: str) -> None:
        """Drop the model and everything it holds, then measure what the process keeps: the
        gateway charges that and decides whether this process may take another model."""
        t0 = time.monotonic()
        engine, self.engine = self.engine, None
        log.info("unloading%s; %d in flight", f" ({reason})" if reason else "", len(self.inflight))
        for rid in list(self.inflight):  # the gateway unloads only idle workers; be safe anyway
            assert engine is not None
            self._cancel_quietly(engine, rid)
            self.emit(Error(id=rid, message="the worker unloaded its model", status=503,
                            code="worker_shutdown"))
        self.held.clear()
        if engine is not None:
            engine.close()  # an exception here ends the thread: the process exits, a crash
        del engine
        gc.collect()  # weights are freed only once the engine's cycles are gone
        mx = sys.modules.get("mlx.core")
        if mx is not None:
            mx.clear_cache()
        self.snapshot = mem = _process_memory(mx)
        if self.on_model_id is not None:
            self.on_model_id("spare")
        seconds = time.monotonic() - t0
        log.info("unloaded in %.3fs; holding %d bytes", seconds, mem.footprint)
        self.emit(Unloaded(memory=mem, unload_seconds=seconds))

    def _shutdown(self, engine: Engine, reason: str) -> None:
        log.info("shutdown requested%s; %d in flight", f" ({reason})" if reason else "",
                 len(self.inflight))
        for rid in list(self.inflight):
            self._cancel_quietly(engine, rid)
            self.emit(Error(id=rid, message="the worker is shutting down", status=503,
                            code="worker_shutdown"))
        try:
            engine.close()
        except Exception:
            log.exception("engine close failed")
        self._exit(0)


def _process_memory(mx: Any) -> Memory:
    """MLX's figures (when MLX is imported) and the process RSS, with no engine."""
    try:
        rss = psutil.Process().memory_info().rss
    except psutil.Error:
        rss = 0
    if mx is None:
        return Memory(rss=rss)
    return Memory(active=mx.get_active_memory(), cache=mx.get_cache_memory(),
                  peak=mx.get_peak_memory(), rss=rss)


def _hold(held: list[FromWorker], msg: FromWorker) -> None:
    """Keep a paused request's output: consecutive chunks become one (text is small; it is the
    per-message overhead that would grow)."""
    last = held[-1] if held else None
    if isinstance(msg, Chunk) and isinstance(last, Chunk):
        lps = (last.logprobs or []) + (msg.logprobs or []) if last.logprobs or msg.logprobs else None
        held[-1] = Chunk(id=msg.id, text=last.text + msg.text, tokens=last.tokens + msg.tokens,
                         logprobs=lps, reasoning=last.reasoning + msg.reasoning,
                         tool_calls=last.tool_calls + msg.tool_calls)
    else:
        held.append(msg)
