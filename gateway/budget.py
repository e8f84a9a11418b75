"""The memory budget, clamped on Metal to what the GPU may keep resident.

On Apple silicon ``mx.device_info()["max_recommended_working_set_size"]`` is the most the GPU
should wire (about 75% of RAM on most Macs); a budget above it lets models in that will page.
A budget written as a percentage (the default ``75%`` included) is clamped to it and the log
says so; a budget written in bytes is the operator's word and is kept, with a warning.

The gateway never imports mlx, so the figure is read by a short child process (``import
mlx.core`` is about 20 ms), only where Metal can report it (macOS).
"""

from __future__ import annotations

import functools
import json
import logging
import subprocess
import sys

from mlx_supervisor.shared.sizes import format_size, parse_size

log = logging.getLogger("mlx_supervisor.serve")

_PROBE = ("import json, mlx.core as mx; "
          "print(json.dumps(mx.device_info().get('max_recommended_working_set_size')))")


@functools.cache
def recommended_working_set(timeout: float = 20.0) -> int | None:
    """Metal's ``max_recommended_working_set_size``, read in a child; None where the device
    reports none (CPU, CUDA) or the probe fails."""
    try:
        out = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True,
                             timeout=timeout, check=True).stdout
        value = json.loads(out.strip().splitlines()[-1])
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return None
    return int(value) if isinstance(value, int | float) and value > 0 else None


def clamp(budget: int, spec: str, recommended: int | None) -> int:
    """``budget`` (parsed from ``spec``) clamped to ``recommended`` when ``spec`` is a
    percentage; bytes given explicitly are kept (with a warning when above it)."""
    if recommended is None or budget <= recommended:
        return budget
    if spec.strip().endswith("%"):
        log.warning("memory_budget %s (%s) clamped to Metal's max_recommended_working_set_size "
                    "(%s)", spec, format_size(budget), format_size(recommended))
        return recommended
    log.warning("memory_budget %s is above Metal's max_recommended_working_set_size (%s): "
                "models past it will page", spec, format_size(recommended))
    return budget


def resolve(spec: str, total: int, recommended: int | None = None) -> int:
    """The budget for ``spec`` (``"75%"`` or ``"48GB"``) on this machine."""
    if recommended is None and sys.platform == "darwin":
        recommended = recommended_working_set()
    return clamp(parse_size(spec, total), spec, recommended)
