"""Concepts in the demo's digits CNN (Concept Relevance Propagation, Achtibat et al. 2023):
which channels of the second convolution carry one prediction, where each sits in the digit,
and which training digits each concept is most relevant for; written as one PNG grid.

    python examples/concepts.py [--small] [--out DIR]
"""

import argparse
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np

import jaxlrp
from jaxlrp import composites, concepts, demo, viz

LAYER = "Conv_1"  # 32 channels, 4x4 positions after the first pooling


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--small", action="store_true", help="3 epochs, 512 training digits searched")
    parser.add_argument("--out", default="jaxlrp-examples", help="where the PNG goes")
    args = parser.parse_args()
    epochs, searched, n_concepts, n_refs = (3, 512, 4, 4) if args.small else (12, None, 6, 6)
    start = time.perf_counter()

    x_train, y_train, x_test, y_test = demo.load_digits(0)
    model, variables = demo.train(x_train, y_train, epochs)
    explain = jaxlrp.lrp(model, composites.EpsilonPlusFlat(), record=(LAYER,))
    print(jaxlrp.rule_table(model, composites.EpsilonPlusFlat(), variables, x_test[:1]))

    # 1. The top concepts of one prediction, and each one's conditional heatmap: one vmapped call.
    x = jnp.asarray(x_test[:1])
    explanation = jax.jit(explain)(variables, x)
    channels, relevance = concepts.top_concepts(explanation, LAYER, k=n_concepts)
    channels, relevance = np.asarray(channels[0]), np.asarray(relevance[0])
    total = float(explanation.input.sum())
    masks = jax.nn.one_hot(channels, explanation.layers[LAYER].shape[-1], dtype=x.dtype)
    conditional = jax.jit(jax.vmap(lambda m: explain(variables, x, conditions={LAYER: m}).input))(masks)
    predicted = int(np.argmax(model.apply(variables, x)[0]))
    print(f"digit {int(y_test[0])}, predicted {predicted}, relevance {total:.4f}")
    for c, r in zip(channels, relevance):
        print(f"concept {LAYER}[{c}]: relevance {r:.4f} ({100 * r / total:.1f}% of the prediction's)")
    # The backward pass is linear in the relevance: every channel's conditional map adds up to the map.
    every = jax.nn.one_hot(jnp.arange(masks.shape[-1]), masks.shape[-1], dtype=x.dtype)
    summed = jax.jit(jax.vmap(lambda m: explain(variables, x, conditions={LAYER: m}).input))(every).sum(axis=0)
    print(f"sum of all {masks.shape[-1]} conditional maps / map: {float(summed.sum()) / total:.6f}")

    # 2. Reference samples: the training digits where each concept is most relevant (RelMax).
    data = x_train if searched is None else x_train[:searched]
    indices, _ = concepts.relevance_maximization(
        explain, variables, data, LAYER, k=n_refs, batch_size=128, progress=False
    )
    refs = np.asarray(indices)[channels]  # (concepts, refs)
    ref_x = jnp.asarray(data[refs.reshape(-1)])
    ref_masks = jnp.repeat(masks, n_refs, axis=0)  # each reference conditioned on its own concept
    ref_maps = jax.jit(lambda x, m: explain(variables, x, conditions={LAYER: m}).input)(ref_x, ref_masks)
    boxes = np.asarray(concepts.receptive_field_crop(ref_maps, threshold=0.2))
    print(f"reference samples ({len(data)} training digits searched):")
    for c, row in zip(channels, refs):
        print(f"  {LAYER}[{c}]: digits {row.tolist()} (labels {y_train[row].tolist()})")

    # 3. One picture: per concept, its map in the explained digit, then its reference samples,
    # each cut to where its own conditional map concentrates, the map overlaid.
    rows = []
    for i in range(n_concepts):
        row = [viz.image(x_test[0], invert=True), viz.heatmap(conditional[i, 0], reduce="sum")]
        for j in range(n_refs):
            top, bottom, left, right = boxes[i * n_refs + j]
            image, heat = np.asarray(ref_x[i * n_refs + j]), np.asarray(ref_maps[i * n_refs + j])
            row.append(viz.overlay(image[top:bottom, left:right], heat[top:bottom, left:right], reduce="sum"))
        rows.append(row)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "concepts.png"
    labels = [f"{LAYER}[{c}]" for c in channels]
    titles = ["digit", "concept", *[f"ref {j + 1}" for j in range(n_refs)]]
    viz.save_png(path, viz.grid(rows, column_labels=titles, row_labels=labels, cell=64))
    print(f"wrote {path}")
    print(f"total time {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
