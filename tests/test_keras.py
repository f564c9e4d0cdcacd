"""Keras 3 models (JAX backend) explained as they are: `jaxlrp.lrp(model)` reads the model's
current variables, `jaxlrp.lrp(model.stateless_call)` takes them as arguments; Keras layer
paths are the module paths of the rule table, `NameMap` and `record=`.

CNN twins of `twins.py` (same weights) equal zennit in float64; a small Keras transformer
(Embedding, MultiHeadAttention on both of its attention paths, LayerNormalization) is planned
as the Flax ones are and conserves under CP-LRP when bias-free.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxlrp
from jaxlrp import composites, rules

import keras_twins
import peers

RTOL = 1e-9
TARGETS = np.array([3, 0, 7])


def _keras():
    return peers.require("keras")


def _zennit(torch_model, x_nchw, case):
    torch = peers.require("torch")
    zennit = peers.zennit()
    from zennit.attribution import Gradient
    from zennit.canonizers import SequentialMergeBatchNorm

    extra = dict(low=-3.0, high=3.0) if case == "EpsilonGammaBox" else {}
    composite = getattr(zennit.composites, case)(canonizers=[SequentialMergeBatchNorm()], **extra)
    x = torch.tensor(x_nchw, requires_grad=True)
    eye = torch.eye(10, dtype=torch.float64)
    with Gradient(torch_model, composite) as attributor:
        _, relevance = attributor(x, lambda out: eye[TARGETS] * out)
    return relevance.detach().numpy().transpose(0, 2, 3, 1)


# Every composite on both twins folded; Keras's BatchNormalization under one (suite time).
ZENNIT_CASES = [(name, case, True) for name in ("vgg", "resnet")
                for case in ("EpsilonPlusFlat", "EpsilonGammaBox", "EpsilonAlpha2Beta1")]
ZENNIT_CASES += [(name, "EpsilonGammaBox", False) for name in ("vgg", "resnet")]


@pytest.mark.float64
@pytest.mark.parametrize("name, case, fold", ZENNIT_CASES)
def test_keras_cnn_equals_zennit(name, case, fold):
    """Folded: float64 throughout, equal to float64 precision. With Keras's BatchNormalization,
    which computes in float32 in a float64 model, to float32 precision."""
    torch_model, model, shape = keras_twins.make(name, fold=fold)
    x = np.random.default_rng(0).normal(size=shape)
    theirs = _zennit(torch_model, x.transpose(0, 3, 1, 2), case)
    extra = dict(low=-3.0, high=3.0) if case == "EpsilonGammaBox" else {}
    ours = jaxlrp.lrp(model, getattr(composites, case)(**extra))(jnp.asarray(x), target=jnp.asarray(TARGETS))
    error = np.abs(np.asarray(ours) - theirs).max() / np.abs(theirs).max()
    assert error <= (RTOL if fold else 1e-4), f"relative error {error:.2e}"


@pytest.fixture(scope="module")
def vgg():
    """The VGG twin in float32, Keras's default, with its BatchNormalizations."""
    _, model, shape = keras_twins.make("vgg", dtype="float32")
    x = jnp.asarray(np.random.default_rng(1).normal(size=shape), jnp.float32)
    return model, x


def test_rule_table_names_keras_layers(vgg):
    model, x = vgg
    table = jaxlrp.rule_table(model, composites.EpsilonPlusFlat(), x)
    keras = _keras()
    rows = {(info.path, info.module, info.kind) for info in table.layers}
    assert ("conv1", keras.layers.Conv2D, "conv") in rows
    assert ("fc2", keras.layers.Dense, "dense") in rows
    convs = [info for info in table.layers if info.kind == "conv"]
    assert [info.path for info in convs] == ["conv0", "conv1", "conv2"]
    assert all(info.merged for info in convs), "each BatchNormalization merges into the Conv2D before it"
    assert "conv1/kernel" in convs[1].names


def test_layer_map_and_name_map_take_keras_classes_and_paths(vgg):
    model, x = vgg
    keras = _keras()
    by_class = composites.LayerMap({keras.layers.Conv2D: rules.ZPlus(), keras.layers.Dense: rules.Epsilon(1e-6)})
    by_kind = composites.EpsilonPlus()
    np.testing.assert_allclose(jaxlrp.lrp(model, by_class)(x), jaxlrp.lrp(model, by_kind)(x), rtol=1e-6, atol=1e-7)
    flat_conv1 = composites.combine(composites.NameMap({"conv1": rules.Flat()}), by_kind)
    table = jaxlrp.rule_table(model, flat_conv1, x)
    assert [type(rule).__name__ for info, rule in zip(table.layers, table.rules) if info.kind == "conv"] == ["ZPlus", "Flat", "ZPlus"]
    assert not np.allclose(jaxlrp.lrp(model, flat_conv1)(x), jaxlrp.lrp(model, by_kind)(x))
    with pytest.raises(ValueError, match="conv0"):  # the error lists the model's paths
        jaxlrp.lrp(model, composites.combine(composites.NameMap({"no_such_layer": rules.Flat()}), by_kind))(x)


