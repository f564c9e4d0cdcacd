"""Train a small ViT (Flax Linen) on scikit-learn's 8x8 digits, choose AttnLRP's γ by
faithfulness (`jaxlrp.evaluate.sweep`: ABPC of patch perturbation, all γ in one compiled
call), and explain test digits with AttnLRP and CP-LRP under jax.jit; writes each digit beside
its two maps as a PNG.

    python examples/vit_digits.py [--small] [--out DIR]
"""

import argparse
import pathlib
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

import jaxlrp
from jaxlrp import composites, evaluate, viz


class Block(nn.Module):
    """Pre-LayerNorm transformer block: attention and a GELU MLP, each in a residual add."""

    dim: int
    heads: int

    @nn.compact
    def __call__(self, x):
        x = x + nn.MultiHeadDotProductAttention(num_heads=self.heads)(nn.LayerNorm()(x))
        return x + nn.Dense(self.dim)(nn.gelu(nn.Dense(2 * self.dim)(nn.LayerNorm()(x))))


class ViT(nn.Module):
    dim: int = 32
    heads: int = 4
    depth: int = 2
    num_classes: int = 10

    @nn.compact
    def __call__(self, x):  # x: (batch, 8, 8, 1)
        x = nn.Conv(self.dim, (2, 2), strides=(2, 2), padding="VALID", name="patch")(x)  # (b, 4, 4, dim)
        # The learned positional embedding is added right after the patch conv: jaxlrp merges it
        # into the conv's bias (a learned shift elsewhere would be an unmerged affine map).
        x = x + self.param("pos", nn.initializers.normal(0.02), x.shape[1:])
        x = x.reshape(x.shape[0], -1, self.dim)  # 16 patch tokens
        cls = self.param("cls", nn.initializers.normal(0.02), (1, 1, self.dim))
        x = jnp.concatenate([jnp.broadcast_to(cls, (x.shape[0], 1, self.dim)), x], axis=1)
        for _ in range(self.depth):
            x = Block(self.dim, self.heads)(x)
        return nn.Dense(self.num_classes, name="head")(nn.LayerNorm()(x[:, 0]))  # read out the class token


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--small", action="store_true", help="1 block, 150 training steps, explain 4 digits")
    parser.add_argument("--out", default="jaxlrp-examples", help="where the PNG goes")
    args = parser.parse_args()
    depth, steps, n_explain = (1, 150, 4) if args.small else (2, 1500, 8)
    start = time.perf_counter()

    digits = load_digits()
    images = (digits.images[..., None] / 16.0).astype(np.float32)  # (1797, 8, 8, 1) in [0, 1]
    x_train, x_test, y_train, y_test = train_test_split(
        images, digits.target, test_size=0.25, random_state=0, stratify=digits.target
    )

    model = ViT(depth=depth)
    params = jax.jit(model.init)(jax.random.key(0), x_train[:1])["params"]
    optimizer = optax.adam(3e-3)
    opt_state = optimizer.init(params)

    @jax.jit
    def train_step(params, opt_state, x, y):
        def loss_fn(params):
            return optax.softmax_cross_entropy_with_integer_labels(model.apply({"params": params}, x), y).mean()

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    rng = np.random.default_rng(0)
    for _ in range(steps):
        batch = rng.choice(len(x_train), 64)
        params, opt_state, loss = train_step(params, opt_state, x_train[batch], y_train[batch])
    variables = {"params": params}
    logits = jax.jit(model.apply)(variables, x_test)
    accuracy = float((logits.argmax(-1) == y_test).mean())
    print(f"trained {steps} steps in {time.perf_counter() - start:.1f} s: loss {loss:.3f}")
    print(f"test accuracy = {accuracy:.3f}")

    # AttnLRP's γ by faithfulness: the patches (one token each) replaced by uniform noise, most
    # and least relevant first, on held-out digits; every γ explained and scored in one call.
    gammas = [0.0, 0.1, 0.25, 0.5, 1.0]
    n_sweep = 32 if args.small else 256
    sweep = evaluate.sweep(
        lambda gamma: composites.AttnLRP(epsilon=1e-6, gamma=gamma), {"gamma": gammas}, model, variables,
        x_test[:n_sweep], target=y_test[:n_sweep], patch=(2, 2, 1), baseline="uniform", key=jax.random.key(1),
    )
    print("AttnLRP ABPC by γ: " + "  ".join(f"{g}: {s:.3f}" for g, s in zip(gammas, np.asarray(sweep.scores)))
          + f"  -> γ = {sweep.best['gamma']}")

    x = x_test[:n_explain]
    methods = {
        "AttnLRP": composites.AttnLRP(epsilon=1e-6, gamma=sweep.best["gamma"]),
        "CPLRP": composites.CPLRP(),
    }
    print(jaxlrp.rule_table(model, methods["AttnLRP"], variables, x))
    maps = {}
    for name, composite in methods.items():
        explain = jax.jit(jaxlrp.lrp(model, composite))
        R = np.asarray(explain(variables, x))  # relevance of each digit's predicted class
        assert R.shape == x.shape
        maps[name] = R[..., 0]
        for i in range(n_explain):
            logit = float(logits[i].max())
            total = float(R[i].sum())
            print(f"{name} digit {y_test[i]} (predicted {int(logits[i].argmax())}): "
                  f"logit {logit:.4f}  relevance sum {total:.4f}  ratio {total / logit:.4f}")
        print(f"{name} relevance finite = {bool(np.isfinite(R).all())}")

    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "vit_digits.png"
    rows = [
        [viz.image(x[i], invert=True)] + [viz.heatmap(maps[n][i]) for n in methods] for i in range(n_explain)
    ]  # each digit beside its AttnLRP and CPLRP maps
    viz.save_png(path, viz.grid(rows, column_labels=["digit", *methods], cell=80))
    print(f"wrote {path}")
    print(f"total time {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
