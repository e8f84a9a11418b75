"""Pulls against a local fake Hub (gateway/testing/fakehub.py) through ``HF_ENDPOINT``: the real
``huggingface_hub`` client downloads the tiny llama the fixtures build, into a temp cache."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import shutil
import struct
import subprocess
import sys
import termios
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from mlx_supervisor.gateway.testing.fakehub import HubProcess
from mlx_supervisor.gateway.testing.server import ServerProcess, wait_for

REPO = "test-org/tiny-llama"
WEIGHTS = "model.safetensors"
FAKE = {"path": "/nonexistent/fake", "kind": "fake"}


@pytest.fixture(scope="module")
def hub_root(tmp_path_factory: pytest.TempPathFactory, demo_model_dir: Path) -> Path:
    """Repos: the tiny llama (twice), a 3 GB one, a PyTorch-only one, an unknown architecture."""
    root = tmp_path_factory.mktemp("hub") / "repos"
    for name in ("tiny-llama", "tiny-llama-b"):
        shutil.copytree(demo_model_dir, root / "test-org" / name)
    torch = root / "test-org" / "torch-only"
    torch.mkdir(parents=True)
    (torch / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (torch / "pytorch_model.bin").write_bytes(b"\0" * 4096)
    alien = root / "test-org" / "alien"
    alien.mkdir()
    (alien / "config.json").write_text(json.dumps({"model_type": "no-such-architecture"}))
    (alien / WEIGHTS).write_bytes(b"\0" * 4096)
    huge = root / "test-org" / "huge"
    shutil.copytree(demo_model_dir, huge)
    with open(huge / WEIGHTS, "r+b") as f:
        f.truncate(3 * 10**9)  # sparse: 3 GB in the listing, nothing on disk
    return root


def weights_size(hub_root: Path) -> int:
    return (hub_root / REPO / WEIGHTS).stat().st_size


def events(resp: httpx.Response) -> Iterator[dict[str, Any]]:
    for line in resp.iter_lines():
        if line.startswith("data:"):
            yield json.loads(line[5:])


def pull(url: str, body: dict[str, Any], out: list[dict[str, Any]], until: str | None = None) -> None:
    """POST a pull and collect its events (stop reading after the first ``until`` event)."""
    with httpx.stream("POST", url + "/admin/models/pull", json=body, timeout=120) as r:
        assert r.status_code == 200, r.read()
        for ev in events(r):
            out.append(ev)
            if ev["event"] == until:
                return


def chat(url: str, model: str) -> httpx.Response:
    return httpx.post(url + "/v1/chat/completions", timeout=60, json={
        "model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3})


def incomplete(cache: Path, repo: str) -> list[Path]:
    return list((cache / f"models--{repo.replace('/', '--')}" / "blobs").glob("*.incomplete"))


def test_pull_streams_progress_resumes_after_the_hub_dies_and_serves_it(hub_root: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    size = weights_size(hub_root)
    hub = HubProcess(hub_root, rate=size / 8).start()  # about 8 s for the weights
    try:
        with ServerProcess({"other": FAKE}, env=hub.env(cache)) as srv:
            first: list[dict[str, Any]] = []
            t = threading.Thread(target=pull, args=(srv.url, {"repo": REPO}, first))
            t.start()
            wait_for(lambda: any(e["event"] == "progress" and e["bytes"] > 38_000 + size // 4
                                 for e in first), 30, what="a quarter of the weights")
            hub.kill()  # mid-file
            t.join(60)
            kinds = [e["event"] for e in first]
            assert kinds[0] == "started" and kinds[-1] == "error" and "done" not in kinds
            started = first[0]
            assert {f["name"] for f in started["files"]} == {
                "config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", WEIGHTS}
            assert started["total"] == sum(f["size"] for f in started["files"])
            prog = [e for e in first if e["event"] == "progress" and e["file"] == WEIGHTS]
            assert prog and all(e["file_size"] == size and e["total"] == started["total"] for e in prog)
            assert prog[-1]["rate"] > 0 and prog[-1]["eta"] is not None
            assert first[-1]["code"] == "download_failed"
            part = incomplete(cache, REPO)
            assert len(part) == 1 and 0 < part[0].stat().st_size < size
            kept = part[0].stat().st_size
            assert chat(srv.url, "tiny-llama").status_code == 404  # not in the catalog yet

            hub.start(rate=0)  # back, on the same port
            second: list[dict[str, Any]] = []
            pull(srv.url, {"repo": REPO}, second)
            assert second[-1]["event"] == "done" and second[-1]["model"] == "tiny-llama"
            resumed = hub.gets(REPO, WEIGHTS)
            assert [r["range"] for r in resumed] == [f"bytes={kept}-"]
            assert resumed[0]["sent"] == size - kept  # only the rest came over the wire
            assert not incomplete(cache, REPO)

            r = chat(srv.url, "tiny-llama")  # served at once: the drop-in was applied
            assert r.status_code == 200, r.text
            dropin = (srv.workdir / "models.d" / "tiny-llama.toml").read_text()
            assert f'repo = "{REPO}"' in dropin and second[-1]["revision"] in dropin
    finally:
        hub.kill()


def test_two_pulls_of_one_repo_are_one_download_and_a_pull_outlives_its_client_until_cancelled(
        hub_root: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    size = weights_size(hub_root)
    with HubProcess(hub_root, rate=size / 4) as hub, ServerProcess({}, env=hub.env(cache)) as srv:
        a: list[dict[str, Any]] = []
        b: list[dict[str, Any]] = []
        ta = threading.Thread(target=pull, args=(srv.url, {"repo": REPO}, a))
        tb = threading.Thread(target=pull, args=(srv.url, {"repo": REPO}, b))
        ta.start()
        tb.start()
        ta.join(60)
        tb.join(60)
        assert a[-1]["event"] == b[-1]["event"] == "done"
        assert a[0]["id"] == b[0]["id"]  # one pull...
        gets = hub.gets(REPO, WEIGHTS)
        assert len(gets) == 1 and gets[0]["sent"] == size  # ...one download

        # A client that leaves takes nothing with it; another attaches and cancels.
        gone: list[dict[str, Any]] = []
        pull(srv.url, {"repo": "test-org/tiny-llama-b"}, gone, until="started")
        pid = gone[0]["id"]
        listed = httpx.get(srv.url + "/admin/pulls").json()["pulls"]
        assert {"id": pid, "state": "downloading"}.items() <= next(p for p in listed if p["id"] == pid).items()
        attached: list[dict[str, Any]] = []
        with httpx.stream("GET", srv.url + f"/admin/pulls/{pid}", timeout=60) as r:
            for ev in events(r):
                attached.append(ev)
                if ev["event"] == "progress" and ev["file"] == WEIGHTS and len(attached) == 3:
                    c = httpx.delete(srv.url + f"/admin/pulls/{pid}")
                    assert c.status_code == 202 and c.json()["state"] == "cancelling"
        assert attached[0]["event"] == "started"
        assert attached[-1]["event"] == "error" and attached[-1]["code"] == "cancelled"
        assert httpx.delete(srv.url + f"/admin/pulls/{pid}").status_code == 409
        assert httpx.delete(srv.url + "/admin/pulls/pull-nope").status_code == 404
        state = next(p for p in httpx.get(srv.url + "/admin/pulls").json()["pulls"] if p["id"] == pid)
        assert state["state"] == "cancelled" and 0 < state["bytes"] < state["total"]
        assert "tiny-llama-b" not in {m["id"] for m in httpx.get(srv.url + "/v1/models").json()["data"]}
        assert len(incomplete(cache, "test-org/tiny-llama-b")) == 1  # kept, for a resume


def test_refusals_come_from_the_listing_before_any_weights(hub_root: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    token = {"HF_TOKEN": "hf_secret"}
    with HubProcess(hub_root) as hub, \
            ServerProcess({"taken": FAKE}, {"memory_budget": "1GB"}, env={**hub.env(cache), **token}) as srv:
        def post(body: dict[str, Any]) -> httpx.Response:
            return httpx.post(srv.url + "/admin/models/pull", json=body, timeout=60)

        r = post({"repo": "test-org/huge"})  # 3 GB of weights against a 1 GB budget
        err = r.json()["error"]
        assert r.status_code == 413 and err["code"] == "model_too_large" and err["param"] == "repo"
        assert "needs about 3.7 GiB" in err["message"] and "budget of 953.7 MiB" in err["message"]
        r = post({"repo": "test-org/torch-only"})
        assert r.status_code == 422 and r.json()["error"]["code"] == "not_mlx_model"
        assert "no safetensors" in r.json()["error"]["message"] and "pytorch_model.bin" in r.text
        # No file of those two was fetched at all: the listing alone decided.
        assert [q for q in hub.requests() if "/resolve/" in q["path"]] == []
        r = post({"repo": "test-org/alien"})
        assert r.status_code == 422 and "unknown architecture 'no-such-architecture'" in r.text
        assert hub.gets("test-org/alien", "config.json") and not hub.gets("test-org/alien", WEIGHTS)
        assert not list(cache.rglob("*.safetensors")) and not list(cache.rglob("*.incomplete"))
        assert {q["auth"] for q in hub.requests()} == {"Bearer hf_secret"}  # HF_TOKEN went along

        assert post({"repo": "test-org/missing"}).status_code == 404
        assert post({"repo": REPO, "revision": "v9"}).json()["error"]["code"] == "revision_not_found"
        assert post({"repo": "not a repo"}).json()["error"]["param"] == "repo"
        assert post({"repo": REPO, "name": "a/b"}).json()["error"]["param"] == "name"
        r = post({"repo": REPO, "name": "taken"})
        assert r.status_code == 409 and "already exists" in r.text
        assert post({"repo": REPO, "bogus": 1}).status_code == 400


def cli(srv: ServerProcess, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mlx_supervisor.gateway.cli", "--config", str(srv.config),
                           *args], env={**os.environ, **env}, capture_output=True, text=True, timeout=120)


def on_a_tty(srv: ServerProcess, env: dict[str, str], *args: str) -> tuple[int, str]:
    """Run the CLI with a pseudo-terminal as stdout and stderr; its exit code and output."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))  # 120 columns
    proc = subprocess.Popen([sys.executable, "-m", "mlx_supervisor.gateway.cli", "--config",
                             str(srv.config), *args], env={**os.environ, **env},
                            stdout=slave, stderr=slave, stdin=subprocess.DEVNULL)
    os.close(slave)
    out = b""
    while True:
        try:
            chunk = os.read(master, 4096)
        except OSError:  # the child closed its end
            break
        if not chunk:
            break
        out += chunk
    os.close(master)
    return proc.wait(30), out.decode("utf-8", "replace")


