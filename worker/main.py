"""Worker process entry: argument parsing and the io thread's loop.

``python -m mlx_supervisor.worker --model-id ID --kind {lm,vlm,embeddings,fake}
--endpoint ipc:///path.sock --worker-id WID [--path DIR] [--spare] [--heartbeat-interval 1.0]
[--gateway-timeout 30] [--context-length N]``

Messages: ``Hello`` first; then ``Ready`` or ``LoadFailed`` (exit 3); a spare (``--spare``:
imports done, no model) waits for ``Load`` first. Requests get ``Started``, ``Chunk``s and one
``Done`` or ``Error``. After ``Cancel`` nothing more is sent for that id (chunks already in the
pipe may still arrive; a request that had finished has had its Done). ``Shutdown`` answers each
request in flight with ``Error(503, "worker_shutdown")`` and exits 0; if the MLX thread is stuck
in one long step for ``SHUTDOWN_GRACE`` s, the process exits 0 without those replies and the
gateway ends the requests itself (``transport.fail_worker``). ``Ping`` only counts as
gateway liveness. ``Heartbeat`` every ``--heartbeat-interval`` s, whatever the MLX thread does.

The io (main) thread alone touches the gateway's lifecycle DEALER: it forwards what the MLX thread
pushes (Ready, LoadFailed; per-request replies leave on the MLX thread's own data DEALER), queues what the gateway sends, sends heartbeats on time even while the MLX thread is
busy loading or decoding, and decides when the process ends. Exit codes: 0 after Shutdown,
``EXIT_LOAD_FAILED`` (3) after a failed load, ``EXIT_PARENT_GONE`` (4) when the gateway went away
(re-parented, or silent for ``--gateway-timeout`` s), 2 from argparse (bad arguments).
"""

from __future__ import annotations

import argparse
import faulthandler
import logging
import os
import sys
import threading
import time

import msgspec
import psutil
import zmq

from mlx_supervisor.shared.protocol import (
    DATA_SUFFIX,
    EXIT_PARENT_GONE,
    PROTOCOL_VERSION,
    Heartbeat,
    Hello,
    Load,
    Memory,
    Ping,
    Shutdown,
    decode_to_worker,
    encode,
)
from mlx_supervisor.worker import process_guard
from mlx_supervisor.worker.engines import KINDS, preload
from mlx_supervisor.worker.mlx_thread import MLXThread

log = logging.getLogger("mlx_supervisor.worker")

OUT_ADDR = "inproc://mlx-out"
SHUTDOWN_GRACE = 2.0  # seconds the MLX thread gets to finish its current step on Shutdown
EXIT_BACKSTOP = 1.0  # seconds for socket teardown before we exit regardless
REPARENT_TIMEOUT = 5.0  # seconds a forked worker waits to become the gateway's child
BURST = 256  # messages moved per socket per loop turn


