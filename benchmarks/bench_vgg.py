"""jaxlrp against zennit and plain gradients, measured in the same run on the same weights.

    python benchmarks/bench_vgg.py [--batch 32] [--width 32] [--image 32] [--repeats 20]

The network is the VGG-like twin of the parity tests (conv+BatchNorm+relu x3, max- and
average-pooling, two dense layers), scaled by --width and --image, in float32. It prints the
median seconds per batch of:

* jaxlrp EpsilonPlusFlat and EpsilonGammaBox under `jax.jit`,
* `jax.grad` (gradient x input) under `jax.jit`, the floor an LRP pass can approach,
* zennit 0.5.1 with the same composites (and SequentialMergeBatchNorm) on torch,
* torch autograd (gradient x input),

and the ratios jaxlrp / jax.grad and zennit / jaxlrp, plus the largest relative difference
between the jaxlrp and zennit maps (float32). Needs the test extra and zennit.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "tests"))

import peers  # noqa: E402
import twins  # noqa: E402

import jaxlrp  # noqa: E402
from jaxlrp import composites  # noqa: E402


def median_seconds(fn, repeats: int) -> float:
    fn()  # warm up (compilation, caches)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--image", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()

    zennit = peers.zennit()
    import torch
    from zennit.attribution import Gradient
    from zennit.canonizers import SequentialMergeBatchNorm

    torch_model, flax_model, variables, shape = twins.make("vgg", width=args.width, image=args.image, batch=args.batch)
    torch_model = torch_model.float()
    variables = jax.tree.map(lambda a: a.astype(jnp.float32), variables)
    x_nchw = np.random.default_rng(0).normal(size=shape).astype(np.float32)
    x = jnp.asarray(twins.to_nhwc(x_nchw))
    target = np.random.default_rng(1).integers(0, 10, args.batch)
    eye = torch.eye(10)

    rows = []

    def grad_x_input(variables, x):
        def score(x):
            out = flax_model.apply(variables, x)
            return jnp.take_along_axis(out, jnp.asarray(target)[:, None], axis=1).sum()

        return jax.grad(score)(x) * x

    grad_fn = jax.jit(grad_x_input)
    t_grad = median_seconds(lambda: grad_fn(variables, x).block_until_ready(), args.repeats)
    rows.append(("jax.grad x input (jit)", t_grad))

    def torch_grad():
        xt = torch.tensor(x_nchw, requires_grad=True)
        out = torch_model(xt)
        (grad,) = torch.autograd.grad((eye[target] * out).sum(), xt)
        return grad * xt

    t_torch_grad = median_seconds(torch_grad, args.repeats)
    rows.append(("torch autograd x input", t_torch_grad))

    cases = {
        "EpsilonPlusFlat": (composites.EpsilonPlusFlat(), lambda: zennit.composites.EpsilonPlusFlat(
            canonizers=[SequentialMergeBatchNorm()])),
        "EpsilonGammaBox": (composites.EpsilonGammaBox(-3.0, 3.0), lambda: zennit.composites.EpsilonGammaBox(
            low=-3.0, high=3.0, canonizers=[SequentialMergeBatchNorm()])),
    }
    ratios = []
    for name, (ours, theirs) in cases.items():
        explain = jax.jit(jaxlrp.lrp(flax_model, ours))
        t_ours = median_seconds(lambda: explain(variables, x, target).block_until_ready(), args.repeats)
        relevance = np.asarray(explain(variables, x, target))

        def zennit_run():
            xt = torch.tensor(x_nchw, requires_grad=True)
            with Gradient(torch_model, theirs()) as attributor:
                _, attribution = attributor(xt, lambda out: eye[target] * out)
            return attribution

        t_theirs = median_seconds(zennit_run, args.repeats)
        reference = twins.to_nhwc(zennit_run().detach().numpy())
        error = np.abs(relevance - reference).max() / np.abs(reference).max()
        rows += [(f"jaxlrp {name} (jit)", t_ours), (f"zennit {name}", t_theirs)]
        ratios.append((name, t_ours / t_grad, t_theirs / t_ours, error))

    print(f"VGG-like width {args.width}, {args.image}x{args.image} images, batch {args.batch}, float32, "
          f"backend {jax.default_backend()} ({jax.devices()[0].device_kind}), torch threads {torch.get_num_threads()}")
    for label, seconds in rows:
        print(f"  {label:34s} {1e3 * seconds:9.2f} ms")
    for name, vs_grad, vs_zennit, error in ratios:
        print(f"  {name}: jaxlrp / jax.grad = {vs_grad:.2f}x   zennit / jaxlrp = {vs_zennit:.2f}x   "
              f"max rel. difference to zennit = {error:.1e}")


if __name__ == "__main__":
    main()
