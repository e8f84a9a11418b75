"""Catalog drop-ins (``models.d/NAME.toml``): reading and atomic writing, and ``add``/``rm``
applied to a running gateway without a restart and without touching other models' workers."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from mlx_supervisor.gateway.testing.server import ServerProcess, wait_for
from mlx_supervisor.shared import dropins
from mlx_supervisor.shared.config import ConfigError, ModelConfig, load

FAKE = {"path": "/nonexistent/fake", "kind": "fake"}


def test_dropins_are_merged_written_atomically_and_bad_ones_name_their_file(tmp_path: Path) -> None:
    (tmp_path / "config.toml").write_text('[models.main]\npath = "/x"\nkind = "fake"\n')
    f = dropins.write(tmp_path, "extra", ModelConfig(repo="o/r", revision="abc", ttl=5, aliases=["e"]))
    assert f == tmp_path / "models.d" / "extra.toml"
    assert [p.name for p in f.parent.iterdir()] == ["extra.toml"]  # no temp file left behind
    text = f.read_text()
    assert 'repo = "o/r"' in text and "ttl = 5" in text and "pinned" not in text  # defaults left out
    cfg = load(tmp_path / "config.toml")
    assert set(cfg.models) == {"main", "extra"}
    assert cfg.models["extra"] == ModelConfig(repo="o/r", revision="abc", ttl=5.0, aliases=["e"])

    with pytest.raises(ValueError, match="bad model name"):
        dropins.write(tmp_path, "../evil", ModelConfig(path="/x"))
    dropins.write(tmp_path, "main", ModelConfig(path="/y"))  # a name the main config has
    with pytest.raises(ConfigError) as e:
        load(tmp_path / "config.toml")
    assert "main.toml" in e.value.problems[0][0] and "already defined" in e.value.problems[0][1]
    assert dropins.remove(tmp_path, "main") and not dropins.remove(tmp_path, "main")
    (tmp_path / "models.d" / "broken.toml").write_text('ttl = "soon"\npath = "/x"\n')
    with pytest.raises(ConfigError) as e:
        load(tmp_path / "config.toml")
    assert "broken.toml" in e.value.problems[0][0] and "ttl" in e.value.problems[0][0]


def cli(srv: ServerProcess, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mlx_supervisor.gateway.cli", "--config", str(srv.config),
                           *args], env=dict(os.environ), capture_output=True, text=True, timeout=120)


def catalog(srv: ServerProcess) -> set[str]:
    return {m["id"] for m in httpx.get(srv.url + "/v1/models").json()["data"]}


def pid_of(srv: ServerProcess, model: str) -> int | None:
    ws = [w for w in httpx.get(srv.url + "/admin/ps").json()["workers"] if w["model"] == model]
    return ws[0]["pid"] if ws else None


def test_add_and_rm_apply_to_a_running_gateway_and_leave_other_workers_alone(
        demo_model_dir: Path, tmp_path: Path) -> None:
    hf = tmp_path / "hf"
    env = {"HF_HUB_CACHE": str(hf)}
    with ServerProcess({"a": FAKE}, {"warm_spare": False}, env=env) as srv:
        assert httpx.post(srv.url + "/admin/models/a/load", timeout=30).status_code == 200
        a_pid = pid_of(srv, "a")
        gw_pid = srv.proc.pid if srv.proc else None

        r = cli(srv, "add", "b", "--path", str(demo_model_dir), "--ttl", "600")
        assert r.returncode == 0, r.stderr
        assert "the gateway serves it now" in r.stdout and catalog(srv) == {"a", "b"}
        chat = httpx.post(srv.url + "/v1/chat/completions", timeout=60, json={
            "model": "b", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3})
        assert chat.status_code == 200, chat.text
        assert (srv.workdir / "models.d" / "b.toml").exists()

        for args, why in ((("add", "b", "--path", str(demo_model_dir)), "already exists"),
                          (("add", "a", "--path", str(demo_model_dir)), "already exists"),
                          (("add", "c", "--path", str(tmp_path / "nope")), "not a directory"),
                          (("add", "c", "--repo", "org/not-cached"), "not in the local Hugging Face cache"),
                          (("add", "c/d", "--path", str(demo_model_dir)), "bad model name"),
                          (("add", "c", "--path", str(demo_model_dir), "--ttl", "-1"), "ttl"),
                          (("rm", "a"), "defined in the main config"),
                          (("rm", "zzz"), "does not exist")):
            r = cli(srv, *args)
            assert r.returncode == 1 and why in r.stderr, (args, r.stderr)
        assert sorted(p.name for p in (srv.workdir / "models.d").iterdir()) == ["b.toml"]
        r = httpx.post(srv.url + "/admin/models", json={"name": "c"})
        assert r.status_code == 400 and "exactly one of `path` or `repo`" in r.text
        r = httpx.post(srv.url + "/admin/models", json={"name": "c", "path": "models/x"})
        assert r.status_code == 400 and r.json()["error"]["param"] == "path"

        b_pid = pid_of(srv, "b")
        assert b_pid is not None
        r = cli(srv, "rm", "b", "--delete-files")  # a local directory: its files stay
        assert r.returncode == 1 and "local directory" in r.stderr and "b" in catalog(srv)
        r = cli(srv, "rm", "b")
        assert r.returncode == 0, r.stderr
        assert catalog(srv) == {"a"} and pid_of(srv, "b") is None  # unloaded first
        assert not (srv.workdir / "models.d" / "b.toml").exists()
        assert (demo_model_dir / "config.json").exists()
        wait_for(lambda: not any(p == b_pid for p in srv.worker_pids()) or None, 10, what="b's worker gone")

        assert pid_of(srv, "a") == a_pid  # untouched the whole time
        assert srv.proc is not None and srv.proc.pid == gw_pid and srv.proc.poll() is None
        assert "reload applied" in srv.log()
