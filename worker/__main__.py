"""``python -m mlx_supervisor.worker``: see :mod:`mlx_supervisor.worker.main`."""

from mlx_supervisor.worker import process_guard

process_guard.set_parent_death_signal()  # before the imports below: die with the gateway

from mlx_supervisor.worker.main import main  # noqa: E402

raise SystemExit(main())
