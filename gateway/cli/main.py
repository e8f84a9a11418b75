"""``mlx-supervisor`` command line. Each sub-command lives in the module that does its job;
this file only wires argparse to them, so ``--help`` stays fast (no heavy imports here)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

Handler = Callable[[argparse.Namespace], int]

EXIT_CODES = """exit codes:
  0  success (`stop` when nothing is running is a success too)
  1  the command failed (refused, timed out, or the gateway answered an error)
  2  bad usage or a config that cannot be used
  3  the gateway is not running (`status`, and commands that need a running gateway)"""


def _serve(args: argparse.Namespace) -> int:
    from mlx_supervisor.gateway.serve import run

    return run(args)


def _demo_model(args: argparse.Namespace) -> int:
    # Built in a child interpreter: the gateway process never imports mlx.
    import subprocess

    cmd = [sys.executable, "-m", "mlx_supervisor.worker.demo.lm", args.dir, "--seed", str(args.seed)]
    return subprocess.call(cmd)


CONFIG_HELP = "config file (default: $MLX_SUPERVISOR_CONFIG or ~/.config/mlx-supervisor/config.toml)"


def _config_everywhere(parser: argparse.ArgumentParser) -> None:
    """``--config FILE`` before or after any sub-command, and in every sub-command's ``--help``.
    Below the top level it defaults to SUPPRESS, so an absent one keeps the top level's value."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                if not any("--config" in a.option_strings for a in child._actions):
                    child.add_argument("--config", default=argparse.SUPPRESS, metavar="FILE", help=CONFIG_HELP)
                _config_everywhere(child)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mlx-supervisor", description=__doc__, epilog=EXIT_CODES,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", metavar="FILE", help=CONFIG_HELP)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("serve", help="run the gateway in the foreground")
    s.add_argument("--host", help="bind address (default 127.0.0.1)")
    s.add_argument("--port", type=int, help="port (default 8080)")
    s.add_argument("--demo", action="store_true", help="serve the built-in demo models")
    s.add_argument("--insecure-no-auth", action="store_true", help="allow a non-loopback bind without an API key")
    s.add_argument("--log-format", choices=["text", "json"])
    s.add_argument("--log-file", help="log to this file, rotated by size, instead of stderr (used by `start`)")
    s.set_defaults(func=_serve)

    d = sub.add_parser("demo-model", help="build the tiny demo llama into DIR")
    d.add_argument("dir")
    d.add_argument("--seed", type=int, default=0)
    d.set_defaults(func=_demo_model)

    # Operational commands register themselves here (daemon, service, jobs, ...).
    for module in ("mlx_supervisor.gateway.cli.ops", "mlx_supervisor.gateway.cli.jobs",
                   "mlx_supervisor.gateway.cli.catalog_cmd"):
        try:
            mod = __import__(module, fromlist=["add_commands"])
        except ModuleNotFoundError:
            continue
        mod.add_commands(sub)
    _config_everywhere(p)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    func: Handler = args.func
    return func(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
