"""mlxd's model worker: one process per loaded model, running mlx-lm.

The daemon spawns ``python -m mlxd_worker``; the worker speaks the worker protocol
over a shared-memory ring pair (through the ``mlxd_protocol`` extension module) or,
as fallback, over its stdin/stdout pipes.
"""
