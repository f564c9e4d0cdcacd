"""Products of two activations are rule-table rows of kind "product": `rules.Uniform()` (half
to each operand, the default) or `rules.SignalTakeAll()` (the gate takes none [Arras2017])."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxlrp
from jaxlrp import composites, rules

DENSE = composites.LayerMap({"dense": rules.Epsilon(1e-12)}, stabilizer=1e-12)
TAKE_ALL = composites.combine(composites.LayerMap({"product": rules.SignalTakeAll()}), DENSE)


def gated(params, x):
    """A gate times a signal, then a dense readout: `(σ(x·G) ⊙ x·H)·O`."""
    return (jax.nn.sigmoid(x @ params["gate"]) * (x @ params["signal"])) @ params["out"]


def _gated_setup():
    rng = np.random.default_rng(0)
    params = {k: jnp.asarray(rng.normal(size=s)) for k, s in
              {"gate": (5, 4), "signal": (5, 4), "out": (4, 3)}.items()}
    return params, jnp.asarray(rng.normal(size=(2, 5)))


def _epsilon0(x, w, relevance):
    """The ε rule (ε → 0) on `z = x·w`, in NumPy: `R_x = x ⊙ (R / z)·wᵀ`."""
    return x * ((relevance / (x @ w)) @ w.T)


@pytest.mark.float64
@pytest.mark.parametrize("rule", ["Uniform", "SignalTakeAll"])
def test_closed_forms(rule):
    params, x = _gated_setup()
    p = {k: np.asarray(v) for k, v in params.items()}
    xs = np.asarray(x)
    target = 1
    gate, signal = 1 / (1 + np.exp(-(xs @ p["gate"]))), xs @ p["signal"]
    r_product = gate * signal * p["out"][:, target]  # the ε rule with the logit as the seed
    if rule == "Uniform":
        expected = _epsilon0(xs, p["signal"], r_product / 2) + _epsilon0(xs, p["gate"], r_product / 2)  # σ: Pass
    else:
        expected = _epsilon0(xs, p["signal"], r_product)  # the gate takes nothing
    composite = DENSE if rule == "Uniform" else TAKE_ALL
    relevance = jaxlrp.lrp_fn(gated, composite)(params, x, target=target)
    np.testing.assert_allclose(relevance, expected, rtol=1e-9)
    # Both conserve: with no bias, the relevance adds up to the logit.
    np.testing.assert_allclose(relevance.sum(-1), np.asarray(gated(params, x))[:, target], rtol=1e-9)


def test_a_product_is_a_row_of_the_table_and_the_gate_is_named():
    params, x = _gated_setup()
    table = jaxlrp.rule_table(gated, TAKE_ALL, params, x)
    rows = [(info.kind, repr(rule), info.gates) for info, rule in zip(table.layers, table.rules)]
    assert ("product", "SignalTakeAll()", (0,)) in rows
    assert "gate" in str(table).splitlines()[0] and "input 0" in str(table)
    default = jaxlrp.rule_table(gated, DENSE, params, x)
    assert [repr(r) for r, info in zip(default.rules, default.layers) if info.kind == "product"] == ["Uniform()"]


class Recurrent(nn.Module):
    cell: str

    @nn.compact
    def __call__(self, x):
        cell = {"lstm": nn.LSTMCell, "optimized_lstm": nn.OptimizedLSTMCell, "gru": nn.GRUCell}[self.cell](4)
        return nn.Dense(2)(nn.RNN(cell)(x)[:, -1])


@pytest.mark.parametrize("cell", ["lstm", "optimized_lstm", "gru"])
def test_every_product_of_a_recurrent_cell_has_its_gate_found(cell):
    """LSTM: f⊙c, i⊙g, o⊙tanh(c); GRU: r⊙(W·h), (1 − z)⊙n, z⊙h: each product's gate is
    found (a sigmoid, or one minus it), so SignalTakeAll resolves, jitted and batched alike."""
    model = Recurrent(cell)
    x = jax.random.normal(jax.random.PRNGKey(0), (3, 5, 3))
    variables = model.init(jax.random.PRNGKey(1), x)
    table = jaxlrp.rule_table(model, composites.combine(TAKE_ALL, composites.EpsilonPlus()), variables, x)
    products = [info for info in table.layers if info.kind == "product"]
    assert len(products) == 3 and all(len(info.gates) == 1 for info in products), products
    composite = composites.combine(composites.LayerMap({"product": rules.SignalTakeAll()}), composites.EpsilonPlus())
    explain = jaxlrp.lrp(model, composite)
    relevance = jax.jit(explain)(variables, x, target=1)
    np.testing.assert_allclose(relevance, explain(variables, x, target=1), rtol=2e-5, atol=1e-6)
    per_sample = jax.vmap(lambda xi: explain(variables, xi[None], target=1)[0])(x)
    np.testing.assert_allclose(per_sample, relevance, rtol=2e-5, atol=1e-6)
    uniform = jaxlrp.lrp(model, composites.EpsilonPlus())(variables, x, target=1)
    assert not np.allclose(uniform, relevance)  # the rule in the table is the rule that runs


def test_take_all_on_a_product_without_a_gate_is_an_error():
    """A SiLU-gated MLP's branches (`silu(x·G) ⊙ x·U`): no sigmoid, so no gate to hold."""

    def swiglu(params, x):
        return (jax.nn.silu(x @ params["gate"]) * (x @ params["signal"])) @ params["out"]

    params, x = _gated_setup()
    with pytest.raises(ValueError, match="SignalTakeAll at layer '<root>' .* found 0 gate operands"):
        jaxlrp.rule_table(swiglu, TAKE_ALL, params, x)
    with pytest.raises(ValueError, match="SignalTakeAll at layer"):
        jaxlrp.lrp_fn(swiglu, TAKE_ALL)(params, x)


