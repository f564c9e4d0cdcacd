"""The demo: train a small CNN on scikit-learn's bundled 8x8 digits, explain test digits.

    python -m jaxlrp demo [--out DIR] [--epochs N] [--samples N]

Trains conv -> BatchNorm -> relu -> max-pool -> conv -> relu -> max-pool -> dense -> dense
with optax, reports test accuracy, explains a grid of test digits with three LRP composites
and gradient × input, and writes `heatmaps.png` and `summary.json` into DIR.
Needs the demo extra: `pip install 'jaxlrp[demo]'` (optax, scikit-learn, Pillow).
"""

from __future__ import annotations

import json
import pathlib
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import jaxlrp
from jaxlrp import composites, viz


class DigitsCNN(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.Conv(16, (3, 3), padding=1)(x)
        x = nn.relu(nn.BatchNorm(use_running_average=not train)(x))
        x = nn.max_pool(x, (2, 2), (2, 2))
        x = nn.relu(nn.Conv(32, (3, 3), padding=1)(x))
        x = nn.max_pool(x, (2, 2), (2, 2))
        x = nn.relu(nn.Dense(64)(x.reshape(x.shape[0], -1)))
        return nn.Dense(10)(x)


def load_digits(seed: int = 0):
    """scikit-learn's bundled digits as `(x_train, y_train, x_test, y_test)`, pixels in [0, 1]."""
    from sklearn.datasets import load_digits as sklearn_digits

    data = sklearn_digits()
    x = (data.images / 16.0).astype(np.float32)[..., None]
    y = data.target.astype(np.int32)
    order = np.random.default_rng(seed).permutation(len(x))
    x, y = x[order], y[order]
    split = int(0.8 * len(x))
    return x[:split], y[:split], x[split:], y[split:]


def _progress(epoch: int, epochs: int, loss: float, stream=sys.stderr) -> None:
    done = int(30 * epoch / epochs)
    stream.write(f"\rtraining [{'#' * done}{'.' * (30 - done)}] epoch {epoch}/{epochs}  loss {loss:.4f}")
    if epoch == epochs:
        stream.write("\n")
    stream.flush()


def train(x, y, epochs: int, seed: int = 0, batch_size: int = 64):
    import optax

    model = DigitsCNN()
    variables = model.init(jax.random.PRNGKey(seed), jnp.asarray(x[:1]))
    params, batch_stats = variables["params"], variables["batch_stats"]
    optimizer = optax.adam(3e-3)
    opt_state = optimizer.init(params)

    @jax.jit
    def step(params, batch_stats, opt_state, xb, yb):
        def loss_fn(params):
            logits, updates = model.apply(
                {"params": params, "batch_stats": batch_stats}, xb, train=True, mutable=["batch_stats"]
            )
            return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean(), updates

        (loss, updates), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        changes, opt_state = optimizer.update(grads, opt_state)
        return optax.apply_updates(params, changes), updates["batch_stats"], opt_state, loss

    rng = np.random.default_rng(seed)
    n_batches = len(x) // batch_size
    for epoch in range(1, epochs + 1):
        order = rng.permutation(len(x))
        losses = []
        for b in range(n_batches):
            idx = order[b * batch_size : (b + 1) * batch_size]
            params, batch_stats, opt_state, loss = step(params, batch_stats, opt_state, x[idx], y[idx])
            losses.append(loss)
        _progress(epoch, epochs, float(np.mean(losses)))
    return model, {"params": params, "batch_stats": batch_stats}


def _timed(fn, *args, repeats: int = 5):
    """(result, seconds of the first call incl. compilation, median seconds of later calls)."""
    start = time.perf_counter()
    result = jax.block_until_ready(fn(*args))
    first = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return result, first, float(np.median(times))


def explainers(model):
    """name -> jitted `(variables, x, target) -> (output, relevance)`."""

    def gradient_x_input(variables, x, target):
        def score(x):
            out = model.apply(variables, x)
            return jnp.take_along_axis(out, target[:, None], axis=1).sum(), out

        grad, out = jax.grad(score, has_aux=True)(x)
        return out, grad * x

    methods = {
        "EpsilonPlusFlat": composites.EpsilonPlusFlat(),
        "EpsilonGammaBox": composites.EpsilonGammaBox(low=0.0, high=1.0),
        "EpsilonAlpha2Beta1Flat": composites.EpsilonAlpha2Beta1Flat(),
    }
    out = {name: jax.jit(jaxlrp.output_and_lrp(model, c)) for name, c in methods.items()}
    out["gradient_x_input"] = jax.jit(gradient_x_input)
    return out


def run(out_dir: str = "jaxlrp-demo", epochs: int = 12, samples: int = 8, seed: int = 0) -> dict:
    out_path = pathlib.Path(out_dir)
    out_path.mkdir(parents=True, exist_ok=True)
    x_train, y_train, x_test, y_test = load_digits(seed)
    start = time.perf_counter()
    model, variables = train(x_train, y_train, epochs, seed)
    train_seconds = time.perf_counter() - start
    logits = jax.jit(model.apply)(variables, jnp.asarray(x_test))
    accuracy = float(np.mean(np.argmax(logits, -1) == y_test))
    print(f"test accuracy {accuracy:.3f} on {len(y_test)} digits (trained in {train_seconds:.1f} s)")

    x, target = jnp.asarray(x_test[:samples]), jnp.asarray(y_test[:samples])
    results, summary_methods = {}, {}
    for name, explain in explainers(model).items():
        (output, relevance), first, steady = _timed(explain, variables, x, target)
        seed_values = np.take_along_axis(np.asarray(output), np.asarray(target)[:, None], axis=1)[:, 0]
        sums = np.asarray(relevance).reshape(samples, -1).sum(axis=1)
        results[name] = np.asarray(relevance)[..., 0]
        summary_methods[name] = {
            "relevance_sum": sums.tolist(),
            "seed": seed_values.tolist(),
            "mean_sum_over_seed": float(np.mean(sums / seed_values)),
            "first_call_seconds": first,
            "seconds_per_call": steady,
        }
        print(f"{name:24s} sum/seed {summary_methods[name]['mean_sum_over_seed']:.3f}   "
              f"{1e3 * steady:.2f} ms per batch of {samples}")

    titles = ["input", "EpsPlusFlat", "EpsGammaBox", "EpsA2B1Flat", "grad*input"]
    rows = [
        [viz.gray_to_rgb(x_test[i, ..., 0])] + [viz.relevance_to_rgb(results[n][i]) for n in results]
        for i in range(samples)
    ]
    viz.save_grid(out_path / "heatmaps.png", rows, titles, cell=80)
    summary = {
        "test_accuracy": accuracy,
        "train_seconds": train_seconds,
        "epochs": epochs,
        "samples": samples,
        "targets": np.asarray(target).tolist(),
        "backend": jax.default_backend(),
        "methods": summary_methods,
    }
    (out_path / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"wrote {out_path / 'heatmaps.png'} and {out_path / 'summary.json'}")
    return summary
