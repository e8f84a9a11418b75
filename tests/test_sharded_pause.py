"""Flow control in the sharded engine, on two real ring-backend ranks of the demo llama.

In-process: rank 0's :class:`ShardedEngine` runs in a child process this test starts (the
ring backend's threads outlive a group, so not in pytest's own), stepped one step at a time by
a script, with a real follower as rank 1. Every command rank 0 broadcasts is recorded: that is
exactly the work every other rank does. A paused request gets no STEP (no rank decodes it) while
the next one runs, and on resume it gives the tokens of an unpaused run, greedy and seeded; a
cancel while paused drops its slot on every rank and the ranks stay in step.

End to end: a sharded group behind a real gateway; a stream whose client does not read is
paused in the group while another client is answered, and once it reads again it gets exactly
the unpaused greedy text.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from mlx_supervisor.gateway.supervisor.group import free_port_block
from mlx_supervisor.gateway.testing.server import ServerProcess, non_reader, wait_for
from mlx_supervisor.shared.protocol import Chunk, Done, Generate
from mlx_supervisor.worker.testing import drive

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "Once upon a time there was a little robot"
CHAT = [{"role": "user", "content": PROMPT}]
LOOPBACK2 = ["127.0.0.1", "127.0.0.1"]


# ---------------------------------------------------------------- in-process: rank 0's side


def _a(**kw: Any) -> Generate:
    return Generate(id="a", prompt=PROMPT, **{"max_tokens": 40, "temperature": 0.0, **kw})


def _b(**kw: Any) -> Generate:
    return Generate(id="b", messages=CHAT, **{"max_tokens": 12, "temperature": 0.0, **kw})


SEEDED = {"temperature": 0.9, "top_p": 0.95, "seed": 7}
SCRIPTS: dict[str, dict[int, list[Any]]] = {
    "alone_a": {0: [_a()]},
    "alone_b": {0: [_b()]},
    "alone_sa": {0: [_a(**SEEDED)]},
    # a is paused after a few tokens, b runs meanwhile, then a resumes
    "greedy": {0: [_a()], 3: [("pause", "a")], 4: [_b()], 30: [("resume", "a")]},
    "seeded": {0: [_a(**SEEDED)], 3: [("pause", "a")], 4: [_b()], 30: [("resume", "a")]},
    # resumed while b still decodes: the oldest unpaused (a) goes on, b waits its turn
    "early": {0: [_a()], 3: [("pause", "a")], 4: [_b(max_tokens=30)], 9: [("resume", "a")]},
    "cancel": {0: [_a()], 3: [("pause", "a")], 5: [("cancel", "a")], 6: [("resume", "a")],
               7: [_b()]},
}


def rank0_main(path: str, out: str) -> None:
    """Rank 0 in a child process: run every script and write what happened as JSON."""
    from mlx_supervisor.worker.engines.shard_group import STEP
    from mlx_supervisor.worker.engines.sharded import ShardedEngine
    from mlx_supervisor.worker.sharding import ShardSpec

    engine = ShardedEngine(ShardSpec(ranks=2, hosts=tuple(LOOPBACK2)))
    engine.load(path)
    assert engine.chan is not None
    sent: list[tuple[int, int]] = []
    send = engine.chan.send

    def record(code: int, slot: int = 0, payload: bytes = b"") -> None:
        sent.append((code, slot))
        send(code, slot, payload)

    engine.chan.send = record  # type: ignore[method-assign]
    results: dict[str, Any] = {}
    for name, script in SCRIPTS.items():
        sent.clear()
        results[name] = _run(engine, script, sent, STEP)
    Path(out).write_text(json.dumps(results))
    engine.close()
    os._exit(0)


def _run(engine: Any, script: dict[int, list[Any]], sent: list[tuple[int, int]],
         step_code: int) -> dict[str, Any]:
    """:func:`drive` rank 0 through ``script``. Per step: the ids that got a message and the
    slots every rank stepped; per request: its text, and whether it was done."""
    steps: list[dict[str, Any]] = []
    slots: dict[str, int] = {}
    seen = [len(sent)]  # only step() sends STEP: those since the last step are this step's

    def on_step(got: set[str]) -> None:
        slots.update({rid: st.slot for rid, st in engine.live.items()})
        steps.append({"got": sorted(got),
                      "stepped": [s for c, s in sent[seen[0]:] if c == step_code]})
        seen[0] = len(sent)

    out = drive(engine, script, on_step, limit=2000)
    assert not engine.live and not engine.paused and not engine.queue
    return {"steps": steps, "slots": slots, "sent": sent[:],
            "text": {rid: "".join(m.text for m in ms if isinstance(m, Chunk))
                     for rid, ms in out.items()},
            "done": {rid: [m.completion_tokens for m in ms if isinstance(m, Done)]
                     for rid, ms in out.items()}}


@pytest.fixture(scope="module")
def scripted(demo_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("shard-pause")
    port = free_port_block(2)
    hostfile = tmp / "ring.json"
    hostfile.write_text(json.dumps([[f"127.0.0.1:{port}"], [f"127.0.0.1:{port + 1}"]]))
    out = tmp / "out.json"
    env = {**os.environ, "MLX_HOSTFILE": str(hostfile)}
    rank0 = [sys.executable, "-c", "import sys; sys.path.insert(0, sys.argv[1]); "
             "from tests.test_sharded_pause import rank0_main; rank0_main(sys.argv[2], sys.argv[3])",
             str(ROOT), str(demo_model_dir), str(out)]
    rank1 = [sys.executable, "-m", "mlx_supervisor.worker", "--endpoint", "ipc:///nowhere",
             "--worker-id", "r1", "--kind", "lm", "--model-id", "tp", "--path",
             str(demo_model_dir), "--ranks", "2", "--hosts", ",".join(LOOPBACK2)]
    logs = [tmp / "rank0.log", tmp / "rank1.log"]
    procs = [subprocess.Popen(cmd, env={**env, "MLX_RANK": str(r)}, cwd=ROOT,
                              stdout=subprocess.DEVNULL, stderr=logs[r].open("wb"))
             for r, cmd in enumerate((rank0, rank1))]
    try:
        codes = [p.wait(timeout=300) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert codes == [0, 0], [lg.read_text()[-3000:] for lg in logs]
    results: dict[str, Any] = json.loads(out.read_text())
    return results


@pytest.mark.parametrize("name,alone", [("greedy", "alone_a"), ("seeded", "alone_sa")])
def test_a_paused_request_takes_no_step_on_any_rank_and_resumes_exactly(
        scripted: dict[str, Any], name: str, alone: str) -> None:
    run, ref_a, ref_b = scripted[name], scripted[alone], scripted["alone_b"]
    a, b = run["slots"]["a"], run["slots"]["b"]
    steps = run["steps"]
    assert all(s["stepped"] == [a] for s in steps[:3])  # a decodes alone
    paused = steps[3:30]
    assert all(a not in s["stepped"] and "a" not in s["got"] for s in paused)
    assert sum(s["stepped"] == [b] for s in paused) == 12, paused  # b ran, and finished
    assert run["done"]["b"] == [12] and run["text"]["b"] == ref_b["text"]["b"]
    assert all(s["stepped"] in ([a], []) for s in steps[30:])
    assert run["text"]["a"] == ref_a["text"]["a"] and run["done"]["a"] == ref_a["done"]["a"]
    # one STEP per token, as alone: none lost, none taken while paused
    assert sum(s["stepped"] == [a] for s in steps) == sum(len(s["stepped"]) for s in ref_a["steps"])


def test_a_resumed_request_goes_first_and_the_other_waits_its_turn(
        scripted: dict[str, Any]) -> None:
    run = scripted["early"]
    a, b = run["slots"]["a"], run["slots"]["b"]
    order = [s for st in run["steps"] for s in st["stepped"]]
    assert order[:3] == [a] * 3 and order[3:8] == [b] * 5  # b started while a was paused
    assert order[8:] == [a] * 37 + [b] * 25  # a resumed: the oldest unpaused decodes
    assert run["text"]["a"] == scripted["alone_a"]["text"]["a"]


def test_cancel_while_paused_drops_its_slot_on_every_rank(scripted: dict[str, Any]) -> None:
    from mlx_supervisor.worker.engines.shard_group import STOP

    run = scripted["cancel"]
    a = run["slots"]["a"]
    assert [tuple(c) for c in run["sent"]].count((STOP, a)) == 1
    assert run["done"]["a"] == [] and "a" not in {g for s in run["steps"][3:] for g in s["got"]}
    # the ranks are still in step: b decodes what it decodes alone
    assert run["text"]["b"] == scripted["alone_b"]["text"]["b"] and run["done"]["b"] == [12]


# ---------------------------------------------------------------- end to end, through a gateway


@pytest.fixture(scope="module")
def srv(demo_model_dir: Path) -> Iterator[ServerProcess]:
    models = {"tp": {"path": str(demo_model_dir), "hosts": LOOPBACK2, "backend": "ring",
                     "context_length": 200_000}}
    # stream_buffer 512: on a loaded box the gateway can fall hundreds of the tiny model's
    # messages behind its worker, and the 4x cap counts those still in flight when Pause went
    # out (a worker that ignores Pause is test_flow_control's case, not this one).
    server = ServerProcess(models, settings={"write_timeout": 20.0, "heartbeat_timeout": 20.0,
                                             "stream_buffer": 512})
    with server:
        yield server
    assert not server.orphans, f"left behind: {server.orphans}"


def _chat(srv: ServerProcess, max_tokens: int) -> dict[str, Any]:
    r = httpx.post(srv.url + "/v1/chat/completions", timeout=300, json={
        "model": "tp", "messages": CHAT, "max_tokens": max_tokens, "temperature": 0.0})
    assert r.status_code == 200, r.text
    data: dict[str, Any] = r.json()
    return data


def _flow(srv: ServerProcess, rid: str) -> list[tuple[str, str]]:
    """Rank 0's pause/resume log lines for ``rid``: (verb, tokens so far)."""
    return re.findall(rf"{rid} (paused|resumed) after (\d+) tokens", srv.log())


