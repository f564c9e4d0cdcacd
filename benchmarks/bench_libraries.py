"""Models from other libraries, explained as their users call them: for each (library, model,
composite), the relevance's sum against the explained logit (conservation) and the time of the
jitted explanation against `jax.grad` of the same logit, measured side by side (median of
`--repeats`, after a compile run). Tiny random-init configs; batch 2, 16 tokens or 32×32 images.

    KERAS_BACKEND=jax python benchmarks/bench_libraries.py [--repeats 7] [--json results.json]
"""

import os

os.environ.setdefault("KERAS_BACKEND", "jax")

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import keras  # noqa: E402
import keras_hub  # noqa: E402
import numpy as np  # noqa: E402

import jaxlrp  # noqa: E402
from jaxlrp import composites  # noqa: E402

VOCAB, T = 256, 16


def _median_seconds(fn, repeats: int) -> float:
    jax.block_until_ready(fn())  # compiled
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _language_models():
    small = dict(vocabulary_size=VOCAB, num_layers=2, num_query_heads=4, num_key_value_heads=2, hidden_dim=64,
                 intermediate_dim=128)
    m = keras_hub.models
    yield "Llama", m.LlamaCausalLM(backbone=m.LlamaBackbone(**small), preprocessor=None)
    yield "Mistral", m.MistralCausalLM(backbone=m.MistralBackbone(**small), preprocessor=None)
    yield "Gemma", m.GemmaCausalLM(backbone=m.GemmaBackbone(**small, head_dim=16), preprocessor=None)
    gemma2 = m.GemmaBackbone(**small, head_dim=16, query_head_dim_normalize=False, use_post_ffw_norm=True,
                             use_post_attention_norm=True, final_logit_soft_cap=30.0, attention_logit_soft_cap=50.0,
                             use_sliding_window_attention=True, sliding_window_size=8)
    yield "Gemma 2", m.GemmaCausalLM(backbone=gemma2, preprocessor=None)
    yield "Qwen3", m.Qwen3CausalLM(backbone=m.Qwen3Backbone(**small, head_dim=16), preprocessor=None)
    gpt2 = m.GPT2Backbone(vocabulary_size=VOCAB, num_layers=2, num_heads=4, hidden_dim=64, intermediate_dim=128,
                          max_sequence_length=T)
    yield "GPT-2", m.GPT2CausalLM(backbone=gpt2, preprocessor=None)


def _vision_models():
    m = keras_hub.models
    vit = m.ViTBackbone(image_shape=(32, 32, 3), patch_size=8, num_layers=2, num_heads=4, hidden_dim=64, mlp_dim=128)
    yield "ViT", m.ViTImageClassifier(backbone=vit, num_classes=10, preprocessor=None), (("AttnLRP", composites.AttnLRP()),)
    resnet = m.ResNetBackbone(input_conv_filters=[64], input_conv_kernel_sizes=[3], stackwise_num_filters=[64, 64],
                              stackwise_num_blocks=[1, 1], stackwise_num_strides=[1, 2], block_type="basic_block",
                              image_shape=(32, 32, 3))
    cnn = (("EpsilonPlusFlat", composites.EpsilonPlusFlat()),
           ("EpsilonGammaBox", composites.EpsilonGammaBox(low=-3.0, high=3.0)))
    yield "ResNet", m.ResNetImageClassifier(backbone=resnet, num_classes=10, preprocessor=None), cnn


def _row(library, name, model, composite_name, composite, x, output, ids_key, repeats):
    explain = jax.jit(jaxlrp.output_and_lrp(model, composite, output=output))
    out, relevance = explain(x)
    r = relevance[ids_key] if ids_key else relevance
    conservation = float(np.median(np.asarray(r.reshape(r.shape[0], -1).sum(-1) / out.max(-1))))
    select = output or (lambda y: y)
    trainable = [v.value for v in model.trainable_variables]
    non_trainable = [v.value for v in model.non_trainable_variables]

    def logit(trainable, x):
        return select(model.stateless_call(trainable, non_trainable, x)[0]).max(-1).sum()

    if ids_key:  # token ids: the gradient w.r.t. the embedding table (the backward pass to the embeddings)
        table = next(i for i, v in enumerate(model.trainable_variables) if v.path.endswith("token_embedding/embeddings"))

        def gradient(x):
            return jax.grad(lambda t: logit([t if i == table else w for i, w in enumerate(trainable)], x))(
                trainable[table])
    else:  # images: the gradient w.r.t. the input
        def gradient(x):
            return jax.grad(lambda x: logit(trainable, x))(x)

    grad = jax.jit(gradient)
    ours, theirs = _median_seconds(lambda: explain(x), repeats), _median_seconds(lambda: grad(x), repeats)
    return dict(library=library, model=name, composite=composite_name, conservation=round(conservation, 4),
                ms=round(1e3 * ours, 2), grad_ms=round(1e3 * theirs, 2), ratio=round(ours / theirs, 2))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    keras.utils.set_random_seed(0)
    ids = jnp.asarray(np.random.default_rng(0).integers(1, VOCAB, (2, T)), jnp.int32)
    tokens = {"token_ids": ids, "padding_mask": jnp.ones_like(ids)}
    images = jnp.asarray(np.random.default_rng(1).normal(size=(2, 32, 32, 3)), jnp.float32)
    rows = []
    for name, model in _language_models():
        for chosen, composite in (("AttnLRP", composites.AttnLRP()), ("CPLRP", composites.CPLRP())):
            rows.append(_row("keras-hub", name, model, chosen, composite, tokens, lambda y: y[:, -1], "token_ids",
                             args.repeats))
            print(rows[-1], flush=True)
    for name, model, chosen in _vision_models():
        for composite_name, composite in chosen:
            rows.append(_row("keras-hub", name, model, composite_name, composite, images, None, None, args.repeats))
            print(rows[-1], flush=True)
    print(f"\nmachine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, jax {jax.__version__}, "
          f"backend {jax.default_backend()}")
    print("| library | model | composite | relevance sum / logit | jaxlrp ms | jax.grad ms | ratio |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['library']} | {r['model']} | {r['composite']} | {r['conservation']} | {r['ms']} | "
              f"{r['grad_ms']} | {r['ratio']}× |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
