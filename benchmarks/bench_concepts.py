"""Concepts at scale: conditional heatmaps of many concepts in one vmapped call against a Python
loop, and relevance maximization's throughput beside `explain_dataset`'s.

    python benchmarks/bench_concepts.py [--width 16] [--samples 1024] [--repeats 5] [--json FILE]

Model: the VGG-16-like benchmark CNN (`tests/cnns.py`, BatchNorm, 32x32x3 inputs, random
weights), EpsilonPlusFlat, its first convolution with 64 channels as the concept layer.

* Conditional heatmaps of 64 concepts (one-hot masks over that layer's channels) for a batch of
  8: `jax.vmap` over the masks in one jitted call, against 64 calls of one jitted function
  (compiled once, the mask an argument). Both give the same maps (checked).
* Relevance maximization (`concepts.relevance_maximization`, top 8 per channel) over
  `--samples` random images in batches of 128, against `explain_dataset` writing the maps of the
  same images to zarr: samples per second, after a warm-up run of each.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

HERE = pathlib.Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "tests")]

import cnns  # noqa: E402
from bench_evaluate import median_seconds  # noqa: E402

import jaxlrp  # noqa: E402
from jaxlrp import composites, concepts  # noqa: E402


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--samples", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    model, variables = cnns.make("vgg16", args.width)
    convs = [f"conv{i}" for i in range(32) if f"conv{i}" in variables["params"]]  # in execution order
    layer = next(name for name in convs if variables["params"][name]["kernel"].shape[-1] >= 64)
    channels = variables["params"][layer]["kernel"].shape[-1]
    explain = jaxlrp.lrp(model, composites.EpsilonPlusFlat(), record=(layer,))
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.uniform(-1, 1, size=(8, 32, 32, 3)), jnp.float32)
    masks = jax.nn.one_hot(jnp.arange(64), channels, dtype=jnp.float32)

    @jax.jit
    def all_at_once(variables, x, masks):
        return jax.vmap(lambda m: explain(variables, x, conditions={layer: m}).input)(masks)

    @jax.jit
    def one(variables, x, mask):
        return explain(variables, x, conditions={layer: mask}).input

    def looped():
        return [one(variables, x, m) for m in masks]

    np.testing.assert_allclose(all_at_once(variables, x, masks)[5], one(variables, x, masks[5]), rtol=1e-4, atol=1e-7)
    jax.block_until_ready(looped())
    vmapped_s = median_seconds(lambda: all_at_once(variables, x, masks), args.repeats)
    looped_s = median_seconds(looped, args.repeats)

    data = rng.uniform(-1, 1, size=(args.samples, 32, 32, 3)).astype(np.float32)
    plain = jaxlrp.lrp(model, composites.EpsilonPlusFlat())
    folder = tempfile.mkdtemp()

    def maximize():
        return concepts.relevance_maximization(explain, variables, data, layer, k=8, batch_size=128, progress=False)

    runs = iter(range(10**6))

    def write():
        return np.asarray(jaxlrp.explain_dataset(plain, variables, data, out=f"{folder}/{next(runs)}.zarr",
                                                 batch_size=128, progress=False)[:1])

    maximize(), write()  # compile
    max_s = median_seconds(maximize, max(1, args.repeats // 2))
    write_s = median_seconds(write, max(1, args.repeats // 2))

    results = {
        "device": jax.devices()[0].device_kind,
        "layer": layer,
        "channels": int(channels),
        "conditional_64_concepts_batch_8_vmapped_ms": 1e3 * vmapped_s,
        "conditional_64_concepts_batch_8_loop_ms": 1e3 * looped_s,
        "vmap_speedup": looped_s / vmapped_s,
        "relevance_maximization_samples_per_s": args.samples / max_s,
        "explain_dataset_samples_per_s": args.samples / write_s,
    }
    print(f"VGG-16-like (width {args.width}), concept layer {layer} ({channels} channels), {results['device']}:")
    print(f"  64 conditional heatmaps, batch 8: one vmapped call {1e3 * vmapped_s:.0f} ms, "
          f"a loop of 64 jitted calls {1e3 * looped_s:.0f} ms ({looped_s / vmapped_s:.1f}x)")
    print(f"  relevance maximization {results['relevance_maximization_samples_per_s']:.0f} samples/s, "
          f"explain_dataset {results['explain_dataset_samples_per_s']:.0f} samples/s ({args.samples} images)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
