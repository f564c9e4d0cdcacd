"""Model styles and glue between modules: Sequential, setup, nesting, remat, scan, Embed,
activations, concatenation, slicing, padding, dropout, scaling by constants."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxlrp
from jaxlrp import composites, rules

import models
import twins

pytestmark = pytest.mark.float64  # closed forms and references in float64

EPSILON = composites.LayerMap({("dense", "conv"): rules.Epsilon(0.01)})


def _two_dense_reference(variables, x, act, target):
    """Epsilon on dense -> act (Pass) -> dense, by hand."""
    p = variables["params"]
    W1, b1, W2, b2 = p["Dense_0"]["kernel"], p["Dense_0"]["bias"], p["Dense_1"]["kernel"], p["Dense_1"]["bias"]
    h = act(x @ W1 + b1)
    out = h @ W2 + b2
    R = jax.nn.one_hot(target, out.shape[-1]) * out
    stab = lambda z: z + ((z == 0) + jnp.sign(z)) * 0.01  # noqa: E731
    R_h = h * ((R / stab(out)) @ W2.T)
    return x * ((R_h / stab(x @ W1 + b1)) @ W1.T)


ACTIVATIONS = {
    "relu": nn.relu,
    "gelu": nn.gelu,
    "gelu_exact": lambda x: nn.gelu(x, approximate=False),
    "silu": nn.silu,
    "tanh": nn.tanh,
    "sigmoid": nn.sigmoid,
    "leaky_relu": nn.leaky_relu,
    "elu": nn.elu,
    "softplus": nn.softplus,
    "hand_written_swish": lambda x: x * jax.nn.sigmoid(x),
    "where": lambda x: jnp.where(x > 0, x, 0.1 * x),
}


def test_batchnorm_that_no_layer_feeds_passes_relevance():
    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            h = nn.BatchNorm(use_running_average=True)(nn.relu(nn.Dense(6)(x)))
            return nn.Dense(3)(h)

    variables, x = models.init(Net(), (2, 5))
    variables = jax.tree.map(lambda a: a.astype(jnp.float64) - 0.7, variables)  # negative BatchNorm scales too
    stats, scale = variables["batch_stats"]["BatchNorm_0"], variables["params"]["BatchNorm_0"]

    def act(z):
        normalized = (nn.relu(z) - stats["mean"]) / jnp.sqrt(jnp.abs(stats["var"]) + 1e-5)
        return normalized * scale["scale"] + scale["bias"]

    variables["batch_stats"]["BatchNorm_0"]["var"] = jnp.abs(stats["var"])
    with pytest.warns(jaxlrp.UnmergedAffineWarning, match="'BatchNorm_0' \\(nn.BatchNorm\\) shifts"):
        table = jaxlrp.rule_table(Net(), EPSILON, variables, x)
    assert [(info.path, info.kind, info.merged) for info in table.layers] == [
        ("Dense_0", "dense", ()), ("BatchNorm_0", "affine", ()), ("Dense_1", "dense", ())
    ]
    assert table.rules[1] == rules.Pass()
    with pytest.warns(jaxlrp.UnmergedAffineWarning):
        relevance = jaxlrp.lrp(Net(), EPSILON)(variables, x, target=1)
    np.testing.assert_allclose(relevance, _two_dense_reference(variables, x, act, 1), rtol=1e-9)


@pytest.mark.parametrize("name", ACTIVATIONS)
def test_activation_passes_relevance(name):
    act = ACTIVATIONS[name]

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            h = act(nn.Dense(6)(x))
            return nn.Dense(3)(h)

    variables, x = models.init(Net(), (2, 5))
    relevance = jaxlrp.lrp(Net(), EPSILON)(variables, x, target=1)
    np.testing.assert_allclose(relevance, _two_dense_reference(variables, x, act, 1), rtol=1e-10)


class SetupMLP(nn.Module):
    def setup(self):
        self.layers = [nn.Dense(6), nn.Dense(3)]

    def __call__(self, x):
        return self.layers[1](nn.relu(self.layers[0](x)))


class Inner(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.relu(nn.Dense(6)(x))


class Nested(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = Inner()(x)
        return nn.Dense(3)(h)


def _same_weights_as_plain(variables_other):
    """Re-keys two dense layers' params into the plain Net layout."""
    dense = jax.tree.leaves(variables_other, is_leaf=lambda t: isinstance(t, dict) and "kernel" in t)
    first, second = sorted(dense, key=lambda d: d["kernel"].shape[0] != 5)
    return {"params": {"Dense_0": first, "Dense_1": second}}


