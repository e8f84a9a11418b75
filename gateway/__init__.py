"""The parent process: HTTP app, supervisor, CLI and daemon. Never imports mlx."""
