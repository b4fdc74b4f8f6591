"""Names for the mlx-lm objects the worker passes around, for the type checker.

MLX's arrays are typed (``mx.array``, from mlx's stubs). mlx-lm's models and KV
caches are not, in ways that matter here: a model is an ``nn.Module`` subclass whose
``__call__`` each architecture defines (``nn.Module`` declares none), and mlx-lm
itself types a cache as ``list[Any]`` (one layer object per transformer block:
KVCache, QuantizedKVCache, RotatingKVCache, ...). Nothing here runs: mlx is only
imported for the type checker, so that the replay engine never pays for it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol, Union

if TYPE_CHECKING:
    import mlx.core as mx

# One layer of an mlx-lm KV cache (mlx-lm's cache classes carry no annotations).
CacheLayer = Any
# A sequence's KV cache: one layer per transformer block, as mlx-lm's
# make_prompt_cache returns it (mlx-lm's own type for it is list[Any]).
PromptCache = list[CacheLayer]

# The stream a lane computes on (mlx-lm's generation_stream).
Stream = Union["mx.Stream", "mx.ThreadLocalStream"]


class Model(Protocol):
    """An mlx-lm model as the lanes call it: the logits of `inputs` (batch,
    tokens), feeding their keys and values into `cache`."""

    def __call__(self, inputs: mx.array, cache: PromptCache | None = None) -> mx.array: ...

    # nn.Module's: the weights as a nested dict of arrays.
    def parameters(self) -> dict[str, Any]: ...
