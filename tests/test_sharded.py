"""Sharded models on mlx.distributed: two real ring-backend ranks of the demo llama on loopback,
started by mlx.launch through a real gateway; the config checks; the formation timeout."""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from mlx_supervisor.gateway.supervisor.group import free_port_block
from mlx_supervisor.gateway.testing.server import ServerProcess, alive
from mlx_supervisor.shared.config import ModelConfig, loads, semantic_problems
from mlx_supervisor.shared.protocol import Hello
from mlx_supervisor.shared.sizes import read_model_config

LOOPBACK2 = ["127.0.0.1", "127.0.0.1"]
PROMPT = "Once upon a time there was a little robot"


def ps(srv: ServerProcess) -> dict[str, Any]:
    r = httpx.get(srv.url + "/admin/ps", timeout=10)
    r.raise_for_status()
    data: dict[str, Any] = r.json()
    return data


def worker(srv: ServerProcess, model: str) -> dict[str, Any] | None:
    return next((w for w in ps(srv)["workers"] if w["model"] == model), None)


def complete(srv: ServerProcess, model: str, max_tokens: int = 24) -> httpx.Response:
    return httpx.post(srv.url + "/v1/completions", timeout=120, json={
        "model": model, "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0})



def group_pids(w: dict[str, Any]) -> list[int]:
    return [w["pid"], *(r["pid"] for r in w["ranks"])]


@pytest.fixture(scope="module")
def srv(demo_model_dir: Path) -> Iterator[ServerProcess]:
    """One gateway: the demo llama plain and as two tensor-parallel ranks, plus two sharded
    entries that cannot form. ``max_models = 1``: each model evicts the one before."""
    cfg = read_model_config(demo_model_dir)
    assert cfg["num_attention_heads"] % 2 == 0 and cfg["num_key_value_heads"] % 2 == 0
    path = str(demo_model_dir)
    models = {
        "plain": {"path": path},
        "tp": {"path": path, "hosts": LOOPBACK2, "backend": "ring"},
        "pp": {"path": path, "hosts": LOOPBACK2, "parallel": "pipeline"},
        "mpi": {"path": path, "hosts": LOOPBACK2, "backend": "mpi"},
        "far": {"path": path, "hosts": ["127.0.0.1", "192.0.2.1"], "formation_timeout": 10.0},
    }
    # stream_buffer 512, as in test_sharded_pause: the tiny model outruns a loaded box's
    # client, and the messages already on their way when the Pause lands can pass 4 x 64, so
    # a stream these tests read would be cut as slow_consumer (a flow-control limit, not what
    # they test; CI saw it once in the kill -9 test).
    server = ServerProcess(models, settings={"max_models": 1, "heartbeat_timeout": 20.0,
                                             "max_crashes": 10, "stream_buffer": 512})
    with server:
        yield server
    assert not server.orphans, f"left behind: {server.orphans}"


def test_sharded_greedy_output_equals_unsharded_and_eviction_frees_every_rank(
        srv: ServerProcess) -> None:
    r = complete(srv, "tp")
    assert r.status_code == 200, r.text
    sharded = r.json()["choices"][0]["text"]
    snap = ps(srv)
    (tp,) = [w for w in snap["workers"] if w["model"] == "tp"]
    ranks = tp["ranks"]
    assert [x["rank"] for x in ranks] == [0, 1]
    assert all(x["host"] == "127.0.0.1" and x["local"] and alive(x["pid"]) for x in ranks)
    assert all(x["bytes"] > 20 * 2**20 for x in ranks), ranks  # each a real process with MLX
    assert ranks[0]["pid"] != ranks[1]["pid"] and tp["pid"] not in (ranks[0]["pid"], ranks[1]["pid"])
    # The ledger charges the group: every local rank, not just rank 0.
    assert snap["used_bytes"] == tp["charged_bytes"] >= 0.9 * sum(x["bytes"] for x in ranks)
    assert tp["charged_bytes"] > max(x["bytes"] for x in ranks)

    r = complete(srv, "plain")  # max_models = 1: evicts the group
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == sharded
    snap = ps(srv)
    assert [w["model"] for w in snap["workers"]] == ["plain"]
    assert snap["used_bytes"] == snap["workers"][0]["charged_bytes"]
    assert not [pid for pid in group_pids(tp) if alive(pid)]


def test_a_grammar_runs_on_every_rank_alike(srv: ServerProcess) -> None:
    """response_format on the sharded group: every rank masks with its own matcher, so the
    ranks stay in step and the answer is the unsharded one, and valid."""
    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0,
                                                     "maximum": 999},
                                               "ok": {"type": "boolean"}},
              "required": ["n", "ok"]}

    def ask(model: str) -> str:
        r = httpx.post(srv.url + "/v1/chat/completions", timeout=120, json={
            "model": model, "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 40,
            "temperature": 0, "response_format": {"type": "json_schema", "json_schema": {
                "name": "x", "schema": schema}}})
        assert r.status_code == 200, r.text
        text: str = r.json()["choices"][0]["message"]["content"]
        return text

    sharded = ask("tp")
    assert set(json.loads(sharded)) == {"n", "ok"}
    assert ask("plain") == sharded


