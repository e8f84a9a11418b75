"""What a rank of a sharded group knows before any heavy import (see :mod:`mlx_supervisor.worker.engines.sharded`):
its rank, and the group's shape from the command line. Rank 0 sends Hello before importing
mlx-lm, as any worker does."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass


@dataclass(frozen=True)
class ShardSpec:
    ranks: int
    hosts: tuple[str, ...]
    backend: str = "ring"
    parallel: str = "tensor"
    formation_timeout: float = 30.0

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> ShardSpec:
        hosts = tuple(h for h in (args.hosts or "").split(",") if h)
        return cls(ranks=args.ranks, hosts=hosts or ("127.0.0.1",) * args.ranks,
                   backend=args.dist_backend, parallel=args.parallel,
                   formation_timeout=args.formation_timeout)


def env_rank() -> int:
    """This process's rank as the launcher set it (ring/jaccl: MLX_RANK; MPI: its own)."""
    for key in ("MLX_RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK"):
        v = os.environ.get(key, "")
        if v.isdigit():
            return int(v)
    return 0
