"""What a disk-cache entry of n tokens must look like for the model that reads it.

A file's header names its layers' classes, its arrays' dtypes and shapes and its
layers' scalars. All of that can be wrong while the header's identity and tokens
are right (a file edited, truncated and padded, or written by a bug): arrays of
another shape fail inside a batch step (`concatenate`), arrays holding fewer
tokens than the header says answer from a shorter context. So the layout an entry
must have is learned from the model itself: the worker feeds two short prompts
(`SHORT` and `LONG` tokens) to fresh caches of every form its entries can take,
and what differs between the two is the token axis. An entry of n tokens must
then have, layer by layer, a class the model's cache has there, the same arrays
with the same dtypes, every axis but the token axis as in the probe, the token
axis at the length that class holds for n tokens, and the same scalars (except
those that move with the tokens, which must stay within them).

Token axis lengths by class: full-attention layers (plain, quantized, the
concatenating one) are stored cut to exactly n; a sliding window holds at most
n + window (mlx-lm's concatenating update keeps up to window - 1 old tokens
beside a whole new chunk; a batch's rotated row can hold fewer than its window);
a recurrent state (ArraysCache) has no token axis at all. Other classes (chunked
attention, nested CacheLists, classes a model defines) are checked for their
arrays' names, dtypes and ranks only: their buffers grow in steps the two probes
do not show, and an entry of theirs that would fail a step fails the trial
instead (disk_cache.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

# The probe prompts' lengths: two lengths show which axis counts tokens.
SHORT, LONG = 2, 3
# Classes stored cut to exactly the tokens they hold (disk_cache._compact and
# mlx-lm's own state properties).
EXACT = frozenset({"KVCache", "QuantizedKVCache", "ConcatenateKVCache"})
# Classes whose every shape and scalar is checked (the rest: names, dtypes, ranks).
STRICT = EXACT | {"RotatingKVCache", "ArraysCache"}

Scalar = None | bool | int | float | str


class LayoutMismatch(ValueError):
    """An entry that is not what the model's cache would hold."""


@dataclass(frozen=True)
class LayerDescription:
    """One layer of a cache as a file holds it: mlx-lm's class name, its arrays
    (path in its state → safetensors dtype and shape) and its scalar state."""

    cls: str
    tensors: dict[str, tuple[str, tuple[int, ...]]]
    scalars: dict[str, Scalar]
    window: int | None = None  # a sliding window's size (probes only)


@dataclass(frozen=True)
class _TensorRule:
    dtype: str
    shape: tuple[int, ...]  # at SHORT tokens
    token_axis: int | None


@dataclass(frozen=True)
class _LayerRule:
    tensors: dict[str, _TensorRule]
    fixed: dict[str, Scalar]
    moving: frozenset[str]
    window: int | None
    strict: bool


class Layout:
    """Per layer, the classes an entry may hold there and each one's rule."""

    def __init__(self, layers: list[dict[str, _LayerRule]]) -> None:
        self._layers = layers

    @classmethod
    def learn(cls, short: Sequence[list[LayerDescription]], long: Sequence[list[LayerDescription]]) -> Layout:
        """From the model's caches of each form (`short[k]` and `long[k]`: form k
        at SHORT and LONG tokens). ValueError when the probes disagree in a way
        no token axis explains."""
        if len(short) != len(long) or not short:
            raise ValueError("the probes give no layout")
        layers: list[dict[str, _LayerRule]] = [{} for _ in short[0]]
        for a_form, b_form in zip(short, long):
            if len(a_form) != len(layers) or len(b_form) != len(layers):
                raise ValueError("the probes' caches have different numbers of layers")
            for i, (a, b) in enumerate(zip(a_form, b_form)):
                layers[i][a.cls] = _rule(a, b)
        return cls(layers)

    def check(self, layers: Sequence[LayerDescription], n: int) -> None:
        """Raises LayoutMismatch, naming the first difference, unless `layers`
        are what the model's cache holds after n tokens."""
        if len(layers) != len(self._layers):
            raise LayoutMismatch(f"{len(layers)} layers, the model's cache has {len(self._layers)}")
        for i, (layer, rules) in enumerate(zip(layers, self._layers)):
            rule = rules.get(layer.cls)
            if rule is None:
                raise LayoutMismatch(f"layer {i} is a {layer.cls}, the model's cache has {' or '.join(rules)}")
            _check_layer(i, layer, rule, n)


