"""A property over generated programs: LRP-0 on a bias-free ReLU network equals gradient ×
input, however the network is composed (dense maps, residual sums, means, maxima, slicing,
concatenation, stacking, scaling, dtype conversions), in float32 and bfloat16."""

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

import jaxlrp
from jaxlrp import composites


def _dense(h, w):
    return h @ w


# Each op: `(name, params(rng, features) -> list of weights, apply(h, weights) -> h, features -> features)`.
OPS = {
    "dense": (lambda rng, f: [rng.normal(size=(f, 5)) / np.sqrt(f)], lambda h, w: _dense(h, w[0]), lambda f: 5),
    "relu": (lambda rng, f: [], lambda h, w: jax.nn.relu(h), lambda f: f),
    "residual": (lambda rng, f: [rng.normal(size=(f, f)) / np.sqrt(f)],
                 lambda h, w: h + jax.nn.relu(_dense(h, w[0])), lambda f: f),
    "scale": (lambda rng, f: [], lambda h, w: h * 0.5, lambda f: f),
    "mean_pairs": (lambda rng, f: [], lambda h, w: h[:, : h.shape[1] // 2 * 2].reshape(h.shape[0], -1, 2).mean(-1),
                   lambda f: f // 2),
    "max_pairs": (lambda rng, f: [], lambda h, w: jnp.maximum(h[:, : h.shape[1] // 2], h[:, h.shape[1] // 2 : h.shape[1] // 2 * 2]),
                  lambda f: f // 2),
    "concat": (lambda rng, f: [], lambda h, w: jnp.concatenate([h, jax.nn.relu(h)], -1), lambda f: 2 * f),
    "stack": (lambda rng, f: [], lambda h, w: jnp.stack([h, -h], -1).reshape(h.shape[0], -1), lambda f: 2 * f),
    "sum_unit_axis": (lambda rng, f: [], lambda h, w: h[:, :, None].sum(-1), lambda f: f),
    "round_trip": (lambda rng, f: [], lambda h, w: h.astype(jnp.float32).astype(h.dtype), lambda f: f),
}


def _network(names, seed, dtype):
    """`(fn, params, x)` for the ops `names`, a last dense map to 3 classes."""
    rng = np.random.default_rng(seed)
    features, params, ops = 4, [], []
    for name in names:
        make, apply, shape = OPS[name]
        if shape(features) < 2 or shape(features) > 16:
            continue
        params.append([jnp.asarray(w, dtype) for w in make(rng, features)])
        ops.append(apply)
        features = shape(features)
    params.append([jnp.asarray(rng.normal(size=(features, 3)), dtype)])
    ops.append(lambda h, w: _dense(h, w[0]))

    def fn(params, x):
        h = x
        for apply, weights in zip(ops, params):
            h = apply(h, weights)
        return h

    return fn, params, jnp.asarray(rng.normal(size=(3, 4)), dtype)


def _relative_l2(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


@settings(max_examples=25, deadline=None, derandomize=True)
@given(names=st.lists(st.sampled_from(sorted(OPS)), min_size=1, max_size=6), seed=st.integers(0, 2**16),
       bfloat16=st.booleans())
def test_lrp0_equals_gradient_times_input_on_generated_relu_networks(names, seed, bfloat16):
    dtype = jnp.bfloat16 if bfloat16 else jnp.float32
    fn, params, x = _network(names, seed, dtype)
    relevance = jaxlrp.lrp_fn(fn, composites.LRP0())(params, x, target=0)
    assert relevance.shape == x.shape and relevance.dtype == x.dtype
    # gradient × input of the same (rounded) weights and input, in float32
    wide = jax.tree.map(lambda a: a.astype(jnp.float32), (params, x))
    gradient = jax.grad(lambda x: fn(wide[0], x)[:, 0].sum())(wide[1])
    expected = gradient * wide[1]
    # float32: rounding only; bfloat16: the model's own rounding of its activations
    assert _relative_l2(relevance, expected) < (3e-2 if bfloat16 else 1e-5), names
