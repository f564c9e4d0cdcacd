"""Bad input gets a clear error that names what was found and what was expected."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxlrp
from jaxlrp import composites, rules

import models

MODEL = models.CNN()


@pytest.fixture(scope="module")
def setup():
    return models.init(MODEL, (2, 8, 8, 2))


def test_layer_without_rule_names_its_path(setup):
    variables, x = setup
    with pytest.raises(ValueError, match=r"no rule for layer 'Dense_0' \(nn.Dense, kind 'dense'\)"):
        jaxlrp.lrp(MODEL, composites.LayerMap({"conv": rules.ZPlus()}))(variables, x)


@pytest.mark.parametrize("alpha, beta", [(1.0, 1.0), (3.0, 1.0), (-1.0, -2.0), (0.5, -0.5)])
def test_alpha_beta_constraints(alpha, beta):
    with pytest.raises(ValueError, match="AlphaBeta needs"):
        rules.AlphaBeta(alpha, beta)


def test_traced_alpha_beta_is_accepted():
    assert jax.jit(lambda a: rules.AlphaBeta(a, a - 1.0).alpha)(2.0) == 2.0


@pytest.mark.parametrize(
    "target, error, message",
    [
        (jnp.zeros((3,), int), ValueError, "shape"),
        (jnp.zeros((2, 4)), ValueError, "output's shape"),
        (7, ValueError, "out of range"),
        (-1, ValueError, "out of range"),
        (jnp.array([True, False]), TypeError, "target must be"),
    ],
)
def test_bad_targets(setup, target, error, message):
    variables, x = setup
    with pytest.raises(error, match=message):
        jaxlrp.lrp(MODEL, composites.EpsilonPlus())(variables, x, target=target)


@pytest.mark.parametrize("dtype", [jnp.bool_, jnp.complex64])
def test_non_float_input(setup, dtype):
    variables, x = setup
    with pytest.raises(TypeError, match="floating-point inputs"):
        jaxlrp.lrp(MODEL, composites.EpsilonPlus())(variables, x.astype(dtype))


def test_integer_input_without_embedding():
    model = nn.Dense(3)
    variables = model.init(jax.random.PRNGKey(0), jnp.ones((2, 4)))
    with pytest.raises(TypeError, match="integer input carries no relevance"):
        jaxlrp.lrp(model, composites.EpsilonPlus())(variables, jnp.ones((2, 4), int))


def test_nan_input_is_an_error_eagerly_and_propagates_under_jit(setup):
    variables, x = setup
    bad = x.at[0, 0, 0, 0].set(jnp.nan)
    explain = jaxlrp.lrp(MODEL, composites.EpsilonPlus())
    with pytest.raises(ValueError, match="NaN or Inf"):
        explain(variables, bad)
    assert bool(jnp.isnan(jax.jit(explain)(variables, bad)[0]).any())
    assert bool(jnp.isfinite(jax.jit(explain)(variables, bad)[1]).all())  # other samples unaffected


def test_zero_denominator_gives_zero_not_nan():
    model = nn.Dense(3, use_bias=False)
    variables = model.init(jax.random.PRNGKey(0), jnp.ones((1, 4)))
    x = jnp.zeros((1, 4))
    for rule in (rules.Epsilon(0.0), rules.ZPlus(0.0), rules.AlphaBeta(2.0, 1.0, 0.0), rules.Gamma(0.25, 0.0),
                 rules.Flat(0.0), rules.WSquare(0.0)):
        explain = jaxlrp.lrp(model, composites.LayerMap({"dense": rule}))
        relevance = explain(variables, x, target=jnp.ones((1, 3)))
        grad = jax.grad(lambda x: explain(variables, x, target=jnp.ones((1, 3))).sum())(x)
        assert bool(jnp.all(jnp.isfinite(relevance))) and bool(jnp.all(jnp.isfinite(grad))), rule


def test_unsupported_operation_names_module():
    class Attention(nn.Module):
        @nn.compact
        def __call__(self, x):
            h = nn.Dense(4)(x)
            return jnp.cumprod(h, axis=-1)

    model = Attention()
    variables = model.init(jax.random.PRNGKey(0), jnp.ones((2, 4)))
    with pytest.raises(ValueError, match=r"`cumprod` in module '<root>' \(Attention\)"):
        jaxlrp.lrp(model, composites.EpsilonPlus())(variables, jnp.ones((2, 4)))


def test_not_a_composite(setup):
    with pytest.raises(TypeError, match="expected a composite"):
        jaxlrp.lrp(MODEL, rules.Epsilon())


def test_pass_on_a_shape_changing_layer(setup):
    variables, x = setup
    with pytest.raises(ValueError, match="rules.Pass at layer 'Conv_0'"):
        jaxlrp.lrp(MODEL, composites.LayerMap({"conv": rules.Pass(), "dense": rules.Epsilon()}))(variables, x)


def test_bad_layer_map_key():
    with pytest.raises(TypeError, match="LayerMap keys"):
        composites.LayerMap({3: rules.Epsilon()})
    with pytest.raises(TypeError, match="Rule instances"):
        composites.LayerMap({"dense": 0.1})


def test_errors_change_nothing(setup):
    variables, x = setup
    before = jax.tree.map(np.array, variables)
    with pytest.raises(ValueError):
        jaxlrp.lrp(MODEL, composites.LayerMap({"conv": rules.ZPlus()}))(variables, x)
    jax.tree.map(np.testing.assert_array_equal, variables, before)
    assert jnp.asarray(jaxlrp.lrp(MODEL, composites.EpsilonPlus())(variables, x)).shape == x.shape


def test_unknown_layer_kind():
    with pytest.raises(ValueError, match="Unknown layer kind 'Dense'"):
        composites.LayerMap({"Dense": rules.Epsilon()})


@pytest.mark.parametrize("wrap", ["alone", "combined"])
def test_name_pattern_that_matches_nothing_is_an_error(setup, wrap):
    variables, x = setup
    names = composites.NameMap({"Conv_9": rules.Flat()})
    composite = names if wrap == "alone" else composites.combine(names, composites.EpsilonPlus())
    message = r"NameMap pattern\(s\) \['Conv_9'\] match no layer of this model.*'Conv_0', 'Conv_1'"
    with pytest.raises(ValueError, match=message):
        jaxlrp.lrp(MODEL, composite)(variables, x)
    with pytest.raises(ValueError, match=message):
        jaxlrp.rule_table(MODEL, composite, variables, x)


class _TrainableNet(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = True):
        x = nn.BatchNorm(use_running_average=not train)(nn.Dense(4)(x))
        return nn.Dense(2)(nn.Dropout(0.5, deterministic=not train)(x))


def test_training_mode_says_what_to_pass():
    model = _TrainableNet()
    x = jnp.ones((2, 3))
    variables = model.init(jax.random.PRNGKey(0), x, train=False)
    with pytest.raises(ValueError, match=r"_TrainableNet runs in training mode.*pass train=False to jaxlrp"):
        jaxlrp.lrp(model, composites.EpsilonPlus())(variables, x)
    relevance = jaxlrp.lrp(model, composites.EpsilonPlus(), train=False)(variables, x)
    assert relevance.shape == x.shape


def test_dropout_in_training_mode_says_what_to_pass():
    class Net(nn.Module):
        @nn.compact
        def __call__(self, x, train: bool = True):
            return nn.Dense(2)(nn.Dropout(0.5, deterministic=not train)(nn.Dense(4)(x)))

    x = jnp.ones((2, 3))
    variables = Net().init(jax.random.PRNGKey(0), x, train=False)
    with pytest.raises(ValueError, match=r"draws random numbers.*pass train=False"):
        jaxlrp.lrp(Net(), composites.EpsilonPlus())(variables, x)


def test_fused_kernel_says_how_to_explain_through_the_reference():
    from jax.experimental import pallas as pl

    def kernel(x_ref, o_ref):
        o_ref[...] = jnp.exp(x_ref[...]) * x_ref[...]

    def fn(w, x):
        h = x @ w
        fused = pl.pallas_call(kernel, out_shape=jax.ShapeDtypeStruct(h.shape, h.dtype), interpret=True)
        with jax.named_scope("attention"):
            return fused(h)

    w, x = jnp.ones((4, 128)), jnp.ones((8, 4))
    with pytest.raises(jaxlrp.UnsupportedOperation, match=r"`pallas_call` in module 'attention' is a fused kernel.*implementation='xla'"):
        jaxlrp.lrp_fn(fn, composites.EpsilonPlus())(w, x)
