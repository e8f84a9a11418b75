"""What every generating surface (OpenAI, Anthropic, Responses) shares around one ``Run``:
starting it (queue, send, first reply; all cancellable by the client leaving), and the two
response classes that always release it, streamed (SSE) or collected while being sent."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from mlx_supervisor.gateway.api.gateway import Gateway, error_response
from mlx_supervisor.gateway.api.run import Outcome, Run, until_disconnect
from mlx_supervisor.gateway.errors import APIError
from mlx_supervisor.shared import protocol as p

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


async def start_run(request: Request, gw: Gateway, model_id: str, route: str,
                    msg: p.Generate | p.Embed) -> Run:
    """Queue for a worker, send the request, wait for its first reply; all cancellable by disconnect."""
    # The request id keys the worker's stream and the ledger row: two live requests must not
    # share one (a client may reuse x-request-id). Checked and claimed with no await between.
    if msg.id in gw.active_ids:
        raise APIError(409, f"a request with id {msg.id!r} is already in flight; send a unique "
                       "x-request-id", param="x-request-id", code="duplicate_request_id")
    gw.active_ids.add(msg.id)
    outcome = Outcome(request_id=msg.id, model=model_id, route=route,
                      t_received=request.state.t_received)
    outcome.client, outcome.body = (request.client.host if request.client else None), msg
    outcome.conn = request.scope.get("state")
    request.state.outcome = outcome
    gw.observe("queued", outcome)
    runs: list[Run] = []

    async def go() -> Run:
        lease = await gw.sup.acquire(model_id, msg.id)
        run = Run(gw.sup, lease, msg, outcome, gw.bus)
        runs.append(run)
        await run.start()
        return run

    try:
        return await until_disconnect(request, go())
    except BaseException as e:
        if runs and runs[0].closed:
            raise  # the run already reported how it finished
        outcome.status = "cancelled" if not isinstance(e, APIError) or e.status == 499 else "failed"
        if isinstance(e, APIError):
            outcome.error, outcome.error_type = e.message, e.code
        outcome.t_finished = time.time()
        gw.observe("finished", outcome)
        raise


async def batched(run: Run, events: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """One write for every event already queued: the same bytes in fewer sends (and syscalls)
    when the worker is ahead of us; one event per write when it is not."""
    out: list[bytes] = []
    async for ev in events:
        out.append(ev)
        if run.stream.finished or run.stream.queue.empty():
            yield b"".join(out)
            out.clear()
    if out:
        yield b"".join(out)


class SSEStream(StreamingResponse):
    """SSE that releases its run even if the client left before the first byte was sent."""

    def __init__(self, run: Run, content: AsyncIterator[bytes], headers: dict[str, str] | None = None):
        super().__init__(batched(run, content), media_type="text/event-stream",
                         headers={"x-request-id": run.msg.id, **SSE_HEADERS, **(headers or {})})
        self._run = run

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._run.close()


class Deferred(Response):
    """A non-streamed answer that is collected while the response is being sent, so a client that
    disconnects meanwhile cancels the generation. Only a client that left gets no answer: a cancel
    by id (also a 499) is answered with its error."""

    def __init__(self, run: Run, make: Callable[[], Awaitable[Response]]):
        super().__init__()
        self._run = run
        self._make = make

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        request = Request(scope, receive)
        try:
            resp = await until_disconnect(request, self._make())
        except APIError as e:
            if e.code == "client_disconnected":
                return
            resp = error_response(e, scope)
        finally:
            self._run.close()
        await resp(scope, receive, send)
