"""Adding and removing catalog models as drop-ins: the checks and the file work shared by the
``/admin`` routes (a running gateway) and the CLI (when no gateway runs).

Every refusal is an APIError naming the problem: a name already used (by the main config, a
drop-in or an alias: 409), a bad entry (400 naming the field), a model only the hand-written
config defines (409: edit that file). Nothing is written until every check has passed, and the
write itself is atomic (shared/dropins.py).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from mlx_supervisor.gateway.catalog import hf_cache_dir, resolve_repo
from mlx_supervisor.gateway.errors import APIError
from mlx_supervisor.shared import dropins
from mlx_supervisor.shared.config import Config, ModelConfig, semantic_problems
from mlx_supervisor.shared.sizes import format_size


def owner(cfg: Config, config_dir: Path, name: str) -> str | None:
    """Who defines ``name`` (as an id or an alias): a file path, or None when nobody does."""
    for mid, m in cfg.models.items():
        if name == mid or name in m.aliases:
            f = dropins.file_of(config_dir, mid)
            return str(f) if f.exists() else "the main config"
    return None


def check_name(cfg: Config, config_dir: Path, name: str, repo: str | None = None) -> bool:
    """Refuse a bad or taken name. A pull of the repo a drop-in (or the main config) already
    serves under ``name`` is a re-pull: True when a drop-in should then be (re)written."""
    bad = dropins.name_problem(name)
    if bad:
        raise APIError(400, bad, param="name", code="invalid_value")
    taken = owner(cfg, config_dir, name)
    if taken is None:
        return True
    existing = cfg.models.get(name)
    if repo is not None and existing is not None and existing.repo == repo:
        return taken != "the main config"
    raise APIError(409, f"model {name!r} already exists (defined in {taken}); pick another "
                   "name (--as NAME) or remove it first (mlx-supervisor rm)",
                   param="name", code="model_exists")


def check_add(cfg: Config, config_dir: Path, name: str, model: ModelConfig, total_memory: int) -> None:
    """Every reason ``name`` -> ``model`` cannot go into the catalog, as one APIError."""
    check_name(cfg, config_dir, name)
    problems = semantic_problems(Config(memory_budget=cfg.memory_budget, models={name: model}),
                                 total_memory)
    if problems:
        key, msg = problems[0]
        raise APIError(400, f"{key}: {msg}", param=key.rsplit(".", 1)[-1], code="invalid_value")
    if model.repo and resolve_repo(model.repo, model.revision) is None:
        at = f"@{model.revision}" if model.revision else ""
        raise APIError(400, f"repo {model.repo}{at} is not in the local Hugging Face cache "
                       f"({hf_cache_dir()}); fetch it with `mlx-supervisor pull {model.repo}`",
                       param="repo", code="repo_not_cached")


def removable(cfg: Config, config_dir: Path, name: str) -> ModelConfig:
    """The drop-in model ``name`` (an id, not an alias) that ``rm`` may take out."""
    if name not in cfg.models:
        avail = ", ".join(sorted(cfg.models)) or "none"
        raise APIError(404, f"model {name[:200]!r} does not exist; models: {avail}",
                       param="name", code="model_not_found")
    if not dropins.file_of(config_dir, name).exists():
        raise APIError(409, f"model {name!r} is defined in the main config, not by pull/add: "
                       "remove it from that file (then `mlx-supervisor reload`)",
                       param="name", code="not_a_dropin")
    return cfg.models[name]


def check_delete(model: ModelConfig, others: dict[str, ModelConfig]) -> None:
    """Refuse ``--delete-files`` for a local ``path`` (those are the user's files) and for a
    repo another catalog entry still serves; asked before anything is removed."""
    if not model.repo:
        raise APIError(400, "--delete-files deletes Hugging Face cache files only; this model is a "
                       f"local directory ({model.path}), left as it is", param="delete_files",
                       code="invalid_value")
    users = sorted(n for n, m in others.items() if m.repo == model.repo)
    if users:
        raise APIError(409, f"repo {model.repo} is still served as {', '.join(users)}; its files stay",
                       param="delete_files", code="repo_in_use")


def delete_cached(model: ModelConfig, others: dict[str, ModelConfig]) -> str:
    """Delete a repo model's folder from the Hugging Face cache (every revision); a summary.

    The folder itself, found by ``scan_cache_dir``: ``delete_revisions`` matches commit hashes
    across every repo, and a fork or mirror shares its commits with the original."""
    from huggingface_hub import scan_cache_dir

    check_delete(model, others)
    root = hf_cache_dir()
    repos = [r for r in (scan_cache_dir(root).repos if root.is_dir() else ())
             if r.repo_id == model.repo and r.repo_type == "model"]
    if not repos:
        return f"no cached files for {model.repo}"
    freed = sum(r.size_on_disk for r in repos)
    for r in repos:
        shutil.rmtree(r.repo_path)
    return f"deleted {model.repo} from the cache ({format_size(freed)})"
