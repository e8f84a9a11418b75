"""The Starlette app: routes, one pure-ASGI middleware (request id, auth, access log), CORS when
configured, lifespan. Every answer is JSON in its API's shape, unknown routes and wrong methods
included; a trailing slash on a known route is served, not redirected."""

from __future__ import annotations

import contextlib
import hmac
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from starlette.applications import Starlette
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from mlx_supervisor.gateway.api import admin as routes_admin
from mlx_supervisor.gateway.api import anthropic as routes_anthropic
from mlx_supervisor.gateway.api import openai as routes_openai
from mlx_supervisor.gateway.api import responses as routes_responses
from mlx_supervisor.gateway.api.gateway import (
    Gateway,
    error_response,
    json_response,
    request_id_var,
)
from mlx_supervisor.gateway.errors import APIError

log = logging.getLogger("mlx_supervisor.access")
_RID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
# Operator routes (job history included) take the admin key when one is set, else the API key.
ADMIN_PREFIXES = ("/admin/", "/v1/jobs", "/v1/queue")
CORS_METHODS = ["GET", "POST", "DELETE"]
CORS_HEADERS = ["authorization", "content-type", "x-api-key", "anthropic-version", "anthropic-beta",
                "x-request-id", "openai-beta", "openai-organization", "openai-project"]


class JSONCORSMiddleware(CORSMiddleware):
    """Starlette's CORS, with its preflight answers (``OK``, or 400 naming what was refused) as
    JSON like every other answer. A refused origin gets no ``Access-Control-Allow-Origin``."""

    def preflight_response(self, request_headers: Headers) -> Response:
        plain = super().preflight_response(request_headers)
        headers = {k: v for k, v in plain.headers.items() if k not in ("content-type", "content-length")}
        if plain.status_code == 200:
            return json_response({"status": "ok"}, headers=headers)
        detail = bytes(plain.body).decode(errors="replace")
        e = APIError(plain.status_code, f"CORS preflight refused: {detail}", code="cors_refused")
        return Response(e.to_json(), status_code=e.status, headers=headers, media_type="application/json")


def _token(headers: dict[bytes, bytes]) -> str | None:
    auth = headers.get(b"authorization", b"").decode("latin-1")
    if auth[:7].lower() == "bearer ":
        return auth[7:].strip()
    key = headers.get(b"x-api-key")
    return key.decode("latin-1") if key is not None else None


def _matches(given: str | None, want: str) -> bool:
    return given is not None and hmac.compare_digest(given.encode("utf-8", "replace"), want.encode())


class GatewayMiddleware:
    """Request id in and out, API-key checks, and one access-log line per request."""

    def __init__(self, app: ASGIApp, gateway: Gateway):
        self.app = app
        self.gw = gateway

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        if len(path) > 1 and path.endswith("/"):  # /v1/models/ is /v1/models, not a 307
            path = path.rstrip("/") or "/"
            scope = {**scope, "path": path, "raw_path": path.encode()}
        headers = dict(scope["headers"])
        given = headers.get(b"x-request-id", b"").decode("latin-1")
        rid = given if _RID.match(given) else "req-" + uuid.uuid4().hex[:24]
        t0 = time.time()
        state = scope.setdefault("state", {})
        state["request_id"] = rid
        state["t_received"] = t0
        token = request_id_var.set(rid)
        status = [0]
        started = [False]

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                started[0] = True
                status[0] = message["status"]
                hs = list(message.get("headers", []))
                if not any(k.lower() == b"x-request-id" for k, _ in hs):
                    hs.append((b"x-request-id", rid.encode()))
                message = {**message, "headers": hs}
            await send(message)

        try:
            err = self._auth(scope["path"], headers)
            if err is not None:
                await error_response(err, scope)(scope, receive, send_with_id)
                return
            await self.app(scope, receive, send_with_id)
        except Exception as exc:
            # A bug: logged here once (re-raising would have uvicorn log it a second time).
            log.error("unhandled error on %s %s", scope["method"], scope["path"], exc_info=exc)
            if not started[0]:
                await error_response(APIError(500, f"internal error: {type(exc).__name__}",
                                              code="internal_error"), scope)(scope, receive, send_with_id)
        finally:
            self._log(scope, rid, status[0], t0)
            request_id_var.reset(token)

    def _auth(self, path: str, headers: dict[bytes, bytes]) -> APIError | None:
        cfg = self.gw.cfg
        if path.startswith(ADMIN_PREFIXES):
            wants = [cfg.admin_key or cfg.api_key]
        elif path.startswith("/v1/"):
            wants = [cfg.api_key]
        elif path == "/metrics" and not cfg.public_metrics:
            wants = [cfg.api_key, cfg.admin_key]  # a scraper may hold either key
        else:
            return None
        keys = [k for k in wants if k]
        if not keys:
            return None
        given = _token(headers)
        if any(_matches(given, k) for k in keys):
            return None
        msg = "missing API key (send 'Authorization: Bearer KEY')" if given is None else "invalid API key"
        return APIError(401, msg, code="invalid_api_key", type="invalid_request_error")

    def _log(self, scope: Scope, rid: str, status: int, t0: float) -> None:
        path = scope["path"]
        # Probes, scrapes and the status page's own polling would drown the real traffic.
        if path in ("/", "/health", "/metrics", "/health/ready", "/admin/status") or path.startswith("/static"):
            return
        o = scope.get("state", {}).get("outcome")
        duration_ms = round((time.time() - t0) * 1000, 1)
        fields: dict[str, Any] = {"request_id": rid, "http_status": status, "path": path,
                                  "method": scope["method"], "duration_ms": duration_ms}
        extra = ""
        if o is not None:
            ttft_ms = round((o.t_first_token - o.t_received) * 1000, 1) if o.t_first_token else None
            fields.update(model=o.model, status=o.status, prompt_tokens=o.prompt_tokens,
                          completion_tokens=o.completion_tokens, ttft_ms=ttft_ms)
            ttft = f"{ttft_ms:.0f}ms" if ttft_ms is not None else "-"
            extra = (f" model={o.model} status={o.status} prompt_tokens={o.prompt_tokens} "
                     f"completion_tokens={o.completion_tokens} ttft={ttft}")
        log.info("%s %s %d request_id=%s duration=%.0fms%s", scope["method"], path, status, rid,
                 duration_ms, extra, extra=fields)


