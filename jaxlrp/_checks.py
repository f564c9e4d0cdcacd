"""Value checks of an explained input and of an integer target, made on concrete values only
(inside `jit` they would see tracers), shared by `jaxlrp.lrp` and the baselines."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def check_input(x) -> None:
    dtype = jnp.result_type(x)
    if not (jnp.issubdtype(dtype, jnp.floating) or jnp.issubdtype(dtype, jnp.integer)):
        raise TypeError(
            f"jaxlrp explains floating-point inputs (or integer token ids for models that start with "
            f"an embedding), got an input of dtype {dtype}."
        )
    if jnp.issubdtype(dtype, jnp.floating) and is_concrete(x):
        with jax.ensure_compile_time_eval():  # evaluated now, even inside an outer jit
            finite = bool(jnp.all(jnp.isfinite(x)))
        if not finite:
            raise ValueError(
                "jaxlrp: the input holds NaN or Inf, which would make the whole relevance map NaN. "
                "Clean the input first (under jit this cannot be checked and NaN propagates)."
            )


def is_concrete(x) -> bool:
    """A value known now (not traced), whose every shard this process holds."""
    return not isinstance(x, jax.core.Tracer) and getattr(x, "is_fully_addressable", True)


def check_classes(target, classes: int) -> None:
    t = np.asarray(target)
    if np.any(t < 0) or np.any(t >= classes):
        raise ValueError(f"jaxlrp: target class out of range [0, {classes}): {t}.")
