"""LRP for an Equinox CNN, explained as a plain JAX function of the model.

    python examples/equinox_model.py [--small]
"""

import argparse

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

import jaxlrp
from jaxlrp import composites, rules


class CNN(eqx.Module):
    layers: list

    def __init__(self, size, key):
        k1, k2, k3, k4 = jax.random.split(key, 4)
        self.layers = [
            eqx.nn.Conv2d(1, 8, kernel_size=3, padding=1, key=k1),
            jax.nn.relu,
            eqx.nn.MaxPool2d(kernel_size=2, stride=2),
            eqx.nn.Conv2d(8, 16, kernel_size=3, padding=1, key=k2),
            jax.nn.relu,
            eqx.nn.MaxPool2d(kernel_size=2, stride=2),
            jnp.ravel,
            eqx.nn.Linear(16 * (size // 4) ** 2, 32, key=k3),
            jax.nn.relu,
            eqx.nn.Linear(32, 10, key=k4),
        ]

    def __call__(self, x):  # x: (1, size, size), one image; logits: (10,)
        for layer in self.layers:
            x = layer(x)
        return x


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--small", action="store_true", help="8x8 images, batch 4")
    args = parser.parse_args()
    size, batch = (8, 4) if args.small else (28, 64)

    model = CNN(size, jax.random.PRNGKey(0))
    # Random weights stand in for trained ones; zero biases, so relevance sums match the logits.
    biases = lambda m: [layer.bias for layer in m.layers if isinstance(layer, (eqx.nn.Conv2d, eqx.nn.Linear))]
    model = eqx.tree_at(biases, model, replace_fn=jnp.zeros_like)
    x = jnp.asarray(np.random.default_rng(0).uniform(size=(batch, 1, size, size)), jnp.float32)

    # The model is an argument: its arrays are parameters, its other leaves (jax.nn.relu,
    # pooling settings) are static. NameMap patterns match a weight's key path as keystr writes
    # it (".layers[0].weight"), '/'-joined ("layers/0/weight"), or its container ("layers/0").
    def forward(model, x):
        return jax.vmap(model)(x)

    composite = composites.combine(
        composites.NameMap({".layers[0].weight": rules.Flat()}),
        composites.EpsilonPlus(),
    )
    print(jaxlrp.rule_table(forward, composite, model, x))

    # eqx.filter_jit, not jax.jit: the model holds functions (jax.nn.relu).
    R = eqx.filter_jit(jaxlrp.lrp_fn(forward, composite))(model, x)
    logits = eqx.filter_jit(forward)(model, x)
    print(f"input {x.shape} -> logits {logits.shape}, relevance {R.shape}")
    for i, (logit, total) in enumerate(zip(logits.max(axis=-1)[:4], R.sum(axis=(1, 2, 3)))):
        print(f"sample {i}: logit {logit:.4f}  relevance sum {total:.4f}  ratio {total / logit:.4f}")

    # LRP-0 (Epsilon(0) everywhere) on a ReLU network is gradient x input.
    @eqx.filter_jit
    def lrp0_and_grad_times_input(model, x):
        R0 = jaxlrp.lrp_fn(forward, composites.LRP0())(model, x)
        logits, pullback = jax.vjp(lambda x: forward(model, x), x)
        (grad,) = pullback(jax.nn.one_hot(logits.argmax(axis=-1), logits.shape[-1]))
        return R0, grad * x

    R0, gi = lrp0_and_grad_times_input(model, x)
    print(f"max |LRP0 - grad*input| = {jnp.abs(R0 - gi).max():.3g}")


if __name__ == "__main__":
    main()
