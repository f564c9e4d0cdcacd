"""Binding for plain JAX functions `fn(params, x)` written with jnp / lax / jax.nn.

Each matmul or convolution with one parameter operand is a layer (kinds "dense", "conv");
its path is the `jax.named_scope` it was traced in, so `NameMap` patterns match scope names.
"""

from __future__ import annotations

import jax


def trace(fn, argnums: int, others: tuple, x):
    """Returns `(closed_jaxpr of (others, x) -> fn(...), describe(scope) -> (scope, None))`."""

    def apply(others, x):
        args = (*others[:argnums], x, *others[argnums:])
        return fn(*args)

    closed = jax.make_jaxpr(apply)(others, x)
    return closed, lambda scope: (scope, None)
