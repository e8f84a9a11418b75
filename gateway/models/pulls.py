"""The gateway's pulls: one per repo and revision at a time, each on its own thread, streamed to
any number of clients as server-sent events.

A second pull of a repo already being pulled joins the first (one download, the same events).
Every pull's events also go on the gateway's bus (``PullEvent``), so the status page shows pulls
started anywhere, the CLI's included.
Clients only listen: one that leaves takes nothing with it, and ``GET /admin/pulls/{id}``
attaches again. When the files are in, ``finish`` (on the event loop) writes the drop-in and
applies it like a SIGHUP reload, so the model is servable when ``done`` goes out.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import msgspec

from mlx_supervisor.gateway.api.gateway import Gateway
from mlx_supervisor.gateway.errors import APIError
from mlx_supervisor.gateway.models import edit
from mlx_supervisor.gateway.models.pull import Pull, PullEvent, default_name
from mlx_supervisor.shared import dropins, paths
from mlx_supervisor.shared.config import Config, ModelConfig

log = logging.getLogger("mlx_supervisor.pull")
KEEPALIVE = 15.0
TERMINAL = ("done", "error")
KEEP_ENDED = 50  # finished pulls still listed by GET /admin/pulls


def config_dir() -> Path:
    """The directory whose ``models.d`` this gateway reads (beside its config file)."""
    from mlx_supervisor.gateway import serve

    args = serve.CONFIG_ARGS
    if args is None:
        raise APIError(409, "this gateway was not started by `serve`: it has no config directory",
                       code="no_config")
    given = getattr(args, "config", None)
    return (Path(given).expanduser().resolve() if given else paths.config_path()).parent


def read_config() -> Config:
    """The config as on disk now (what a reload would apply)."""
    from mlx_supervisor.gateway import serve

    assert serve.CONFIG_ARGS is not None
    return serve.resolve_config(serve.CONFIG_ARGS)


async def apply(gw: Gateway) -> None:
    """Apply the files on disk to the running gateway, as SIGHUP does; APIError if refused."""
    if gw.reload is None or not await gw.reload():
        raise APIError(500, "the gateway refused to reload its config (see its log)", code="reload_failed")


def sse(ev: dict[str, Any]) -> bytes:
    return b"event: %s\ndata: %s\n\n" % (ev["event"].encode(), msgspec.json.encode(ev))


class Pulls:
    def __init__(self, gw: Gateway):
        self.gw = gw
        self.by_id: dict[str, Pull] = {}
        self.active: dict[tuple[str, str], Pull] = {}
        self.loop: asyncio.AbstractEventLoop | None = None

    def start(self, repo: str, revision: str | None, name: str | None, pin: bool) -> Pull:
        """The pull of ``repo@revision`` now running (joined), or a new one."""
        self.loop = asyncio.get_running_loop()
        key = (repo, revision or "main")
        running = self.active.get(key)
        if running is not None and not running.finished:
            if name and running.name and name != running.name:
                raise APIError(409, f"{repo} is being pulled as {running.name!r} ({running.id}); "
                               "wait for it, then add another name with `mlx-supervisor add`",
                               param="name", code="pull_in_progress")
            running.pin = running.pin or pin  # read when it finishes: a later --pin still counts
            return running
        pull = Pull(repo, revision, self.gw.sup.budget, self.gw.cfg.headroom, name, pin)
        ended = [i for i, p in self.by_id.items() if p.finished]
        for i in ended[:max(0, len(ended) - KEEP_ENDED)]:  # the list stays short
            del self.by_id[i]
        self.active[key] = self.by_id[pull.id] = pull
        loop = self.loop
        pull.subscribe(lambda ev: loop.call_soon_threadsafe(self.gw.bus.publish, PullEvent(ev)))
        threading.Thread(target=pull.run, args=(self._finish,), name=pull.id, daemon=True).start()
        log.info("pull %s: %s@%s started", pull.id, repo, revision or "main")
        return pull

    def cancel_all(self) -> None:
        for p in self.by_id.values():
            p.cancel()

    def _finish(self, pull: Pull) -> str:
        """On the download thread: run ``_apply`` on the loop and wait for it."""
        assert self.loop is not None
        return asyncio.run_coroutine_threadsafe(self._apply(pull), self.loop).result(timeout=300)

    async def _apply(self, pull: Pull) -> str:
        assert pull.plan is not None
        name = pull.name or default_name(pull.repo)
        cdir = config_dir()
        cfg = await asyncio.to_thread(read_config)
        model = ModelConfig(repo=pull.repo, revision=pull.plan.revision, pinned=pull.pin)
        if edit.check_name(cfg, cdir, name, pull.repo):
            await asyncio.to_thread(dropins.write, cdir, name, model)
        await apply(self.gw)
        if pull.pin:
            task = asyncio.ensure_future(self.gw.sup.load(name, True))
            task.add_done_callback(lambda t: t.cancelled() or t.exception())
        log.info("pull %s: %s@%s is model %r", pull.id, pull.repo, pull.plan.revision[:12], name)
        return name

    async def wait_started(self, pull: Pull) -> None:
        """Return once the pull has started (its size and architecture passed); APIError with
        the pull's own status when it failed before that (too large, not MLX, cancelled...)."""
        async for ev in self._raw(pull):
            if ev["event"] in ("started", "done"):
                return
            if ev["event"] == "error":
                raise APIError(int(ev["status"]), ev["message"], code=ev.get("code"),
                               param=ev.get("param"))

    async def events(self, pull: Pull) -> AsyncIterator[bytes]:
        """The pull's events as SSE: what happened so far (started, latest progress), then live."""
        yield b"retry: 1000\n\n"
        async for ev in self._raw(pull, keepalive=True):
            yield b": keepalive\n\n" if ev["event"] == "keepalive" else sse(ev)

    async def _raw(self, pull: Pull, keepalive: bool = False) -> AsyncIterator[dict[str, Any]]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()

        def listener(ev: dict[str, Any]) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, ev)

        backlog = pull.subscribe(listener)
        try:
            seen = 0
            for ev in sorted(backlog, key=lambda e: e["seq"]):
                seen = ev["seq"]
                yield ev
                if ev["event"] in TERMINAL:
                    return
            while True:
                try:
                    ev = await asyncio.wait_for(queue.get(), KEEPALIVE)
                except asyncio.TimeoutError:
                    if keepalive:
                        yield {"event": "keepalive", "seq": seen}
                    continue
                if ev["seq"] <= seen:
                    continue
                seen = ev["seq"]
                yield ev
                if ev["event"] in TERMINAL:
                    return
        finally:
            pull.unsubscribe(listener)