_last: dict[str, list[tuple[str, str]]] = {}


def _settled(srv: ServerProcess, rid: str) -> list[tuple[str, str]] | None:
    """The flow events once the last is a pause and nothing changed since the last poll."""
    now, before = _flow(srv, rid), _last.get(rid)
    _last[rid] = now
    return now if now == before and now and now[-1][0] == "paused" else None


def _rank0_cpu(srv: ServerProcess) -> float:
    """CPU seconds used so far by rank 0, which drives every step of every rank. (The others
    cannot tell: the ring backend polls while a rank waits in a collective, so an idle
    follower uses most of a core, paused or not.)"""
    ps = httpx.get(srv.url + "/admin/ps", timeout=10).json()
    (w,) = [w for w in ps["workers"] if w["model"] == "tp"]
    return sum(psutil.Process(w["ranks"][0]["pid"]).cpu_times()[:2])


def _non_reader(srv: ServerProcess, rid: str) -> socket.socket:
    return non_reader(srv.port, {"model": "tp", "messages": CHAT, "max_tokens": 150_000,
                                 "temperature": 0.0, "stream": True}, rid)


def test_a_non_reading_stream_pauses_in_the_group_and_another_is_served(
        srv: ServerProcess) -> None:
    reference = _chat(srv, 20)["choices"][0]["message"]["content"]
    sock = _non_reader(srv, "nr")
    try:
        wait_for(lambda: _flow(srv, "nr"), 60, what="the non-reader paused")
        good = _chat(srv, 20)  # one request decodes at a time: nr no longer holds the group
        assert good["choices"][0]["message"]["content"] == reference
        job = httpx.get(f"{srv.url}/v1/jobs/nr", timeout=10).json()
        assert job["status"] == "processing", job  # still there, paused: not finished first
        # The socket's buffers fill in steps (a few Resumes) until nothing more drains.
        seen = wait_for(lambda: _settled(srv, "nr"), 60, step=1.0, what="the stream stayed paused")
        cpu = _rank0_cpu(srv)
        time.sleep(3)
        used = _rank0_cpu(srv) - cpu
        assert _flow(srv, "nr") == seen, seen
        assert all(p == r for (_, p), (_, r) in zip(seen[::2], seen[1::2], strict=False)), seen
        # Decoding on would take about a core; paused, rank 0 sends no step and only beats.
        assert used < 1.0, f"rank 0 used {used:.2f} CPU-s in 3 s with its one request paused"
    finally:
        sock.close()  # the gateway cancels it: its slot is dropped on every rank
    wait_for(lambda: "nr cancelled" in srv.log(), 60, what="the cancel")
    assert _chat(srv, 20)["choices"][0]["message"]["content"] == reference  # still in step


