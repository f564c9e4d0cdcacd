"""Each of JAX's unstable internals that jaxlrp reads (`jaxlrp/_internals.py`) against the
installed JAX: a release that changes one fails here, by name."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.sharding import PartitionSpec as P

from jaxlrp import _analysis, _internals, _program
from jaxlrp._ops import linear, selections


def _eqns(fn, *args):
    return jax.make_jaxpr(fn)(*args).jaxpr.eqns


def _only(fn, *args, name):
    found = [e for e in _eqns(fn, *args) if e.primitive.name == name]
    assert len(found) == 1, f"expected one {name} equation, found {[e.primitive.name for e in _eqns(fn, *args)]}"
    return found[0]


def test_name_stack_is_the_named_scopes_relative_to_the_enclosing_call():
    def fn(x):
        with jax.named_scope("outer"):
            with jax.named_scope("inner"):
                y = jnp.sin(x)
            return jax.jit(lambda v: jnp.cos(v))(y)

    sin, call = _eqns(fn, 1.0)
    assert _internals.name_stack(sin) == "outer/inner"
    assert _internals.name_stack(call) == "outer"
    body, _ = _internals.call_body(call.params)
    assert _internals.name_stack(body.eqns[0]) == ""


def test_name_stack_of_a_flax_module_call():
    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            with jax.named_scope("mark"):
                return nn.Dense(2, name="head")(x)

    x = jnp.ones((1, 3))
    variables = Net().init(jax.random.PRNGKey(0), x)
    dot = _only(lambda v, x: Net().apply(v, x), variables, x, name="dot_general")
    assert "mark" in _internals.name_stack(dot).split("/")


@pytest.mark.parametrize("name", ["jit", "custom_jvp", "custom_vjp", "checkpoint"])
def test_call_body_and_rebinding_a_call(name):
    @jax.custom_vjp
    def custom_vjp(x):
        return jnp.sin(x)

    custom_vjp.defvjp(lambda x: (jnp.sin(x), x), lambda x, g: (g * jnp.cos(x),))
    calls = {
        "jit": jax.jit(jnp.sin),
        "custom_jvp": jax.nn.relu,
        "custom_vjp": custom_vjp,
        "checkpoint": jax.checkpoint(jnp.sin),
    }
    x = jnp.linspace(-1.0, 1.0, 5)
    eqns = _eqns(calls[name], x)
    assert len(eqns) == 1 and eqns[0].primitive.name in _program.CALLS, eqns
    body, consts = _internals.call_body(eqns[0].params)
    assert isinstance(body, jax.extend.core.Jaxpr) and body.eqns and isinstance(consts, list)
    out = _internals.bind(eqns[0].primitive, [x], eqns[0].params)
    np.testing.assert_allclose(out[0], calls[name](x))


@pytest.mark.skipif(not hasattr(jax.config, "jax_remat3"), reason="jax_remat3 exists from jax 0.10")
def test_call_body_of_checkpoint_under_remat3():
    """`jax_remat3` turns `jax.checkpoint` into a `call_hi_primitive` whose `_prim` holds the body."""
    jax.config.update("jax_remat3", True)
    try:
        w = jnp.arange(3.0)
        fn = jax.checkpoint(lambda x, y: (jnp.sin(x) * y) @ w)
        (eqn,) = _eqns(fn, jnp.ones(3), 2.0)
        assert eqn.primitive.name == "call_hi_primitive" and eqn.primitive.name in _program.CALLS
        body, consts = _internals.call_body(eqn.params)
        assert "sin" in {e.primitive.name for e in body.eqns} and len(body.invars) == len(eqn.invars)
        program = _program.from_closed_jaxpr(jax.make_jaxpr(fn)(jnp.ones(3), 2.0))
        assert "call_hi_primitive" not in {n.name for n in program.nodes}  # inlined
    finally:
        jax.config.update("jax_remat3", False)


def test_call_body_of_a_primitive_that_holds_none():
    assert _internals.call_body(_only(jnp.sin, 1.0, name="sin").params) == (None, [])


def test_rebinding_a_convolution_and_its_accumulation_type():
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 5, 5, 3), jnp.bfloat16)
    w = jax.random.normal(jax.random.PRNGKey(1), (3, 3, 3, 4), jnp.bfloat16)

    def conv(x, w):
        return lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))

    eqn = _only(conv, x, w, name="conv_general_dilated")
    assert "preferred_element_type" in eqn.params
    np.testing.assert_array_equal(_internals.bind(eqn.primitive, [x, w], eqn.params)[0], conv(x, w))
    wide = _internals.with_accumulation({**eqn.params, "preferred_element_type": jnp.bfloat16}, jnp.float32)
    out = _internals.bind(eqn.primitive, [x, w], wide)[0]
    assert out.dtype == jnp.float32
    assert _internals.with_accumulation({"axes": (0,)}, jnp.float32) == {"axes": (0,)}


def test_conv_layout():
    x, w = jnp.ones((2, 5, 6, 4)), jnp.ones((3, 3, 2, 8))

    def conv(x, w):
        return lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                        feature_group_count=2)

    layout = _internals.conv_layout(_only(conv, x, w, name="conv_general_dilated").params)
    assert layout == _internals.ConvLayout((0, 3, 1, 2), (3, 2, 0, 1), (0, 3, 1, 2), 2, 1)


def test_dot_layout():
    a, b = jnp.ones((2, 3, 4)), jnp.ones((2, 4, 5))
    eqn = _only(lambda a, b: jnp.einsum("bij,bjk->bik", a, b), a, b, name="dot_general")
    assert _internals.dot_layout(eqn.params) == (((2,), (1,)), ((0,), (0,)))
    eqn = _only(lambda a, b: a @ b, jnp.ones((3, 4)), jnp.ones((4, 5)), name="dot_general")
    assert _internals.dot_layout(eqn.params) == (((1,), (0,)), ((), ()))


def test_reduce_axes():
    x = jnp.ones((2, 3, 4))
    assert _internals.reduce_axes(_only(lambda x: x.sum(axis=(0, 2)), x, name="reduce_sum").params) == (0, 2)
    assert _internals.reduce_axes(_only(lambda x: x.max(axis=1), x, name="reduce_max").params) == (1,)


def test_scan_layout():
    def fn(w, c0, c1, xs):
        def body(carry, x):
            a, b = carry
            return (a + w * x, b * x), a

        return lax.scan(body, (c0, c1), xs, reverse=True, unroll=2)

    w, c0, c1, xs = jnp.float32(2), jnp.float32(0), jnp.float32(1), jnp.arange(4, dtype=jnp.float32)
    eqn = _only(fn, w, c0, c1, xs, name="scan")
    layout = _internals.scan_layout(eqn.params)
    assert (layout.num_consts, layout.num_carry, layout.length, layout.reverse) == (1, 2, 4, True)
    assert layout.unroll == 2
    assert isinstance(layout.body, jax.extend.core.ClosedJaxpr) and len(layout.body.jaxpr.invars) == 4
    body = _program.from_closed_jaxpr(layout.body)
    assert {n.name for n in body.nodes} == {"mul", "add"}


def test_varying_axes_inside_shard_map():
    mesh = jax.make_mesh((8,), ("d",))
    seen = {}

    def fn(x, y):
        seen["x"], seen["y"] = _internals.varying_axes(x), _internals.varying_axes(y)
        seen["sum"] = _internals.varying_axes(x + y)
        return x

    x = jax.device_put(jnp.ones(8), jax.NamedSharding(mesh, P("d")))
    jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=(P("d"), P()), out_specs=P("d")))(x, jnp.ones(8))
    assert seen == {"x": frozenset({"d"}), "y": frozenset(), "sum": frozenset({"d"})}
    assert _internals.varying_axes(jnp.ones(3)) == frozenset()


# What the engine classifies by name: every primitive these functions emit must be among them.
KNOWN = (
    _program.ELEMENTWISE | _program.CALLS | set(linear.WEIGHTED_PRIMITIVES) | set(linear.FIXED_PRIMITIVES)
    | selections.GRADIENT | _analysis.LOOKUPS | {"scan", "iota", "argmax", "integer_pow", "reduce_and", "reduce_or"}
)

CATALOGUE = {
    "relu": jax.nn.relu,
    "gelu": jax.nn.gelu,
    "gelu (erf)": lambda x: jax.nn.gelu(x, approximate=False),
    "silu": jax.nn.silu,
    "sigmoid": jax.nn.sigmoid,
    "tanh": jnp.tanh,
    "leaky_relu": jax.nn.leaky_relu,
    "softmax": jax.nn.softmax,
    "log_softmax": jax.nn.log_softmax,
    "mean and var": lambda x: (x - x.mean(-1, keepdims=True)) * lax.rsqrt(x.var(-1, keepdims=True) + 1e-6),
    "max_pool": lambda x: nn.max_pool(x[..., None], (2,), (2,)),
    "avg_pool": lambda x: nn.avg_pool(x[..., None], (2,), (2,)),
    "segment_sum, segment_max": lambda x: jax.ops.segment_sum(x, jnp.array([0, 1]), 2) + jax.ops.segment_max(x, jnp.array([1, 1]), 2),
    "stack": lambda x: jnp.stack([x, -x], axis=-1).reshape(x.shape[0], -1),
    "concatenate, pad, flip": lambda x: jnp.flip(jnp.pad(jnp.concatenate([x, x], -1), ((0, 0), (1, 1))), -1),
    "where, clip": lambda x: jnp.clip(jnp.where(x > 0, x, 0.5 * x), -1, 1),
    "cumsum": lambda x: jnp.cumsum(x, axis=-1),
    "resize": lambda x: jax.image.resize(x, (x.shape[0], 2 * x.shape[1]), "linear"),
    "einsum": lambda x: jnp.einsum("bi,bj->bij", x, x),
    "take": lambda x: jnp.take(x, jnp.array([0, 2]), axis=-1),
    "transpose, reshape, squeeze": lambda x: jnp.squeeze(x.T.reshape(1, -1)),
}


@pytest.mark.parametrize("name", CATALOGUE)
def test_primitive_names_the_engine_knows(name):
    program = _program.from_closed_jaxpr(jax.make_jaxpr(CATALOGUE[name])(jnp.ones((2, 8))))
    unknown = {n.name for n in program.nodes} - KNOWN
    assert not unknown, f"{name} now emits {sorted(unknown)}: teach the engine these primitives"
