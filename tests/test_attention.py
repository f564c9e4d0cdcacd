"""`jaxlrp.attention.blockwise_attention`: the dense attention's values, gradients and relevance
maps, in memory that grows linearly with the sequence."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxlrp
from jaxlrp import composites
from jaxlrp.attention import blockwise_attention, flax_attention_fn
from memory import held_bytes
from models import PRECISIONS

B, T, D, N, K, H = 2, 37, 16, 4, 2, 4  # T not a multiple of the block: the last block is padded


def dense_attention(q, k, v, bias=None, mask=None, is_causal=False):
    """The textbook computation, every score materialised."""
    k, v = (jnp.repeat(a, q.shape[2] // a.shape[2], axis=2) for a in (k, v))
    s = jnp.einsum("btnh,bsnh->bnts", q, k) / q.shape[-1] ** 0.5
    if bias is not None:
        s = s + bias
    keep = mask
    if is_causal:
        causal = jnp.tril(jnp.ones((q.shape[1], k.shape[1]), bool))
        keep = causal if keep is None else keep & causal
    if keep is not None:
        s = jnp.where(keep, s, jnp.finfo(s.dtype).min)
    return jnp.einsum("bnts,bsnh->btnh", jax.nn.softmax(s, -1), v)


def _qkv(dtype, length=T):
    keys = jax.random.split(jax.random.PRNGKey(0), 3)
    return (jax.random.normal(keys[0], (B, length, N, H), dtype), jax.random.normal(keys[1], (B, length, K, H), dtype),
            jax.random.normal(keys[2], (B, length, K, H), dtype))


CASES = {
    "plain": lambda: {},
    "causal": lambda: {"is_causal": True},
    "bias": lambda: {"bias": jax.random.normal(jax.random.PRNGKey(3), (B, 1, T, T))},
    "mask and causal": lambda: {"mask": jax.random.uniform(jax.random.PRNGKey(4), (B, N, T, T)) > 0.2, "is_causal": True},
    "padding mask": lambda: {"mask": jnp.arange(T)[None, None, None, :] < jnp.array([T, 20])[:, None, None, None]},
    "bias per key": lambda: {"bias": jax.random.normal(jax.random.PRNGKey(5), (B, N, 1, T))},
    "a fully masked row": lambda: {"mask": (jnp.arange(T) != 3)[None, None, :, None] & jnp.ones((1, 1, 1, T), bool)},
}


@pytest.mark.float64
@pytest.mark.parametrize("case", CASES)
def test_values_and_gradients_equal_the_dense_attention(case):
    q, k, v = _qkv(jnp.float64)
    kwargs = CASES[case]()
    kwargs = {name: a.astype(jnp.float64) if getattr(a, "dtype", None) == jnp.float32 else a for name, a in kwargs.items()}
    np.testing.assert_allclose(blockwise_attention(q, k, v, block_size=8, **kwargs), dense_attention(q, k, v, **kwargs),
                               rtol=1e-12, atol=1e-14)
    loss = lambda attn: lambda q, k, v: jnp.sum(jnp.sin(attn(q, k, v)))  # noqa: E731
    ours = jax.grad(loss(lambda *a: blockwise_attention(*a, block_size=8, **kwargs)), argnums=(0, 1, 2))(q, k, v)
    theirs = jax.grad(loss(lambda *a: dense_attention(*a, **kwargs)), argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(ours, theirs):
        np.testing.assert_allclose(a, b, rtol=1e-11, atol=1e-13)
    unbatched = blockwise_attention(q[0], k[0], v[0], block_size=8, is_causal=True)
    np.testing.assert_allclose(unbatched, dense_attention(q, k, v, is_causal=True)[0], rtol=1e-12, atol=1e-14)


def _params(dtype):
    keys = jax.random.split(jax.random.PRNGKey(1), 5)
    shapes = {"q": (D, N * H), "k": (D, K * H), "v": (D, K * H), "o": (N * H, 3)}
    params = {name: jax.random.normal(key, shape, dtype) / 4 for key, (name, shape) in zip(keys, shapes.items())}
    return params, jax.random.normal(keys[-1], (B, T, D), dtype)


def _model(attention):
    def model(p, x):
        q = (x @ p["q"]).reshape(*x.shape[:2], N, H)
        k, v = ((x @ p[name]).reshape(*x.shape[:2], K, H) for name in "kv")
        return attention(q, k, v).reshape(*x.shape[:2], N * H)[:, -1] @ p["o"]

    return model


@pytest.mark.parametrize("dtype", PRECISIONS)
@pytest.mark.parametrize("name", ["AttnLRP", "CPLRP"])
@pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])
def test_relevance_equals_the_dense_attention(dtype, name, is_causal):
    composite = getattr(composites, name)()
    params, x = _params(dtype)
    dense = jaxlrp.lrp_fn(_model(lambda *a: dense_attention(*a, is_causal=is_causal)), composite)
    blocked = jaxlrp.lrp_fn(_model(lambda *a: blockwise_attention(*a, is_causal=is_causal, block_size=8)), composite)
    expected = dense(params, x, target=1)
    got = jax.jit(blocked)(params, x, target=1)
    scale = float(jnp.abs(expected).max())
    atol = 1e-6 * scale if dtype == jnp.float32 else 1e-12 * scale
    np.testing.assert_allclose(got, expected, rtol=0, atol=atol)
    dense_table = jaxlrp.rule_table(_model(lambda *a: dense_attention(*a, is_causal=is_causal)), composite, params, x)
    blocked_table = jaxlrp.rule_table(_model(lambda *a: blockwise_attention(*a, is_causal=is_causal)), composite, params, x)
    rows = lambda table: [(r.kind, type(rule)) for r, rule in zip(table.layers, table.rules)]  # noqa: E731
    if name == "AttnLRP":
        assert rows(dense_table) == rows(blocked_table)
    else:  # the query and key layers, whose relevance inside the map's body is held, are rows too (taking zero)
        assert [row for row in rows(blocked_table) if row not in rows(dense_table)] == []


class Decoder(nn.Module):
    blockwise: bool = False

    @nn.compact
    def __call__(self, tokens):
        x = nn.Embed(32, D)(tokens)
        if self.blockwise:
            attention = nn.MultiHeadDotProductAttention(num_heads=N, attention_fn=flax_attention_fn(is_causal=True,
                                                                                                   block_size=8))
            x = x + attention(nn.RMSNorm()(x))
        else:
            x = x + nn.MultiHeadDotProductAttention(num_heads=N)(nn.RMSNorm()(x), mask=nn.make_causal_mask(tokens))
        return nn.Dense(32)(nn.RMSNorm()(x[:, -1]))


@pytest.mark.float64
def test_flax_attention_fn_equals_flax_attention():
    tokens = jax.random.randint(jax.random.PRNGKey(2), (B, T), 0, 32)
    variables = Decoder().init(jax.random.PRNGKey(3), tokens)
    variables = jax.tree.map(lambda a: a.astype(jnp.float64), variables)
    np.testing.assert_allclose(Decoder(True).apply(variables, tokens), Decoder().apply(variables, tokens), rtol=1e-12)
    for composite in (composites.AttnLRP(), composites.CPLRP()):
        expected = jaxlrp.lrp(Decoder(), composite)(variables, tokens)
        got = jaxlrp.lrp(Decoder(True), composite)(variables, tokens)
        # Flax scales the query before its product with the keys, blockwise_attention the scores:
        # the same map, its stabilisers (ε = 1e-6) meeting different magnitudes.
        np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-9 * float(jnp.abs(expected).max()))
    with pytest.raises(ValueError, match="dropout on the attention weights"):
        flax_attention_fn()(*_qkv(jnp.float32)[:1] * 3, dropout_rate=0.1, deterministic=False)


def _memory(attention, length):
    params, _ = _params(jnp.float32)
    x = jax.random.normal(jax.random.PRNGKey(0), (1, length, D))
    explain = jaxlrp.lrp_fn(_model(attention), composites.AttnLRP())
    compiled = jax.jit(lambda p, x: explain(p, x, target=1)).lower(params, x).compile()
    return compiled.memory_analysis().temp_size_in_bytes, held_bytes(explain, params, x, target=1)


def test_memory_grows_linearly_with_the_sequence():
    """Four times the tokens: the blockwise relevance pass takes at most 5x the memory (XLA's
    plan and what it holds from forward to backward); the dense one 10x or more."""
    blocked = lambda *a: blockwise_attention(*a, is_causal=True, block_size=64)  # noqa: E731
    dense = lambda *a: dense_attention(*a, is_causal=True)  # noqa: E731
    (temp_short, held_short), (temp_long, held_long) = (_memory(blocked, n) for n in (256, 1024))
    (dense_short, _), (dense_long, _) = (_memory(dense, n) for n in (256, 1024))
    assert held_short > 0 and temp_long <= 5 * temp_short and held_long <= 5 * held_short, (temp_short, temp_long,
                                                                                             held_short, held_long)
    assert dense_long >= 10 * dense_short, (dense_short, dense_long)


def test_errors():
    q, k, v = _qkv(jnp.float32)
    with pytest.raises(ValueError, match=r"query \(B, T, N, H\)"):
        blockwise_attention(q[..., 0], k, v)
    with pytest.raises(ValueError, match="must divide"):
        blockwise_attention(q[:, :, :3], k, v)
    with pytest.raises(ValueError, match=r"mask must broadcast to \(B, N, T, S\)"):
        blockwise_attention(q, k, v, mask=jnp.ones((B, N, T - 1, T), bool))


def test_cross_attention_and_bfloat16_equal_jax():
    """Fewer keys than queries, grouped heads, a causal mask; in bfloat16 within
    jax.nn.dot_product_attention's own rounding of float32 (scores and softmax in float32)."""
    q, _, _ = _qkv(jnp.float32)
    k, v = (a[:, :29] for a in _qkv(jnp.float32)[1:])
    ours = blockwise_attention(q, k, v, is_causal=True, block_size=8)
    np.testing.assert_allclose(ours, jax.nn.dot_product_attention(q, k, v, is_causal=True), atol=2e-6)
    low = [a.astype(jnp.bfloat16) for a in (q, k, v)]
    reference = jax.nn.dot_product_attention(*low, is_causal=True).astype(jnp.float32)
    wide = jax.nn.dot_product_attention(*(a.astype(jnp.float32) for a in low), is_causal=True)
    ours = blockwise_attention(*low, is_causal=True, block_size=8).astype(jnp.float32)
    assert float(jnp.abs(ours - wide).max()) <= 1.5 * float(jnp.abs(reference - wide).max()) + 1e-6


