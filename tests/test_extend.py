"""`jaxlrp.extend`: a primitive jaxlrp does not know is one registration away; a user's rule
(`rules.rule`) works like a built-in one."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.extend.core import Primitive
from jax.interpreters import ad, mlir

import jaxlrp
from jaxlrp import composites, extend, rules

pytestmark = pytest.mark.float64  # LRP-0 against gradient × input to float64 rounding


def _primitive(name, fn, transpose=None):
    """A primitive of our own computing `fn`, linear with transpose `transpose` when given."""
    prim = Primitive(name)
    prim.def_impl(fn)
    prim.def_abstract_eval(lambda x: jax.core.ShapedArray(fn(jnp.zeros(x.shape, x.dtype)).shape, x.dtype))
    mlir.register_lowering(prim, mlir.lower_fun(fn, multiple_results=False))
    if transpose is not None:
        ad.deflinear2(prim, lambda ct, x: [transpose(ct)])
    return prim


FLIP = _primitive("jaxlrp_test_flip", lambda x: jnp.flip(x, -1), lambda ct: jnp.flip(ct, -1))
PAIRS = _primitive("jaxlrp_test_pairs", lambda x: x[..., ::2] + x[..., 1::2],
                   lambda ct: jnp.repeat(ct, 2, axis=-1))
SOFTSIGN = _primitive("jaxlrp_test_softsign", lambda x: x / (1 + jnp.abs(x)))
UNKNOWN = _primitive("jaxlrp_test_unknown", lambda x: jnp.flip(x, -1), lambda ct: jnp.flip(ct, -1))
extend.register_passthrough("jaxlrp_test_flip")
extend.register_linear("jaxlrp_test_pairs")
extend.register_elementwise("jaxlrp_test_softsign")


def _setup():
    rng = np.random.default_rng(0)
    params = {"w1": jnp.asarray(rng.normal(size=(4, 6))), "w2": jnp.asarray(rng.normal(size=(3, 2)))}
    return params, jnp.asarray(rng.normal(size=(5, 4)))


def net(params, x, middle):
    return middle(jax.nn.relu(x @ params["w1"])) @ params["w2"]


def _pairs_of_flipped(h):
    return PAIRS.bind(FLIP.bind(h))


def test_passthrough_and_linear_primitives_give_lrp0_equal_to_gradient_times_input():
    params, x = _setup()
    fn = lambda p, x: net(p, x, _pairs_of_flipped)  # noqa: E731
    relevance = jaxlrp.lrp_fn(fn, composites.LRP0())(params, x, target=1)
    gradient = jax.grad(lambda x: fn(params, x)[:, 1].sum())(x)
    np.testing.assert_allclose(relevance, gradient * x, rtol=1e-9, atol=1e-12)
    table = jaxlrp.rule_table(fn, composites.EpsilonPlus(), params, x)
    assert [info.kind for info in table.layers] == ["dense", "sum", "dense"]  # the linear primitive is a row
    assert jnp.allclose(jax.jit(jaxlrp.lrp_fn(fn, composites.LRP0()))(params, x, target=1), relevance)


def test_an_elementwise_primitive_passes_relevance():
    params, x = _setup()
    params = {**params, "w2": jnp.asarray(np.random.default_rng(1).normal(size=(6, 2)))}
    with_softsign = lambda p, x: jax.nn.relu(SOFTSIGN.bind(x @ p["w1"])) @ p["w2"]  # noqa: E731
    composite = composites.EpsilonPlus()
    table = jaxlrp.rule_table(with_softsign, composite, params, x)
    assert [info.kind for info in table.layers] == ["dense", "dense"]
    # An activation Passes: the map depends on it only through the second layer's input.
    r = jaxlrp.lrp_fn(with_softsign, composite)(params, x, target=0)
    h = jax.nn.relu(SOFTSIGN.bind(x @ params["w1"]))
    r_h = h * params["w2"][:, 0] / (1e-6 + h @ params["w2"][:, 0])[:, None] * (h @ params["w2"][:, 0])[:, None]
    z = x @ params["w1"]
    expected = x * ((r_h / (z + 1e-6 * jnp.sign(z))) @ params["w1"].T)
    np.testing.assert_allclose(r, expected, rtol=1e-6)


def test_an_unknown_primitive_says_how_to_register_it():
    params, x = _setup()
    fn = lambda p, x: net(p, x, lambda h: PAIRS.bind(UNKNOWN.bind(h)))  # noqa: E731
    with pytest.raises(jaxlrp.UnsupportedOperation,
                       match=r"`jaxlrp_test_unknown`.*register_passthrough\('jaxlrp_test_unknown'\)"):
        jaxlrp.lrp_fn(fn, composites.EpsilonPlus())(params, x)


def test_registration_errors():
    with pytest.raises(ValueError, match="'dot_general' is already registered as weighted"):
        extend.register_passthrough("dot_general")
    with pytest.raises(ValueError, match="'exp' is already registered as elementwise"):
        extend.register_linear("exp")
    with pytest.raises(TypeError, match="by its name"):
        extend.register_elementwise(FLIP)
    extend.register_passthrough("jaxlrp_test_flip")  # again: nothing changes


@rules.rule
class Halved(rules.Rule):
    """A user's rule: the ε rule on half the relevance (a field that is a leaf)."""

    epsilon: float = 1e-6
    share: float = 0.5

    def __call__(self, layer, inputs, relevance):
        return rules.Epsilon(self.epsilon)(layer, inputs, self.share * relevance)