def test_record_lists_keras_layers(vgg):
    model, x = vgg
    explanation = jaxlrp.lrp(model, composites.EpsilonPlus(), record=("conv*", "fc1"))(x)
    assert set(explanation.layers) == {"conv0", "conv1", "conv2", "fc1"}
    assert explanation.activations["fc1"].shape == (x.shape[0], 32)
    with pytest.raises(ValueError, match="conv0"):
        jaxlrp.lrp(model, composites.EpsilonPlus(), record=("nothing_here",))(x)


def test_stateless_form_is_pure_and_the_stateful_form_reads_current_variables(vgg):
    model, x = vgg
    composite = composites.EpsilonPlusFlat()
    trainable = [v.value for v in model.trainable_variables]
    non_trainable = [v.value for v in model.non_trainable_variables]
    pure = jax.jit(jaxlrp.lrp(model.stateless_call, composite))
    stateful = jaxlrp.lrp(model, composite)
    before = stateful(x)
    np.testing.assert_allclose(pure(trainable, non_trainable, x), before, rtol=1e-5, atol=1e-7)
    # vmap over samples equals the batch
    one = jax.vmap(lambda xi: stateful(xi[None])[0])(x)
    np.testing.assert_allclose(one, before, rtol=1e-5, atol=1e-7)
    # the stateful form reads the variables at each call; the pure one gets them passed
    scaled = [2.0 * t if i >= len(trainable) - 2 else t for i, t in enumerate(trainable)]  # fc2's kernel and bias
    weights = model.get_weights()
    try:
        for variable, value in zip(model.trainable_variables, scaled):
            variable.assign(value)
        after = stateful(x)
    finally:
        model.set_weights(weights)
    np.testing.assert_allclose(after, 2.0 * before, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(pure(scaled, non_trainable, x), after, rtol=1e-5, atol=1e-6)


def test_gradient_with_respect_to_epsilon(vgg):
    model, x = vgg

    def total(eps):
        return jaxlrp.lrp(model, composites.LayerMap({("dense", "conv"): rules.Epsilon(eps)}))(x, target=2).sum()

    slope = jax.grad(total)(0.1)
    finite = (total(0.1 + 1e-2) - total(0.1 - 1e-2)) / 2e-2
    assert np.isfinite(slope) and abs(slope - finite) <= 0.05 * abs(finite) + 1e-5


def _transformer(keras, bias: bool, scores: bool, dtype="float32"):
    """A two-block causal Keras transformer over token ids; `scores`: MultiHeadAttention's
    einsum path (it returns the scores), else its `ops.dot_product_attention` path."""
    layers = keras.layers
    ids = keras.Input((6,), dtype="int32")
    x = layers.Embedding(20, 16, name="embed", dtype=dtype)(ids)
    for i in range(2):
        h = layers.LayerNormalization(center=bias, name=f"ln{i}", dtype=dtype)(x)
        attention = layers.MultiHeadAttention(2, 8, use_bias=bias, name=f"attn{i}", dtype=dtype)
        h = attention(h, h, use_causal_mask=True, return_attention_scores=scores)
        h = h[0] if scores else h
        x = layers.Add(name=f"res{i}", dtype=dtype)([x, h])
        h = layers.LayerNormalization(center=bias, name=f"ln_mlp{i}", dtype=dtype)(x)
        h = layers.Dense(32, activation="gelu", use_bias=bias, name=f"up{i}", dtype=dtype)(h)
        x = layers.Add(name=f"res_mlp{i}", dtype=dtype)([x, layers.Dense(16, use_bias=bias, name=f"down{i}", dtype=dtype)(h)])
    x = layers.GlobalAveragePooling1D(name="pool", dtype=dtype)(x)
    model = keras.Model(ids, layers.Dense(5, use_bias=bias, name="head", dtype=dtype)(x))
    return model


@pytest.fixture(scope="module")
def tokens():
    return jnp.asarray(np.random.default_rng(2).integers(0, 20, (3, 6)), jnp.int32)


@pytest.mark.parametrize("scores", [False, True], ids=["dot_product_attention", "einsum"])
def test_keras_transformer_under_attnlrp_and_cplrp(scores, tokens):
    keras = _keras()
    keras.utils.set_random_seed(0)
    model = _transformer(keras, bias=False, scores=scores)
    table = jaxlrp.rule_table(model, composites.AttnLRP(), tokens)
    kinds = [(info.path.split("/")[0], info.kind) for info in table.layers]
    assert kinds.count(("attn0", "softmax")) == 1 and kinds.count(("attn0", "bilinear")) == 2
    paths = [info.path for info in table.layers]
    assert "ln0" in paths and "attn1/query" in paths
    out, relevance = jaxlrp.output_and_lrp(model, composites.CPLRP())(tokens)
    assert relevance.shape == tokens.shape
    # bias-free: CP-LRP conserves the explained logit (the arg-max) over the tokens
    np.testing.assert_allclose(relevance.sum(1), out.max(1), rtol=2e-4)
    attn = jaxlrp.lrp(model, composites.AttnLRP())(tokens)
    assert np.all(np.isfinite(attn)) and not np.allclose(attn, relevance)


def test_both_attention_paths_give_the_same_map(tokens):
    keras = _keras()
    keras.utils.set_random_seed(0)
    fused = _transformer(keras, bias=True, scores=False)
    einsum = _transformer(keras, bias=True, scores=True)
    einsum.set_weights(fused.get_weights())
    for composite in (composites.AttnLRP(), composites.CPLRP()):
        np.testing.assert_allclose(jaxlrp.lrp(einsum, composite)(tokens), jaxlrp.lrp(fused, composite)(tokens),
                                   rtol=1e-4, atol=1e-6)


def test_bfloat16_keras_transformer_follows_float32(tokens):
    keras = _keras()
    keras.utils.set_random_seed(0)
    model32 = _transformer(keras, bias=True, scores=False)
    model16 = _transformer(keras, bias=True, scores=False, dtype="bfloat16")
    rounded = [np.asarray(jnp.asarray(w, jnp.bfloat16).astype(jnp.float32)) for w in model32.get_weights()]
    model32.set_weights(rounded)
    model16.set_weights(rounded)
    composite = composites.AttnLRP()
    assert [(i.path, i.kind) for i in jaxlrp.rule_table(model16, composite, tokens).layers] == [
        (i.path, i.kind) for i in jaxlrp.rule_table(model32, composite, tokens).layers]
    r32 = np.asarray(jaxlrp.lrp(model32, composite)(tokens, target=1))
    r16 = np.asarray(jaxlrp.lrp(model16, composite)(tokens, target=1), np.float32)
    assert np.corrcoef(r32.ravel(), r16.ravel())[0, 1] >= 0.99


def test_an_unbuilt_model_is_an_error_naming_build():
    keras = _keras()
    model = keras.Sequential([keras.layers.Dense(3)])
    with pytest.raises(ValueError, match="not built.*build"):
        jaxlrp.lrp(model, composites.EpsilonPlus())


def test_a_subclassed_model_and_the_values_the_pure_form_takes():
    keras = _keras()

    class Net(keras.Model):  # a call without training=
        def __init__(self):
            super().__init__()
            self.hidden, self.head = keras.layers.Dense(8, activation="relu"), keras.layers.Dense(3)

        def call(self, x):
            return self.head(self.hidden(x))

    model = Net()
    x = jnp.asarray(np.random.default_rng(6).normal(size=(4, 5)), jnp.float32)
    model(x)
    relevance = jaxlrp.lrp(model, composites.LRP0())(x)
    gradient = jax.grad(lambda x: model(x).max(1).sum())(x) * x
    np.testing.assert_allclose(relevance, gradient, rtol=1e-4, atol=1e-6)  # LRP-0 on a ReLU net
    layers = jaxlrp.rule_table(model, composites.LRP0(), x).layers
    assert [info.module for info in layers] == [keras.layers.Dense] * 2
    assert [info.path for info in layers] == [model.hidden.name, model.head.name]
    pure = jaxlrp.lrp(model.stateless_call, composites.LRP0())
    with pytest.raises(TypeError, match=r"values, not the variables.*v\.value"):
        pure(model.trainable_variables, model.non_trainable_variables, x)
    with pytest.raises(ValueError, match="4 trainable and 0 non-trainable variables; got 3 and 0"):
        pure([v.value for v in model.trainable_variables][:3], [], x)
