"""The request ledger under attack and under faults, against a real gateway: a reused request id
never overwrites an earlier request's row, a full disk degrades the ledger and it heals by
itself when space returns, and a gateway killed mid-stream leaves honest rows."""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from mlx_supervisor.gateway.testing.server import ServerProcess

from ._kit import chat_body, fake, wait_for

CHAT = "/v1/chat/completions"


def _job(srv: ServerProcess, rid: str, **params: Any) -> dict[str, Any]:
    r = httpx.get(f"{srv.url}/v1/jobs/{rid}", params=params, timeout=10)
    assert r.status_code == 200, r.text
    data: dict[str, Any] = r.json()
    return data


def test_a_reused_request_id_is_a_second_row_never_an_overwrite() -> None:
    with ServerProcess({"fake": fake()}) as srv:
        h = {"x-request-id": "reused-1"}
        first = httpx.post(srv.url + CHAT, json=chat_body("fake", max_tokens=3), headers=h, timeout=30)
        second = httpx.post(srv.url + CHAT, json=chat_body("fake", max_tokens=7), headers=h, timeout=30)
        assert first.status_code == second.status_code == 200
        latest = _job(srv, "reused-1")
        assert latest["usage"]["completion_tokens"] == 7
        assert len(latest["earlier"]) == 1
        older = _job(srv, "reused-1", seq=latest["earlier"][0]["seq"])
        assert older["usage"]["completion_tokens"] == 3 and older["status"] == "completed"
        listed = httpx.get(srv.url + "/v1/jobs", timeout=10).json()["data"]
        assert [j["usage"]["completion_tokens"] for j in listed if j["id"] == "reused-1"] == [7, 3]
    assert srv.orphans == []


@contextlib.contextmanager
def _tiny_disk(size: str = "2m") -> Any:
    """A real, tiny file system (tmpfs) that can be filled up. Needs root (the test machines
    run tests as root); unmounted afterwards."""
    where = Path(tempfile.mkdtemp(prefix="mlxsup-tinydisk-"))
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], check=True)
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)
        with contextlib.suppress(OSError):
            where.rmdir()


def _fill(path: Path) -> None:
    """Write until the file system refuses (ENOSPC)."""
    with open(path, "wb") as f:
        block = b"\0" * 65536
        for _ in range(10_000):  # bounded: 640 MB at most, far past any tmpfs here
            try:
                f.write(block)
                f.flush()
            except OSError as e:
                assert e.errno == errno.ENOSPC, e
                return
    raise AssertionError("the tiny disk never filled")


def _health(srv: ServerProcess) -> dict[str, Any]:
    data: dict[str, Any] = httpx.get(srv.url + "/health", timeout=10).json()
    return data


def test_a_full_disk_degrades_the_ledger_and_it_heals_without_a_restart() -> None:
    assert os.geteuid() == 0, "this test mounts a tmpfs, which needs root"
    with _tiny_disk() as disk, ServerProcess({"fake": fake()}, {"ledger": {"path": str(disk / "l.sqlite3")}}) as srv:
        ok = httpx.post(srv.url + CHAT, json=chat_body("fake"), headers={"x-request-id": "before"}, timeout=30)
        assert ok.status_code == 200 and _job(srv, "before")["status"] == "completed"
        filler = disk / "filler"
        with contextlib.suppress(OSError):
            _fill(filler)
        for i in range(30):  # serving never stops; the ledger's writes start failing
            r = httpx.post(srv.url + CHAT, json=chat_body("fake", f"while full {i} " + "x" * 2000),
                           timeout=30)
            assert r.status_code == 200, r.text
            if _health(srv)["ledger"]["status"] == "degraded":
                break
        health = _health(srv)
        assert health["ledger"]["status"] == "degraded", health
        assert any("ledger" in w for w in health["warnings"])
        wait_for(lambda: _health(srv)["ledger"]["dropped_records"] > 0, 10)
        filler.unlink()  # space returns
        t0 = time.monotonic()
        wait_for(lambda: _health(srv)["ledger"]["status"] == "ok", 30, step=0.2)
        assert time.monotonic() - t0 < 30
        after = httpx.post(srv.url + CHAT, json=chat_body("fake"), headers={"x-request-id": "after"}, timeout=30)
        assert after.status_code == 200
        assert wait_for(lambda: _job(srv, "after")["status"] == "completed", 10)
        metrics = httpx.get(srv.url + "/metrics", timeout=10).text
        dropped = [line for line in metrics.splitlines()
                   if line.startswith("mlx_supervisor_ledger_dropped_records_total")]
        assert dropped and float(dropped[0].split()[-1]) > 0, dropped
        assert "warnings" not in _health(srv) or not any("ledger" in w for w in _health(srv)["warnings"])
    assert srv.orphans == []


def test_rows_left_by_a_killed_gateway_have_their_tokens_and_last_seen_time() -> None:
    workdir = Path(tempfile.mkdtemp(prefix="mlxsup-"))
    models = {"slow": fake(FAKE_TOKEN_DELAY=0.02)}
    srv = ServerProcess(models, workdir=workdir).start()
    try:
        seen = 0
        with httpx.stream("POST", srv.url + CHAT, json=chat_body("slow", max_tokens=5000, stream=True),
                          headers={"x-request-id": "killed-1"}, timeout=30) as r:
            t_end = time.monotonic() + 3.0  # long enough for checkpoints (one a second)
            for line in r.iter_lines():
                seen += line.startswith("data: ")
                if time.monotonic() > t_end:
                    break
            assert srv.proc is not None
            os.kill(srv.proc.pid, signal.SIGKILL)
            killed_at = time.time()
    finally:
        srv.stop()
    assert seen > 50
    with ServerProcess(models, workdir=workdir) as again:
        job = _job(again, "killed-1")
    assert job["status"] == "failed" and job["error"]["type"] == "gateway_restart", job
    assert job["usage"]["completion_tokens"] > 0, job  # a lower bound, not 0
    assert job["started_at"] <= job["finished_at"] <= killed_at + 0.5, (job, killed_at)
    assert job["last_seen_at"] == job["finished_at"]
