"""``service install|uninstall --dry-run`` through the real CLI, for systemd and launchd, and the
``deploy/`` examples kept equal to what the generator writes."""

from __future__ import annotations

import plistlib
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from mlx_supervisor.gateway.cli import service
from mlx_supervisor.gateway.testing.cli import CLIHome, fake

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def home(tmp_path: Path) -> Iterator[CLIHome]:
    h = CLIHome(tmp_path, {"a": fake()})
    h.env["HOME"] = str(tmp_path / "home")
    h.env.pop("XDG_CONFIG_HOME", None)
    try:
        yield h
    finally:
        h.cleanup()


def serve_args(argv: list[str], home: CLIHome) -> None:
    """The service runs this interpreter's ``serve`` on this config, logging to the log dir."""
    assert argv[:3] == [sys.executable, "-m", "mlx_supervisor.gateway.cli"]
    assert argv[3:] == ["--config", str(home.config), "serve", "--log-file", str(home.log_dir / "gateway.log")]


def test_install_dry_run_on_linux_prints_the_unit_and_commands(home: CLIHome) -> None:
    r = home.cli("service", "install", "--dry-run", "--platform", "linux")
    assert r.returncode == 0, r.stderr
    unit_path = Path(home.env["HOME"]) / ".config" / "systemd" / "user" / "mlx-supervisor.service"
    head, _, rest = r.stdout.partition("\n")
    assert head == f"# would write {unit_path}:"
    unit, _, commands = rest.partition("# would run:\n")
    assert commands.splitlines() == ["systemctl --user daemon-reload",
                                     "systemctl --user enable --now mlx-supervisor.service"]
    lines = unit.splitlines()
    exec_start = next(v for v in lines if v.startswith("ExecStart="))
    serve_args(exec_start[len("ExecStart="):].split(" "), home)
    for want in ("Restart=on-failure", "RestartPreventExitStatus=2", "KillMode=mixed",
                 "TimeoutStopSec=23", "WantedBy=default.target", "[Unit]", "[Service]", "[Install]",
                 f"Environment=MLX_SUPERVISOR_RUN_DIR={home.run_dir}"):
        assert want in lines, want
    assert not unit_path.exists(), "a dry run writes nothing"

    r = home.cli("service", "uninstall", "--dry-run", "--platform", "linux")
    assert r.returncode == 0
    assert r.stdout.splitlines() == [f"# would remove {unit_path}", "# would run:",
                                     "systemctl --user disable --now mlx-supervisor.service",
                                     "systemctl --user daemon-reload"]


def test_install_dry_run_for_macos_writes_a_valid_launchd_plist(home: CLIHome) -> None:
    r = home.cli("service", "install", "--dry-run", "--platform", "macos")
    assert r.returncode == 0, r.stderr
    plist_path = Path(home.env["HOME"]) / "Library" / "LaunchAgents" / "com.mlx-supervisor.plist"
    head, _, rest = r.stdout.partition("\n")
    assert head == f"# would write {plist_path}:"
    body, _, commands = rest.partition("# would run:\n")
    plist = plistlib.loads(body.encode())
    assert plist["Label"] == "com.mlx-supervisor"
    serve_args(plist["ProgramArguments"], home)
    assert plist["RunAtLoad"] is True
    assert plist["KeepAlive"] == {"SuccessfulExit": False}
    assert plist["ThrottleInterval"] >= 10 and plist["ExitTimeOut"] == 23
    assert plist["StandardOutPath"] == plist["StandardErrorPath"] == str(home.log_dir / "gateway.out")
    env = plist["EnvironmentVariables"]
    assert env["MLX_SUPERVISOR_LOG_DIR"] == str(home.log_dir) and "PATH" in env
    uid = subprocess.run(["id", "-u"], capture_output=True, text=True).stdout.strip()
    assert commands.splitlines()[-1] == f"launchctl bootstrap gui/{uid} {plist_path}"


def test_install_refuses_without_a_config_file(home: CLIHome) -> None:
    home.config.unlink()
    r = home.cli("service", "install", "--platform", "linux")
    assert r.returncode == 1 and "config init" in r.stderr
    assert not (Path(home.env["HOME"]) / ".config").exists()


def test_deploy_examples_are_the_generators_output() -> None:
    for name, data in service.example_files().items():
        on_disk = (REPO / "deploy" / name).read_bytes()
        assert on_disk == data, (f"deploy/{name} is out of date; regenerate: python -c 'from "
                                 "mlx_supervisor.gateway.cli.service import write_examples; write_examples(\"deploy\")'")
    plist = plistlib.loads((REPO / "deploy" / "com.mlx-supervisor.plist").read_bytes())
    assert plist["KeepAlive"] == {"SuccessfulExit": False} and plist["RunAtLoad"] is True


def test_systemd_words_are_quoted_and_escaped() -> None:
    spec = service.Spec(argv=["/opt/my venv/bin/python", "-m", "x", "50%", "$HOME"], log_dir=Path("/l"),
                        stop_timeout=5, home=Path("/h"))
    line = next(v for v in service.unit_text(spec).splitlines() if v.startswith("ExecStart="))
    assert line == 'ExecStart="/opt/my venv/bin/python" -m x 50%% $$HOME'
