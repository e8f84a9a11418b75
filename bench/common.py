"""Shared pieces of the benchmarks: models, servers, CPU meters, statistics (the load
generator is ``bench/load.py``)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psutil

from mlx_supervisor.gateway.testing.server import ServerProcess, free_port, wait_healthy

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable

# A prompt the demo models never stop on (their EOS row is zero, so greedy never picks it).
PROMPT = "The quick brown fox jumps over the lazy dog. Once upon a time there was a little robot"

# --model-size large: a llama of a realistic shape, quantized to 4 bits (GPU runs).
LARGE = dict(hidden_size=2048, num_layers=16, num_heads=16, num_kv_heads=8,
             intermediate_size=5632, vocab_size=32000)


@dataclass
class Settings:
    """What one run of ``python -m bench`` was asked for."""

    quick: bool
    out: Path
    model_size: str  # "tiny" | "large"
    models_dir: Path
    smoke: bool = False  # the smallest sizes that still run every step (tests/test_bench.py)

    def pick(self, quick: Any, full: Any, smoke: Any = None) -> Any:
        if self.smoke and smoke is not None:
            return smoke
        return quick if self.quick else full


# ---------------------------------------------------------------- models


def model_dir(s: Settings, seed: int = 0) -> Path:
    """Build (once; cached under ``models_dir``) the bench model for ``seed``; return its path."""
    d = s.models_dir / f"{s.model_size}-{seed}"
    if (d / ".bench-complete").exists():
        return d
    cmd = [PY, "-m", "bench.inproc", "build", str(d), "--seed", str(seed), "--size", s.model_size]
    subprocess.run(cmd, check=True, cwd=ROOT)
    return d


def dir_bytes(d: Path) -> int:
    return sum(f.stat().st_size for f in d.iterdir() if f.is_file())


# ---------------------------------------------------------------- processes


def inproc(*args: str, timeout: float = 600) -> dict[str, Any]:
    """Run ``python -m bench.inproc ARGS`` (a fresh process) and return the JSON it prints last."""
    r = subprocess.run([PY, "-m", "bench.inproc", *args], cwd=ROOT, capture_output=True,
                       text=True, timeout=timeout)
    if r.returncode != 0:
        raise RuntimeError(f"bench.inproc {' '.join(args)} failed ({r.returncode}):\n{r.stderr[-4000:]}")
    return dict(json.loads(r.stdout.strip().splitlines()[-1]))


class InprocLoop:
    """``python -m bench.inproc decode --serve``: an in-process decode loop kept loaded in its
    own process, timed one run at a time (:meth:`run`) so runs can alternate with the gateway's."""

    def __init__(self, *args: str, timeout: float = 600) -> None:
        self.proc = subprocess.Popen([PY, "-m", "bench.inproc", "decode", *args, "--serve"],
                                     cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True)
        self._read()  # {"ready": true} once loaded and warmed up

    def _read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"bench.inproc decode --serve exited ({self.proc.wait()})")
        return dict(json.loads(line))

    def run(self) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()
        return self._read()

    def __enter__(self) -> InprocLoop:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def gateway(models: dict[str, dict[str, Any]], settings: dict[str, Any] | None = None,
            env: dict[str, str] | None = None) -> ServerProcess:
    base: dict[str, Any] = {"log_level": "WARNING", "heartbeat_interval": 1.0,
                            "ledger": {"enabled": False}}
    base.update(settings or {})
    return ServerProcess(models=models, settings=base, env=env)


