"""Train a tiny keras-hub Llama (Keras 3 on JAX) to copy a sequence, then explain what each copied
token drew on with `jaxlrp.explain_generation`: one (K, T) relevance matrix per sequence, from
one forward pass. A copying model should put each generated token's relevance on the prompt
token it copies; the script counts how often that token ranks first, under AttnLRP and CP-LRP,
and writes the matrix of one sequence as a PNG and an HTML table.

    python examples/keras_hub_llm.py [--small] [--out DIR]
"""

import os

os.environ.setdefault("KERAS_BACKEND", "jax")  # before Keras is imported

import argparse  # noqa: E402
import pathlib  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import keras  # noqa: E402
import keras_hub  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import jaxlrp  # noqa: E402
from jaxlrp import composites, viz  # noqa: E402

VOCAB, PROMPT, SEP = 12, 5, 1  # tokens 2..11 are copied; 1 separates the prompt from its copy


def sequences(n: int, seed: int) -> np.ndarray:
    """`prompt, SEP, prompt`: (n, 2 · PROMPT + 1) token ids."""
    prompt = np.random.default_rng(seed).integers(2, VOCAB, (n, PROMPT))
    return np.concatenate([prompt, np.full((n, 1), SEP), prompt], axis=1).astype(np.int32)


def inputs(ids) -> dict:
    return {"token_ids": jnp.asarray(ids), "padding_mask": jnp.ones(ids.shape, jnp.int32)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="a short run (CI)")
    parser.add_argument("--out", default="keras-hub-llm", help="folder for the PNG and HTML matrix")
    args = parser.parse_args()
    keras.utils.set_random_seed(0)
    backbone = keras_hub.models.LlamaBackbone(vocabulary_size=VOCAB, num_layers=2, num_query_heads=4,
                                              num_key_value_heads=2, hidden_dim=32, intermediate_dim=64)
    model = keras_hub.models.LlamaCausalLM(backbone=backbone, preprocessor=None)
    train = sequences(2048 if args.small else 4096, seed=0)
    weights = np.zeros((1, train.shape[1] - 1), np.float32)
    weights[:, PROMPT:] = 1.0  # the loss on the copied tokens only
    # Trained the JAX way, through the model's pure function (keras-hub's own fit needs grain).
    trainable = [v.value for v in model.trainable_variables]
    non_trainable = [v.value for v in model.non_trainable_variables]
    optimizer = optax.adam(3e-3)

    def loss(trainable, ids):
        logits, _ = model.stateless_call(trainable, non_trainable, inputs(ids[:, :-1]))
        losses = optax.softmax_cross_entropy_with_integer_labels(logits, ids[:, 1:])
        return (losses * weights).sum() / weights.sum()

    @jax.jit
    def step(trainable, state, ids):
        value, grads = jax.value_and_grad(loss)(trainable, ids)
        updates, state = optimizer.update(grads, state, trainable)
        return optax.apply_updates(trainable, updates), state, value

    state = optimizer.init(trainable)
    start = time.perf_counter()
    for i in range(150 if args.small else 600):
        batch = train[(64 * i) % len(train):][:64]
        trainable, state, value = step(trainable, state, jnp.asarray(batch))
    for variable, trained in zip(model.trainable_variables, trainable):
        variable.assign(trained)
    print(f"trained in {time.perf_counter() - start:.1f} s, final loss {float(value):.3f}")

    test = sequences(64, seed=1)
    logits = np.asarray(model(inputs(test)))
    copied = logits[:, PROMPT:-1].argmax(-1) == test[:, PROMPT + 1:]
    print(f"copy accuracy = {copied.mean():.3f}")

    generated = PROMPT + 1  # positions PROMPT + 1 … end were generated; each copies position p − PROMPT − 1
    sources = np.arange(PROMPT)
    for name, composite in (("AttnLRP", composites.AttnLRP()), ("CP-LRP", composites.CPLRP())):
        explain = jaxlrp.explain_generation(model, composite, tokens=lambda x: x["token_ids"])
        start = time.perf_counter()
        matrix = np.asarray(explain(inputs(test), generated=generated)["token_ids"])  # (64, PROMPT, T)
        seconds = time.perf_counter() - start
        top = matrix.argmax(-1) == sources[None, :]  # the copied token ranks first
        print(f"{name}: source token top-1 = {top.mean():.3f} over {top.size} copied tokens ({seconds:.2f} s)")
        if name == "AttnLRP":
            shown = matrix[0]
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    words = [str(t) if t != SEP else "|" for t in test[0]]
    rows = [f"{words[p]} @{p}" for p in range(generated, len(words))]
    viz.save_png(out / "generation.png", viz.token_matrix(words, shown, rows=rows))
    (out / "generation.html").write_text(viz.token_matrix_html(words, shown, rows=rows))
    print(f"wrote {out / 'generation.png'} and {out / 'generation.html'}")


if __name__ == "__main__":
    main()
