"""Small Flax models for the tests that need no peer library."""

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxlrp import composites

NAMED = {
    "EpsilonPlus": composites.EpsilonPlus,
    "EpsilonPlusFlat": composites.EpsilonPlusFlat,
    "EpsilonAlpha2Beta1": composites.EpsilonAlpha2Beta1,
    "EpsilonAlpha2Beta1Flat": composites.EpsilonAlpha2Beta1Flat,
    "EpsilonGammaBox": lambda: composites.EpsilonGammaBox(-3.0, 3.0),
}


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


def init(model, shape, dtype=jnp.float64, seed=0):
    x = jax.random.normal(jax.random.PRNGKey(seed), shape, dtype)
    variables = model.init(jax.random.PRNGKey(seed + 1), x)
    if "batch_stats" in variables:
        key = jax.random.PRNGKey(seed + 2)
        variables = dict(variables)
        variables["batch_stats"] = jax.tree.map(
            lambda s: 0.5 + jax.random.uniform(key, s.shape, s.dtype), variables["batch_stats"]
        )
    return variables, x
