"""The catalog: which models this server may serve, resolved from config.

Only catalog entries are ever served; a request names an id or alias, never a path, so no
request can make the server read an arbitrary file.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from mlx_supervisor.shared.config import Config, ModelConfig
from mlx_supervisor.shared.hosts import local_ranks
from mlx_supervisor.shared.sizes import estimate_footprint, parse_size, read_model_config

log = logging.getLogger("mlx_supervisor.catalog")

# A worker process with Python, MLX and transformers imported holds this much before any weights.
WORKER_BASELINE = 320 * 2**20


@dataclass
class Entry:
    id: str
    path: str
    kind: str
    pinned: bool
    ttl: float
    aliases: list[str]
    max_concurrency: int
    max_queue: int
    estimate: int
    context_length: int
    env: dict[str, str] = field(default_factory=dict)
    ranks: int = 1
    reserved: bool = False
    """``memory`` was set in config: the ledger charges at least that, whatever is measured."""
    source: ModelConfig | None = None


def hf_cache_dir() -> Path:
    env = os.environ.get("HF_HUB_CACHE")
    if env:
        return Path(env)
    home = os.environ.get("HF_HOME")
    return (Path(home) if home else Path.home() / ".cache" / "huggingface") / "hub"


def resolve_repo(repo: str, revision: str | None = None) -> str | None:
    """The local snapshot of ``repo`` in the Hugging Face cache (``revision``: that commit, or
    the one a branch/tag ref points at; else the newest), or None."""
    root = hf_cache_dir() / f"models--{repo.replace('/', '--')}"
    snaps = root / "snapshots"
    if revision is not None:
        ref = root / "refs" / revision
        commit = ref.read_text().strip() if ref.is_file() else revision
        snap = snaps / commit
        return str(snap) if (snap / "config.json").exists() else None
    if not snaps.is_dir():
        return None
    dirs = sorted((d for d in snaps.iterdir() if (d / "config.json").exists()), key=lambda d: d.stat().st_mtime)
    return str(dirs[-1]) if dirs else None


def discover_hf_cache() -> dict[str, ModelConfig]:
    """Every MLX model already in the local HF cache (a snapshot with safetensors + config.json)."""
    out: dict[str, ModelConfig] = {}
    root = hf_cache_dir()
    if not root.is_dir():
        return out
    for d in root.glob("models--*"):
        repo = d.name[len("models--"):].replace("--", "/", 1)
        path = resolve_repo(repo)
        if path and any(Path(path).glob("*.safetensors")):
            out[repo] = ModelConfig(repo=repo)
    return out


def detect_kind(path: str) -> str:
    try:
        from mlx_supervisor.shared.model_kind import detect_kind as detect
    except ImportError:  # pragma: no cover
        return "lm"
    return detect(path)


def build(cfg: Config, total_memory: int) -> tuple[dict[str, Entry], dict[str, str], list[str]]:
    """Catalog entries, an alias map (alias -> id) and the problems worth a warning."""
    entries: dict[str, Entry] = {}
    aliases: dict[str, str] = {}
    problems: list[str] = []
    models = dict(discover_hf_cache()) if cfg.discover_hf_cache else {}
    models.update(cfg.models)
    for name, m in models.items():
        path = m.path or (resolve_repo(m.repo, m.revision) if m.repo else None)
        if path is None:
            at = f"@{m.revision}" if m.revision else ""
            problems.append(f"model {name!r}: repo {m.repo!r}{at} is not in the local Hugging Face cache"
                            + ("" if cfg.allow_download else " (allow_download = false)"))
            path = ""
        path = str(Path(path).expanduser()) if path else ""
        kind = m.kind or (detect_kind(path) if path else "lm")
        ranks = max(1, len(m.hosts))
        if m.memory:
            estimate = parse_size(m.memory)
        elif kind == "fake":
            estimate = int(m.env.get("FAKE_MEMORY_BYTES", 100 * 2**20))
        else:
            # Each rank holds 1/ranks of the weights; only this machine's ranks count here.
            estimate = (estimate_footprint(path, cfg.headroom, ranks) + WORKER_BASELINE) \
                * local_ranks(m.hosts)
        ctx = m.context_length or int(read_model_config(path).get("max_position_embeddings", 0) or 0)
        entries[name] = Entry(
            id=name, path=path, kind=kind, pinned=m.pinned,
            ttl=cfg.default_ttl if m.ttl is None else m.ttl,
            aliases=list(m.aliases),
            max_concurrency=m.max_concurrency or cfg.max_concurrency,
            max_queue=cfg.max_queue if m.max_queue is None else m.max_queue,
            estimate=estimate, context_length=ctx, env=dict(m.env), ranks=ranks,
            reserved=m.memory is not None, source=m,
        )
        for a in m.aliases:
            aliases[a] = name
    return entries, aliases, problems
