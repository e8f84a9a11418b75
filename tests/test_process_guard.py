"""A worker forked by the zygote settles: it starts while its intermediate is still exiting,
and becomes the gateway's child (with the death signal against the gateway) before it serves.

Real processes: a child script plays the gateway (a child subreaper) and double-forks the
way the zygote does; the grandchild reports what it sees after ``process_guard.settle``.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent("""
    import ctypes, json, os, sys, time
    from mlx_supervisor.worker import process_guard

    libc = process_guard.libc()
    assert libc.prctl(36, 1, 0, 0, 0) == 0  # PR_SET_CHILD_SUBREAPER
    gateway = os.getpid() if sys.argv[1] == "me" else 1
    r, w = os.pipe()
    middle = os.fork()
    if middle == 0:
        if os.fork() == 0:
            process_guard.settle_later(gateway)
            process_guard.set_parent_death_signal()  # deferred: our parent is the middle
            before = os.getppid()
            process_guard.settle(timeout=2.0)
            sig = ctypes.c_int(-1)
            libc.prctl(2, ctypes.byref(sig), 0, 0, 0)  # PR_GET_PDEATHSIG
            os.write(w, json.dumps({"before": before, "after": os.getppid(), "sig": sig.value,
                                    "watch": process_guard.ParentWatch().original}).encode())
            os._exit(0)
        time.sleep(0.3)  # a slow exit: settle must wait for it, not poll past it
        os._exit(0)
    os.close(w)
    os.waitpid(middle, 0)
    pid, status = os.wait()  # the grandchild, re-parented to us
    out = os.read(r, 4096).decode()
    print(json.dumps({"gateway": gateway, "middle": middle, "rc": os.waitstatus_to_exitcode(status),
                      "seen": json.loads(out) if out else None}))
""")


def _run(who: str) -> dict:
    r = subprocess.run([sys.executable, "-c", SCRIPT, who], capture_output=True, text=True,
                       timeout=30)
    assert r.returncode == 0, r.stderr
    return dict(json.loads(r.stdout))


def test_settle_waits_for_the_intermediate_then_sets_the_death_signal() -> None:
    out = _run("me")
    seen = out["seen"]
    assert out["rc"] == 0 and seen is not None
    assert seen["before"] == out["middle"]  # it started under the intermediate
    assert seen["after"] == out["gateway"] == seen["watch"]
    assert seen["sig"] == 9  # SIGKILL, set once the gateway is its parent


def test_a_worker_that_never_becomes_the_gateways_child_exits() -> None:
    out = _run("init")  # the "gateway" named to it (pid 1) never becomes its parent
    assert out["rc"] == 4 and out["seen"] is None  # EXIT_PARENT_GONE, before serving
