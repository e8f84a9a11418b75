"""The zygote: a process that has imported the MLX stack and forks one worker per request.

``python -m mlx_supervisor.worker.zygote --control-fd N [--kinds lm]``. Started by the gateway
like a worker (own session, ``PR_SET_PDEATHSIG``, stderr into the gateway's log); it talks over
one ``SOCK_SEQPACKET`` socket the gateway passed down (``Fork`` in, ``ZygoteHello``, ``Forked``,
``ForkFailed`` out; see ``shared/protocol.py``).

Rules it keeps:

- **Nothing forks after an MLX device, stream or CUDA context exists.** The zygote only
  imports (``preload(..., start_device=False)``): no array is built, nothing is evaluated. The
  first device use is the child's own. On MLX's CUDA backend ``import mlx.core`` itself creates
  a CUDA context, so there the zygote stops short of mlx (**pre-mlx** mode): it imports
  transformers, tokenizers, numpy and the worker's own modules (about 9.5 s on the H200 box,
  where transformers pulls in torch) and each child imports mlx and mlx_lm (0.3-0.5 s).
- **A worker is the gateway's child, not ours.** The zygote forks an intermediate that forks the
  worker and exits; the gateway is a child subreaper (``PR_SET_CHILD_SUBREAPER``), so the
  worker is re-parented to it. The gateway reaps it like any worker, a zygote crash leaves
  every worker running, and the worker's ``PR_SET_PDEATHSIG`` (set once its parent is the
  gateway: ``process_guard.settle``, after its Hello, before it serves) kills it when the
  gateway dies, ``kill -9`` included. The intermediate is forked ahead (``_Middle``), so a
  miss pays one fork, not two.
- **Each worker starts clean**: its own session and process group (``setsid``), its own stderr
  pipe (passed with ``Fork``), stdin/stdout on /dev/null, the environment the gateway gave it,
  the default signal dispositions, a fresh MLX random seed, and its own ZeroMQ context and
  sockets (``worker.main`` makes them; the zygote never has any).

Linux only: on macOS, fork after the Objective-C runtime and Metal frameworks have loaded (which
``import mlx.core`` does) is unsafe, so the gateway never starts a zygote there (see
gateway/supervisor/SUPERVISOR.md).
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import signal
import socket
import sys
import time
import traceback

from mlx_supervisor.shared.protocol import (
    EXIT_PARENT_GONE,
    Fork,
    Forked,
    ForkFailed,
    Shutdown,
    Standby,
    ZygoteHello,
    decode_to_zygote,
    encode,
)
from mlx_supervisor.worker import process_guard

log = logging.getLogger("mlx_supervisor.zygote")
PREFORK_AFTER = 0.2  # seconds after a fork before the next intermediate is forked ahead
FORK_TIMEOUT = 10.0  # seconds an intermediate has to report its worker's pid
# What a first mlx_lm.load of a llama-family model imports lazily (seen with -X importtime):
# imported here once, it is not paid by every forked worker's load.
WARM_MODULES = ("mlx_lm.models.llama", "mlx_lm.models.qwen2", "mlx_lm.models.qwen3",
                "mlx_lm.models.activations", "mlx_lm.models.rope_utils",
                "transformers.image_utils", "transformers.image_transforms",
                "transformers.video_utils")
# Pre-mlx mode: what mlx_lm.load's imports pull in that does not import mlx (module, attribute;
# transformers resolves its names lazily, so the attribute is what imports the code).
PRE_MLX = (("numpy", ""), ("jinja2", ""), ("safetensors", ""), ("tokenizers", ""),
           ("huggingface_hub", ""), ("transformers", "AutoTokenizer"),
           ("transformers", "PreTrainedTokenizerFast"), ("transformers", "AutoConfig"))
PRE_MLX_ENV = "MLX_SUPERVISOR_ZYGOTE_PRE_MLX"  # "1": pre-mlx on any backend (tests), "0": never


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m mlx_supervisor.worker.zygote",
                                 description="Import the MLX stack once; fork workers on request.")
    ap.add_argument("--control-fd", type=int, required=True, help="SOCK_SEQPACKET to the gateway")
    ap.add_argument("--kinds", default="lm", help="comma-separated kinds to import ahead")
    ap.add_argument("--log-level", default="INFO")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    process_guard.set_parent_death_signal()
    parent = process_guard.ParentWatch()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"%(asctime)s zygote[{os.getpid()}] %(levelname)s "
                                           "%(message)s"))
    log.addHandler(handler)
    log.setLevel(args.log_level.upper())
    log.propagate = False

    from mlx_supervisor.worker.engines import preload

    t0 = time.monotonic()
    pre_mlx = _pre_mlx()
    if pre_mlx:
        _import_pre_mlx()
    else:
        for kind in filter(None, args.kinds.split(",")):
            preload(kind, start_device=False)
    # The worker's own modules too (zmq, psutil, msgspec): importing them opens nothing. One
    # parse of a worker's arguments fills argparse's caches (regexes, gettext look-ups) that
    # every forked worker would otherwise fill on its own first parse (2-3 ms of its start).
    from mlx_supervisor.worker.main import parse_args as worker_args

    worker_args(["--spare", "--endpoint", "ipc:///nonexistent", "--worker-id", "warm-up"])

    _import_quietly(tuple(m for m in WARM_MODULES if not (pre_mlx and m.startswith("mlx"))))

    took = time.monotonic() - t0
    # Everything imported so far outlives every fork: out of the collector's sight, a child's
    # collections (and its intermediate's) never write to these objects' gc headers, which
    # would copy their pages (Python's advice for fork without exec).
    gc.freeze()
    threads, cuda = _threads(), _cuda_context()
    ctl = socket.socket(fileno=args.control_fd)
    ctl.send(encode(ZygoteHello(pid=os.getpid(), import_seconds=took, threads=threads,
                                rss=_rss(), cuda=cuda, pre_mlx=pre_mlx)))
    if cuda:
        log.warning("the CUDA driver is loaded after the imports (a CUDA context exists): "
                    "refusing to fork")
    else:
        log.info("imports for %s%s done in %.2fs (%d threads); ready to fork", args.kinds,
                 " (pre-mlx: each child imports mlx)" if pre_mlx else "", took, threads)
    return _serve(ctl, parent, cuda)


def _serve(ctl: socket.socket, parent: process_guard.ParentWatch, cuda: bool) -> int:
    standby: list[_Middle] = []  # the intermediate forked ahead, at most one
    try:
        return _loop(ctl, parent, cuda, standby)
    finally:
        for m in standby:
            m.close()
        _reap_middles(wait=True)  # none is left to the gateway to reap


def _loop(ctl: socket.socket, parent: process_guard.ParentWatch, cuda: bool,
          standby: list[_Middle]) -> int:
    last_fork = -PREFORK_AFTER
    while True:
        _reap_middles()
        due = last_fork + PREFORK_AFTER - time.monotonic()
        if not standby and not cuda and due <= 0:
            standby.append(_Middle(ctl, parent.original))
            ctl.send(encode(Standby(pid=standby[0].pid)))
        ctl.settimeout(1.0 if standby or cuda else max(due, 0.001))
        try:
            data, fds, _flags, _addr = socket.recv_fds(ctl, 1 << 20, 1)
        except TimeoutError:
            if parent.gone():
                log.error("the gateway is gone; exiting")
                return EXIT_PARENT_GONE
            continue
        if not data:
            log.info("control socket closed; exiting")
            return 0
        try:
            msg = decode_to_zygote(data)
        except Exception as e:  # a bad frame is dropped, never fatal
            log.warning("dropping undecodable frame (%d bytes): %s", len(data), e)
            for fd in fds:
                os.close(fd)
            continue
        if isinstance(msg, Shutdown):
            log.info("shutdown requested; exiting")
            return 0
        if not fds or cuda:
            reason = "a CUDA context exists in the zygote" if cuda else "no stderr fd"
            ctl.send(encode(ForkFailed(worker_id=msg.worker_id, reason=reason)))
            for fd in fds:
                os.close(fd)
            continue
        try:
            middle = standby.pop() if standby else _Middle(ctl, parent.original)
            pid = middle.fork(msg, fds[0])
        except Exception as e:
            log.exception("fork for %s failed", msg.worker_id)
            ctl.send(encode(ForkFailed(worker_id=msg.worker_id, reason=f"{type(e).__name__}: {e}")))
            continue
        finally:
            for fd in fds:
                os.close(fd)
        last_fork = time.monotonic()
        ctl.send(encode(Forked(worker_id=msg.worker_id, pid=pid)))
        log.debug("forked %s as pid %d", msg.worker_id, pid)


class _Middle:
    """The intermediate of a double fork, forked ahead (``PREFORK_AFTER`` s after the last
    fork, when the box has gone quiet again): a miss then pays one fork on its path, the
    intermediate's, not two. It holds no socket but its pipe to us, dies with us
    (``PR_SET_PDEATHSIG``), and shares every page with us copy-on-write (its own memory is
    its page tables, 1-2 MB). Given one ``Fork`` (and the stderr fd), it forks the worker,
    writes the worker's pid and exits, so the worker is re-parented to the gateway."""

    def __init__(self, ctl: socket.socket, gateway: int) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        zygote = os.getpid()
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                ours.close()
                ctl.close()  # the worker's Fork arrives on ``theirs``
                process_guard.die_with(zygote)
                _middle(theirs, gateway)
            except BaseException:
                traceback.print_exc()
                code = 1
            finally:
                os._exit(code)
        theirs.close()
        self.pid, self.sock = pid, ours

    def fork(self, msg: Fork, errfd: int) -> int:
        """The worker's pid, read as soon as it is written (the intermediate's exit and reap
        are not waited for)."""
        try:
            socket.send_fds(self.sock, [encode(msg)], [errfd])
            self.sock.settimeout(FORK_TIMEOUT)
            out = self.sock.recv(64)
        finally:
            self.close()
        if not out.strip():
            raise RuntimeError("the intermediate process reported no pid")
        return int(out)

    def close(self) -> None:
        self.sock.close()
        _MIDDLES.add(self.pid)  # it exits on its own (EOF or done): reaped by _reap_middles


