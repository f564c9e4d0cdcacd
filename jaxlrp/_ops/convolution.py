"""Convolutions as patch extraction plus a matmul, where XLA:CPU's own convolution is slow.

XLA:CPU computes some `conv_general_dilated`s very slowly: a 3x3, 256->256 convolution on 2x2
pixels (padding 1) at batch 32 takes 33 ms where PyTorch takes 2.5 ms and XLA itself 6 ms at
4x4 pixels; depthwise convolutions 20-50x slower than elementwise code. jaxlrp re-runs the
model's program node by node (`_program.Node.bind`), so it may compute each convolution any
way that gives the same values (`_program.REWRITES`): `patches_conv` pads the input, takes one
strided slice per kernel offset and contracts their concatenation (im2col) with the kernel in
one `dot_general` (depthwise: sums the slices times the kernel's taps, one elementwise fusion).
Its VJP, the transposed convolution that every rule computes through `jax.vjp`, is then a
matmul plus pads, where XLA's is again the slow convolution. No custom VJP: `jvp`, `vmap` and
higher derivatives go through it as through any `jnp` code.

`conv_general_dilated(lhs, rhs, ...)` takes `lax.conv_general_dilated`'s arguments and equals it
(up to rounding: the sums run in another order) for any dimension numbers, window strides,
padding, `rhs_dilation`, `feature_group_count` (depthwise included), `precision` and
`preferred_element_type`; with `lhs_dilation`, `batch_group_count` or `out_sharding` it is
`lax`'s. `use_patches` is the dispatch: on CPU, for the shapes where it measured faster
(`wins`, with the figures of `benchmarks/bench_conv.py`).

Switch it off with the environment variable `JAXLRP_CONV_PATCHES=0` (read at import) or
`jaxlrp._ops.convolution.ENABLED = False` (read when a relevance function is traced: one traced
before keeps what it was traced with; make a new one with `jaxlrp.lrp` or call its
`clear_cache()`).
"""

from __future__ import annotations

import functools
import itertools
import math
import operator
import os

import jax
import jax.numpy as jnp
from jax import lax

from jaxlrp import _program

ENABLED = os.environ.get("JAXLRP_CONV_PATCHES", "1").strip().lower() not in ("0", "false", "no", "off")


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                         dimension_numbers=None, feature_group_count=1, batch_group_count=1, precision=None,
                         preferred_element_type=None, out_sharding=None):
    """`lax.conv_general_dilated(...)`, computed by `patches_conv` where `use_patches` says it is
    faster, else by `lax` itself."""
    nd = lhs.ndim - 2
    if any(d != 1 for d in lhs_dilation or ()) or batch_group_count != 1 or out_sharding is not None:
        return lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                                        dimension_numbers, feature_group_count, batch_group_count, precision,
                                        preferred_element_type, out_sharding=out_sharding)
    numbers = lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
    lhs_dilation = (1,) * nd
    rhs_dilation = tuple(rhs_dilation or (1,) * nd)
    if isinstance(padding, str):
        in_spatial = [lhs.shape[d] for d in numbers.lhs_spec[2:]]
        kernel = [(rhs.shape[d] - 1) * r + 1 for d, r in zip(numbers.rhs_spec[2:], rhs_dilation)]
        padding = lax.padtype_to_pads(in_spatial, kernel, window_strides, padding)
    padding = tuple((int(lo), int(hi)) for lo, hi in padding)
    call = dict(window_strides=tuple(window_strides), padding=padding, lhs_dilation=lhs_dilation,
                rhs_dilation=rhs_dilation, dimension_numbers=numbers, feature_group_count=feature_group_count,
                batch_group_count=batch_group_count, precision=precision,
                preferred_element_type=preferred_element_type)
    return patches_conv(lhs, rhs, **call) if use_patches(lhs, rhs, **call) else lax.conv_general_dilated(lhs, rhs, **call)


def supported(lhs_dilation, batch_group_count, out_spatial) -> bool:
    return all(d == 1 for d in lhs_dilation) and batch_group_count == 1 and all(n > 0 for n in out_spatial)


def _out_spatial(lhs_shape, rhs_shape, window_strides, padding, rhs_dilation, numbers):
    return tuple(
        (lhs_shape[i] + lo + hi - (rhs_shape[k] - 1) * r - 1) // s + 1
        for i, k, s, (lo, hi), r in zip(numbers.lhs_spec[2:], numbers.rhs_spec[2:], window_strides, padding,
                                        rhs_dilation))


def use_patches(lhs, rhs, *, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
                feature_group_count, batch_group_count, **_) -> bool:
    """Whether `patches_conv` is used: switched on, on CPU, supported, and a shape where it won."""
    if not ENABLED or not _on_cpu(lhs):
        return False
    out = _out_spatial(lhs.shape, rhs.shape, window_strides, padding, rhs_dilation, dimension_numbers)
    if not supported(lhs_dilation, batch_group_count, out):
        return False
    return wins(lhs.shape, rhs.shape, out, dimension_numbers, feature_group_count)


