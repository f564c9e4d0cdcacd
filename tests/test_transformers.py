"""Transformers: AttnLRP and CP-LRP on stock Flax attention blocks.

Parity with LXT 2.1 (`lxt.explicit.functional`, float64, ε = 1e-10) on a block built from
stock Flax modules (LayerNorm, MultiHeadDotProductAttention, GELU MLP, residual adds, mean
pooling), with the same weights in torch; CP-LRP against a torch reference written from its
definition (attention weights constant, the ε rule on `V ↦ A·V`).
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxlrp
from jaxlrp import composites

import peers

EPSILON = 1e-10
FEATURES, HEADS, TOKENS = 8, 2, 5


class Block(nn.Module):
    @nn.compact
    def __call__(self, x, mask=None):
        attention = nn.MultiHeadDotProductAttention(num_heads=HEADS, qkv_features=FEATURES, name="attention")
        x = x + attention(nn.LayerNorm(name="ln1")(x), mask=mask)
        h = nn.Dense(2 * FEATURES, name="fc1")(nn.LayerNorm(name="ln2")(x))
        x = x + nn.Dense(FEATURES, name="fc2")(nn.gelu(h))
        return nn.Dense(3, name="head")(x.mean(1))


def _block(dtype):
    """The block's variables and input in `dtype`, rounded from the same float64 draws in every
    precision (LayerNorm scales and biases that are not 1 and 0)."""
    x = np.random.default_rng(0).standard_normal((2, TOKENS, FEATURES))
    variables = Block().init(jax.random.PRNGKey(1), jnp.asarray(x, jnp.float32))
    rng = np.random.default_rng(2)
    variables = jax.tree_util.tree_map_with_path(
        lambda path, a: np.asarray(a, np.float64) + (0.3 * rng.standard_normal(a.shape) if "ln" in jax.tree_util.keystr(path) else 0),
        variables,
    )
    return jax.tree.map(lambda a: jnp.asarray(a, dtype), variables), jnp.asarray(x, dtype)


@pytest.fixture(scope="module")
def block():
    """float64, for the tests marked float64."""
    return _block(jnp.float64)


def _torch_block(variables, x, hold_attention: bool):
    """The same block in torch, each operation through LXT's explicit rule (or, with
    `hold_attention`, CP-LRP's), relevance read as the input's gradient."""
    torch = peers.require("torch")
    F = peers.require("lxt.explicit.functional")
    p = jax.tree.map(lambda a: torch.tensor(np.asarray(a)), variables["params"])

    class Identity(torch.autograd.Function):  # GELU: relevance passes unchanged
        @staticmethod
        def forward(ctx, h):
            return torch.nn.functional.gelu(h, approximate="tanh")

        @staticmethod
        def backward(ctx, r):
            return r

    class HeldAttention(torch.autograd.Function):  # CP-LRP: A constant, ε rule on V ↦ A·V
        @staticmethod
        def forward(ctx, a, v):
            out = a @ v
            ctx.save_for_backward(a, v, out)
            return out

        @staticmethod
        def backward(ctx, r):
            a, v, out = ctx.saved_tensors
            return None, v * (a.transpose(-1, -2) @ (r / (out + EPSILON)))

    def linear(h, kernel, bias, scale=1.0):
        kernel, bias = kernel.reshape(kernel.shape[0], -1) * scale, bias.reshape(-1) * scale
        return F.linear_epsilon_fn.apply(h, kernel.T.contiguous(), bias, EPSILON)

    def layer_norm(h, q):
        return F.layer_norm_grad_fn.apply(h, q["scale"], q["bias"], 1e-6, EPSILON)

    def heads(h):
        return h.reshape(*h.shape[:2], HEADS, -1).transpose(1, 2)

    xt = torch.tensor(np.asarray(x), requires_grad=True)
    a = p["attention"]
    h = layer_norm(xt, p["ln1"])
    depth = FEATURES // HEADS
    q = heads(linear(h, a["query"]["kernel"], a["query"]["bias"], depth**-0.5))
    k, v = heads(linear(h, a["key"]["kernel"], a["key"]["bias"])), heads(linear(h, a["value"]["kernel"], a["value"]["bias"]))
    if hold_attention:
        weights = torch.softmax(q @ k.transpose(-1, -2), -1).detach()
        attended = HeldAttention.apply(weights, v)
    else:
        weights = F.softmax_fn.apply(F.matmul_fn.apply(q, k.transpose(-1, -2), False, EPSILON), -1)
        attended = F.matmul_fn.apply(weights, v, False, EPSILON)
    attended = attended.transpose(1, 2).reshape(*xt.shape[:2], FEATURES)
    out_kernel = a["out"]["kernel"].reshape(FEATURES, FEATURES)
    y = F.add2_tensors_fn.apply(xt, linear(attended, out_kernel, a["out"]["bias"]), False, EPSILON)
    h = Identity.apply(linear(layer_norm(y, p["ln2"]), p["fc1"]["kernel"], p["fc1"]["bias"]))
    y = F.add2_tensors_fn.apply(y, linear(h, p["fc2"]["kernel"], p["fc2"]["bias"]), False, EPSILON)
    out = linear(F.mean_fn.apply(y, 1, False, EPSILON), p["head"]["kernel"], p["head"]["bias"])
    target = out.argmax(-1)
    seed = torch.nn.functional.one_hot(target, 3).to(out.dtype) * out
    out.backward(seed.detach())
    return out.detach().numpy(), xt.grad.numpy()


@pytest.mark.float64
@pytest.mark.parametrize("name", ["AttnLRP", "CPLRP"])
def test_equals_lxt(block, name):
    variables, x = block
    composite = getattr(composites, name)(epsilon=EPSILON)
    out, relevance = jax.jit(jaxlrp.output_and_lrp(Block(), composite))(variables, x)
    torch_out, expected = _torch_block(variables, x, hold_attention=name == "CPLRP")
    np.testing.assert_allclose(out, torch_out, rtol=1e-12)
    error = np.abs(np.asarray(relevance) - expected).max() / np.abs(expected).max()
    assert error <= 1e-6, error


@pytest.mark.parametrize("name", ["AttnLRP", "CPLRP"])
def test_float32_in_the_default_configuration_follows_float64(name):
    """x64 off, as users run it: the block's map in float32 against float64 on the same rounded
    weights and input (relative L2; measured: 9.4e-8 AttnLRP, 9.2e-8 CP-LRP)."""
    composite = getattr(composites, name)(epsilon=1e-6)
    variables, x = _block(jnp.float32)
    relevance = jax.jit(jaxlrp.lrp(Block(), composite))(variables, x)
    assert relevance.dtype == jnp.float32
    with jax.enable_x64(True):
        wide = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), (variables, x))
        reference = np.asarray(jax.jit(jaxlrp.lrp(Block(), composite))(*wide))
    assert reference.dtype == np.float64
    distance = np.linalg.norm(np.asarray(relevance, np.float64) - reference) / np.linalg.norm(reference)
    assert distance < 1e-6, distance


def test_rule_table_of_a_block():
    variables, x = _block(jnp.float32)
    table = jaxlrp.rule_table(Block(), composites.AttnLRP(epsilon=0.01), variables, x)
    kinds = [(info.path, info.kind) for info in table.layers]
    assert ("ln1", "norm") in kinds and ("ln2", "norm") in kinds
    assert [k for p, k in kinds if p == "attention"] == ["bilinear", "softmax", "bilinear"]
    assert {repr(r) for r, info in zip(table.rules, table.layers) if info.kind != "softmax"} == {
        "Epsilon(epsilon=0.01)", "Norm(stabilizer=0.01)", "Bilinear(epsilon=0.01)"}
    held = jaxlrp.rule_table(Block(), composites.CPLRP(epsilon=0.01), variables, x)
    assert [info.kind for info in held.layers if info.path == "attention"] == ["sum"]  # A·V, A constant
    assert "attention/query" not in [info.path for info in held.layers]  # no relevance reaches Q, K


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("name", ["AttnLRP", "CPLRP"])
def test_padding_gets_zero_relevance_and_no_nan(dtype, name):
    variables, x = _block(dtype)
    valid = jnp.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], bool)
    mask = nn.make_attention_mask(valid, valid)

    class Padded(nn.Module):
        @nn.compact
        def __call__(self, x, mask):
            return Block(name="block")(x * valid[..., None], mask)  # padded tokens zero

    wrapped = {"params": {"block": variables["params"]}}
    composite = getattr(composites, name)(epsilon=1e-6)
    relevance = jax.jit(lambda v, x: jaxlrp.lrp(Padded(), composite, mask=mask)(v, x))(wrapped, x)
    assert relevance.dtype == dtype
    assert bool(jnp.all(jnp.isfinite(relevance.astype(jnp.float32))))
    assert bool(jnp.all(relevance[0, 3:] == 0))


VOCAB, WIDTH, Q_HEADS, KV_HEADS = 11, 8, 4, 2


def _rms_norm(x, scale):
    return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + 1e-6) * scale


def _rotary(x):  # (batch, tokens, heads, depth)
    half = x.shape[-1] // 2
    angles = jnp.arange(x.shape[1])[:, None] / 10000 ** (jnp.arange(half) / half)
    cos, sin = jnp.cos(angles)[None, :, None], jnp.sin(angles)[None, :, None]
    cos, sin = jnp.concatenate([cos, cos], -1), jnp.concatenate([sin, sin], -1)
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], -1)
    return x * cos + rotated * sin


def decoder(params, tokens):
    """A bias-free decoder block written with jnp: token embedding, RMSNorm, rotary
    embeddings, grouped-query causal attention (`jax.nn.dot_product_attention`), a SiLU-gated
    MLP, the next-token logits of the last position through the tied embedding."""
    x = params["embed"][tokens]
    batch, length, depth = *tokens.shape, WIDTH // Q_HEADS
    h = _rms_norm(x, params["norm1"])
    q = _rotary((h @ params["wq"]).reshape(batch, length, Q_HEADS, depth))
    k = _rotary((h @ params["wk"]).reshape(batch, length, KV_HEADS, depth))
    v = (h @ params["wv"]).reshape(batch, length, KV_HEADS, depth)
    attended = jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="xla")
    x = x + attended.reshape(batch, length, WIDTH) @ params["wo"]
    h = _rms_norm(x, params["norm2"])
    x = x + (jax.nn.silu(h @ params["gate"]) * (h @ params["up"])) @ params["down"]
    return _rms_norm(x[:, -1], params["norm3"]) @ params["embed"].T


@pytest.fixture
def decoder_params():
    """The decoder's parameters in the configuration's widest float, and its tokens."""
    shapes = {"embed": (VOCAB, WIDTH), "norm1": (WIDTH,), "norm2": (WIDTH,), "norm3": (WIDTH,),
              "wq": (WIDTH, WIDTH), "wk": (WIDTH, WIDTH // 2), "wv": (WIDTH, WIDTH // 2), "wo": (WIDTH, WIDTH),
              "gate": (WIDTH, 16), "up": (WIDTH, 16), "down": (16, WIDTH)}
    rng = np.random.default_rng(0)
    params = {k: jnp.asarray(rng.standard_normal(s) / np.sqrt(s[0])) for k, s in shapes.items()}
    params.update({k: 1 + 0.2 * params[k] for k in ("norm1", "norm2", "norm3")})
    tokens = jnp.asarray(rng.integers(0, VOCAB, (3, 6)))
    return params, tokens


def test_decoder_rule_table(decoder_params):
    params, tokens = decoder_params
    table = jaxlrp.rule_table(decoder, composites.AttnLRP(), params, tokens)
    kinds = [info.kind for info in table.layers]
    assert kinds.count("norm") == 3 and kinds.count("softmax") == 1 and kinds.count("bilinear") == 2
    assert "affine" not in kinds
    assert {info.param for info in table.layers if info.kind == "dense"} == {
        "['wq']", "['wk']", "['wv']", "['wo']", "['gate']", "['up']", "['down']", "['embed']"}


@pytest.mark.float64
def test_cplrp_conserves_on_a_bias_free_decoder(decoder_params):
    """CP-LRP holds the attention constant; with no bias anywhere each step is conservative
    (norms with 1/σ constant, rotary's products with constants and their sum, the gated MLP's
    even split), so the per-token relevance adds up to the explained logit."""
    params, tokens = decoder_params
    out, relevance = jax.jit(jaxlrp.output_and_lrp(decoder, composites.CPLRP(epsilon=1e-12)))(params, tokens)
    assert relevance.shape == tokens.shape
    np.testing.assert_allclose(relevance.sum(-1), out.max(-1), rtol=1e-8)


def test_attnlrp_on_the_decoder_is_finite_and_the_same_under_vmap(decoder_params):
    params, tokens = decoder_params
    explain = jaxlrp.lrp(decoder, composites.AttnLRP(epsilon=1e-6))
    relevance = jax.jit(explain)(params, tokens)
    assert bool(jnp.all(jnp.isfinite(relevance)))
    # jax.nn.dot_product_attention computes its softmax in float32 even in float64 mode.
    per_sample = jax.jit(jax.vmap(lambda t: explain(params, t[None])[0]))(tokens)
    np.testing.assert_allclose(per_sample, relevance, rtol=1e-5, atol=1e-6)


@pytest.mark.float64
def test_linen_function_and_nnx_give_equal_maps(block):
    """The stock-Flax block, as a Linen module, as a plain function of its variables, and as
    the same model in NNX (nnx.LayerNorm, nnx.MultiHeadAttention, nnx.Linear)."""
    from flax import nnx

    variables, x = block
    composite = composites.AttnLRP(epsilon=1e-8)
    linen = jaxlrp.lrp(Block(), composite)(variables, x)
    function = jaxlrp.lrp_fn(lambda v, x: Block().apply(v, x), composite)(variables, x)
    np.testing.assert_allclose(function, linen, rtol=1e-12)

    class NNXBlock(nnx.Module):
        def __init__(self, rngs):
            self.ln1, self.ln2 = nnx.LayerNorm(FEATURES, rngs=rngs), nnx.LayerNorm(FEATURES, rngs=rngs)
            self.attention = nnx.MultiHeadAttention(HEADS, FEATURES, FEATURES, decode=False, rngs=rngs)
            self.fc1 = nnx.Linear(FEATURES, 2 * FEATURES, rngs=rngs)
            self.fc2 = nnx.Linear(2 * FEATURES, FEATURES, rngs=rngs)
            self.head = nnx.Linear(FEATURES, 3, rngs=rngs)

        def __call__(self, x):
            x = x + self.attention(self.ln1(x))
            x = x + self.fc2(nnx.gelu(self.fc1(self.ln2(x))))
            return self.head(x.mean(1))

    model = NNXBlock(nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    flat = dict(nnx.to_flat_state(state))
    for path, value in jax.tree_util.tree_flatten_with_path(variables["params"])[0]:
        key = tuple(str(getattr(p, "key", p)) for p in path)
        flat[key] = flat[key].replace(jnp.asarray(value))
    state = nnx.from_flat_state(flat)
    nnx_out, nnx_map = jaxlrp.output_and_lrp(graphdef, composite)(state, x)
    # NNX's attention computes in float32 somewhere: its own forward pass is 2e-8 off Linen's.
    np.testing.assert_allclose(nnx_out, Block().apply(variables, x), rtol=1e-6)
    np.testing.assert_allclose(nnx_map, linen, rtol=1e-5, atol=1e-8)
    table = jaxlrp.rule_table(graphdef, composite, state, x)
    assert [info.kind for info in table.layers if info.path == "attention"] == ["bilinear", "softmax", "bilinear"]
    assert [info.module for info in table.layers if info.kind == "norm"] == [nnx.LayerNorm, nnx.LayerNorm]


@pytest.mark.float64
def test_flax_norms_are_norm_layers():
    from flax import nnx

    x = jax.random.normal(jax.random.PRNGKey(0), (2, 3, FEATURES), jnp.float64)
    for norm in (nn.LayerNorm(), nn.RMSNorm()):
        model = nn.Sequential([norm, nn.Dense(2)])
        variables = model.init(jax.random.PRNGKey(1), x)
        table = jaxlrp.rule_table(model, composites.AttnLRP(), variables, x)
        assert [info.kind for info in table.layers] == ["norm", "dense"], norm
    for norm in (nnx.LayerNorm(FEATURES, rngs=nnx.Rngs(0)), nnx.RMSNorm(FEATURES, rngs=nnx.Rngs(0))):
        table = jaxlrp.rule_table(norm, composites.AttnLRP(), x)
        assert [info.kind for info in table.layers] == ["norm"], norm
        seed = jax.random.normal(jax.random.PRNGKey(2), x.shape, jnp.float64)
        relevance = jaxlrp.lrp(norm, composites.AttnLRP(epsilon=1e-12))(x, target=seed)
        # the ε rule on x ↦ (x − mean)·scale/σ (+ bias 0): conservative
        np.testing.assert_allclose(relevance.sum(-1), seed.sum(-1), rtol=1e-8)


VOCAB_PLANTED, LENGTH_PLANTED, PLANTED = 12, 10, 7


class PlantedClassifier(nn.Module):
    @nn.compact
    def __call__(self, tokens):
        x = nn.Embed(VOCAB_PLANTED, 16)(tokens)
        x = x + nn.MultiHeadDotProductAttention(num_heads=2)(nn.LayerNorm()(x))
        x = x + nn.Dense(16)(nn.gelu(nn.Dense(32)(nn.LayerNorm()(x))))
        return nn.Dense(2)(x.mean(1))


def _planted_data(n, seed):
    """Sequences whose label is 1 exactly when the token PLANTED occurs (once, anywhere)."""
    rng = np.random.default_rng(seed)
    tokens = rng.choice([t for t in range(VOCAB_PLANTED) if t != PLANTED], (n, LENGTH_PLANTED))
    labels = rng.integers(0, 2, n)
    where = rng.integers(0, LENGTH_PLANTED, n)
    tokens[labels == 1, where[labels == 1]] = PLANTED
    return jnp.asarray(tokens), jnp.asarray(labels), where


def test_attnlrp_finds_the_planted_token():
    """Ground truth: a transformer trained to detect one planted token. AttnLRP's most relevant
    token is the planted one (measured: 100% of positives); gradient x input at the
    embeddings finds it far less often (measured: 0%)."""
    optax = pytest.importorskip("optax")
    model = PlantedClassifier()
    tokens, labels, _ = _planted_data(1024, 0)
    params = model.init(jax.random.PRNGKey(0), tokens[:2])
    optimizer = optax.adam(3e-3)

    @jax.jit
    def step(params, state, t, y):
        def loss(p):
            return optax.softmax_cross_entropy_with_integer_labels(model.apply(p, t), y).mean()

        updates, state = optimizer.update(jax.grad(loss)(params), state)
        return optax.apply_updates(params, updates), state

    state = optimizer.init(params)
    for i in range(300):
        batch = slice((i * 64) % 1024, (i * 64) % 1024 + 64)
        params, state = step(params, state, tokens[batch], labels[batch])

    test_tokens, test_labels, where = _planted_data(256, 1)
    assert float((model.apply(params, test_tokens).argmax(-1) == test_labels).mean()) > 0.95
    positive = np.asarray(test_labels) == 1
    relevance = jax.jit(jaxlrp.lrp(model, composites.AttnLRP()))(params, test_tokens, target=jnp.ones(256, int))
    attnlrp_hits = (np.asarray(relevance).argmax(-1) == where)[positive].mean()

    def with_embedding_offset(delta):
        def add(next_fun, args, kwargs, context):
            out = next_fun(*args, **kwargs)
            return out + delta if isinstance(context.module, nn.Embed) and context.method_name == "__call__" else out

        with nn.intercept_methods(add):
            return model.apply(params, test_tokens)[:, 1].sum()

    embedded = params["params"]["Embed_0"]["embedding"][test_tokens]
    gradient = jax.grad(with_embedding_offset)(jnp.zeros_like(embedded))
    gradient_hits = (np.asarray((gradient * embedded).sum(-1)).argmax(-1) == where)[positive].mean()
    assert attnlrp_hits >= 0.95, attnlrp_hits
    assert attnlrp_hits > gradient_hits, (attnlrp_hits, gradient_hits)


def test_mask_passed_at_call_time_under_jit():
    variables, x = _block(jnp.float32)
    explain = jax.jit(jaxlrp.lrp(Block(), composites.AttnLRP()))
    valid = jnp.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], bool)
    masked = explain(variables, x, mask=nn.make_attention_mask(valid, valid))
    expected = jaxlrp.lrp(Block(), composites.AttnLRP(), mask=nn.make_attention_mask(valid, valid))(variables, x)
    np.testing.assert_allclose(masked, expected, rtol=1e-5, atol=1e-6)
    everything = jnp.ones_like(valid)
    unmasked = explain(variables, x, mask=nn.make_attention_mask(everything, everything))  # no recompile
    np.testing.assert_allclose(unmasked, jaxlrp.lrp(Block(), composites.AttnLRP())(variables, x), rtol=1e-5, atol=1e-6)
    assert explain._cache_size() == 1


@pytest.mark.float64
def test_positional_embedding_takes_its_share_like_a_bias():
    class Embedded(nn.Module):
        @nn.compact
        def __call__(self, tokens):
            x = nn.Embed(VOCAB_PLANTED, 4)(tokens)
            x = x + self.param("position", nn.initializers.normal(1.0), (tokens.shape[1], 4))
            return nn.Dense(2, use_bias=False)(x.mean(1))

    model = Embedded()
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, VOCAB_PLANTED, (2, 5)))
    variables = jax.tree.map(lambda a: a.astype(jnp.float64), model.init(jax.random.PRNGKey(0), tokens))
    composite = composites.AttnLRP(epsilon=1e-12)
    table = jaxlrp.rule_table(model, composite, variables, tokens)  # no warning: it has a rule
    assert [(info.kind, repr(rule)) for info, rule in zip(table.layers, table.rules)][0] == (
        "affine", "Epsilon(epsilon=1e-12)")
    relevance = jaxlrp.lrp(model, composite)(variables, tokens, target=1)
    p = variables["params"]
    x = np.asarray(p["Embed_0"]["embedding"])[np.asarray(tokens)]
    h = x + np.asarray(p["position"])
    m = h.mean(1)
    r_m = m * np.asarray(p["Dense_0"]["kernel"])[:, 1]  # the ε rule with the logit as the seed: s = 1
    expected = (x * (r_m / h.sum(1))[:, None]).sum(-1)  # the mean's share, then x's part of x + position
    np.testing.assert_allclose(relevance, expected, rtol=1e-7)
    with pytest.warns(jaxlrp.UnmergedAffineWarning, match="'<root>' \\(Embedded\\) shifts"):
        jaxlrp.rule_table(model, composites.EpsilonPlus(), variables, tokens)  # Pass by default, said


class HalfAttention(nn.Module):
    """Stock attention in a half precision: `jax.nn.softmax` sums exp's output in float32
    (exp → convert → reduce_sum → convert back → div)."""

    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = x + nn.MultiHeadDotProductAttention(num_heads=HEADS, qkv_features=FEATURES, dtype=self.dtype)(x)
        return nn.Dense(3, dtype=self.dtype)(x.mean(1))


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("name", ["AttnLRP", "CPLRP"])
def test_half_precision_softmax_is_a_softmax(dtype, name):
    """The softmax is found through its dtype conversions: AttnLRP gives it its rule and CP-LRP
    holds it (before: planned as a "norm", 2.2-2.6 relative L2 off float32, CP-LRP equal to
    AttnLRP). The map is as close to float32 on the same rounded weights as the precision
    allows (measured, bfloat16: AttnLRP 0.044, CP-LRP 0.050; the batched map and vmap 0.004 apart)."""
    x = jax.random.normal(jax.random.PRNGKey(0), (4, TOKENS, FEATURES))
    variables = jax.tree.map(lambda a: a.astype(dtype), HalfAttention().init(jax.random.PRNGKey(1), x))
    x = x.astype(dtype)
    composite = getattr(composites, name)()
    kinds = [info.kind for info in jaxlrp.rule_table(HalfAttention(dtype), composite, variables, x).layers]
    assert "norm" not in kinds
    assert kinds.count("softmax") == (name == "AttnLRP")
    assert kinds.count("bilinear") == (2 if name == "AttnLRP" else 0)
    explain = jax.jit(jaxlrp.lrp(HalfAttention(dtype), composite))
    relevance = explain(variables, x, target=0)
    wide = jax.tree.map(lambda a: a.astype(jnp.float32), (variables, x))
    reference = np.asarray(jaxlrp.lrp(HalfAttention(), composite)(*wide, target=0))
    assert _relative_l2(relevance, reference) < 0.1
    per_sample = jax.vmap(lambda xi: explain(variables, xi[None], target=0)[0])(x)  # measured: 0.004
    assert _relative_l2(per_sample, relevance) < 0.02


def _relative_l2(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


class ScannedBlocks(nn.Module):
    """Two pre-norm attention blocks, under nn.scan or unrolled."""

    scan: bool

    @nn.compact
    def __call__(self, x):
        class Layer(nn.Module):
            @nn.compact
            def __call__(self, h, _):
                attention = nn.MultiHeadDotProductAttention(num_heads=HEADS, qkv_features=FEATURES)
                return h + attention(nn.LayerNorm()(h)), None

        if self.scan:
            x, _ = nn.scan(Layer, variable_axes={"params": 0}, split_rngs={"params": True}, length=2)(name="blocks")(x, None)
        else:
            for i in range(2):
                x, _ = Layer(name=f"block{i}")(x, None)
        return nn.Dense(3, name="head")(x.mean(1))


@pytest.mark.float64
@pytest.mark.parametrize("name", ["AttnLRP", "CPLRP"])
def test_scanned_blocks_equal_the_unrolled_ones(name):
    """Inside an nn.scan body, CP-LRP holds the attention as it does outside (before: the body
    was planned without the hold, and CP-LRP's map was AttnLRP's)."""
    x = jax.random.normal(jax.random.PRNGKey(0), (2, TOKENS, FEATURES), jnp.float64)
    variables = jax.tree.map(lambda a: a.astype(jnp.float64), ScannedBlocks(True).init(jax.random.PRNGKey(1), x))
    stacked = variables["params"]["blocks"]
    unrolled = {"params": {**{f"block{i}": jax.tree.map(lambda a: a[i], stacked) for i in range(2)},
                           "head": variables["params"]["head"]}}
    composite = getattr(composites, name)(epsilon=1e-8)
    scanned = jax.jit(jaxlrp.lrp(ScannedBlocks(True), composite))(variables, x)
    np.testing.assert_allclose(scanned, jaxlrp.lrp(ScannedBlocks(False), composite)(unrolled, x), rtol=1e-9, atol=1e-12)
    kinds = [info.kind for info in jaxlrp.rule_table(ScannedBlocks(True), composite, variables, x).layers]
    assert ("softmax" in kinds) == (name == "AttnLRP")


def _masked_after(params, x):
    """Single-head attention whose causal mask multiplies the softmax's output, as
    `keras.layers.Softmax(mask=...)` applies it; no bias anywhere."""
    q, k, v = x @ params["q"], x @ params["k"], x @ params["v"]
    mask = jnp.tril(jnp.ones((x.shape[1], x.shape[1]), x.dtype))
    attention = jax.nn.softmax(q @ jnp.swapaxes(k, -1, -2) / np.sqrt(q.shape[-1]), axis=-1) * mask
    return (x + attention @ v).mean(1) @ params["head"]


@pytest.mark.float64
def test_cplrp_holds_a_mask_multiplied_after_the_softmax():
    """CP-LRP holds the masked attention (before: the hold stopped at the mask's product and
    the relevance reaching the attention was lost, 0.27-0.49 of the logit kept); on this
    bias-free model it conserves."""
    rng = np.random.default_rng(0)
    params = {k: jnp.asarray(rng.normal(size=s) / np.sqrt(s[0])) for k, s in
              {"q": (FEATURES, 4), "k": (FEATURES, 4), "v": (FEATURES, FEATURES), "head": (FEATURES, 3)}.items()}
    x = jnp.asarray(rng.normal(size=(2, TOKENS, FEATURES)))
    composite = composites.CPLRP(epsilon=1e-12)
    out, relevance = jaxlrp.output_and_lrp(_masked_after, composite)(params, x)
    np.testing.assert_allclose(relevance.sum((1, 2)), out.max(-1), rtol=1e-8)
    kinds = [info.kind for info in jaxlrp.rule_table(_masked_after, composite, params, x).layers]
    assert "softmax" not in kinds and "bilinear" not in kinds
    attnlrp = [info.kind for info in jaxlrp.rule_table(_masked_after, composites.AttnLRP(), params, x).layers]
    assert attnlrp.count("softmax") == 1 and attnlrp.count("bilinear") == 2
