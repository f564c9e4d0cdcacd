"""XLA:CPU's convolution against im2col + one matmul (`jaxlrp._ops.convolution.patches_conv`).

    python benchmarks/bench_conv.py [--batches 1 32 128] [--repeats 7] [--width 32] [--json FILE]

For every distinct convolution of the VGG-16-like and ResNet-18-like CNNs of `tests/cnns.py`
(32x32x3 images, `--width` channels in the first stage: 3x3 and 1x1 kernels, stride 1 and 2,
32x32 down to 2x2 pixels, 3 to 8·width channels), at each batch size, it times (jitted, float32,
NHWC/HWIO as Flax writes them, medians, the variants taking turns within each repeat):

* the forward convolution, `lax.conv_general_dilated` (XLA) and `patches_conv`;
* its VJP with respect to the input (the transposed convolution every LRP rule computes), the
  VJP of each;
* PyTorch's forward `conv2d` (oneDNN, same threads) for reference.

Then the same for a few convolutions beyond the two CNNs that the dispatch must decide
(`EXTRAS`: a 5x5 kernel, 1x1 pixels, 4 and 32 groups, depthwise).

It prints the ratios patches ÷ XLA (below 1: the rewrite wins) and what `use_patches` decides.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
from jax import lax

HERE = pathlib.Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "tests")]

import cnns  # noqa: E402

from jaxlrp._ops import convolution  # noqa: E402


def model_convs(width: int) -> list[dict]:
    """The distinct (spatial, in, out, kernel, stride) of the two CNNs' convolutions, in order."""
    seen = {}
    for name in ("vgg16", "resnet18"):
        model, variables = cnns.make(name, width)
        jaxpr = jax.make_jaxpr(model.apply)(variables, jnp.zeros((1, 32, 32, 3)))

        def visit(jaxpr):
            for eqn in jaxpr.eqns:
                if eqn.primitive.name == "conv_general_dilated":
                    lhs, rhs = (v.aval.shape for v in eqn.invars)
                    key = (lhs[1], lhs[3], rhs[3], rhs[0], eqn.params["window_strides"][0])
                    seen.setdefault(key, {"models": set(), "params": eqn.params})["models"].add(name)
                for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                    visit(sub)

        visit(jaxpr.jaxpr)
    return [{"spatial": s, "in": i, "out": o, "kernel": k, "stride": st, "groups": 1, "models": sorted(v["models"]),
             "params": v["params"]} for (s, i, o, k, st), v in seen.items()]


# Beyond the two CNNs, for the dispatch: larger kernels, 1x1 pixels, groups, depthwise.
EXTRAS = [(4, 128, 128, 5, 1, 1), (1, 256, 256, 3, 1, 1), (2, 256, 256, 3, 1, 4), (2, 256, 256, 3, 1, 32),
          (2, 256, 256, 3, 1, 256), (2, 256, 512, 3, 1, 256), (8, 128, 128, 3, 1, 128), (32, 32, 32, 3, 1, 32),
          (16, 64, 64, 3, 2, 64)]


def extra_convs() -> list[dict]:
    numbers = lax.ConvDimensionNumbers((0, 3, 1, 2), (3, 2, 0, 1), (0, 3, 1, 2))  # NHWC, HWIO, NHWC
    return [{"spatial": s, "in": i, "out": o, "kernel": k, "stride": st, "groups": g, "models": ["extra"],
             "params": dict(window_strides=(st, st), padding=((k // 2, k // 2),) * 2, lhs_dilation=(1, 1),
                            rhs_dilation=(1, 1), dimension_numbers=numbers, feature_group_count=g,
                            batch_group_count=1, precision=None, preferred_element_type=None)}
            for s, i, o, k, st, g in EXTRAS]


def functions(params: dict) -> dict:
    call = {k: v for k, v in params.items() if k != "out_sharding"}

    def xla(x, w):
        return lax.conv_general_dilated(x, w, **call)

    def patches(x, w):
        return convolution.patches_conv(x, w, **call)

    def vjp(f):
        return lambda x, w, ct: jax.vjp(lambda x: f(x, w), x)[1](ct)[0]

    return {"xla": xla, "patches": patches, "xla vjp": vjp(xla), "patches vjp": vjp(patches)}


def time_interleaved(calls: dict, repeats: int) -> dict:
    for call in calls.values():
        call()
    times = {name: [] for name in calls}
    for _ in range(repeats):
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - start)
    return {name: float(np.median(t)) for name, t in times.items()}


def bench(conv: dict, batch: int, repeats: int) -> dict:
    import torch

    rng = np.random.default_rng(0)
    s, i, o, k, stride = conv["spatial"], conv["in"], conv["out"], conv["kernel"], conv["stride"]
    x = jnp.asarray(rng.normal(size=(batch, s, s, i)), jnp.float32)
    groups = conv["groups"]
    w = jnp.asarray(rng.normal(size=(k, k, i // groups, o)), jnp.float32)
    fns = functions(conv["params"])
    y = fns["xla"](x, w)
    ct = jnp.asarray(rng.normal(size=y.shape), jnp.float32)
    calls = {}
    for name, f in fns.items():
        args = (x, w, ct) if "vjp" in name else (x, w)
        compiled = jax.jit(f).lower(*args).compile()
        calls[name] = lambda compiled=compiled, args=args: jax.block_until_ready(compiled(*args))
    x_t, w_t = torch.tensor(np.asarray(x).transpose(0, 3, 1, 2)), torch.tensor(np.asarray(w).transpose(3, 2, 0, 1))
    pad = conv["params"]["padding"][0][0]
    calls["torch"] = lambda: torch.nn.functional.conv2d(x_t, w_t, stride=stride, padding=pad, groups=groups)
    seconds = time_interleaved(calls, repeats)
    np.testing.assert_allclose(calls["patches"](), calls["xla"](), rtol=2e-3, atol=2e-3 * float(jnp.abs(y).max()))
    call = {k: v for k, v in conv["params"].items() if k != "out_sharding"}
    decided = convolution.use_patches(x, w, **call)
    return {"seconds": seconds, "forward": seconds["patches"] / seconds["xla"],
            "vjp": seconds["patches vjp"] / seconds["xla vjp"], "use_patches": bool(decided)}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32, 128])
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    import torch

    print(f"float32, NHWC, {jax.devices()[0].platform}, torch {torch.__version__} with {torch.get_num_threads()} "
          f"threads; ratios patches ÷ XLA (< 1: the rewrite wins), median of {args.repeats}")
    print(f"{'px':>3} {'in':>4} {'out':>4} {'k':>2} {'s':>2} {'g':>3} {'batch':>5} {'xla ms':>8} {'fwd':>6} "
          f"{'xla vjp ms':>10} {'vjp':>6} {'torch ms':>8} {'uses':>5}  models")
    results = []
    for conv in [*model_convs(args.width), *extra_convs()]:
        for batch in args.batches:
            r = bench(conv, batch, args.repeats)
            t = r["seconds"]
            print(f"{conv['spatial']:>3} {conv['in']:>4} {conv['out']:>4} {conv['kernel']:>2} {conv['stride']:>2} "
                  f"{conv['groups']:>3} {batch:>5} {1e3 * t['xla']:>8.2f} {r['forward']:>6.2f} {1e3 * t['xla vjp']:>10.2f} "
                  f"{r['vjp']:>6.2f} {1e3 * t['torch']:>8.2f} {'yes' if r['use_patches'] else 'no':>5}  "
                  f"{','.join(conv['models'])}", flush=True)
            results.append({**{k: v for k, v in conv.items() if k != "params"}, "batch": batch, **r})
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
