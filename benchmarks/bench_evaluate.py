"""Faithfulness evaluation compiled against a straightforward NumPy loop, on the same model.

    python benchmarks/bench_evaluate.py [--digits 64] [--repeats 5] [--json FILE]

Model: the demo's digits CNN (`jaxlrp.demo`, trained for 3 epochs). Pixel flipping of
EpsilonPlusFlat maps on `--digits` test digits, 64 steps (every pixel, replaced by 0), MoRF:

* jaxlrp: `evaluate.region_perturbation` under `jax.jit`, every step of every digit in one call;
* NumPy loop: per digit, sort the pixels, then per step copy the image, set the next pixel to 0
  and call the model on it, jitted (the fair comparison) and as plain `model.apply` (what a
  first hand-written loop often does).

Both give the same curve (checked). Also times `evaluate.sweep` over 8 values of γ (one
compiled call, compilation included) against a Python loop that explains and scores each γ
with its own call of one jitted function (compiled in the first call, included too).
Medians of `--repeats` after a warm-up call; the compile time is reported apart.
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np

import jaxlrp
from jaxlrp import composites, demo, evaluate

PATCH = (1, 1, 1)


def median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def numpy_loop(apply, x: np.ndarray, relevance: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Pixel flipping, one sample and one step at a time."""
    batch = x.shape[0]
    pixels = x[0].size
    curve = np.zeros((batch, pixels + 1))
    for i in range(batch):
        order = np.argsort(-relevance[i].reshape(-1), kind="stable")
        image = x[i].copy()
        curve[i, 0] = np.asarray(apply(image[None]))[0, target[i]]
        for k, pixel in enumerate(order, start=1):
            image.reshape(-1)[pixel] = 0.0
            curve[i, k] = np.asarray(apply(image[None]))[0, target[i]]
    return curve


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--digits", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    x_train, y_train, x_test, y_test = demo.load_digits(0)
    model, variables = demo.train(x_train, y_train, epochs=3)
    x, target = jnp.asarray(x_test[: args.digits]), jnp.asarray(y_test[: args.digits])
    relevance = jax.jit(jaxlrp.lrp(model, composites.EpsilonPlusFlat()))(variables, x, target=target)
    apply = jax.jit(functools.partial(model.apply, variables))

    @jax.jit
    def compiled(x, relevance, target):
        return evaluate.region_perturbation(apply, x, relevance, target=target, patch=PATCH)

    start = time.perf_counter()
    curve = jax.block_until_ready(compiled(x, relevance, target))
    compile_seconds = time.perf_counter() - start
    ours = median_seconds(lambda: compiled(x, relevance, target), args.repeats)
    x_np, r_np, t_np = np.asarray(x), np.asarray(relevance), np.asarray(target)
    reference = numpy_loop(apply, x_np, r_np, t_np)
    loop = median_seconds(lambda: numpy_loop(apply, x_np, r_np, t_np), max(1, args.repeats // 2))
    eager_apply = functools.partial(model.apply, variables)
    eager_loop = median_seconds(lambda: numpy_loop(eager_apply, x_np, r_np, t_np), 1)
    difference = float(np.abs(reference - np.asarray(curve)).max())

    gammas = jnp.linspace(0.0, 1.0, 8)

    def make(gamma):
        return composites.EpsilonGammaBox(low=0.0, high=1.0, gamma=gamma)

    def swept():
        return evaluate.sweep(make, {"gamma": gammas}, model, variables, x, target=target, patch=PATCH).scores

    def looped():
        @jax.jit  # a new function each call: compiled in its first call, as sweep compiles once per call
        def one_point(gamma, x, target):
            r = jaxlrp.lrp(model, make(gamma))(variables, x, target=target)
            morf = evaluate.region_perturbation(apply, x, r, target=target, patch=PATCH)
            lerf = evaluate.region_perturbation(apply, x, r, target=target, patch=PATCH, order="lerf")
            return evaluate.abpc(morf, lerf).mean()

        return jnp.stack([one_point(g, x, target) for g in gammas])

    np.testing.assert_allclose(swept(), looped(), rtol=1e-4)
    sweep_seconds = median_seconds(swept, args.repeats)  # each call compiles once
    loop_points = median_seconds(looped, args.repeats)

    results = {
        "device": jax.devices()[0].device_kind,
        "platform": platform.platform(),
        "digits": args.digits,
        "steps": int(curve.shape[1] - 1),
        "region_perturbation_ms": 1e3 * ours,
        "region_perturbation_compile_s": compile_seconds,
        "numpy_loop_ms": 1e3 * loop,
        "speedup": loop / ours,
        "numpy_loop_unjitted_model_ms": 1e3 * eager_loop,
        "speedup_unjitted": eager_loop / ours,
        "max_difference": difference,
        "sweep_8_gammas_ms": 1e3 * sweep_seconds,
        "loop_8_gammas_ms": 1e3 * loop_points,
    }
    print(f"pixel flipping, {args.digits} digits x {results['steps']} steps ({results['device']}):")
    print(f"  jaxlrp (jit)   {1e3 * ours:9.2f} ms   (compile {compile_seconds:.2f} s)")
    print(f"  NumPy loop     {1e3 * loop:9.2f} ms   jitted model:   jaxlrp is {loop / ours:.0f}x faster "
          f"(max |difference| {difference:.1e})")
    print(f"  NumPy loop     {1e3 * eager_loop:9.2f} ms   model.apply:    jaxlrp is {eager_loop / ours:.0f}x faster")
    print(f"γ sweep over 8 values with ABPC, compilation included: one sweep call {1e3 * sweep_seconds:.0f} ms, "
          f"a loop of 8 calls of one jitted function {1e3 * loop_points:.0f} ms")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
