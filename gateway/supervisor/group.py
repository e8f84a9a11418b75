"""Sharded workers: one logical worker = one ``mlx.launch`` process group.

For a model with ``hosts`` (N > 1 ranks) the supervisor spawns, instead of a plain worker,
``python -m mlx_supervisor.worker.group_launch`` (mlx.launch, see that module) with a hostfile it
writes into a private directory of the 0700 run dir. Every rank runs the worker module; rank 0
connects to the gateway like any worker, the others follow rank 0 over ``mx.distributed``.

:class:`GroupProcess` is the supervisor's handle on the group (a :class:`WorkerProcess`):
- signals go to the whole process group (launcher and local ranks), also after the launcher
  itself is gone;
- a watchdog polls the launcher's rank processes: once any of them is gone, every rank still
  running gets SIGTERM, then SIGKILL (mlx.launch does this itself only for a rank that exits
  non-zero, and only while it is alive to do it);
- ``wait()`` returns once the launcher has exited *and* every local rank is gone, and then
  removes the group's directory, so the ledger frees the group's bytes only when they are free.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import random
import re
import shutil
import signal
import socket
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import psutil

from mlx_supervisor.gateway.catalog import Entry
from mlx_supervisor.gateway.supervisor.process import WorkerProcess
from mlx_supervisor.shared.hosts import is_local_host

log = logging.getLogger("mlx_supervisor.worker")

WATCH_EVERY = 0.2
TERM_GRACE = 1.0
LAUNCHER_GRACE = 1.5


def free_port_block(n: int, host: str = "127.0.0.1") -> int:
    """A first port such that ``n`` consecutive ports are free here now (the ring backend
    listens on one port per rank, counting up from ``--starting-port``)."""
    for _ in range(200):
        base = random.randrange(20000, 60000 - n)
        socks: list[socket.socket] = []
        try:
            for port in range(base, base + n):
                s = socket.socket()
                socks.append(s)
                s.bind((host, port))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError(f"no block of {n} free ports found")


def hostfile(hosts: list[str], backend: str) -> dict[str, object]:
    """mlx.launch's JSON hostfile. A host of this machine runs without ssh (mlx.launch runs
    ``"ssh": "127.0.0.1"`` locally) and still listens on its own address."""
    return {"backend": backend,
            "hosts": [{"ssh": "127.0.0.1" if i == 0 or is_local_host(h) else h, "ips": [h]}
                      for i, h in enumerate(hosts)]}


def group_argv(worker_argv: list[str], e: Entry, hostfile_path: Path, port: int) -> list[str]:
    m = e.source
    assert m is not None and m.hosts
    return [sys.executable, "-m", "mlx_supervisor.worker.group_launch",
            "--hostfile", str(hostfile_path), "--backend", m.backend,
            "--python", sys.executable, "--starting-port", str(port),
            "--", *worker_argv[1:],
            "--ranks", str(len(m.hosts)), "--hosts", ",".join(m.hosts),
            "--dist-backend", m.backend, "--parallel", m.parallel,
            "--formation-timeout", f"{m.formation_timeout:g}"]


async def spawn_group(e: Entry, worker_argv: list[str], env: dict[str, str],
                      endpoint: str) -> GroupProcess:
    """Start ``e``'s group; raises (with the reason) when it cannot even be launched."""
    m = e.source
    assert m is not None and m.hosts
    if m.backend == "mpi" and shutil.which("mpirun") is None:
        raise RuntimeError("backend 'mpi' needs mpirun on PATH, and it is not installed")
    run_dir = Path(endpoint.removeprefix("ipc://")).parent
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", e.id)[:40]
    gdir = Path(tempfile.mkdtemp(prefix=f"group-{safe}-", dir=run_dir))  # 0700
    hf = gdir / "hostfile.json"
    hf.write_text(json.dumps(hostfile(list(m.hosts), m.backend)))
    # mlx.launch's per-rank scripts mktemp their pid and hostfiles: keep them in here.
    env = {**env, "TMPDIR": str(gdir)}
    argv = group_argv(worker_argv, e, hf, free_port_block(len(m.hosts)))
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv, env=env, stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
            start_new_session=True, limit=1 << 20)
    except BaseException:
        shutil.rmtree(gdir, ignore_errors=True)
        raise
    log.info("model=%s launched %d ranks on %s (%s, %s parallel) as pid %d", e.id,
             len(m.hosts), ",".join(m.hosts), m.backend, m.parallel, proc.pid)
    return GroupProcess(proc, e.id, gdir)


