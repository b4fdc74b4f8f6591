"""Token sources and their scheduler: the engine thread, the mlx-lm backend, the replay engine."""
