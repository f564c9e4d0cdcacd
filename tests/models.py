"""Small Flax models for the tests that need no peer library."""

from functools import partial
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlrp import composites

# The precisions an engine test runs in: float32 in JAX's default configuration (x64 off, as
# users run it) and float64 (x64 on, through the `float64` marker); `TOLERANCE` is what each
# one's rounding allows between two ways of computing the same map.
PRECISIONS = [pytest.param(jnp.float32, id="float32"),
              pytest.param(jnp.float64, id="float64", marks=pytest.mark.float64)]
TOLERANCE = {np.dtype(np.float32): dict(rtol=2e-5, atol=1e-6), np.dtype(np.float64): dict(rtol=1e-10, atol=1e-14)}


def tolerance(dtype) -> dict:
    return TOLERANCE[np.dtype(dtype)]

NAMED = {
    "EpsilonPlus": composites.EpsilonPlus,
    "EpsilonPlusFlat": composites.EpsilonPlusFlat,
    "EpsilonAlpha2Beta1": composites.EpsilonAlpha2Beta1,
    "EpsilonAlpha2Beta1Flat": composites.EpsilonAlpha2Beta1Flat,
    "EpsilonGammaBox": lambda: composites.EpsilonGammaBox(-3.0, 3.0),
}


# Each named composite once, the dtypes alternating: the transformation tests check jit, vmap
# and shard_map per composite without running every composite in every precision (suite time).
NAMED_ONCE = [pytest.param(name, dtype.values[0], id=f"{name}-{dtype.id}", marks=dtype.marks)
              for name, dtype in zip(NAMED, PRECISIONS * len(NAMED))]


class CNN(nn.Module):
    """conv, BatchNorm, relu, max-pool, residual add, mean pooling, dense."""

    @nn.compact
    def __call__(self, x):
        x = nn.Conv(4, (3, 3), padding=1)(x)
        x = nn.relu(nn.BatchNorm(use_running_average=True)(x))
        x = nn.max_pool(x, (2, 2), (2, 2))
        h = nn.relu(nn.Conv(4, (3, 3), padding=1)(x))
        x = nn.relu(h + x)
        x = nn.avg_pool(x, (2, 2), (2, 2))
        x = x.reshape(x.shape[0], -1)
        return nn.Dense(3)(x)


def init(model, shape, dtype=None, seed=0):
    """Random input and variables (BatchNorm statistics drawn too); `dtype` None: the widest
    float of the configuration (float64 under the `float64` marker, else float32)."""
    dtype = jax.dtypes.canonicalize_dtype(jnp.float64) if dtype is None else dtype
    x = jax.random.normal(jax.random.PRNGKey(seed), shape, dtype)
    variables = model.init(jax.random.PRNGKey(seed + 1), x)
    if "batch_stats" in variables:
        key = jax.random.PRNGKey(seed + 2)
        variables = dict(variables)
        variables["batch_stats"] = jax.tree.map(
            lambda s: 0.5 + jax.random.uniform(key, s.shape, s.dtype), variables["batch_stats"]
        )
    return variables, x


class ResNetBlock(nn.Module):
    """The basic block of the Flax repository's ImageNet example (`examples/imagenet/models.py`)."""

    filters: int
    conv: Any
    norm: Any
    strides: tuple = (1, 1)

    @nn.compact
    def __call__(self, x):
        y = nn.relu(self.norm()(self.conv(self.filters, (3, 3), self.strides)(x)))
        y = self.norm(scale_init=nn.initializers.zeros_init())(self.conv(self.filters, (3, 3))(y))
        if x.shape != y.shape:
            x = self.norm(name="norm_proj")(self.conv(self.filters, (1, 1), self.strides, name="conv_proj")(x))
        return nn.relu(x + y)


class ResNet(nn.Module):
    """Flax's ImageNet ResNet (stem, stages of blocks, mean pooling, dense head), with its
    `dtype`, `param_dtype` and `train` arguments; `stage_sizes=(2, 2, 2, 2)` is ResNet-18."""

    stage_sizes: tuple = (2, 2, 2, 2)
    num_classes: int = 10
    num_filters: int = 8
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = True):
        conv = partial(nn.Conv, use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype)
        norm = partial(nn.BatchNorm, use_running_average=not train, momentum=0.9, epsilon=1e-5,
                       dtype=self.dtype, param_dtype=self.param_dtype)
        x = conv(self.num_filters, (7, 7), (2, 2), padding=[(3, 3), (3, 3)], name="conv_init")(x)
        x = nn.relu(norm(name="bn_init")(x))
        x = nn.max_pool(x, (3, 3), strides=(2, 2), padding="SAME")
        for i, size in enumerate(self.stage_sizes):
            for j in range(size):
                strides = (2, 2) if i > 0 and j == 0 else (1, 1)
                x = ResNetBlock(self.num_filters * 2**i, conv, norm, strides)(x)
        x = jnp.mean(x, axis=(1, 2))
        x = nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=self.param_dtype)(x)
        return jnp.asarray(x, self.dtype)


def random_variables(model, x, seed=0, **kwargs):
    """Variables of `model` drawn with NumPy (Flax's initializers and JAX's random numbers
    compile once per shape, seconds for a ResNet): kernels normal with variance 1/fan-in,
    biases small, BatchNorm as `randomize_batchnorm`."""
    shapes = jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x, **kwargs), x)
    rng = np.random.default_rng(seed)

    def draw(s):
        scale = 1 / np.sqrt(np.prod(s.shape[:-1])) if len(s.shape) > 1 else 0.1
        return jnp.asarray(scale * rng.standard_normal(s.shape), s.dtype)

    return randomize_batchnorm(jax.tree.map(draw, shapes), seed)


def randomize_batchnorm(variables, seed=0):
    """Running statistics and BatchNorm scales that are not the initial ones (some scales
    negative), so that merging them matters."""
    rng = np.random.default_rng(seed + 1)

    def visit(path, leaf):
        name = str(path[-1])
        for key, draw in (("var", lambda: 0.5 + rng.uniform(size=leaf.shape)),
                          ("mean", lambda: 0.1 * rng.standard_normal(leaf.shape)),
                          ("scale", lambda: 0.5 + 0.5 * rng.standard_normal(leaf.shape))):
            if key in name:
                return jnp.asarray(draw(), leaf.dtype)
        return leaf

    return jax.tree_util.tree_map_with_path(visit, variables)