@pytest.mark.parametrize(
    "model",
    [SetupMLP(), Nested(), nn.Sequential([nn.Dense(6), nn.relu, nn.Dense(3)])],
    ids=["setup", "nested", "sequential"],
)
def test_module_styles(model):
    variables, x = models.init(model, (2, 5))
    relevance = jaxlrp.lrp(model, EPSILON)(variables, x, target=2)
    expected = _two_dense_reference(_same_weights_as_plain(variables), x, nn.relu, 2)
    np.testing.assert_allclose(relevance, expected, rtol=1e-10)


class Stack(nn.Module):
    """Four dense+relu layers of the same width, with or without nn.scan / nn.remat."""

    mode: str

    @nn.compact
    def __call__(self, x):
        class Layer(nn.Module):
            @nn.compact
            def __call__(self, h, _):
                return nn.relu(nn.Dense(4)(h)), None

        if self.mode == "scan":
            Scanned = nn.scan(Layer, variable_axes={"params": 0}, split_rngs={"params": True}, length=4)
            x, _ = Scanned(name="stack")(x, None)
        else:
            cls = nn.remat(Layer) if self.mode == "remat" else Layer
            for i in range(4):
                x, _ = cls(name=f"layer{i}")(x, None)
        return nn.Dense(2, name="head")(x)


# jax 0.10's `jax_remat3` makes `jax.checkpoint` a `call_hi_primitive`; older JAX has no such option.
REMAT3 = ["remat3"] if hasattr(jax.config, "jax_remat3") else []


@pytest.mark.parametrize("mode", ["scan", "remat", *REMAT3])
def test_scan_and_remat_equal_the_unrolled_model(mode):
    if mode != "remat3":
        return _scan_or_remat_equals_unrolled(mode)
    jax.config.update("jax_remat3", True)
    try:
        variables, x = models.init(Stack("remat"), (3, 4))
        jaxpr = jax.make_jaxpr(lambda v, x: Stack("remat").apply(v, x))(variables, x)
        assert "call_hi_primitive" in {e.primitive.name for e in jaxpr.jaxpr.eqns}
        _scan_or_remat_equals_unrolled("remat")
    finally:
        jax.config.update("jax_remat3", False)


def _scan_or_remat_equals_unrolled(mode):
    model = Stack(mode)
    variables, x = models.init(model, (3, 4))
    if mode == "scan":
        stacked = variables["params"]["stack"]["Dense_0"]
        layers = {f"layer{i}": {"Dense_0": jax.tree.map(lambda a: a[i], stacked)} for i in range(4)}
    else:
        layers = {f"layer{i}": variables["params"][f"layer{i}"] for i in range(4)}
    plain = {"params": {**layers, "head": variables["params"]["head"]}}
    # Under nn.scan all iterations are one traced layer and so share one rule: `first` (the
    # Flat composites) would pick the whole scanned stack; remat keeps layers apart.
    chosen = [EPSILON, composites.EpsilonPlus()] + ([composites.EpsilonPlusFlat()] if mode == "remat" else [])
    for composite in chosen:
        ours = jax.jit(jaxlrp.lrp(model, composite))(variables, x)
        expected = jaxlrp.lrp(Stack("plain"), composite)(plain, x)
        np.testing.assert_allclose(ours, expected, rtol=1e-10)


class Glue(nn.Module):
    """Concatenation, slicing, padding, dropout, scaling by constants, transposes."""

    @nn.compact
    def __call__(self, x):
        h = nn.Dense(6, use_bias=False)(x)
        h = jnp.concatenate([h, 2.0 * h[:, :2]], axis=-1) / 3.0
        h = nn.Dropout(0.5, deterministic=True)(h)
        h = jnp.pad(h, ((0, 0), (1, 1)))
        return nn.Dense(3, use_bias=False)(nn.relu(h).T.T)


def test_structural_glue_passes_relevance():
    variables, x = models.init(Glue(), (2, 5))
    composite = composites.LayerMap({"dense": rules.Epsilon(0.0)})
    out, relevance = jaxlrp.output_and_lrp(Glue(), composite)(variables, x, target=0)
    table = jaxlrp.rule_table(Glue(), composite, variables, x)
    assert [info.kind for info in table.layers] == ["dense", "dense"]
    # LRP-0 without biases through Pass and gradient glue: the duplicated slice gets relevance
    # from both copies, the padding none, and all of it reaches the input.
    np.testing.assert_allclose(relevance.sum(-1), out[:, 0], rtol=1e-9)


