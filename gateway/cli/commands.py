"""The operational commands' handlers (wired to argparse in gateway/cli/ops.py).

Each is thin: it finds the gateway (gateway/cli/client.py), asks it over HTTP or signals it
(gateway/cli/daemon.py), and prints a table or, with ``--json``, the data as the gateway gave it.
Exit codes are the ones in ``cli.EXIT_CODES``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mlx_supervisor.gateway.cli import config_cmd, daemon, logtail
from mlx_supervisor.gateway.cli.client import GatewayError, NotRunning, Target, model_path, target
from mlx_supervisor.gateway.supervisor.states import HOT
from mlx_supervisor.shared.config import ConfigError
from mlx_supervisor.shared.sizes import format_size

OK, FAILED, USAGE, NOT_RUNNING = 0, 1, 2, 3

Handler = Callable[[argparse.Namespace, Target], int]


def _err(msg: str) -> None:
    print(f"mlx-supervisor: {msg}", file=sys.stderr)


def run(name: str, args: argparse.Namespace, strict: bool) -> int:
    """Load the config once, run the handler for ``name``, and turn the errors every command
    shares into their exit codes. Only ``strict`` commands (start, restart) refuse a broken
    config; the rest salvage what they can (they must still reach the gateway to stop it)."""
    fn = HANDLERS[name]
    try:
        t = target(args, strict)
    except ConfigError as e:
        _err(str(e))
        return USAGE
    try:
        return fn(args, t)
    except NotRunning:
        _err(f"not running (nothing answers at {t.url}); start it with `mlx-supervisor start`")
        return NOT_RUNNING
    except GatewayError as e:
        _err(f"{e}" + (f" (HTTP {e.status})" if e.status else ""))
        return FAILED


def _print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, sort_keys=True))


def table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows, strict=True)]
    return "\n".join("   ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
                     for r in [headers, *rows])


def duration(seconds: float) -> str:
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


# ---------------------------------------------------------------- daemon


def _preflight(t: Target) -> int:
    """The checks ``serve`` would fail on, made before anything is started or stopped (a restart
    with a broken config must not take the running gateway down)."""
    if not t.config_path.exists():
        return OK
    _, problems = config_cmd.problems_of(t.config_path)
    if problems:
        _err(f"{t.config_path}: {len(problems)} problem(s)")
        for key, msg in problems:
            print(f"  {key}: {msg}", file=sys.stderr)
        return USAGE
    return OK


def cmd_start(args: argparse.Namespace, t: Target) -> int:
    return _preflight(t) or daemon.start(t, explicit_config=bool(args.config), timeout=args.timeout)


def cmd_stop(args: argparse.Namespace, t: Target) -> int:
    return daemon.stop(t, args.timeout or daemon.stop_timeout(t))


def cmd_restart(args: argparse.Namespace, t: Target) -> int:
    rc = _preflight(t) or daemon.stop(t, args.timeout or daemon.stop_timeout(t))
    if rc != OK:
        return rc
    return daemon.start(target(args, strict=True), explicit_config=bool(args.config), timeout=args.start_timeout)


def cmd_status(args: argparse.Namespace, t: Target) -> int:
    found = t.locate()
    if found is None:
        if args.json:
            _print_json({"running": False, "url": t.url, "pidfile": str(t.pid_path)})
        else:
            print(f"mlx-supervisor is not running (pidfile {t.pid_path}, url {t.url})")
        return NOT_RUNNING
    pid, url = found
    t.url = url
    try:
        snap = t.get("/admin/ps")
    except NotRunning:
        _err(f"pid {pid} is running but does not answer at {url}")
        return FAILED
    hot = [w for w in snap["workers"] if w["state"] in {s.value for s in HOT}]
    info = t.info
    data = {"running": True, "pid": pid, "url": url, "uptime": snap["uptime"],
            "config": info.config if info else None, "log_file": info.log_file if info else None,
            "hot_models": [w["model"] for w in hot], "used_bytes": snap["used_bytes"],
            "budget_bytes": snap["budget_bytes"], "max_models": snap["max_models"]}
    if args.json:
        _print_json(data)
        return OK
    print(f"mlx-supervisor is running (pid {pid})")
    rows = [("url", url), ("uptime", duration(snap["uptime"])),
            ("memory", f"{format_size(snap['used_bytes'])} used of {format_size(snap['budget_bytes'])} budget"),
            ("models", f"{len(hot)} hot" + (": " + ", ".join(data["hot_models"]) if hot else ""))]
    if data["config"]:
        rows.append(("config", data["config"]))
    if data["log_file"]:
        rows.append(("log", data["log_file"]))
    for k, v in rows:
        print(f"  {k:<7} {v}")
    return OK


def cmd_reload(args: argparse.Namespace, t: Target) -> int:
    return daemon.send_reload(t)


# ---------------------------------------------------------------- workers and models


def _until(w: dict[str, Any]) -> str:
    """When the worker will be unloaded, as ``ollama ps`` says it."""
    if w["pinned"]:
        return "pinned"
    if w["state"] != "ready":
        return "-"
    if w["inflight"]:
        return "busy"
    if not w.get("ttl"):
        return "forever"
    left = w.get("ttl_remaining")
    return "-" if left is None else f"in {duration(left)}"


def cmd_ps(args: argparse.Namespace, t: Target) -> int:
    snap = t.get("/admin/ps")
    if args.json:
        _print_json(snap)
        return OK
    rows = [[w["model"], str(w["pid"] or "-"), w["state"], format_size(w["charged_bytes"]),
             "yes" if w["pinned"] else "no", str(w["inflight"]), _until(w)]
            for w in sorted(snap["workers"], key=lambda w: w["model"])]
    print(table(["NAME", "PID", "STATE", "SIZE", "PINNED", "INFLIGHT", "UNTIL"], rows))
    return OK


def cmd_models(args: argparse.Namespace, t: Target) -> int:
    data = t.get("/v1/models")["data"]
    if args.json:
        _print_json(data)
        return OK
    rows = []
    for m in sorted(data, key=lambda m: m["id"]):
        size = format_size(m["memory"]) if m.get("memory") else "~" + format_size(m.get("estimated_bytes", 0))
        rows.append([m["id"], m.get("state", "-"), m.get("kind", "-"), size,
                     "yes" if m.get("pinned") else "no", ",".join(m.get("aliases") or []) or "-",
                     (m.get("last_error") or "")[:60]])
    print(table(["NAME", "STATE", "KIND", "SIZE", "PINNED", "ALIASES", "LAST ERROR"], rows))
    return OK


def cmd_load(args: argparse.Namespace, t: Target) -> int:
    t0 = time.monotonic()
    body = {"pin": True} if args.pin else {}
    r = t.post(f"/admin/models/{model_path(args.model)}/load", body,
               timeout=t.cfg.load_timeout + t.cfg.queue_timeout + 10)
    pinned = ", pinned" if r.get("pinned") else ""
    print(f"{r['model']} is {r['state']} (pid {r['pid']}{pinned}) after {time.monotonic() - t0:.1f}s")
    return OK


def cmd_unload(args: argparse.Namespace, t: Target) -> int:
    r = t.post(f"/admin/models/{model_path(args.model)}/unload",
               timeout=t.cfg.shutdown_grace + t.cfg.stop_grace + 10)
    print(f"{r['model']} unloaded")
    return OK


def cmd_logs(args: argparse.Namespace, t: Target) -> int:
    info = t.info
    path = Path(info.log_file) if info and info.log_file else daemon.log_files(t)[0]
    return logtail.run(path, args.lines, args.follow, args.worker)


# ---------------------------------------------------------------- service


def cmd_service(args: argparse.Namespace, t: Target) -> int:
    from mlx_supervisor.gateway.cli import service
    platform = args.platform or service.current_platform()
    home = Path.home()
    if args.action == "status":
        installed = service.plist_path(home) if platform == "macos" else service.unit_path(home)
        print(f"unit file: {installed}{'' if installed.exists() else ' (not installed)'}")
        cmd = service.status_command(platform)
        if args.dry_run:
            print("# would run:\n" + " ".join(cmd))
            return OK
        import subprocess

        try:
            return OK if subprocess.call(cmd) == 0 else NOT_RUNNING
        except FileNotFoundError:
            _err(f"{cmd[0]} not found")
            return FAILED
    if args.action == "install":
        if not t.config_path.exists():
            msg = f"no config at {t.config_path}: run `mlx-supervisor config init` (or pass --config)"
            if not args.dry_run:
                _err(msg)
                return FAILED
            print(f"# warning: {msg}")
        log_dir = daemon.log_files(t)[0].parent
        spec = service.Spec(argv=daemon.serve_argv(t.config_path, log_dir / daemon.LOG_NAME),
                            log_dir=log_dir, stop_timeout=int(daemon.stop_timeout(t)),
                            env=service.service_env(), home=home)
        plan = service.install_plan(platform, spec)
        if not args.dry_run:
            log_dir.mkdir(parents=True, exist_ok=True)
    else:
        plan = service.uninstall_plan(platform, home)
    if args.dry_run:
        print(service.describe(plan), end="")
        return OK
    return service.execute(plan)


HANDLERS: dict[str, Handler] = {
    "start": cmd_start, "stop": cmd_stop, "restart": cmd_restart, "status": cmd_status,
    "reload": cmd_reload, "ps": cmd_ps, "models": cmd_models, "load": cmd_load, "unload": cmd_unload,
    "logs": cmd_logs, "service": cmd_service,
}
