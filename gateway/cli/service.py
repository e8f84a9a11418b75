"""``service install|uninstall|status``: run the gateway under launchd (macOS) or systemd (Linux).

The unit is generated, not copied, so it names this interpreter, this config file and these
directories; the examples in ``deploy/`` are this module's output for placeholder paths (a test
keeps them in sync). Both services run ``serve`` in the foreground, restart it only when it
crashes (a clean exit after SIGTERM, or a bad config's exit 2, is final) and give it long
enough to drain before they kill it.
"""

from __future__ import annotations

import os
import plistlib
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

LABEL = "com.mlx-supervisor"
UNIT = "mlx-supervisor.service"
# Passed through to the service when set here, so it finds the same models and directories.
PASS_ENV = ("MLX_SUPERVISOR_RUN_DIR", "MLX_SUPERVISOR_LOG_DIR", "MLX_SUPERVISOR_DATA_DIR",
            "HF_HOME", "HF_HUB_CACHE")


@dataclass
class Spec:
    """Everything a unit file says; ``argv`` is the foreground ``serve`` command."""

    argv: list[str]
    log_dir: Path
    stop_timeout: int
    env: dict[str, str] = field(default_factory=dict)
    home: Path = field(default_factory=Path.home)


def current_platform() -> str:
    return "macos" if sys.platform == "darwin" else "linux"


def service_env() -> dict[str, str]:
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONUNBUFFERED": "1"}
    env.update({k: os.environ[k] for k in PASS_ENV if os.environ.get(k)})
    return env


# ---------------------------------------------------------------- launchd


def plist_path(home: Path) -> Path:
    return home / "Library" / "LaunchAgents" / f"{LABEL}.plist"


def plist_bytes(spec: Spec) -> bytes:
    out = str(spec.log_dir / "gateway.out")
    return plistlib.dumps({
        "Label": LABEL,
        "ProgramArguments": spec.argv,
        "RunAtLoad": True,
        # Restart after a crash only: a stop (SIGTERM -> exit 0) stays stopped.
        "KeepAlive": {"SuccessfulExit": False},
        "ThrottleInterval": 10,
        # launchd SIGKILLs after ExitTimeOut (default 20s): leave room for the drain.
        "ExitTimeOut": spec.stop_timeout,
        # Interactive: no background throttling of a process that serves people.
        "ProcessType": "Interactive",
        "WorkingDirectory": str(spec.home),
        "StandardOutPath": out,
        "StandardErrorPath": out,
        "EnvironmentVariables": spec.env,
    })


# ---------------------------------------------------------------- systemd


def unit_path(home: Path, env: dict[str, str] | None = None) -> Path:
    xdg = (env if env is not None else os.environ).get("XDG_CONFIG_HOME")
    return (Path(xdg) if xdg else home / ".config") / "systemd" / "user" / UNIT


def _sd_quote(arg: str) -> str:
    """One systemd word: ``%`` and ``$`` escaped, quoted when it has spaces or quotes."""
    arg = arg.replace("%", "%%").replace("$", "$$")
    if any(c in arg for c in " \t\"'\\;"):
        return '"' + arg.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return arg


def unit_text(spec: Spec) -> str:
    env = "\n".join(f"Environment={_sd_quote(f'{k}={v}')}" for k, v in sorted(spec.env.items()))
    return f"""\
# mlx-supervisor: systemd user unit, written by `mlx-supervisor service install`.
[Unit]
Description=mlx-supervisor: MLX models behind one OpenAI-compatible port
After=network.target
StartLimitIntervalSec=300
StartLimitBurst=5

[Service]
Type=exec
ExecStart={" ".join(_sd_quote(a) for a in spec.argv)}
WorkingDirectory={_sd_quote(str(spec.home))}
{env}
# Restart after a crash only; exit 2 is a config the gateway refused: restarting cannot help.
Restart=on-failure
RestartSec=5
RestartPreventExitStatus=2
# SIGTERM to the gateway alone: it drains requests and stops its own workers, then
# whatever is left of the unit is killed after TimeoutStopSec.
KillMode=mixed
TimeoutStopSec={spec.stop_timeout}

[Install]
WantedBy=default.target
"""


# ---------------------------------------------------------------- install / uninstall / status


@dataclass
class Plan:
    """What a command would do: files to write or remove, commands to run (in order)."""

    path: Path
    content: bytes | None  # None: remove ``path``
    commands: list[list[str]]
    tolerate: set[int] = field(default_factory=set)
    """Indexes of commands whose failure is expected (e.g. bootout of a service not loaded)."""


