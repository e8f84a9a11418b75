"""Run a real ``mlx-supervisor serve`` in a child process on a free loopback port.

Used by the test suite and the benchmarks; lives in the package so both import one copy.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import httpx
import psutil

from mlx_supervisor.shared.dropins import toml_value


def wait_healthy(proc: subprocess.Popen[bytes], url: str, timeout: float,
                 step: float = 0.05) -> bool:
    """True once ``url`` answers 200; False as soon as ``proc`` exits or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=1.0).status_code == 200:
                return True
        time.sleep(step)
    return False


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_config(path: Path, settings: dict[str, Any], models: dict[str, dict[str, Any]]) -> Path:
    lines = [f"{k} = {toml_value(v)}" for k, v in settings.items() if not isinstance(v, dict)]
    for k, v in settings.items():
        if isinstance(v, dict):
            lines.append(f"\n[{k}]")
            lines += [f"{kk} = {toml_value(vv)}" for kk, vv in v.items()]
    for name, m in models.items():
        lines.append(f'\n[models."{name}"]')
        lines += [f"{k} = {toml_value(v)}" for k, v in m.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


class ServerProcess:
    """``with ServerProcess(models={...}) as srv:`` -> ``srv.url``; stops and checks for orphans."""

    def __init__(self, models: dict[str, dict[str, Any]], settings: dict[str, Any] | None = None,
                 workdir: Path | None = None, extra_args: list[str] | None = None,
                 env: dict[str, str] | None = None, ready_timeout: float = 60.0,
                 config_last: bool = False,
                 rlimits: dict[int, tuple[int, int]] | None = None):
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="mlxsup-"))
        self.port = free_port()
        base = {"host": "127.0.0.1", "port": self.port, "run_dir": str(self.workdir / "run"),
                "heartbeat_interval": 0.5, "heartbeat_timeout": 5.0, "stop_grace": 3.0,
                "shutdown_grace": 5.0, "warm_spare": False, "fork_server": False}
        base.update(settings or {})
        self.port = int(str(base["port"]))
        self.config = write_config(self.workdir / "config.toml", base, models)
        self.extra_args = extra_args or []
        self.env = env or {}
        self.ready_timeout = ready_timeout
        self.config_last = config_last  # `serve --config FILE` rather than `--config FILE serve`
        self.rlimits = rlimits or {}  # resource limits for the gateway (RLIMIT_NOFILE: (soft, hard))
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = self.workdir / "gateway.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> ServerProcess:
        env = {**os.environ, "MLX_SUPERVISOR_DATA_DIR": str(self.workdir / "data"), **self.env}
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mlx_supervisor.gateway.cli",
             *(["serve", "--config", str(self.config)] if self.config_last
               else ["--config", str(self.config), "serve"]), *self.extra_args],
            stdout=self._log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
            preexec_fn=self._set_rlimits if self.rlimits else None)
        if wait_healthy(self.proc, self.url + "/health", self.ready_timeout):
            return self
        if self.proc.poll() is not None:
            raise RuntimeError(f"gateway exited with {self.proc.returncode}:\n{self.log()}")
        self.stop()
        raise RuntimeError(f"gateway did not answer /health within {self.ready_timeout}s:\n{self.log()}")

    def _set_rlimits(self) -> None:
        import resource

        for which, limits in self.rlimits.items():
            resource.setrlimit(which, limits)

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-20000:]
        except OSError:
            return ""

    def worker_pids(self) -> list[int]:
        """Worker processes of this gateway (they run in their own sessions, so look by parent)."""
        if self.proc is None:
            return []
        try:
            return [c.pid for c in psutil.Process(self.proc.pid).children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int | None:
        if self.proc is None:
            return None
        workers = self.worker_pids()
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        # Nothing of ours may outlive the gateway: reap stragglers (and let tests assert on it).
        self.orphans = [pid for pid in workers if _alive(pid)]
        deadline = time.monotonic() + 5
        while self.orphans and time.monotonic() < deadline:
            time.sleep(0.05)
            self.orphans = [pid for pid in self.orphans if _alive(pid)]
        for pid in self.orphans:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self._log.close()
        return self.proc.returncode

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _alive(pid: int) -> bool:
    try:
        p = psutil.Process(pid)
        return p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


T = TypeVar("T")
MB = 10**6


def fake_model(mem_mb: int = 100, **env: Any) -> dict[str, Any]:
    """A catalog entry for the fake engine: a real worker process, no MLX (see worker/engines/fake.py)."""
    return {"path": "/nonexistent/fake", "kind": "fake",
            "env": {"FAKE_MEMORY_BYTES": str(mem_mb * MB), **{k: str(v) for k, v in env.items()}}}


def wait_for(cond: Callable[[], T | None], timeout: float = 10.0, step: float = 0.05,
             what: str = "") -> T:
    """Poll ``cond`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        v = cond()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"not met within {timeout}s: {what or cond}")
        time.sleep(step)


def alive(pid: int) -> bool:
    """The process exists and is not a zombie."""
    return _alive(pid)


def non_reader(port: int, body: dict[str, Any], rid: str,
               path: str = "/v1/chat/completions") -> socket.socket:
    """A streaming request from a client that never reads a byte: a 4 KiB receive buffer, so
    its socket fills after a few events and the gateway's flow control is what it meets."""
    payload = json.dumps(body).encode()
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.settimeout(30)
    s.connect(("127.0.0.1", port))
    s.sendall(b"POST %s HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n" % path.encode()
              + b"x-request-id: %s\r\nContent-Length: %d\r\n\r\n" % (rid.encode(), len(payload))
              + payload)
    return s
