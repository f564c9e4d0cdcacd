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
