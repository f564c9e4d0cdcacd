"""One short run for a machine with an accelerator: jaxlrp against `jax.grad` in time and memory,
in float32 and bfloat16, and the throughput of `explain_dataset`.

    python benchmarks/bench_device.py [--small] [--repeats 5] [--json FILE]
    benchmarks/device.sh            # the same, with a time limit and the results in $OUT if set

For the VGG-16-like and ResNet-18-like CNNs (`tests/cnns.py`, 32x32x3 images) and the decoder of
`bench_transformer.py`, in each dtype, all jitted, medians after a warm-up call interleaved over
`--repeats`: `jax.grad` of the target logit (times the input for the CNNs) and jaxlrp's
EpsilonPlusFlat and EpsilonGammaBox (AttnLRP and CPLRP for the decoder, with and without
`nn.remat` on its blocks), each with XLA's memory
plan (temporaries plus output, from the compiled memory analysis); then `explain_dataset` of the
VGG over 16 batches into an in-memory store, in samples per second with and without its compile.
Needs no peer (no torch): it measures jaxlrp against the floor an LRP pass can approach. Sizes
fit a run of a few minutes on a GPU; `--small` is the CPU check that CI-sized machines can run.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np

from bench_speed import add_ratios, bench_transformer, cnns, compile_jax, jaxlrp, ours, time_interleaved

from jaxlrp import composites

SIZES = {False: {"width": 64, "batch": 128, "layers": 4, "model_width": 256, "length": 512, "decoder_batch": 8},
         True: {"width": 8, "batch": 4, "layers": 1, "model_width": 64, "length": 16, "decoder_batch": 2}}


def cast(tree, dtype):
    return jax.tree.map(lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a, tree)


def bench_cnn(name: str, dtype, size: dict, repeats: int) -> dict:
    model, variables = cnns.make(name, size["width"], dtype=dtype)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(size["batch"], 32, 32, 3)), dtype)
    target = jnp.argmax(model.apply(variables, x), -1)

    def grad_x_input(variables, x):
        logit = lambda x: jnp.take_along_axis(model.apply(variables, x), target[:, None], 1).sum()  # noqa: E731
        return jax.grad(logit)(x) * x

    rows = {"forward": compile_jax(model.apply, (variables, x)), "jax.grad": compile_jax(grad_x_input, (variables, x))}
    for composite in ("EpsilonPlusFlat", "EpsilonGammaBox"):
        explain = jaxlrp.lrp(model, ours(composite))
        rows[composite] = compile_jax(lambda v, x, e=explain: e(v, x, target=target), (variables, x))
    time_interleaved(rows, repeats)
    return rows


def bench_decoder(dtype, size: dict, repeats: int, remat: bool = False) -> dict:
    model = bench_transformer.Decoder(size["layers"], size["model_width"], remat=remat)
    tokens = jax.random.randint(jax.random.PRNGKey(0), (size["decoder_batch"], size["length"]), 0,
                                bench_transformer.VOCAB)
    params = cast(jax.jit(model.init)(jax.random.PRNGKey(1), tokens), dtype)
    target = jnp.argmax(model.apply(params, tokens), -1)
    grad = bench_transformer.embedding_gradient(model, target, size["model_width"])
    rows = {"forward": compile_jax(model.apply, (params, tokens)), "jax.grad": compile_jax(grad, (params, tokens))}
    for composite in ("AttnLRP", "CPLRP"):
        explain = jaxlrp.lrp(model, getattr(composites, composite)())
        rows[composite] = compile_jax(lambda p, t, e=explain: e(p, t, target=target), (params, tokens))
    time_interleaved(rows, repeats)
    return rows


def bench_dataset(size: dict) -> dict:
    """`explain_dataset` of the VGG over 16 batches into a `memory://` store: samples per second of
    the whole run, and of a second run into a fresh store (its compile again, its batches the same)
    without the first batch's time (which holds the compile)."""
    model, variables = cnns.make("vgg16", size["width"])
    n = 16 * size["batch"]
    images = np.random.default_rng(1).normal(size=(n, 32, 32, 3)).astype(np.float32)
    explain = jaxlrp.lrp(model, composites.EpsilonPlusFlat())
    seconds = []
    for i, rows in enumerate((n, size["batch"])):
        start = time.perf_counter()
        jaxlrp.explain_dataset(explain, variables, images[:rows], out=f"memory://bench{i}", batch_size=size["batch"],
                               progress=False)
        seconds.append(time.perf_counter() - start)
    whole, first = seconds
    return {"samples": n, "seconds": whole, "samples_per_second": n / whole,
            "samples_per_second_after_compile": (n - size["batch"]) / max(whole - first, 1e-9)}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="tiny sizes: a check on CPU")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    size = SIZES[args.small]
    device = jax.devices()[0]
    machine = f"{device.platform} ({device.device_kind}), {jax.device_count()} device(s), jax {jax.__version__}"
    print(f"{machine}; sizes {size}")
    results = {}
    for dtype in (jnp.float32, jnp.bfloat16):
        # decoder-remat: nn.remat on every block, which jaxlrp's relevance pass checkpoints too (on
        # an accelerator XLA keeps the recomputation, so its memory plan shows what is saved)
        for model in ("vgg16", "resnet18", "decoder", "decoder-remat"):
            if model.startswith("decoder"):
                rows = bench_decoder(dtype, size, args.repeats, remat=model == "decoder-remat")
            else:
                rows = bench_cnn(model, dtype, size, args.repeats)
            add_ratios(rows)
            results[f"{model} {jnp.dtype(dtype).name}"] = rows
            for method, r in rows.items():
                print(f"{model:<13} {jnp.dtype(dtype).name:<9} {method:<16} {1e3 * r['seconds']:>9.2f} ms "
                      f"{r['vs_grad']:>5.2f}x grad  {r['peak_bytes'] / 2**20:>9.1f} MiB {r['memory_vs_grad']:>5.2f}x grad")
    results["explain_dataset"] = dataset = bench_dataset(size)
    print(f"explain_dataset (vgg16, float32): {dataset['samples']} samples in {dataset['seconds']:.2f} s, "
          f"{dataset['samples_per_second']:.0f} samples/s ({dataset['samples_per_second_after_compile']:.0f} "
          "after the compile)")
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps({"machine": machine, "size": size, "results": results}, indent=2))


if __name__ == "__main__":
    main()
