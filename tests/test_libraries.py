"""Models written with other libraries: Equinox and Haiku through `lrp_fn`, layer names from
the parameter pytree, LRP-0 against gradient x input."""

import equinox as eqx
import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxlrp
from jaxlrp import composites, rules

pytestmark = pytest.mark.float64  # Equinox and Haiku models against float64 references


def _equinox_cnn():
    keys = jax.random.split(jax.random.PRNGKey(0), 3)
    model = eqx.nn.Sequential([
        eqx.nn.Conv2d(3, 4, 3, padding=1, key=keys[0]),
        eqx.nn.Lambda(jax.nn.relu),
        eqx.nn.Conv2d(4, 4, 3, padding=1, key=keys[1]),
        eqx.nn.Lambda(jax.nn.relu),
        eqx.nn.MaxPool2d(2, 2),
        eqx.nn.Lambda(lambda x: x.mean((1, 2))),
        eqx.nn.Linear(4, 3, key=keys[2]),
    ])
    model = jax.tree.map(lambda a: a.astype(jnp.float64) if eqx.is_array(a) else a, model)
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 3, 8, 8), jnp.float64)
    return model, x


def _forward(model, x):
    return jax.vmap(model)(x)


def _gradient_x_input(fn, x):
    out = fn(x)
    seed = jax.nn.one_hot(jnp.argmax(out, -1), out.shape[-1], dtype=out.dtype)
    return x * jax.vjp(fn, x)[1](seed)[0]


def test_equinox_model_is_passed_directly_and_its_layers_are_told_apart():
    model, x = _equinox_cnn()
    table = jaxlrp.rule_table(_forward, composites.EpsilonPlusFlat(), model, x)
    weighted = [info for info in table.layers if info.kind in ("dense", "conv")]
    # Both convs run in the same scope; the weight's key path tells them apart.
    assert weighted[0].path == weighted[1].path
    assert [info.param for info in weighted] == [".layers[0].weight", ".layers[2].weight", ".layers[6].weight"]
    assert ".layers[2].weight" in str(table) and "param" in str(table)
    for pattern in (".layers[2].weight", "layers/2/weight", ".layers[2]", "layers/2", "*[2]*"):
        composite = composites.combine(composites.NameMap({pattern: rules.Epsilon(0.5)}), composites.EpsilonPlus())
        chosen = jaxlrp.rule_table(_forward, composite, model, x).rules
        assert [r for r, info in zip(chosen, table.layers) if info.kind == "conv"] == [rules.ZPlus(), rules.Epsilon(0.5)], pattern


def test_equinox_lrp0_equals_gradient_times_input():
    model, x = _equinox_cnn()
    relevance = eqx.filter_jit(jaxlrp.lrp_fn(_forward, composites.LRP0()))(model, x)
    expected = _gradient_x_input(lambda x: _forward(model, x), x)
    np.testing.assert_allclose(relevance, expected, rtol=1e-12, atol=1e-15)


def test_haiku_names_match_their_parameter_keys():
    def mlp(x):
        return hk.nets.MLP([8, 8, 3])(x)

    apply = hk.without_apply_rng(hk.transform(mlp)).apply
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 5), jnp.float64)
    params = hk.without_apply_rng(hk.transform(mlp)).init(jax.random.PRNGKey(1), x)
    params = jax.tree.map(lambda a: a.astype(jnp.float64), params)
    composite = composites.combine(
        composites.NameMap({"mlp/~/linear_2": rules.Epsilon(0.25)}), composites.LayerMap({"dense": rules.ZPlus()})
    )
    table = jaxlrp.rule_table(apply, composite, params, x)
    assert [info.param for info in table.layers] == [f"['mlp/~/linear_{i}']['w']" for i in range(3)]
    assert table.rules == (rules.ZPlus(), rules.ZPlus(), rules.Epsilon(0.25))
    # lrp_fn with Haiku's apply(params, rng, x):
    with_rng = hk.transform(mlp).apply
    relevance = jaxlrp.lrp_fn(with_rng, composite, argnums=2)(params, None, x)
    np.testing.assert_allclose(relevance, jaxlrp.lrp_fn(apply, composite)(params, x))


def test_plain_function_names():
    def mlp(params, x):
        return jax.nn.relu(x @ params["w1"]) @ params["w2"].T.astype(x.dtype)

    params = {"w1": jnp.ones((4, 3)), "w2": jnp.ones((2, 3))}
    table = jaxlrp.rule_table(mlp, composites.EpsilonPlus(), params, jnp.ones((1, 4)))
    assert [info.names for info in table.layers] == [("['w1']", "w1"), ("['w2']", "w2")]


def test_pattern_that_matches_nothing_lists_the_names():
    model, x = _equinox_cnn()
    composite = composites.combine(composites.NameMap({"layers/9": rules.Flat()}), composites.EpsilonPlus())
    with pytest.raises(ValueError, match=r"NameMap pattern\(s\) \['layers/9'\] match no layer.*'\.layers\[6\]\.weight'"):
        jaxlrp.lrp_fn(_forward, composite)(model, x)
