"""Byte sizes: parse "75%" / "48GB" / "512MiB", and estimate a model's footprint from disk."""

from __future__ import annotations

import json
import re
from pathlib import Path

_UNITS = {
    "": 1, "b": 1,
    "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9, "t": 10**12, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}
_SIZE_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*$")


def parse_size(text: str | int, total: int | None = None) -> int:
    """Bytes for ``"48GB"``, ``"512MiB"``, ``1024`` or, given ``total``, ``"75%"``.

    Raises ``ValueError`` with a message fit to show a user.
    """
    if isinstance(text, bool):
        raise ValueError(f"expected a size like '48GB' or '75%', got {text!r}")
    if isinstance(text, int):
        if text < 0:
            raise ValueError(f"size must not be negative, got {text}")
        return text
    s = text.strip()
    if s.endswith("%"):
        if total is None:
            raise ValueError(f"a percentage is not allowed here: {text!r}")
        try:
            pct = float(s[:-1])
        except ValueError:
            raise ValueError(f"bad percentage {text!r}") from None
        if not 0 < pct <= 100:
            raise ValueError(f"percentage must be in (0, 100], got {text!r}")
        return int(total * pct / 100)
    m = _SIZE_RE.match(s)
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"expected a size like '48GB', '512MiB' or '75%', got {text!r}")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def format_size(n: int | float) -> str:
    """Human-readable binary size, e.g. ``1.5 GiB``."""
    v = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(v) < 1024 or unit == "TiB":
            return f"{v:.0f} {unit}" if unit == "B" else f"{v:.1f} {unit}"
        v /= 1024
    return f"{v:.1f} TiB"  # pragma: no cover


WEIGHT_SUFFIXES = (".safetensors", ".npz", ".gguf")
# Runtime overhead over the raw weights: KV cache, activations, MLX's buffer cache.
DEFAULT_HEADROOM = 0.2
MIN_OVERHEAD = 64 * 2**20


def weight_bytes(path: str | Path) -> int:
    """Sum of the weight files in a model directory (safetensors, npz, gguf)."""
    p = Path(path)
    if p.is_file():
        return p.stat().st_size
    if not p.is_dir():
        return 0
    return sum(f.stat().st_size for f in p.iterdir() if f.is_file() and f.suffix in WEIGHT_SUFFIXES)


def estimate_footprint(path: str | Path, headroom: float = DEFAULT_HEADROOM, ranks: int = 1) -> int:
    """Bytes a worker for this model will likely hold: weights/ranks, plus headroom and a floor."""
    w = weight_bytes(path) // max(1, ranks)
    return int(w * (1 + headroom)) + MIN_OVERHEAD


def read_model_config(path: str | Path) -> dict:
    """The model's config.json as a dict, or {} if absent or unreadable."""
    try:
        with open(Path(path) / "config.json", encoding="utf-8") as f:
            data = json.load(f)
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}