def test_a_users_rule_works_in_composites_under_jit_vmap_and_grad():
    params, x = _setup()
    fn = lambda p, x: net(p, x, _pairs_of_flipped)  # noqa: E731

    def explain(share):
        composite = composites.LayerMap({"dense": Halved(1e-9, share)}, stabilizer=1e-9)
        return jaxlrp.lrp_fn(fn, composite)(params, x, target=1)

    reference = jaxlrp.lrp_fn(fn, composites.LayerMap({"dense": rules.Epsilon(1e-9)}, stabilizer=1e-9))(params, x, target=1)
    np.testing.assert_allclose(jax.jit(explain)(0.5), 0.25 * reference, rtol=1e-7)  # two dense layers
    shares = jnp.array([0.5, 1.0])
    np.testing.assert_allclose(jax.vmap(explain)(shares)[1], reference, rtol=1e-7)
    along = jax.grad(lambda s: explain(s).sum())(0.5)
    np.testing.assert_allclose(along, 2 * 0.5 * reference.sum(), rtol=1e-6)  # d(s²·R)/ds
    assert repr(Halved()) == "Halved(epsilon=1e-06, share=0.5)"


# ---- register_step: a row of its own kind, its rule seeing the linearisation -----------------

CUBE = Primitive("jaxlrp_test_cube")
CUBE.def_impl(lambda x: x**3)
CUBE.def_abstract_eval(lambda x: jax.core.ShapedArray(x.shape, x.dtype))
mlir.register_lowering(CUBE, mlir.lower_fun(lambda x: x**3, multiple_results=False))
ad.defjvp(CUBE, lambda t, x: 3 * x**2 * t)
extend.register_step("jaxlrp_test_cube", "cube")


def _cubed(params, x):
    return CUBE.bind(x @ params["w1"]) @ params["w2"][:6]


def test_a_registered_step_is_a_row_whose_rule_sees_its_linearisation():
    params, x = _setup()
    params = {**params, "w2": jnp.asarray(np.random.default_rng(1).normal(size=(6, 2)))}
    with pytest.raises(ValueError, match="kind 'cube'"):  # EpsilonPlus has no rule for it: an error, not a default
        jaxlrp.lrp_fn(_cubed, composites.EpsilonPlus())(params, x)
    eps = 0.1
    composite = composites.combine(composites.LayerMap({"cube": rules.Epsilon(eps)}), composites.LRP0())
    table = jaxlrp.rule_table(_cubed, composite, params, x)
    assert [(info.kind, repr(rule)) for info, rule in zip(table.layers, table.rules)][1] == ("cube", "Epsilon(epsilon=0.1)")
    relevance = jaxlrp.lrp_fn(_cubed, composite)(params, x, target=0)
    # Closed form: LRP-0 on both matmuls, and at the cube z = J·h + b' = h³ with J = 3h²:
    # R_h = h ⊙ J ⊙ R_z / stab(h³).
    h = x @ params["w1"]
    out = h**3 @ params["w2"]
    r_z = (h**3) * params["w2"][:, 0] * (out[:, :1] / out[:, :1])
    z = h**3
    r_h = h * 3 * h**2 * r_z / (z + ((z == 0) + jnp.sign(z)) * eps)
    expected = x * ((r_h / h) @ params["w1"].T)
    np.testing.assert_allclose(relevance, expected, rtol=1e-9)
    jitted = jax.jit(jaxlrp.lrp_fn(_cubed, composite))(params, x, target=0)
    np.testing.assert_allclose(jitted, relevance, rtol=1e-12)


def test_register_step_errors():
    for kind in ("dense", "softmax", "product", "norm"):
        with pytest.raises(ValueError, match="belong to steps of their own structure"):
            extend.register_step("jaxlrp_test_other", kind)
    with pytest.raises(ValueError, match="'scan' is already registered as nested program"):
        extend.register_step("scan", "loop")
    with pytest.raises(ValueError, match="already a step of kind 'cube'"):
        extend.register_step("jaxlrp_test_cube", "quartic")
    with pytest.raises(ValueError, match="already registered as elementwise"):
        extend.register_step("exp", "exp")


# ---- with_reference: a fused kernel explained through its plain-JAX reference ----------------


def _pallas_relu_matmul(x, w):
    from jax.experimental import pallas as pl

    def body(x_ref, w_ref, o_ref):
        o_ref[...] = jnp.maximum(jnp.dot(x_ref[...], w_ref[...]), 0.0)

    shape = jax.ShapeDtypeStruct((x.shape[0], w.shape[1]), x.dtype)
    return pl.pallas_call(body, out_shape=shape, interpret=True)(x, w)