@pytest.mark.float64
def test_a_sequence_sharded_over_devices_equals_the_unsharded_one():
    """Inside `jax.shard_map`, 8 devices holding 8 tokens each: keys and values gathered, the
    causal mask offset by the device's position, the logit summed over devices (`psum`, a row
    of kind "sum": given ε = 0 here so that it adds no stabiliser the unsharded model lacks)."""
    from jax.sharding import NamedSharding, PartitionSpec as P

    length, heads = 64, 2
    keys = jax.random.split(jax.random.PRNGKey(0), 5)
    shapes = {"q": (D, heads * H), "k": (D, heads * H), "v": (D, heads * H), "o": (heads * H, 3)}
    params = {name: jax.random.normal(key, shape, jnp.float64) / 4 for key, (name, shape) in zip(keys, shapes.items())}
    x = jax.random.normal(keys[-1], (1, length, D), jnp.float64)

    def model(p, x, axis=None):
        q, k, v = ((x @ p[name]).reshape(*x.shape[:2], heads, H) for name in "qkv")
        o = blockwise_attention(q, k, v, is_causal=True, block_size=4, axis_name=axis)
        logits = o.reshape(*x.shape[:2], heads * H)[:, -1] @ p["o"]
        if axis is None:
            return logits
        last = jax.lax.axis_index(axis) == jax.lax.axis_size(axis) - 1
        return jax.lax.psum(jnp.where(last, logits, 0.0), axis)

    mesh = jax.make_mesh((8,), ("seq",))
    sharded_x = jax.device_put(x, NamedSharding(mesh, P(None, "seq")))
    composite = composites.combine(composites.LayerMap({"sum": jaxlrp.rules.Norm(0.0)}), composites.AttnLRP())

    def per_device(p, x):
        return jaxlrp.lrp_fn(lambda p, x: model(p, x, "seq"), composite)(p, x, target=1)

    sharded = jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=(P(), P(None, "seq")), out_specs=P(None, "seq")))
    expected = jaxlrp.lrp_fn(model, composite)(params, x, target=1)
    np.testing.assert_allclose(sharded(params, sharded_x), expected, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(expected, jaxlrp.lrp_fn(_seq_dense(heads), composite)(params, x, target=1), rtol=1e-10,
                               atol=1e-14)


def _seq_dense(heads):
    def model(p, x):
        q, k, v = ((x @ p[name]).reshape(*x.shape[:2], heads, H) for name in "qkv")
        o = dense_attention(q, k, v, is_causal=True)
        return o.reshape(*x.shape[:2], heads * H)[:, -1] @ p["o"]

    return model


def _pallas_attention(q, k, v):
    """A fused causal attention kernel (Pallas, run by its interpreter on CPU): one program per
    batch entry and head, its computation hidden from the jaxpr."""
    from jax.experimental import pallas as pl

    b, t, n, h = q.shape

    def body(q_ref, k_ref, v_ref, o_ref):
        s = jnp.dot(q_ref[0], k_ref[0].T) / h**0.5
        s = jnp.where(jnp.tril(jnp.ones((t, t), bool)), s, jnp.finfo(s.dtype).min)
        o_ref[0] = jnp.dot(jax.nn.softmax(s, axis=-1), v_ref[0])

    heads_first = lambda a: jnp.moveaxis(a, 2, 1).reshape(b * n, t, h)  # noqa: E731
    spec = pl.BlockSpec((1, t, h), lambda i: (i, 0, 0))
    out = pl.pallas_call(body, out_shape=jax.ShapeDtypeStruct((b * n, t, h), q.dtype), grid=(b * n,),
                         in_specs=[spec, spec, spec], out_specs=spec, interpret=True)(*map(heads_first, (q, k, v)))
    return jnp.moveaxis(out.reshape(b, n, t, h), 1, 2)


@pytest.mark.float64
def test_a_fused_kernel_explained_through_the_blockwise_reference():
    """`extend.with_reference(kernel, blockwise_attention)`: the kernel runs forward, the relevance
    is the blockwise attention's, equal to the dense map."""
    fused = jaxlrp.extend.with_reference(_pallas_attention, lambda q, k, v: blockwise_attention(q, k, v, is_causal=True,
                                                                                                block_size=8))
    params, x = _params(jnp.float64)
    params = {**params, "k": params["k"][:, :N * H // 2].repeat(2, axis=1), "v": params["v"][:, :N * H // 2].repeat(2, axis=1)}

    def model(attention):
        def call(p, x):
            q, k, v = ((x @ p[name]).reshape(*x.shape[:2], N, H) for name in "qkv")
            return attention(q, k, v).reshape(*x.shape[:2], N * H)[:, -1] @ p["o"]

        return call

    kernel_model = model(fused)
    assert "pallas_call" in str(jax.make_jaxpr(kernel_model)(params, x))
    np.testing.assert_allclose(kernel_model(params, x), model(lambda *a: dense_attention(*a, is_causal=True))(params, x),
                               rtol=1e-12)
    for composite in (composites.AttnLRP(), composites.CPLRP()):
        expected = jaxlrp.lrp_fn(model(lambda *a: dense_attention(*a, is_causal=True)), composite)(params, x, target=1)
        got = jax.jit(jaxlrp.lrp_fn(kernel_model, composite))(params, x, target=1)
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-12 * float(jnp.abs(expected).max()))


@pytest.mark.parametrize("name", ["AttnLRP", "CPLRP"])
def test_bfloat16_relevance_follows_the_dense_and_float32_maps(name):
    composite = getattr(composites, name)()
    params, x = _params(jnp.bfloat16)
    dense = jaxlrp.lrp_fn(_model(lambda *a: dense_attention(*a, is_causal=True)), composite)
    blocked = jaxlrp.lrp_fn(_model(lambda *a: blockwise_attention(*a, is_causal=True, block_size=8)), composite)
    got = blocked(params, x, target=1)
    assert got.dtype == jnp.bfloat16
    wide = jax.tree.map(lambda a: a.astype(jnp.float32), (params, x))
    for reference in (dense(params, x, target=1), dense(*wide, target=1)):
        assert np.corrcoef(np.ravel(got.astype(np.float32)), np.ravel(reference.astype(np.float32)))[0, 1] > 0.999
