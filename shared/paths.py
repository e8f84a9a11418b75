"""Where things live on disk: config, data (demo models, ledger), run dir (sockets, pidfile), logs."""

from __future__ import annotations

import os
from pathlib import Path

import platformdirs

APP = "mlx-supervisor"


def config_path() -> Path:
    env = os.environ.get("MLX_SUPERVISOR_CONFIG")
    if env:
        return Path(env).expanduser()
    return Path(os.environ.get("XDG_CONFIG_HOME", Path.home() / ".config")) / APP / "config.toml"


def data_dir() -> Path:
    env = os.environ.get("MLX_SUPERVISOR_DATA_DIR")
    return Path(env).expanduser() if env else Path(platformdirs.user_data_dir(APP))


def run_dir() -> Path:
    """A private (0700) directory for the ZeroMQ socket and pidfile."""
    env = os.environ.get("MLX_SUPERVISOR_RUN_DIR")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg and Path(xdg).is_dir():
        return Path(xdg) / APP
    return data_dir() / "run"


def log_dir() -> Path:
    env = os.environ.get("MLX_SUPERVISOR_LOG_DIR")
    return Path(env).expanduser() if env else Path(platformdirs.user_log_dir(APP))


def ensure_private_dir(path: Path) -> Path:
    """Create ``path`` mode 0700 and refuse one that another user owns or others can write."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    st = path.stat()
    if st.st_uid != os.getuid():
        raise PermissionError(f"{path} is owned by uid {st.st_uid}, not by us ({os.getuid()})")
    if st.st_mode & 0o077:
        path.chmod(0o700)
    return path
