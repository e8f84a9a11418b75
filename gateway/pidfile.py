"""The gateway's pidfile: which process serves from this run dir, at which URL, since when.

``serve`` writes it itself, so ``status``/``stop`` work however the gateway was started
(foreground, ``mlx-supervisor start``, launchd or systemd). It is JSON so it also carries the
URL, config and log file. A pidfile is believed only while its pid is alive *and* is the same
process (creation time matches), so a pid reused after a crash reads as stale, never as running.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import psutil

from mlx_supervisor.shared import paths
from mlx_supervisor.shared.config import Config

NAME = "gateway.pid"


@dataclass
class PidInfo:
    pid: int
    url: str
    started: float
    """The process's creation time (psutil), which tells a reused pid from ours."""
    config: str | None = None
    log_file: str | None = None


class AlreadyRunning(Exception):
    def __init__(self, info: PidInfo, path: Path):
        self.info = info
        super().__init__(f"a gateway is already running from {path} (pid {info.pid}, {info.url})")


def run_dir_for(cfg: Config) -> Path:
    return Path(cfg.run_dir).expanduser() if cfg.run_dir else paths.run_dir()


def log_dir_for(cfg: Config) -> Path:
    return Path(cfg.log_dir).expanduser() if cfg.log_dir else paths.log_dir()


def path_for(cfg: Config) -> Path:
    return run_dir_for(cfg) / NAME


def connect_url(host: str, port: int) -> str:
    """The URL a local client uses: a wildcard bind is reached on loopback."""
    if host in ("", "0.0.0.0"):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}"


def read(path: Path) -> PidInfo | None:
    """The pidfile's content, or None when absent or unreadable (a torn write reads as absent)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return PidInfo(pid=int(data["pid"]), url=str(data["url"]), started=float(data["started"]),
                       config=data.get("config"), log_file=data.get("log_file"))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def alive(info: PidInfo) -> bool:
    try:
        p = psutil.Process(info.pid)
        return abs(p.create_time() - info.started) < 1.0 and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def is_gateway(pid: int) -> bool:
    """A local process running our CLI (so a pid from ``/health`` is safe to signal)."""
    try:
        return any("mlx_supervisor" in a or "mlx-supervisor" in a for a in psutil.Process(pid).cmdline())
    except psutil.Error:
        return False


def this_process(url: str, config: str | None, log_file: str | None) -> PidInfo:
    pid = os.getpid()
    return PidInfo(pid=pid, url=url, started=psutil.Process(pid).create_time(), config=config,
                   log_file=log_file)


def claim(path: Path, info: PidInfo) -> None:
    """Write ``info`` atomically; replace a stale pidfile; raise AlreadyRunning for a live one.

    The file appears by ``link`` of a complete temp file, which fails if one exists, so two
    gateways racing for one run dir cannot both win and a reader never sees half a file.
    """
    paths.ensure_private_dir(path.parent)
    tmp = path.with_name(f".{path.name}.{info.pid}.tmp")
    tmp.write_text(json.dumps(asdict(info)) + "\n", encoding="utf-8")
    try:
        for _ in range(3):
            try:
                os.link(tmp, path)
                return
            except FileExistsError:
                held = read(path)
                if held is not None and held.pid != info.pid and alive(held):
                    raise AlreadyRunning(held, path) from None
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()  # stale (dead pid) or ours from an exec: replace it
        raise AlreadyRunning(read(path) or info, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def release(path: Path, pid: int | None = None) -> None:
    """Remove the pidfile if it still names ``pid`` (default: us); never someone else's."""
    held = read(path)
    if held is None or held.pid == (os.getpid() if pid is None else pid):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
