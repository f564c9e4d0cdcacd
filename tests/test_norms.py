"""Norms by their algebra: with the statistics held, a norm written any way is one "norm" step
whose map is Flax LayerNorm's."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxlrp
from jaxlrp import composites, rules

pytestmark = pytest.mark.float64


def keras_layer_norm(h, gamma, beta, epsilon=1e-6):
    """Keras 3's LayerNormalization on the JAX backend: `ops.moments`, then
    `x·inv + (β − mean·inv)` with `inv = rsqrt(var + ε)·γ`."""
    mean = jnp.mean(h, -1, keepdims=True)
    variance = jnp.mean(jnp.square(h), -1, keepdims=True) - jnp.square(mean)
    inv = jax.lax.rsqrt(variance + epsilon) * gamma
    res = -mean * inv + beta
    return h * inv + res


def _params():
    rng = np.random.default_rng(0)
    return {"w": jnp.asarray(rng.normal(size=(4, 6))), "scale": jnp.asarray(1 + 0.2 * rng.normal(size=6)),
            "bias": jnp.asarray(rng.normal(size=6)), "v": jnp.asarray(rng.normal(size=(6, 3)))}, \
        jnp.asarray(rng.normal(size=(3, 4)))


def with_keras(p, x):
    return keras_layer_norm(jax.nn.relu(x @ p["w"]), p["scale"], p["bias"]) @ p["v"]


def with_flax(p, x):
    normed = nn.LayerNorm(epsilon=1e-6).apply({"params": {"scale": p["scale"], "bias": p["bias"]}},
                                              jax.nn.relu(x @ p["w"]))
    return normed @ p["v"]


@pytest.mark.parametrize("composite", [composites.AttnLRP(epsilon=1e-9), composites.CPLRP(epsilon=1e-9)],
                         ids=["attnlrp", "cplrp"])
def test_a_keras_layer_norm_is_flax_layer_norms_one_norm_step(composite):
    params, x = _params()
    for fn in (with_keras, with_flax):
        table = jaxlrp.rule_table(fn, composite, params, x)
        assert [info.kind for info in table.layers] == ["dense", "norm", "dense"], fn.__name__
    keras = jaxlrp.lrp_fn(with_keras, composite)(params, x, target=1)
    np.testing.assert_allclose(keras, jaxlrp.lrp_fn(with_flax, composite)(params, x, target=1), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(jax.jit(jaxlrp.lrp_fn(with_keras, composite))(params, x, target=1), keras, rtol=1e-12)
    # the shift β takes its share under ε, as LayerNorm's does: the map does not conserve
    out = with_keras(params, x)[:, 1]
    assert not np.allclose(keras.sum(-1), out)


def test_a_keras_layer_norm_without_shift_conserves():
    params, x = _params()
    params = {**params, "bias": jnp.zeros(6)}
    out, relevance = jaxlrp.output_and_lrp(with_keras, composites.LRP0())(params, x, target=jnp.array([0, 1, 2]))
    # LRP-0 throughout with no bias anywhere: what reaches the input is the output, to rounding
    np.testing.assert_allclose(relevance.sum(-1), out[jnp.arange(3), jnp.arange(3)], rtol=1e-9)


@pytest.mark.parametrize("norm", [nn.InstanceNorm, lambda **kw: nn.GroupNorm(num_groups=3, **kw)], ids=["instance", "group"])
def test_instance_norm_is_one_norm_step_and_conserves_without_shifts(norm):
    class Net(nn.Module):
        bias: bool = True

        @nn.compact
        def __call__(self, x):
            x = nn.Conv(6, (3, 3), use_bias=False)(x)
            x = norm(use_bias=self.bias, epsilon=1e-6)(x)
            return nn.Dense(2, use_bias=False)(nn.relu(x).mean((1, 2)))

    x = jax.random.normal(jax.random.PRNGKey(0), (2, 5, 5, 3))
    variables = Net().init(jax.random.PRNGKey(1), x)
    kinds = [info.kind for info in jaxlrp.rule_table(Net(), composites.EpsilonPlus(), variables, x).layers]
    assert kinds == ["conv", "norm", "sum", "dense"]
    bare = Net(bias=False)
    params = bare.init(jax.random.PRNGKey(1), x)
    out, relevance = jaxlrp.output_and_lrp(bare, composites.LayerMap({("conv", "dense"): rules.Epsilon(1e-12)},
                                                                      stabilizer=1e-12))(params, x, target=0)
    np.testing.assert_allclose(relevance.sum((1, 2, 3)), out[:, 0], rtol=1e-8)