def test_a_slow_reader_resumes_with_the_unpaused_greedy_text(srv: ServerProcess) -> None:
    n = 3500
    reference = _chat(srv, n)["choices"][0]["message"]["content"]
    small = httpx.HTTPTransport(socket_options=[(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)])
    body = {"model": "tp", "messages": CHAT, "max_tokens": n, "temperature": 0.0,
            "stream": True}
    with httpx.Client(transport=small, timeout=120) as client, client.stream(
            "POST", srv.url + "/v1/chat/completions", json=body,
            headers={"x-request-id": "slow"}) as r:
        wait_for(lambda: _flow(srv, "slow"), 60, what="the slow reader paused")
        assert _chat(srv, 8)["usage"]["completion_tokens"] == 8  # served meanwhile
        text = ""
        for line in r.iter_lines():
            if line.startswith("data: {"):
                event = json.loads(line[6:])
                assert "choices" in event, event
                for choice in event["choices"]:
                    text += choice["delta"].get("content") or ""
    flow = _flow(srv, "slow")
    assert len(flow) >= 2 and [v for v, _ in flow] == ["paused", "resumed"] * (len(flow) // 2)
    # not one token decoded while paused
    assert all(p == r for (_, p), (_, r) in zip(flow[::2], flow[1::2], strict=True)), flow
    assert text == reference