def _gated_mlp(params, x, held=False):
    """A SiLU-gated MLP `(silu(x·G) ⊙ x·U)·O`; `held`: its gate branch under a stop_gradient,
    as LXT's CP-LRP writes Llama's MLP."""
    gate = jax.nn.silu(x @ params["gate"])
    if held:
        gate = jax.lax.stop_gradient(gate)
    return (gate * (x @ params["signal"])) @ params["out"]


@pytest.mark.float64
def test_cplrp_holds_a_gated_mlps_activated_branch_as_lxt_does():
    params, x = _gated_setup()
    table = jaxlrp.rule_table(_gated_mlp, composites.CPLRP(epsilon=1e-10), params, x)
    (product,) = [(info, rule) for info, rule in zip(table.layers, table.rules) if info.kind == "product"]
    assert product[0].activated == (0,) and repr(product[1]) == "HoldActivated()"
    assert "input 0 (activated)" in str(table)
    relevance = jaxlrp.lrp_fn(_gated_mlp, composites.CPLRP(epsilon=1e-10))(params, x, target=1)
    stopped = jaxlrp.lrp_fn(lambda p, x: _gated_mlp(p, x, held=True), composites.CPLRP(epsilon=1e-10))(params, x, target=1)
    np.testing.assert_allclose(relevance, stopped, rtol=1e-7, atol=1e-12)
    # without the hold, the product splits evenly, as under AttnLRP
    even = jaxlrp.lrp_fn(_gated_mlp, composites.CPLRP(epsilon=1e-10, hold_gate=False))(params, x, target=1)
    np.testing.assert_allclose(even, jaxlrp.lrp_fn(_gated_mlp, composites.AttnLRP(epsilon=1e-10))(params, x, target=1),
                               rtol=1e-12)
    assert not np.allclose(even, relevance, rtol=1e-3)
    # the bias-free block conserves either way
    for r in (relevance, even):
        np.testing.assert_allclose(r.sum(-1), np.asarray(_gated_mlp(params, x))[:, 1], rtol=1e-7, atol=1e-9)


def test_hold_gated_mlp_leaves_sigmoid_gates_and_other_layers_alone():
    params, x = _gated_setup()
    composite = composites.combine(composites.HoldGatedMLP(), composites.EpsilonPlus())
    rules_by_kind = {info.kind: repr(rule) for info, rule in
                     zip(*(lambda t: (t.layers, t.rules))(jaxlrp.rule_table(gated, composite, params, x)))}
    assert rules_by_kind["product"] == "Uniform()" and rules_by_kind["dense"].startswith("Epsilon")
    with pytest.raises(ValueError, match="HoldActivated at layer '<root>' .* found 0 activated operands"):
        bilinear = lambda p, x: ((x @ p["gate"]) * (x @ p["signal"])) @ p["out"]  # noqa: E731 (no activation)
        jaxlrp.rule_table(bilinear, composites.combine(composites.LayerMap({"product": rules.HoldActivated()}), DENSE),
                          params, x)
    with pytest.raises(ValueError, match="HoldActivated needs"):
        rules.HoldActivated()(jaxlrp.Layer(lambda i, w: i[0] * i[1], None, jnp.ones(3)), (jnp.ones(3), jnp.ones(3)),
                              jnp.ones(3))
