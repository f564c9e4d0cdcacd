"""Flax NNX models and plain JAX functions: same rules, same composites, same numbers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

import jaxlrp
from jaxlrp import composites, rules

import models
import twins

pytestmark = pytest.mark.float64  # NNX, functions and Linen equal to float64 rounding, and zennit parity


@pytest.fixture(scope="module")
def vgg():
    model = twins.VGG()
    x = jax.random.normal(jax.random.PRNGKey(0), (3, 16, 16, 3), jnp.float64)
    variables = _randomize(model.init(jax.random.PRNGKey(1), x))
    return model, variables, x


def _randomize(variables):
    """Random BatchNorm statistics and scales (some negative), float64."""
    leaves, treedef = jax.tree.flatten(variables)
    keys = jax.random.split(jax.random.PRNGKey(7), len(leaves))
    leaves = [leaf.astype(jnp.float64) + 0.3 * jax.random.normal(k, leaf.shape, jnp.float64)
              for k, leaf in zip(keys, leaves)]
    out = jax.tree.unflatten(treedef, leaves)
    out["batch_stats"] = jax.tree.map(jnp.abs, out["batch_stats"])
    return out


@pytest.mark.parametrize("name", models.NAMED)
def test_nnx_and_plain_function_equal_linen(vgg, name):
    model, variables, x = vgg
    composite = models.NAMED[name]()
    expected = jaxlrp.lrp(model, composite)(variables, x, target=2)
    nnx_model = twins.to_nnx("vgg", variables)
    np.testing.assert_allclose(jaxlrp.lrp(nnx_model, composite)(x, target=2), expected, rtol=1e-12, atol=1e-15)
    as_function = jaxlrp.lrp_fn(twins.vgg_function, composite)(variables, x, target=2)
    np.testing.assert_allclose(as_function, expected, rtol=1e-9, atol=1e-14)


def test_pure_form_equals_stateful_and_compiles_once(vgg):
    model, variables, x = vgg
    nnx_model = twins.to_nnx("vgg", variables)
    composite = composites.EpsilonPlusFlat()
    graphdef, state = nnx.split(nnx_model)
    traces = []

    def pure(state, x):
        traces.append(1)
        return jaxlrp.lrp(graphdef, composite)(state, x)

    pure = jax.jit(pure)
    np.testing.assert_allclose(pure(state, x), jaxlrp.lrp(nnx_model, composite)(x), rtol=1e-12)
    other = jax.tree.map(lambda a: 1.5 * a, state)
    np.testing.assert_allclose(pure(other, x), jaxlrp.lrp(nnx.merge(graphdef, other), composite)(x), rtol=1e-12)
    assert len(traces) == 1


def test_pure_form_is_shardable(vgg):
    model, variables, _ = vgg
    graphdef, state = nnx.split(twins.to_nnx("vgg", variables))
    x = jax.random.normal(jax.random.PRNGKey(3), (8, 16, 16, 3), jnp.float64)
    mesh = jax.make_mesh((8,), ("batch",))
    replicated = jax.device_put(state, NamedSharding(mesh, PartitionSpec()))
    sharded_x = jax.device_put(x, NamedSharding(mesh, PartitionSpec("batch")))
    explain = jax.jit(jaxlrp.lrp(graphdef, composites.EpsilonGammaBox(-3.0, 3.0)))
    relevance = explain(replicated, sharded_x)
    assert len(relevance.sharding.device_set) == 8
    np.testing.assert_allclose(relevance, explain(state, x), rtol=1e-9, atol=1e-15)


def test_nnx_jit_and_vmap(vgg):
    model, variables, x = vgg
    nnx_model = twins.to_nnx("vgg", variables)
    expected = jaxlrp.lrp(nnx_model, composites.EpsilonPlus())(x)

    @nnx.jit
    def explain(m, x):
        return jaxlrp.lrp(m, composites.EpsilonPlus())(x)

    np.testing.assert_allclose(explain(nnx_model, x), expected, rtol=1e-12)
    np.testing.assert_allclose(jax.jit(jaxlrp.lrp(nnx_model, composites.EpsilonPlus()))(x), expected, rtol=1e-12)
    per_sample = jax.vmap(lambda xi: jaxlrp.lrp(nnx_model, composites.EpsilonPlus())(xi[None])[0])(x)
    np.testing.assert_allclose(per_sample, expected, rtol=1e-10)
    gammas = jnp.array([0.1, 0.5])
    batched = jax.vmap(lambda g: jaxlrp.lrp(nnx_model, composites.EpsilonGammaBox(-3.0, 3.0, gamma=g))(x))(gammas)
    np.testing.assert_allclose(batched[1], jaxlrp.lrp(nnx_model, composites.EpsilonGammaBox(-3.0, 3.0, gamma=0.5))(x),
                               rtol=1e-10)


class Everything(nnx.Module):
    """NNX layers and containers: LinearGeneral, Einsum, Conv 1-D, ConvTranspose, BatchNorm,
    Dropout, Sequential, nested modules and a list of modules."""

    def __init__(self, rngs):
        self.conv = nnx.Conv(2, 4, (3,), strides=2, padding=1, rngs=rngs)
        self.bn = nnx.BatchNorm(4, rngs=rngs)
        self.up = nnx.ConvTranspose(4, 3, (3,), strides=(2,), padding="SAME", rngs=rngs)
        self.drop = nnx.Dropout(0.5, rngs=rngs)
        self.general = nnx.LinearGeneral((8, 3), 5, axis=(-2, -1), rngs=rngs)
        self.einsum = nnx.Einsum("bi,io->bo", (5, 6), (6,), rngs=rngs)
        self.head = nnx.Sequential(nnx.Linear(6, 6, rngs=rngs), nnx.relu, nnx.Linear(6, 3, rngs=rngs))
        self.extra = nnx.List([nnx.Linear(3, 3, rngs=rngs)])

    def __call__(self, x):
        h = nnx.relu(self.bn(self.conv(x)))
        h = self.drop(nnx.gelu(self.up(h)))
        h = nnx.silu(self.general(h))
        return self.extra[0](self.head(self.einsum(h)))


def test_nnx_layers_and_containers():
    model = Everything(nnx.Rngs(0))
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 8, 2))
    table = jaxlrp.rule_table(model, composites.EpsilonPlusFlat(), x)
    paths = [(info.path, info.kind) for info in table.layers]
    assert paths == [("conv", "conv"), ("up", "conv"), ("general", "dense"), ("einsum", "dense"),
                     ("head/layers/0", "dense"), ("head/layers/2", "dense"), ("extra/0", "dense")]
    assert table.layers[0].merged == ("bn",)
    relevance = jaxlrp.lrp(model, composites.EpsilonPlusFlat())(x)
    assert relevance.shape == x.shape and bool(jnp.all(jnp.isfinite(relevance)))
    by_type = composites.LayerMap({nnx.Conv: rules.ZPlus(), nnx.ConvTranspose: rules.Flat(),
                                   (nnx.Linear, nnx.LinearGeneral, nnx.Einsum): rules.Epsilon()})
    kinds = [type(r).__name__ for r in jaxlrp.rule_table(model, by_type, x).rules]
    assert kinds == ["ZPlus", "Flat"] + ["Epsilon"] * 5
    by_name = composites.combine(composites.NameMap({"head/layers/2": rules.Gamma()}), composites.EpsilonPlus())
    assert type(jaxlrp.rule_table(model, by_name, x).rules[5]).__name__ == "Gamma"


def test_nnx_embedding_relevance_is_per_token():
    class Tokens(nnx.Module):
        def __init__(self, rngs):
            self.embed = nnx.Embed(11, 4, rngs=rngs)
            self.out = nnx.Linear(4, 3, rngs=rngs)

        def __call__(self, ids):
            return self.out(self.embed(ids).mean(axis=1))

    model = Tokens(nnx.Rngs(0))
    ids = jnp.array([[1, 4, 2], [3, 0, 10]])
    relevance = jaxlrp.lrp(model, composites.EpsilonPlus())(ids)
    assert relevance.shape == ids.shape
    out = model(ids)
    np.testing.assert_allclose(relevance.sum(-1), out.max(-1), rtol=1e-3)  # Norm over the mean, bias small


def test_nothing_the_user_owns_changes():
    model = Everything(nnx.Rngs(0))
    model.train()  # running statistics would update and dropout draw from its RNG stream
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 8, 2))
    def snapshot():
        def plain(a):
            return np.asarray(jax.random.key_data(a) if jnp.issubdtype(a.dtype, jax.dtypes.prng_key) else a)

        return jax.tree.map(plain, nnx.state(model))  # parameters, batch statistics, RNG counts and keys

    before = snapshot()
    attributes = {name: id(value) for name, value in vars(model).items()}
    jaxlrp.lrp(model, composites.EpsilonPlus())(x)
    jax.tree.map(np.testing.assert_array_equal, snapshot(), before)
    assert {name: id(value) for name, value in vars(model).items()} == attributes
    assert type(model) is Everything and type(model.conv) is nnx.Conv
    assert model.bn.use_running_average is False and model.drop.deterministic is False


def test_nnx_layer_without_rule_names_attribute_path():
    model = Everything(nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"no rule for layer 'up' \(nnx.ConvTranspose, kind 'conv'\)"):
        jaxlrp.lrp(model, composites.LayerMap({nnx.Conv: rules.ZPlus(), "dense": rules.Epsilon()}))(
            jnp.ones((2, 8, 2)))


def test_plain_function_layer_map_and_name_map():
    def mlp(params, x):
        with jax.named_scope("hidden"):
            x = jax.nn.relu(x @ params["w1"] + params["b1"])
        with jax.named_scope("out"):
            return x @ params["w2"] + params["b2"]

    key = jax.random.PRNGKey(0)
    params = {"w1": jax.random.normal(key, (4, 5)), "b1": jnp.zeros(5), "w2": jax.random.normal(key, (5, 3)),
              "b2": jnp.zeros(3)}
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 4))
    explain = jaxlrp.lrp_fn(mlp, composites.combine(composites.NameMap({"out": rules.Epsilon(0.0)}),
                                                    composites.LayerMap({"dense": rules.Epsilon(0.0)})))
    relevance = explain(params, x, target=1)
    out = mlp(params, x)
    np.testing.assert_allclose(relevance.sum(-1), out[:, 1], rtol=1e-9)  # LRP-0, no bias: conserved
    np.testing.assert_allclose(jax.jit(explain)(params, x, target=1), relevance, rtol=1e-12)
    per_sample = jax.vmap(lambda xi: explain(params, xi[None], target=1)[0])(x)
    np.testing.assert_allclose(per_sample, relevance, rtol=1e-12)
    swapped = jaxlrp.lrp_fn(lambda x, params: mlp(params, x), composites.EpsilonPlus(), argnums=0)
    np.testing.assert_allclose(swapped(x, params, target=1), jaxlrp.lrp_fn(mlp, composites.EpsilonPlus())(
        params, x, target=1))
    with pytest.raises(ValueError, match="no rule for layer 'hidden'"):
        jaxlrp.lrp_fn(mlp, composites.NameMap({"out": rules.Epsilon()}))(params, x)


def test_tied_embedding_head_is_credited_to_the_embedding():
    class Tied(nnx.Module):
        def __init__(self, rngs):
            self.embed = nnx.Embed(11, 4, rngs=rngs)
            self.mix = nnx.Linear(4, 4, rngs=rngs)

        def __call__(self, ids):
            h = nnx.relu(self.mix(self.embed(ids).mean(axis=1)))
            return self.embed.attend(h)  # logits through the tied embedding matrix

    model = Tied(nnx.Rngs(0))
    ids = jnp.array([[1, 4, 2], [3, 0, 10]])
    table = jaxlrp.rule_table(model, composites.EpsilonPlus(), ids)
    assert [(info.path, info.type_name, info.kind) for info in table.layers] == [
        ("", "Tied", "sum"), ("mix", "nnx.Linear", "dense"), ("embed", "nnx.Embed", "dense")]
    assert jaxlrp.lrp(model, composites.EpsilonPlus())(ids).shape == ids.shape


def test_rule_table_and_lrp_accept_a_function_of_params_and_x():
    def mlp(params, x):
        with jax.named_scope("hidden"):
            x = jax.nn.relu(x @ params["w1"])
        return x @ params["w2"]

    params = {"w1": jnp.ones((4, 5)), "w2": jnp.ones((5, 3))}
    x = jnp.arange(8.0).reshape(2, 4)
    table = jaxlrp.rule_table(mlp, composites.EpsilonPlus(), params, x)
    assert [info.path for info in table.layers] == ["hidden", ""]
    np.testing.assert_allclose(jaxlrp.lrp(mlp, composites.EpsilonPlus())(params, x),
                               jaxlrp.lrp_fn(mlp, composites.EpsilonPlus())(params, x))
