"""How the CLI finds and talks to a running gateway: config, pidfile, then HTTP (stdlib only).

The CLI must work in a bare install (httpx is a test extra), must not go through an
``http_proxy`` for a loopback call, and must never import the server side (uvicorn, zmq).
"""

from __future__ import annotations

import argparse
import json
import sys
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlx_supervisor.gateway import pidfile
from mlx_supervisor.shared import paths
from mlx_supervisor.shared.config import Config, ConfigError, load

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))
# What a broken config file still tells us: where the gateway is and how to talk to it.
_OPTIONAL = ("api_key", "admin_key", "run_dir", "log_dir")
_LOCATE = ("host", "port", *_OPTIONAL, "shutdown_grace", "stop_grace", "load_timeout", "queue_timeout")


class NotRunning(Exception):
    """Nothing answers at the gateway's URL."""


class GatewayError(Exception):
    """The gateway answered with an error (``status`` 0: no answer in time)."""

    def __init__(self, status: int, message: str):
        self.status = status
        super().__init__(message)


def config_file(args: argparse.Namespace) -> Path:
    given = getattr(args, "config", None)
    return Path(given).expanduser().resolve() if given else paths.config_path()


def load_config(args: argparse.Namespace, strict: bool = True) -> Config:
    """The config the CLI acts on; defaults when the file does not exist (``serve --demo`` case).

    A broken file raises ConfigError when ``strict``; otherwise (``stop``, ``status``, ...: a
    file edited since the gateway started must not lock us out of it) whatever locates the
    gateway is salvaged from it, with a warning.
    """
    path = config_file(args)
    if not path.exists():
        return Config()
    try:
        return load(path)
    except ConfigError as e:
        if strict:
            raise
        print(f"mlx-supervisor: warning: {e}", file=sys.stderr)
        return _salvage(path)


def _salvage(path: Path) -> Config:
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError):
        return Config()
    cfg = Config()
    for key in _LOCATE:
        value = raw.get(key)
        if isinstance(value, type(getattr(cfg, key))) or (value is not None and key in _OPTIONAL
                                                            and isinstance(value, str)):
            setattr(cfg, key, value)
    return cfg


@dataclass
class Target:
    """Where a gateway is (or would be): what every operational command starts from."""

    cfg: Config
    config_path: Path
    pid_path: Path
    url: str
    key: str | None

    @property
    def info(self) -> pidfile.PidInfo | None:
        """The pidfile's gateway when it is alive, else None."""
        info = pidfile.read(self.pid_path)
        return info if info is not None and pidfile.alive(info) else None

    def get(self, path: str, timeout: float = 10.0) -> Any:
        return self.call("GET", path, None, timeout)

    def post(self, path: str, body: Any = None, timeout: float = 10.0) -> Any:
        return self.call("POST", path, {} if body is None else body, timeout)

    def call(self, method: str, path: str, body: Any, timeout: float) -> Any:
        return request(self.url, method, path, body, self.key, timeout)

    def health(self, timeout: float = 1.0) -> dict[str, Any] | None:
        """``/health`` of whatever answers at our URL, or None."""
        try:
            data = self.get("/health", timeout)
        except (NotRunning, GatewayError):
            return None
        return data if isinstance(data, dict) else None

    def locate(self) -> tuple[int, str] | None:
        """(pid, url) of the running gateway: its pidfile, else whatever answers at the config URL
        (a gateway started with another run dir), when that pid is a local process."""
        info = self.info
        if info is not None:
            return info.pid, info.url
        h = self.health()
        if h and isinstance(h.get("pid"), int) and pidfile.is_gateway(h["pid"]):
            return int(h["pid"]), self.url
        return None


def target(args: argparse.Namespace, strict: bool = False) -> Target:
    cfg = load_config(args, strict)
    pid_path = pidfile.path_for(cfg)
    url = pidfile.connect_url(cfg.host, cfg.port)
    info = pidfile.read(pid_path)
    if info is not None and pidfile.alive(info):
        url = info.url  # it may run with --port/--host overrides
    return Target(cfg=cfg, config_path=config_file(args), pid_path=pid_path, url=url,
                  key=cfg.admin_key or cfg.api_key)


def request(url: str, method: str, path: str, body: Any, key: str | None, timeout: float) -> Any:
    """JSON in, JSON out; an OpenAI-style error body becomes GatewayError with its message."""
    data = None if body is None else json.dumps(body).encode()
    headers = {"accept": "application/json"}
    if data is not None:
        headers["content-type"] = "application/json"
    if key:
        headers["authorization"] = f"Bearer {key}"
    req = urllib.request.Request(url + path, data=data, headers=headers, method=method)
    try:
        with _OPENER.open(req, timeout=timeout) as resp:
            raw = resp.read()
    except urllib.error.HTTPError as e:
        raise GatewayError(e.code, _error_message(e.read(), e.code)) from None
    except urllib.error.URLError as e:
        if isinstance(e.reason, OSError) and not isinstance(e.reason, TimeoutError):
            raise NotRunning(f"nothing answers at {url} ({e.reason})") from None
        raise GatewayError(0, f"{url}{path}: {e.reason}") from None
    except TimeoutError:
        raise GatewayError(0, f"{url}{path}: no answer within {timeout:g}s") from None
    return json.loads(raw) if raw else None


def _error_message(raw: bytes, status: int) -> str:
    try:
        err = json.loads(raw).get("error", {})
        return str(err.get("message") or err)
    except (ValueError, AttributeError):
        return raw.decode("utf-8", "replace")[:500] or f"HTTP {status}"


def model_path(model: str) -> str:
    return urllib.parse.quote(model, safe="")