class TokenModel(nn.Module):
    @nn.compact
    def __call__(self, ids):
        return self.head(nn.Embed(11, 4)(ids))

    @nn.nowrap
    def head(self, e):
        return HeadOnly(name="Head")(e)


class HeadOnly(nn.Module):
    @nn.compact
    def __call__(self, e):
        h = nn.relu(nn.Dense(5)(e))
        return nn.Dense(3)(jnp.mean(h, axis=1))


def test_embedding_relevance_is_per_token():
    ids = jnp.array([[1, 4, 2, 9], [3, 3, 0, 10]])
    model = TokenModel()
    variables = model.init(jax.random.PRNGKey(0), ids)
    variables = jax.tree.map(lambda a: a.astype(jnp.float64), variables)
    relevance = jaxlrp.lrp(model, EPSILON)(variables, ids, target=1)
    assert relevance.shape == ids.shape
    # The same as explaining the head on the embedding vectors, summed over features.
    embeddings = variables["params"]["Embed_0"]["embedding"][ids]
    head_vars = {"params": variables["params"]["Head"]}
    expected = jaxlrp.lrp(HeadOnly(), EPSILON)(head_vars, embeddings, target=1).sum(-1)
    np.testing.assert_allclose(relevance, expected, rtol=1e-10)


def test_rule_table_shows_merges_and_defaults():
    model = models.CNN()
    variables, x = models.init(model, (1, 8, 8, 2))
    table = jaxlrp.rule_table(model, composites.EpsilonPlusFlat(), variables, x)
    kinds = [(info.path, info.kind) for info in table.layers]
    assert kinds == [("Conv_0", "conv"), ("Conv_1", "conv"), ("", "sum"), ("", "avg_pool"), ("Dense_0", "dense")]
    assert table.layers[0].merged == ("BatchNorm_0",)
    assert isinstance(table.rules[0], rules.Flat) and isinstance(table.rules[2], rules.Norm)
    text = str(table)
    assert "BatchNorm_0" in text and "Flat(stabilizer=1e-06)" in text and "<root>" in text


def test_name_map_and_combine():
    model = models.CNN()
    variables, x = models.init(model, (1, 8, 8, 2))
    composite = composites.combine(composites.NameMap({"Conv_1": rules.Gamma(0.5)}), composites.EpsilonPlus())
    table = jaxlrp.rule_table(model, composite, variables, x)
    assert [type(r).__name__ for r in table.rules] == ["ZPlus", "Gamma", "Norm", "Norm", "Epsilon"]
    by_type = composites.LayerMap({nn.Conv: rules.Flat(), nn.Dense: rules.Epsilon()})
    assert [type(r).__name__ for r in jaxlrp.rule_table(model, by_type, variables, x).rules] == [
        "Flat", "Flat", "Norm", "Norm", "Epsilon"]


def test_batchnorm_after_a_mean_passes_instead_of_merging():
    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            h = nn.relu(nn.Dense(6, use_bias=False)(x))
            h = jnp.mean(h.reshape(h.shape[0], 3, 2), axis=-1)
            h = nn.BatchNorm(use_running_average=True, use_bias=False)(h)
            return nn.Dense(2, use_bias=False)(h)

    model = Net()
    variables, x = models.init(model, (2, 4))
    with pytest.warns(jaxlrp.UnmergedAffineWarning, match="BatchNorm_0"):
        table = jaxlrp.rule_table(model, composites.LayerMap({"dense": rules.Epsilon(0.0)}), variables, x)
    kinds = [(info.kind, info.merged) for info in table.layers]
    assert kinds == [("dense", ()), ("sum", ()), ("affine", ()), ("dense", ())]


def _fn_relevance(fn, rule, x, target):
    return jaxlrp.lrp_fn(lambda _, x: fn(x), composites.LayerMap({"sum": rule}))(None, x, target=target)


