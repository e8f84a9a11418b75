"""The request ledger: one SQLite row per request, written by one thread so HTTP never waits on disk.

Observers run on the event loop, so ``record()`` only snapshots the ``Outcome`` into a tuple and
puts it on a queue. The writer thread owns the only connection: it applies rows in batches (one
transaction per ``batch_seconds`` or ``batch_rows``), prunes old rows now and then, and also runs
the reads, after the writes queued before them, so a read always sees every event observed so far.

Crash safety: an exclusive ``flock`` beside the file means one gateway per ledger, which makes it
safe at start to mark every row still queued or processing as failed (that gateway died). Any
SQLite error at open raises ``LedgerError``; one while running disables the ledger and reports it
through ``on_fail``. Nothing here ever refuses or slows a request.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import contextlib
import fcntl
import functools
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

import msgspec

from mlx_supervisor.gateway.api.run import Outcome

log = logging.getLogger("mlx_supervisor.ledger")

STATUSES = ("queued", "processing", "completed", "failed", "cancelled")
TERMINAL = ("completed", "failed", "cancelled")
MAX_BACKLOG = 100_000  # rows waiting for the writer before new ones are dropped (disk stalled)
SCHEMA_VERSION = 1

COLUMNS = ("id", "model", "route", "status", "client", "pid", "t_received", "t_started",
           "t_first_token", "t_finished", "prompt_tokens", "completion_tokens", "cached_tokens",
           "finish_reason", "error_type", "error", "request_body")

_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS jobs (
  seq INTEGER PRIMARY KEY AUTOINCREMENT,
  id TEXT NOT NULL UNIQUE, model TEXT NOT NULL, route TEXT NOT NULL, status TEXT NOT NULL,
  client TEXT, pid INTEGER, t_received REAL NOT NULL, t_started REAL, t_first_token REAL,
  t_finished REAL, prompt_tokens INTEGER NOT NULL DEFAULT 0,
  completion_tokens INTEGER NOT NULL DEFAULT 0, cached_tokens INTEGER NOT NULL DEFAULT 0,
  finish_reason TEXT, error_type TEXT, error TEXT, request_body TEXT);
CREATE INDEX IF NOT EXISTS jobs_received ON jobs(t_received);
CREATE INDEX IF NOT EXISTS jobs_status ON jobs(status, seq);
CREATE INDEX IF NOT EXISTS jobs_model ON jobs(model, seq);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT);
PRAGMA user_version = {SCHEMA_VERSION};
"""
_COLS = ", ".join(COLUMNS)
_MARKS = ", ".join("?" * len(COLUMNS))
# Rows per statement: one multi-row statement per batch, because every step of executemany
# releases and re-takes the GIL, and each re-take can stall a busy event loop by a switch interval.
ROWS_PER_STATEMENT = (32766 if sqlite3.sqlite_version_info >= (3, 32) else 999) // len(COLUMNS)


@functools.lru_cache(maxsize=64)
def _insert_sql(n: int, upsert: bool) -> str:
    """The first event of a request replaces any older row with the same (client-chosen) id;
    later events update it, but never move a finished row back to queued/processing."""
    values = ", ".join([f"({_MARKS})"] * n)
    if not upsert:
        return f"INSERT OR REPLACE INTO jobs ({_COLS}) VALUES {values}"
    return (f"INSERT INTO jobs ({_COLS}) VALUES {values} ON CONFLICT(id) DO UPDATE SET "
            + ", ".join(f"{c} = excluded.{c}" for c in COLUMNS[1:] if c != "request_body")
            + " WHERE jobs.status IN ('queued', 'processing')"
            + " OR excluded.status IN ('completed', 'failed', 'cancelled')")


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


