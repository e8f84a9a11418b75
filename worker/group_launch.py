"""``python -m mlx_supervisor.worker.group_launch [mlx.launch options] -- -m mlx_supervisor.worker ...``

``mlx.launch`` as the gateway runs it for a sharded model: mlx's own launcher (hostfile, ring
ports, ``MLX_RANK``, ssh for remote hosts, stopping every rank once one fails), with the fixes
a supervised launcher needs:

- it dies with the gateway (``PR_SET_PDEATHSIG``, as a worker does) and names itself as its
  ranks' parent (``MLX_SUPERVISOR_PARENT_PID``), so each rank dies with it in turn;
- its stdin is a pipe nobody writes to: mlx.launch polls stdin, and ``/dev/null`` is always
  readable, which would make that poll spin;
- it does not poll its ranks' stdin pipes for writability (always true: about 30% of a core
  while idle, measured); nothing is ever written to them;
- it exits 1 when a rank failed (mlx.launch itself exits 0 whatever its ranks did).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import select
import signal
import sys

from mlx_supervisor.worker import process_guard

_stdin_keep: list[int] = []


def _select_reads(rlist: list[int], wlist: list[int], xlist: list[int],
                  timeout: float | None = None) -> tuple[list[int], list[int], list[int]]:
    r, _, x = select.select(rlist, [], xlist, timeout)
    return r, [], x


def explain(warnings: list[str], argv: list[str]) -> list[str]:
    """One line per failed rank, in words an operator can act on: which rank, on which host,
    and the likely cause (from the exit code)."""
    hosts: list[str] = []
    timeout = "?"
    with contextlib.suppress(Exception):
        hf = argv[argv.index("--hostfile") + 1]
        with open(hf, encoding="utf-8") as f:
            hosts = [h["ips"][0] if h.get("ips") else h["ssh"] for h in json.load(f)["hosts"]]
    with contextlib.suppress(Exception):
        timeout = argv[argv.index("--formation-timeout") + 1]
    out = []
    for w in warnings:
        m = re.search(r"Node with rank (\d+) (?:exited with code (-?\d+)|was killed)", w)
        if not m:
            continue
        rank, code = int(m.group(1)), int(m.group(2)) if m.group(2) else None
        host = hosts[rank] if rank < len(hosts) else "?"
        why = {-signal.SIGALRM: f"the group did not form within formation_timeout ({timeout}s): "
                                "a host is unreachable, a rank did not start, or a port is blocked",
               255: "ssh could not reach the host",
               127: "command not found on the host (is the same Python installed there?)",
               3: "the model failed to load (see its log above)",
               }.get(code if code is not None else 0, "")
        if code == -signal.SIGTERM or code is None:
            why = "stopped by the launcher after another rank failed"
        out.append(f"sharded group failed: rank {rank} on {host} "
                    f"{'was stopped' if code is None else f'exited with code {code}'}"
                    + (f": {why}" if why else ""))
    # The cause first: a rank stopped by the launcher is only a consequence.
    return sorted(out, key=lambda line: "stopped by the launcher" in line)


def main() -> int:
    process_guard.set_parent_death_signal()
    os.environ["MLX_SUPERVISOR_PARENT_PID"] = str(os.getpid())
    r, w = os.pipe()
    os.dup2(r, 0)
    os.close(r)
    _stdin_keep.append(w)  # held open for our lifetime: stdin never reaches EOF

    from mlx._distributed_utils import launch

    warnings: list[str] = []
    warn = launch.log_warning

    def log_warning(*args: object, **kwargs: object) -> None:
        warnings.append(" ".join(map(str, args)))
        warn(*args, **kwargs)

    launch.log_warning = log_warning
    launch.select = _select_reads  # type: ignore[assignment]
    argv = sys.argv[1:]
    sys.argv = ["mlx.launch", *argv]
    launch.main()
    lines = explain(warnings, argv)
    for line in reversed(lines):  # the cause last: it is what a short stderr tail shows
        print(line, file=sys.stderr, flush=True)
    return 1 if lines else 0


if __name__ == "__main__":
    raise SystemExit(main())
