"""AttnLRP and CP-LRP on a decoder against `jax.grad` of the same logit, in the same run.

    python benchmarks/bench_transformer.py [--layers 6] [--width 256] [--length 128] [--batch 8]
        [--repeats 10] [--json FILE]

The model is a Linen decoder: token embedding, pre-RMSNorm blocks of causal
`nn.MultiHeadDotProductAttention` (width/64 heads) and a SiLU-gated MLP (4x), a final RMSNorm
and a dense head over a 256-token vocabulary, in float32, with and without `nn.remat` on the
blocks. For each it prints, under `jax.jit`: the median seconds per batch of the forward pass,
of `jax.grad` of the explained logit (the floor an LRP pass can approach), of AttnLRP and of
CP-LRP, the compile time of each, the temporary memory XLA reserves for each (its compiled
memory analysis: on CPU the closest thing to peak memory), and what each holds from its forward
to its backward pass (the residuals of its `jax.vjp`, read off the trace: `tests/memory.py`),
with the ratios to `jax.grad`. XLA:CPU merges a checkpoint's recomputation back into the
forward pass, for `jax.grad` too, so on CPU only the held residuals show what remat saves; on a
GPU (`device.sh`) the temporary memory does as well.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import jaxlrp
from jaxlrp import composites

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "tests"))
from memory import held_bytes  # noqa: E402

VOCAB = 256


class Block(nn.Module):
    width: int

    @nn.compact
    def __call__(self, x, mask):
        h = nn.MultiHeadDotProductAttention(num_heads=max(1, self.width // 64))(nn.RMSNorm()(x), mask=mask)
        x = x + h
        h = nn.RMSNorm()(x)
        gated = nn.silu(nn.Dense(4 * self.width)(h)) * nn.Dense(4 * self.width)(h)
        return x + nn.Dense(self.width)(gated)


class Decoder(nn.Module):
    layers: int
    width: int
    remat: bool

    @nn.compact
    def __call__(self, tokens):
        mask = nn.make_causal_mask(tokens)
        x = nn.Embed(VOCAB, self.width)(tokens)
        block = nn.remat(Block) if self.remat else Block
        for _ in range(self.layers):
            x = block(self.width)(x, mask)
        return nn.Dense(VOCAB)(nn.RMSNorm()(x[:, -1]))


def median_seconds(compiled, args, repeats: int) -> float:
    """The median time of `repeats` calls of `compiled(*args)`, after a warm-up call."""
    jax.block_until_ready(compiled(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def measure(fn, args, repeats: int) -> dict:
    compiled_at = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    compile_s = time.perf_counter() - compiled_at
    seconds = median_seconds(compiled, args, repeats)
    memory = compiled.memory_analysis()
    temp = getattr(memory, "temp_size_in_bytes", float("nan")) if memory is not None else float("nan")
    held = held_bytes(fn, *args)
    return {"seconds": seconds, "compile_seconds": compile_s, "temp_bytes": temp, "held_bytes": held}


def embedding_gradient(model, target, width):
    """`(params, tokens) -> ` the gradient of the target logit at the embedding output (what an
    LRP pass of a token model is compared with)."""

    def gradient(params, tokens):
        def logit(offset):
            def add(next_fun, args, kwargs, context):
                out = next_fun(*args, **kwargs)
                is_embed = isinstance(context.module, nn.Embed) and context.method_name == "__call__"
                return out + offset if is_embed else out

            with nn.intercept_methods(add):
                out = model.apply(params, tokens)
            return jnp.take_along_axis(out, target[:, None], -1).sum()

        _, pullback = jax.vjp(logit, jnp.zeros((*tokens.shape, width)))  # jax.grad, as a vjp
        return pullback(jnp.ones(()))[0]

    return gradient


def run(layers: int, width: int, length: int, batch: int, repeats: int, remat: bool) -> dict:
    model = Decoder(layers, width, remat)
    tokens = jax.random.randint(jax.random.PRNGKey(0), (batch, length), 0, VOCAB)
    params = jax.jit(model.init)(jax.random.PRNGKey(1), tokens)
    target = jnp.argmax(model.apply(params, tokens), -1)

    def forward(params, tokens):
        return model.apply(params, tokens)

    methods = {
        "forward": forward,
        "jax.grad": embedding_gradient(model, target, width),
        "AttnLRP": lambda p, t: jaxlrp.lrp(model, composites.AttnLRP())(p, t, target=target),
        "CPLRP": lambda p, t: jaxlrp.lrp(model, composites.CPLRP())(p, t, target=target),
    }
    results = {name: measure(fn, (params, tokens), repeats) for name, fn in methods.items()}
    for name in ("AttnLRP", "CPLRP"):
        results[name]["time_vs_grad"] = results[name]["seconds"] / results["jax.grad"]["seconds"]
        results[name]["memory_vs_grad"] = results[name]["temp_bytes"] / results["jax.grad"]["temp_bytes"]
        results[name]["held_vs_grad"] = results[name]["held_bytes"] / results["jax.grad"]["held_bytes"]
    return results


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args(argv)
    device = jax.devices()[0]
    print(f"decoder: {args.layers} layers, width {args.width}, length {args.length}, batch {args.batch}, "
          f"float32, on {device.platform} ({device.device_kind})")
    everything = {}
    header = (f"{'remat':<6} {'method':<9} {'ms/batch':>9} {'compile s':>10} {'temp MiB':>9} {'held MiB':>9} "
              f"{'time/grad':>10} {'mem/grad':>9} {'held/grad':>10}")
    print(header)
    for remat in (False, True):
        results = run(args.layers, args.width, args.length, args.batch, args.repeats, remat)
        everything["remat" if remat else "plain"] = results
        for name, r in results.items():
            ratio = (f"{r['time_vs_grad']:>10.2f} {r['memory_vs_grad']:>9.2f} {r['held_vs_grad']:>10.2f}"
                     if "time_vs_grad" in r else "")
            print(f"{str(remat):<6} {name:<9} {1e3 * r['seconds']:>9.1f} {r['compile_seconds']:>10.1f} "
                  f"{r['temp_bytes'] / 2**20:>9.1f} {r['held_bytes'] / 2**20:>9.1f} {ratio}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"config": vars(args), "device": str(device), "results": everything}, f, indent=2)


if __name__ == "__main__":
    main()
