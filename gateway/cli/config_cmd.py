"""``config check|init|paths``: validate a config before a gateway refuses it, write the example.

The example lives in ``gateway/cli/templates/config.example.toml`` (package data, so ``config init``
works from a wheel); ``deploy/config.example.toml`` is a byte-for-byte copy for readers of the
repository, and a test keeps the two equal and checks that every setting is documented.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mlx_supervisor.gateway import pidfile
from mlx_supervisor.gateway.cli.client import config_file
from mlx_supervisor.shared import paths
from mlx_supervisor.shared.config import Config, ConfigError, load, semantic_problems

# Next to this module rather than importlib.resources: an editable install of our
# namespace-mapped packages has no resource reader, and a wheel installs it as a plain file.
EXAMPLE = Path(__file__).with_name("templates") / "config.example.toml"


def example_text() -> str:
    return EXAMPLE.read_text(encoding="utf-8")


def problems_of(path: Path) -> tuple[Config | None, list[tuple[str, str]]]:
    """Every problem of the file at ``path``: types first; semantics only once it parses."""
    import psutil

    try:
        cfg = load(path)
    except ConfigError as e:
        return None, e.problems
    return cfg, semantic_problems(cfg, psutil.virtual_memory().total)


def check(args: argparse.Namespace) -> int:
    path = Path(args.file).expanduser() if args.file else config_file(args)
    cfg, problems = problems_of(path)
    if problems:
        print(f"{path}: {len(problems)} problem(s)", file=sys.stderr)
        for key, msg in problems:
            print(f"  {key}: {msg}", file=sys.stderr)
        return 1
    assert cfg is not None
    import psutil

    from mlx_supervisor.gateway import catalog
    _, _, warnings = catalog.build(cfg, psutil.virtual_memory().total)
    for w in warnings:
        print(f"warning: {w}", file=sys.stderr)
    print(f"{path}: ok ({len(cfg.models)} model(s))")
    return 0


def init(args: argparse.Namespace) -> int:
    path = Path(args.file).expanduser() if args.file else config_file(args)
    if path.exists() and not args.force:
        print(f"mlx-supervisor: {path} exists; pass --force to overwrite it", file=sys.stderr)
        return 1
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(example_text(), encoding="utf-8")
    print(f"wrote {path}; edit its [models] and check it with `mlx-supervisor config check`")
    return 0


def show_paths(args: argparse.Namespace) -> int:
    from mlx_supervisor.gateway.catalog import hf_cache_dir

    path = config_file(args)
    try:
        cfg = load(path) if path.exists() else Config()
    except ConfigError:
        cfg = Config()
    rows = [("config", f"{path}{'' if path.exists() else ' (missing)'}"),
            ("run dir", str(pidfile.run_dir_for(cfg))), ("pidfile", str(pidfile.path_for(cfg))),
            ("log dir", str(pidfile.log_dir_for(cfg))), ("data dir", str(paths.data_dir())),
            ("hf cache", str(hf_cache_dir()))]
    for k, v in rows:
        print(f"{k:<9} {v}")
    return 0
