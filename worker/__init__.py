"""The worker process: one model per process, ``python -m mlx_supervisor.worker``.

Never imports starlette. MLX is imported lazily by the engines, so the fake engine runs without it.
"""