def test_difference_of_two_activations_has_weights_plus_and_minus_one():
    x = jax.random.normal(jax.random.PRNGKey(0), (4, 6), jnp.float64)

    def diff(x):
        return x[:, :3] - x[:, 3:]

    R = jax.random.normal(jax.random.PRNGKey(1), (4, 3), jnp.float64)
    a, b = x[:, :3], x[:, 3:]
    for rule in (rules.Flat(0.0), rules.WSquare(0.0)):  # |w| = 1 for both inputs
        np.testing.assert_allclose(_fn_relevance(diff, rule, x, R), jnp.concatenate([R / 2, R / 2], -1), rtol=1e-12)
    z = jnp.maximum(a, 0) - jnp.minimum(b, 0)  # z+ rule: a⁺·(+1) + b⁻·(-1); zero z gives zero
    s = jnp.where(z == 0, 0, R / jnp.where(z == 0, 1, z))
    expected = jnp.concatenate([jnp.maximum(a, 0) * s, -jnp.minimum(b, 0) * s], -1)
    np.testing.assert_allclose(_fn_relevance(diff, rules.ZPlus(0.0), x, R), expected, rtol=1e-12)
    np.testing.assert_allclose(_fn_relevance(diff, rules.Norm(0.0), x, R),
                               jnp.concatenate([a * R / (a - b), -b * R / (a - b)], -1), rtol=1e-12)


def test_masks_and_stop_gradient_are_constants():
    def net(params, x):
        h = x @ params
        h = h * (h > 0).astype(h.dtype)  # a ReLU written with a mask
        h = 2.0 * h - jax.lax.stop_gradient(h.mean(-1, keepdims=True))  # shift by a constant
        return h.sum(-1, keepdims=True)

    params = jax.random.normal(jax.random.PRNGKey(0), (5, 4), jnp.float64)
    x = jax.random.normal(jax.random.PRNGKey(1), (3, 5), jnp.float64)
    out = net(params, x)
    relevance = jaxlrp.lrp_fn(net, composites.LayerMap({"dense": rules.Epsilon(0.0)}))(params, x, target=0)
    # mask and shift Pass, the sum is Norm (stabilizer 1e-6), the matmul LRP-0: the relevance
    # reaches x; none leaks into the mask or the stopped mean
    np.testing.assert_allclose(relevance.sum(-1), out[:, 0], rtol=1e-5)


def test_cumsum_is_a_sum():
    def net(params, x):
        return jnp.cumsum(x @ params, axis=-1)

    params = jnp.abs(jax.random.normal(jax.random.PRNGKey(0), (5, 4), jnp.float64))
    x = jnp.abs(jax.random.normal(jax.random.PRNGKey(1), (3, 5), jnp.float64))
    out = net(params, x)
    relevance = jaxlrp.lrp_fn(net, composites.LayerMap({"dense": rules.Epsilon(0.0)}))(params, x, target=3)
    np.testing.assert_allclose(relevance.sum(-1), out[:, 3], rtol=1e-5)  # Norm's stabilizer 1e-6


def test_a_matmul_with_a_constant_matrix_is_a_fixed_map():
    class Upsample(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.relu(nn.Conv(2, (3, 3))(x))
            x = jax.image.resize(x, (x.shape[0], 8, 8, 2), "bilinear")
            return nn.Dense(3)(x.reshape(x.shape[0], -1))

    variables, x = models.init(Upsample(), (1, 4, 4, 1))
    table = jaxlrp.rule_table(Upsample(), composites.EpsilonPlusFlat(), variables, x)
    kinds = [info.kind for info in table.layers]
    assert kinds[0] == "conv" and kinds[-1] == "dense" and set(kinds[1:-1]) == {"sum"}
    assert isinstance(table.rules[0], rules.Flat) and all(isinstance(r, rules.Norm) for r in table.rules[1:-1])


def _gradient_x_input(fn, x):
    out = fn(x)
    seed = jax.nn.one_hot(jnp.argmax(out, -1), out.shape[-1], dtype=out.dtype)
    return x * jax.vjp(fn, x)[1](seed)[0]


def test_lrp0_equals_gradient_times_input_on_the_resnet_twin():
    """Every dense and conv layer Epsilon(0) and every sum, mean and residual add Norm(0)."""
    model = twins.ResNet()
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 16, 16, 3), jnp.float64)
    variables = jax.tree.map(lambda a: a.astype(jnp.float64), models.random_variables(model, x))
    table = jaxlrp.rule_table(model, composites.LRP0(), variables, x)
    assert {repr(r) for r in table.rules} == {"Epsilon(epsilon=0.0)", "Norm(stabilizer=0.0)"}
    relevance = jax.jit(jaxlrp.lrp(model, composites.LRP0()))(variables, x)
    expected = _gradient_x_input(lambda x: model.apply(variables, x), x)
    np.testing.assert_allclose(relevance, expected, rtol=1e-12, atol=1e-15)


