"""Operational sub-commands, wired to argparse: the daemon (start/stop/restart/status), the
workers (ps, load, unload, models), logs, reload, config and the launchd/systemd service.

Only argparse is imported here; each handler's module (gateway/cli/commands.py) is imported when it
runs, so ``mlx-supervisor --help`` stays fast.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

EPILOG = """exit codes: 0 success; 1 failed (refused, timed out, or the gateway answered an error);
2 bad usage or config; 3 the gateway is not running.
`stop` when nothing runs exits 0 ("not running"), so scripts can always call it."""


def _lazy(name: str, strict: bool) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        from mlx_supervisor.gateway.cli import commands
        return commands.run(name, args, strict)

    return run


def _config(args: argparse.Namespace) -> int:
    """``config ...`` works on files, never on a gateway (nor needs the config to be valid)."""
    from mlx_supervisor.gateway.cli import config_cmd
    action = {"check": config_cmd.check, "init": config_cmd.init, "paths": config_cmd.show_paths}
    return action[args.config_command](args)


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    def add(name: str, help: str, json_flag: bool = False, strict: bool = False,
            parent: argparse._SubParsersAction[argparse.ArgumentParser] = sub) -> argparse.ArgumentParser:
        p = parent.add_parser(name, help=help, description=help, epilog=EPILOG,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
        if json_flag:
            p.add_argument("--json", action="store_true", help="print the data as JSON")
        p.set_defaults(func=_config if name == "config" or parent is not sub else _lazy(name, strict))
        return p

    p = add("start", "run the gateway in the background; return once it answers /health",
            strict=True)
    p.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for /health (default 120)")
    p = add("stop", "stop the gateway: drain requests (shutdown_grace), stop workers; then SIGKILL")
    p.add_argument("--timeout", type=float, help="seconds before SIGKILL (default shutdown_grace + stop_grace + 15)")
    p = add("restart", "stop, then start", strict=True)
    p.add_argument("--timeout", type=float, help="seconds before SIGKILL when stopping")
    p.add_argument("--start-timeout", type=float, default=120.0, help="seconds to wait for /health")
    add("status", "is the gateway running: pid, uptime, URL, hot models, memory (exit 3 if not)",
        json_flag=True)
    add("reload", "re-read the config file (SIGHUP); unchanged models keep their workers")
    add("ps", "the worker processes: NAME PID STATE SIZE PINNED INFLIGHT UNTIL", json_flag=True)
    add("models", "the catalog, with each model's state", json_flag=True)
    p = add("load", "load MODEL now (and keep it loaded with --pin)")
    p.add_argument("model")
    p.add_argument("--pin", action="store_true", help="pin it: never evicted or unloaded by ttl")
    p = add("unload", "unload MODEL (after its in-flight requests finish); unpins it")
    p.add_argument("model")
    p = add("logs", "print the gateway's log (the file `start` and the services write)")
    p.add_argument("-f", "--follow", action="store_true", help="keep printing new lines")
    p.add_argument("-n", "--lines", type=int, default=100, help="how many lines to print first (default 100)")
    p.add_argument("--worker", metavar="MODEL", help="only lines about this model and its worker")
    p = add("service", "install, uninstall or inspect the launchd (macOS) / systemd --user (Linux) service")
    p.add_argument("action", choices=["install", "uninstall", "status"])
    p.add_argument("--dry-run", action="store_true", help="print the unit file and the commands; change nothing")
    p.add_argument("--platform", choices=["macos", "linux"], help="the service manager to target (default: this machine's)")

    c = add("config", "check or create the config file; show where everything lives")
    csub = c.add_subparsers(dest="config_command", required=True, metavar="ACTION")
    p = add("check", "validate FILE (default: the config in use): every problem with its key path",
            parent=csub)
    p.add_argument("file", nargs="?")
    p = add("init", "write the documented example config to FILE (default: the config path)", parent=csub)
    p.add_argument("file", nargs="?")
    p.add_argument("--force", action="store_true", help="overwrite an existing file")
    add("paths", "where the config, pidfile, logs and data live", parent=csub)
