"""Concepts: which hidden channels carry a decision (Achtibat et al. 2023, "From attribution
maps to human-understandable explanations through Concept Relevance Propagation").

A concept is a channel (the last axis) of a module's output. Record the relevance arriving
there with `jaxlrp.lrp(model, composite, record=(path,))`, rank the channels with
`top_concepts`, and get each one's map in the input with `conditions={path: one_hot}`, all
concepts at once under `jax.vmap`.

Example::

    explain = jaxlrp.lrp(model, composites.EpsilonPlusFlat(), record=("Conv_1",))
    explanation = explain(variables, x, y)
    channels, relevance = concepts.top_concepts(explanation, "Conv_1", k=4)   # (B, 4) each
    masks = jax.nn.one_hot(channels, 32)                                       # (B, 4, 32)
    maps = jax.vmap(lambda m: explain(variables, x, y, conditions={"Conv_1": m}).input,
                    in_axes=1)(masks)                                          # (4, B, ...)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxlrp._dataset import relevance_maximization
from jaxlrp._hooks import Explanation

__all__ = ["channel_relevance", "relevance_maximization", "top_concepts"]


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
