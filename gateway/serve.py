"""``mlx-supervisor serve``: resolve config, build the app, run uvicorn with our own signal handling.

Signals only enqueue work: the first SIGINT/SIGTERM drains in-flight requests up to
``shutdown_grace`` (then ends the rest with an error event) and stops every worker; a second one
forces the exit. SIGHUP reloads the config.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import contextlib
import importlib.util
import ipaddress
import logging
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from types import FrameType
from typing import Any

import psutil
import uvicorn

from mlx_supervisor.gateway import catalog, connections, pidfile
from mlx_supervisor.gateway.api.app import create_app
from mlx_supervisor.gateway.api.gateway import Gateway
from mlx_supervisor.gateway.budget import resolve as resolve_budget
from mlx_supervisor.gateway.logs import setup_logging
from mlx_supervisor.gateway.supervisor import forkserver
from mlx_supervisor.gateway.supervisor.spare import ExecLauncher, Launcher
from mlx_supervisor.shared import minilm, paths
from mlx_supervisor.shared.config import (
    Config,
    ConfigError,
    ModelConfig,
    add_dropins,
    load,
    semantic_problems,
)
from mlx_supervisor.shared.sizes import format_size

log = logging.getLogger("mlx_supervisor.serve")
# The arguments the running gateway was configured from: SIGHUP (gateway/reload.py) re-reads them.
CONFIG_ARGS: argparse.Namespace | None = None


def demo_models() -> dict[str, ModelConfig]:
    """The built-in demo catalog: a tiny llama (built on first use), plus MiniLM when installed."""
    root = paths.data_dir() / "models"
    llama = root / "demo-llama"
    if not (llama / "config.json").exists():
        log.info("building the demo model into %s", llama)
        subprocess.run([sys.executable, "-m", "mlx_supervisor.worker.demo.lm", str(llama)], check=True)
    models = {"demo": ModelConfig(path=str(llama), kind="lm", aliases=["default"])}
    with contextlib.suppress(FileNotFoundError):
        mini = minilm.model_dir()
        if (mini / "model.safetensors").exists() and importlib.util.find_spec("mlx_embeddings"):
            models["demo-embed"] = ModelConfig(path=str(mini), kind="embeddings")
    return models


def resolve_config(args: argparse.Namespace) -> Config:
    """The config file if there is one; ``--demo`` (or no config file at all) adds the demo models."""
    path = Path(args.config).expanduser() if getattr(args, "config", None) else paths.config_path()
    if path.exists() or getattr(args, "config", None):
        cfg = load(path)
    else:  # no main config: pulled and added models still count
        cfg = Config()
        add_dropins(cfg, path.parent)
    if getattr(args, "demo", False) or not path.exists():
        cfg.models = {**demo_models(), **cfg.models}
    for key in ("host", "port", "log_format"):
        v = getattr(args, key, None)
        if v is not None:
            setattr(cfg, key, v)
    return cfg


def is_loopback(host: str) -> bool:
    if host in ("localhost", ""):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        try:
            return all(ipaddress.ip_address(a[4][0]).is_loopback for a in socket.getaddrinfo(host, None))
        except OSError:
            return False


def clear_stale_sockets(run_dir: Path) -> None:
    """Sockets left by a gateway that died (kill -9) are removed; a live gateway's are kept."""
    for sock in run_dir.glob("gw-*.sock"):
        try:
            pid = int(sock.stem.split("-", 1)[1])
        except ValueError:
            continue
        if not psutil.pid_exists(pid):
            with contextlib.suppress(OSError):
                sock.unlink()


def build_gateway(cfg: Config) -> tuple[Gateway, list[str]]:
    total = psutil.virtual_memory().total
    problems = semantic_problems(cfg, total)
    if problems:
        raise ConfigError(problems)
    budget = resolve_budget(cfg.memory_budget, total)
    entries, aliases, warnings = catalog.build(cfg, total)
    for e in entries.values():
        if e.estimate > budget:
            warnings.append(f"model {e.id!r} needs about {format_size(e.estimate)}, more than the memory "
                            f"budget of {format_size(budget)}: requests for it will be refused")
    run_dir = paths.ensure_private_dir(Path(cfg.run_dir).expanduser() if cfg.run_dir else paths.run_dir())
    clear_stale_sockets(run_dir)
    endpoint = f"ipc://{run_dir}/gw-{os.getpid()}.sock"
    gw = Gateway.build(cfg, entries, aliases, budget, endpoint, _launcher(cfg, endpoint))
    gw.warnings.extend(warnings)
    for plugin in PLUGINS:
        plugin(gw)
    return gw, warnings


def _launcher(cfg: Config, endpoint: str) -> Launcher:
    """How workers are obtained: forked from a zygote on Linux (``fork_server``), else fresh
    interpreters (see gateway/supervisor/SUPERVISOR.md, "Obtaining a worker")."""
    fresh = ExecLauncher(cfg, endpoint)
    if not cfg.fork_server:
        return fresh
    if not forkserver.supported():
        log.info("fork_server is ignored on %s (forking after the Metal frameworks load is "
                 "unsafe): workers start as fresh interpreters", sys.platform)
        return fresh
    return forkserver.ForkLauncher(fresh, endpoint, cfg.heartbeat_interval,
                                   max(30.0, cfg.heartbeat_timeout * 3), cfg.allow_download,
                                   cfg.load_timeout)


