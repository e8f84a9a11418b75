"""``start`` / ``stop``: run ``serve`` detached, and stop it in bounded steps.

``start`` spawns ``serve`` in its own session with its log going to a rotated file it writes
itself (stdout/stderr, which only carry a crash before logging starts, go to ``gateway.out``),
then waits for the pidfile and ``/health`` to agree on the new pid: "started" means serving.
``stop`` is SIGTERM (the gateway drains in-flight requests up to ``shutdown_grace`` and stops its
workers), a bounded wait, then SIGKILL, then a sweep of any worker that outlived its gateway.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import psutil

from mlx_supervisor.gateway import pidfile
from mlx_supervisor.gateway.cli.client import Target

OK, FAILED, NOT_RUNNING = 0, 1, 3
LOG_NAME = "gateway.log"
OUT_NAME = "gateway.out"
_ENV_PATHS = ("MLX_SUPERVISOR_CONFIG", "MLX_SUPERVISOR_RUN_DIR", "MLX_SUPERVISOR_LOG_DIR",
              "MLX_SUPERVISOR_DATA_DIR", "HF_HOME", "HF_HUB_CACHE", "XDG_CONFIG_HOME")

Say = Callable[[str], None]


def _err(msg: str) -> None:
    print(f"mlx-supervisor: {msg}", file=sys.stderr)


def log_files(t: Target) -> tuple[Path, Path]:
    d = pidfile.log_dir_for(t.cfg)
    return d / LOG_NAME, d / OUT_NAME


def tail(path: Path, n: int = 30) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 64 * 1024))
            lines = f.read().decode("utf-8", "replace").splitlines()
    except OSError:
        return ""
    return "\n".join(lines[-n:])


def serve_argv(config: Path | None, log_file: Path, extra: list[str] | None = None) -> list[str]:
    """The command that runs the gateway in the foreground; ``start`` and the services share it."""
    argv = [sys.executable, "-m", "mlx_supervisor.gateway.cli"]
    if config is not None:
        argv += ["--config", str(config)]
    return [*argv, "serve", "--log-file", str(log_file), *(extra or [])]


def _child_env() -> dict[str, str]:
    """Our environment with relative paths made absolute: the daemon runs from ``/``."""
    env = dict(os.environ)
    for k in _ENV_PATHS:
        if env.get(k):
            env[k] = str(Path(env[k]).expanduser().resolve())
    env["PYTHONUNBUFFERED"] = "1"
    return env


def start(t: Target, explicit_config: bool, timeout: float, extra: list[str] | None = None,
          say: Say = print) -> int:
    found = t.locate()
    if found is not None:
        pid, url = found
        if t.health() is not None:
            _err(f"already running (pid {pid}) at {url}; use `mlx-supervisor restart` to restart it")
        else:
            _err(f"pid {pid} holds {t.pid_path} but does not answer at {url}/health; "
                 "run `mlx-supervisor stop` first")
        return FAILED
    stale = pidfile.read(t.pid_path)
    if stale is not None:
        say(f"removing stale pidfile {t.pid_path} (pid {stale.pid} is gone)")
        pidfile.release(t.pid_path, stale.pid)
    log_file, out_file = log_files(t)
    log_file.parent.mkdir(parents=True, exist_ok=True)
    argv = serve_argv(t.config_path if explicit_config else None, log_file, extra)
    with open(out_file, "ab") as out:
        out.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} start: {' '.join(argv)}\n".encode())
        out.flush()
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True, cwd="/", env=_child_env())
    deadline = time.monotonic() + timeout
    while True:
        rc = proc.poll()
        if rc is not None:
            _err(f"the gateway exited with code {rc} while starting")
            _print_tails(log_file, out_file)
            return FAILED
        info = pidfile.read(t.pid_path)
        if info is not None and info.pid == proc.pid:
            h = Target(t.cfg, t.config_path, t.pid_path, info.url, t.key).health()
            if h is not None and h.get("pid") == proc.pid:
                say(f"mlx-supervisor started (pid {proc.pid}), listening on {info.url}")
                say(f"log: {log_file}")
                return OK
        if time.monotonic() > deadline:
            _err(f"the gateway did not answer /health within {timeout:g}s; stopping it")
            _print_tails(log_file, out_file)
            _terminate(proc.pid, 10.0)
            return FAILED
        time.sleep(0.1)


def _print_tails(log_file: Path, out_file: Path) -> None:
    for path in (out_file, log_file):
        text = tail(path)
        if text:
            print(f"--- last lines of {path}:\n{text}", file=sys.stderr)


def stop(t: Target, timeout: float, say: Say = print) -> int:
    found = t.locate()
    if found is None:
        stale = pidfile.read(t.pid_path)
        if stale is not None:
            pidfile.release(t.pid_path, stale.pid)
            say(f"not running (removed stale pidfile for pid {stale.pid})")
        else:
            say("not running")
        return OK
    pid, _ = found
    say(f"stopping mlx-supervisor (pid {pid}; draining up to {t.cfg.shutdown_grace:g}s)")
    if not _terminate(pid, timeout):
        _err(f"pid {pid} did not stop within {timeout:g}s: killed it")
    pidfile.release(t.pid_path, pid)
    say("stopped")
    return OK


def _terminate(pid: int, timeout: float) -> bool:
    """SIGTERM, wait up to ``timeout``, SIGKILL; then kill any worker that outlived the gateway.
    True if it stopped by itself."""
    try:
        proc = psutil.Process(pid)
        kids = proc.children(recursive=True)
        proc.send_signal(signal.SIGTERM)
    except psutil.NoSuchProcess:
        return True
    graceful = True
    try:
        proc.wait(timeout)
    except psutil.TimeoutExpired:
        graceful = False
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()
            proc.wait(10)
    # Workers exit with their gateway (parent-death signal, parent watch); this is the backstop.
    _, left = psutil.wait_procs(kids, timeout=5)
    for k in left:
        with contextlib.suppress(psutil.NoSuchProcess):
            k.kill()
    psutil.wait_procs(left, timeout=5)
    return graceful


def stop_timeout(t: Target) -> float:
    """How long a graceful stop may take: the drain, a worker's stop path, and some slack."""
    return t.cfg.shutdown_grace + t.cfg.stop_grace + 15.0


def send_reload(t: Target, say: Say = print) -> int:
    found = t.locate()
    if found is None:
        _err(f"not running (no gateway at {t.url})")
        return NOT_RUNNING
    os.kill(found[0], signal.SIGHUP)
    say(f"reload requested (pid {found[0]}); problems are logged: `mlx-supervisor logs`")
    return OK