def test_composite_stabilizer_sets_the_default_for_sums():
    variables, x = models.init(models.CNN(), (2, 8, 8, 2))
    layer_map = composites.LayerMap({("dense", "conv"): rules.Epsilon()}, stabilizer=0.5)
    for composite, expected in [
        (layer_map, rules.Norm(0.5)),
        (composites.combine(composites.NameMap({"Dense_0": rules.Flat()}), layer_map), rules.Norm(0.5)),
        (composites.LayerMap({("dense", "conv"): rules.Epsilon()}), rules.Norm(1e-6)),
        (composites.EpsilonPlus(stabilizer=1e-3), rules.Norm(1e-3)),
    ]:
        table = jaxlrp.rule_table(models.CNN(), composite, variables, x)
        assert [r for r, info in zip(table.rules, table.layers) if info.kind in ("sum", "avg_pool")] == [expected] * 2


def test_a_fixed_filter_before_a_dense_layer_is_no_conv_local():
    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            sobel = jnp.array([[1.0, 0.0, -1.0], [2.0, 0.0, -2.0], [1.0, 0.0, -1.0]])[:, :, None, None]
            h = jax.lax.conv_general_dilated(x, sobel, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
            return nn.Dense(3)(h.reshape(h.shape[0], -1))

    x = jax.random.normal(jax.random.PRNGKey(0), (2, 5, 5, 1), jnp.float64)
    variables = Net().init(jax.random.PRNGKey(1), x)
    table = jaxlrp.rule_table(Net(), composites.EpsilonPlus(), variables, x)
    assert [(info.path, info.kind) for info in table.layers] == [("", "sum"), ("Dense_0", "dense")]


def test_conv_local_is_one_conv_layer():
    model = nn.ConvLocal(3, (3, 3), padding="SAME")
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 5, 5, 2), jnp.float64)
    variables = model.init(jax.random.PRNGKey(1), x)
    composite = composites.LayerMap({"conv": rules.Flat()})
    table = jaxlrp.rule_table(model, composite, variables, x)
    assert [(info.path, info.kind, info.input_shapes) for info in table.layers] == [("", "conv", ((2, 5, 5, 2),))]
    seed = jax.random.uniform(jax.random.PRNGKey(2), (2, 5, 5, 3), jnp.float64)
    relevance = jaxlrp.lrp(model, composite)(variables, x, target=seed)
    # Nothing lost at the padding (was 0.93 of the seed): only the stabilizer, 1e-6 on a fan-in of 4 to 9.
    np.testing.assert_allclose(relevance.sum(), seed.sum(), rtol=1e-6)


class _StoppedAttention(nn.Module):
    @nn.compact
    def __call__(self, x):
        q, k, v = nn.Dense(4)(x), nn.Dense(4)(x), nn.Dense(4)(x)
        attention = jax.lax.stop_gradient(nn.softmax(q @ k.swapaxes(-1, -2)))
        return nn.Dense(3)((attention @ v).mean(1))


def test_matmul_with_a_stop_gradient_operand_is_a_fixed_map():
    model = _StoppedAttention()
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 5, 6), jnp.float64)
    variables = jax.tree.map(lambda a: a.astype(jnp.float64), model.init(jax.random.PRNGKey(1), x))
    table = jaxlrp.rule_table(model, composites.LRP0(), variables, x)
    # Queries and keys carry no relevance: they feed the stop_gradient alone.
    assert [(info.path, info.kind) for info in table.layers] == [
        ("Dense_2", "dense"), ("", "sum"), ("", "sum"), ("Dense_3", "dense")
    ]
    relevance = jaxlrp.lrp(model, composites.LRP0())(variables, x)
    np.testing.assert_allclose(relevance, _gradient_x_input(lambda x: model.apply(variables, x), x), rtol=1e-12)


