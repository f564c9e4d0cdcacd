"""keras-hub models, built from tiny random configs, explained as their users call them:
`jaxlrp.lrp(task_model, composite)` on the model's own input dict.

Language models (Llama, Mistral, Gemma, Gemma 2 with soft-caps and sliding windows, Qwen3 with
QK-norm, GPT-2, BERT): one softmax and two bilinear rows per attention, CP-LRP conserving the
explained logit on the bias-free ones, the same map on both of keras-hub's attention paths
(`ops.dot_product_attention` and the einsum one), bfloat16 following float32, and
`explain_generation` equal to one call per generated token. Vision (ViT, ResNet, EfficientNet):
the CNN composites and AttnLRP run with the rows expected.
"""

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxlrp
from jaxlrp import composites

import peers

VOCAB, T = 40, 6


def _hub():
    peers.require("keras")
    return peers.require("keras_hub")


def _ids(seed=0, batch=2):
    ids = jnp.asarray(np.random.default_rng(seed).integers(1, VOCAB, (batch, T)), jnp.int32)
    return {"token_ids": ids, "padding_mask": jnp.ones_like(ids)}


def _causal_lm(name: str, dtype=None):
    hub = _hub()
    import keras

    keras.utils.set_random_seed(0)
    models = hub.models
    small = dict(vocabulary_size=VOCAB, num_layers=2, num_query_heads=4, num_key_value_heads=2, hidden_dim=16,
                 intermediate_dim=32, dtype=dtype)
    if name == "llama":
        return models.LlamaCausalLM(backbone=models.LlamaBackbone(**small), preprocessor=None)
    if name == "mistral":
        return models.MistralCausalLM(backbone=models.MistralBackbone(**small, sliding_window=4), preprocessor=None)
    if name == "gemma":
        return models.GemmaCausalLM(backbone=models.GemmaBackbone(**small, head_dim=4), preprocessor=None)
    if name == "gemma2":
        backbone = models.GemmaBackbone(
            **small, head_dim=4, query_head_dim_normalize=False, use_post_ffw_norm=True, use_post_attention_norm=True,
            final_logit_soft_cap=30.0, attention_logit_soft_cap=50.0, use_sliding_window_attention=True,
            sliding_window_size=4)
        return models.GemmaCausalLM(backbone=backbone, preprocessor=None)
    if name == "qwen3":
        return models.Qwen3CausalLM(backbone=models.Qwen3Backbone(**small, head_dim=4), preprocessor=None)
    if name == "gpt2":
        backbone = models.GPT2Backbone(vocabulary_size=VOCAB, num_layers=2, num_heads=2, hidden_dim=16,
                                       intermediate_dim=32, max_sequence_length=16, dtype=dtype)
        return models.GPT2CausalLM(backbone=backbone, preprocessor=None)
    raise ValueError(name)


BIAS_FREE = ["llama", "mistral", "gemma", "gemma2", "qwen3"]
LAST = dict(output=lambda logits: logits[:, -1])  # the next token's logits


def _kinds(table, kind):
    return sum(info.kind == kind for info in table.layers)


@pytest.mark.parametrize("name", [n for n in BIAS_FREE if n != "gemma"] + ["gpt2"])  # Gemma: Gemma 2's code, fewer options
def test_causal_lms_rows_and_cplrp_conservation(name):
    model = _causal_lm(name)
    x = _ids()
    table = jaxlrp.rule_table(model, composites.AttnLRP(), x, **LAST)
    assert _kinds(table, "softmax") == 2 and _kinds(table, "bilinear") == 4, str(table)
    assert all(info.path for info in table.layers), "every row names its keras-hub layer"
    held = jaxlrp.rule_table(model, composites.CPLRP(), x, **LAST)  # attention weights held: A·V is linear in V
    assert _kinds(held, "softmax") == 0 and _kinds(held, "bilinear") == 0, str(held)
    out, relevance = jaxlrp.output_and_lrp(model, composites.CPLRP(), **LAST)(x)
    assert set(relevance) == {"token_ids", "padding_mask"}
    assert relevance["token_ids"].shape == relevance["padding_mask"].shape == (2, T)
    if name in BIAS_FREE:  # the explained (arg-max) logit, conserved over the tokens
        np.testing.assert_allclose(relevance["token_ids"].sum(1), out.max(1), rtol=2e-3, atol=1e-6)
    attn = jaxlrp.lrp(model, composites.AttnLRP(), **LAST)(x)["token_ids"]
    assert np.all(np.isfinite(attn)) and not np.allclose(attn, relevance["token_ids"])


