"""The gateway's side of the zygote (worker/zygote.py): start it, ask it for workers.

A miss then costs a fork and a load, never an ``import mlx_lm`` (2 s on the CPU box, about 15 s
on CUDA), however fast the misses come: the zygote forks one worker per request.

- ``ForkServer.start`` spawns ``python -m mlx_supervisor.worker.zygote`` like a worker (own
  session, stderr into our log) with one end of a ``SOCK_SEQPACKET`` socketpair, and makes this
  process a child subreaper (Linux ``PR_SET_CHILD_SUBREAPER``): the zygote's double fork hands
  every worker to us. ``ready()`` waits for its ``ZygoteHello``.
- ``fork`` sends ``Fork`` with the write end of a new stderr pipe and returns a
  ``process.WorkerProcess`` around an ``AdoptedProcess``: the same stop path, stderr tail and
  reaper as a spawned worker. Its exit is seen through a pidfd and reaped with ``waitpid``.
- The zygote's own ``WorkerProcess`` (``proc``) is stopped, killed and reaped like a worker's;
  when it dies, pending forks fail at once and the workers it forked keep running.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import sys
from typing import Any

import psutil

from mlx_supervisor.gateway.supervisor import process
from mlx_supervisor.gateway.supervisor.adopted import (
    AdoptedProcess,
    become_subreaper,
    pipe_reader,
    private_bytes,
    reap_when_exited,
)
from mlx_supervisor.gateway.supervisor.process import WorkerProcess
from mlx_supervisor.shared.protocol import (
    Fork,
    Forked,
    ForkFailed,
    Shutdown,
    Standby,
    ZygoteHello,
    decode_from_zygote,
    encode,
)

log = logging.getLogger("mlx_supervisor.supervisor")
FORK_TIMEOUT = 10.0


def supported() -> bool:
    """Forking is enabled on Linux only (macOS: see SUPERVISOR.md, 'The zygote and macOS')."""
    return sys.platform.startswith("linux") and hasattr(os, "pidfd_open")


class ForkServer:
    """One zygote: ``start()``, ``await ready()``, ``await fork(...)``, ``stop()``."""

    def __init__(self, env: dict[str, str], kinds: str = "lm") -> None:
        self.env = env
        self.kinds = kinds
        self.proc: WorkerProcess | None = None
        self.hello: ZygoteHello | None = None
        self._sock: socket.socket | None = None
        self._ready: asyncio.Future[ZygoteHello] | None = None
        self._pending: dict[str, asyncio.Future[int]] = {}
        self.standby: psutil.Process | None = None  # the intermediate forked ahead
        self.standby_bytes = 0

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    @property
    def alive(self) -> bool:
        return self.proc is not None and not self.proc.exited and self._sock is not None

    def rss(self) -> int:
        try:
            return int(psutil.Process(self.pid).memory_info().rss) if self.pid else 0
        except psutil.Error:
            return 0

    async def start(self) -> WorkerProcess:
        if not become_subreaper():
            raise OSError("PR_SET_CHILD_SUBREAPER failed")
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        loop = asyncio.get_running_loop()
        self._ready = loop.create_future()
        try:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "mlx_supervisor.worker.zygote",
                "--control-fd", str(theirs.fileno()), "--kinds", self.kinds,
                env=self.env, pass_fds=(theirs.fileno(),), stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
                start_new_session=True, limit=1 << 20)
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        ours.setblocking(False)
        self._sock = ours
        loop.add_reader(ours.fileno(), self._on_readable)
        self.proc = WorkerProcess(proc, "zygote")
        return self.proc

    async def ready(self, timeout: float) -> ZygoteHello:
        assert self._ready is not None
        return await asyncio.wait_for(asyncio.shield(self._ready), timeout)

    async def fork(self, worker_id: str, argv: list[str], env: dict[str, str],
                   label: str) -> WorkerProcess:
        """A worker forked from the zygote, as ``python -m mlx_supervisor.worker *argv``."""
        if self._sock is None or self.hello is None:
            raise RuntimeError("the zygote is not ready")
        r, w = os.pipe()
        fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._pending[worker_id] = fut
        try:
            socket.send_fds(self._sock, [encode(Fork(worker_id=worker_id, argv=argv, env=env))],
                            [w])
        except OSError:
            self._pending.pop(worker_id, None)
            os.close(r)
            raise
        finally:
            os.close(w)
        try:
            pid = await asyncio.wait_for(fut, FORK_TIMEOUT)
        except BaseException:
            os.close(r)
            raise
        finally:
            self._pending.pop(worker_id, None)
        return WorkerProcess(AdoptedProcess(pid, await pipe_reader(r)), label)

    def _on_readable(self) -> None:
        assert self._sock is not None
        try:
            data = self._sock.recv(1 << 16)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._closed("the zygote's control socket closed")
            return
        try:
            msg = decode_from_zygote(data)
        except Exception as e:
            log.warning("dropping undecodable zygote frame (%d bytes): %s", len(data), e)
            return
        if isinstance(msg, Standby):
            self._on_standby(msg.pid)
            return
        if isinstance(msg, ZygoteHello):
            self.hello = msg
            log.info("zygote pid=%d ready: imports in %.2fs, %d threads", msg.pid,
                     msg.import_seconds, msg.threads)
            if self._ready is not None and not self._ready.done():
                self._ready.set_result(msg)
            return
        fut = self._pending.get(msg.worker_id)
        if fut is None or fut.done():
            return
        if isinstance(msg, Forked):
            self.standby, self.standby_bytes = None, 0  # used (or none): the zygote reaps it
            fut.set_result(msg.pid)
        elif isinstance(msg, ForkFailed):
            fut.set_exception(RuntimeError(f"zygote could not fork: {msg.reason}"))

    def _on_standby(self, pid: int) -> None:
        """Its own memory (what it does not share with the zygote, and its page tables) is
        charged with the zygote's; it stays about the same, since it does nothing."""
        try:
            self.standby = psutil.Process(pid)
        except psutil.Error:
            self.standby, self.standby_bytes = None, 0
            return
        self.standby_bytes = private_bytes(pid)

    def reap_standby(self) -> None:
        """After the zygote's exit: its intermediate (killed by its death signal) is ours now,
        as the subreaper; reap it once it has exited. A zygote that stopped cleanly reaped it
        itself (then it is gone, or no longer our child)."""
        p, self.standby, self.standby_bytes = self.standby, None, 0
        with contextlib.suppress(psutil.Error):
            if p is not None and p.is_running() and p.ppid() == os.getpid():
                reap_when_exited(p.pid)

    def _closed(self, why: str) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            asyncio.get_running_loop().remove_reader(sock.fileno())
            sock.close()
        err = RuntimeError(why)
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(err)
        if self._ready is not None and not self._ready.done():
            self._ready.set_exception(err)
            self._ready.exception()  # retrieved: nobody may be waiting

    def send_shutdown(self) -> None:
        """The first step of ``proc.stop``: ask the zygote to exit."""
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.send(encode(Shutdown(reason="stop")))

    async def stop(self, grace: float = 2.0) -> int | None:
        if self.proc is None:
            return None
        rc = await self.proc.stop(self.send_shutdown, grace)
        self._closed("the zygote stopped")
        self.reap_standby()
        return rc


