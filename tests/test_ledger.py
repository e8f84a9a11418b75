"""The ledger store on a real SQLite file: lifecycle, batching, queries, retention, crash recovery,
and the failures that must disable it instead of the gateway."""

from __future__ import annotations

import asyncio
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

from mlx_supervisor.gateway.api.run import Outcome
from mlx_supervisor.gateway.observe.ledger import Ledger, LedgerError, Query
from mlx_supervisor.gateway.testing import server as testing
from mlx_supervisor.shared import protocol as p


def outcome(rid: str, model: str = "m", **kw: Any) -> Outcome:
    return Outcome(request_id=rid, model=model, route="chat", **kw)


def rows(path: Path) -> dict[str, str]:
    """What another process would read, bypassing the writer: proves the rows are committed."""
    with sqlite3.connect(path) as db:
        return dict(db.execute("SELECT id, status FROM jobs").fetchall())


def wait_for(cond: Any, timeout: float = 5.0) -> Any:
    return testing.wait_for(cond, timeout, step=0.02)


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "ledger.sqlite3"


async def test_lifecycle_is_read_after_write_and_never_goes_backwards(path: Path) -> None:
    led = Ledger(path)
    try:
        o = outcome("r1", client="10.0.0.7")
        led.record("queued", o)
        assert (await led.get("r1"))["status"] == "queued"
        o.pid, o.t_started, o.prompt_tokens = 4242, time.time(), 3
        led.record("started", o)
        assert (await led.get("r1"))["status"] == "processing"
        o.t_first_token, o.completion_tokens = time.time(), 1
        led.record("first_token", o)
        o.status, o.completion_tokens, o.finish_reason, o.t_finished = "completed", 7, "stop", time.time()
        led.record("finished", o)
        led.record("first_token", o)  # a late, stale event must not reopen a finished row
        job = await led.get("r1")
        assert job["status"] == "completed"
        assert job["usage"] == {"prompt_tokens": 3, "completion_tokens": 7, "total_tokens": 10,
                                "cached_tokens": 0}
        assert (job["pid"], job["client"], job["finish_reason"]) == (4242, "10.0.0.7", "stop")
        assert job["error"] is None and "request" not in job
        assert await led.get("nope") is None
        with sqlite3.connect(path) as db:
            assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        await led.close()


async def test_writes_are_batched_off_the_caller(path: Path) -> None:
    led = Ledger(path, batch_seconds=0.05, batch_rows=200)
    try:
        t0 = time.perf_counter()
        for i in range(1000):
            led.record("queued", outcome(f"r{i}"))
        assert time.perf_counter() - t0 < 0.5  # record() only enqueues
        wait_for(lambda: len(rows(path)) == 1000)  # committed without any read asking for it
    finally:
        await led.close()


async def test_query_filters_and_cursor_pages(path: Path) -> None:
    led = Ledger(path)
    try:
        for i in range(25):
            o = outcome(f"r{i:02d}", model="a" if i % 2 else "b", t_received=1000.0 + i)
            o.status = "failed" if i % 5 == 0 else "completed"
            led.record("finished", o)
        seen: list[str] = []
        cursor = None
        for _ in range(3):
            page, cursor = await led.query(Query(limit=10, after=cursor))
            seen += [j["id"] for j in page]
        assert cursor is None
        assert seen == [f"r{i:02d}" for i in reversed(range(25))]  # newest first, no repeats
        failed, _ = await led.query(Query(status=("failed",)))
        assert {j["id"] for j in failed} == {"r00", "r05", "r10", "r15", "r20"}
        a_mid, _ = await led.query(Query(model="a", since=1005, until=1010))
        assert [j["id"] for j in a_mid] == ["r09", "r07", "r05"]
        with pytest.raises(ValueError, match="invalid cursor"):
            await led.query(Query(after="garbage!"))
    finally:
        await led.close()


async def test_retention_and_max_rows_prune_in_the_background(path: Path) -> None:
    led = Ledger(path, retention_days=1, max_rows=5, prune_every=0.05)
    try:
        for i in range(3):
            led.record("finished", outcome(f"old{i}", t_received=time.time() - 2 * 86400, status="completed"))
        for i in range(8):
            led.record("finished", outcome(f"new{i}", status="completed"))
        kept = wait_for(lambda: (r := rows(path)) and len(r) == 5 and r)
        assert sorted(kept) == [f"new{i}" for i in range(3, 8)]
    finally:
        await led.close()


async def test_store_bodies_keeps_the_request_without_image_bytes(path: Path) -> None:
    led = Ledger(path, store_bodies=True)
    try:
        msg = p.Generate(id="r1", messages=[{"role": "user", "content": "hi"}], images=[b"PNG..."])
        o = outcome("r1", body=msg)
        led.record("queued", o)
        o.status = "completed"
        led.record("finished", o)
        req = (await led.get("r1"))["request"]
        assert req["messages"] == [{"role": "user", "content": "hi"}]
        assert req["images"] == ["<6 bytes>"]
    finally:
        await led.close()


async def test_clean_close_fails_what_is_still_in_flight(path: Path) -> None:
    led = Ledger(path)
    led.record("queued", outcome("r1"))
    await led.close()
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT status, error_type FROM jobs").fetchall() == [("failed", "shutting_down")]


