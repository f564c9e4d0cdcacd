"""Attention in memory linear in the sequence length, for training, `jax.grad` and LRP alike.

`blockwise_attention` computes what `jax.nn.dot_product_attention` computes (the same
arguments, the same layout), one block of queries at a time: `lax.map` over query blocks of
`jax.checkpoint`ed dense rows,

    S = scale · Q_b Kᵀ (+ bias_b, masked),   A = softmax(S),   O_b = A V,

so that no step holds more than `block_size × S` scores per head, the causal mask is made per
block from positions (never a T × T array), and what the backward pass holds is the queries,
keys and values (T × d), not the scores. It is plain JAX: jaxlrp plans its body like any
attention (rows `bilinear`, `softmax`, `bilinear` under AttnLRP; the attention weights held
under CP-LRP, [Achtibat2024]) and the relevance of each query row depends on that row alone,
while the relevance of a key or value sums over every query block, as it sums over every query
in the dense computation. The map equals the dense one to float rounding; only the order of the
sums over query blocks differs.

With `axis_name`, inside `jax.shard_map` over a sequence sharded along that mesh axis (self-
attention: each device holds as many queries as keys): each device keeps its own queries and
gathers the keys and values of every device (T × d per device), the causal mask offset by the
device's position; a bias or mask then spans the gathered keys. Relevance of the gathered keys
and values returns to the device that holds them (the transpose of the gather sums over
devices).

The scores and the softmax are computed in float32 at least (as `jax.nn.dot_product_attention`
does for bfloat16), the weights cast back to the values' dtype.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax

__all__ = ["blockwise_attention", "flax_attention_fn"]


def blockwise_attention(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    bias: jax.Array | None = None,
    mask: jax.Array | None = None,
    *,
    scale: float | None = None,
    is_causal: bool = False,
    block_size: int = 512,
    axis_name: str | None = None,
) -> jax.Array:
    """Scaled dot-product attention, query block by query block.

    Args:
      query: `(B, T, N, H)` (batch, query positions, heads, head dim), or `(T, N, H)`.
      key, value: `(B, S, K, H)`; `N` a multiple of `K` (grouped-query attention).
      bias: added to the scores, broadcastable to `(B, N, T, S)`.
      mask: boolean, broadcastable to `(B, N, T, S)`: False where a query may not attend.
      scale: the scores' factor; default `1 / sqrt(H)`.
      is_causal: query `t` attends to keys `≤ t` (offset by the device's shard with
        `axis_name`).
      block_size: queries per block (the last block padded); memory per step grows with it.
      axis_name: a mesh axis the sequence is sharded along (inside `jax.shard_map`).

    Returns:
      `(B, T, N, H)`, the attention output, as `jax.nn.dot_product_attention` gives it.
    """
    if query.ndim == 3:
        squeeze = lambda a: None if a is None else a[None]  # noqa: E731
        out = blockwise_attention(squeeze(query), squeeze(key), squeeze(value), bias, mask, scale=scale,
                                  is_causal=is_causal, block_size=block_size, axis_name=axis_name)
        return out[0]
    if query.ndim != 4 or key.shape != value.shape[:-1] + (key.shape[-1],) or key.ndim != 4:
        raise ValueError(
            f"jaxlrp.attention.blockwise_attention: query (B, T, N, H), key and value (B, S, K, H); got "
            f"query {query.shape}, key {key.shape}, value {value.shape}."
        )
    batch, length, heads, depth = query.shape
    kv_heads = key.shape[2]
    if heads % kv_heads or key.shape[0] != batch or key.shape[-1] != depth:
        raise ValueError(
            f"jaxlrp.attention.blockwise_attention: the keys' heads ({kv_heads}) must divide the queries' "
            f"({heads}), with the same batch and head dim; got query {query.shape}, key {key.shape}."
        )
    scale = 1.0 / depth**0.5 if scale is None else scale
    offset = 0
    if axis_name is not None:
        offset = lax.axis_index(axis_name) * length
        key, value = (lax.all_gather(a, axis_name, axis=1, tiled=True) for a in (key, value))
    size = min(block_size, length)
    blocks = -(-length // size)
    padded = blocks * size - length
    q = jnp.pad(query, ((0, 0), (0, padded), (0, 0), (0, 0))) if padded else query
    q = jnp.moveaxis(q.reshape(batch, blocks, size, heads, depth), 1, 0)
    groups = heads // kv_heads
    for name, a in (("bias", bias), ("mask", mask)):
        _check_broadcastable(name, a, (batch, heads, length, key.shape[1]))
    (bias, bias_rows), (mask, mask_rows) = (_split(a, padded, blocks, size) for a in (bias, mask))
    starts = offset + size * jnp.arange(blocks)

    @jax.checkpoint
    def rows(args):
        q_block, start, bias_block, mask_block = args
        bias_block = bias if bias_block is None else bias_block
        mask_block = mask if mask_block is None else mask_block
        q_block = q_block.reshape(batch, size, kv_heads, groups, depth)
        # Scores and softmax at least in float32, as jax.nn.dot_product_attention computes them
        wide = jnp.promote_types(q_block.dtype, jnp.float32)
        scores = jnp.einsum("btkgh,bskh->bkgts", q_block, key, preferred_element_type=wide) * jnp.asarray(scale, wide)
        scores = scores.reshape(batch, heads, size, key.shape[1])
        if bias_block is not None:
            scores = scores + bias_block
        keep = _keep(mask_block, is_causal, start, size, key.shape[1])
        if keep is not None:
            scores = jnp.where(keep, scores, jnp.finfo(scores.dtype).min)
        weights = jax.nn.softmax(scores, axis=-1).astype(value.dtype)
        weights = weights.reshape(batch, kv_heads, groups, size, key.shape[1])
        return jnp.einsum("bkgts,bskh->btkgh", weights, value).reshape(batch, size, heads, depth)

    out = lax.map(rows, (q, starts, bias_rows, mask_rows))
    out = jnp.moveaxis(out, 0, 1).reshape(batch, blocks * size, heads, depth)
    return out[:, :length] if padded else out


def _check_broadcastable(name: str, a, shape: tuple[int, ...]) -> None:
    if a is None:
        return
    have = tuple(jnp.shape(a))
    padded = (1,) * (len(shape) - len(have)) + have
    if len(have) > len(shape) or any(h not in (1, n) for h, n in zip(padded, shape)):
        raise ValueError(
            f"jaxlrp.attention.blockwise_attention: {name} must broadcast to (B, N, T, S) = {shape} (the keys "
            f"gathered over the mesh axis with axis_name); got shape {have}."
        )


def _split(a, padded: int, blocks: int, size: int):
    """`(whole, per block)` of a bias or mask broadcastable to `(B, N, T, S)`: one without a query
    axis (size 1 there: a padding mask) is used whole by every block; one with it is split along
    it into `(blocks, ..., size, S)`."""
    if a is None:
        return None, None
    a = jnp.asarray(a)
    a = a.reshape((1,) * (4 - a.ndim) + a.shape)
    if a.shape[2] == 1:
        return a, None
    if padded:
        a = jnp.pad(a, ((0, 0), (0, 0), (0, padded), (0, 0)), constant_values=False if a.dtype == jnp.bool_ else 0)
    return None, jnp.moveaxis(a.reshape(a.shape[:2] + (blocks, size) + a.shape[3:]), 2, 0)


def _keep(mask_block, is_causal: bool, start, size: int, keys: int):
    """Where a query of the block may attend: the mask's block and, when causal, keys ≤ the
    query's position; None when everything is kept."""
    keep = mask_block
    if is_causal:
        rows = start + lax.broadcasted_iota(jnp.int32, (size, keys), 0)
        causal = rows >= lax.broadcasted_iota(jnp.int32, (size, keys), 1)
        keep = causal if keep is None else keep & causal
    return keep


