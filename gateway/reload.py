"""SIGHUP: re-read the config the gateway started from and apply its catalog and budget live.

The supervisor's ``reload`` keeps every worker whose model is unchanged, so adding or removing
another model, or changing the budget, costs nothing to the models being served. A config that
does not parse or fails its semantic checks is logged and ignored: the running one stays.
Settings that only take effect at start (listen address, keys, directories, ...) are logged as
needing a restart rather than half-applied.
"""

from __future__ import annotations

import asyncio
import logging

import psutil

from mlx_supervisor.gateway import catalog
from mlx_supervisor.gateway.api.gateway import Gateway
from mlx_supervisor.gateway.budget import resolve as resolve_budget
from mlx_supervisor.shared.config import Config, ConfigError, semantic_problems
from mlx_supervisor.shared.sizes import format_size

log = logging.getLogger("mlx_supervisor.reload")

# Applied on reload (the catalog is rebuilt from these); every other setting needs a restart.
LIVE = ("models", "memory_budget", "max_models", "default_ttl", "max_concurrency", "max_queue",
        "headroom", "discover_hf_cache", "allow_download")


def attach(gw: Gateway) -> None:
    lock = asyncio.Lock()

    async def reload() -> bool:
        async with lock:  # two quick SIGHUPs apply one after the other, never interleaved
            return await apply(gw)

    gw.reload = reload


def _read() -> Config:
    from mlx_supervisor.gateway import serve
    if serve.CONFIG_ARGS is None:
        raise ConfigError([("$", "the gateway was not started by `serve`; nothing to re-read")])
    return serve.resolve_config(serve.CONFIG_ARGS)


async def apply(gw: Gateway) -> bool:
    """Re-read, check, rebuild the catalog and hand it to the supervisor. False if rejected."""
    try:
        cfg = await asyncio.to_thread(_read)
        total = psutil.virtual_memory().total
        problems = semantic_problems(cfg, total)
        if problems:
            raise ConfigError(problems, "reloaded config")
        budget = await asyncio.to_thread(resolve_budget, cfg.memory_budget, total)
        entries, aliases, warnings = await asyncio.to_thread(catalog.build, cfg, total)
    except ConfigError as e:  # one line per event, even for many problems
        log.error("reload rejected, keeping the running config: %s: %s", e.source,
                  "; ".join(f"{k}: {m}" for k, m in e.problems))
        return False
    except Exception:
        log.exception("reload failed, keeping the running config")
        return False
    for w in warnings:
        log.warning("reload: %s", w)
    restart = [k for k in Config.__struct_fields__
               if k not in LIVE and getattr(cfg, k) != getattr(gw.cfg, k)]
    if restart:
        log.warning("reload: %s changed; that takes effect on restart", ", ".join(restart))
    before = set(gw.sup.slots)
    await gw.sup.reload(entries, aliases, budget, cfg.max_models)
    for k in LIVE:
        setattr(gw.cfg, k, getattr(cfg, k))
    added, removed = sorted(set(entries) - before), sorted(before - set(entries))
    log.info("reload applied: %d models (added: %s; removed: %s), budget %s, max_models %d",
             len(entries), ", ".join(added) or "none", ", ".join(removed) or "none",
             format_size(budget), cfg.max_models)
    return True
