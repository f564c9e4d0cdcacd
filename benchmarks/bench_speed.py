"""jaxlrp against zennit, the forward pass and `jax.grad`, measured in the same run on the same weights.

    python benchmarks/bench_speed.py [--batches 1 32 128] [--width 32] [--repeats 5] [--json FILE]

Models: a VGG-16-like and a ResNet-18-like CNN with BatchNorm on 32x32x3 images (`tests/cnns.py`;
`--width` is the first stage's channels, 64 in the originals) and a decoder transformer
(`bench_transformer.py`, 2 layers of width 128 over 64 tokens). For each batch size it times,
all jitted, medians after a warm-up call: the forward pass, `jax.grad` of the target logit
(times the input for the CNNs), both again with the model's convolutions computed as jaxlrp
computes them (`rewritten`: `jaxlrp._ops.convolution`'s im2col where it is faster on CPU;
`JAXLRP_CONV_PATCHES=0` switches that off, in jaxlrp and here), jaxlrp's EpsilonPlusFlat, EpsilonGammaBox and
EpsilonAlpha2Beta1Flat (AttnLRP and CPLRP for the transformer), and zennit 0.5.1's same three
composites on the PyTorch twin (with `SequentialMergeBatchNorm`). Apart from the run time it
reports each compile time, each function's peak memory as XLA plans it (its compiled memory
analysis: temporaries plus output), the ratios to the forward pass, to `jax.grad` and to
zennit, and the largest difference to zennit's map relative to its largest value (float32).
It prints one table and writes everything to `--json`.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import platform
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

HERE = pathlib.Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "tests")]

import bench_transformer  # noqa: E402
import cnns  # noqa: E402

import jaxlrp  # noqa: E402
from jaxlrp import _execute, _program, composites  # noqa: E402
from jaxlrp._ops import convolution  # noqa: E402

COMPOSITES = ("EpsilonPlusFlat", "EpsilonGammaBox", "EpsilonAlpha2Beta1Flat")


def ours(name):
    return {"EpsilonPlusFlat": composites.EpsilonPlusFlat(),
            "EpsilonGammaBox": composites.EpsilonGammaBox(-3.0, 3.0),
            "EpsilonAlpha2Beta1Flat": composites.EpsilonAlpha2Beta1Flat()}[name]


def theirs(zennit, name):
    from zennit.canonizers import SequentialMergeBatchNorm

    canonizers = [SequentialMergeBatchNorm()]
    if name == "EpsilonGammaBox":
        return zennit.composites.EpsilonGammaBox(low=-3.0, high=3.0, canonizers=canonizers)
    return getattr(zennit.composites, name)(canonizers=canonizers)


def rewritten(fn):
    """`fn` computed as jaxlrp re-runs a program (`_program.Node.bind`): its convolutions by
    `jaxlrp._ops.convolution` where that is faster, everything else as traced. What a user's own
    `jax.grad` would gain from the same rewrite."""
    def call(*args):
        leaves, treedef = jax.tree.flatten(args)
        closed, shape = jax.make_jaxpr(lambda *leaves: fn(*treedef.unflatten(leaves)), return_shape=True)(*leaves)
        program = _program.from_closed_jaxpr(closed)
        env = dict(zip(program.inputs, leaves))
        _execute.evaluate(program.nodes, env)
        return jax.tree.unflatten(jax.tree.structure(shape), [_execute.read(env, a) for a in program.outputs])

    return call


def compile_jax(fn, args) -> dict:
    """Compiles `fn` for `args`: the compile time, XLA's peak memory plan and the call."""
    start = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    compile_seconds = time.perf_counter() - start
    memory = compiled.memory_analysis()
    peak = memory.temp_size_in_bytes + memory.output_size_in_bytes
    return {"compile_seconds": compile_seconds, "peak_bytes": int(peak),
            "call": lambda: jax.block_until_ready(compiled(*args))}


def time_interleaved(rows: dict, repeats: int) -> None:
    """Median seconds of each row's `call`, the rows taking turns within each repeat, so that the
    machine's drift (2 shared cores) weighs on all of them alike."""
    for row in rows.values():
        row["result"] = row["call"]()  # warm-up
    times = {name: [] for name in rows}
    for _ in range(repeats):
        for name, row in rows.items():
            start = time.perf_counter()
            row["call"]()
            times[name].append(time.perf_counter() - start)
    for name, row in rows.items():
        row["seconds"] = float(np.median(times[name]))
        del row["call"]


