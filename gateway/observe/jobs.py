"""Job history and control: ``/v1/jobs`` (list, get, cancel by id) and ``/v1/queue/stats``.

A plugin: ``attach(gw)`` opens the ledger, observes every request and adds the routes. A ledger
that cannot be opened (corrupt, unwritable, locked) becomes a warning on ``/health`` and the
gateway serves without it: history is a convenience, traffic is not. Cancel works either way,
because it is keyed on the requests this process has in flight, not on the file.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from mlx_supervisor.gateway.api.gateway import Gateway, json_response
from mlx_supervisor.gateway.api.run import Outcome, RequestEvent
from mlx_supervisor.gateway.errors import APIError, bad_request
from mlx_supervisor.gateway.observe.ledger import Ledger, LedgerError, Query
from mlx_supervisor.gateway.observe.ledger_schema import STATUSES, TERMINAL, job_of, row_of
from mlx_supervisor.shared import paths

log = logging.getLogger("mlx_supervisor.jobs")
MAX_LIMIT = 1000
CANCEL_REASON = "cancelled via DELETE /v1/jobs"
# The window in which a request is known here but not yet where sup.cancel looks (its Acquire not
# yet handled, or granted but its stream not yet open) is a few loop iterations; retry across it.
CANCEL_RETRY_SECONDS = 2.0
CANCEL_SETTLE_SECONDS = 5.0


def ledger_path(gw: Gateway) -> Path:
    p = gw.cfg.ledger.path
    return Path(p).expanduser() if p else paths.data_dir() / "ledger.sqlite3"


class Jobs:
    """Requests in flight (for cancel) plus the ledger (for history), fed by one observer."""

    def __init__(self, gw: Gateway, ledger: Ledger | None, disabled: str | None):
        self.gw = gw
        self.ledger = ledger
        self.disabled = disabled
        self.live: dict[str, Outcome] = {}
        self._settled: dict[str, list[asyncio.Future[Outcome]]] = {}

    def observe(self, ev: RequestEvent) -> None:
        event, o = ev.phase, ev.outcome
        rid = o.request_id
        if event == "queued":
            self.live[rid] = o
        elif event == "finished" and self.live.get(rid) is o:
            del self.live[rid]
            for fut in self._settled.pop(rid, []):
                if not fut.done():
                    fut.set_result(o)
        if self.ledger is not None:
            self.ledger.record(event, o)

    def _ledger_unavailable(self) -> APIError:
        reason = ((self.ledger.failed if self.ledger is not None else None) or self.disabled
                  or "its file cannot be read")
        return APIError(503, f"the request ledger is unavailable: {reason}", code="ledger_disabled")

    async def job(self, request_id: str, seq: int | None = None) -> dict[str, Any] | None:
        """The ledger row (it has seen every event so far), else what is known in memory. An id
        may have been reused: the latest request with it wins, earlier ones are linked."""
        live = self.live.get(request_id)
        if self.ledger is not None:
            try:
                found = await self.ledger.get(request_id, seq)
                if seq is not None or live is None:
                    return found
                if found is None or found["status"] in TERMINAL:  # the live one not written yet
                    found = await self.ledger.get(request_id)
                if found is not None and found["status"] not in TERMINAL:
                    return found
            except LedgerError:
                if seq is not None or live is None:
                    raise self._ledger_unavailable() from None
        if live is None:
            if self.ledger is None:
                raise self._ledger_unavailable()
            return None
        return job_of(row_of("started" if live.t_started else "queued", live))

    async def cancel(self, request_id: str) -> dict[str, Any]:
        o = self.live.get(request_id)
        if o is None:
            try:
                job = await self.job(request_id) if self.ledger is not None else None
            except APIError:
                job = None
            if job is None:
                raise _not_found(request_id)
            raise APIError(409, f"request {request_id} already finished ({job['status']})",
                           code="job_finished")
        settled = asyncio.get_running_loop().create_future()
        self._settled.setdefault(request_id, []).append(settled)
        deadline = time.monotonic() + CANCEL_RETRY_SECONDS
        while not await self._sup_cancel(request_id):
            if settled.done() or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.01)
        try:
            done = await asyncio.wait_for(asyncio.shield(settled), CANCEL_SETTLE_SECONDS)
        except asyncio.TimeoutError:
            raise APIError(503, f"request {request_id} did not stop within {CANCEL_SETTLE_SECONDS:g}s",
                           code="cancel_timeout", retry_after=1) from None
        if done.status != "cancelled":
            raise APIError(409, f"request {request_id} already finished ({done.status})",
                           code="job_finished")
        log.info("request_id=%s cancelled via the jobs API", request_id)
        return job_of(row_of("finished", done))

    async def _sup_cancel(self, request_id: str) -> bool:
        """``sup.cancel``, bounded: a supervisor that stopped (shutdown) never answers."""
        try:
            return await asyncio.wait_for(self.gw.sup.cancel(request_id, CANCEL_REASON), 1.0)
        except asyncio.TimeoutError:
            return False

    def queue_stats(self) -> dict[str, Any]:
        """Per model: queued, in flight, limits, oldest wait. Reads supervisor state, never writes."""
        now = time.monotonic()
        models = []
        for mid, slot in list(self.gw.sup.slots.items()):
            waiting = [w for w in list(slot.waiters) if not w.fut.done()]
            worker = slot.worker
            models.append({
                "model": mid, "state": worker.state.value if worker else "cold",
                "queued": len(waiting), "in_flight": worker.inflight if worker else 0,
                "max_concurrency": slot.entry.max_concurrency, "max_queue": slot.entry.max_queue,
                "oldest_wait_seconds": round(now - min(w.since for w in waiting), 3) if waiting else 0.0,
            })
        return {"object": "queue.stats", "models": models,
                "queued": sum(m["queued"] for m in models),
                "in_flight": sum(m["in_flight"] for m in models)}

    # ------------------------------------------------------------ routes

    async def list_route(self, request: Request) -> Response:
        q = parse_query(request)
        if self.ledger is None:
            raise self._ledger_unavailable()
        try:
            data, cursor = await self.ledger.query(q)
        except ValueError as e:
            raise bad_request(str(e), "after") from None
        except LedgerError:
            raise self._ledger_unavailable() from None
        return json_response({"object": "list", "data": data, "has_more": cursor is not None,
                              "next_cursor": cursor})

    async def one_route(self, request: Request) -> Response:
        rid = request.path_params["request_id"]
        if request.method == "DELETE":
            return json_response(await self.cancel(rid))
        seq = request.query_params.get("seq")
        if seq is not None and not seq.isdigit():
            raise bad_request("seq must be a row number from a job's `earlier` list", "seq")
        job = await self.job(rid, int(seq) if seq is not None else None)
        if job is None:
            raise _not_found(rid)
        return json_response(job)

    async def stats_route(self, request: Request) -> Response:
        return json_response(self.queue_stats())


def _float(request: Request, name: str) -> float | None:
    v = request.query_params.get(name)
    if v is None or v == "":
        return None
    try:
        return float(v)
    except ValueError:
        raise bad_request(f"{name} must be a number (epoch seconds), got {v[:50]!r}", name) from None


def parse_query(request: Request) -> Query:
    qp = request.query_params
    statuses = tuple(s for s in qp.get("status", "").split(",") if s)
    for s in statuses:
        if s not in STATUSES:
            raise bad_request(f"status must be one of {', '.join(STATUSES)}; got {s[:50]!r}", "status")
    try:
        limit = int(qp.get("limit", "50"))
    except ValueError:
        raise bad_request("limit must be an integer", "limit") from None
    if not 1 <= limit <= MAX_LIMIT:
        raise bad_request(f"limit must be between 1 and {MAX_LIMIT}", "limit")
    return Query(status=statuses, model=qp.get("model") or None, since=_float(request, "since"),
                 until=_float(request, "until"), limit=limit, after=qp.get("after") or None)


def _not_found(request_id: str) -> APIError:
    return APIError(404, f"no job with id {request_id[:200]!r}", param="request_id", code="job_not_found")


def attach(gw: Gateway) -> None:
    cfg = gw.cfg.ledger
    ledger: Ledger | None = None
    disabled: str | None = "ledger.enabled is false in the config"
    if cfg.enabled:
        try:
            ledger = Ledger(ledger_path(gw), retention_days=cfg.retention_days, max_rows=cfg.max_rows,
                            store_bodies=cfg.store_bodies)
            disabled = None
            gw.status_sources["ledger"] = ledger.status
        except LedgerError as e:
            disabled = str(e)
            log.error("%s; serving without a request ledger", e)
            gw.warnings.append(f"{e}; serving without a request ledger")
    jobs = Jobs(gw, ledger, disabled)
    gw.jobs = jobs  # the Responses API keeps its stored answers in the same ledger file
    gw.bus.subscribe(RequestEvent, jobs.observe)
    if ledger is not None:
        gw.shutdown_hooks.append(ledger.close)
    gw.routes += [
        Route("/v1/jobs", jobs.list_route, methods=["GET"]),
        Route("/v1/jobs/{request_id}", jobs.one_route, methods=["GET", "DELETE"]),
        Route("/v1/queue/stats", jobs.stats_route, methods=["GET"]),
    ]
