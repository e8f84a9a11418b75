"""Processes the gateway did not start but reaps (Linux, as a child subreaper): the workers the
zygote forks (``AdoptedProcess``, the part of ``asyncio.subprocess.Process`` that
``process.WorkerProcess`` uses) and the zygote's intermediate left behind by a zygote crash."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import os

PR_SET_CHILD_SUBREAPER = 36


def become_subreaper() -> bool:
    """Orphaned descendants (the zygote's workers) are re-parented to this process."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        return libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


class AdoptedProcess:
    """A child asyncio did not start (a worker the zygote forked, ours as subreaper), with the
    part of ``asyncio.subprocess.Process`` that ``WorkerProcess`` uses."""

    def __init__(self, pid: int, stderr: asyncio.StreamReader) -> None:
        self.pid = pid
        self.returncode: int | None = None
        self.stderr = stderr
        self._loop = asyncio.get_running_loop()
        self._done: asyncio.Future[int] = self._loop.create_future()
        self._pidfd = os.pidfd_open(pid)
        self._loop.add_reader(self._pidfd, self._reap)

    def _reap(self) -> None:
        try:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
        except ChildProcessError:  # not ours after all (no subreaper): it has exited, rc unknown
            pid, status = self.pid, 255 << 8
        if pid == 0:
            return
        self._loop.remove_reader(self._pidfd)
        os.close(self._pidfd)
        self.returncode = os.waitstatus_to_exitcode(status)
        self._done.set_result(self.returncode)

    async def wait(self) -> int:
        return await asyncio.shield(self._done)

    def send_signal(self, sig: int) -> None:
        if self.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)


async def pipe_reader(fd: int) -> asyncio.StreamReader:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=1 << 20)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader),
                                 os.fdopen(fd, "rb", 0))
    return reader


def private_bytes(pid: int) -> int:
    """What a process copy-on-write from the zygote holds alone: its private pages
    (``/proc/PID/smaps_rollup``) and its page tables (``VmPTE``); 0 if it cannot be read."""
    total = 0
    try:
        with open(f"/proc/{pid}/smaps_rollup", encoding="ascii") as f:
            for line in f:
                if line.startswith(("Private_Clean:", "Private_Dirty:")):
                    total += int(line.split()[1]) * 1024
        with open(f"/proc/{pid}/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmPTE:"):
                    total += int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return 0
    return total


def reap_when_exited(pid: int) -> None:
    """Reap ``pid`` (our child) once it has exited, seen through its pidfd."""
    loop = asyncio.get_running_loop()
    try:
        fd = os.pidfd_open(pid)
    except OSError:
        return

    def reap() -> None:
        with contextlib.suppress(ChildProcessError):
            if os.waitpid(pid, os.WNOHANG)[0] == 0:
                return  # not exited yet: the pidfd stays watched
        loop.remove_reader(fd)
        os.close(fd)

    loop.add_reader(fd, reap)
