"""Relevance maximization (RelMax) and activation maximization over a data set: per channel of a
module, the samples where it matters most (Achtibat et al. 2023, zennit-crp's reference samples)."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec, SingleDeviceSharding

from jaxlrp._batches import batch_sharding, replicated, run_batches
from jaxlrp._hooks import Explanation

__all__ = ["relevance_maximization"]


def relevance_maximization(
    explain: Callable,
    variables,
    data,
    path: str,
    *,
    targets=None,
    k: int = 8,
    batch_size: int,
    mesh: jax.sharding.Mesh | None = None,
    progress: bool = True,
    by: str = "relevance",
    reduce: str = "sum",
):
    """For each channel of the module `path`, the `k` samples of `data` where that channel's
    relevance is highest (RelMax; `by="activation"`: its activation, ActMax), as in zennit-crp's
    reference samples (Achtibat et al. 2023).

    Args:
      explain: `explain(variables, x, target=...)` recording `path`:
        `jaxlrp.lrp(model, composite, record=(path,))` (`variables=None`: `explain(x, target=...)`).
      data, targets, batch_size, mesh, progress: as for `explain_dataset`; batches are sharded
        over the mesh's `"data"` axis and read while the previous one computes.
      by: `"relevance"` or `"activation"`.
      reduce: how a channel's values in one sample become its score: `"sum"` over the other
        axes (positions, tokens) or their `"max"`.

    Returns:
      `(indices, scores)`, each of shape `(channels, k)`: per channel, the indices of its top
      samples, highest score first, ties broken by the lower index. A NaN score (a sample whose
      input or relevance holds NaN) ranks below every number, −Inf included: it is chosen only
      when a channel has fewer than `k` samples with a numeric score, and then shows as NaN in
      `scores`. The running top-k lives on the device; each batch's scores are merged into it
      in one jitted step.

    `targets`, when given, needs one entry per sample (`len(targets) == len(data)`), checked
    before any work.
    """
    if by not in ("relevance", "activation") or reduce not in ("sum", "max"):
        raise ValueError(
            f"jaxlrp.concepts.relevance_maximization: by must be 'relevance' or 'activation' and reduce "
            f"'sum' or 'max'; got by={by!r}, reduce={reduce!r}."
        )
    if targets is not None and not hasattr(targets, "shape"):
        targets = np.asarray(targets)
    n = int(data.shape[0])
    if targets is not None and (len(targets.shape) == 0 or int(targets.shape[0]) != n):
        raise ValueError(
            f"jaxlrp.concepts.relevance_maximization: targets needs one entry per sample of data ({n}), "
            f"got targets of shape {tuple(targets.shape)}."
        )
    if not isinstance(k, int) or not 1 <= k <= n:
        raise ValueError(f"jaxlrp.concepts.relevance_maximization: k must lie in [1, {n}] samples, got {k!r}.")
    sharding, _ = batch_sharding(mesh, batch_size)
    field = "layers" if by == "relevance" else "activations"

    def scores(explanation):
        recorded = list(explanation.layers) if isinstance(explanation, Explanation) else []
        if path not in recorded:
            raise ValueError(
                f"jaxlrp.concepts.relevance_maximization: '{path}' was not recorded; the recorded paths are "
                f"{recorded}. Build explain with jaxlrp.lrp(..., record=('{path}',))."
            )
        values = getattr(explanation, field)[path]
        axes = tuple(range(1, values.ndim - 1))
        return values.sum(axis=axes) if reduce == "sum" else values.max(axis=axes)  # (batch, channels)

    # The (batch, channels) scores are small: gathered on every device for the merge.
    gathered = sharding if isinstance(sharding, SingleDeviceSharding) else NamedSharding(sharding.mesh, PartitionSpec())
    if variables is None:
        compute = jax.jit(lambda x, t: scores(explain(x, target=t)), out_shardings=gathered)
    else:
        compute = jax.jit(lambda v, x, t: scores(explain(v, x, target=t)), out_shardings=gathered)
    args = () if variables is None else (replicated(variables, sharding),)

    @jax.jit
    def merge(best, chosen, batch_scores, start):
        rows = (start + jnp.arange(batch_scores.shape[0])).astype(chosen.dtype)
        rows = jnp.where(rows < n, rows, -1)  # padding: no sample, as the empty slots of the start
        values = jnp.concatenate([best, batch_scores.T.astype(best.dtype)], axis=1)
        indices = jnp.concatenate([chosen, jnp.broadcast_to(rows, (best.shape[0], rows.shape[0]))], axis=1)
        # Sorted by kind (a number, then NaN, then no sample), by value descending, then by index.
        kind = jnp.where(indices < 0, 2, jnp.where(jnp.isnan(values), 1, 0))
        key = jnp.where(kind == 0, -values, 0)
        _, _, indices, values = jax.lax.sort((kind, key, indices, values), dimension=1, num_keys=3)
        return values[:, :k], indices[:, :k]

    best = chosen = None
    starts = list(range(0, n, batch_size))
    for start, batch_scores, _ in run_batches(compute, args, data, targets, starts, batch_size, n, sharding, progress,
                                               "maximizing"):
        if best is None:
            channels = batch_scores.shape[1]
            dtype = jnp.promote_types(batch_scores.dtype, jnp.float32)
            best, chosen = jnp.full((channels, k), -jnp.inf, dtype), jnp.full((channels, k), -1, jnp.int32)
        best, chosen = merge(best, chosen, batch_scores, start)
    return chosen, best
