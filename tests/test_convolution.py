"""`jaxlrp._ops.convolution`: im2col + matmul equals `lax.conv_general_dilated`, forward and VJP,
and jaxlrp's maps are the same with and without it (float64, 1e-12)."""

import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import jaxlrp
from jaxlrp import composites
from jaxlrp._ops import convolution

sys.path.insert(0, str(Path(__file__).parent))
import cnns  # noqa: E402

pytestmark = pytest.mark.float64

# (input shape, kernel shape, lax keyword arguments): layouts from the dimension numbers.
CONFIGS = {
    "nhwc-same": ((2, 5, 6, 4), (3, 3, 4, 6), dict(window_strides=(1, 1), padding="SAME",
                                                   dimension_numbers=("NHWC", "HWIO", "NHWC"))),
    "2x2-pad1": ((3, 2, 2, 8), (3, 3, 8, 5), dict(window_strides=(1, 1), padding=((1, 1), (1, 1)),
                                                  dimension_numbers=("NHWC", "HWIO", "NHWC"))),
    "1x1-pad1": ((2, 1, 1, 6), (3, 3, 6, 4), dict(window_strides=(1, 1), padding=((1, 1), (1, 1)),
                                                  dimension_numbers=("NHWC", "HWIO", "NHWC"))),
    "nchw-explicit-dilated-groups": ((2, 4, 9, 8), (6, 2, 3, 2), dict(
        window_strides=(2, 1), padding=((1, 2), (0, -1)), rhs_dilation=(2, 1), feature_group_count=2,
        dimension_numbers=("NCHW", "OIHW", "NCHW"))),
    "valid-stride3": ((2, 7, 8, 3), (2, 2, 3, 4), dict(window_strides=(3, 3), padding="VALID",
                                                       dimension_numbers=("NHWC", "HWIO", "NHWC"))),
    "depthwise-strided": ((2, 7, 6, 4), (3, 3, 1, 4), dict(window_strides=(2, 2), padding="VALID",
                                                           rhs_dilation=(1, 2), feature_group_count=4,
                                                           dimension_numbers=("NHWC", "HWIO", "NHWC"))),
    "depthwise-multiplier": ((2, 5, 5, 3), (3, 3, 1, 6), dict(window_strides=(1, 1), padding="SAME",
                                                              feature_group_count=3,
                                                              dimension_numbers=("NHWC", "HWIO", "NHWC"))),
    "mixed-layouts": ((5, 3, 4, 2), (3, 4, 2, 3), dict(window_strides=(1, 2), padding=((2, 0), (1, 1)),
                                                       dimension_numbers=("HWCN", "OIHW", "CNHW"))),
    "1d-nwc-same-stride2": ((2, 7, 3), (3, 3, 5), dict(window_strides=(2,), padding="SAME",
                                                       dimension_numbers=("NWC", "WIO", "NWC"))),
    "1d-ncw-1x1": ((3, 4, 5), (6, 4, 1), dict(window_strides=(1,), padding="VALID",
                                              dimension_numbers=("NCW", "OIW", "NCW"))),
    "3d-ndhwc": ((2, 3, 5, 4, 2), (2, 3, 1, 2, 3), dict(window_strides=(1, 2, 1), padding=((1, 0), (1, 1), (0, 2)),
                                                       dimension_numbers=("NDHWC", "DHWIO", "NDHWC"))),
    "3d-ncdhw-groups": ((1, 6, 3, 3, 4), (9, 2, 2, 2, 3), dict(window_strides=(1, 1, 1), padding="SAME",
                                                              rhs_dilation=(1, 2, 1), feature_group_count=3,
                                                              dimension_numbers=("NCDHW", "OIDHW", "NCDHW"))),
    "precision-default-layout": ((2, 3, 5, 5), (4, 3, 3, 3), dict(window_strides=(1, 1), padding="SAME",
                                                                  precision=lax.Precision.HIGHEST)),
}


@pytest.fixture
def always(monkeypatch):
    """The dispatch takes the patches wherever they are supported (any shape, any backend)."""
    monkeypatch.setattr(convolution, "wins", lambda *args: True)
    monkeypatch.setattr(convolution, "ENABLED", True)


def _draw(name):
    lhs, rhs, kwargs = CONFIGS[name]
    rng = np.random.default_rng(len(name))
    return jnp.asarray(rng.normal(size=lhs)), jnp.asarray(rng.normal(size=rhs)), kwargs


def _close(a, b):
    assert a.shape == b.shape and a.dtype == b.dtype
    np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12 * float(jnp.abs(b).max()))


def _primitives(fn, *args) -> set:
    return {eqn.primitive.name for eqn in jax.make_jaxpr(fn)(*args).jaxpr.eqns}


@pytest.mark.parametrize("name", CONFIGS)
def test_forward_equals_lax(name, always):
    lhs, rhs, kwargs = _draw(name)
    ours = lambda x, w: convolution.conv_general_dilated(x, w, **kwargs)  # noqa: E731
    assert "conv_general_dilated" not in _primitives(ours, lhs, rhs)  # the patches, not lax
    _close(jax.jit(ours)(lhs, rhs), lax.conv_general_dilated(lhs, rhs, **kwargs))


@pytest.mark.parametrize("name", CONFIGS)
def test_vjp_equals_lax(name, always):
    lhs, rhs, kwargs = _draw(name)
    ours = lambda x, w: convolution.conv_general_dilated(x, w, **kwargs)  # noqa: E731
    theirs = lambda x, w: lax.conv_general_dilated(x, w, **kwargs)  # noqa: E731
    out, vjp = jax.vjp(theirs, lhs, rhs)
    cotangent = jnp.asarray(np.random.default_rng(1).normal(size=out.shape))
    for a, b in zip(jax.jit(lambda x, w, c: jax.vjp(ours, x, w)[1](c))(lhs, rhs, cotangent), vjp(cotangent)):
        _close(a, b)