def test_a_cancelled_stream_leaves_the_ranks_in_step(srv: ServerProcess) -> None:
    """The client goes away mid-stream: rank 0 tells the other ranks to stop too, and the next
    request (and one stopped by a stop string) still decodes the same tokens on every rank."""
    reference = complete(srv, "tp").json()["choices"][0]["text"]
    body = {"model": "tp", "prompt": PROMPT, "max_tokens": 1000, "temperature": 0, "stream": True}
    with httpx.stream("POST", srv.url + "/v1/completions", json=body, timeout=60) as r:
        lines = 0
        for line in r.iter_lines():
            lines += bool(line.startswith("data:"))
            if lines == 3:
                break  # closes the connection: the gateway cancels the request
    stop = reference[5:8]
    r = httpx.post(srv.url + "/v1/completions", timeout=60, json={
        "model": "tp", "prompt": PROMPT, "max_tokens": 24, "temperature": 0, "stop": [stop]})
    assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] == "stop", r.text
    assert reference.startswith(r.json()["choices"][0]["text"])
    assert complete(srv, "tp").json()["choices"][0]["text"] == reference
    w = worker(srv, "tp")
    assert w is not None and w["inflight"] == 0 and all(alive(x["pid"]) for x in w["ranks"])


def test_kill_9_of_rank_1_mid_stream_fails_the_stream_and_the_next_request_reforms(
        srv: ServerProcess) -> None:
    assert complete(srv, "tp", max_tokens=2).status_code == 200
    before = worker(srv, "tp")
    assert before is not None and len(before["ranks"]) == 2
    rank1 = before["ranks"][1]["pid"]
    client = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0, timeout=60)
    stream = client.completions.create(model="tp", prompt=PROMPT, max_tokens=1500,
                                       temperature=0, stream=True)
    got = 0
    killed_at = 0.0
    with pytest.raises(openai.APIError) as e:
        for _ in stream:
            got += 1
            if got == 3:
                os.kill(rank1, signal.SIGKILL)
                killed_at = time.monotonic()
    assert killed_at, "the stream ended before the kill"
    # Rank 0's own error names the group; the gateway's (the group reaped first) names the model.
    assert "sharded group" in str(e.value) or "worker for model 'tp'" in str(e.value), str(e.value)
    time.sleep(max(0.0, killed_at + 3.0 - time.monotonic()))
    assert not [pid for pid in group_pids(before) if alive(pid)], "a rank survived"
    r = complete(srv, "tp", max_tokens=4)
    assert r.status_code == 200, r.text
    after = worker(srv, "tp")
    assert after is not None and len(after["ranks"]) == 2
    assert not set(group_pids(after)) & set(group_pids(before))


