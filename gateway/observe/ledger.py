"""The request ledger: one SQLite row per request, written by one thread so HTTP never waits on disk.

Observers run on the event loop, so ``record()`` only snapshots the ``Outcome`` into a tuple and
puts it on a queue. The writer thread owns the only connection: it applies rows in batches (one
transaction per ``batch_seconds`` or ``batch_rows``), prunes old rows now and then, and also runs
the reads, after the writes queued before them, so a read always sees every event observed so far.

Crash safety: an exclusive ``flock`` beside the file means one gateway per ledger, which makes it
safe at start to mark every row still queued or processing as failed (that gateway died), closed
at the last time each was seen alive. Any SQLite error at open raises ``LedgerError``. One while
running (disk full, file removed, I/O error) puts the ledger in a *degraded* state: records are
dropped and counted, reads still try, and the writer probes again with a doubling backoff (up to
``RETRY_MAX``) until a write succeeds, then records again by itself. Nothing here ever refuses or
slows a request.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import fcntl
import logging
import os
import queue
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlx_supervisor.gateway.api.run import Outcome
from mlx_supervisor.gateway.observe.ledger_schema import (
    COLS,
    RECOVER_SQL,
    ROWS_PER_STATEMENT,
    STATUS,
    TERMINAL,
    decode_cursor,
    encode_cursor,
    job_of,
    open_schema,
    row_of,
    upsert_sql,
)

log = logging.getLogger("mlx_supervisor.ledger")

MAX_BACKLOG = 100_000  # rows waiting for the writer before new ones are dropped (disk stalled)
RETRY_FIRST, RETRY_MAX = 0.5, 8.0  # seconds between write attempts after a failure (doubling)
EARLIER = 20  # earlier requests with the same id listed under a job


class LedgerError(Exception):
    """The ledger file cannot be used (corrupt, unwritable, locked by another gateway)."""


@dataclass(frozen=True)
class Query:
    status: tuple[str, ...] = ()
    model: str | None = None
    since: float | None = None
    until: float | None = None
    limit: int = 50
    after: str | None = None


class _Call:
    """A read run on the writer thread; its result goes to a concurrent future."""

    def __init__(self, fn: Callable[[sqlite3.Connection], Any]):
        self.fn = fn
        self.future: concurrent.futures.Future[Any] = concurrent.futures.Future()


_STOP = object()


class Ledger:
    def __init__(self, path: Path, *, retention_days: float = 7.0, max_rows: int = 1_000_000,
                 store_bodies: bool = False, batch_seconds: float = 0.05, batch_rows: int = 200,
                 prune_every: float = 60.0, on_fail: Callable[[str], None] | None = None,
                 on_recover: Callable[[str], None] | None = None):
        self.path = path
        self.retention_days = retention_days
        self.max_rows = max_rows
        self.store_bodies = store_bodies
        self.batch_seconds = batch_seconds
        self.batch_rows = batch_rows
        self.prune_every = prune_every
        self.on_fail = on_fail
        self.on_recover = on_recover
        self.failed: str | None = None
        """Why the last write failed, while degraded; None when writing."""
        self.failures = 0  # write failures since start (each one starts or extends a degraded spell)
        self.recovered = 0
        self.dropped = 0  # records lost: a degraded spell, or a backlog past MAX_BACKLOG
        self._retry_at = 0.0
        self._backoff = RETRY_FIRST
        self._q: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._wake = threading.Event()  # set by reads and close: skip the rest of the batch window
        self._lock_fd = -1
        self._db = self._open()
        self._thread = threading.Thread(target=self._run, name="ledger-writer", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------ open (at start, before serving)

    def _open(self) -> sqlite3.Connection:
        where = str(self.path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._lock_fd = os.open(where + ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as e:
            raise LedgerError(f"ledger {where} is not writable: {e.strerror or e}") from None
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(self._lock_fd)
            raise LedgerError(f"ledger {where} is in use by another gateway") from None
        db: sqlite3.Connection | None = None
        try:
            db = sqlite3.connect(where, isolation_level=None, check_same_thread=False)
            db.execute("PRAGMA busy_timeout = 2000")
            mode = db.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise sqlite3.OperationalError(f"cannot use WAL mode (got {mode})")
            db.execute("PRAGMA synchronous = NORMAL")
            open_schema(db)
            db.execute("BEGIN IMMEDIATE")
            self.recovered = db.execute(RECOVER_SQL, (
                "gateway restart: the gateway stopped while this request was in flight; "
                "finished_at is the last time it was seen alive",)).rowcount
            db.execute("INSERT OR REPLACE INTO meta VALUES ('opened_at', ?)", (str(time.time()),))
            db.execute("COMMIT")
        except sqlite3.Error as e:
            if db is not None:
                db.close()
            os.close(self._lock_fd)
            raise LedgerError(f"ledger {where} cannot be used ({type(e).__name__}: {e})") from None
        if self.recovered:
            log.warning("ledger: marked %d request(s) failed that were in flight when the gateway "
                        "stopped", self.recovered)
        return db

    # ------------------------------------------------------------ the event loop's side

    def record(self, event: str, o: Outcome) -> None:
        """An observer: snapshot now (the Outcome keeps changing), write later. Never blocks."""
        if self.failed is not None or self._q.qsize() >= MAX_BACKLOG:
            self.dropped += 1
            return
        self._q.put(row_of(event, o, self.store_bodies))

    def status(self) -> dict[str, Any]:
        """For /health and /metrics: writing or degraded, and what was lost."""
        return {"status": "degraded" if self.failed else "ok", "error": self.failed,
                "dropped_records": self.dropped, "write_failures": self.failures}

    async def call(self, fn: Callable[[sqlite3.Connection], Any]) -> Any:
        c = _Call(fn)
        self._q.put(c)
        self._wake.set()
        return await asyncio.wrap_future(c.future)

    async def get(self, request_id: str, seq: int | None = None) -> dict[str, Any] | None:
        """The latest request with this id (or the one numbered ``seq``), with links to the
        earlier ones: a client may reuse an id, and every request keeps its own row."""
        def read(db: sqlite3.Connection) -> tuple[Any, list[Any]]:
            row = db.execute(f"SELECT {COLS}, seq FROM jobs WHERE id = ?"
                             + (" AND seq = ?" if seq is not None else "")
                             + " ORDER BY seq DESC LIMIT 1",
                             (request_id,) if seq is None else (request_id, seq)).fetchone()
            if row is None:
                return None, []
            return row, db.execute("SELECT seq, status, t_received FROM jobs WHERE id = ? AND seq < ? "
                                   "ORDER BY seq DESC LIMIT ?", (request_id, row[-1], EARLIER)).fetchall()
        row, earlier = await self.call(read)
        if row is None:
            return None
        job = job_of(row)
        job["seq"] = row[-1]
        job["earlier"] = [{"seq": s, "status": st, "received_at": t,
                           "url": f"/v1/jobs/{request_id}?seq={s}"} for s, st, t in earlier]
        return job

    async def query(self, q: Query) -> tuple[list[dict[str, Any]], str | None]:
        """Newest first; ``next_cursor`` is None on the last page."""
        where: list[str] = []
        args: list[Any] = []
        if q.status:
            where.append(f"status IN ({', '.join('?' * len(q.status))})")
            args += list(q.status)
        for clause, value in (("model = ?", q.model), ("t_received >= ?", q.since),
                              ("t_received < ?", q.until)):
            if value is not None:
                where.append(clause)
                args.append(value)
        if q.after is not None:
            where.append("seq < ?")
            args.append(decode_cursor(q.after))
        sql = (f"SELECT {COLS}, seq FROM jobs" + (" WHERE " + " AND ".join(where) if where else "")
               + " ORDER BY seq DESC LIMIT ?")
        rows = await self.call(lambda db: db.execute(sql, (*args, q.limit + 1)).fetchall())
        more = len(rows) > q.limit
        rows = rows[:q.limit]
        return [job_of(r) for r in rows], encode_cursor(rows[-1][-1]) if more and rows else None

    async def close(self, timeout: float = 5.0) -> None:
        await asyncio.to_thread(self.close_sync, timeout)

    def close_sync(self, timeout: float = 5.0) -> None:
        if self._thread.is_alive():
            self._q.put(_STOP)
            self._wake.set()
            self._thread.join(timeout)

    # ------------------------------------------------------------ the writer thread

    def _run(self) -> None:
        """Block for the first item, let a batch window fill (a read cuts it short), then take
        everything queued. Waking once per window rather than per event keeps this thread off
        the GIL while the event loop is busy; that is most of what the ledger costs a request."""
        next_prune = time.monotonic()
        while True:
            wake_at = min(next_prune, self._retry_at) if self.failed else next_prune
            try:
                first = self._q.get(timeout=max(0.0, wake_at - time.monotonic()))
            except queue.Empty:
                first = None
            if first is not None and not isinstance(first, _Call) and first is not _STOP:
                self._wake.wait(self.batch_seconds)
            self._wake.clear()
            items = [first] if first is not None else []
            with contextlib.suppress(queue.Empty):
                while True:
                    items.append(self._q.get_nowait())
            if self.failed and time.monotonic() >= self._retry_at:
                self._probe()
            rows: list[tuple[Any, ...]] = []
            stop = False
            for item in items:
                if item is _STOP:
                    stop = True
                elif isinstance(item, _Call):
                    self._guard(self._write, rows)  # a read sees every event queued before it
                    rows = []
                    self._answer(item)
                else:
                    rows.append(item)
            self._guard(self._write, rows)
            if time.monotonic() >= next_prune:
                self._guard(self._prune)
                next_prune = time.monotonic() + self.prune_every
            if stop:
                self._finish()
                return

    def _guard(self, fn: Callable[..., object], *args: Any) -> None:
        """Run one write; on failure, drop it (counted), go degraded and schedule a probe."""
        if self.failed is not None:
            if args and args[0]:
                self.dropped += len(args[0])
            return
        try:
            fn(*args)
        except sqlite3.Error as e:
            with contextlib.suppress(sqlite3.Error):
                self._db.rollback()
            self.failures += 1
            if args and args[0]:
                self.dropped += len(args[0])
            self.failed = (f"ledger {self.path} cannot write ({type(e).__name__}: {e}); "
                           "retrying with backoff, records are dropped meanwhile")
            self._backoff = RETRY_FIRST
            self._retry_at = time.monotonic() + self._backoff
            log.error("%s", self.failed)
            if self.on_fail is not None:
                self.on_fail(self.failed)

    def _probe(self) -> None:
        """While degraded: one small write (re-creating the tables if they went away). Success
        ends the degraded spell; failure doubles the wait for the next probe."""
        try:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.execute("INSERT OR REPLACE INTO meta VALUES ('probe', ?)", (str(time.time()),))
            self._db.execute("COMMIT")
            open_schema(self._db)
        except sqlite3.Error as e:
            with contextlib.suppress(sqlite3.Error):
                self._db.rollback()
            self._backoff = min(self._backoff * 2, RETRY_MAX)
            self._retry_at = time.monotonic() + self._backoff
            log.debug("ledger probe failed (%s); next in %.1fs", e, self._backoff)
            return
        msg = f"ledger {self.path} writes again; {self.dropped} record(s) dropped so far"
        log.warning("%s", msg)
        self.failed = None
        if self.on_recover is not None:
            self.on_recover(msg)

    def _write(self, batch: list[tuple[Any, ...]]) -> None:
        """One transaction per ``batch_rows`` requests; a request's events in one batch become one
        row write (the last event's values, the first event's body)."""
        merged: dict[str, tuple[Any, ...]] = {}
        for row in batch:
            seen = merged.get(row[0])
            if seen is not None and seen[STATUS] in TERMINAL and row[STATUS] not in TERMINAL:
                continue  # a stale event never reopens a finished request (as in upsert_sql)
            if seen is not None and row[-1] is None and seen[-1] is not None:
                row = (*row[:-1], seen[-1])
            merged[row[0]] = row
        todo = list(merged.values())
        step = max(1, min(self.batch_rows, ROWS_PER_STATEMENT))
        for i in range(0, len(todo), step):
            chunk = todo[i:i + step]
            self._db.execute("BEGIN")
            self._db.execute(upsert_sql(len(chunk)), [v for r in chunk for v in r])
            self._db.execute("COMMIT")

    def _answer(self, c: _Call) -> None:
        try:
            c.future.set_result(c.fn(self._db))
        except sqlite3.Error as e:
            c.future.set_exception(LedgerError(f"ledger {self.path} cannot be read "
                                               f"({type(e).__name__}: {e})"))
        except Exception as e:  # a bad query must not kill the writer
            c.future.set_exception(e)

    def _prune(self) -> None:
        """Drop rows past retention, then the oldest beyond ``max_rows``, in small transactions."""
        cutoff = time.time() - self.retention_days * 86400
        while True:
            n = self._db.execute(
                "DELETE FROM jobs WHERE seq IN (SELECT seq FROM jobs WHERE t_received < ? "
                "ORDER BY seq LIMIT 5000)", (cutoff,)).rowcount
            if n < 5000:
                break
        row = self._db.execute("SELECT seq FROM jobs ORDER BY seq DESC LIMIT 1 OFFSET ?",
                               (max(0, self.max_rows - 1),)).fetchone()
        if row is not None:
            while self._db.execute("DELETE FROM jobs WHERE seq IN (SELECT seq FROM jobs WHERE "
                                   "seq < ? ORDER BY seq LIMIT 5000)", (row[0],)).rowcount >= 5000:
                pass

    def _finish(self) -> None:
        """Clean stop: requests the drain could not finish are failed now, not at the next start."""
        if self.failed:
            self._probe()
        self._guard(lambda: self._db.execute(
            "UPDATE jobs SET status = 'failed', error_type = 'shutting_down', error = ?, "
            "t_finished = ? WHERE status IN ('queued', 'processing')",
            ("the gateway shut down before the request finished", time.time())))
        with contextlib.suppress(sqlite3.Error):
            self._db.close()
        with contextlib.suppress(OSError):
            os.close(self._lock_fd)