def install_plan(platform: str, spec: Spec) -> Plan:
    if platform == "macos":
        path = plist_path(spec.home)
        domain = f"gui/{os.getuid()}"
        return Plan(path, plist_bytes(spec), [
            ["launchctl", "bootout", f"{domain}/{LABEL}"],
            ["launchctl", "enable", f"{domain}/{LABEL}"],
            ["launchctl", "bootstrap", domain, str(path)],
        ], tolerate={0})
    path = unit_path(spec.home)
    return Plan(path, unit_text(spec).encode(), [
        ["systemctl", "--user", "daemon-reload"],
        ["systemctl", "--user", "enable", "--now", UNIT],
    ])


def uninstall_plan(platform: str, home: Path) -> Plan:
    if platform == "macos":
        path = plist_path(home)
        return Plan(path, None, [["launchctl", "bootout", f"gui/{os.getuid()}/{LABEL}"]], tolerate={0})
    return Plan(unit_path(home), None, [
        ["systemctl", "--user", "disable", "--now", UNIT],
        ["systemctl", "--user", "daemon-reload"],
    ], tolerate={0})


def status_command(platform: str) -> list[str]:
    if platform == "macos":
        return ["launchctl", "print", f"gui/{os.getuid()}/{LABEL}"]
    return ["systemctl", "--user", "status", "--no-pager", UNIT]


def describe(plan: Plan) -> str:
    """The dry-run text: the file (or its removal) and the commands, in order."""
    if plan.content is None:
        head = f"# would remove {plan.path}\n"
    else:
        head = f"# would write {plan.path}:\n{plan.content.decode()}"
        if not head.endswith("\n"):
            head += "\n"
    cmds = "\n".join(" ".join(c) for c in plan.commands)
    return f"{head}# would run:\n{cmds}\n"


def execute(plan: Plan) -> int:
    """Write/remove the file, then run the commands; the first unexpected failure stops it."""
    if plan.content is None:
        plan.path.unlink(missing_ok=True)
        print(f"removed {plan.path}")
    else:
        plan.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = plan.path.with_suffix(".tmp")
        tmp.write_bytes(plan.content)
        tmp.replace(plan.path)
        print(f"wrote {plan.path}")
    for i, cmd in enumerate(plan.commands):
        print("$ " + " ".join(cmd))
        try:
            rc = subprocess.call(cmd)
        except FileNotFoundError:
            rc = 127
            print(f"mlx-supervisor: {cmd[0]} not found", file=sys.stderr)
        if rc != 0 and i not in plan.tolerate:
            print(f"mlx-supervisor: `{' '.join(cmd)}` failed with exit code {rc}", file=sys.stderr)
            return 1
    return 0


# ---------------------------------------------------------------- deploy/ examples

EXAMPLE_HOME = {"macos": Path("/Users/you"), "linux": Path("/home/you")}


def example_spec(platform: str) -> Spec:
    """The spec behind ``deploy/``'s example files: placeholder paths, the default layout."""
    home = EXAMPLE_HOME[platform]
    py = home / ".venvs" / "mlx-supervisor" / "bin" / "python"
    logs = home / "Library" / "Logs" / "mlx-supervisor" if platform == "macos" \
        else home / ".local" / "state" / "mlx-supervisor" / "log"
    argv = [str(py), "-m", "mlx_supervisor.gateway.cli", "--config",
            str(home / ".config" / "mlx-supervisor" / "config.toml"), "serve", "--log-file",
            str(logs / "gateway.log")]
    return Spec(argv=argv, log_dir=logs, stop_timeout=50, home=home,
                env={"PATH": "/opt/homebrew/bin:/usr/bin:/bin" if platform == "macos" else "/usr/bin:/bin",
                     "PYTHONUNBUFFERED": "1"})


def example_files() -> dict[str, bytes]:
    return {f"{LABEL}.plist": plist_bytes(example_spec("macos")),
            UNIT: unit_text(example_spec("linux")).encode()}


def write_examples(directory: str | Path) -> None:
    """Regenerate ``deploy/``'s examples: ``python -c 'from mlx_supervisor.gateway.cli.service
    import write_examples; write_examples("deploy")'``."""
    for name, data in example_files().items():
        (Path(directory) / name).write_bytes(data)