def bench_cnn(name: str, width: int, batch: int, repeats: int, zennit) -> dict:
    import torch
    from zennit.attribution import Gradient

    model, variables = cnns.make(name, width)
    x = jnp.asarray(np.random.default_rng(batch).normal(size=(batch, 32, 32, 3)), jnp.float32)
    target = jnp.argmax(model.apply(variables, x), -1)

    def grad_x_input(variables, x, apply=model.apply):
        logit = lambda x: jnp.take_along_axis(apply(variables, x), target[:, None], 1).sum()  # noqa: E731
        return jax.grad(logit)(x) * x

    rows = {"forward": compile_jax(model.apply, (variables, x)),
            "jax.grad": compile_jax(grad_x_input, (variables, x))}
    if convolution.ENABLED:
        rows["forward (rewritten)"] = compile_jax(rewritten(model.apply), (variables, x))
        rows["jax.grad (rewritten)"] = compile_jax(lambda v, x: grad_x_input(v, x, rewritten(model.apply)),
                                                   (variables, x))
    torch_model = cnns.to_torch(name, variables, width)
    x_torch = torch.tensor(np.asarray(x).transpose(0, 3, 1, 2))
    seed = torch.eye(cnns.CLASSES)[torch.tensor(np.asarray(target))]
    torch.set_grad_enabled(True)
    for composite in COMPOSITES:
        explain = jaxlrp.lrp(model, ours(composite))
        rows[composite] = compile_jax(lambda v, x: explain(v, x, target=target), (variables, x))

        def zennit_call(composite=composite):
            with Gradient(torch_model, theirs(zennit, composite)) as attributor:
                return attributor(x_torch.clone().requires_grad_(True), lambda out: seed * out)[1]

        rows[f"zennit {composite}"] = {"call": zennit_call}
    time_interleaved(rows, repeats)
    for composite in COMPOSITES:
        row, reference = rows[composite], rows.pop(f"zennit {composite}")
        rows[f"zennit {composite}"] = {"seconds": reference["seconds"]}
        row["vs_zennit"] = row["seconds"] / reference["seconds"]
        reference = reference["result"].detach().numpy().transpose(0, 2, 3, 1)
        row["difference_to_zennit"] = float(np.abs(np.asarray(row["result"]) - reference).max() / np.abs(reference).max())
    rows["eager first call"] = first_calls(jaxlrp.lrp(model, ours("EpsilonPlusFlat")), variables, x, target=target)
    return rows


def first_calls(explain, *args, **kwargs) -> dict:
    """The first call of `explain` outside `jit` against the first call of `jax.jit(explain)`."""
    start = time.perf_counter()
    jax.block_until_ready(jax.jit(explain)(*args, **kwargs))
    jitted = time.perf_counter() - start
    start = time.perf_counter()
    jax.block_until_ready(explain(*args, **kwargs))
    eager = time.perf_counter() - start
    return {"seconds": eager, "jit_first_call_seconds": jitted, "vs_jit_first_call": eager / jitted}


def bench_decoder(batch: int, repeats: int, layers=2, width=128, length=64) -> dict:
    model = bench_transformer.Decoder(layers, width, remat=False)
    tokens = jax.random.randint(jax.random.PRNGKey(batch), (batch, length), 0, bench_transformer.VOCAB)
    params = jax.jit(model.init)(jax.random.PRNGKey(1), tokens)
    target = jnp.argmax(model.apply(params, tokens), -1)
    grad = bench_transformer.embedding_gradient(model, target, width)
    rows = {"forward": compile_jax(model.apply, (params, tokens)),
            "jax.grad": compile_jax(grad, (params, tokens))}
    for composite in ("AttnLRP", "CPLRP"):
        explain = jaxlrp.lrp(model, getattr(composites, composite)())
        rows[composite] = compile_jax(lambda p, t: explain(p, t, target=target), (params, tokens))
    time_interleaved(rows, repeats)
    return rows


def add_ratios(rows: dict) -> None:
    forward, grad = rows["forward"], rows["jax.grad"]
    for row in rows.values():
        row.pop("result", None)
        if "peak_bytes" in row:
            row["vs_forward"] = row["seconds"] / forward["seconds"]
            row["vs_grad"] = row["seconds"] / grad["seconds"]
            row["memory_vs_grad"] = row["peak_bytes"] / grad["peak_bytes"]


def print_table(results: dict) -> None:
    print(f"{'model':<9} {'batch':>5} {'method':<30} {'ms':>9} {'×fwd':>6} {'×grad':>6} {'×zennit':>8} "
          f"{'compile s':>9} {'peak MiB':>9} {'mem×grad':>8} {'vs zennit':>9}")
    for key, rows in results.items():
        model, batch = key.rsplit("@", 1)
        for method, r in rows.items():
            cells = [f"{1e3 * r['seconds']:>9.1f}"]
            cells.append(f"{r['vs_forward']:>6.2f} {r['vs_grad']:>6.2f}" if "vs_forward" in r else f"{'':>13}")
            cells.append(f"{r['vs_zennit']:>8.2f}" if "vs_zennit" in r else f"{'':>8}")
            cells.append(f"{r['compile_seconds']:>9.2f} {r['peak_bytes'] / 2**20:>9.1f} {r['memory_vs_grad']:>8.2f}"
                         if "peak_bytes" in r else f"{'':>28}")
            cells.append(f"{r['difference_to_zennit']:>9.1e}" if "difference_to_zennit" in r else "")
            if "vs_jit_first_call" in r:
                cells.append(f"(EpsilonPlusFlat; jax.jit's first call {1e3 * r['jit_first_call_seconds']:.0f} ms, "
                             f"{r['vs_jit_first_call']:.2f}x)")
            print(f"{model:<9} {batch:>5} {method:<30} {' '.join(cells)}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32, 128])
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--models", nargs="+", default=["vgg16", "resnet18", "decoder"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", default="benchmarks/results.json")
    args = parser.parse_args(argv)

    import peers
    import torch

    zennit = peers.zennit()
    device = jax.devices()[0]
    machine = (f"{device.platform} ({device.device_kind}), {platform.processor() or platform.machine()}, "
               f"torch {torch.__version__} with {torch.get_num_threads()} threads, jax {jax.__version__}")
    print(f"width {args.width}, float32, {machine}")
    results = {}
    for model in args.models:
        for batch in args.batches:
            if model == "decoder":
                rows = bench_decoder(batch, args.repeats)
            else:
                rows = bench_cnn(model, args.width, batch, args.repeats, zennit)
            add_ratios(rows)
            results[f"{model}@{batch}"] = rows
    print_table(results)
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps({"config": vars(args), "machine": machine, "results": results},
                                                      indent=2))


if __name__ == "__main__":
    main()
