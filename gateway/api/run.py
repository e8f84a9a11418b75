"""Running one request on a leased worker: send it, stream or collect the answer, always clean up.

Whatever happens (client disconnect, worker crash, cancel by id), the worker hears ``Cancel`` if
the request had not finished, and the lease goes back to the supervisor exactly once.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import msgspec
from starlette.requests import Request

from mlx_supervisor.gateway.bus import Bus
from mlx_supervisor.gateway.errors import APIError
from mlx_supervisor.gateway.supervisor.loop import Supervisor
from mlx_supervisor.gateway.supervisor.model import Lease
from mlx_supervisor.gateway.supervisor.transport import RequestStream
from mlx_supervisor.shared import protocol as p

T = TypeVar("T")
CHECKPOINT_SECONDS = 1.0  # a streaming request's token count reaches the ledger this often


async def until_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Await ``work`` but give up (cancelling it) if the client goes away first."""
    task = asyncio.ensure_future(work)

    async def watch() -> None:
        while True:
            msg = await request.receive()
            if msg["type"] == "http.disconnect":
                return

    watcher = asyncio.ensure_future(watch())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if not task.done():
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
        # A cancel that lands just as a lease is granted can be swallowed (asyncio.wait_for on
        # 3.11): the work then finishes anyway, and what it produced must be let go.
        if not task.cancelled() and task.exception() is None:
            close = getattr(task.result(), "close", None)
            if callable(close):
                close()
        raise APIError(499, "client disconnected", code="client_disconnected")
    return task.result()


@dataclass
class Outcome:
    """What a finished (or failed) request produced, for logs, metrics and the ledger."""

    request_id: str
    model: str
    route: str
    status: str = "processing"  # completed | failed | cancelled
    pid: int | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    finish_reason: str | None = None
    error: str | None = None
    error_type: str | None = None
    t_received: float = field(default_factory=time.time)
    t_started: float | None = None
    t_first_token: float | None = None
    t_finished: float | None = None
    client: str | None = None  # the client's address, for the ledger
    body: p.Generate | p.Embed | None = None  # the decoded request, for ledger.store_bodies
    conn: dict[str, Any] | None = None  # the connection's request state: why it was cut, if it was
    uid: str = field(default_factory=lambda: uuid.uuid4().hex)
    """This request's own key (``request_id`` is the client's and may be reused)."""


class RequestEvent(msgspec.Struct, frozen=True):
    """A request moved (queued, started, first_token, finished), on the gateway's bus; the
    ``Outcome`` is the request's live record, so an observer that keeps it must copy it."""

    phase: str
    outcome: Outcome


class Run:
    """One request on one worker: ``start()`` sends it and waits for the first reply."""

    def __init__(self, sup: Supervisor, lease: Lease, msg: p.Generate | p.Embed, outcome: Outcome,
                 bus: Bus):
        self.sup = sup
        self.lease = lease
        self.msg = msg
        self.outcome = outcome
        self.bus = bus
        self.stream: RequestStream = sup.transport.open_stream(msg.id, lease.worker_id)
        self.stream.on_flow = lambda paused: sup.park(lease, paused)
        self.stream.cut = lambda: bool(outcome.conn and outcome.conn.get("cut"))
        if outcome.conn is not None:  # the connection says when its client stops taking bytes
            outcome.conn["on_behind"] = lambda behind: sup.behind(lease, behind)
            if outcome.conn.get("behind"):
                sup.behind(lease, True)
        self._first: p.FromWorker | None = None
        self._closed = False
        self._checkpoint = time.monotonic() + CHECKPOINT_SECONDS
        outcome.pid = lease.pid
        outcome.t_started = time.time()
        self._notify("started")

    def _notify(self, phase: str) -> None:
        self.bus.publish(RequestEvent(phase, self.outcome))

    async def start(self) -> None:
        """Send the request; raise the worker's early error (bad prompt) as a proper HTTP error."""
        # A worker reaped between the grant and now failed no stream of ours: don't wait on it.
        if self.lease.worker_id not in self.sup.workers or \
                not self.sup.transport.send(self.lease.worker_id, self.msg):
            self.close()
            raise APIError(503, f"worker for model {self.lease.model_id!r} is not reachable",
                           code="worker_unreachable", retry_after=1)
        it = self.stream.__aiter__()
        try:
            first = await it.__anext__()
        except BaseException:
            self.close()
            raise
        if isinstance(first, p.Error):
            self.close(first)
            raise APIError(first.status, first.message, code=first.code, param=first.param)
        self._first = first
        self._it = it

    async def messages(self) -> AsyncIterator[p.FromWorker]:
        """Every reply after ``start()``; the last is Done, Embeddings or Error."""
        try:
            if self._first is not None:
                first, self._first = self._first, None
                yield self._bookkeep(first)
            if not self.stream.finished:
                async for msg in self._it:
                    yield self._bookkeep(msg)
        finally:
            self.close()

    def _bookkeep(self, msg: p.FromWorker) -> p.FromWorker:
        o = self.outcome
        if isinstance(msg, p.Started):
            o.prompt_tokens = msg.prompt_tokens
        elif isinstance(msg, p.Chunk):
            if o.t_first_token is None:
                o.t_first_token = time.time()
                self._notify("first_token")
            o.completion_tokens += msg.tokens
            now = time.monotonic()
            if now >= self._checkpoint:  # a crash then leaves an honest lower bound
                self._checkpoint = now + CHECKPOINT_SECONDS
                self._notify("progress")
        elif isinstance(msg, p.Done):
            o.prompt_tokens, o.completion_tokens = msg.prompt_tokens, msg.completion_tokens
            o.cached_tokens, o.finish_reason = msg.cached_tokens, msg.finish_reason
        elif isinstance(msg, p.Embeddings):
            o.prompt_tokens = msg.prompt_tokens
        elif isinstance(msg, p.Error):
            self._record_error(msg)
        return msg

    def _record_error(self, error: p.Error) -> None:
        o = self.outcome
        o.error, o.error_type = error.message, error.code
        o.status = "cancelled" if error.code == "cancelled" else "failed"

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self, error: p.Error | None = None) -> None:
        if self._closed:
            return
        self._closed = True
        o = self.outcome
        if not self.stream.finished:
            self.sup.transport.send(self.lease.worker_id, p.Cancel(id=self.msg.id))
            cut = o.conn.get("cut") if o.conn else None
            o.status, o.error = "cancelled", cut or o.error or "client went away"
            if cut:
                o.error_type = "write_timeout"
        self.sup.transport.close_stream(self.msg.id)
        if o.conn is not None:
            o.conn.pop("on_behind", None)
        self.lease.release()
        if error is not None:
            self._record_error(error)
        elif o.status == "processing":
            o.status = "completed"
        o.t_finished = time.time()
        self._notify("finished")


def sse(data: Any) -> bytes:
    return b"data: " + msgspec.json.encode(data) + b"\n\n"


SSE_DONE = b"data: [DONE]\n\n"