def encode_cursor(seq: int) -> str:
    return base64.urlsafe_b64encode(f"v1:{seq}".encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> int:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        version, seq = raw.split(":", 1)
        if version != "v1":
            raise ValueError(version)
        return int(seq)
    except (ValueError, UnicodeDecodeError):
        raise ValueError(f"invalid cursor {cursor[:80]!r}") from None


def _request_json(o: Outcome) -> str | None:
    """The request as the gateway decoded it (images replaced by their sizes), for store_bodies."""
    body = o.body
    if body is None:
        return None
    data = msgspec.to_builtins(body)
    if isinstance(data, dict) and data.get("images"):
        data["images"] = [f"<{len(b)} bytes>" for b in body.images]
    return msgspec.json.encode(data).decode()


def row_of(event: str, o: Outcome, store_bodies: bool = False) -> tuple[Any, ...]:
    """An Outcome as a ledger row: the event decides the status until the request is finished."""
    if event == "queued":
        status = "queued"
    elif event == "finished":
        status = o.status if o.status in TERMINAL else "failed"
    else:
        status = "processing"
    return (o.request_id, o.model, o.route, status, o.client, o.pid, o.t_received, o.t_started,
            o.t_first_token, o.t_finished, o.prompt_tokens, o.completion_tokens, o.cached_tokens,
            o.finish_reason, o.error_type, o.error,
            _request_json(o) if store_bodies and event == "queued" else None)


def job_of(row: tuple[Any, ...] | sqlite3.Row) -> dict[str, Any]:
    """The API shape of one ledger row (columns in ``COLUMNS`` order)."""
    r = dict(zip(COLUMNS, tuple(row)[:len(COLUMNS)], strict=True))
    tr, ts, tf, te = r["t_received"], r["t_started"], r["t_first_token"], r["t_finished"]
    job: dict[str, Any] = {
        "id": r["id"], "object": "job", "model": r["model"], "route": r["route"],
        "status": r["status"], "client": r["client"], "pid": r["pid"],
        "received_at": tr, "started_at": ts, "first_token_at": tf, "finished_at": te,
        "queue_seconds": round(ts - tr, 6) if ts is not None else None,
        "ttft_seconds": round(tf - tr, 6) if tf is not None else None,
        "duration_seconds": round(te - tr, 6) if te is not None else None,
        "usage": {"prompt_tokens": r["prompt_tokens"], "completion_tokens": r["completion_tokens"],
                  "total_tokens": r["prompt_tokens"] + r["completion_tokens"],
                  "cached_tokens": r["cached_tokens"]},
        "finish_reason": r["finish_reason"],
        "error": {"type": r["error_type"], "message": r["error"]} if r["error"] or r["error_type"] else None,
    }
    if r["request_body"] is not None:
        job["request"] = msgspec.json.decode(r["request_body"])
    return job


class _Call:
    """A read run on the writer thread; its result goes to a concurrent future."""

    def __init__(self, fn: Callable[[sqlite3.Connection], Any]):
        self.fn = fn
        self.future: concurrent.futures.Future[Any] = concurrent.futures.Future()


_STOP = object()


class Ledger:
    def __init__(self, path: Path, *, retention_days: float = 7.0, max_rows: int = 1_000_000,
                 store_bodies: bool = False, batch_seconds: float = 0.05, batch_rows: int = 200,
                 prune_every: float = 60.0, on_fail: Callable[[str], None] | None = None):
        self.path = path
        self.retention_days = retention_days
        self.max_rows = max_rows
        self.store_bodies = store_bodies
        self.batch_seconds = batch_seconds
        self.batch_rows = batch_rows
        self.prune_every = prune_every
        self.on_fail = on_fail
        self.failed: str | None = None
        self.recovered = 0
        self.dropped = 0
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
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise sqlite3.DatabaseError(f"schema version {version} is newer than ours ({SCHEMA_VERSION})")
            db.executescript(_SCHEMA)
            db.execute("BEGIN IMMEDIATE")
            self.recovered = db.execute(
                "UPDATE jobs SET status = 'failed', error_type = 'gateway_restart', error = ?, "
                "t_finished = COALESCE(t_finished, ?) WHERE status IN ('queued', 'processing')",
                ("gateway restart: the gateway stopped while this request was in flight",
                 time.time())).rowcount
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
        if self.failed is not None:
            return
        if self._q.qsize() >= MAX_BACKLOG:
            self.dropped += 1
            return
        self._q.put(("queued" if event == "queued" else "upsert", row_of(event, o, self.store_bodies)))

    async def call(self, fn: Callable[[sqlite3.Connection], Any]) -> Any:
        if self.failed is not None:
            raise LedgerError(self.failed)
        c = _Call(fn)
        self._q.put(c)
        self._wake.set()
        return await asyncio.wrap_future(c.future)

    async def get(self, request_id: str) -> dict[str, Any] | None:
        row = await self.call(lambda db: db.execute(
            f"SELECT {_COLS} FROM jobs WHERE id = ?", (request_id,)).fetchone())
        return job_of(row) if row is not None else None

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
        sql = (f"SELECT {_COLS}, seq FROM jobs" + (" WHERE " + " AND ".join(where) if where else "")
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
            try:
                first = self._q.get(timeout=max(0.0, next_prune - time.monotonic()))
            except queue.Empty:
                first = None
            if first is not None and not isinstance(first, _Call) and first is not _STOP:
                self._wake.wait(self.batch_seconds)
            self._wake.clear()
            items = [first] if first is not None else []
            with contextlib.suppress(queue.Empty):
                while True:
                    items.append(self._q.get_nowait())
            rows: list[tuple[str, tuple[Any, ...]]] = []
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
        if self.failed is not None:
            return
        try:
            fn(*args)
        except sqlite3.Error as e:
            self.failed = f"ledger {self.path} failed and is disabled ({type(e).__name__}: {e})"
            log.error("%s", self.failed)
            with contextlib.suppress(sqlite3.Error):
                self._db.rollback()
            if self.on_fail is not None:
                self.on_fail(self.failed)
            self._drain_calls()

    def _write(self, batch: list[tuple[str, tuple[Any, ...]]]) -> None:
        """One transaction per ``batch_rows`` requests; a request's events in one batch become one
        row write (the first event's kind, the last event's values, the queued event's body)."""
        merged: dict[str, tuple[str, tuple[Any, ...]]] = {}
        for op, row in batch:
            seen = merged.get(row[0])
            if seen is not None and seen[1][3] in TERMINAL and row[3] not in TERMINAL:
                continue  # a stale event never reopens a finished request (as in _UPSERT)
            if seen is not None and seen[0] == "queued":
                op, row = "queued", row if row[-1] is not None else (*row[:-1], seen[1][-1])
            merged[row[0]] = (op, row)
        todo = list(merged.values())
        step = max(1, min(self.batch_rows, ROWS_PER_STATEMENT))
        for i in range(0, len(todo), step):
            chunk = todo[i:i + step]
            self._db.execute("BEGIN")
            for upsert in (False, True):
                rows = [r for op, r in chunk if (op != "queued") == upsert]
                if rows:
                    self._db.execute(_insert_sql(len(rows), upsert), [v for r in rows for v in r])
            self._db.execute("COMMIT")

    def _answer(self, c: _Call) -> None:
        if self.failed is not None:
            c.future.set_exception(LedgerError(self.failed))
            return
        try:
            c.future.set_result(c.fn(self._db))
        except Exception as e:  # a bad query must not kill the writer
            c.future.set_exception(e)

    def _drain_calls(self) -> None:
        """After a failure: answer waiting reads with the error, drop queued rows."""
        with contextlib.suppress(queue.Empty):
            while True:
                item = self._q.get_nowait()
                if isinstance(item, _Call):
                    item.future.set_exception(LedgerError(self.failed or "ledger failed"))
                elif item is _STOP:
                    self._q.put(_STOP)
                    return

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
        self._guard(lambda: self._db.execute(
            "UPDATE jobs SET status = 'failed', error_type = 'shutting_down', error = ?, "
            "t_finished = ? WHERE status IN ('queued', 'processing')",
            ("the gateway shut down before the request finished", time.time())))
        with contextlib.suppress(sqlite3.Error):
            self._db.close()
        with contextlib.suppress(OSError):
            os.close(self._lock_fd)