class ForkLauncher:
    """The spawn seam with a zygote behind it: spares and single-process models are forked
    (a fork and a load, no import); sharded groups, models with their own ``env`` and any
    launch while the zygote is down go to ``fallback`` (a fresh interpreter).

    The zygote is started with the supervisor, charged in the ledger (``held_bytes``),
    restarted with backoff when it dies (the workers it forked keep running), and stopped last.
    A launch that finds it still importing waits for it: it is ahead of any fresh interpreter.
    """

    RESTART = (1.0, 2.0, 5.0, 15.0, 60.0)  # seconds before restarting a zygote that died

    def __init__(self, fallback: Any, endpoint: str, heartbeat_interval: float,
                 gateway_timeout: float, allow_download: bool, ready_timeout: float) -> None:
        self.fallback = fallback
        self.allow_download = allow_download
        self.endpoint = endpoint
        self.heartbeat_interval = heartbeat_interval
        self.gateway_timeout = gateway_timeout
        self.env = process.worker_env({}, allow_download)
        self.ready_timeout = ready_timeout
        self.server: ForkServer | None = None
        self.crashes = 0
        self.forks = 0
        self.disabled: str | None = None  # why forking is off for good (a CUDA context)
        self._task: asyncio.Task[None] | None = None
        self._closing = False

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._keep(), name="zygote")

    async def _keep(self) -> None:
        """Start the zygote; when it dies unasked, log it and start another after a backoff."""
        while not self._closing:
            fs = ForkServer(self.env)
            try:
                wp = await fs.start()
            except Exception as e:
                log.error("zygote could not start: %s", e)
                rc: int | None = None
            else:
                self.server = fs
                if await self._unsafe(fs):
                    return
                rc = await wp.wait()
                fs._closed(f"the zygote {process.describe_exit(rc)}")
                fs.reap_standby()
            if self._closing:
                return
            delay = self.RESTART[min(self.crashes, len(self.RESTART) - 1)]
            self.crashes += 1
            tail = " | ".join(list(fs.proc.stderr_tail)[-3:]) if fs.proc else ""
            log.error("zygote %s; workers it forked keep running; restarting in %.0fs%s",
                      process.describe_exit(rc) if rc is not None else "failed", delay,
                      f"; last stderr: {tail}" if tail else "")
            self.server = None
            await asyncio.sleep(delay)

    async def _unsafe(self, fs: ForkServer) -> bool:
        """Once the zygote has said hello: a zygote holding a CUDA context must not fork."""
        with contextlib.suppress(Exception):
            await fs.ready(self.ready_timeout)
        if fs.hello is None or not fs.hello.cuda:
            return False
        self.disabled = ("MLX's CUDA backend creates a CUDA context at import, and a context "
                         "does not survive fork")
        log.warning("fork server off: %s; workers start as fresh interpreters (warm spare)",
                    self.disabled)
        self.server = None
        await fs.stop()
        return True

    def info(self) -> dict[str, object] | None:
        fs = self.server
        return {"pid": fs.pid if fs else None, "ready": bool(fs and fs.alive and fs.hello),
                "bytes": self.held_bytes(), "forks": self.forks, "crashes": self.crashes,
                "import_seconds": fs.hello.import_seconds if fs and fs.hello else None,
                "pre_mlx": fs.hello.pre_mlx if fs and fs.hello else None,
                "disabled": self.disabled}

    def held_bytes(self) -> int:
        """What the ledger charges for the zygote: its RSS (its workers share its pages
        copy-on-write, and are charged their own full footprint as well)."""
        fs = self.server
        return fs.rss() + fs.standby_bytes if fs is not None and fs.alive else 0

    @property
    def pid(self) -> int | None:
        return self.server.pid if self.server is not None and self.server.alive else None

    async def launch(self, worker: Any, entry: Any) -> WorkerProcess:
        fs = self.server
        if fs is None or not fs.alive or not forkable(entry):
            return await self.fallback.launch(worker, entry)
        if fs.hello is None:
            with contextlib.suppress(Exception):
                await fs.ready(self.ready_timeout)
        if fs.hello is None or fs.hello.cuda or not fs.alive:
            return await self.fallback.launch(worker, entry)
        argv = self._argv(worker, entry)
        env = process.worker_env(entry.env if entry else {}, self.allow_download)
        try:
            wp = await fs.fork(worker.worker_id, argv, env, entry.id if entry else SPARE_LABEL)
        except Exception as e:
            log.warning("fork for %s failed (%s); starting a fresh interpreter", worker.worker_id, e)
            return await self.fallback.launch(worker, entry)
        self.forks += 1
        wp.via = "fork"
        return wp

    def _argv(self, worker: Any, entry: Any) -> list[str]:
        common = dict(endpoint=self.endpoint, worker_id=worker.worker_id,
                      heartbeat_interval=self.heartbeat_interval,
                      gateway_timeout=self.gateway_timeout)
        if entry is None:
            argv = process.worker_argv(model_id=SPARE_LABEL, kind="lm", path=None, spare=True,
                                       **common)
        else:
            argv = process.worker_argv(model_id=entry.id, kind=entry.kind, path=entry.path or None,
                                       context_length=entry.context_length,
                                       **common)
        return argv[3:]  # without "python -m mlx_supervisor.worker"

    async def close(self) -> None:
        """Stop the zygote (after the workers: its own exit never takes a worker with it)."""
        self._closing = True
        fs = self.server
        if fs is not None:
            await fs.stop()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


SPARE_LABEL = "(spare)"
FORK_KINDS = frozenset({"lm", "vlm", "embeddings"})


def forkable(entry: Any) -> bool:
    """A spare (None) or a one-process model of a kind the zygote serves, with no ``env`` of
    its own (environment variables read at import time would not reach a forked child)."""
    return entry is None or (entry.kind in FORK_KINDS and not entry.env and entry.ranks <= 1)
