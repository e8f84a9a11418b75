"""``python -m mlx_supervisor.worker``: see :mod:`mlx_supervisor.worker.main`."""

from mlx_supervisor.worker.main import main

raise SystemExit(main())