def test_a_group_that_cannot_form_fails_its_load_with_the_reason(srv: ServerProcess) -> None:
    t0 = time.monotonic()
    r = complete(srv, "pp")  # llama has no pipeline() in mlx-lm
    assert r.status_code == 503 and "pipelin" in r.json()["error"]["message"], r.text
    r = complete(srv, "mpi")
    assert r.status_code == 503 and "mpirun" in r.json()["error"]["message"], r.text
    # TEST-NET-1: ssh cannot reach it (refused at once, or rank 0 gives up after 10 s).
    r = complete(srv, "far")
    msg = r.json()["error"]["message"]
    assert r.status_code == 503 and "sharded group failed: rank" in msg, r.text
    assert "rank 1 on 192.0.2.1" in msg or "did not form within formation_timeout" in msg, msg
    assert time.monotonic() - t0 < 90
    assert not [w for w in ps(srv)["workers"] if w["model"] in ("pp", "mpi", "far")]


def test_config_check_refuses_unshardable_models(demo_model_dir: Path) -> None:
    cfg = loads("")
    path = str(demo_model_dir)
    cfg.models = {
        "three": ModelConfig(path=path, hosts=["127.0.0.1"] * 3),  # 4 heads, 2 kv heads
        "pipe": ModelConfig(path=path, hosts=["127.0.0.1"] * 3, parallel="pipeline"),
        "names": ModelConfig(path=path, hosts=["127.0.0.1", "node-b"]),
        "remote0": ModelConfig(path=path, hosts=["192.0.2.7", "127.0.0.1"]),
        "one": ModelConfig(path=path, hosts=["127.0.0.1"]),
        "vision": ModelConfig(path=path, hosts=LOOPBACK2, kind="vlm"),
        "ok": ModelConfig(path=path, hosts=LOOPBACK2),
    }
    problems = semantic_problems(cfg, 2**34)
    by_model: dict[str, str] = {}
    for key, msg in problems:
        by_model[key.split(".")[2]] = by_model.get(key.split(".")[2], "") + msg + "\n"
    assert "num_attention_heads divisible by 3" in by_model["three"]
    assert "num_key_value_heads divisible by 3" in by_model["three"]
    assert "at least 3 layers" in by_model["pipe"]
    assert "needs IP addresses" in by_model["names"]
    assert "must be this machine" in by_model["remote0"]
    assert "at least 2 hosts" in by_model["one"]
    assert "only text models" in by_model["vision"]
    assert "ok" not in by_model


def test_rank_0_gives_up_when_the_group_does_not_form(workers: Any, demo_model_dir: Path,
                                                     tmp_path: Path) -> None:
    """Rank 1 never starts: with the ring backend mx.distributed.init would wait for good
    (holding the GIL); the formation timer ends rank 0 (SIGALRM), which mlx.launch reports."""
    port = free_port_block(2)
    hostfile = tmp_path / "ring.json"
    hostfile.write_text(json.dumps([[f"127.0.0.1:{port}"], [f"127.0.0.1:{port + 1}"]]))
    w = workers.spawn("tp", "lm", demo_model_dir,
                      env={"MLX_HOSTFILE": str(hostfile), "MLX_RANK": "0"},
                      extra=["--ranks", "2", "--hosts", "127.0.0.1,127.0.0.1",
                             "--formation-timeout", "2"])
    assert isinstance(w.recv(timeout=30), Hello)
    t0 = time.monotonic()
    assert w.wait(30) == -signal.SIGALRM
    assert time.monotonic() - t0 < 20
    assert "formation_timeout 2s" in w.stderr()


def test_the_launcher_names_the_failed_rank_and_the_cause(tmp_path: Path) -> None:
    from mlx_supervisor.worker.group_launch import explain

    hf = tmp_path / "h.json"
    hf.write_text(json.dumps({"hosts": [{"ssh": "127.0.0.1", "ips": ["127.0.0.1"]},
                                        {"ssh": "10.0.0.2", "ips": ["10.0.0.2"]}]}))
    argv = ["--hostfile", str(hf), "--", "-m", "w", "--formation-timeout", "7"]
    lines = explain(["Node with rank 0 exited with code -15",
                     "Node with rank 1 exited with code 255"], argv)
    assert lines[0] == "sharded group failed: rank 1 on 10.0.0.2 exited with code 255: " \
                       "ssh could not reach the host"
    assert "stopped by the launcher" in lines[1]
    (alarm,) = explain(["Node with rank 0 exited with code -14"], argv)
    assert "did not form within formation_timeout (7s)" in alarm
    assert explain(["Node with rank 1 completed"], argv) == []
