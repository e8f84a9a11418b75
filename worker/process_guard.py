"""A worker dies with its gateway.

Three independent signals, because each one alone has a gap:
- ``prctl(PR_SET_PDEATHSIG, SIGKILL)`` (Linux): the kernel kills us when the parent exits;
- a parent-pid watch (everywhere): ``os.getppid()`` changes once we are re-parented;
- gateway silence (in ``main``): no message at all for ``--gateway-timeout`` seconds.

It also holds the process-wide "hang" switch the fake engine uses to simulate a stuck worker.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
import time

PR_SET_PDEATHSIG = 1

hang_requested = threading.Event()
"""Set by the fake engine (``FAKE_HANG_WORD``): the io loop then stops answering forever."""


_first_ppid: int | None = None
_settle_to: int | None = None  # a forked worker's gateway, until settle() has run
_libc: ctypes.CDLL | None = None


def libc() -> ctypes.CDLL:
    """The C library, found once per process tree: ``ctypes.util.find_library`` runs
    ``ldconfig -p`` in a subprocess (5-13 ms), which every worker forked by the zygote would
    otherwise pay before its Hello. ``CDLL(None)`` is the program's own symbol scope, which
    holds libc's ``prctl``."""
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    return _libc


def set_parent_death_signal(sig: int = signal.SIGKILL) -> bool:
    """Ask the kernel to send ``sig`` when our parent dies; False where unsupported.

    Called first thing in ``__main__`` (before the heavy imports) to keep the window small in
    which a parent that dies goes unnoticed; the parent pid seen then is what
    :class:`ParentWatch` compares with. A worker the zygote forked is still the zygote's
    intermediate's child here: the death signal waits for :func:`settle`.
    """
    global _first_ppid
    if _settle_to is not None:
        _first_ppid = _settle_to
        return True
    if _first_ppid is None:
        # The gateway names itself: a parent that died before this line ran is caught too.
        expected = os.environ.get("MLX_SUPERVISOR_PARENT_PID", "")
        _first_ppid = int(expected) if expected.isdigit() else os.getppid()
        if os.getppid() != _first_ppid:
            os._exit(4)  # EXIT_PARENT_GONE; shared.protocol is not imported yet on purpose
    return _prctl_death_signal(sig)


def _prctl_death_signal(sig: int) -> bool:
    if not sys.platform.startswith("linux"):
        return False
    try:
        return libc().prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def die_with(parent: int, sig: int = signal.SIGKILL) -> None:
    """The death signal against ``parent``, which must still be our parent once it is set
    (else exit ``EXIT_PARENT_GONE``): the zygote's intermediates die with the zygote."""
    _prctl_death_signal(sig)
    if os.getppid() != parent:
        os._exit(4)


def forget_parent() -> None:
    """A worker forked by the zygote: the zygote's parent check does not apply to it; the next
    :func:`set_parent_death_signal` reads the gateway's pid from the environment again."""
    global _first_ppid
    _first_ppid = None


def settle_later(gateway: int) -> None:
    """A worker the zygote forked starts before its intermediate has exited (the exit tears
    down a copy of the zygote's address space, 3-8 ms on the CPU box): it connects, says Hello
    and starts its load meanwhile, and :func:`settle` (before serving anything) waits to be the
    gateway's child and sets the death signal against it."""
    global _settle_to, _first_ppid
    _settle_to, _first_ppid = gateway, None


def settle(timeout: float = 5.0, sig: int = signal.SIGKILL) -> None:
    """Wait (blocking on the intermediate's pidfd, no polling) until our parent is the gateway
    named by :func:`settle_later`, then set the death signal; exit ``EXIT_PARENT_GONE`` (4) if
    that does not happen within ``timeout`` or the gateway is gone once the signal is set.
    Nothing to do in a process that was not forked by the zygote."""
    global _settle_to
    gateway = _settle_to
    if gateway is None:
        return
    deadline = time.monotonic() + timeout
    while (ppid := os.getppid()) != gateway:
        left = deadline - time.monotonic()
        if left <= 0:
            os._exit(4)
        _wait_exit(ppid, left)
    _prctl_death_signal(sig)
    _settle_to = None
    if os.getppid() != gateway:  # the gateway died between the wait and the prctl
        os._exit(4)


def _wait_exit(pid: int, timeout: float) -> None:
    """Until ``pid`` has exited (its pidfd turns readable once its children are re-parented)
    or ``timeout`` passes; returns at once if it is gone already."""
    import select

    try:
        fd = os.pidfd_open(pid)
    except (ProcessLookupError, AttributeError, OSError):
        time.sleep(min(timeout, 0.0005))  # gone already (or no pidfd): just look again
        return
    try:
        select.select([fd], [], [], timeout)
    finally:
        os.close(fd)


class ParentWatch:
    """Remembers the parent pid at start; ``gone()`` once we have been re-parented."""

    def __init__(self) -> None:
        self.original = _first_ppid if _first_ppid is not None else os.getppid()

    def gone(self) -> bool:
        return os.getppid() != self.original


def hang_forever() -> None:
    """Block the calling thread for good, after telling the io loop to do the same."""
    hang_requested.set()
    while True:
        time.sleep(3600)
