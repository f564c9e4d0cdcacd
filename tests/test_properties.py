"""Property tests (hypothesis): conservation, and jit / vmap change nothing."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import jaxlrp
from jaxlrp import composites, rules

pytestmark = pytest.mark.float64  # conservation checked to float64 rounding

SETTINGS = settings(max_examples=10, deadline=None, derandomize=True)  # the same examples in every CI run


class BiasFreeReLUNet(nn.Module):
    widths: tuple[int, ...]

    @nn.compact
    def __call__(self, x):
        for w in self.widths[:-1]:
            x = nn.relu(nn.Dense(w, use_bias=False)(x))
        return nn.Dense(self.widths[-1], use_bias=False)(x)


def _net(widths, seed, batch):
    model = BiasFreeReLUNet(tuple(widths))
    x = jax.random.normal(jax.random.PRNGKey(seed), (batch, 5), jnp.float64)
    variables = model.init(jax.random.PRNGKey(seed + 1), x)
    return model, jax.tree.map(lambda p: p.astype(jnp.float64), variables), x


@SETTINGS
@given(widths=st.lists(st.integers(2, 8), min_size=1, max_size=4), seed=st.integers(0, 2**16))
def test_lrp0_conserves_exactly_on_bias_free_relu_nets(widths, seed):
    model, variables, x = _net([*widths, 3], seed, batch=2)
    out, relevance = jaxlrp.output_and_lrp(model, composites.LayerMap({"dense": rules.Epsilon(0.0)}))(variables, x)
    np.testing.assert_allclose(relevance.sum(-1), out.max(-1), rtol=1e-9, atol=1e-12)


CONSERVING = {
    "zplus": rules.ZPlus(1e-12),
    "alpha2beta1": rules.AlphaBeta(2.0, 1.0, 1e-12),
    "alpha1beta0": rules.AlphaBeta(1.0, 0.0, 1e-12),
    "gamma": rules.Gamma(0.5, 1e-12),
    "flat": rules.Flat(1e-12),
    "wsquare": rules.WSquare(1e-12),
}


@SETTINGS
@given(
    rule=st.sampled_from(sorted(CONSERVING)),
    features=st.integers(3, 9),
    kind=st.sampled_from(["dense", "conv"]),
    seed=st.integers(0, 2**16),
)
def test_rules_conserve_what_they_receive(rule, features, kind, seed):
    """A bias-free layer hands on all the relevance it receives (up to the stabilizer).

    ZPlus and AlphaBeta drop the relevance of an output that has no contribution of the
    needed sign; each contribution has that sign with probability 1/2, so a fan-in of 64 or
    more makes such an output a 2^-64 event rather than a flaky test.
    """
    if kind == "dense":
        layer, shape = nn.Dense(features, use_bias=False), (1, 64)
    else:
        layer, shape = nn.Conv(features, (3, 3), padding="VALID", use_bias=False), (1, 5, 5, 8)
    x = jax.random.normal(jax.random.PRNGKey(seed), shape, jnp.float64)
    variables = jax.tree.map(lambda p: p.astype(jnp.float64), layer.init(jax.random.PRNGKey(seed + 1), x))
    seed_relevance = jnp.abs(jax.random.normal(jax.random.PRNGKey(seed + 2), layer.apply(variables, x).shape))
    composite = composites.LayerMap({kind: CONSERVING[rule]})
    relevance = jaxlrp.lrp(layer, composite)(variables, x, target=seed_relevance)
    np.testing.assert_allclose(relevance.sum(), seed_relevance.sum(), rtol=1e-8)


class SmallCNN(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(3, (3, 3))(x))
        x = nn.max_pool(x, (2, 2), (2, 2))
        return nn.Dense(4)(x.reshape(x.shape[0], -1))


NAMED = {
    "EpsilonPlus": composites.EpsilonPlus(),
    "EpsilonPlusFlat": composites.EpsilonPlusFlat(),
    "EpsilonAlpha2Beta1": composites.EpsilonAlpha2Beta1(),
    "EpsilonAlpha2Beta1Flat": composites.EpsilonAlpha2Beta1Flat(),
    "EpsilonGammaBox": composites.EpsilonGammaBox(-3.0, 3.0),
}
_CNN = SmallCNN()
_VARIABLES = _CNN.init(jax.random.PRNGKey(0), jnp.ones((1, 6, 6, 1)))
_EXPLAIN = {name: jaxlrp.lrp(_CNN, c) for name, c in NAMED.items()}
_JITTED = {name: jax.jit(e) for name, e in _EXPLAIN.items()}


@SETTINGS
@given(name=st.sampled_from(sorted(NAMED)), seed=st.integers(0, 2**16), batch=st.integers(1, 3))
def test_jit_and_vmap_change_nothing(name, seed, batch):
    x = jax.random.normal(jax.random.PRNGKey(seed), (batch, 6, 6, 1), jnp.float32)
    eager = _EXPLAIN[name](_VARIABLES, x)
    np.testing.assert_allclose(_JITTED[name](_VARIABLES, x), eager, rtol=2e-4, atol=1e-6)
    per_sample = jax.vmap(lambda xi: _EXPLAIN[name](_VARIABLES, xi[None])[0])(x)
    np.testing.assert_allclose(per_sample, eager, rtol=2e-4, atol=1e-6)