class _Prefix(logging.Formatter):
    """One line per event: ``time model_id[pid] LEVEL message``; the model id can change
    (a spare learns it from Load)."""

    def __init__(self, model_id: str) -> None:
        super().__init__()
        self.model_id = model_id

    def format(self, record: logging.LogRecord) -> str:
        msg = record.getMessage()
        if record.exc_info:
            msg += "\n" + self.formatException(record.exc_info)
        ts = time.strftime("%H:%M:%S", time.localtime(record.created))
        return f"{ts}.{int(record.msecs):03d} {self.model_id}[{os.getpid()}] " \
               f"{record.levelname} {msg}"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m mlx_supervisor.worker",
                                 description="One model per process, driven over ZeroMQ.")
    ap.add_argument("--model-id", default=None, help="required unless --spare")
    ap.add_argument("--kind", choices=KINDS, default=None,
                    help="required unless --spare (a spare preloads this kind's imports; "
                         "default lm)")
    ap.add_argument("--endpoint", required=True, help="the gateway ROUTER, e.g. ipc:///x.sock")
    ap.add_argument("--worker-id", required=True, help="DEALER routing id")
    ap.add_argument("--path", default="", help="model directory")
    ap.add_argument("--spare", action="store_true",
                    help="import now, load on the gateway's Load message")
    ap.add_argument("--heartbeat-interval", type=float, default=1.0)
    ap.add_argument("--gateway-timeout", type=float, default=30.0)
    ap.add_argument("--context-length", type=int, default=0, help="0: the model's own")
    ap.add_argument("--log-level", default="INFO")
    shard = ap.add_argument_group("sharded groups (mlx.distributed; started by mlx.launch)")
    shard.add_argument("--ranks", type=int, default=1, help="ranks in the group; 1: not sharded")
    shard.add_argument("--hosts", default="", help="comma-separated host of each rank")
    shard.add_argument("--dist-backend", default="ring", help="mx.distributed backend")
    shard.add_argument("--parallel", choices=("tensor", "pipeline"), default="tensor")
    shard.add_argument("--formation-timeout", type=float, default=30.0)
    args = ap.parse_args(argv)
    if not args.spare and (args.model_id is None or args.kind is None):
        ap.error("--model-id and --kind are required unless --spare")
    if args.heartbeat_interval <= 0 or args.gateway_timeout <= 0:
        ap.error("--heartbeat-interval and --gateway-timeout must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    # A crash in MLX, llguidance or a tokenizer then leaves every thread's Python stack in the
    # worker's stderr, which the gateway logs (`mlx-supervisor ps` shows its tail).
    faulthandler.enable()
    args = parse_args(argv)
    process_guard.set_parent_death_signal()
    parent = process_guard.ParentWatch()

    fmt = _Prefix(args.model_id or "spare")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(fmt)
    log.addHandler(handler)
    log.setLevel(args.log_level.upper())
    log.propagate = False

    def set_model_id(model_id: str) -> None:
        fmt.model_id = model_id

    if args.ranks > 1:  # a sharded group: see engines/sharded.py
        from mlx_supervisor.worker import engines, sharding
        spec = sharding.ShardSpec.from_args(args)
        if sharding.env_rank() != 0:  # followers never talk to the gateway
            from mlx_supervisor.worker.engines.shard_group import follower_main

            fmt.model_id = f"{args.model_id}/rank{sharding.env_rank()}"
            return follower_main(args.path, spec)
        engines.use_sharding(spec)

    if args.spare:
        t0 = time.monotonic()
        preload(args.kind or "lm")
        log.info("spare: imports for %s done in %.2fs", args.kind or "lm", time.monotonic() - t0)

    # The model loads from here on, while the gateway's DEALER connects and says Hello (the
    # Ready it may push waits for the io loop, so it always follows the Hello).
    zctx = zmq.Context()
    pull = zctx.socket(zmq.PULL)
    pull.setsockopt(zmq.LINGER, 0)
    pull.bind(OUT_ADDR)
    mlx = MLXThread(zctx, OUT_ADDR, on_model_id=set_model_id, endpoint=args.endpoint,
                    data_id=args.worker_id.encode() + DATA_SUFFIX)
    if not args.spare:
        mlx.inbox.put(Load(model_id=args.model_id, path=args.path, kind=args.kind,
                           context_length=args.context_length))
    mlx.start()

    dealer = zctx.socket(zmq.DEALER)
    dealer.setsockopt(zmq.IDENTITY, args.worker_id.encode())
    dealer.setsockopt(zmq.LINGER, 500)
    dealer.connect(args.endpoint)
    dealer.send(encode(Hello(pid=os.getpid(), protocol=PROTOCOL_VERSION)))
    log.info("hello sent to %s as %s", args.endpoint, args.worker_id)

    process_guard.settle(REPARENT_TIMEOUT)  # a forked worker: the gateway's child from here on
    code = _loop(args, dealer, pull, mlx, parent)
    _teardown(zctx, dealer, pull, mlx, code)
    return code  # not reached: _teardown exits


def _loop(args: argparse.Namespace, dealer: zmq.Socket, pull: zmq.Socket, mlx: MLXThread,
          parent: process_guard.ParentWatch) -> int:
    proc = psutil.Process()
    poller = zmq.Poller()
    poller.register(dealer, zmq.POLLIN)
    poller.register(pull, zmq.POLLIN)
    now = time.monotonic()
    last_heard = now
    next_beat = now + args.heartbeat_interval
    shutdown_deadline: float | None = None

    while True:
        if process_guard.hang_requested.is_set():
            log.warning("hanging on purpose (fake engine)")
            while True:
                time.sleep(3600)
        wait = max(0.0, min(next_beat - time.monotonic(), 0.5))
        events = dict(poller.poll(int(wait * 1000)))
        if pull in events:
            code = _forward(pull, dealer, BURST)  # bounded: a fast stream must not starve beats
            if code is not None:
                return code
        if dealer in events:
            heard, shutdown = _receive(dealer, mlx)
            if heard:
                last_heard = time.monotonic()
            if shutdown and shutdown_deadline is None:
                shutdown_deadline = time.monotonic() + SHUTDOWN_GRACE
        now = time.monotonic()
        if now >= next_beat:
            _heartbeat(dealer, mlx, proc)
            next_beat = now + args.heartbeat_interval
        if shutdown_deadline is not None and now > shutdown_deadline:
            log.warning("MLX thread did not finish within %.1fs of Shutdown; exiting anyway",
                        SHUTDOWN_GRACE)
            return 0
        if now - last_heard > args.gateway_timeout:
            log.error("nothing from the gateway for %.0fs; exiting", args.gateway_timeout)
            return EXIT_PARENT_GONE
        if parent.gone():
            log.error("parent process %d is gone; exiting", parent.original)
            return EXIT_PARENT_GONE
        if not mlx.is_alive():
            code = _forward(pull, dealer, None)  # its last words may still be in the pipe
            if code is not None:
                return code
            log.error("MLX thread ended unexpectedly; exiting")
            return 1


def _receive(dealer: zmq.Socket, mlx: MLXThread) -> tuple[bool, bool]:
    """Hand up to ``BURST`` of the gateway's messages to the MLX thread; returns whether anything
    came (gateway liveness, Ping included) and whether a Shutdown was among them."""
    heard = shutdown = False
    for _ in range(BURST):
        try:
            data = dealer.recv(zmq.NOBLOCK)
        except zmq.Again:
            break
        heard = True
        try:
            msg = decode_to_worker(data)
        except msgspec.DecodeError as e:
            log.warning("dropping undecodable frame (%d bytes): %s", len(data), e)
            continue
        if isinstance(msg, Ping):
            continue
        shutdown = shutdown or isinstance(msg, Shutdown)
        mlx.inbox.put(msg)
    return heard, shutdown


def _heartbeat(dealer: zmq.Socket, mlx: MLXThread, proc: psutil.Process) -> None:
    mem = mlx.snapshot
    try:
        rss = proc.memory_info().rss
    except psutil.Error:
        rss = 0
    dealer.send(encode(Heartbeat(  # a sharded engine's rss is its local ranks' sum
        memory=Memory(active=mem.active, cache=mem.cache, peak=mem.peak,
                      rss=max(rss, mem.rss)),
        inflight=mlx.inflight_count, queued=mlx.queued_count,
        ranks=mlx.engine.ranks if mlx.engine is not None else [])))


def _forward(pull: zmq.Socket, dealer: zmq.Socket, limit: int | None) -> int | None:
    """Move up to ``limit`` (None: all) pushed frames to the gateway; an exit frame stops and
    returns its code."""
    n = 0
    while limit is None or n < limit:
        n += 1
        try:
            frames = pull.recv_multipart(zmq.NOBLOCK)
        except zmq.Again:
            return None
        if len(frames) == 1:
            dealer.send(frames[0])
        else:
            return int(frames[1])
    return None


def _teardown(zctx: zmq.Context, dealer: zmq.Socket, pull: zmq.Socket, mlx: MLXThread,
              code: int) -> None:
    """Flush what is queued for the gateway, then leave with ``os._exit``: interpreter
    shutdown with a daemon thread inside MLX is not worth the risk, and it is slower."""
    log.info("exiting with code %d", code)
    backstop = threading.Timer(EXIT_BACKSTOP, lambda: _hard_exit(code))
    backstop.daemon = True
    backstop.start()
    pull.close()
    dealer.close()  # LINGER bounds the flush of queued messages in term()
    mlx.join(timeout=0.2)
    if not mlx.is_alive():
        zctx.term()
    else:
        time.sleep(0.1)  # give the zmq io thread a moment to write queued frames
    _hard_exit(code)


def _hard_exit(code: int) -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