def test_a_padded_batch_with_a_bool_mask():
    """keras-hub's preprocessors pad and give a bool mask: padded tokens get no relevance, the
    mask is structure (zero), and CP-LRP still conserves the logit on the real tokens."""
    model = _causal_lm("llama")
    x = _ids(5)
    mask = jnp.asarray([[False, False, True, True, True, True], [True] * T])  # the first sequence left-padded
    x = {"token_ids": x["token_ids"], "padding_mask": mask}
    out, relevance = jaxlrp.output_and_lrp(model, composites.CPLRP(), **LAST)(x)
    ids = np.asarray(relevance["token_ids"])
    assert np.all(ids[0, :2] == 0) and np.all(ids[0, 2:] != 0), ids
    assert relevance["padding_mask"].shape == mask.shape
    np.testing.assert_allclose(ids.sum(1), out.max(1), rtol=2e-3, atol=1e-6)
    unmasked = jaxlrp.lrp(model, composites.CPLRP(), **LAST)({**x, "padding_mask": jnp.ones_like(mask)})
    assert np.all(np.asarray(unmasked["token_ids"])[0, :2] != 0), "without the mask the pads draw relevance"


def test_both_attention_paths_give_the_same_map(monkeypatch):
    model = _causal_lm("llama")
    x = _ids(1)
    fused = {c: jaxlrp.lrp(model, c, **LAST)(x)["token_ids"] for c in (composites.AttnLRP(), composites.CPLRP())}
    attention = importlib.import_module("keras_hub.src.models.llama.llama_attention")  # where keras-hub decides
    assert attention.fused_attention_op_available(), "on JAX, keras-hub's Llama uses ops.dot_product_attention"
    monkeypatch.setattr(attention, "fused_attention_op_available", lambda: False)  # its einsum path
    jax.clear_caches()
    for composite, reference in fused.items():
        einsum = jaxlrp.lrp(model, composite, **LAST)(x)["token_ids"]
        np.testing.assert_allclose(einsum, reference, rtol=1e-4, atol=1e-6)


