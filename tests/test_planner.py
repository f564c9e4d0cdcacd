"""The planner on small programs: the analysis of each value, and the plan each spelling of an
operation gets (which nodes form which step, of which kind)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlrp import _analysis
from jaxlrp._ops import base
from jaxlrp._ops.control import ScanStep
from jaxlrp._ops.linear_step import LinearStep
from jaxlrp._ops.products import ProductStep
from jaxlrp._ops.regions import PassStep
from jaxlrp._ops.softmax import SoftmaxStep
from jaxlrp._plan import UnsupportedOperation, make_plan
from jaxlrp._program import from_closed_jaxpr

RNG = np.random.default_rng(0)
W = jnp.asarray(RNG.normal(size=(4, 4)), jnp.float32)
B = jnp.asarray(RNG.normal(size=(4,)), jnp.float32)
X = jnp.asarray(RNG.normal(size=(2, 4)), jnp.float32)


def _plan(fn, *args, hold=()):
    """The plan of `fn(*params, x)` with its last argument explained."""
    program = from_closed_jaxpr(jax.make_jaxpr(fn)(*args))
    flags = [False] * (len(program.inputs) - 1) + [True]
    return make_plan(program, flags, lambda scope: (scope, None), hold=frozenset(hold))


def _rows(plan):
    """`(step class, kind or primitive)` for each step, in program order."""
    rows = []
    for node in plan.program.nodes:
        step = plan.steps.get(node)
        if step is not None:
            rows.append((type(step).__name__, step.info.kind if step.info is not None else node.name))
    return rows


def test_the_flow_of_a_layer_norm_after_a_dense_layer():
    def fn(w, x):
        h = x @ w
        mean = h.mean(-1, keepdims=True)
        var = jnp.square(h - mean).mean(-1, keepdims=True)
        return jax.nn.relu((h - mean) * jax.lax.rsqrt(var + 1e-5))

    program = from_closed_jaxpr(jax.make_jaxpr(fn)(W, X))
    flow = _analysis.analyze(program, [False, True])
    weight, x = program.inputs
    assert flow.is_learned(weight) and not flow.is_learned(x)
    assert flow.carries(x) and not flow.carries(weight)
    h = program.nodes[0].outputs[0]
    assert flow.carries(h) and h not in flow.statistics
    rsqrt = next(n for n in program.nodes if n.name == "rsqrt")
    assert rsqrt.outputs[0] in flow.statistics  # 1/σ is a statistic: held
    assert program.outputs[0] in flow.nonnegative  # a ReLU's output
    assert flow.users(h)[0] is not None and flow.producer[h] is program.nodes[0]


def test_dense_bias_relu_dense():
    plan = _plan(lambda w, b, x: jax.nn.relu(x @ w + b) @ w, W, B, X)
    assert [(cls, kind if cls == "LinearStep" else None) for cls, kind in _rows(plan)] == [
        ("LinearStep", "dense"), ("PassStep", None), ("LinearStep", "dense")]
    first = next(s for s in plan.steps.values() if isinstance(s, LinearStep))
    assert [n.name for n in first.chain] == ["add"]  # the bias is absorbed into the layer


def test_a_batch_norm_in_inference_mode_is_merged_and_a_mean_is_one_averaging_layer():
    scale, shift = jnp.abs(B) + 0.5, B

    def fn(w, scale, shift, x):
        return ((x @ w) * scale + shift).mean(-1)

    plan = _plan(fn, W, scale, shift, X)
    assert _rows(plan) == [("LinearStep", "dense"), ("LinearStep", "sum")]
    dense, mean = [s for s in plan.steps.values() if isinstance(s, LinearStep)]
    assert [n.name for n in dense.chain] == ["mul", "add"]
    assert [n.name for n in mean.chain] == ["div"]


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_softmax_through_its_conversions_and_held_under_cp_lrp(dtype):
    def fn(w, x):
        h = x.astype(dtype) @ w.astype(dtype)
        return jax.nn.softmax(h, axis=-1) @ h.T

    plan = _plan(fn, W, X)
    assert ("SoftmaxStep", "softmax") in _rows(plan)
    assert ("LinearStep", "bilinear") in _rows(plan)
    softmax = next(s for s in plan.steps.values() if isinstance(s, SoftmaxStep))
    assert softmax.axes == (1,)
    held = _plan(fn, W, X, hold={"softmax"})
    assert [step.info.kind for step in held.table_steps()] == ["dense", "sum"]  # A·V with A a constant: a fixed map


@pytest.mark.parametrize("spelling", ["flax", "jnp_twice", "bf16"])
def test_a_layer_norm_is_one_norm_step_however_it_is_written(spelling):
    def fn(w, x):
        h = x @ w
        if spelling == "bf16":
            h = h.astype(jnp.bfloat16)
        mean = h.mean(-1, keepdims=True)
        if spelling == "jnp_twice":
            var = ((h - mean) ** 2).mean(-1, keepdims=True)
        else:
            var = jnp.mean(jnp.square(h), -1, keepdims=True) - jnp.square(mean)
        return (h - mean) * jax.lax.rsqrt(var + 1e-5) * 2.0 + 1.0

    kinds = [kind for _, kind in _rows(_plan(fn, W, X))]
    assert kinds == ["dense", "norm"]


def test_rms_norm_is_a_norm_step_on_its_held_normalizer():
    def fn(w, x):
        h = x @ w
        return h * jax.lax.rsqrt(jnp.mean(h * h, -1, keepdims=True) + 1e-6)

    assert [kind for _, kind in _rows(_plan(fn, W, X))] == ["dense", "norm"]


def test_a_gate_times_a_signal_is_a_product_row_that_names_the_gate():
    plan = _plan(lambda w, x: jax.nn.sigmoid(x @ w) * jnp.tanh(x @ w.T), W, X)
    product = next(s for s in plan.steps.values() if isinstance(s, ProductStep))
    assert product.info.kind == "product" and product.info.gates == (0,)
    one_minus = _plan(lambda w, x: (1 - jax.nn.sigmoid(x @ w)) * (x @ w.T), W, X)
    assert next(s for s in one_minus.steps.values() if isinstance(s, ProductStep)).info.gates == (0,)
    silu_gated = _plan(lambda w, x: jax.nn.silu(x @ w) * (x @ w.T), W, X)
    assert next(s for s in silu_gated.steps.values() if isinstance(s, ProductStep)).info.gates == ()


def test_elementwise_region_with_implicit_broadcast_is_one_pass_step():
    def fn(w, x):
        h = (x @ w)[:, :, None]  # (B, F, 1) times (1, 1, K): numpy-style broadcasting
        return jnp.tanh(h * jnp.ones((1, 1, 3)) * 2.0)

    rows = _rows(_plan(fn, W, X))
    assert rows[0] == ("LinearStep", "dense") and [r[0] for r in rows[1:]] == ["PassStep"]


def test_what_feeds_a_stop_gradient_alone_is_not_planned():
    def fn(w, x):
        attention = jax.lax.stop_gradient(jax.nn.softmax(x @ w))
        return attention * x

    plan = _plan(fn, W, X)
    assert not any(isinstance(s, (SoftmaxStep, LinearStep)) for s in plan.steps.values())
    assert [type(s) for s in plan.steps.values()] == [PassStep]


def test_segment_ids_are_structure_and_segment_sum_is_a_fixed_map():
    ids = jnp.array([0, 0, 1, 2])

    def fn(w, x):
        messages = (x @ w).T
        return jax.ops.segment_sum(messages, ids, num_segments=3)

    assert [kind for _, kind in _rows(_plan(fn, W, X))] == ["dense", "sum"]


def test_a_scan_body_gets_its_own_plan_with_the_same_hold():
    def fn(w, x):
        def body(h, _):
            a = jax.nn.softmax(h @ w)
            return a * h, None

        return jax.lax.scan(body, x, None, length=2)[0]

    plan = _plan(fn, W, X, hold={"softmax"})
    (scan,) = [s for s in plan.steps.values() if isinstance(s, ScanStep)]
    assert not any(isinstance(s, SoftmaxStep) for s in scan.body.steps.values())  # held inside too
    # the product with the held attention is linear in h: a fixed map of the body
    assert [s.info.kind for s in plan.table_steps()] == ["sum"]


def test_an_unknown_primitive_names_itself_and_the_registrations():
    def fn(w, x):
        return jax.lax.cumlogsumexp(x @ w, axis=1)

    with pytest.raises(UnsupportedOperation, match=r"`cumlogsumexp`.*register_elementwise.*register_step"):
        _plan(fn, W, X)


def test_classifiers_are_tried_in_the_order_of_the_algebra():
    names = [c.claim.__name__ for c in base.classifiers("mul")]
    assert names.index("_times_held") < names.index("_join_region") < names.index("_product")
    assert names.index("_product") < names.index("_passthrough") < names.index("_fused")
    add = [c.claim.__name__ for c in base.classifiers("add")]
    assert add.index("_learned_shift") < add.index("_join_region") < add.index("_joint_sum")


def test_a_claimed_norm_whose_relevance_reaches_no_output_is_no_row():
    def fn(w, x):
        h = x @ w
        normed = (h - h.mean(-1, keepdims=True)) * jax.lax.rsqrt(h.var(-1, keepdims=True) + 1e-5)
        return h @ w + jax.lax.stop_gradient(normed) @ w

    assert [s.info.kind for s in _plan(fn, W, X).table_steps()] == ["dense", "dense"]


@pytest.mark.parametrize("order", ["sum_times_inverse", "inverse_times_sum"])
def test_a_mean_written_either_way_round_is_a_centering(order):
    def fn(w, x):
        h = x @ w
        total = h.sum(-1, keepdims=True)
        mean = total * (1 / 4) if order == "sum_times_inverse" else (1 / 4) * total
        centered = h - mean
        return centered * jax.lax.rsqrt(jnp.mean(centered * centered, -1, keepdims=True) + 1e-5)

    assert [s.info.kind for s in _plan(fn, W, X).table_steps()] == ["dense", "norm"]


def test_a_learned_shift_that_broadcasts_its_input():
    import jaxlrp
    from jaxlrp import composites

    def fn(params, x):
        return (x.sum(1, keepdims=True) + params["b"]) @ params["w"]  # (B, 1) + (1, 4)

    params = {"b": B[None], "w": W}
    relevance = jaxlrp.lrp_fn(fn, composites.AttnLRP())(params, X, target=0)
    assert relevance.shape == X.shape and bool(jnp.all(jnp.isfinite(relevance)))
