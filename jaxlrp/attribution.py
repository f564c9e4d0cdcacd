"""Baselines to compare LRP with: gradient, gradient × input, SmoothGrad, Integrated Gradients
and occlusion, in `jaxlrp.lrp`'s call form.

Each factory takes a model in every form `jaxlrp.lrp` takes (Linen module, NNX module or
GraphDef, a function `fn(params, x)`, or with `argnums=` another argument of a function) and
returns `explain` in the same call form: `explain(variables, x, *, target=None)`
(`explain(x, *, target=None)` for an NNX module), a pure function that composes with
`jax.jit`, `jax.vmap` and `jax.grad`. `target` is keyword-only; other keywords of `explain` go
to the model (a mask). SmoothGrad, Integrated Gradients and occlusion evaluate all their
perturbed copies of the batch in one batched call. Keyword arguments of the factory go to the
model at every call (`train=False`); `output=` selects what is explained of the model's output,
as in `jaxlrp.lrp` (`output=lambda out: out["logits"]`).

`target` picks what is explained, as in `jaxlrp.lrp`, and defines the explained score
`S(x) = Σ_j t_j f_j(x)` per sample:

* `None`: each sample's arg-max output (`t` one-hot at the class predicted for `x`);
* an int or int array of shape `output.shape[:-1]`: that class;
* a float array of the output's shape: the weights `t` themselves.

Inputs are floating point, with a leading batch axis.

Example::

    from jaxlrp import attribution

    saliency = attribution.gradient(model)(variables, x, target=3)
    ig = jax.jit(attribution.integrated_gradients(model, n=32))(variables, x)
    sg = attribution.smoothgrad(model)(variables, x, key=jax.random.key(0))
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxlrp import _bindings
from jaxlrp._checks import batch_of, output_weights

__all__ = ["gradient", "gradient_x_input", "integrated_gradients", "occlusion", "smoothgrad"]


def gradient(model, *, output: Callable | None = None, **model_kwargs) -> Callable[..., jax.Array]:
    """The gradient of the explained score, `∂S/∂x` (saliency; Simonyan et al. 2014,
    "Deep inside convolutional networks")."""

    def method(forward, x, target):
        out = forward(x)
        return out, _gradient(forward, x, output_weights(out, target, batch_of(x)))

    return _in_call_form(model, method, output, model_kwargs)


def gradient_x_input(model, *, output: Callable | None = None, **model_kwargs) -> Callable[..., jax.Array]:
    """`x ⊙ ∂S/∂x` (Shrikumar et al. 2016, "Not just a black box"); for a ReLU network without
    biases it equals LRP-0."""

    def method(forward, x, target):
        out = forward(x)
        return out, x * _gradient(forward, x, output_weights(out, target, batch_of(x)))

    return _in_call_form(model, method, output, model_kwargs)


def smoothgrad(
    model, noise_level: float = 0.1, n: int = 20, *, output: Callable | None = None, **model_kwargs
) -> Callable[..., jax.Array]:
    """The mean gradient over `n` noisy copies of the input (Smilkov et al. 2017, "SmoothGrad:
    removing noise by adding noise"):

        R = (1/n) Σ_k ∂S/∂x (x + ε_k),   ε_k ~ N(0, σ²),   σ = noise_level · (max x − min x)

    with the range taken per sample. `explain(variables, x, *, key, target=None)` takes the
    noise's `jax.random` key. The class for `target=None` is the one predicted for the clean
    input, for every copy. (zennit's `SmoothGrad` makes its last copy noise-free; this one
    draws noise for all `n`, as the paper does.)
    """
    _check_count(n, "smoothgrad")

    def method(forward, x, target, *, key):
        out = forward(x)
        weights = output_weights(out, target, batch_of(x))
        axes = tuple(range(1, x.ndim))
        sigma = noise_level * (jnp.max(x, axes, keepdims=True) - jnp.min(x, axes, keepdims=True))
        noise = jax.random.normal(key, (n, *x.shape), x.dtype) * sigma
        grads = jax.vmap(lambda e: _gradient(forward, x + e, weights))(noise)
        return out, grads.mean(axis=0)

    return _in_call_form(model, method, output, model_kwargs, own=("key",))


def integrated_gradients(
    model, baseline=0.0, n: int = 20, *, output: Callable | None = None, **model_kwargs
) -> Callable[..., jax.Array]:
    """The path integral of the gradient from `baseline` to `x` (Sundararajan et al. 2017,
    "Axiomatic attribution for deep networks"), as the right Riemann sum zennit uses:

        R = (x − x̄) ⊙ (1/n) Σ_{k=1..n} ∂S/∂x (x̄ + (k/n)(x − x̄))

    `baseline` (x̄) is a value or an array broadcastable to `x`. For a linear model R equals
    `∂S/∂x ⊙ (x − x̄)` for every `n`; its sum approaches `S(x) − S(x̄)` as `n` grows.
    """
    _check_count(n, "integrated_gradients")

    def method(forward, x, target):
        out = forward(x)
        weights = output_weights(out, target, batch_of(x))
        start = jnp.broadcast_to(jnp.asarray(baseline, x.dtype), x.shape)
        alphas = jnp.arange(1, n + 1, dtype=x.dtype) / n
        grads = jax.vmap(lambda a: _gradient(forward, start + a * (x - start), weights))(alphas)
        return out, (x - start) * grads.mean(axis=0)

    return _in_call_form(model, method, output, model_kwargs)


def occlusion(
    model,
    window: Sequence[int],
    stride: Sequence[int] | None = None,
    fill=0.0,
    chunk: int | None = None,
    *,
    output: Callable | None = None,
    **model_kwargs,
) -> Callable[..., jax.Array]:
    """Occlusion (Zeiler & Fergus 2014, "Visualizing and understanding convolutional
    networks"): a window of shape `window` slides over the input by `stride` (one size per
    non-batch axis; the windows lie inside the input), the covered values are set to `fill`, and
    each element gets the mean drop of the explained score over the windows that cover it:

        R_i = (1/|W_i|) Σ_{w ∈ W_i} S(x) − S(x with window w filled)

    (Captum's definition; an element that no window covers gets 0). All windows run as one
    batched call; `chunk` bounds how many occluded copies of the batch go through the model at
    once (`jax.lax.map`'s `batch_size`; `None`: all).
    """
    window = tuple(int(w) for w in window)
    stride = window if stride is None else tuple(int(s) for s in stride)

    def method(forward, x, target):
        out = forward(x)
        weights = output_weights(out, target, batch_of(x))
        covers = _window_covers(x.shape, window, stride)  # per axis: (windows, size)
        grid = tuple(c.shape[0] for c in covers)

        def score(y):
            return (forward(y) * weights).reshape(y.shape[0], -1).sum(axis=1)

        def drop(index):
            starts = jnp.unravel_index(index, grid)
            mask = _outer([c[s] for c, s in zip(covers, starts)])
            return score(x) - score(jnp.where(mask, jnp.asarray(fill, x.dtype), x))

        drops = _map(drop, jnp.arange(int(np.prod(grid))), chunk)  # (windows, batch)
        total = drops.T.reshape(x.shape[0], *grid)
        for cover in covers:  # Σ_w drop_w · mask_w, one axis at a time (the masks are outer products)
            total = jnp.tensordot(total, cover.astype(x.dtype), axes=[[1], [0]])
        count = _outer([c.sum(axis=0) for c in covers])
        return out, jnp.where(count > 0, total / jnp.maximum(count, 1).astype(x.dtype), 0)

    return _in_call_form(model, method, output, model_kwargs)


def _in_call_form(model, method: Callable, output, model_kwargs: dict, own: tuple[str, ...] = ()) -> Callable:
    """`explain(*args, target=None, **kwargs)` in `model`'s call form, from `method(forward, x,
    target, **own) -> (output, attribution)`, `forward(y)` the model's (selected) output at `y`;
    the keywords in `own` are the method's, the others go to the model."""
    binding = _bindings.of(model, output=output, **model_kwargs)
    if not binding.explains_one_array:
        raise TypeError(
            f"jaxlrp.attribution explains one input array; argnums={binding.argnums!r} names several. "
            f"Explain them one at a time (an int argnums), or use jaxlrp.lrp_fn."
        )

    def pure(others, x, *, target=None, **kwargs):
        if "conditions" in kwargs:
            raise TypeError("jaxlrp.attribution: conditions= conditions LRP's relevance (jaxlrp.lrp); a baseline takes none.")
        given = {name: kwargs.pop(name) for name in own if name in kwargs}
        return method(lambda y: binding.apply(others, y, kwargs), x, target, **given)

    return _bindings.result_only(_bindings.call_form(binding, pure))


def _gradient(forward, x, weights) -> jax.Array:
    """`∂(Σ weights ⊙ f(x))/∂x`."""
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(
            f"jaxlrp.attribution: gradient baselines need a floating-point input, got {x.dtype}. For "
            f"token ids, explain the model from its embedding output (or use jaxlrp.lrp)."
        )
    _, pullback = jax.vjp(forward, x)
    return pullback(weights)[0]


def _window_covers(shape, window, stride) -> list[jax.Array]:
    """Per non-batch axis, a boolean `(windows, size)` matrix: which elements each window covers."""
    sizes = shape[1:]
    if len(window) != len(sizes) or len(stride) != len(sizes):
        raise ValueError(
            f"jaxlrp.attribution.occlusion: window {window} and stride {stride} need one size per "
            f"non-batch axis of the input {tuple(shape)}."
        )
    covers = []
    for size, w, s in zip(sizes, window, stride):
        if not (1 <= w <= size and s >= 1):
            raise ValueError(
                f"jaxlrp.attribution.occlusion: window {window} must fit the input's sizes {tuple(sizes)} "
                f"and stride {stride} be positive."
            )
        starts = np.arange(0, size - w + 1, s)[:, None]
        positions = np.arange(size)[None]
        covers.append(jnp.asarray((positions >= starts) & (positions < starts + w)))
    return covers


def _outer(vectors: list[jax.Array]) -> jax.Array:
    """The outer product of 1-D arrays (logical and for booleans)."""
    result = vectors[0]
    for v in vectors[1:]:
        result = result[..., None] * v if result.dtype != jnp.bool_ else result[..., None] & v
    return result


def _map(fn, xs, chunk: int | None):
    """`vmap(fn)(xs)`, or `lax.map` in chunks of `chunk`."""
    return jax.vmap(fn)(xs) if chunk is None else jax.lax.map(fn, xs, batch_size=chunk)


def _check_count(n: int, name: str) -> None:
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"jaxlrp.attribution.{name}: n is the number of passes, a positive int; got {n!r}.")
