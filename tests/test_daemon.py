"""The daemon through the real CLI: start/status/load/ps/stop, a refused second start, a stale
pidfile, SIGHUP reload that keeps hot workers, SIGTERM drain, and a start that fails loudly.
Fake workers (real processes, no MLX) keep it fast; every process is killed even on failure."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from mlx_supervisor.gateway.testing.cli import CLIHome, fake
from mlx_supervisor.gateway.testing.server import ServerProcess, wait_for


@pytest.fixture
def home(tmp_path: Path) -> Iterator[CLIHome]:
    h = CLIHome(tmp_path, {"a": fake(), "b": fake()})
    try:
        yield h
    finally:
        h.cleanup()


def js(r: subprocess.CompletedProcess[str]) -> Any:
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)



def start(home: CLIHome) -> int:
    r = home.cli("start")
    assert r.returncode == 0, r.stderr + home.log()
    assert home.url in r.stdout
    return int(json.loads(home.pidfile.read_text())["pid"])


def test_start_status_load_ps_stop_leaves_nothing(home: CLIHome) -> None:
    r = home.cli("status")
    assert r.returncode == 3 and "not running" in r.stdout

    pid = start(home)
    r = home.cli("start")
    assert r.returncode == 1 and f"already running (pid {pid})" in r.stderr
    r = home.cli("serve", timeout=30)  # a foreground gateway is refused by the pidfile too
    assert r.returncode == 1 and f"already running from {home.pidfile} (pid {pid}" in r.stderr

    st = js(home.cli("status", "--json"))
    assert st["running"] and st["pid"] == pid and st["url"] == home.url and st["hot_models"] == []
    r = home.cli("status")
    assert r.returncode == 0 and f"running (pid {pid})" in r.stdout and "budget" in r.stdout

    r = home.cli("load", "a", "--pin")
    assert r.returncode == 0 and "a is ready" in r.stdout and "pinned" in r.stdout, r.stderr
    workers = js(home.cli("ps", "--json"))["workers"]
    assert [(w["model"], w["state"], w["pinned"]) for w in workers] == [("a", "ready", True)]
    worker_pid = workers[0]["pid"]
    table = home.cli("ps").stdout.splitlines()
    assert table[0].split() == ["NAME", "PID", "STATE", "SIZE", "PINNED", "INFLIGHT", "UNTIL"]
    assert table[1].split()[:3] == ["a", str(worker_pid), "ready"] and table[1].endswith("pinned")
    models = {m["id"]: m["state"] for m in js(home.cli("models", "--json"))}
    assert models == {"a": "ready", "b": "cold"}
    assert js(home.cli("status", "--json"))["hot_models"] == ["a"]

    r = home.cli("load", "nope")
    assert r.returncode == 1 and "does not exist" in r.stderr
    r = home.cli("logs", "--worker", "a")
    assert r.returncode == 0 and f"[a pid={worker_pid}]" in r.stdout and "model=b" not in r.stdout

    r = home.cli("stop")
    assert r.returncode == 0 and "stopped" in r.stdout, r.stderr
    assert not home.pidfile.exists()
    assert home.wait_gone(5) == [], "a process of ours outlived stop"
    assert home.cli("status").returncode == 3
    r = home.cli("stop")
    assert r.returncode == 0 and "not running" in r.stdout
    assert home.cli("ps").returncode == 3


def test_a_stale_pidfile_is_recovered_from(home: CLIHome) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    home.run_dir.mkdir(mode=0o700)
    home.pidfile.write_text(json.dumps({"pid": dead.pid, "url": home.url, "started": time.time() - 60}))
    assert home.cli("status").returncode == 3
    r = home.cli("start")
    assert r.returncode == 0, r.stderr + home.log()
    assert f"stale pidfile {home.pidfile} (pid {dead.pid} is gone)" in r.stdout
    assert js(home.cli("status", "--json"))["pid"] != dead.pid
    assert home.cli("stop").returncode == 0
    assert home.wait_gone(5) == []


def test_sighup_applies_catalog_and_budget_without_restarting_hot_workers(home: CLIHome) -> None:
    home.write({"a": fake(), "c": fake()})
    start(home)
    assert home.cli("load", "a").returncode == 0
    assert home.cli("load", "c").returncode == 0
    pid_a = {w["model"]: w["pid"] for w in js(home.cli("ps", "--json"))["workers"]}["a"]

    home.write({"a": fake(), "b": fake()}, {"memory_budget": "2GB"})  # add b, remove c, new budget
    r = home.cli("reload")
    assert r.returncode == 0, r.stderr
    wait_for(lambda: {m["id"] for m in js(home.cli("models", "--json"))} == {"a", "b"})
    snap = wait_for(lambda: (s := js(home.cli("ps", "--json"))) and len(s["workers"]) == 1 and s)
    assert [(w["model"], w["pid"], w["state"]) for w in snap["workers"]] == [("a", pid_a, "ready")]
    assert snap["budget_bytes"] == 2 * 10**9
    r = home.cli("load", "b")
    assert r.returncode == 0, r.stderr

    # A broken file on SIGHUP is logged and ignored; the running config and workers stay.
    home.config.write_text(home.config.read_text() + "\nport = [\n")
    assert home.cli("reload").returncode == 0
    wait_for(lambda: "reload rejected, keeping the running config" in home.log())
    workers = {w["model"]: w["pid"] for w in js(home.cli("ps", "--json"))["workers"]}
    assert workers["a"] == pid_a and set(workers) == {"a", "b"}
    assert home.cli("stop").returncode == 0  # a broken config never locks us out of stop
    assert home.wait_gone(5) == []


def test_a_bad_config_is_refused_before_anything_starts_or_stops(home: CLIHome) -> None:
    pid = start(home)
    good = home.config.read_text()
    home.write({"real": {"path": str(home.root / "missing-model"), "kind": "lm"}})
    for cmd in ("restart", "start"):
        r = home.cli(cmd)
        assert r.returncode == 2 and "$.models.real.path: not a directory" in r.stderr, (cmd, r.stderr)
    assert js(home.cli("status", "--json"))["pid"] == pid  # still the same gateway
    home.config.write_text(good)
    assert home.cli("stop").returncode == 0


def test_a_start_that_fails_prints_the_log_tail_and_leaves_nothing(home: CLIHome) -> None:
    with socket.socket() as busy:  # someone else holds our port
        busy.bind(("127.0.0.1", home.port))
        busy.listen()
        r = home.cli("start", "--timeout", "30")
    assert r.returncode == 1
    assert "exited with code" in r.stderr and "address already in use" in r.stderr.lower(), r.stderr
    assert not home.pidfile.exists() and home.wait_gone(5) == []


def test_sigterm_drains_in_flight_requests_and_removes_the_pidfile(tmp_path: Path) -> None:
    """A foreground ``serve`` writes the pidfile too, so ``status`` sees it; SIGTERM lets the
    stream in flight finish, stops the worker and exits 0."""
    (tmp_path / "srv").mkdir()
    srv = ServerProcess(models={"slow": fake(FAKE_TOKEN_DELAY=0.05)}, workdir=tmp_path / "srv")
    home = CLIHome(tmp_path / "cli", {})
    home.env["MLX_SUPERVISOR_CONFIG"] = str(srv.config)
    home.env["MLX_SUPERVISOR_RUN_DIR"] = str(srv.workdir / "run")
    try:
        srv.start()
        st = js(home.cli("status", "--json"))
        assert st["pid"] == srv.proc.pid if srv.proc else False
        first = threading.Event()
        out: dict[str, Any] = {}

        def stream() -> None:
            body = {"model": "slow", "prompt": "hi", "max_tokens": 30, "stream": True}
            with httpx.stream("POST", srv.url + "/v1/completions", json=body, timeout=30) as resp:
                chunks = []
                for line in resp.iter_lines():
                    if line.startswith("data: {"):
                        chunks.append(json.loads(line[6:]))
                        first.set()
                out["chunks"] = chunks

        t = threading.Thread(target=stream)
        t.start()
        assert first.wait(20), srv.log()
        assert srv.proc is not None
        os.kill(srv.proc.pid, signal.SIGTERM)
        t.join(30)
        finish = [c["choices"][0].get("finish_reason") for c in out["chunks"] if c.get("choices")]
        assert "length" in finish, out
        text = "".join(c["choices"][0].get("text", "") for c in out["chunks"] if c.get("choices"))
        assert text.split() == [f"tok{i}" for i in range(30)]
        assert srv.proc.wait(30) == 0
        assert not (srv.workdir / "run" / "gateway.pid").exists()
        assert home.cli("status").returncode == 3
    finally:
        srv.stop()
        home.cleanup()
    assert srv.orphans == []


def test_stop_kills_a_hung_gateway_after_its_timeout_and_leaves_nothing(home: CLIHome) -> None:
    pid = start(home)
    assert home.cli("load", "a").returncode == 0
    os.kill(pid, signal.SIGSTOP)  # hung: ignores SIGTERM until killed
    r = home.cli("stop", "--timeout", "2")
    assert r.returncode == 0 and "did not stop within 2s: killed it" in r.stderr, r.stderr
    assert not home.pidfile.exists() and home.wait_gone(5) == []
