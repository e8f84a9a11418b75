"""Spawning a worker process and the one bounded way to stop it.

Workers start in their own session (process group), so a stop signals the whole group, and
their stderr is captured line by line into our log with the model's name; the last lines are
kept for the error a user sees when a model cannot load.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import re
import signal
import sys
from collections.abc import Callable, Mapping

log = logging.getLogger("mlx_supervisor.worker")

_SECRET = re.compile(r"(KEY|TOKEN|SECRET|PASSWORD|CREDENTIAL)", re.I)
_KEEP = {"HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"}


def worker_env(extra: Mapping[str, str], allow_hf_token: bool = False) -> dict[str, str]:
    """Our environment minus anything that looks like a secret, plus the model's own ``env``."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not _SECRET.search(k) or (allow_hf_token and k in _KEEP)
    }
    env.update(extra)
    env["MLX_SUPERVISOR_PARENT_PID"] = str(os.getpid())
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env["PYTHONUNBUFFERED"] = "1"
    return env


def worker_argv(
    *,
    model_id: str,
    kind: str,
    endpoint: str,
    worker_id: str,
    path: str | None,
    heartbeat_interval: float,
    gateway_timeout: float,
    context_length: int = 0,
    spare: bool = False,
) -> list[str]:
    argv = [
        sys.executable, "-m", "mlx_supervisor.worker", "--kind", kind, "--endpoint", endpoint,
        "--worker-id", worker_id,
        "--heartbeat-interval", str(heartbeat_interval),
        "--gateway-timeout", str(gateway_timeout),
    ]
    if path:
        argv += ["--path", path]
    if context_length:
        argv += ["--context-length", str(context_length)]
    if spare:
        argv.append("--spare")
    else:
        argv += ["--model-id", model_id]
    return argv


class WorkerProcess:
    """A spawned worker: its process, a reaper, and the tail of its stderr."""

    via = "exec"  # how it was obtained: a fresh interpreter; "fork" from the zygote

    def __init__(self, proc: asyncio.subprocess.Process, label: str):
        self.proc = proc
        self.label = label
        self.stderr_tail: collections.deque[str] = collections.deque(maxlen=20)
        self._pump = asyncio.create_task(self._read_stderr())

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def exited(self) -> bool:
        """The process is gone (its ``Exited`` event may not have been handled yet)."""
        return self.proc.returncode is not None

    async def _read_stderr(self) -> None:
        assert self.proc.stderr is not None
        while True:
            try:
                line = await self.proc.stderr.readline()
            except (ValueError, asyncio.LimitOverrunError):
                continue  # an over-long line: drop it, keep reading
            if not line:
                return
            text = line.decode("utf-8", "replace").rstrip()
            if text:
                self.stderr_tail.append(text)
                log.info("[%s pid=%d] %s", self.label, self.proc.pid, text)

    async def wait(self) -> int:
        rc = await self.proc.wait()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.shield(self._pump), 1.0)
        return rc

    def signal_group(self, sig: int) -> None:
        if self.proc.returncode is not None:
            return
        try:
            os.killpg(self.proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(sig)

    async def stop(self, send_shutdown: Callable[[], object], grace: float, term_grace: float = 3.0) -> int:
        """Shutdown message, wait; SIGTERM the group, wait; SIGKILL, reap. Every wait bounded."""
        if self.proc.returncode is None:
            with contextlib.suppress(Exception):
                send_shutdown()
            for sig, wait in ((None, grace), (signal.SIGTERM, term_grace), (signal.SIGKILL, 10.0)):
                if sig is not None:
                    log.warning("[%s pid=%d] did not exit, sending %s", self.label, self.pid, signal.Signals(sig).name)
                    self.signal_group(sig)
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(asyncio.shield(self.proc.wait()), wait)
                    break
        return await self.wait()


async def spawn(argv: list[str], env: dict[str, str], label: str) -> WorkerProcess:
    proc = await asyncio.create_subprocess_exec(
        *argv,
        env=env,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
        start_new_session=True,
        limit=1 << 20,
    )
    return WorkerProcess(proc, label)


def describe_exit(rc: int) -> str:
    """How a worker ended, in words an operator can act on (as gunicorn's reaper does)."""
    from mlx_supervisor.shared.protocol import EXIT_LOAD_FAILED, EXIT_PARENT_GONE

    if rc == 0:
        return "exited cleanly"
    if rc < 0:
        name = signal.Signals(-rc).name if -rc in signal.Signals._value2member_map_ else str(-rc)
        hint = ": perhaps out of memory?" if -rc == signal.SIGKILL else ""
        return f"killed by {name}{hint}"
    if rc == EXIT_LOAD_FAILED:
        return "exited: model failed to load"
    if rc == EXIT_PARENT_GONE:
        return "exited: lost its gateway"
    return f"exited with code {rc}"