def flax_attention_fn(*, is_causal: bool = False, block_size: int = 512) -> Callable:
    """An `attention_fn` for Flax's `nn.MultiHeadDotProductAttention` (and `nn.SelfAttention`)
    that computes it blockwise: `nn.MultiHeadDotProductAttention(..., attention_fn=
    flax_attention_fn(is_causal=True))`, called without a mask for causal attention in linear
    memory (a `mask=` passed to the module still works, as a `(B, 1, T, S)` array). Dropout on
    the attention weights and `sow_weights=True` are not supported: either is an error. Flax's
    `precision` and `force_fp32_for_softmax` do not reach it (the scores and softmax are always
    computed in float32 at least)."""

    def attention(query, key, value, bias=None, mask=None, *, dropout_rate=0.0, deterministic=True, dtype=None,
                  module=None, **_):
        if module is not None:  # Flax passes the module only to sow the attention weights
            raise ValueError("jaxlrp.attention.flax_attention_fn: sow_weights=True is not supported (the blockwise "
                             "computation never holds the attention weights); call the module without it.")
        if dropout_rate > 0 and not deterministic:
            raise ValueError("jaxlrp.attention.flax_attention_fn: dropout on the attention weights is not supported; "
                             "call the module with deterministic=True (as when explaining) or dropout_rate=0.")
        if dtype is not None:
            query, key, value = (a.astype(dtype) for a in (query, key, value))
        return blockwise_attention(query, key, value, bias, mask, is_causal=is_causal, block_size=block_size)

    return attention