def _rule(a: LayerDescription, b: LayerDescription) -> _LayerRule:
    if a.cls != b.cls or a.tensors.keys() != b.tensors.keys() or a.scalars.keys() != b.scalars.keys():
        raise ValueError(f"the probes' layers differ in kind ({a.cls}, {b.cls})")
    strict = a.cls in STRICT
    tensors: dict[str, _TensorRule] = {}
    for path, (dtype, shape) in a.tensors.items():
        other_dtype, other_shape = b.tensors[path]
        if dtype != other_dtype or len(shape) != len(other_shape):
            raise ValueError(f"the probes' {a.cls} arrays {path} differ in dtype or rank")
        moved = [ax for ax, (x, y) in enumerate(zip(shape, other_shape)) if x != y]
        if strict and (len(moved) > 1 or any(other_shape[ax] - shape[ax] != LONG - SHORT for ax in moved)):
            raise ValueError(f"the probes' {a.cls} arrays {path} grow on no single token axis")
        tensors[path] = _TensorRule(dtype, shape, moved[0] if moved else None)
    moving = frozenset(k for k, v in a.scalars.items() if b.scalars[k] != v)
    fixed = {k: v for k, v in a.scalars.items() if k not in moving}
    return _LayerRule(tensors, fixed, moving, a.window, strict)


def _check_layer(i: int, layer: LayerDescription, rule: _LayerRule, n: int) -> None:
    where = f"layer {i} ({layer.cls})"
    if layer.tensors.keys() != rule.tensors.keys():
        raise LayoutMismatch(f"{where} has arrays {sorted(layer.tensors)}, expected {sorted(rule.tensors)}")
    for path, (dtype, shape) in layer.tensors.items():
        want = rule.tensors[path]
        if dtype != want.dtype:
            raise LayoutMismatch(f"{where} array {path} is {dtype}, expected {want.dtype}")
        if len(shape) != len(want.shape):
            raise LayoutMismatch(f"{where} array {path} has shape {list(shape)}, expected rank {len(want.shape)}")
        if not rule.strict:
            continue
        for axis, (got, expected) in enumerate(zip(shape, want.shape)):
            if axis == want.token_axis:
                low, high = _token_span(layer.cls, rule.window, n)
                if not low <= got <= high:
                    span = str(low) if low == high else f"{low}..{high}"
                    raise LayoutMismatch(f"{where} array {path} holds {got} tokens, expected {span} for {n}")
            elif got != expected:
                raise LayoutMismatch(f"{where} array {path} has shape {list(shape)}, expected {list(want.shape)}")
    if layer.scalars.keys() != rule.fixed.keys() | rule.moving:
        raise LayoutMismatch(f"{where} has scalars {sorted(layer.scalars)}")
    if not rule.strict:
        return
    for key, fixed in rule.fixed.items():
        if layer.scalars[key] != fixed:
            raise LayoutMismatch(f"{where} scalar {key} is {layer.scalars[key]!r}, expected {fixed!r}")
    bound = n + (rule.window or 0)
    for key in rule.moving:
        value = layer.scalars[key]
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= bound:
            raise LayoutMismatch(f"{where} scalar {key} is {value!r}, expected 0..{bound}")


def _token_span(cls: str, window: int | None, n: int) -> tuple[int, int]:
    if window is not None:
        return 1, n + window
    if cls in EXACT:
        return n, n
    return 1, n