# Optional features (metrics, images, ledger, status page) attach themselves to the gateway here.
PLUGINS: list[Any] = []


def _load_plugins() -> None:
    for name in ("mlx_supervisor.gateway.api.images", "mlx_supervisor.gateway.observe.metrics",
                 "mlx_supervisor.gateway.observe.statuspage", "mlx_supervisor.gateway.observe.jobs",
                 "mlx_supervisor.gateway.reload", "mlx_supervisor.gateway.api.models_admin"):
        if importlib.util.find_spec(name) is not None:
            mod = __import__(name, fromlist=["attach"])
            if hasattr(mod, "attach") and mod.attach not in PLUGINS:
                PLUGINS.append(mod.attach)


class GatewayServer(uvicorn.Server):
    """uvicorn, but a stop signal drains our workers first and a second one forces."""

    def __init__(self, config: uvicorn.Config, gw: Gateway, reload_fn: Any = None):
        super().__init__(config)
        self.gw = gw
        self.reload_fn = reload_fn
        self._draining = False
        self._loop: asyncio.AbstractEventLoop | None = None

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        if hasattr(signal, "SIGHUP"):
            self._loop.add_signal_handler(signal.SIGHUP, self._on_hup)
        await super().serve(sockets)

    def _on_hup(self) -> None:
        if self.reload_fn is not None:
            asyncio.ensure_future(self.reload_fn())

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._draining or self._loop is None:
            log.warning("second stop signal: forcing exit")
            self.force_exit = True
            self.should_exit = True
            return
        self._draining = True
        log.info("stop signal %s: draining (up to %gs)", signal.Signals(sig).name, self.gw.cfg.shutdown_grace)
        self._loop.call_soon_threadsafe(lambda: asyncio.ensure_future(self._drain()))

    async def _drain(self) -> None:
        try:
            await self.gw.sup.shutdown()
        finally:
            self.should_exit = True


def limits(cfg: Config, models: int) -> connections.Limits:
    """The connection limits from the config, the cap fitted to the open-files limit."""
    soft, _ = connections.raise_fd_limit()
    cap = connections.connection_cap(cfg.max_connections, soft, models)
    if cap < cfg.max_connections:
        log.warning("max_connections lowered from %d to %d to fit the open-files limit (%d)",
                    cfg.max_connections, cap, soft)
    return connections.Limits(header_timeout=cfg.header_timeout, body_timeout=cfg.body_timeout,
                              write_timeout=cfg.write_timeout, max_header_bytes=cfg.max_header_bytes,
                              max_connections=cap)


def run(args: argparse.Namespace) -> int:
    global CONFIG_ARGS
    CONFIG_ARGS = args
    try:
        cfg = resolve_config(args)
    except ConfigError as e:
        print(f"mlx-supervisor: {e}", file=sys.stderr)
        return 2
    log_file = getattr(args, "log_file", None)
    setup_logging(cfg, log_file=log_file)
    if not is_loopback(cfg.host) and not cfg.api_key and not getattr(args, "insecure_no_auth", False):
        print(f"mlx-supervisor: refusing to listen on {cfg.host} without an api_key; set api_key in the "
              "config or pass --insecure-no-auth", file=sys.stderr)
        return 2
    # The pidfile lets `mlx-supervisor status/stop` find us however we were started.
    pid_path = pidfile.path_for(cfg)
    config_file = Path(args.config).expanduser().resolve() if getattr(args, "config", None) else paths.config_path()
    try:
        pidfile.claim(pid_path, pidfile.this_process(pidfile.connect_url(cfg.host, cfg.port),
                                                     str(config_file), log_file))
    except (pidfile.AlreadyRunning, PermissionError) as e:
        print(f"mlx-supervisor: {e}", file=sys.stderr)
        return 1
    atexit.register(pidfile.release, pid_path)
    _load_plugins()
    try:
        gw, warnings = build_gateway(cfg)
    except ConfigError as e:
        print(f"mlx-supervisor: {e}", file=sys.stderr)
        return 2
    except PermissionError as e:
        print(f"mlx-supervisor: {e}", file=sys.stderr)
        return 2
    for w in warnings:
        log.warning("%s", w)
    app = create_app(gw)
    lim = limits(cfg, len(gw.sup.slots))
    gw.status_sources["connections"] = lim.status
    ucfg = uvicorn.Config(app, host=cfg.host, port=cfg.port, log_config=None, access_log=False,
                          timeout_graceful_shutdown=5, lifespan="on",
                          timeout_keep_alive=cfg.keep_alive_timeout,
                          http=connections.protocol_class(lim))
    server = GatewayServer(ucfg, gw, reload_fn=gw.reload)
    log.info("mlx-supervisor listening on http://%s:%d (%d models, budget %s)", cfg.host, cfg.port,
             len(gw.sup.slots), format_size(gw.sup.budget))
    server.run()
    return 0 if server.started else 1