def test_restart_after_a_crash_fails_the_rows_left_in_flight(path: Path) -> None:
    child = textwrap.dedent(f"""
        import asyncio, os, signal
        from mlx_supervisor.gateway.api.run import Outcome
        from mlx_supervisor.gateway.observe.ledger import Ledger
        from pathlib import Path
        led = Ledger(Path({str(path)!r}))
        for rid, ev in (("q", "queued"), ("p", "started"), ("c", "finished")):
            led.record(ev, Outcome(request_id=rid, model="m", route="chat", status="completed"))
        asyncio.run(led.get("c"))  # flushed
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    assert subprocess.run([sys.executable, "-c", child], timeout=60).returncode == -9
    assert rows(path) == {"q": "queued", "p": "processing", "c": "completed"}
    led = Ledger(path)
    try:
        assert led.recovered == 2
        job = asyncio.run(led.get("p"))
        assert job["status"] == "failed"
        assert job["error"]["type"] == "gateway_restart" and "gateway restart" in job["error"]["message"]
        assert rows(path) == {"q": "failed", "p": "failed", "c": "completed"}
    finally:
        led.close_sync()


def test_one_gateway_per_ledger_file(path: Path) -> None:
    first = Ledger(path)
    try:
        with pytest.raises(LedgerError, match="in use by another gateway"):
            Ledger(path)
    finally:
        first.close_sync()
    Ledger(path).close_sync()  # free again once the first one closed


def test_corrupt_or_unusable_files_raise_ledger_error(tmp_path: Path) -> None:
    bad = tmp_path / "corrupt.sqlite3"
    bad.write_bytes(b"this is not a database, just bytes " * 200)
    with pytest.raises(LedgerError, match="corrupt.sqlite3 cannot be used"):
        Ledger(bad)
    blocker = tmp_path / "a-file"
    blocker.write_text("x")  # its "subdirectory" can never be created, even by root
    with pytest.raises(LedgerError, match="not writable"):
        Ledger(blocker / "ledger.sqlite3")


async def test_a_failure_while_running_degrades_then_heals_by_itself(path: Path) -> None:
    """A write that fails (here: the table dropped under it) drops that batch, counts it, reports
    it, and the writer probes again with backoff until it can write: no restart needed."""
    reported: list[str] = []
    healed: list[str] = []
    led = Ledger(path, on_fail=reported.append, on_recover=healed.append)
    try:
        led.record("queued", outcome("r1"))
        await led.get("r1")
        with sqlite3.connect(path) as db:
            db.execute("DROP TABLE jobs")
        led.record("queued", outcome("r2"))
        with pytest.raises(LedgerError, match="cannot be read"):
            await led.get("r2")
        assert reported and "no such table" in reported[0]
        assert led.dropped >= 1 and led.failures == 1
        await asyncio.to_thread(wait_for, lambda: healed, 15.0)
        assert led.status()["status"] == "ok" and "dropped" in healed[0]
        o = outcome("r3")
        led.record("queued", o)  # recorded again, never raised into a request meanwhile
        assert (await led.get("r3"))["status"] == "queued"
    finally:
        await led.close()


async def test_a_reused_id_is_a_second_row_and_the_latest_links_the_earlier(path: Path) -> None:
    led = Ledger(path)
    try:
        first, second = outcome("same", status="completed"), outcome("same", status="failed")
        led.record("finished", first)
        led.record("finished", second)
        job = await led.get("same")
        assert job["status"] == "failed"
        assert [e["status"] for e in job["earlier"]] == ["completed"]
        old = await led.get("same", job["earlier"][0]["seq"])
        assert old is not None and old["status"] == "completed" and old["earlier"] == []
        with sqlite3.connect(path) as db:
            assert db.execute("SELECT COUNT(*) FROM jobs WHERE id = 'same'").fetchone()[0] == 2
    finally:
        await led.close()


def test_a_version_1_file_is_migrated_and_keeps_its_rows(path: Path) -> None:
    now = time.time()
    with sqlite3.connect(path) as db:
        db.executescript(f"""
            CREATE TABLE jobs (seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL UNIQUE,
              model TEXT NOT NULL, route TEXT NOT NULL, status TEXT NOT NULL, client TEXT,
              pid INTEGER, t_received REAL NOT NULL, t_started REAL, t_first_token REAL,
              t_finished REAL, prompt_tokens INTEGER NOT NULL DEFAULT 0,
              completion_tokens INTEGER NOT NULL DEFAULT 0, cached_tokens INTEGER NOT NULL DEFAULT 0,
              finish_reason TEXT, error_type TEXT, error TEXT, request_body TEXT);
            CREATE INDEX jobs_received ON jobs(t_received);
            CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT);
            INSERT INTO jobs (id, model, route, status, t_received, t_finished, completion_tokens)
              VALUES ('old', 'm', 'chat', 'completed', {now}, {now + 1}, 7);
            PRAGMA user_version = 1;""")
    led = Ledger(path)
    try:
        job = asyncio.run(led.get("old"))
        assert job is not None and job["usage"]["completion_tokens"] == 7
        led.record("finished", outcome("old", status="completed"))  # no longer unique
        assert len(asyncio.run(led.get("old"))["earlier"]) == 1
    finally:
        led.close_sync()