def test_preferred_element_type(always):
    for name in ("nhwc-same", "depthwise-strided"):
        _, _, kwargs = CONFIGS[name]
        lhs, rhs = (a.astype(jnp.float32) for a in _draw(name)[:2])
        ours = convolution.conv_general_dilated(lhs, rhs, **kwargs, preferred_element_type=jnp.float64)
        _close(ours, lax.conv_general_dilated(lhs, rhs, **kwargs, preferred_element_type=jnp.float64))


def test_vmap(always):
    lhs, rhs, kwargs = _draw("nchw-explicit-dilated-groups")
    ours = jax.vmap(lambda x: convolution.conv_general_dilated(x, rhs, **kwargs))(lhs[:, None])
    _close(ours, jax.vmap(lambda x: lax.conv_general_dilated(x, rhs, **kwargs))(lhs[:, None]))


def test_unsupported_falls_back_to_lax(always):
    lhs, rhs, kwargs = _draw("nhwc-same")
    kwargs = {**kwargs, "padding": ((1, 1), (2, 0)), "lhs_dilation": (2, 1)}  # a transposed convolution
    ours = lambda x, w: convolution.conv_general_dilated(x, w, **kwargs)  # noqa: E731
    assert "conv_general_dilated" in _primitives(ours, lhs, rhs)
    _close(ours(lhs, rhs), lax.conv_general_dilated(lhs, rhs, **kwargs))


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the rewrite is for XLA:CPU; elsewhere it is never used")
def test_dispatch():
    """On CPU: the 2x2-pixel 3x3 convolution and depthwise ones, not the large-image ones, not
    4 groups, nothing when switched off."""
    def decides(lhs, rhs, groups=1, padding=1, enabled=True, traced=False):
        numbers = lax.conv_dimension_numbers(lhs, rhs, ("NHWC", "HWIO", "NHWC"))
        params = dict(window_strides=(1, 1), padding=((padding, padding),) * 2, lhs_dilation=(1, 1),
                      rhs_dilation=(1, 1), dimension_numbers=numbers, feature_group_count=groups, batch_group_count=1)
        old, convolution.ENABLED = convolution.ENABLED, enabled
        decided = []
        try:
            decide = lambda x, w: decided.append(convolution.use_patches(x, w, **params))  # noqa: E731
            (jax.jit(decide) if traced else decide)(jnp.zeros(lhs, jnp.float32), jnp.zeros(rhs, jnp.float32))
        finally:
            convolution.ENABLED = old
        return decided[0]

    assert decides((32, 2, 2, 256), (3, 3, 256, 256), traced=True)  # the default backend: CPU
    assert decides((32, 2, 2, 256), (3, 3, 256, 256))
    assert decides((1, 1, 1, 64), (3, 3, 64, 64))
    assert not decides((32, 4, 4, 256), (3, 3, 256, 256))
    assert not decides((32, 32, 32, 32), (3, 3, 32, 32))
    assert decides((32, 32, 32, 32), (3, 3, 1, 32), groups=32)
    assert not decides((32, 2, 2, 256), (3, 3, 64, 256), groups=4)
    assert not decides((32, 2, 2, 256), (3, 3, 256, 256), enabled=False)


def _vgg_maps(enabled: bool, monkeypatch):
    monkeypatch.setattr(convolution, "ENABLED", enabled)
    used = []
    patches_conv = convolution.patches_conv
    monkeypatch.setattr(convolution, "patches_conv", lambda *a, **k: used.append(1) or patches_conv(*a, **k))
    model, variables = cnns.make("vgg16", 4, dtype=jnp.float64)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 32, 32, 3)))
    explain = jaxlrp.lrp(model, composites.EpsilonGammaBox(-3.0, 3.0))  # a new function: traced anew
    return explain(variables, x), len(used)


def test_vgg_map_same_with_and_without(monkeypatch):
    """EpsilonGammaBox on the VGG (its last stage at 2x2 pixels): the rewrite is used and changes
    nothing."""
    with_patches, used = _vgg_maps(True, monkeypatch)
    without, unused = _vgg_maps(False, monkeypatch)
    assert used >= 3 and unused == 0  # the 2x2 stage's three convolutions (and the rules' own)
    _close(with_patches, without)


def test_depthwise_in_bfloat16_accumulates_as_xla_does():
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 8, 8, 64), jnp.bfloat16)
    w = jax.random.normal(jax.random.PRNGKey(1), (5, 5, 1, 64), jnp.bfloat16)
    call = dict(window_strides=(1, 1), padding=((2, 2), (2, 2)), rhs_dilation=(1, 1), feature_group_count=64,
                dimension_numbers=lax.conv_dimension_numbers(x.shape, w.shape, ("NHWC", "HWIO", "NHWC")))
    exact = lax.conv_general_dilated(x.astype(jnp.float32), w.astype(jnp.float32), **call)
    ours = convolution.patches_conv(x, w, **call)
    assert ours.dtype == jnp.bfloat16
    xla = lax.conv_general_dilated(x, w, **call)
    error = lambda y: float(jnp.mean(jnp.abs(y.astype(jnp.float32) - exact)))  # noqa: E731
    assert error(ours) <= 1.2 * error(xla), (error(ours), error(xla))
