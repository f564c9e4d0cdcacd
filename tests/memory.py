"""What a function holds from its forward to its backward pass, counted from the trace.

XLA:CPU merges a `jax.checkpoint` region's recomputation with the forward pass (the
compiled `jax.grad` of a remat'd network has as many matmuls, and the same temporary memory,
as without remat), so on CPU its memory analysis cannot show checkpointing. What
`jax.vjp` keeps for the pullback can: `held_bytes(fn, *args)` traces `fn` (no compute) and
sums the residuals of its outermost `jax.vjp`, the one that `jax.grad` and jaxlrp's
relevance pass make (jaxlrp's rules call `jax.vjp` again inside the backward pass; those
are not counted).
"""

from __future__ import annotations

import contextlib

import jax
import numpy as np


@contextlib.contextmanager
def _recording():
    held: list[int] = []
    depth = [0]
    real = jax.vjp

    def vjp(*args, **kwargs):
        depth[0] += 1
        try:
            out = real(*args, **kwargs)
        finally:
            depth[0] -= 1
        if depth[0] == 0:
            leaves = {id(leaf): leaf for leaf in jax.tree.leaves(out[1])}
            held.append(sum(int(np.prod(leaf.shape)) * np.dtype(leaf.dtype).itemsize for leaf in leaves.values()))
        return out

    jax.vjp = vjp
    try:
        yield held
    finally:
        jax.vjp = real


def held_bytes(fn, *args, **kwargs) -> int:
    """Bytes of the residuals of the first outermost `jax.vjp` that tracing `fn(*args)` makes
    (0 for a function that makes none, such as a forward pass)."""
    with _recording() as held:
        jax.make_jaxpr(lambda *a: fn(*a, **kwargs))(*args)
    return held[0] if held else 0
