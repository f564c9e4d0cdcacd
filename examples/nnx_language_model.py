"""Train a small character-level decoder-only language model (Flax NNX: RMSNorm, rotary
embeddings, grouped-query causal attention, SiLU-gated MLP, tied embedding head) on the Zen of
Python, then explain its next-character logit with AttnLRP in the pure GraphDef form under
jax.jit: one relevance value per prompt character, written as an HTML heatmap.

    python examples/nnx_language_model.py [--small] [--out DIR]
"""

import argparse
import codecs
import contextlib
import io
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import jaxlrp
from jaxlrp import composites, viz

with contextlib.redirect_stdout(io.StringIO()):  # `import this` prints the Zen of Python
    import this
TEXT = codecs.decode(this.s, "rot13")


def rotary(x, positions, base=10000.0):
    """Rotary position embedding of x (batch, length, heads, head_dim): products with cos/sin."""
    half = x.shape[-1] // 2
    freqs = base ** (-jnp.arange(half) / half)
    angles = positions[:, None] * freqs[None, :]  # (length, half)
    cos, sin = jnp.cos(angles)[None, :, None, :], jnp.sin(angles)[None, :, None, :]
    x1, x2 = x[..., :half], x[..., half:]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


class Attention(nnx.Module):
    """Causal grouped-query attention: `q_heads` query heads share `kv_heads` key/value heads."""

    def __init__(self, dim, q_heads, kv_heads, rngs):
        self.q_heads, self.kv_heads, self.head_dim = q_heads, kv_heads, dim // q_heads
        self.q = nnx.Linear(dim, q_heads * self.head_dim, use_bias=False, rngs=rngs)
        self.k = nnx.Linear(dim, kv_heads * self.head_dim, use_bias=False, rngs=rngs)
        self.v = nnx.Linear(dim, kv_heads * self.head_dim, use_bias=False, rngs=rngs)
        self.o = nnx.Linear(q_heads * self.head_dim, dim, use_bias=False, rngs=rngs)

    def __call__(self, x):
        b, t, _ = x.shape
        positions = jnp.arange(t, dtype=jnp.float32)
        q = rotary(self.q(x).reshape(b, t, self.q_heads, self.head_dim), positions)
        k = rotary(self.k(x).reshape(b, t, self.kv_heads, self.head_dim), positions)
        v = self.v(x).reshape(b, t, self.kv_heads, self.head_dim)
        group = self.q_heads // self.kv_heads
        k, v = jnp.repeat(k, group, axis=2), jnp.repeat(v, group, axis=2)
        y = jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="xla")
        return self.o(y.reshape(b, t, -1))


class MLP(nnx.Module):
    """SiLU-gated MLP: down(silu(gate(x)) * up(x))."""

    def __init__(self, dim, hidden, rngs):
        self.gate = nnx.Linear(dim, hidden, use_bias=False, rngs=rngs)
        self.up = nnx.Linear(dim, hidden, use_bias=False, rngs=rngs)
        self.down = nnx.Linear(hidden, dim, use_bias=False, rngs=rngs)

    def __call__(self, x):
        return self.down(nnx.silu(self.gate(x)) * self.up(x))


class Block(nnx.Module):
    def __init__(self, dim, q_heads, kv_heads, rngs):
        self.attn_norm = nnx.RMSNorm(dim, rngs=rngs)
        self.attn = Attention(dim, q_heads, kv_heads, rngs)
        self.mlp_norm = nnx.RMSNorm(dim, rngs=rngs)
        self.mlp = MLP(dim, 2 * dim, rngs)

    def __call__(self, x):
        x = x + self.attn(self.attn_norm(x))
        return x + self.mlp(self.mlp_norm(x))


class CharLM(nnx.Module):
    def __init__(self, vocab, dim, depth, rngs, q_heads=4, kv_heads=2):
        self.embed = nnx.Embed(vocab, dim, rngs=rngs)
        self.blocks = nnx.List([Block(dim, q_heads, kv_heads, rngs) for _ in range(depth)])
        self.norm = nnx.RMSNorm(dim, rngs=rngs)

    def __call__(self, tokens):  # (batch, length) int -> (batch, length, vocab) logits
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x)
        return self.embed.attend(self.norm(x))  # tied head


@nnx.jit
def train_step(model, optimizer, x, y):
    def loss_fn(model):
        return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()

    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--small", action="store_true", help="1 block, 100 training steps")
    parser.add_argument("--out", default="jaxlrp-examples", help="where the HTML heatmap goes")
    parser.add_argument("--prompt", default="Beautiful is better than ugly.\nExplicit is better than ")
    args = parser.parse_args()
    dim, depth, steps, length = (32, 1, 100, 32) if args.small else (64, 2, 800, 64)
    start = time.perf_counter()

    chars = sorted(set(TEXT))
    index = {c: i for i, c in enumerate(chars)}
    data = np.array([index[c] for c in TEXT], dtype=np.int32)

    model = CharLM(len(chars), dim, depth, nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, optax.adam(3e-3), wrt=nnx.Param)
    rng = np.random.default_rng(0)
    for _ in range(steps):
        offsets = rng.integers(0, len(data) - length - 1, 32)
        windows = np.stack([data[o : o + length + 1] for o in offsets])
        loss = train_step(model, optimizer, windows[:, :-1], windows[:, 1:])
    print(f"trained {steps} steps on {len(TEXT)} characters in {time.perf_counter() - start:.1f} s: "
          f"loss = {float(loss):.3f} (uniform {np.log(len(chars)):.3f})")

    prompt = "".join(c for c in args.prompt if c in index)
    tokens = jnp.asarray([[index[c] for c in prompt]], dtype=jnp.int32)  # (1, length)

    # Pure form: the state is an argument of the jitted function, not a baked-in constant.
    graphdef, state = nnx.split(model)
    logits = jax.jit(lambda state, tokens: nnx.merge(graphdef, state)(tokens))(state, tokens)
    next_id = int(logits[0, -1].argmax())
    logit = logits[0, -1, next_id]
    # Relevance starts at one logit: the predicted next character at the last position.
    seed = jnp.zeros_like(logits).at[0, -1, next_id].set(logit)
    composite = composites.AttnLRP()
    explain = jax.jit(jaxlrp.lrp(graphdef, composite))
    R = explain(state, tokens, target=seed)[0]  # token ids: one value per token, (length,)
    print(jaxlrp.rule_table(graphdef, composite, state, tokens))

    print(f"prompt {prompt!r} -> next character {chars[next_id]!r}")
    for c, r in zip(prompt, np.asarray(R)):
        print(f"  {c!r:6} {r:+.4f}")
    total = float(R.sum())
    print(f"relevance shape {tuple(R.shape)}, finite = {bool(jnp.isfinite(R).all())}")
    print(f"AttnLRP: logit {float(logit):.4f}  relevance sum {total:.4f}  ratio {total / float(logit):.4f}")
    # AttnLRP's softmax rule is not conservative (the softmax's shift takes a share); CP-LRP,
    # which holds the attention weights constant, gives the logit back up to its epsilon.
    R_cp = jax.jit(jaxlrp.lrp(graphdef, composites.CPLRP()))(state, tokens, target=seed)[0]
    print(f"CPLRP: logit {float(logit):.4f}  relevance sum {float(R_cp.sum()):.4f}  "
          f"ratio {float(R_cp.sum()) / float(logit):.4f}")

    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "nnx_language_model.html"
    path.write_text(viz.text_heatmap(list(prompt), R), encoding="utf-8")
    print(f"wrote {path}")
    print(f"total time {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