def _gone(p: psutil.Process) -> bool:
    try:
        return not p.is_running() or p.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


class GroupProcess(WorkerProcess):
    def __init__(self, proc: asyncio.subprocess.Process, label: str, gdir: Path) -> None:
        super().__init__(proc, label)
        self.gdir = gdir
        self.ranks: dict[int, psutil.Process] = {}
        self.asked_to_stop = False
        self._watch = asyncio.create_task(self._watchdog())

    def _rank_procs(self) -> None:
        """Record the launcher's rank children (a local rank, or the ssh of a remote one);
        the launcher's short-lived helpers (its kill scripts) are not ranks."""
        with contextlib.suppress(psutil.Error):
            for c in psutil.Process(self.pid).children():
                if c.pid in self.ranks:
                    continue
                with contextlib.suppress(psutil.Error):
                    cmd = " ".join(c.cmdline())
                    if "mlx_supervisor.worker" in cmd or cmd.startswith("ssh"):
                        self.ranks[c.pid] = c

    async def _watchdog(self) -> None:
        while self.proc.returncode is None:
            await asyncio.sleep(WATCH_EVERY)
            self._rank_procs()
            dead = [pid for pid, p in self.ranks.items() if _gone(p)]
            if dead and self.proc.returncode is None and not self.asked_to_stop:
                why = f"rank process {dead[0]} exited; stopping every rank of the group"
                self.stderr_tail.append(why)
                log.warning("[%s pid=%d] %s", self.label, self.pid, why)
                # mlx.launch stops the others itself when a rank failed, then names the rank and
                # the cause (group_launch): give it a moment before we stop what is left.
                for _ in range(int(LAUNCHER_GRACE / 0.05)):
                    if self.proc.returncode is not None:
                        break
                    await asyncio.sleep(0.05)
                await self._kill_all()
                return

    def signal_group(self, sig: int) -> None:
        """The whole process group, even after the launcher is gone (its ranks may not be)."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, sig)
        for p in list(self.ranks.values()):  # a rank that left the group (setsid) still goes
            with contextlib.suppress(psutil.Error):
                if not _gone(p):
                    p.send_signal(sig)

    def _alive(self) -> bool:
        if self.proc.returncode is None:
            return True
        if any(not _gone(p) for p in self.ranks.values()):
            return True
        try:
            os.killpg(self.proc.pid, 0)
        except (ProcessLookupError, PermissionError):
            return False
        # Only zombies (reaped soon by init) may still hold the group id.
        with contextlib.suppress(psutil.Error):
            return any(p.info["status"] != psutil.STATUS_ZOMBIE
                       for p in psutil.process_iter(["pid", "status"])
                       if _pgid(p.pid) == self.proc.pid)
        return False

    async def _kill_all(self, term_grace: float = TERM_GRACE) -> None:
        self.signal_group(signal.SIGTERM)
        for _ in range(int(term_grace / 0.05)):
            if not self._alive():
                return
            await asyncio.sleep(0.05)
        self.signal_group(signal.SIGKILL)

    async def stop(self, send_shutdown: Callable[[], object], grace: float,
                   term_grace: float = 3.0) -> int:
        self.asked_to_stop = True  # ranks now exit one by one: that is no crash
        return await super().stop(send_shutdown, grace, term_grace)

    async def wait(self) -> int:
        rc = await super().wait()
        self._watch.cancel()
        # The launcher is gone: nothing of the group may outlive it.
        if self._alive():
            await self._kill_all()
            for _ in range(100):
                if not self._alive():
                    break
                await asyncio.sleep(0.05)
        shutil.rmtree(self.gdir, ignore_errors=True)
        return rc


def _pgid(pid: int) -> int:
    try:
        return os.getpgid(pid)
    except OSError:
        return -1
