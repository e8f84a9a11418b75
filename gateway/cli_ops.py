"""Operational sub-commands: the daemon (start/stop/restart/status), the workers (ps, load,
unload, models), logs, reload, config and the launchd/systemd service.

Each handler is thin: it finds the gateway (gateway/client.py), asks it over HTTP or signals it
(gateway/daemon.py), and prints a table or, with ``--json``, the data as the gateway gave it.
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

from mlx_supervisor.gateway import config_cmd, daemon, logtail
from mlx_supervisor.gateway.client import GatewayError, NotRunning, Target, model_path, target
from mlx_supervisor.shared.config import ConfigError
from mlx_supervisor.shared.sizes import format_size

OK, FAILED, USAGE, NOT_RUNNING = 0, 1, 2, 3
EPILOG = """exit codes: 0 success; 1 failed (refused, timed out, or the gateway answered an error);
2 bad usage or config; 3 the gateway is not running.
`stop` when nothing runs exits 0 ("not running"), so scripts can always call it."""

Handler = Callable[[argparse.Namespace, Target], int]


def _err(msg: str) -> None:
    print(f"mlx-supervisor: {msg}", file=sys.stderr)


def _with_target(fn: Handler, strict: bool = False) -> Callable[[argparse.Namespace], int]:
    """Load the config once, and turn the errors every command shares into their exit codes.
    Only ``strict`` commands (start) refuse a broken config; the rest salvage what they can."""

    def run(args: argparse.Namespace) -> int:
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

    return run


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


def cmd_start(args: argparse.Namespace, t: Target) -> int:
    return daemon.start(t, explicit_config=bool(args.config), timeout=args.timeout)


def cmd_stop(args: argparse.Namespace, t: Target) -> int:
    return daemon.stop(t, args.timeout or daemon.stop_timeout(t))


def cmd_restart(args: argparse.Namespace, t: Target) -> int:
    rc = daemon.stop(t, args.timeout or daemon.stop_timeout(t))
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
    hot = [w for w in snap["workers"] if w["state"] in ("starting", "loading", "ready", "draining")]
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
    from mlx_supervisor.gateway import service

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


# ---------------------------------------------------------------- argparse


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    def add(name: str, fn: Handler, help: str, json_flag: bool = False,
            strict: bool = False) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help, epilog=EPILOG,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        if json_flag:
            p.add_argument("--json", action="store_true", help="print the data as JSON")
        p.set_defaults(func=_with_target(fn, strict))
        return p

    p = add("start", cmd_start, "run the gateway in the background; return once it answers /health",
            strict=True)
    p.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for /health (default 120)")
    p = add("stop", cmd_stop, "stop the gateway: drain requests (shutdown_grace), stop workers; then SIGKILL")
    p.add_argument("--timeout", type=float, help="seconds before SIGKILL (default shutdown_grace + stop_grace + 15)")
    p = add("restart", cmd_restart, "stop, then start", strict=True)
    p.add_argument("--timeout", type=float, help="seconds before SIGKILL when stopping")
    p.add_argument("--start-timeout", type=float, default=120.0, help="seconds to wait for /health")
    add("status", cmd_status, "is the gateway running: pid, uptime, URL, hot models, memory (exit 3 if not)",
        json_flag=True)
    add("reload", cmd_reload, "re-read the config file (SIGHUP); unchanged models keep their workers")
    add("ps", cmd_ps, "the worker processes: NAME PID STATE SIZE PINNED INFLIGHT UNTIL", json_flag=True)
    add("models", cmd_models, "the catalog, with each model's state", json_flag=True)
    p = add("load", cmd_load, "load MODEL now (and keep it loaded with --pin)")
    p.add_argument("model")
    p.add_argument("--pin", action="store_true", help="pin it: never evicted or unloaded by ttl")
    p = add("unload", cmd_unload, "unload MODEL (after its in-flight requests finish); unpins it")
    p.add_argument("model")
    p = add("logs", cmd_logs, "print the gateway's log (the file `start` and the services write)")
    p.add_argument("-f", "--follow", action="store_true", help="keep printing new lines")
    p.add_argument("-n", "--lines", type=int, default=100, help="how many lines to print first (default 100)")
    p.add_argument("--worker", metavar="MODEL", help="only lines about this model and its worker")
    p = add("service", cmd_service, "install, uninstall or inspect the launchd (macOS) / systemd --user (Linux) service")
    p.add_argument("action", choices=["install", "uninstall", "status"])
    p.add_argument("--dry-run", action="store_true", help="print the unit file and the commands; change nothing")
    p.add_argument("--platform", choices=["macos", "linux"], help="the service manager to target (default: this machine's)")
    config_cmd.add_commands(sub, EPILOG)