def test_explain_generation_on_a_keras_hub_lm_equals_one_call_per_token():
    model = _causal_lm("qwen3")
    x = _ids(2)
    explain = jaxlrp.explain_generation(model, composites.CPLRP(), tokens=lambda x: x["token_ids"])
    matrix = explain(x, generated=3)["token_ids"]
    assert matrix.shape == (2, T - 3, T)
    logits = model(x)
    ids, rows = x["token_ids"], jnp.arange(2)
    for k, p in enumerate(range(3, T)):
        seed = jnp.zeros_like(logits).at[rows, p - 1, ids[:, p]].set(logits[rows, p - 1, ids[:, p]])
        one = jaxlrp.lrp(model, composites.CPLRP())(x, target=seed)["token_ids"]
        np.testing.assert_allclose(matrix[:, k], one, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(matrix[:, k].sum(1), logits[rows, p - 1, ids[:, p]], rtol=2e-3, atol=1e-6)


def test_bfloat16_lm_follows_float32_with_the_same_rows():
    model32, model16 = _causal_lm("llama"), _causal_lm("llama", dtype="bfloat16")
    rounded = [np.asarray(jnp.asarray(w, jnp.bfloat16).astype(jnp.float32)) for w in model32.get_weights()]
    model32.set_weights(rounded)
    model16.set_weights(rounded)
    x = _ids(3)
    target = jnp.argmax(model32(x)[:, -1], -1)
    def rows(model, composite):  # without the paths, which Keras numbers per model built
        table = jaxlrp.rule_table(model, composite, x, **LAST)
        return [(i.type_name, i.kind, repr(r)) for i, r in zip(table.layers, table.rules)]

    for composite in (composites.AttnLRP(), composites.CPLRP()):
        assert rows(model16, composite) == rows(model32, composite)
        r32 = np.asarray(jaxlrp.lrp(model32, composite, **LAST)(x, target=target)["token_ids"])
        r16 = np.asarray(jaxlrp.lrp(model16, composite, **LAST)(x, target=target)["token_ids"], np.float32)
        assert np.corrcoef(r32.ravel(), r16.ravel())[0, 1] >= 0.99


def test_bert_classifier():
    hub = _hub()
    import keras

    keras.utils.set_random_seed(0)
    backbone = hub.models.BertBackbone(vocabulary_size=VOCAB, num_layers=2, num_heads=2, hidden_dim=16,
                                       intermediate_dim=32, max_sequence_length=16)
    model = hub.models.BertTextClassifier(backbone=backbone, num_classes=3, preprocessor=None)
    x = {**_ids(4), "segment_ids": jnp.zeros((2, T), jnp.int32)}
    table = jaxlrp.rule_table(model, composites.AttnLRP(), x)
    assert _kinds(table, "softmax") == 2 and _kinds(table, "norm") >= 4
    relevance = jaxlrp.lrp(model, composites.AttnLRP())(x)
    assert relevance["token_ids"].shape == (2, T) and np.all(np.isfinite(relevance["token_ids"]))


@pytest.mark.parametrize("name", ["vit", "resnet", "efficientnet"])
def test_vision_models(name):
    hub = _hub()
    import keras

    keras.utils.set_random_seed(0)
    models = hub.models
    x = jnp.asarray(np.random.default_rng(5).normal(size=(2, 32, 32, 3)), jnp.float32)
    if name == "vit":
        backbone = models.ViTBackbone(image_shape=(32, 32, 3), patch_size=16, num_layers=2, num_heads=2,
                                      hidden_dim=16, mlp_dim=32)
        model = models.ViTImageClassifier(backbone=backbone, num_classes=3, preprocessor=None)
        composite, expected = composites.AttnLRP(), {"softmax": 2, "bilinear": 4}
    elif name == "resnet":
        backbone = models.ResNetBackbone(input_conv_filters=[64], input_conv_kernel_sizes=[3],
                                         stackwise_num_filters=[64, 16], stackwise_num_blocks=[1, 1],
                                         stackwise_num_strides=[1, 2], block_type="basic_block",
                                         image_shape=(32, 32, 3))
        model = models.ResNetImageClassifier(backbone=backbone, num_classes=3, preprocessor=None)
        composite, expected = composites.EpsilonGammaBox(low=-3.0, high=3.0), {"conv": 6, "sum": 3}
    else:
        backbone = models.EfficientNetBackbone(
            stackwise_width_coefficients=[1.0, 1.0], stackwise_depth_coefficients=[1.0, 1.0],
            stackwise_kernel_sizes=[3, 3], stackwise_num_repeats=[1, 1], stackwise_input_filters=[8, 8],
            stackwise_output_filters=[8, 16], stackwise_expansion_ratios=[1, 2],
            stackwise_squeeze_and_excite_ratios=[0.25, 0.25], stackwise_strides=[1, 2],
            stackwise_block_types=["v1", "v1"], stackwise_force_input_filters=[0, 0],
            stackwise_nores_option=[False, False], num_features=32, input_shape=(32, 32, 3), dropout=0)
        model = models.EfficientNetImageClassifier(backbone=backbone, num_classes=3, preprocessor=None)
        composite, expected = composites.EpsilonPlusFlat(), {"conv": 11, "product": 2}  # the SE gates
    table = jaxlrp.rule_table(model, composite, x)
    for kind, count in expected.items():
        assert _kinds(table, kind) == count, (kind, str(table))
    convs = [info for info in table.layers if info.kind == "conv"]
    if name != "vit":
        assert all(info.merged for info in convs if "se_" not in info.path), "BatchNorms merge into the convs"
    relevance = jaxlrp.lrp(model, composite)(x)
    assert relevance.shape == x.shape and np.all(np.isfinite(relevance))