def test_a_learned_scale_passes_silently_a_learned_shift_is_reported():
    class Net(nn.Module):
        shift: bool

        @nn.compact
        def __call__(self, x):
            h = nn.Dense(6)(x)
            slope = self.param("slope", nn.initializers.constant(0.1), (6,))
            h = jnp.where(h > 0, h, slope * h) * self.param("layer_scale", nn.initializers.ones, (6,))  # PReLU
            if self.shift:
                h = h + self.param("position", nn.initializers.normal(1.0), (6,))
            return nn.Dense(3)(h)

    x = jax.random.normal(jax.random.PRNGKey(0), (2, 5), jnp.float64)
    variables = Net(False).init(jax.random.PRNGKey(1), x)
    assert [info.kind for info in jaxlrp.rule_table(Net(False), EPSILON, variables, x).layers] == ["dense", "dense"]
    relevance = jaxlrp.lrp(Net(False), composites.LRP0())(variables, x)
    np.testing.assert_allclose(relevance, _gradient_x_input(lambda x: Net(False).apply(variables, x), x), rtol=1e-12)
    variables = Net(True).init(jax.random.PRNGKey(1), x)
    with pytest.warns(jaxlrp.UnmergedAffineWarning, match=r"^jaxlrp: '<root>' \(Net\) shifts"):
        table = jaxlrp.rule_table(Net(True), EPSILON, variables, x)
    assert [info.kind for info in table.layers] == ["dense", "affine", "dense"]


def test_stack_moves_values_like_concatenate():
    """`jnp.stack` (a primitive of its own from jax 0.10; before, reshapes and a concatenate):
    a rotary embedding written with it, as keras-hub's Llama and Gemma write theirs, gets the
    map of the same rotation written with concatenate."""
    angles = np.linspace(0.1, 1.0, 3)
    cos, sin = np.repeat(np.cos(angles), 2), np.repeat(np.sin(angles), 2)

    def rotary(rotate):
        def fn(params, x):
            return jnp.tanh((x * cos + rotate(x) * sin) @ params["w1"]) @ params["w2"]
        return fn

    def with_stack(x):
        return jnp.stack([-x[..., 1::2], x[..., ::2]], axis=-1).reshape(x.shape)

    def with_concatenate(x):
        return jnp.concatenate([-x[..., 1::2, None], x[..., ::2, None]], axis=-1).reshape(x.shape)

    rng = np.random.default_rng(0)
    params = {"w1": jnp.asarray(rng.normal(size=(6, 5))), "w2": jnp.asarray(rng.normal(size=(5, 2)))}
    x = jnp.asarray(rng.normal(size=(4, 6)))
    composite = composites.EpsilonPlus()
    stacked = jaxlrp.lrp_fn(rotary(with_stack), composite)(params, x, target=1)
    concatenated = jaxlrp.lrp_fn(rotary(with_concatenate), composite)(params, x, target=1)
    np.testing.assert_allclose(stacked, concatenated, rtol=1e-12, atol=1e-15)
    assert float(jnp.abs(stacked).sum()) > 0


def test_an_activation_broadcast_along_size_one_axes():
    """`h[:, :, None] * scale[None, None, :]`: jnp in jax 0.10 writes it as one `mul` of
    f32[B,F,1] and f32[1,1,K] (implicit broadcasting). Its map equals the explicitly broadcast
    one, whose copies' relevance adds up in the input."""
    rng = np.random.default_rng(1)
    params = {"w1": jnp.asarray(rng.normal(size=(5, 4))), "scale": jnp.asarray(rng.normal(size=(3,))),
              "w2": jnp.asarray(rng.normal(size=(12, 2)))}

    def implicit(params, x):
        h = jax.nn.relu(x @ params["w1"])
        return (h[:, :, None] * params["scale"][None, None, :]).reshape(x.shape[0], -1) @ params["w2"]

    def explicit(params, x):
        h = jax.nn.relu(x @ params["w1"])
        wide = jnp.broadcast_to(h[:, :, None], (*h.shape, 3))
        return (wide * jnp.broadcast_to(params["scale"], wide.shape)).reshape(x.shape[0], -1) @ params["w2"]

    x = jnp.asarray(rng.normal(size=(3, 5)))
    composite = composites.EpsilonPlus()
    got = jaxlrp.lrp_fn(implicit, composite)(params, x, target=0)
    np.testing.assert_allclose(got, jaxlrp.lrp_fn(explicit, composite)(params, x, target=0), rtol=1e-12, atol=1e-15)
    assert float(jnp.abs(got).sum()) > 0