def _middle(sock: socket.socket, gateway: int) -> None:
    data, fds, _flags, _addr = socket.recv_fds(sock, 1 << 20, 1)
    if not data or not fds:
        return  # the zygote is closing (EOF) or gave no stderr fd
    msg = decode_to_zygote(data)
    assert isinstance(msg, Fork)
    pid = os.fork()
    if pid == 0:
        sock.close()
        _child(msg, fds[0], gateway)  # never returns
    sock.send(b"%d" % pid)


_MIDDLES: set[int] = set()  # intermediates not reaped yet


def _reap_middles(wait: bool = False) -> None:
    """Reap the intermediates that have exited; ``wait``: all of them, now (they exit within
    milliseconds of their fork or of EOF on their pipe)."""
    for pid in list(_MIDDLES):
        try:
            done, _ = os.waitpid(pid, 0 if wait else os.WNOHANG)
        except ChildProcessError:
            done = pid
        if done:
            _MIDDLES.discard(pid)


def _child(msg: Fork, errfd: int, gateway: int) -> None:
    """The worker, from the fork on: start clean, run worker.main (which becomes the gateway's
    child before it serves)."""
    code = 1
    try:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGCHLD, signal.SIGPIPE):
            signal.signal(sig, signal.SIG_DFL)
        os.setsid()
        os.dup2(errfd, 2)
        os.close(errfd)
        null = os.open(os.devnull, os.O_RDWR)
        os.dup2(null, 0)
        os.dup2(null, 1)
        os.close(null)
        for key in [k for k in os.environ if k not in msg.env]:  # usually the same: a diff
            del os.environ[key]  # is a few putenv calls where clear() + update() is ~60
        for key, value in msg.env.items():
            if os.environ.get(key) != value:
                os.environ[key] = value
        # worker.main settles (becomes the gateway's child, sets the death signal) after its
        # Hello: the intermediate's exit overlaps the start.
        process_guard.settle_later(gateway)
        _reseed()
        sys.argv = ["mlx_supervisor.worker", *msg.argv]
        from mlx_supervisor.worker.main import main as worker_main

        code = worker_main(msg.argv)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 2
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stderr.flush()
        os._exit(code)


