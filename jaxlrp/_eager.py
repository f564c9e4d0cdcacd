"""Eager calls run compiled: `explain(...)` outside any JAX transformation goes through one
`jax.jit` per call signature instead of executing the traced program op by op.

Array leaves of the arguments (`jax.Array`, `np.ndarray`) are traced; every other leaf (a
Python number, a string, an activation function inside an Equinox model, an NNX GraphDef) is
static and part of the cache key, as in `equinox.filter_jit`. `jax.jit`'s own cache then
compiles once per shape, dtype and sharding. A call with a tracer among its arguments (inside
`jit`, `vmap`, `grad`, `shard_map`) or with an unhashable static leaf runs `fn` directly.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import numpy as np


def _is_array(leaf) -> bool:
    return isinstance(leaf, (jax.Array, np.ndarray))


def is_traced(tree) -> bool:
    """Whether any leaf of `tree` is a tracer (the call is inside a JAX transformation)."""
    return any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree.leaves(tree))


def jit_when_eager(fn: Callable) -> Callable:
    """`fn`, compiled per call signature when called with concrete arguments."""
    compiled: dict = {}

    @functools.wraps(fn)
    def call(*args, **kwargs):
        leaves, treedef = jax.tree.flatten((args, kwargs))
        if any(isinstance(leaf, jax.core.Tracer) for leaf in leaves):
            return fn(*args, **kwargs)
        traced = tuple(_is_array(leaf) for leaf in leaves)
        static = tuple(leaf for leaf, t in zip(leaves, traced) if not t)
        key = (treedef, traced, static)
        try:
            jitted = compiled.get(key)
        except TypeError:  # an unhashable static leaf
            return fn(*args, **kwargs)
        if jitted is None:
            jitted = compiled[key] = jax.jit(functools.partial(_rebuilt, fn, treedef, traced, static))
        return jitted([leaf for leaf, t in zip(leaves, traced) if t])

    return call


def _rebuilt(fn, treedef, traced, static, arrays):
    arrays, static = iter(arrays), iter(static)
    leaves = [next(arrays) if t else next(static) for t in traced]
    args, kwargs = jax.tree.unflatten(treedef, leaves)
    return fn(*args, **kwargs)
