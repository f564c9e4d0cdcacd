"""Eager calls run compiled: `explain(...)` outside any JAX transformation goes through one
`jax.jit` per call signature instead of executing the traced program op by op.

Array leaves of the arguments (`jax.Array`, `np.ndarray`) are traced; every other leaf (a
Python number, a string, an activation function inside an Equinox model, an NNX GraphDef) is
static and part of the cache key, as in `equinox.filter_jit`, with the arrays' shapes and dtypes:
each key has its own `jax.jit`, and the cache keeps the `CACHE_SIZE` most recently used keys, so
that a stream of new shapes does not hold a compiled program for each without bound. A call with a tracer among its arguments (inside
`jit`, `vmap`, `grad`, `shard_map`) or with an unhashable static leaf runs `fn` directly.
"""

from __future__ import annotations

import collections
import functools
from collections.abc import Callable

import jax
import numpy as np


def _is_array(leaf) -> bool:
    return isinstance(leaf, (jax.Array, np.ndarray))


def is_traced(tree) -> bool:
    """Whether any leaf of `tree` is a tracer (the call is inside a JAX transformation)."""
    return any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree.leaves(tree))


CACHE_SIZE = 32
"""Compiled signatures an eager `explain` keeps, least recently used dropped first."""


def jit_when_eager(fn: Callable, size: int | None = None) -> Callable:
    """`fn`, compiled per call signature when called with concrete arguments; the `size` most
    recently used signatures (static leaves, array shapes and dtypes; `None`: `CACHE_SIZE`) are
    kept, each with its compiled program, and `call.clear_cache()` drops them all."""
    size = CACHE_SIZE if size is None else size
    compiled: collections.OrderedDict = collections.OrderedDict()

    @functools.wraps(fn)
    def call(*args, **kwargs):
        leaves, treedef = jax.tree.flatten((args, kwargs))
        if any(isinstance(leaf, jax.core.Tracer) for leaf in leaves):
            return fn(*args, **kwargs)
        traced = tuple(_is_array(leaf) for leaf in leaves)
        static = tuple(leaf for leaf, t in zip(leaves, traced) if not t)
        arrays = [leaf for leaf, t in zip(leaves, traced) if t]
        kinds = tuple(type(leaf) for leaf in static)  # 1, 1.0 and True are equal keys, not one program
        key = (treedef, traced, static, kinds, tuple((a.shape, a.dtype) for a in arrays))
        try:
            jitted = compiled.get(key)
        except TypeError:  # an unhashable static leaf
            return fn(*args, **kwargs)
        if jitted is None:
            jitted = compiled[key] = jax.jit(functools.partial(_rebuilt, fn, treedef, traced, static))
            while len(compiled) > size:
                compiled.popitem(last=False)
        else:
            compiled.move_to_end(key)
        return jitted(arrays)

    call.clear_cache = compiled.clear
    call.cache_size = lambda: len(compiled)
    return call


def _rebuilt(fn, treedef, traced, static, arrays):
    arrays, static = iter(arrays), iter(static)
    leaves = [next(arrays) if t else next(static) for t in traced]
    args, kwargs = jax.tree.unflatten(treedef, leaves)
    return fn(*args, **kwargs)
