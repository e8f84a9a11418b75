"""The ledger's table, its migration, and the shapes of a row (from an ``Outcome``, to the API).

Every request is its own row, keyed by ``uid`` (one per request, made by the gateway): the
``id`` a client sends in ``x-request-id`` may repeat, so it is only indexed, never unique.
``t_seen`` is the last time the request was seen alive (every event and every streaming
checkpoint), which is what a row left in flight by a crash is closed with.
"""

from __future__ import annotations

import base64
import functools
import sqlite3
import time
from typing import Any

import msgspec

from mlx_supervisor.gateway.api.run import Outcome

STATUSES = ("queued", "processing", "completed", "failed", "cancelled")
TERMINAL = ("completed", "failed", "cancelled")
SCHEMA_VERSION = 2

# ``uid`` first, ``request_body`` last: the writer relies on both positions.
COLUMNS = ("uid", "id", "model", "route", "status", "client", "pid", "t_received", "t_started",
           "t_first_token", "t_finished", "t_seen", "prompt_tokens", "completion_tokens",
           "cached_tokens", "finish_reason", "error_type", "error", "request_body")
STATUS = COLUMNS.index("status")

_TABLE = """
CREATE TABLE IF NOT EXISTS jobs (
  seq INTEGER PRIMARY KEY AUTOINCREMENT,
  uid TEXT NOT NULL UNIQUE, id TEXT NOT NULL, model TEXT NOT NULL, route TEXT NOT NULL,
  status TEXT NOT NULL, client TEXT, pid INTEGER, t_received REAL NOT NULL, t_started REAL,
  t_first_token REAL, t_finished REAL, t_seen REAL, prompt_tokens INTEGER NOT NULL DEFAULT 0,
  completion_tokens INTEGER NOT NULL DEFAULT 0, cached_tokens INTEGER NOT NULL DEFAULT 0,
  finish_reason TEXT, error_type TEXT, error TEXT, request_body TEXT);
"""
SCHEMA = _TABLE + f"""
CREATE INDEX IF NOT EXISTS jobs_id ON jobs(id, seq);
CREATE INDEX IF NOT EXISTS jobs_received ON jobs(t_received);
CREATE INDEX IF NOT EXISTS jobs_status ON jobs(status, seq);
CREATE INDEX IF NOT EXISTS jobs_model ON jobs(model, seq);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT);
PRAGMA user_version = {SCHEMA_VERSION};
"""
_V1_COLUMNS = ", ".join(c for c in COLUMNS if c not in ("uid", "t_seen"))
# Version 1 made ``id`` unique (a reused x-request-id replaced the earlier row): rebuild it.
MIGRATE_V1 = f"""
DROP INDEX IF EXISTS jobs_received; DROP INDEX IF EXISTS jobs_status; DROP INDEX IF EXISTS jobs_model;
ALTER TABLE jobs RENAME TO jobs_v1;
{_TABLE}
INSERT INTO jobs (seq, uid, {_V1_COLUMNS}, t_seen)
  SELECT seq, id || '#v1-' || seq, {_V1_COLUMNS}, COALESCE(t_finished, t_started, t_received)
  FROM jobs_v1;
DROP TABLE jobs_v1;
"""
COLS = ", ".join(COLUMNS)
_MARKS = ", ".join("?" * len(COLUMNS))
# Rows per statement: one multi-row statement per batch, because every step of executemany
# releases and re-takes the GIL, and each re-take can stall a busy event loop by a switch interval.
ROWS_PER_STATEMENT = (32766 if sqlite3.sqlite_version_info >= (3, 32) else 999) // len(COLUMNS)
RECOVER_SQL = ("UPDATE jobs SET status = 'failed', error_type = 'gateway_restart', error = ?, "
               "t_finished = COALESCE(t_finished, t_seen, t_started, t_received) "
               "WHERE status IN ('queued', 'processing')")


@functools.lru_cache(maxsize=64)
def upsert_sql(n: int) -> str:
    """A request's first write inserts its row; later ones update it, but never move a finished
    row back to queued/processing, and never drop the body the first write stored."""
    values = ", ".join([f"({_MARKS})"] * n)
    return (f"INSERT INTO jobs ({COLS}) VALUES {values} ON CONFLICT(uid) DO UPDATE SET "
            + ", ".join(f"{c} = excluded.{c}" for c in COLUMNS[1:] if c != "request_body")
            + " WHERE jobs.status IN ('queued', 'processing')"
            + " OR excluded.status IN ('completed', 'failed', 'cancelled')")


def open_schema(db: sqlite3.Connection) -> None:
    """Create or migrate the tables (the caller holds the file lock, so nobody else writes)."""
    version = db.execute("PRAGMA user_version").fetchone()[0]
    if version > SCHEMA_VERSION:
        raise sqlite3.DatabaseError(f"schema version {version} is newer than ours ({SCHEMA_VERSION})")
    has_jobs = db.execute("SELECT 1 FROM sqlite_master WHERE name = 'jobs'").fetchone()
    if has_jobs and version < 2:
        db.executescript("BEGIN IMMEDIATE;" + MIGRATE_V1 + SCHEMA + "COMMIT;")
    db.executescript(SCHEMA)


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
    return (o.uid, o.request_id, o.model, o.route, status, o.client, o.pid, o.t_received,
            o.t_started, o.t_first_token, o.t_finished, o.t_finished or time.time(),
            o.prompt_tokens, o.completion_tokens, o.cached_tokens, o.finish_reason, o.error_type,
            o.error, _request_json(o) if store_bodies and event == "queued" else None)


def job_of(row: tuple[Any, ...] | sqlite3.Row) -> dict[str, Any]:
    """The API shape of one ledger row (columns in ``COLUMNS`` order)."""
    r = dict(zip(COLUMNS, tuple(row)[:len(COLUMNS)], strict=True))
    tr, ts, tf, te = r["t_received"], r["t_started"], r["t_first_token"], r["t_finished"]
    job: dict[str, Any] = {
        "id": r["id"], "object": "job", "model": r["model"], "route": r["route"],
        "status": r["status"], "client": r["client"], "pid": r["pid"],
        "received_at": tr, "started_at": ts, "first_token_at": tf, "finished_at": te,
        "last_seen_at": r["t_seen"],
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
