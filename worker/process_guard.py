"""A worker dies with its gateway.

Three independent signals, because each one alone has a gap:
- ``prctl(PR_SET_PDEATHSIG, SIGKILL)`` (Linux): the kernel kills us when the parent exits;
- a parent-pid watch (everywhere): ``os.getppid()`` changes once we are re-parented;
- gateway silence (in ``main``): no message at all for ``--gateway-timeout`` seconds.

It also holds the process-wide "hang" switch the fake engine uses to simulate a stuck worker.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import sys
import threading
import time

PR_SET_PDEATHSIG = 1

hang_requested = threading.Event()
"""Set by the fake engine (``FAKE_HANG_WORD``): the io loop then stops answering forever."""


_first_ppid: int | None = None


def set_parent_death_signal(sig: int = signal.SIGKILL) -> bool:
    """Ask the kernel to send ``sig`` when our parent dies; False where unsupported.

    Called first thing in ``__main__`` (before the heavy imports) to keep the window small in
    which a parent that dies goes unnoticed; the parent pid seen then is what
    :class:`ParentWatch` compares with.
    """
    global _first_ppid
    if _first_ppid is None:
        # The gateway names itself: a parent that died before this line ran is caught too.
        expected = os.environ.get("MLX_SUPERVISOR_PARENT_PID", "")
        _first_ppid = int(expected) if expected.isdigit() else os.getppid()
        if os.getppid() != _first_ppid:
            os._exit(4)  # EXIT_PARENT_GONE; shared.protocol is not imported yet on purpose
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        return libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def forget_parent() -> None:
    """A worker forked by the zygote: the zygote's parent check does not apply to it; the next
    :func:`set_parent_death_signal` reads the gateway's pid from the environment again."""
    global _first_ppid
    _first_ppid = None


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
