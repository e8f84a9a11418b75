"""The ``mlx-supervisor`` command: ``python -m mlx_supervisor.gateway.cli`` or the console script."""

from mlx_supervisor.gateway.cli.main import main

__all__ = ["main"]
