"""The demo: train a small CNN on scikit-learn's bundled 8x8 digits, explain and evaluate.

    python -m jaxlrp demo [--out DIR] [--epochs N] [--samples N] [--evaluate N]

Trains conv -> BatchNorm -> relu -> max-pool -> conv -> relu -> max-pool -> dense -> dense
with optax and reports test accuracy. Then, into DIR:

* `heatmaps.png`: test digits beside their maps by three LRP composites and the baselines
  (gradient × input, gradient, SmoothGrad, Integrated Gradients);
* `faithfulness.png`: pixel-flipping curves (MoRF and LeRF, Samek et al. 2017: pixels replaced
  by uniform noise, one per step) of every method and of a random order, ABPC in the legend;
* `summary.json`: accuracy, relevance sums against the seed, AOPC and ABPC per method, and the
  EpsilonGammaBox γ chosen by ABPC (`jaxlrp.evaluate.sweep`), with timings.

Needs the demo extra: `pip install 'jaxlrp[demo]'` (optax, scikit-learn, Pillow).
"""

from __future__ import annotations

import json
import pathlib
import sys
import time

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import jaxlrp
from jaxlrp import attribution, composites, evaluate, viz

COMPOSITES = {
    "EpsilonPlusFlat": composites.EpsilonPlusFlat(),
    "EpsilonGammaBox": composites.EpsilonGammaBox(low=0.0, high=1.0),
    "EpsilonAlpha2Beta1Flat": composites.EpsilonAlpha2Beta1Flat(),
}
SHORT = {
    "EpsilonPlusFlat": "EpsPlusFlat", "EpsilonGammaBox": "EpsGammaBox", "EpsilonAlpha2Beta1Flat": "EpsA2B1Flat",
    "gradient_x_input": "grad*input", "gradient": "gradient", "smoothgrad": "SmoothGrad",
    "integrated_gradients": "IntGrad",
}
PIXEL_FLIPPING = {"patch": (1, 1, 1), "baseline": "uniform"}  # Samek et al. 2017: uniform noise
GAMMAS = (0.0, 0.03, 0.1, 0.25, 0.5, 1.0)


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


def methods(model, key: jax.Array) -> dict:
    """name -> `explain(variables, x, *, target)`: the LRP composites and the baselines."""
    smoothgrad = attribution.smoothgrad(model)
    return {
        **{name: jaxlrp.lrp(model, composite) for name, composite in COMPOSITES.items()},
        "gradient_x_input": attribution.gradient_x_input(model),
        "gradient": attribution.gradient(model),
        "smoothgrad": lambda variables, x, *, target: smoothgrad(variables, x, target=target, key=key),
        "integrated_gradients": attribution.integrated_gradients(model),
    }


def faithfulness(model, explain, variables, x, target, key):
    """`(relevance, MoRF curve, LeRF curve)`, one compiled call."""

    @jax.jit
    def run(variables, x, target, key):
        relevance = explain(variables, x, target=target)
        forward = functools.partial(model.apply, variables)
        curves = [
            evaluate.region_perturbation(forward, x, relevance, target=target, order=order, key=key, **PIXEL_FLIPPING)
            for order in ("morf", "lerf")
        ]
        return relevance, *curves

    return run(variables, x, target, key)


def _timed(fn, *args):
    """(result, seconds), the seconds including compilation."""
    start = time.perf_counter()
    result = jax.block_until_ready(fn(*args))
    return result, time.perf_counter() - start


