"""LRP for a Haiku model, explained as a plain JAX function of its parameters.

    python examples/haiku_model.py [--small]
"""

import argparse

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np

import jaxlrp
from jaxlrp import composites, rules


def net(x):  # x: (batch, height, width, 1)
    x = jax.nn.relu(hk.Conv2D(8, kernel_shape=3)(x))
    x = hk.max_pool(x, window_shape=2, strides=2, padding="VALID")
    return hk.nets.MLP([64, 32, 10], name="mlp")(hk.Flatten()(x))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--small", action="store_true", help="8x8 images, batch 4")
    args = parser.parse_args()
    size, batch = (8, 4) if args.small else (28, 64)

    model = hk.without_apply_rng(hk.transform(net))
    x = jnp.asarray(np.random.default_rng(0).uniform(size=(batch, size, size, 1)), jnp.float32)
    params = jax.jit(model.init)(jax.random.PRNGKey(0), x)  # random stand-ins for trained weights
    print(jax.tree.map(jnp.shape, params))

    # NameMap patterns match Haiku's module names (the keys of `params`); in `combine`, the
    # first composite with a rule for a layer wins, so the LayerMap covers the other layers.
    layer_map = composites.LayerMap({"conv": rules.ZPlus(), "dense": rules.Epsilon()}, first=rules.Flat())
    composite = composites.combine(composites.NameMap({"mlp/~/linear_2": rules.Epsilon(0.25)}), layer_map)
    print(jaxlrp.rule_table(model.apply, composite, params, x))

    # lrp_fn explains argument `argnums` (default 1: x) of any function of (params, x).
    R = jax.jit(jaxlrp.lrp_fn(model.apply, composite))(params, x)
    R_plain = jax.jit(jaxlrp.lrp_fn(model.apply, layer_map))(params, x)
    logits = jax.jit(model.apply)(params, x)
    print(f"input {x.shape} -> logits {logits.shape}, relevance {R.shape}")
    # Epsilon(0.25) at the last layer absorbs part of each (small, random-weight) logit;
    # the LayerMap alone (Epsilon(1e-6)) keeps it all.
    sums, sums_plain = R.sum(axis=(1, 2, 3)), R_plain.sum(axis=(1, 2, 3))
    for i, (logit, total, plain) in enumerate(zip(logits.max(axis=-1)[:4], sums, sums_plain)):
        print(f"sample {i}: logit {logit:.4f}  relevance sum {total:.4f}  ratio {total / logit:.4f}"
              f"  (LayerMap alone: ratio {plain / logit:.4f})")


if __name__ == "__main__":
    main()
