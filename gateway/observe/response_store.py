"""Stored OpenAI Responses (``store: true``): a table beside the request ledger's, in its file.

A row keeps the answer as the API returned it and the conversation that led to it (the chat
messages, the answer included), so ``previous_response_id`` continues it, across gateway
restarts too, and ``GET``/``DELETE /v1/responses/{id}`` work. Every statement runs on the
ledger's writer thread (``Ledger.call``), which owns the only connection; rows older than
``response_retention_days`` are pruned at most once a minute, when one is stored.
"""

from __future__ import annotations

import sqlite3
import time
from typing import Any

import msgspec

from mlx_supervisor.gateway.observe.ledger import Ledger

_SCHEMA = """
CREATE TABLE IF NOT EXISTS responses (
  id TEXT PRIMARY KEY, created REAL NOT NULL, response TEXT NOT NULL, messages TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS responses_created ON responses(created);
"""
PRUNE_EVERY = 60.0


class Stored(msgspec.Struct):
    response: dict[str, Any]
    messages: list[dict[str, Any]]
    """The chat messages up to and including this answer (instructions excluded: OpenAI does
    not carry them over to a continuation)."""


class ResponseStore:
    def __init__(self, ledger: Ledger, retention_days: float):
        self.ledger = ledger
        self.retention_days = retention_days
        self._ready = False
        self._next_prune = 0.0

    async def _run(self, fn: Any) -> Any:
        def call(db: sqlite3.Connection) -> Any:
            if not self._ready:
                db.executescript(_SCHEMA)
                self._ready = True
            return fn(db)
        return await self.ledger.call(call)

    async def put(self, rid: str, response: dict[str, Any], messages: list[dict[str, Any]]) -> None:
        row = (rid, time.time(), msgspec.json.encode(response).decode(),
               msgspec.json.encode(messages).decode())
        prune = time.monotonic() >= self._next_prune
        if prune:
            self._next_prune = time.monotonic() + PRUNE_EVERY
        cutoff = time.time() - self.retention_days * 86400

        def write(db: sqlite3.Connection) -> None:
            db.execute("INSERT OR REPLACE INTO responses VALUES (?, ?, ?, ?)", row)
            if prune:
                db.execute("DELETE FROM responses WHERE created < ?", (cutoff,))
        await self._run(write)

    async def get(self, rid: str) -> Stored | None:
        cutoff = time.time() - self.retention_days * 86400
        row = await self._run(lambda db: db.execute(
            "SELECT response, messages FROM responses WHERE id = ? AND created >= ?",
            (rid, cutoff)).fetchone())
        if row is None:
            return None
        return Stored(msgspec.json.decode(row[0]), msgspec.json.decode(row[1]))

    async def delete(self, rid: str) -> bool:
        n: int = await self._run(lambda db: db.execute("DELETE FROM responses WHERE id = ?",
                                                       (rid,)).rowcount)
        return n > 0
