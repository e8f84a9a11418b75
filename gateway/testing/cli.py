"""Drive the real ``mlx-supervisor`` CLI as a subprocess in an isolated home (tests, benchmarks).

Everything it may touch (config, run/log/data dirs) lives under one temp root named by the
environment, on a free loopback port; every process it leaves behind is found by that root in
its command line (the daemon's ``--log-file``, a worker's ``ipc://`` endpoint) and killed by
``cleanup()``, which tests call even when they fail.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil

from mlx_supervisor.gateway.testing.server import free_port, write_config

FAST = {"host": "127.0.0.1", "heartbeat_interval": 0.5, "heartbeat_timeout": 5.0, "stop_grace": 3.0,
        "shutdown_grace": 5.0, "warm_spare": False, "fork_server": False}


def fake(mem_bytes: int = 100_000_000, **env: Any) -> dict[str, Any]:
    """A catalog entry for the fake engine: a real worker process, no MLX, instant load."""
    return {"path": "/nonexistent/fake", "kind": "fake",
            "env": {"FAKE_MEMORY_BYTES": str(mem_bytes), **{k: str(v) for k, v in env.items()}}}


class CLIHome:
    def __init__(self, root: Path, models: dict[str, dict[str, Any]],
                 settings: dict[str, Any] | None = None, env: dict[str, str] | None = None):
        self.root = root.resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.config = self.root / "config.toml"
        self.run_dir, self.log_dir = self.root / "run", self.root / "log"
        self.env = {**os.environ, "MLX_SUPERVISOR_CONFIG": str(self.config),
                    "MLX_SUPERVISOR_RUN_DIR": str(self.run_dir),
                    "MLX_SUPERVISOR_LOG_DIR": str(self.log_dir),
                    "MLX_SUPERVISOR_DATA_DIR": str(self.root / "data"), **(env or {})}
        self.write(models, settings)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pidfile(self) -> Path:
        return self.run_dir / "gateway.pid"

    def write(self, models: dict[str, dict[str, Any]], settings: dict[str, Any] | None = None) -> None:
        write_config(self.config, {**FAST, "port": self.port, **(settings or {})}, models)

    def cli(self, *args: str, timeout: float = 90.0) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "mlx_supervisor.gateway.cli", *args], env=self.env,
                              capture_output=True, text=True, timeout=timeout)

    def log(self) -> str:
        parts = []
        for name in ("gateway.out", "gateway.log"):
            with contextlib.suppress(OSError):
                parts.append((self.log_dir / name).read_text(errors="replace")[-8000:])
        return "\n".join(parts)

    def ours(self) -> list[psutil.Process]:
        """Live processes whose command line mentions our root: the gateway and its workers."""
        mark = str(self.root) + "/"
        out = []
        for p in psutil.process_iter(["cmdline", "status"]):
            with contextlib.suppress(psutil.Error):
                if p.info["status"] != psutil.STATUS_ZOMBIE and any(mark in a for a in p.info["cmdline"] or []):
                    out.append(p)
        return out

    def wait_gone(self, timeout: float = 10.0) -> list[psutil.Process]:
        deadline = time.monotonic() + timeout
        left = self.ours()
        while left and time.monotonic() < deadline:
            time.sleep(0.1)
            left = self.ours()
        return left

    def cleanup(self) -> None:
        for p in self.ours():
            with contextlib.suppress(psutil.Error):
                p.kill()
        psutil.wait_procs(self.ours(), timeout=5)
