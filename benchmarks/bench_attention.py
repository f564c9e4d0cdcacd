"""Long contexts: AttnLRP through dense and blockwise attention, against `jax.grad`, over T.

    python benchmarks/bench_attention.py [--lengths 1024 2048 4096 8192 16384] [--layers 4]
        [--width 256] [--block 512] [--repeats 5] [--json FILE]

The model is a Linen decoder (token embedding, pre-RMSNorm blocks of causal
`nn.MultiHeadDotProductAttention` with width/64 heads and a SiLU-gated MLP, a dense head on the
last position), batch 1, float32, with Flax's dense attention (a causal mask from
`nn.make_causal_mask`) or `jaxlrp.attention.flax_attention_fn(is_causal=True)`. For each length
it compiles, under `jax.jit`, `jax.grad` of the explained logit at the embeddings and AttnLRP,
each with both attentions, and prints the temporary memory XLA plans for each (its compiled
memory analysis), and the median time of `--repeats` calls (1 call from 8192 tokens on) where
that memory fits (`--budget` GiB); what does not fit is compiled, not run.
"""

from __future__ import annotations

import argparse
import json
import time

import flax.linen as nn
import jax
import jax.numpy as jnp

import jaxlrp
from bench_transformer import embedding_gradient, median_seconds
from jaxlrp import composites
from jaxlrp.attention import flax_attention_fn

VOCAB = 256


class Block(nn.Module):
    width: int
    blockwise: int  # the query block size, or 0 for Flax's dense attention

    @nn.compact
    def __call__(self, x):
        heads = max(1, self.width // 64)
        h = nn.RMSNorm()(x)
        if self.blockwise:
            h = nn.MultiHeadDotProductAttention(heads, attention_fn=flax_attention_fn(is_causal=True,
                                                                                     block_size=self.blockwise))(h)
        else:
            h = nn.MultiHeadDotProductAttention(heads)(h, mask=nn.make_causal_mask(jnp.ones(x.shape[:2])))
        x = x + h
        h = nn.RMSNorm()(x)
        return x + nn.Dense(self.width)(nn.silu(nn.Dense(4 * self.width)(h)) * nn.Dense(4 * self.width)(h))


class Decoder(nn.Module):
    layers: int
    width: int
    blockwise: int = 0

    @nn.compact
    def __call__(self, tokens):
        x = nn.Embed(VOCAB, self.width)(tokens)
        for _ in range(self.layers):
            x = Block(self.width, self.blockwise)(x)
        return nn.Dense(VOCAB)(nn.RMSNorm()(x[:, -1]))


def measure(fn, args, repeats: int, budget: float) -> dict:
    start = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    compile_s = time.perf_counter() - start
    temp = compiled.memory_analysis().temp_size_in_bytes
    result = {"temp_bytes": temp, "compile_seconds": compile_s, "seconds": None}
    if temp <= budget * 2**30:
        result["seconds"] = median_seconds(compiled, args, repeats)
    return result


def run(length: int, layers: int, width: int, block: int, repeats: int, budget: float) -> dict:
    tokens = jax.random.randint(jax.random.PRNGKey(0), (1, length), 0, VOCAB)
    params = jax.jit(Decoder(layers, width, block).init)(jax.random.PRNGKey(1), tokens)  # the same for both
    target = 7
    targets = jnp.array([target])
    out = {}
    for name, blockwise in (("dense", 0), ("blockwise", block)):
        model = Decoder(layers, width, blockwise)
        out[f"jax.grad {name}"] = measure(embedding_gradient(model, targets, width), (params, tokens), repeats, budget)
        explain = jaxlrp.lrp(model, composites.AttnLRP())
        out[f"AttnLRP {name}"] = measure(lambda p, t: explain(p, t, target=target), (params, tokens), repeats, budget)
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--block", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--budget", type=float, default=12.0, help="GiB of XLA temporaries up to which a call is run")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    device = jax.devices()[0]
    print(f"decoder: {args.layers} layers, width {args.width}, batch 1, float32, query blocks of {args.block}, "
          f"on {device.platform} ({device.device_kind})")
    print(f"{'T':>6} {'method':<20} {'temp MiB':>10} {'s/call':>8} {'÷ grad (time)':>14} {'÷ grad (mem)':>13}")
    results = {}
    for length in args.lengths:
        repeats = args.repeats if length < 8192 else 1
        r = results[length] = run(length, args.layers, args.width, args.block, repeats, args.budget)
        for name, m in r.items():
            grad = r[f"jax.grad {name.split()[-1]}"]
            seconds = f"{m['seconds']:8.2f}" if m["seconds"] is not None else f"{'-':>8}"
            ratio_t = (f"{m['seconds'] / grad['seconds']:14.2f}" if m["seconds"] and grad["seconds"] and name.startswith("AttnLRP")
                       else f"{'':>14}")
            ratio_m = f"{m['temp_bytes'] / grad['temp_bytes']:13.2f}" if name.startswith("AttnLRP") else ""
            print(f"{length:>6} {name:<20} {m['temp_bytes'] / 2**20:>10.1f} {seconds} {ratio_t} {ratio_m}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"config": vars(args), "device": str(device), "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
