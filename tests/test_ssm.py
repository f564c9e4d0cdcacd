"""MambaLRP on a selective state-space block written as users write it: the selection
parameters Δ, A̅, B and C are held constant, as if the model detached them."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxlrp
from jaxlrp import composites

pytestmark = pytest.mark.float64

D, E, N, T, BATCH = 4, 6, 3, 5, 2


def _params(conv_bias=True):
    rng = np.random.default_rng(0)
    shapes = {"in": (D, 2 * E), "conv": (3, 1, E), "dt": (E, E), "dt_bias": (E,), "B": (E, N), "C": (E, N),
              "A_log": (E, N), "skip": (E,), "out": (E, 3)}
    params = {k: jnp.asarray(rng.normal(size=s) / np.sqrt(s[0])) for k, s in shapes.items()}
    params["conv_bias"] = jnp.asarray(rng.normal(size=E)) if conv_bias else jnp.zeros(E)
    return params, jnp.asarray(rng.normal(size=(BATCH, T, D)))


def mamba(params, x, detach=False):
    """A Mamba block: input projection, causal depthwise conv1d, SiLU, the selective scan by
    `lax.scan`, the skip `D·u`, the output gate `y ⊙ silu(z)`, mean pooling, a readout."""
    held = jax.lax.stop_gradient if detach else (lambda a: a)
    u, z = jnp.split(x @ params["in"], 2, -1)
    u = jax.lax.conv_general_dilated(u, params["conv"], (1,), [(2, 0)], dimension_numbers=("NWC", "WIO", "NWC"),
                                     feature_group_count=E) + params["conv_bias"]
    u = jax.nn.silu(u)
    delta = held(jax.nn.softplus(u @ params["dt"] + params["dt_bias"]))
    b, c = held(u @ params["B"]), held(u @ params["C"])
    decay = held(jnp.exp(delta[..., None] * -jnp.exp(params["A_log"])))
    drive = (delta[..., None] * b[:, :, None, :]) * u[..., None]

    def step(h, inputs):
        decay_t, drive_t, c_t = inputs
        h = decay_t * h + drive_t
        return h, jnp.einsum("ben,bn->be", h, c_t)

    per_step = tuple(a.swapaxes(0, 1) for a in (decay, drive, c))
    _, ys = jax.lax.scan(step, jnp.zeros((x.shape[0], E, N)), per_step)
    y = ys.swapaxes(0, 1) + u * params["skip"]
    return (y * jax.nn.silu(z)).mean(1) @ params["out"]


def test_mamba_lrp_holds_the_selection_parameters():
    params, x = _params()
    table = jaxlrp.rule_table(mamba, composites.MambaLRP(), params, x)
    kinds = [info.kind for info in table.layers]
    assert "bilinear" not in kinds and kinds.count("product") == 1, table  # only the output gate
    assert {info.param for info in table.layers if info.kind == "dense"} == {"['in']", "['out']"}  # B, C, Δ: no relevance
    explain = jaxlrp.lrp_fn(mamba, composites.MambaLRP(epsilon=1e-12))
    detached = jaxlrp.lrp_fn(lambda p, x: mamba(p, x, detach=True), composites.AttnLRP(epsilon=1e-12))
    target = jnp.array([0, 2])
    relevance = explain(params, x, target=target)
    np.testing.assert_allclose(relevance, detached(params, x, target=target), rtol=1e-8, atol=1e-12)
    np.testing.assert_allclose(jax.jit(explain)(params, x, target=target), relevance, rtol=1e-12)
    assert not np.allclose(relevance, jaxlrp.lrp_fn(mamba, composites.AttnLRP(epsilon=1e-12))(params, x, target=target))


def test_mamba_lrp_conserves_on_a_bias_free_block():
    params, x = _params(conv_bias=False)
    params = {**params, "dt_bias": jnp.zeros(E)}  # Δ's bias is held with Δ: it does not matter
    out, relevance = jaxlrp.output_and_lrp(mamba, composites.MambaLRP(epsilon=1e-12))(params, x, target=jnp.array([1, 1]))
    np.testing.assert_allclose(relevance.sum((1, 2)), out[:, 1], rtol=1e-8)
