"""The CLI's offline parts: help and exit codes, ``config check|init``, the example config kept
complete and in sync, log rotation, and ``logs`` filtering and following across rotation."""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest

from mlx_supervisor.gateway import pidfile
from mlx_supervisor.gateway.cli import config_cmd, logtail
from mlx_supervisor.gateway.logs import setup_logging
from mlx_supervisor.gateway.testing.cli import CLIHome, fake
from mlx_supervisor.shared.config import (
    Config,
    LedgerConfig,
    ModelConfig,
    VisionConfig,
    loads,
    semantic_problems,
)

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def home(tmp_path: Path) -> Iterator[CLIHome]:
    h = CLIHome(tmp_path, {"a": fake()})
    try:
        yield h
    finally:
        h.cleanup()


def test_help_documents_the_exit_codes(home: CLIHome) -> None:
    r = home.cli("--help")
    assert r.returncode == 0
    assert "exit codes:" in r.stdout and "3  the gateway is not running" in r.stdout
    for cmd in ("start", "stop", "status", "ps", "load", "unload", "models", "logs", "reload", "service"):
        assert re.search(rf"^\s+{cmd}\s", r.stdout, re.M), cmd
    r = home.cli("status", "--help")
    assert r.returncode == 0 and "3 the gateway is not running" in r.stdout and "--json" in r.stdout
    assert home.cli("frobnicate").returncode == 2


# ---------------------------------------------------------------- the example config


def _sections(text: str) -> dict[str, str]:
    """Text of each table in the example, commented-out lines included ("" = top level)."""
    out: dict[str, str] = {"": ""}
    current = ""
    for line in text.splitlines():
        m = re.match(r"^#?\s*\[([A-Za-z0-9_.\"-]+)\]\s*$", line)
        if m:
            current = "models" if m.group(1).startswith("models.") else m.group(1)
            out.setdefault(current, "")
            continue
        out[current] += line + "\n"
    return out


def test_example_config_documents_every_setting_and_parses() -> None:
    text = config_cmd.example_text()
    assert (REPO / "deploy" / "config.example.toml").read_text() == text, \
        "deploy/config.example.toml must be a copy of gateway/cli/templates/config.example.toml"
    sections = _sections(text)
    nested = {"ledger": LedgerConfig, "vision": VisionConfig, "models": ModelConfig}
    for section, struct in [("", Config), *nested.items()]:
        for field in msgspec.structs.fields(struct):
            if section == "" and field.name in nested:
                continue
            assert re.search(rf"^#?\s*{field.name}\s*=", sections.get(section, ""), re.M), \
                f"{struct.__name__}.{field.name} is not documented in [{section or 'top level'}]"
    cfg = loads(text, "example")
    assert semantic_problems(cfg, 64 * 2**30) == []
    # Uncommented settings show the defaults, so the example behaves like no config at all.
    defaults = Config()
    for field in msgspec.structs.fields(Config):
        if field.name != "models":
            assert getattr(cfg, field.name) == getattr(defaults, field.name), field.name


def test_config_init_writes_the_example_and_check_accepts_it(home: CLIHome) -> None:
    target = home.root / "new" / "config.toml"
    r = home.cli("config", "init", str(target))
    assert r.returncode == 0 and target.read_text() == config_cmd.example_text()
    r = home.cli("config", "init", str(target))
    assert r.returncode == 1 and "--force" in r.stderr
    assert home.cli("config", "init", "--force", str(target)).returncode == 0
    r = home.cli("config", "check", str(target))
    assert r.returncode == 0 and "ok (1 model(s))" in r.stdout
    assert "not in the local Hugging Face cache" in r.stderr  # a warning, not an error
    # Without FILE, the config in use ($MLX_SUPERVISOR_CONFIG) is checked.
    r = home.cli("config", "check")
    assert r.returncode == 0 and str(home.config) in r.stdout


def test_config_check_names_each_problem_by_key_path(home: CLIHome) -> None:
    bad = home.root / "bad.toml"
    bad.write_text('port = "eighty"\n[models.m]\npath = "/x"\nttl = "long"\n')
    r = home.cli("config", "check", str(bad))
    assert r.returncode == 1
    assert "$.port: Expected `int`, got `str`" in r.stderr
    assert "$.models.m.ttl: Expected `float | null`, got `str`" in r.stderr
    bad.write_text(f'memory_budget = "lots"\n[models.m]\npath = "{home.root}/nope"\nttl = -1\n'
                   '[models.n]\npath = "/nonexistent/fake"\nkind = "fake"\naliases = ["m"]\n')
    r = home.cli("config", "check", str(bad))
    assert r.returncode == 1 and "4 problem(s)" in r.stderr
    for key in ("$.memory_budget:", "$.models.m.path: not a directory", "$.models.m.ttl:",
                "$.models.n.aliases: 'm' is already used"):
        assert key in r.stderr, key
    r = home.cli("config", "check", str(home.root / "absent.toml"))
    assert r.returncode == 1 and "cannot read" in r.stderr