def _import_quietly(names: tuple[str, ...]) -> None:
    import importlib

    for name in names:
        try:
            importlib.import_module(name)
        except Exception as e:  # an optional module: the load that needs it will say so
            log.debug("warm import of %s failed: %s", name, e)


def _reseed() -> None:
    """Forked children would share the zygote's random state: each draws its own seeds."""
    import random

    random.seed()
    if "mlx.core" in sys.modules:
        import mlx.core as mx

        mx.random.seed(int.from_bytes(os.urandom(8), "little") >> 1)


def _pre_mlx() -> bool:
    """Stop short of mlx: forced by ``PRE_MLX_ENV``, else where MLX's CUDA backend is installed
    (an ``mlx-cuda-*`` distribution), whose ``import mlx.core`` creates a CUDA context."""
    forced = os.environ.get(PRE_MLX_ENV, "")
    if forced in ("0", "1"):
        return forced == "1"
    return cuda_backend()


def cuda_backend() -> bool:
    """MLX's CUDA backend is installed (an ``mlx-cuda-*`` distribution): there ``import
    mlx.core`` creates a CUDA context, so a zygote that imports mlx must refuse to fork."""
    from importlib import metadata

    return any((d.metadata["Name"] or "").lower().replace("_", "-").startswith("mlx-cuda")
               for d in metadata.distributions())


def _import_pre_mlx() -> None:
    import importlib

    for name, attr in PRE_MLX:
        try:
            mod = importlib.import_module(name)
            if attr:
                getattr(mod, attr)
        except Exception as e:  # optional: the child's own import will say what is missing
            log.debug("pre-mlx import of %s.%s failed: %s", name, attr, e)
    if "mlx.core" in sys.modules:  # then _cuda_context() says so and the gateway stops us
        log.warning("a pre-mlx import imported mlx.core")


def _cuda_context() -> bool:
    """A CUDA context exists here, which a fork does not carry: MLX's CUDA backend makes one at
    ``import mlx.core`` (seen on an H200 with mlx-cuda-13 0.32.4), torch once ``torch.cuda`` is
    initialised. libcuda merely mapped is no context: torch maps it at import, and children
    forked from such a zygote ran MLX on the H200 (notes in bench/RESULTS.md)."""
    if "mlx.core" in sys.modules and _mapped("libcuda.so"):
        return True
    torch_cuda = getattr(sys.modules.get("torch"), "cuda", None)
    return bool(torch_cuda is not None and torch_cuda.is_initialized())


def _mapped(lib: str) -> bool:
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as f:
            return lib in f.read()
    except OSError:
        return False


def _threads() -> int:
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:
        return 0


def _rss() -> int:
    try:
        import psutil

        return int(psutil.Process().memory_info().rss)
    except Exception:
        return 0


if __name__ == "__main__":
    process_guard.set_parent_death_signal()  # before the imports: die with the gateway
    raise SystemExit(main())