class MLXLMServer:
    """``python -m mlx_lm.server --model DIR`` on a free loopback port; ``start()`` returns once
    its model is loaded (``/health`` answers and one 1-token request went through)."""

    def __init__(self, model: Path, extra: list[str] | None = None):
        self.model = model
        self.port = free_port()
        self.extra = extra or []
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 300) -> MLXLMServer:
        self.proc = subprocess.Popen(
            [PY, "-m", "mlx_lm.server", "--model", str(self.model), "--host", "127.0.0.1",
             "--port", str(self.port), "--log-level", "WARNING", *self.extra],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
        if wait_healthy(self.proc, self.url + "/health", timeout, step=0.02):
            return self
        if self.proc.poll() is not None:
            err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
            raise RuntimeError(f"mlx_lm.server exited with {self.proc.returncode}:\n{err[-4000:]}")
        self.stop()
        raise RuntimeError("mlx_lm.server did not come up")

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        if self.proc.stderr:
            self.proc.stderr.close()
        self.proc = None

    def __enter__(self) -> MLXLMServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@contextlib.contextmanager
def started(srv: ServerProcess) -> Iterator[ServerProcess]:
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()
        shutil.rmtree(srv.workdir, ignore_errors=True)


def wait_spare(url: str, timeout: float = 120) -> float:
    """Wait until the gateway's warm spare has finished its imports; return the seconds waited."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        with contextlib.suppress(httpx.HTTPError, ValueError):
            ps = httpx.get(url + "/admin/ps", timeout=2).json()
            for w in ps.get("workers", []):
                if w.get("spare") and w.get("state") in ("idle", "loading"):
                    return time.monotonic() - t0
        time.sleep(0.05)
    raise RuntimeError("the warm spare did not become ready")


def wait_unloaded(url: str, model: str, timeout: float = 60) -> None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        ps = httpx.get(url + "/admin/ps", timeout=2).json()
        if not any(w.get("model") == model for w in ps.get("workers", [])):
            return
        time.sleep(0.05)
    raise RuntimeError(f"{model} did not unload")


class CPUMeter:
    """CPU seconds used by given processes (and their children) between start() and stop()."""

    def __init__(self, pids: dict[str, int]):
        self.pids = pids
        self.before: dict[str, float] = {}

    @staticmethod
    def _cpu(pid: int, children: bool = True) -> float:
        try:
            p = psutil.Process(pid)
            procs = [p, *(p.children(recursive=True) if children else [])]
        except psutil.NoSuchProcess:
            return 0.0
        total = 0.0
        for q in procs:
            with contextlib.suppress(psutil.Error):
                t = q.cpu_times()
                total += t.user + t.system
        return total

    def start(self) -> None:
        self.before = {k: self._cpu(pid, k != "client") for k, pid in self.pids.items()}

    def stop(self) -> dict[str, float]:
        return {k: round(self._cpu(pid, k != "client") - self.before[k], 3)
                for k, pid in self.pids.items()}


# ---------------------------------------------------------------- numbers


def pct(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    v = sorted(values)
    k = (len(v) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (k - lo)


def median(values: list[float]) -> float:
    return statistics.median(values) if values else 0.0


def ratio(a: float, b: float) -> float:
    return round(a / b, 4) if b else 0.0


def machine() -> dict[str, Any]:
    info: dict[str, Any] = {"python": platform.python_version(), "platform": platform.platform(),
                            "cpus": os.cpu_count(), "memory_gb": round(psutil.virtual_memory().total / 2**30, 1)}
    with contextlib.suppress(Exception):
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=5).stdout
        for line in out.splitlines():
            k, _, v = line.partition(":")
            if k.strip() in ("Model name", "CPU(s)", "Architecture"):
                info["lscpu_" + k.strip().lower().replace(" ", "_").replace("(s)", "s")] = v.strip()
    with contextlib.suppress(Exception):
        info.update(inproc("info"))
    return info


def figure(name: str, value: float, baseline: float, unit: str, better: str, baseline_name: str,
           target: str | None = None, passed: bool | None = None, **extra: Any) -> dict[str, Any]:
    return {"figure": name, "value": round(value, 3), "baseline": round(baseline, 3),
            "ratio": ratio(value, baseline), "unit": unit, "better": better,
            "baseline_name": baseline_name, "target": target, "pass": passed, **extra}


def _run(coro: Any) -> Any:
    return asyncio.run(coro)
