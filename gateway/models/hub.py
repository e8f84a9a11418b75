"""What a pull would fetch, decided from the Hub's file listing before any weights move.

``plan()`` asks the Hub (``huggingface_hub``, so ``HF_ENDPOINT``/``HF_TOKEN`` apply) for the
repo's files with their sizes, keeps only what a worker loads (config, tokenizer, weights,
processor), and refuses a repo that has no safetensors weights or whose footprint could never
fit the memory budget. ``check_architecture()`` runs after the small files are in: it asks
mlx-lm / mlx-vlm / mlx-embeddings themselves, in a child interpreter (the gateway never
imports mlx), whether they know the model's architecture.
"""

from __future__ import annotations

import fnmatch
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from mlx_supervisor.gateway.catalog import WORKER_BASELINE
from mlx_supervisor.gateway.errors import APIError
from mlx_supervisor.shared.sizes import MIN_OVERHEAD, format_size

# Top-level files a worker reads; anything else in a repo (PyTorch/GGUF copies, README, images,
# "original/" checkpoints) is never fetched.
NEEDED = ("config.json", "generation_config.json", "*.safetensors", "model.safetensors.index.json",
          "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
          "added_tokens.json", "vocab.json", "vocab.txt", "merges.txt", "*.tiktoken",
          "chat_template.json", "chat_template.jinja", "preprocessor_config.json",
          "processor_config.json", "video_preprocessor_config.json", "modules.json",
          "config_sentence_transformers.json", "sentence_bert_config.json")
NEEDED_NESTED = ("1_Pooling/config.json",)
OTHER_WEIGHTS = (".bin", ".pt", ".pth", ".gguf", ".ckpt", ".h5", ".msgpack", ".onnx")


@dataclass
class HubFile:
    name: str
    size: int

    @property
    def weights(self) -> bool:
        return self.name.endswith(".safetensors")


@dataclass
class Plan:
    repo: str
    revision: str
    """The commit every file is fetched at (the requested branch/tag resolved once)."""
    files: list[HubFile]
    estimate: int
    """The worker's footprint, estimated as the catalog does from the weights on disk."""

    @property
    def total(self) -> int:
        return sum(f.size for f in self.files)

    @property
    def small(self) -> list[HubFile]:
        return [f for f in self.files if not f.weights]

    @property
    def weights(self) -> list[HubFile]:
        return [f for f in self.files if f.weights]


def needed(name: str) -> bool:
    if name in NEEDED_NESTED:
        return True
    return "/" not in name and any(fnmatch.fnmatchcase(name, pat) for pat in NEEDED)


def footprint(weights: int, headroom: float) -> int:
    return int(weights * (1 + headroom)) + MIN_OVERHEAD + WORKER_BASELINE


def plan(repo: str, revision: str | None, budget: int, headroom: float) -> Plan:
    """The listing, filtered and checked; APIError (4xx) for a repo we must not fetch."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        info = HfApi().model_info(repo, revision=revision, files_metadata=True)
    except RevisionNotFoundError:
        raise APIError(404, f"repo {repo!r} has no revision {revision!r}", param="revision",
                       code="revision_not_found") from None
    except GatedRepoError:
        raise APIError(403, f"repo {repo!r} is gated: accept its terms on the Hub and set HF_TOKEN",
                       param="repo", code="repo_gated") from None
    except RepositoryNotFoundError:
        raise APIError(404, f"repo {repo!r} was not found on the Hub (private? set HF_TOKEN)",
                       param="repo", code="repo_not_found") from None
    except HfHubHTTPError as e:
        raise APIError(502, f"the Hub answered an error for {repo!r}: {e}", code="hub_error") from None
    except OSError as e:  # connection refused, DNS, timeouts
        raise APIError(502, f"cannot reach the Hub ({os.environ.get('HF_ENDPOINT') or 'huggingface.co'}): "
                       f"{e}", code="hub_unreachable") from None
    siblings = info.siblings or []
    files = [HubFile(s.rfilename, int(s.size or 0)) for s in siblings if needed(s.rfilename)]
    names = {f.name for f in files}
    if not any(f.weights for f in files):
        other = sorted(s.rfilename for s in siblings if s.rfilename.endswith(OTHER_WEIGHTS))
        found = f" (it has {', '.join(other[:3])}{'...' if len(other) > 3 else ''})" if other else ""
        raise APIError(422, f"repo {repo!r} is not an MLX model: no safetensors weights{found}; "
                       "look for an MLX conversion (e.g. under mlx-community)",
                       param="repo", code="not_mlx_model")
    if "config.json" not in names:
        raise APIError(422, f"repo {repo!r} is not an MLX model: it has no config.json",
                       param="repo", code="not_mlx_model")
    est = footprint(sum(f.size for f in files if f.weights), headroom)
    if est > budget:
        raise APIError(413, f"repo {repo!r} needs about {format_size(est)} (weights "
                       f"{format_size(sum(f.size for f in files if f.weights))} plus headroom), more "
                       f"than the whole memory budget of {format_size(budget)}: it could never be "
                       "loaded here", param="repo", code="model_too_large")
    assert info.sha is not None
    files.sort(key=lambda f: (f.weights, f.name))  # the small files first
    return Plan(repo=repo, revision=info.sha, files=files, estimate=est)


def check_architecture(path: Path, kind: str, repo: str) -> None:
    """APIError (422) when the MLX library for ``kind`` does not know this architecture."""
    env = {k: v for k, v in os.environ.items() if "TOKEN" not in k.upper()}
    env["HF_HUB_OFFLINE"] = "1"
    try:
        r = subprocess.run([sys.executable, "-m", "mlx_supervisor.worker.archcheck", str(path), kind],
                           capture_output=True, text=True, timeout=120, env=env)
    except subprocess.TimeoutExpired:
        raise APIError(500, "the architecture check did not finish in 120 s", code="internal_error") from None
    if r.returncode != 0:
        lines = r.stdout.strip().splitlines() or r.stderr.strip().splitlines() or ["unknown"]
        why = lines[-1]
        raise APIError(422, f"repo {repo!r} is not an MLX model this server can run: {why}",
                       param="repo", code="not_mlx_model")