def wins(lhs_shape, rhs_shape, out_spatial, numbers, groups) -> bool:
    """The shapes where `patches_conv` measured faster than XLA:CPU (`benchmarks/bench_conv.py`,
    float32, batch 1/32/128, 2 cores; ratios patches ÷ XLA, forward / VJP):

    * fewer output positions than kernel taps, no groups: XLA:CPU's slow case. 3x3 256->256
      on 2x2 pixels (padding 1): 0.06 / 0.08 at batch 32 (33 against 2 ms), 0.30 / 0.20 at
      batch 1; 5x5 on 4x4: 0.09; 3x3x3 on 2x2x2: 0.27; 3x3 on 1x1: 0.27-0.56. Where the
      output has as many positions as the kernel or more (4x4 pixels and up under a 3x3
      kernel) XLA is as fast or up to 4x faster (the im2col buffer costs memory traffic), so
      it keeps those. The buffer is capped at 32x the input.
    * depthwise with one output per group (`feature_group_count` = input features = output
      features): XLA:CPU's grouped convolution is a loop; the elementwise form (one fusion) is
      0.02-0.15 forward and 0.01-0.18 VJP from 2x2 to 32x32 pixels at batch 1 to 128.
    * other groups (4, 32 groups at 2x2: 0.83-2.2 forward) and depth multipliers > 1 (VJP
      2.5): XLA."""
    lhs_spec, rhs_spec, _ = numbers
    channels, outputs = lhs_shape[lhs_spec[1]], rhs_shape[rhs_spec[0]]
    kernel = math.prod(rhs_shape[d] for d in rhs_spec[2:])
    if groups > 1:
        return groups == channels == outputs
    inputs = math.prod(lhs_shape[d] for d in lhs_spec[2:])
    positions = math.prod(out_spatial)
    return positions < kernel and positions * kernel <= 32 * inputs


def _on_cpu(x) -> bool:
    try:
        devices = x.devices()  # a concrete array
    except Exception:  # a tracer: the device jit compiles for, jax.default_device's or the default backend's
        device = jax.config.jax_default_device
        if device is None:
            return jax.default_backend() == "cpu"
        return (device if isinstance(device, str) else device.platform) == "cpu"
    return all(d.platform == "cpu" for d in devices)


def patches_conv(lhs, rhs, *, window_strides, padding, rhs_dilation, dimension_numbers, feature_group_count,
                 precision=None, preferred_element_type=None, **_):
    """`lax.conv_general_dilated` (no lhs dilation, one batch group) as im2col and a matmul.

    The input goes to (N, spatial..., C) and is padded; one strided slice per kernel offset
    (K of them) gives (N, out..., C) each; the kernel goes to (K..., C/G, O). One group: the
    slices concatenated to (N, out..., K·C) times the kernel as (K·C, O). Depthwise (G = C):
    the sum over offsets of slice·kernel tap, elementwise. Other groups: the slices stacked to
    (N, out..., K, G, C/G), contracted over (K, C/G) with the kernel as (K, C/G, G, O/G), G a
    batch dimension. The result goes to the output's layout."""
    lhs_spec, rhs_spec, out_spec = dimension_numbers
    nd = len(lhs_spec) - 2
    out = _out_spatial(lhs.shape, rhs.shape, window_strides, padding, rhs_dilation, dimension_numbers)
    x = jnp.transpose(lhs, (lhs_spec[0], *lhs_spec[2:], lhs_spec[1]))
    w = jnp.transpose(rhs, (*rhs_spec[2:], rhs_spec[1], rhs_spec[0]))  # K..., C/G, O
    x = lax.pad(x, jnp.zeros((), x.dtype), [(0, 0, 0), *((lo, hi, 0) for lo, hi in padding), (0, 0, 0)])
    batch, channels = x.shape[0], x.shape[-1]
    kernel = w.shape[:nd]
    slices = []
    for offset in itertools.product(*map(range, kernel)):
        start = [o * r for o, r in zip(offset, rhs_dilation)]
        limit = [b + (n - 1) * s + 1 for b, n, s in zip(start, out, window_strides)]
        slices.append(lax.slice(x, (0, *start, 0), (batch, *limit, channels), (1, *window_strides, 1)))
    groups = feature_group_count
    k = math.prod(kernel)
    outputs = w.shape[-1]
    if groups == channels and groups > 1:  # depthwise: elementwise products summed, one fusion
        result = preferred_element_type or jnp.result_type(lhs, rhs)
        dtype = jnp.promote_types(result, jnp.float32)  # accumulated at least in float32, as XLA's own
        w = w.reshape(k, groups, outputs // groups).astype(dtype)
        terms = (s[..., None].astype(dtype) * w[i] for i, s in enumerate(slices))
        y = functools.reduce(operator.add, terms).reshape(batch, *out, outputs).astype(result)
    elif groups == 1:
        stacked = slices[0] if k == 1 else jnp.concatenate(slices, axis=-1)  # N, out..., K·C
        y = lax.dot_general(stacked, w.reshape(k * channels, outputs), (((nd + 1,), (0,)), ((), ())),
                            precision=precision, preferred_element_type=preferred_element_type)  # N, out..., O
    else:
        patches = jnp.stack(slices, axis=-2).reshape(batch, *out, k, groups, channels // groups)
        w = w.reshape(k, channels // groups, groups, outputs // groups)
        y = lax.dot_general(patches, w, (((nd + 1, nd + 3), (0, 1)), ((nd + 2,), (2,))), precision=precision,
                            preferred_element_type=preferred_element_type)  # G, N, out..., O/G
        y = jnp.moveaxis(y, 0, -2).reshape(batch, *out, outputs)
    inverse = [0] * (nd + 2)
    for axis, dim in enumerate((out_spec[0], *out_spec[2:], out_spec[1])):
        inverse[dim] = axis
    return jnp.transpose(y, inverse)


def _rewrite(args, params: dict):
    """`_program.REWRITES["conv_general_dilated"]`: `patches_conv` where it wins, else None."""
    lhs, rhs = args
    if params.get("out_sharding") is not None or not use_patches(lhs, rhs, **params):
        return None
    return [patches_conv(lhs, rhs, **params)]


_program.REWRITES["conv_general_dilated"] = _rewrite