def run(out_dir: str = "jaxlrp-demo", epochs: int = 12, samples: int = 8, evaluate_digits: int = 0, seed: int = 0) -> dict:
    """Trains, explains, evaluates and writes the figures; `evaluate_digits=0`: all test digits."""
    out_path = pathlib.Path(out_dir)
    out_path.mkdir(parents=True, exist_ok=True)
    x_train, y_train, x_test, y_test = load_digits(seed)
    start = time.perf_counter()
    model, variables = train(x_train, y_train, epochs, seed)
    train_seconds = time.perf_counter() - start
    logits = jax.jit(model.apply)(variables, jnp.asarray(x_test))
    accuracy = float(np.mean(np.argmax(logits, -1) == y_test))
    print(f"test accuracy {accuracy:.3f} on {len(y_test)} digits (trained in {train_seconds:.1f} s)")

    n = evaluate_digits or len(x_test)
    x, target = jnp.asarray(x_test[:n]), jnp.asarray(y_test[:n])  # explain the true class
    keys = jax.random.split(jax.random.key(seed), 4)
    forward = functools.partial(model.apply, variables)
    seeds = np.asarray(forward(x))[np.arange(n), np.asarray(target)]
    maps, curves, summary_methods = {}, {}, {}
    print(f"pixel flipping on {n} test digits (MoRF and LeRF, uniform noise):")
    for name, explain in methods(model, keys[0]).items():
        (relevance, morf, lerf), seconds = _timed(faithfulness, model, explain, variables, x, target, keys[1])
        maps[name], curves[name] = np.asarray(relevance)[:samples, ..., 0], (np.asarray(morf), np.asarray(lerf))
        sums = np.asarray(relevance).reshape(n, -1).sum(axis=1)
        summary_methods[name] = {
            "aopc_morf": float(evaluate.aopc(morf).mean()),
            "aopc_lerf": float(evaluate.aopc(lerf).mean()),
            "abpc": float(evaluate.abpc(morf, lerf).mean()),
            "mean_sum_over_seed": float(np.mean(sums / seeds)),
            "seconds": seconds,
        }
        print(f"  {name:24s} ABPC {summary_methods[name]['abpc']:7.3f}   AOPC(MoRF) "
              f"{summary_methods[name]['aopc_morf']:7.3f}   sum/seed {summary_methods[name]['mean_sum_over_seed']:6.3f}")
    random = [
        evaluate.region_perturbation(forward, x, x, target=target, order="random", key=k, **PIXEL_FLIPPING)
        for k in keys[2:]
    ]
    curves["random"] = tuple(np.asarray(c) for c in random)
    summary_methods["random"] = {
        "aopc_morf": float(evaluate.aopc(random[0]).mean()),
        "aopc_lerf": float(evaluate.aopc(random[1]).mean()),
        "abpc": float(evaluate.abpc(*random).mean()),
    }
    print(f"  {'random order':24s} ABPC {summary_methods['random']['abpc']:7.3f}")

    gamma_sweep, sweep_seconds = _timed(
        functools.partial(evaluate.sweep, target=target, key=keys[1], **PIXEL_FLIPPING),
        lambda gamma: composites.EpsilonGammaBox(low=0.0, high=1.0, gamma=gamma),
        {"gamma": GAMMAS}, model, variables, x,
    )
    print("EpsilonGammaBox γ by ABPC: " + "  ".join(f"{g}: {s:.3f}" for g, s in zip(GAMMAS, gamma_sweep.scores))
          + f"  -> γ = {gamma_sweep.best['gamma']} ({sweep_seconds:.1f} s, one compiled call)")

    _write_figures(out_path, x_test[:samples], maps, curves, summary_methods)
    summary = {
        "test_accuracy": accuracy,
        "train_seconds": train_seconds,
        "epochs": epochs,
        "evaluated_digits": n,
        "faithfulness_protocol": {**PIXEL_FLIPPING, "steps": 64, "targets": "true class"},
        "backend": jax.default_backend(),
        "methods": summary_methods,
        "gamma_sweep": {
            "gamma": list(GAMMAS),
            "abpc": np.asarray(gamma_sweep.scores).tolist(),
            "best": gamma_sweep.best,
            "seconds": sweep_seconds,
        },
    }
    (out_path / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"wrote {out_path / 'heatmaps.png'}, {out_path / 'faithfulness.png'} and {out_path / 'summary.json'}")
    return summary


def _write_figures(out_path, digits, maps, curves, summary_methods) -> None:
    rows = [[viz.image(d, invert=True)] + [viz.heatmap(maps[name][i]) for name in maps] for i, d in enumerate(digits)]
    titles = ["input"] + [SHORT[name] for name in maps]
    viz.save_png(out_path / "heatmaps.png", viz.grid(rows, column_labels=titles, cell=80))
    panels = []
    for index, order in enumerate(("MoRF", "LeRF")):
        lines = {
            f"{SHORT.get(name, name)} ({summary_methods[name]['abpc']:.2f})": pair[index].mean(axis=0)
            for name, pair in curves.items()
        }
        panels.append(viz.curves(lines, title=f"{order}, legend: ABPC", xlabel="pixels replaced by noise"))
    viz.save_png(out_path / "faithfulness.png", np.concatenate(panels, axis=1))