def _reference_relu_matmul(x, w):
    return jax.nn.relu(x @ w)


FUSED = extend.with_reference(_pallas_relu_matmul, _reference_relu_matmul)


def _fused_net(params, x):
    return FUSED(x, params["w1"]) @ params["w2"]


def _reference_net(params, x):
    return _reference_relu_matmul(x, params["w1"]) @ params["w2"]


def test_a_kernel_runs_forward_and_is_explained_through_its_reference():
    params, x = _setup()
    params = {**params, "w2": jnp.asarray(np.random.default_rng(1).normal(size=(6, 2)))}
    assert "pallas_call" in str(jax.make_jaxpr(lambda x: FUSED(x, params["w1"]))(x))
    np.testing.assert_array_equal(FUSED(x, params["w1"]), _pallas_relu_matmul(x, params["w1"]))
    composite = composites.EpsilonPlus()
    expected = jaxlrp.lrp_fn(_reference_net, composite)(params, x)
    np.testing.assert_allclose(jaxlrp.lrp_fn(_fused_net, composite)(params, x), expected, rtol=1e-12)
    np.testing.assert_allclose(jax.jit(jaxlrp.lrp_fn(_fused_net, composite))(params, x), expected, rtol=1e-12)
    table = jaxlrp.rule_table(_fused_net, composite, params, x)
    assert [(i.kind, i.names[:1]) for i in table.layers] == [("dense", ("['w1']",)), ("dense", ("['w2']",))]
    # vmap over samples, and over the kernel's own batching rule
    per_sample = jax.vmap(lambda xi: jaxlrp.lrp_fn(_fused_net, composite)(params, xi[None], target=0)[0])(x)
    np.testing.assert_allclose(per_sample, jaxlrp.lrp_fn(_reference_net, composite)(params, x, target=0), rtol=1e-12)


def test_a_kernel_is_differentiated_through_its_reference_and_closes_over_traced_arrays():
    params, x = _setup()
    params = {**params, "w2": jnp.asarray(np.random.default_rng(1).normal(size=(6, 2)))}
    grad = jax.grad(lambda p: _fused_net(p, x).sum())(params)
    np.testing.assert_allclose(grad["w1"], jax.grad(lambda p: _reference_net(p, x).sum())(params)["w1"], rtol=1e-12)

    @jax.jit
    def closed(w1, x):  # the kernel and its reference close over w1, a tracer of this jit
        fused = extend.with_reference(lambda x: _pallas_relu_matmul(x, w1), lambda x: _reference_relu_matmul(x, w1))
        return jaxlrp.lrp_fn(lambda p, x: fused(x) @ p["w2"], composites.EpsilonPlus())(params, x)

    np.testing.assert_allclose(closed(params["w1"], x), jaxlrp.lrp_fn(_reference_net, composites.EpsilonPlus())(params, x),
                               rtol=1e-12)
    # relevance is differentiable with respect to the parameters through the kernel's step
    explain = jaxlrp.lrp_fn(_fused_net, composites.EpsilonPlus())
    reference = jaxlrp.lrp_fn(_reference_net, composites.EpsilonPlus())
    np.testing.assert_allclose(jax.grad(lambda p: explain(p, x).sum())(params)["w1"],
                               jax.grad(lambda p: reference(p, x).sum())(params)["w1"], rtol=1e-9)


def test_a_kernel_and_a_reference_that_disagree_are_an_error():
    mismatched = extend.with_reference(_pallas_relu_matmul, lambda x, w: (x @ w)[:, :1])
    with pytest.raises(TypeError, match="same structure, shapes and dtypes"):
        mismatched(jnp.ones((2, 3)), jnp.ones((3, 4)))


def test_a_kernel_closing_over_traced_integer_and_batched_arrays():
    offsets = jnp.array([1, 2, 3])
    shifted = jax.jit(lambda x, n: extend.with_reference(lambda x: x + n.astype(x.dtype),
                                                           lambda x: x + n.astype(x.dtype))(x))
    np.testing.assert_array_equal(shifted(jnp.ones(3), offsets), jnp.array([2.0, 3.0, 4.0]))
    scaled = jax.vmap(lambda w: extend.with_reference(lambda x: x * w, lambda x: x * w)(jnp.ones(3)))
    np.testing.assert_array_equal(scaled(jnp.arange(6.0).reshape(2, 3)), jnp.arange(6.0).reshape(2, 3))


def test_a_kernel_under_vmap_inside_shard_map():
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    mesh = jax.make_mesh((1,), ("data",))
    doubled = extend.with_reference(lambda x: x * 2, lambda x: x * 2)
    sharded = jax.jit(jax.shard_map(jax.vmap(doubled), mesh=mesh, in_specs=P("data"), out_specs=P("data")))
    x = jax.device_put(jnp.ones((2, 3)), NamedSharding(mesh, P("data")))
    np.testing.assert_array_equal(sharded(x), 2 * jnp.ones((2, 3)))