def test_message_passing_with_segment_sum_and_segment_max():
    """A graph network written with `jax.ops.segment_sum` (scatter-add: a fixed linear map, its
    indices structure), `segment_max` and `.at[].set` (selections). The network is bias-free
    and piecewise linear, so LRP-0 equals gradient × input; the sums are rows of the table."""
    senders, receivers = jnp.array([0, 1, 2, 2, 3, 4]), jnp.array([1, 2, 0, 3, 1, 4])
    graph_of_node = jnp.array([0, 0, 0, 1, 1])

    def gnn(params, x):
        h = x @ params["w1"]
        messages = jax.ops.segment_sum(h[senders], receivers, num_segments=5)
        h = jax.nn.relu(messages @ params["w2"] + h)
        h = h.at[4].set(h[3])  # an overwritten node
        pooled = jax.ops.segment_max(h, graph_of_node, num_segments=2)
        return pooled @ params["w3"]

    rng = np.random.default_rng(0)
    params = {k: jnp.asarray(rng.normal(size=s)) for k, s in {"w1": (3, 6), "w2": (6, 6), "w3": (6, 2)}.items()}
    x = jnp.asarray(rng.normal(size=(5, 3)))
    table = jaxlrp.rule_table(gnn, composites.EpsilonPlus(), params, x)
    assert [info.kind for info in table.layers].count("sum") == 2  # the messages' sum, the residual add
    relevance = jaxlrp.lrp_fn(gnn, composites.LRP0())(params, x, target=jnp.array([1, 0]))
    seed = jax.nn.one_hot(jnp.array([1, 0]), 2, dtype=x.dtype)
    gradient = jax.grad(lambda x: jnp.sum(gnn(params, x) * seed))(x)
    np.testing.assert_allclose(relevance, gradient * x, rtol=1e-9, atol=1e-12)


class DenseAdjacency(nn.Module):
    """Graph convolution with a dense adjacency passed as a keyword argument and reshaped."""

    @nn.compact
    def __call__(self, x, adj):
        h = nn.relu(nn.Dense(4, use_bias=False)(x))
        h = (adj[:, :, :, None] * h[:, None, :, :]).sum(2)
        return nn.Dense(2, use_bias=False)(h.mean(1))


def test_a_float_keyword_argument_the_model_reshapes():
    """The adjacency is traced when passed inside `jit` (before: TracerArrayConversionError
    while planning); LRP-0 equals gradient × input either way."""
    model = DenseAdjacency()
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 5, 3), jnp.float64)
    adj = jax.random.uniform(jax.random.PRNGKey(2), (2, 5, 5), jnp.float64)
    variables = jax.tree.map(lambda a: a.astype(jnp.float64), model.init(jax.random.PRNGKey(1), x, adj))
    explain = jaxlrp.lrp(model, composites.LRP0())
    traced = jax.jit(lambda v, x, a: explain(v, x, target=1, adj=a))(variables, x, adj)
    gradient = jax.grad(lambda x: model.apply(variables, x, adj)[:, 1].sum())(x)
    np.testing.assert_allclose(traced, gradient * x, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(explain(variables, x, target=1, adj=adj), traced, rtol=1e-12, atol=1e-14)


class Normed(nn.Module):
    norm: str
    bias: bool = True

    @nn.compact
    def __call__(self, x):
        x = nn.Conv(8, (3, 3), use_bias=self.bias)(x)
        if self.norm == "group":
            x = nn.GroupNorm(num_groups=2, use_bias=self.bias)(x)
        else:
            x = nn.LayerNorm(use_bias=self.bias)(x)
        return nn.Dense(2, use_bias=self.bias)(nn.relu(x).mean((1, 2)))


@pytest.mark.parametrize("norm", ["group", "layer"])
def test_group_norm_is_one_norm_step_like_layer_norm(norm):
    """GroupNorm's mean is taken over its input regrouped: one "norm" step as LayerNorm's, its
    shift part of it (before: two sums and an unabsorbed "affine" shift that Passed with a
    warning). Without biases the ε rule with 1/σ held conserves."""
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 6, 6, 3), jnp.float64)
    model = Normed(norm)
    variables = jax.tree.map(lambda a: a.astype(jnp.float64), model.init(jax.random.PRNGKey(1), x))
    kinds = [info.kind for info in jaxlrp.rule_table(model, composites.EpsilonPlus(), variables, x).layers]
    assert kinds == ["conv", "norm", "sum", "dense"]  # no UnmergedAffineWarning (an error in the tests)
    bare = Normed(norm, bias=False)
    variables = jax.tree.map(lambda a: a.astype(jnp.float64), bare.init(jax.random.PRNGKey(1), x))
    out, relevance = jaxlrp.output_and_lrp(bare, composites.AttnLRP(epsilon=1e-12))(variables, x)
    np.testing.assert_allclose(relevance.sum((1, 2, 3)), out.max(-1), rtol=1e-9)