# ---------------------------------------------------------------- pidfile


def test_pidfile_claims_once_and_a_reused_pid_reads_as_stale(tmp_path: Path) -> None:
    path = tmp_path / "run" / "gateway.pid"
    me = pidfile.this_process("http://127.0.0.1:1", None, None)
    # Our own live pid with another creation time: the pid was reused, the gateway is gone.
    reused = pidfile.PidInfo(pid=me.pid, url=me.url, started=me.started - 3600)
    assert pidfile.alive(me) and not pidfile.alive(reused)
    pidfile.claim(path, reused)
    pidfile.claim(path, me)  # replaces the stale one
    assert pidfile.read(path) == me and oct(path.parent.stat().st_mode & 0o777) == "0o700"
    other = pidfile.PidInfo(pid=1, url="http://x", started=0.0)
    with pytest.raises(pidfile.AlreadyRunning):
        pidfile.claim(path, pidfile.PidInfo(pid=me.pid + 10**6, url="u", started=0.0))
    pidfile.release(path, other.pid)  # not its pidfile: kept
    assert path.exists()
    pidfile.release(path)
    assert not path.exists() and list(path.parent.iterdir()) == []


# ---------------------------------------------------------------- logs


def test_the_log_file_rotates_by_size(tmp_path: Path) -> None:
    root = logging.getLogger()
    saved, level = list(root.handlers), root.level
    try:
        handler = setup_logging(Config(), log_file=tmp_path / "logs" / "gateway.log", max_bytes=2000, backups=2)
        for i in range(100):
            logging.getLogger("mlx_supervisor.test").info("event %03d model=a pid=1", i)
        handler.close()
    finally:
        for h in list(root.handlers):
            root.removeHandler(h)
        for h in saved:
            root.addHandler(h)
        root.setLevel(level)
    files = sorted(p.name for p in (tmp_path / "logs").iterdir())
    assert files == ["gateway.log", "gateway.log.1", "gateway.log.2"]
    assert all((tmp_path / "logs" / f).stat().st_size <= 2000 for f in files)
    last = (tmp_path / "logs" / "gateway.log").read_text().splitlines()[-1]
    assert re.match(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} INFO +mlx_supervisor.test \[-\] event 099", last)


def test_worker_filter_matches_only_that_model() -> None:
    pat = logtail.model_filter("a")
    assert pat is not None
    assert pat.search("x [a pid=12] loading") and pat.search("model=a pid=3 ready") and pat.search("model=a")
    assert not pat.search("model=ab pid=3") and not pat.search("[ab pid=1]")
    assert logtail.model_filter(None) is None


def test_follow_survives_rotation(tmp_path: Path) -> None:
    log = tmp_path / "gateway.log"
    log.write_text("old\n")
    seen: list[str] = []
    gen = logtail.follow(log, None, poll=0.02)
    # range first: zip must stop before asking the (endless) generator for a fourth line
    t = threading.Thread(target=lambda: [seen.append(x) for _, x in zip(range(3), gen, strict=False)],
                         daemon=True)
    t.start()
    time.sleep(0.2)
    with open(log, "a") as f:
        f.write("one\n")
    time.sleep(0.2)
    log.rename(tmp_path / "gateway.log.1")
    log.write_text("two\nthree\n")
    t.join(5)
    assert seen == ["one", "two", "three"]


def _commands(parser: object, prefix: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], object]]:
    import argparse

    assert isinstance(parser, argparse.ArgumentParser)
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                yield (*prefix, name), child
                yield from _commands(child, (*prefix, name))


def test_config_goes_before_or_after_every_sub_command_and_is_in_each_help(home: CLIHome) -> None:
    from mlx_supervisor.gateway.cli.main import build_parser

    parser = build_parser()
    commands = list(_commands(parser))
    assert len(commands) > 15
    for names, sub in commands:
        assert "--config FILE" in sub.format_help(), names  # type: ignore[attr-defined]
    assert parser.parse_args(["--config", "a.toml", "ps"]).config == "a.toml"
    assert parser.parse_args(["ps", "--config", "b.toml"]).config == "b.toml"
    assert parser.parse_args(["config", "check", "--config", "c.toml"]).config == "c.toml"
    assert parser.parse_args(["ps"]).config is None
    # For real: a config named after the sub-command is the one used.
    other = home.root / "other.toml"
    other.write_text("max_models = 'x'\n")
    r = home.cli("config", "check", "--config", str(other))
    assert r.returncode == 1 and "max_models" in r.stdout + r.stderr
    r = home.cli("serve", "--config", str(other))
    assert r.returncode == 2 and "max_models" in r.stderr