async def _api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, APIError)
    return error_response(exc, request.scope)


async def _http_error(request: Request, exc: Exception) -> Response:
    """Starlette's own 404 (no route) and 405 (wrong method, with ``Allow``), as JSON."""
    assert isinstance(exc, HTTPException)
    if exc.status_code == 404:
        e = APIError(404, f"no route {request.method} {request.url.path[:200]}", code="not_found")
    elif exc.status_code == 405:
        allow = (exc.headers or {}).get("Allow", "")
        e = APIError(405, f"method {request.method} is not allowed on {request.url.path[:200]}"
                     + (f"; use {allow}" if allow else ""), code="method_not_allowed")
    else:
        e = APIError(exc.status_code, str(exc.detail), code="http_error")
    resp = error_response(e, request.scope)
    resp.headers.update(exc.headers or {})
    return resp


async def health(request: Request) -> Response:
    gw: Gateway = request.app.state.gateway
    hot = sum(1 for w in gw.sup.workers.values() if w.hot and not w.spare)
    body: dict[str, Any] = {"status": "ok", "hot_models": hot, "pid": gw.sup.snapshot()["pid"],
                            "uptime": round(time.time() - gw.sup.started, 3)}
    parts, warnings = gw.health()
    body.update(parts)
    if warnings:
        body["warnings"] = warnings
    return json_response(body)


async def health_ready(request: Request) -> Response:
    gw: Gateway = request.app.state.gateway
    missing = [m for m, s in gw.sup.slots.items()
               if s.pinned and not (s.worker and s.worker.state.value == "ready")]
    if gw.sup.closing:
        return json_response({"status": "shutting_down"}, status=503)
    if missing:
        return json_response({"status": "loading", "waiting_for": missing}, status=503)
    return json_response({"status": "ready"})


def create_app(gateway: Gateway) -> Starlette:
    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await gateway.sup.start()
        for hook in gateway.startup_hooks:
            await hook()
        try:
            yield
        finally:
            await gateway.sup.shutdown()
            for hook in gateway.shutdown_hooks:
                try:
                    await hook()
                except Exception:
                    log.exception("shutdown hook failed")

    routes: list[BaseRoute] = [
        Route("/health", health, methods=["GET"]),
        Route("/health/ready", health_ready, methods=["GET"]),
        *routes_openai.routes,
        *routes_anthropic.routes,
        *routes_responses.routes,
        *routes_admin.routes,
        *gateway.routes,
    ]
    app = Starlette(routes=routes, lifespan=lifespan,
                    exception_handlers={APIError: _api_error, HTTPException: _http_error})
    app.router.redirect_slashes = False  # the middleware strips a trailing slash instead
    app.state.gateway = gateway
    app.add_middleware(GatewayMiddleware, gateway=gateway)
    if gateway.cfg.cors_origins:  # outermost: a preflight is answered before any key check
        app.add_middleware(JSONCORSMiddleware, allow_origins=gateway.cfg.cors_origins,
                           allow_methods=CORS_METHODS, allow_headers=CORS_HEADERS,
                           expose_headers=["x-request-id", "retry-after"], max_age=600)
    return app
