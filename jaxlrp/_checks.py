"""Checks of an explained input and of a target, and what a target means for the output,
shared by `jaxlrp.lrp` and the baselines. Value checks run on concrete values only (inside
`jit` they would see tracers)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def check_input(x, values: bool = True, booleans: bool = False) -> None:
    """An error for an input that is not floats or integer ids (`booleans`: or bools, a mask
    beside other leaves of a pytree input), or is empty; with `values`, for a concrete float
    input holding NaN or Inf."""
    dtype = jnp.result_type(x)
    allowed = jnp.issubdtype(dtype, jnp.floating) or jnp.issubdtype(dtype, jnp.integer)
    if not (allowed or (booleans and dtype == jnp.bool_)):
        raise TypeError(
            f"jaxlrp explains floating-point inputs (or integer token ids for models that start with "
            f"an embedding), got an input of dtype {dtype}."
        )
    if jnp.size(x) == 0:
        raise ValueError(
            f"jaxlrp: the explained input has no values (shape {tuple(jnp.shape(x))}); there is nothing to "
            "explain. Skip empty batches (jaxlrp.explain_dataset never makes one)."
        )
    if values and jnp.issubdtype(dtype, jnp.floating) and is_concrete(x):
        with jax.ensure_compile_time_eval():  # evaluated now, even inside an outer jit
            finite = bool(jnp.all(jnp.isfinite(x)))
        if not finite:
            raise_non_finite_input()


def raise_non_finite_input():
    raise ValueError(
        "jaxlrp: the input holds NaN or Inf, which would make the whole relevance map NaN. "
        "Clean the input first (under jit this cannot be checked and NaN propagates)."
    )


def all_finite(tree) -> jax.Array:
    """Whether every float leaf of `tree` is finite, as a traceable boolean scalar."""
    flags = [jnp.all(jnp.isfinite(leaf)) for leaf in jax.tree.leaves(tree)
             if jnp.issubdtype(jnp.result_type(leaf), jnp.inexact)]
    return jnp.all(jnp.stack(flags)) if flags else jnp.array(True)


def raise_for_weights(weights) -> None:
    """An error naming the weights that hold NaN or Inf, if any do (called once a concrete
    result was found not finite, to say why)."""
    bad = [jax.tree_util.keystr(path) for path, leaf in jax.tree_util.tree_flatten_with_path(weights)[0]
           if isinstance(leaf, (jax.Array, np.ndarray)) and jnp.issubdtype(leaf.dtype, jnp.inexact)
           and is_concrete(leaf) and not bool(jnp.all(jnp.isfinite(leaf)))]
    if bad:
        shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise ValueError(
            f"jaxlrp: the model's weights hold NaN or Inf ({shown}), which makes the relevance NaN. Check the "
            "checkpoint or the training run that produced them (under jit this cannot be checked and NaN propagates)."
        )


def is_concrete(x) -> bool:
    """A value known now (not traced), whose every shard this process holds."""
    return not isinstance(x, jax.core.Tracer) and getattr(x, "is_fully_addressable", True)


def check_classes(target, classes: int, who: str = "jaxlrp") -> None:
    """An error for a concrete target class outside `[0, classes)`, naming the classes that are."""
    with jax.ensure_compile_time_eval():
        t = np.atleast_1d(np.asarray(target))
    wrong = t[(t < 0) | (t >= classes)]
    if wrong.size:
        raise ValueError(f"{who}: target class out of range [0, {classes}) for an output of {classes} classes: "
                         f"{sorted(set(wrong.tolist()))}.")


def batch_of(x) -> int | None:
    """The length of the explained input's leading axis when it has one beyond a sample's own
    (rank >= 2), else None."""
    leaves = jax.tree.leaves(x)
    return int(leaves[0].shape[0]) if leaves and jnp.ndim(leaves[0]) >= 2 else None


def output_weights(out: jax.Array, target, batch: int | None = None) -> jax.Array:
    """What `target` selects of `out`, as weights shaped like it: the one-hot of each sample's
    class (`None`: its arg-max; an int or int array of shape `out.shape[:-1]`), or a float target
    of the output's shape itself. A concrete class out of range is an error, a traced one NaN.

    With `target=None`, an output of one score per sample (shape `(batch,)`, `batch` the input's
    leading axis) and a scalar output are explained as they are: each sample's own score."""
    if not jnp.issubdtype(out.dtype, jnp.inexact):
        raise TypeError(
            f"jaxlrp explains a floating-point output; the model returns {out.dtype}{list(out.shape)} (an "
            "arg-max, a rounding or a cast), which has no relevance to propagate. Explain the scores it "
            "is computed from: output=lambda out: ... selecting a float array, or return the logits."
        )
    scores = out.ndim == 0 or (out.ndim == 1 and batch is not None and out.shape[0] == batch)
    if target is None:
        if scores:
            return jnp.ones_like(out)
        return jax.nn.one_hot(jnp.argmax(out, axis=-1), out.shape[-1], dtype=out.dtype)
    target = jnp.asarray(target)
    if out.ndim == 0 and not jnp.issubdtype(target.dtype, jnp.floating):
        raise ValueError(
            f"jaxlrp: the model returns a scalar, which has no classes to choose with target={target}; "
            "explain it with target=None (or a float seed of shape ())."
        )
    if jnp.issubdtype(target.dtype, jnp.floating):
        if target.shape != out.shape:
            raise ValueError(
                f"jaxlrp: a float target weighs the outputs (for LRP, it is the initial relevance) and "
                f"must have the output's shape {out.shape}, got {target.shape}."
            )
        return target.astype(out.dtype)
    if not jnp.issubdtype(target.dtype, jnp.integer) or target.shape not in ((), out.shape[:-1]):
        error = ValueError if jnp.issubdtype(target.dtype, jnp.integer) else TypeError
        raise error(
            f"jaxlrp: target must be None, a class index per sample (an int array of shape () or "
            f"{out.shape[:-1]}) or a float array of the output's shape {out.shape}; got "
            f"{target.dtype}{list(target.shape)}."
        )
    if is_concrete(target):
        check_classes(target, out.shape[-1])
    return jnp.broadcast_to(one_hot(target, out.shape[-1], out.dtype), out.shape)


def one_hot(target, classes: int, dtype) -> jax.Array:
    """`jax.nn.one_hot`, but a traced class outside `[0, classes)` gives a row of NaN, never the
    all-zero row (and all-zero relevance) that would look like a valid, irrelevant sample."""
    weights = jax.nn.one_hot(target, classes, dtype=dtype)
    if not jnp.issubdtype(dtype, jnp.inexact):
        return weights
    valid = (target >= 0) & (target < classes)
    return jnp.where(valid[..., None], weights, jnp.nan)
