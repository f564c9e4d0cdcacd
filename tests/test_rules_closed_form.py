"""Each rule against its closed form on the layer's Jacobian as a matrix.

For an affine layer `z = x·W + b` (W read off as the Jacobian, b as the output at x = 0) the
rules of DESIGN.md section 3 are a few lines of NumPy. Every layer type goes through the same
engine, so this checks dense, DenseGeneral, convolutions of rank 1 to 3 with strides, padding,
dilation and groups, transposed convolutions, and a conv with a merged BatchNorm whose scales
are partly negative.
"""

import zlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxlrp
from jaxlrp import composites, rules

pytestmark = pytest.mark.float64  # closed forms compared in float64


class ConvBN(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.Conv(3, (3, 3), strides=2, padding=1)(x)
        return nn.BatchNorm(use_running_average=True)(x)


class ConvSpatialScale(nn.Module):
    """A scale that varies over positions cannot be folded into the kernel (the fallback path)."""

    @nn.compact
    def __call__(self, x):
        y = nn.Conv(3, (3, 3), padding=1)(x)
        scale = self.param("scale", nn.initializers.normal(1.0), (1, *y.shape[1:]))
        return y * scale + self.param("shift", nn.initializers.normal(1.0), (1, *y.shape[1:]))


LAYERS = {
    "dense": (nn.Dense(5), (1, 7)),
    "dense_general": (nn.DenseGeneral((2, 3), axis=(-2, -1)), (1, 4, 5)),
    "conv1d_stride_pad": (nn.Conv(4, (3,), strides=2, padding=1), (1, 9, 3)),
    "conv2d_dilation_same": (nn.Conv(4, (3, 3), strides=(2, 1), padding="SAME", kernel_dilation=(1, 2)), (1, 7, 8, 2)),
    "conv2d_groups": (nn.Conv(4, (3, 3), feature_group_count=2, padding="VALID"), (1, 6, 6, 4)),
    "conv3d": (nn.Conv(2, (2, 2, 2), strides=2, padding=1), (1, 5, 5, 5, 2)),
    "conv_transpose": (nn.ConvTranspose(3, (3, 3), strides=(2, 2), padding="SAME"), (1, 4, 4, 2)),
    "conv_batchnorm": (ConvBN(), (1, 6, 6, 2)),
    "conv_spatial_scale": (ConvSpatialScale(), (1, 5, 5, 2)),
    "conv_local": (nn.ConvLocal(3, (3, 3), padding="SAME"), (1, 5, 5, 2)),
}

RULES = {
    "epsilon": rules.Epsilon(0.1),
    "zplus": rules.ZPlus(),
    "alpha2beta1": rules.AlphaBeta(2.0, 1.0),
    "alpha3beta2": rules.AlphaBeta(3.0, 2.0),
    "gamma": rules.Gamma(0.3),
    "zbox": rules.ZBox(-1.0, 2.0),
    "flat": rules.Flat(),
    "wsquare": rules.WSquare(),
    "norm": rules.Norm(),
}


def _stab(z, eps):
    return z + ((z == 0) + np.sign(z)) * eps


def _reference(name, rule, x, W, b, R):
    """Closed forms with x: (n,), W: (n, m), b, R: (m,)."""
    pos, neg = (lambda a: np.maximum(a, 0)), (lambda a: np.minimum(a, 0))
    xp, xn, Wp, Wn = pos(x), neg(x), pos(W), neg(W)
    if name in ("epsilon", "norm"):
        eps = rule.epsilon if name == "epsilon" else rule.stabilizer
        return x * (W @ (R / _stab(x @ W + b, eps)))
    eps = rule.stabilizer
    if name == "zplus":
        s = R / _stab(xp @ Wp + xn @ Wn + pos(b), eps)
        return xp * (Wp @ s) + xn * (Wn @ s)
    if name.startswith("alpha"):
        s_a = R / _stab(xp @ Wp + xn @ Wn + pos(b), eps)
        s_b = R / _stab(xp @ Wn + xn @ Wp + neg(b), eps)
        return rule.alpha * (xp * (Wp @ s_a) + xn * (Wn @ s_a)) - rule.beta * (xp * (Wn @ s_b) + xn * (Wp @ s_b))
    if name == "gamma":
        g = rule.gamma
        W_p, W_n, b_p, b_n = W + g * Wp, W + g * Wn, b + g * pos(b), b + g * neg(b)
        z = x @ W + b
        s_up = R * (z > 0) / _stab(xp @ W_p + xn @ W_n + b_p, eps)
        s_down = R * (z < 0) / _stab(xp @ W_n + xn @ W_p + b_n, eps)
        return xp * (W_p @ s_up + W_n @ s_down) + xn * (W_n @ s_up + W_p @ s_down)
    if name == "zbox":
        low, high = np.full_like(x, rule.low), np.full_like(x, rule.high)
        s = R / _stab(x @ W - low @ Wp - high @ Wn, eps)
        return x * (W @ s) - low * (Wp @ s) - high * (Wn @ s)
    if name == "wsquare":
        W2 = W**2
        return W2 @ (R / _stab(np.ones_like(x) @ W2 + b**2, eps))
    if name == "flat":
        ones = (W != 0).astype(float)  # the layer's connectivity
        return ones @ (R / _stab(np.ones_like(x) @ ones, eps))
    raise KeyError(name)


def _randomize_batchnorm(variables, key):
    def visit(path, leaf):
        names = [getattr(p, "key", "") for p in path]
        if "BatchNorm_0" in names:
            k = jax.random.fold_in(key, zlib.crc32('/'.join(names).encode()))
            if names[-1] == "var":
                return 0.5 + jax.random.uniform(k, leaf.shape, leaf.dtype)
            return jax.random.normal(k, leaf.shape, leaf.dtype)  # scale: some negative
        return leaf

    return jax.tree_util.tree_map_with_path(visit, variables)


@pytest.mark.parametrize("rule_name", RULES)
@pytest.mark.parametrize("layer_name", LAYERS)
def test_rule_matches_closed_form(layer_name, rule_name):
    layer, shape = LAYERS[layer_name]
    key = jax.random.PRNGKey(0)
    x = jax.random.normal(key, shape, jnp.float64)
    variables = layer.init(jax.random.PRNGKey(1), x)
    variables = jax.tree.map(lambda p: p + 0.1 * jax.random.normal(key, p.shape, p.dtype), variables)
    variables = _randomize_batchnorm(variables, key)

    def affine(v):
        return layer.apply(variables, v.reshape(shape)).reshape(-1)

    b = np.asarray(affine(jnp.zeros(x.size)))
    W = np.asarray(jax.jacfwd(affine)(jnp.zeros(x.size))).T  # (in, out)
    out_shape = layer.apply(variables, x).shape
    R = np.asarray(jax.random.normal(jax.random.PRNGKey(2), out_shape, jnp.float64))

    rule = RULES[rule_name]
    relevance = jaxlrp.lrp(layer, composites.LayerMap({("dense", "conv"): rule}))(variables, x, target=jnp.asarray(R))
    expected = _reference(rule_name, rule, np.asarray(x).reshape(-1), W, b, R.reshape(-1))
    np.testing.assert_allclose(np.asarray(relevance).reshape(-1), expected, rtol=1e-9, atol=1e-12)
