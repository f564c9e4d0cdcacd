"""Concepts: which hidden channels carry a decision (Achtibat et al. 2023, "From attribution
maps to human-understandable explanations through Concept Relevance Propagation").

A concept is a channel (the last axis) of a module's output. Record the relevance arriving
there with `jaxlrp.lrp(model, composite, record=(path,))`, rank the channels with
`top_concepts`, and get each one's map in the input with `conditions={path: one_hot}`, all
concepts at once under `jax.vmap`.

Example::

    explain = jaxlrp.lrp(model, composites.EpsilonPlusFlat(), record=("Conv_1",))
    explanation = explain(variables, x, target=y)
    channels, relevance = concepts.top_concepts(explanation, "Conv_1", k=4)   # (B, 4) each
    masks = jax.nn.one_hot(channels, 32)                                       # (B, 4, 32)
    maps = jax.vmap(lambda m: explain(variables, x, target=y, conditions={"Conv_1": m}).input,
                    in_axes=1)(masks)                                          # (4, B, ...)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxlrp._relmax import relevance_maximization
from jaxlrp._hooks import Explanation

__all__ = ["channel_relevance", "receptive_field_crop", "relevance_maximization", "top_concepts"]


def channel_relevance(explanation: Explanation, path: str) -> jax.Array:
    """The relevance of each channel of the recorded module `path`, per sample: its recorded
    relevance summed over every axis but the first (the batch) and the last (the channels),
    shape `(B, C)`."""
    if path not in explanation.layers:
        raise ValueError(
            f"jaxlrp.concepts: '{path}' was not recorded; the recorded paths are {list(explanation.layers)}. "
            f"Pass it to jaxlrp.lrp(..., record=...)."
        )
    relevance = explanation.layers[path]
    return relevance.sum(axis=tuple(range(1, relevance.ndim - 1)))


def top_concepts(explanation: Explanation, path: str, k: int) -> tuple[jax.Array, jax.Array]:
    """The `k` channels of `path` with the highest relevance per sample (ties: the lower
    index first): `(channels, relevance)`, both of shape `(B, k)`, highest first."""
    per_channel = channel_relevance(explanation, path)
    if not 1 <= k <= per_channel.shape[-1]:
        raise ValueError(f"jaxlrp.concepts.top_concepts: k must lie in [1, {per_channel.shape[-1]}] channels, got {k}.")
    relevance, channels = jax.lax.top_k(per_channel, k)
    return channels, relevance


def receptive_field_crop(relevance: jax.Array, threshold: float = 0.1) -> jax.Array:
    """Where a concept's conditional heatmap concentrates: per sample, the smallest box holding
    every position whose positive relevance (summed over the channel axis) reaches `threshold`
    times the map's largest, as `(top, bottom, left, right)` with exclusive ends, shape `(B, 4)`.

    `relevance` is `(B, H, W, C)` (or `(B, H, W)`). A map with no positive relevance gets the
    whole image. Crop a reference sample with `image[top:bottom, left:right]` (zennit-crp shows
    its reference samples cut to the concept's receptive field the same way).
    """
    r = jnp.asarray(relevance)
    if r.ndim == 4:
        r = r.sum(axis=-1)
    if r.ndim != 3:
        raise ValueError(f"jaxlrp.concepts.receptive_field_crop: expected maps (B, H, W[, C]), got {tuple(jnp.shape(relevance))}.")
    positive = jnp.maximum(r, 0)
    peak = positive.max(axis=(1, 2), keepdims=True)
    inside = (positive >= threshold * peak) & (peak > 0)
    rows, cols = inside.any(axis=2), inside.any(axis=1)  # (B, H), (B, W)

    def span(hit):  # first index and one past the last index that is hit; all of it when none
        n = hit.shape[-1]
        first = jnp.where(hit.any(-1), jnp.argmax(hit, axis=-1), 0)
        last = jnp.where(hit.any(-1), n - jnp.argmax(hit[..., ::-1], axis=-1), n)
        return first, last

    (top, bottom), (left, right) = span(rows), span(cols)
    return jnp.stack([top, bottom, left, right], axis=-1)