def _layer_norm(h, scale):
    mean = h.mean(-1, keepdims=True)
    return (h - mean) * jax.lax.rsqrt(((h - mean) ** 2).mean(-1, keepdims=True) + 1e-6) * scale


@pytest.mark.parametrize("norm", ["layer", "rms"])
def test_a_norm_right_after_a_mean_pool(norm):
    """The pooled value is an activation, not a statistic (before: taken for one, so the norm
    after it was two sums and a product): the map equals explaining the head on the pooled
    value, then the body seeded with that relevance."""
    rng = np.random.default_rng(0)
    params = {"w1": jnp.asarray(rng.normal(size=(4, 6))), "b1": jnp.asarray(rng.normal(size=(6,))),
              "scale": jnp.asarray(1 + 0.3 * rng.normal(size=(6,))), "w2": jnp.asarray(rng.normal(size=(6, 3)))}

    def body(params, x):
        return jax.nn.relu(x @ params["w1"] + params["b1"]).mean(1)

    def head(params, pooled):
        if norm == "layer":
            normed = _layer_norm(pooled, params["scale"])
        else:
            normed = pooled * jax.lax.rsqrt((pooled * pooled).mean(-1, keepdims=True) + 1e-6) * params["scale"]
        return normed @ params["w2"]

    def full(params, x):
        return head(params, body(params, x))

    x = jnp.asarray(rng.normal(size=(2, 5, 4)))
    composite = composites.AttnLRP(epsilon=1e-9)
    kinds = [info.kind for info in jaxlrp.rule_table(full, composite, params, x).layers]
    assert kinds == ["dense", "sum", "norm", "dense"], kinds
    target = jnp.array([0, 2])
    at_pooled = jaxlrp.lrp_fn(head, composite)(params, body(params, x), target=target)
    staged = jaxlrp.lrp_fn(body, composite)(params, x, target=at_pooled)
    np.testing.assert_allclose(jaxlrp.lrp_fn(full, composite)(params, x, target=target), staged, rtol=1e-9, atol=1e-12)


def test_a_layer_norm_written_with_jnp_equals_flax_layer_norm():
    """`(x − mean)·rsqrt(mean((x − mean)²) + ε)·γ + β` computes `x − mean` twice, once for the
    variance: that one is left to the statistics, and the map is Flax LayerNorm's (before: the
    first was taken for the centering, the second split by Norm as a sum)."""

    def jnp_layer_norm(h, scale, bias):
        mean = h.mean(-1, keepdims=True)
        variance = ((h - mean) ** 2).mean(-1, keepdims=True)
        return (h - mean) * (jax.lax.rsqrt(variance + 1e-6) * scale) + bias

    rng = np.random.default_rng(0)
    params = {"w": jnp.asarray(rng.normal(size=(4, 6))), "scale": jnp.asarray(1 + 0.2 * rng.normal(size=6)),
              "bias": jnp.asarray(rng.normal(size=6)), "v": jnp.asarray(rng.normal(size=(6, 3)))}
    x = jnp.asarray(rng.normal(size=(3, 4)))

    def with_jnp(p, x):
        return jnp_layer_norm(x @ p["w"], p["scale"], p["bias"]) @ p["v"]

    def with_flax(p, x):
        normed = nn.LayerNorm(epsilon=1e-6).apply({"params": {"scale": p["scale"], "bias": p["bias"]}}, x @ p["w"])
        return normed @ p["v"]

    composite = composites.AttnLRP(epsilon=1e-9)
    for fn in (with_jnp, with_flax):
        assert [info.kind for info in jaxlrp.rule_table(fn, composite, params, x).layers] == ["dense", "norm", "dense"]
    np.testing.assert_allclose(jaxlrp.lrp_fn(with_jnp, composite)(params, x, target=1),
                               jaxlrp.lrp_fn(with_flax, composite)(params, x, target=1), rtol=1e-10, atol=1e-13)