def test_cli_pull_draws_bars_on_a_terminal_is_quiet_when_piped_and_rm_takes_it_away(
        hub_root: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    size = weights_size(hub_root)
    with HubProcess(hub_root, rate=size / 3) as hub, ServerProcess({}, env=hub.env(cache)) as srv:
        env = hub.env(cache)
        r = cli(srv, env, "pull", REPO)
        assert r.returncode == 0, r.stderr
        assert r.stdout.splitlines() == [f"pulled {REPO}@{r.stdout.split('@')[1][:12]} as tiny-llama"]
        assert r.stderr == ""
        assert chat(srv.url, "tiny-llama").status_code == 200

        rc, out = on_a_tty(srv, env, "pull", "test-org/tiny-llama-b", "--as", "second", "--pin")
        assert rc == 0, out
        assert "%|" in out and "B/s" in out and WEIGHTS in out and "test-org/tiny-llama-b" in out
        assert "as second" in out
        second = httpx.get(srv.url + "/v1/models/second").json()
        assert second["pinned"] is True  # --pin: pinned, and loading at once (no request needed)
        wait_for(lambda: httpx.get(srv.url + "/v1/models/second").json()["state"] == "ready", 60,
                 what="the pinned pull loaded")
        assert chat(srv.url, "second").status_code == 200

        r = cli(srv, env, "pull", REPO, "--as", "second")
        assert r.returncode == 1 and "already exists" in r.stderr
        assert cli(srv, env, "pull", "nope").returncode == 2

        r = cli(srv, env, "rm", "tiny-llama", "--delete-files")
        assert r.returncode == 0, r.stderr
        assert "deleted test-org/tiny-llama from the cache" in r.stdout
        assert chat(srv.url, "tiny-llama").status_code == 404
        assert not (cache / "models--test-org--tiny-llama").exists()
        assert (cache / "models--test-org--tiny-llama-b").is_dir()  # the same commit, another repo
        assert not (srv.workdir / "models.d" / "tiny-llama.toml").exists()
        assert chat(srv.url, "second").status_code == 200  # the other pull is untouched


def test_only_the_files_a_worker_reads_are_needed() -> None:
    from mlx_supervisor.gateway.models.hub import needed

    wanted = ["config.json", "model-00001-of-00002.safetensors", "model.safetensors.index.json",
              "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
              "chat_template.jinja", "preprocessor_config.json", "processor_config.json",
              "generation_config.json", "modules.json", "1_Pooling/config.json", "vocab.json",
              "merges.txt"]
    unwanted = ["README.md", "pytorch_model.bin", "model.gguf", "original/consolidated.safetensors",
                "original/params.json", ".gitattributes", "flax_model.msgpack", "onnx/model.onnx",
                "figures/benchmark.png", "LICENSE"]
    assert [f for f in wanted if not needed(f)] == []
    assert [f for f in unwanted if needed(f)] == []


def test_cli_pull_add_rm_without_a_gateway_work_on_the_files(hub_root: Path, tmp_path: Path) -> None:
    hf_home, home = tmp_path / "hf-home", tmp_path / "home"
    cache = hf_home / "hub"  # HF_HOME alone decides where the cache is, for the client and for us
    home.mkdir()
    config = home / "config.toml"
    config.write_text(f'run_dir = "{home / "run"}"\nport = 1\n')  # nothing listens there
    with HubProcess(hub_root) as hub:
        env = {k: v for k, v in {**os.environ, **hub.env(cache)}.items() if k != "HF_HUB_CACHE"}
        env["HF_HOME"] = str(hf_home)

        def run(*args: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run([sys.executable, "-m", "mlx_supervisor.gateway.cli", "--config",
                                   str(config), *args], env=env, capture_output=True, text=True, timeout=120)

        r = run("pull", REPO, "--as", "local")
        assert r.returncode == 0, r.stderr
        assert r.stdout.startswith(f"pulled {REPO}@") and "no gateway running" in r.stdout
        assert r.stderr == ""  # piped: no bars anywhere
        assert 'repo = "test-org/tiny-llama"' in (home / "models.d" / "local.toml").read_text()
        r = run("config", "check")
        assert r.returncode == 0 and "ok (1 model(s))" in r.stdout, r.stdout + r.stderr
        assert "not in the local Hugging Face cache" not in r.stderr  # the catalog finds it there
        r = run("add", "again", "--repo", REPO, "--ttl", "60")
        assert r.returncode == 0 and "again.toml" in r.stdout, r.stderr
        r = run("rm", "local", "--delete-files")  # another entry still serves the repo
        assert r.returncode == 1 and "still served as again" in r.stderr
        assert (home / "models.d" / "local.toml").exists()
        assert run("rm", "again").returncode == 0
        r = run("rm", "local", "--delete-files")
        assert r.returncode == 0 and "deleted test-org/tiny-llama" in r.stdout, r.stderr
        assert sorted(p.name for p in (home / "models.d").iterdir()) == []
        assert not (cache / "models--test-org--tiny-llama").exists()
