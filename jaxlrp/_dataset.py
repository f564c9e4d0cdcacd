"""`explain_dataset`: relevance maps of a whole data set, batch by batch, sharded over devices
and hosts, written to a zarr array, resumable.

Layout of the output: a zarr (v2) array with the shape of `x`, written through tensorstore, in
chunks of `batch_size / mesh.shape["data"]` rows, one chunk per device shard of a batch, so that
no two devices (or hosts) ever write the same chunk. tensorstore writes each chunk file whole
(a temporary file, then a rename), so a chunk that exists is complete: the chunks present are
the record of what is done, and a run started again computes only the batches with a chunk
missing and writes only the missing chunks.

Under `jax.distributed.initialize` the same code runs on every host (JAX's multi-controller
model): each process reads the rows of its own devices' shards, the jitted `explain` runs as
one SPMD program over the global mesh, and each process writes its own shards' chunks.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec, SingleDeviceSharding

from jaxlrp._hooks import Explanation

__all__ = ["explain_dataset", "relevance_maximization"]

DATA_AXIS = "data"


def explain_dataset(
    explain: Callable,
    variables,
    x,
    *,
    targets=None,
    out: str | os.PathLike,
    batch_size: int,
    mesh: jax.sharding.Mesh | None = None,
    progress: bool = True,
    dtype=np.float32,
):
    """Explains every sample of `x` and writes the relevance to a zarr array at `out`.

    Args:
      explain: `explain(variables, x, target=...)` as returned by `jaxlrp.lrp` (Linen, NNX
        GraphDef, plain function) or a `jaxlrp.attribution` baseline; with `variables=None`,
        `explain(x, target=...)` (a stateful NNX module). What it explains of the model's
        output is its own `output=` (`jaxlrp.lrp(model, composite, output=lambda out:
        out["logits"])`); the targets refer to that selection.
      variables: the model's variables (replicated over the mesh unless already sharded).
      x: an array-like with `shape` and row slicing (`x[a:b]`): a NumPy array, a memmap, a zarr
        or tensorstore array. Batches are read as they are needed, the next while the current
        one computes.
      targets: keyword-only; `None` (each sample's arg-max), or an array-like of `len(x)` rows:
        a class per sample or the initial relevance per sample (see `jaxlrp.lrp`).
      out: the directory of the zarr array. If it holds one (a run that was stopped), the run
        goes on where it stopped: batches whose chunks are all present are skipped.
      batch_size: samples per step, a multiple of the mesh's `"data"` axis size. The last batch
        may be short (it is padded to `batch_size`, the padding never written).
      mesh: each batch is sharded over its `"data"` axis (`NamedSharding(mesh, P("data"))`);
        `None`: one device, or all devices of all processes when several processes run.
      progress: show a progress bar with the throughput (on the first process).
      dtype: the output's dtype.

    Returns:
      The written array (a `tensorstore.TensorStore`; `np.asarray` reads it).

    Example::

        explain = jaxlrp.lrp(model, composites.EpsilonPlusFlat())
        relevance = jaxlrp.explain_dataset(explain, variables, images, targets=labels,
                                           out="relevance.zarr", batch_size=256)
    """
    if targets is not None and not hasattr(targets, "shape"):
        targets = np.asarray(targets)
    n, sample_shape = int(x.shape[0]), tuple(int(d) for d in x.shape[1:])
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"jaxlrp.explain_dataset: batch_size must be a positive int, got {batch_size!r}.")
    if targets is not None and int(targets.shape[0]) != n:
        raise ValueError(
            f"jaxlrp.explain_dataset: targets has {targets.shape[0]} rows, but x has {n} samples; "
            "pass one target per sample, or None for each sample's arg-max."
        )
    sharding, shards = _batch_sharding(mesh, batch_size)
    chunk_rows = batch_size // shards
    store = _open_output(out, (n, *sample_shape), np.dtype(dtype), chunk_rows)
    done = _chunks_present(out, store.rank)
    starts = _pending(range(0, n, batch_size), done, chunk_rows, shards, n)

    if variables is None:
        compute = jax.jit(lambda x, t: explain(x, target=t), out_shardings=sharding)
    else:
        compute = jax.jit(lambda v, x, t: explain(v, x, target=t), out_shardings=sharding)
    args = () if variables is None else (_replicated(variables, sharding),)

    batches = _run_batches(compute, args, x, targets, starts, batch_size, n, sharding, progress, "explaining")
    writes: list = []
    for start, relevance in batches:
        for future in writes:  # at most one batch of writes in flight
            future.result()
        writes = _write(store, relevance, start, n, done, chunk_rows)
    for future in writes:
        future.result()
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("jaxlrp.explain_dataset: written")
    return store


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
      samples, highest score first, ties broken by the lower index. The running top-k lives on
      the device; each batch's scores are merged into it in one jitted step.
    """
    if by not in ("relevance", "activation") or reduce not in ("sum", "max"):
        raise ValueError(
            f"jaxlrp.concepts.relevance_maximization: by must be 'relevance' or 'activation' and reduce "
            f"'sum' or 'max'; got by={by!r}, reduce={reduce!r}."
        )
    if targets is not None and not hasattr(targets, "shape"):
        targets = np.asarray(targets)
    n = int(data.shape[0])
    if not isinstance(k, int) or not 1 <= k <= n:
        raise ValueError(f"jaxlrp.concepts.relevance_maximization: k must lie in [1, {n}] samples, got {k!r}.")
    sharding, _ = _batch_sharding(mesh, batch_size)
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
    args = () if variables is None else (_replicated(variables, sharding),)

    @jax.jit
    def merge(best, chosen, batch_scores, start):
        rows = (start + jnp.arange(batch_scores.shape[0])).astype(chosen.dtype)
        batch_scores = jnp.where((rows < n)[:, None], batch_scores, -jnp.inf)  # padding never wins
        values = jnp.concatenate([best, batch_scores.T.astype(best.dtype)], axis=1)
        indices = jnp.concatenate([chosen, jnp.broadcast_to(rows, (best.shape[0], rows.shape[0]))], axis=1)
        best, position = jax.lax.top_k(values, k)  # equal values: the earlier position, the lower index
        return best, jnp.take_along_axis(indices, position, axis=1)

    best = chosen = None
    starts = list(range(0, n, batch_size))
    for start, batch_scores in _run_batches(compute, args, data, targets, starts, batch_size, n, sharding, progress,
                                            "maximizing"):
        if best is None:
            channels = batch_scores.shape[1]
            dtype = jnp.promote_types(batch_scores.dtype, jnp.float32)
            best, chosen = jnp.full((channels, k), -jnp.inf, dtype), jnp.full((channels, k), -1, jnp.int32)
        best, chosen = merge(best, chosen, batch_scores, start)
    return chosen, best


def _run_batches(compute, args, x, targets, starts, batch_size: int, n: int, sharding, progress: bool, label: str):
    """Yields `(start, compute(*args, batch, target))` for each batch start, the result
    dispatched (not waited for) and the next batch read while it computes, each process reading
    only its own devices' rows; advances a progress bar over the samples (on the first process)."""

    def load(start):
        batch = _device_batch(x, start, batch_size, n, sharding)
        target = None if targets is None else _device_batch(targets, start, batch_size, n, sharding)
        return batch, target

    completed = n - sum(min(batch_size, n - s) for s in starts)
    with _progress_bar(progress and jax.process_index() == 0, n, completed, label) as advance:
        loaded = load(starts[0]) if starts else None
        for i, start in enumerate(starts):
            result = compute(*args, *loaded)  # dispatched: runs while the next batch loads
            if i + 1 < len(starts):
                loaded = load(starts[i + 1])
            yield start, result
            advance(min(batch_size, n - start))


def _batch_sharding(mesh, batch_size: int):
    """`(sharding of a batch, number of row shards)`."""
    if mesh is None:
        if jax.process_count() == 1:
            return SingleDeviceSharding(jax.devices()[0]), 1
        mesh = jax.make_mesh((jax.device_count(),), (DATA_AXIS,))
    if DATA_AXIS not in mesh.shape:
        raise ValueError(
            f"jaxlrp.explain_dataset: the mesh needs an axis named '{DATA_AXIS}' to shard batches over; "
            f"its axes are {tuple(mesh.shape)}."
        )
    shards = mesh.shape[DATA_AXIS]
    if batch_size % shards:
        raise ValueError(
            f"jaxlrp.explain_dataset: batch_size {batch_size} does not divide over the {shards} devices "
            f"of the mesh's '{DATA_AXIS}' axis; use a multiple of {shards}."
        )
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS)), shards


def _replicated(variables, sharding):
    """Array leaves not yet placed on the batch's devices, replicated over them (under several
    processes, every process holds the same values)."""
    if isinstance(sharding, SingleDeviceSharding):
        return variables
    replicated = NamedSharding(sharding.mesh, PartitionSpec())

    def place(leaf):
        if not isinstance(leaf, (jax.Array, np.ndarray)):
            return leaf
        if isinstance(leaf, jax.Array) and leaf.sharding.device_set == replicated.device_set:
            return leaf
        return jax.make_array_from_callback(leaf.shape, replicated, lambda index, a=np.asarray(leaf): a[index])

    return jax.tree.map(place, variables)


def _spec(out) -> dict:
    return {"driver": "zarr", "kvstore": {"driver": "file", "path": os.fspath(out)}}


def _open_output(out, shape: tuple, dtype: np.dtype, chunk_rows: int):
    """The zarr array at `out`: opened if it exists (and matches), else created (by process 0)."""
    import tensorstore as ts

    if jax.process_index() == 0 and not os.path.exists(os.path.join(out, ".zarray")):
        chunks = ts.ChunkLayout(chunk_shape=[chunk_rows, *shape[1:]])
        spec = {**_spec(out), "store_data_equal_to_fill_value": True}
        ts.open(spec, create=True, dtype=dtype, shape=shape, chunk_layout=chunks, fill_value=np.nan).result()
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("jaxlrp.explain_dataset: created")
    store = ts.open({**_spec(out), "store_data_equal_to_fill_value": True}, open=True).result()
    found = (tuple(store.shape), np.dtype(store.dtype.numpy_dtype), store.chunk_layout.read_chunk.shape[0])
    if found != (shape, dtype, chunk_rows):
        raise ValueError(
            f"jaxlrp.explain_dataset: '{out}' holds an array of shape {found[0]}, dtype {found[1]} in chunks "
            f"of {found[2]} rows, but this run writes shape {shape}, dtype {dtype} in chunks of {chunk_rows} "
            f"rows (batch_size / devices). Choose another `out`, delete it, or resume with the settings it "
            "was started with."
        )
    return store


def _chunks_present(out, rank: int) -> set[int]:
    """Row-chunk indices of the chunks written so far (listed once, before this run writes)."""
    present = set()
    for name in os.listdir(out):  # chunk keys are "i.0.0"; a write cut short leaves "i.0.0.__lock"
        parts = name.split(".")
        if len(parts) == rank and all(p.isdigit() for p in parts):
            present.add(int(parts[0]))
    if jax.process_count() > 1:  # every process decides on the same listing
        multihost_utils.sync_global_devices("jaxlrp.explain_dataset: listed")
    return present


def _pending(starts, done: set[int], chunk_rows: int, shards: int, n: int) -> list[int]:
    """The batch starts with a chunk missing; the same list on every process."""
    missing = np.array([
        any(c not in done for c in range(s // chunk_rows, min(s // chunk_rows + shards, -(-n // chunk_rows))))
        for s in starts
    ])
    if jax.process_count() > 1:
        missing = np.asarray(multihost_utils.process_allgather(missing)).any(axis=0)
    return [s for s, m in zip(starts, missing) if m]


def _rows(source, start: int, stop: int, n: int) -> np.ndarray:
    """`source[start:stop]` as NumPy, padded past `n` by repeating the last row."""
    if stop <= n:
        return np.asarray(source[start:stop])
    last = np.asarray(source[n - 1 : n])
    rows = [np.asarray(source[start:n])] if start < n else []
    return np.concatenate([*rows, np.repeat(last, stop - max(start, n), axis=0)])


def _device_batch(source, start: int, batch_size: int, n: int, sharding) -> jax.Array:
    """Rows `start : start + batch_size`, each process reading only its own devices' rows."""
    shape = (batch_size, *source.shape[1:])

    def shard(index):
        rows = index[0]
        lo, hi = start + (rows.start or 0), start + (batch_size if rows.stop is None else rows.stop)
        return _rows(source, lo, hi, n)[(slice(None), *index[1:])]

    return jax.make_array_from_callback(shape, sharding, shard)


def _write(store, relevance: jax.Array, start: int, n: int, done: set[int], chunk_rows: int) -> list:
    """Starts writing this process's shards of a batch (one chunk each); returns the futures."""
    futures = []
    for shard in relevance.addressable_shards:
        rows = shard.index[0]
        lo = start + (rows.start or 0)
        hi = min(n, start + (relevance.shape[0] if rows.stop is None else rows.stop))
        if shard.replica_id != 0 or lo >= hi or lo // chunk_rows in done:
            continue
        data = np.asarray(shard.data)[: hi - lo].astype(store.dtype.numpy_dtype)
        futures.append(store[lo:hi].write(data))
    return futures


@contextlib.contextmanager
def _progress_bar(show: bool, total: int, completed: int, label: str = "explaining"):
    """Yields `advance(k)`: a rich progress bar over samples with the throughput, or nothing."""
    if not show:
        yield lambda k: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    started, counted = time.perf_counter(), 0
    with Progress(TextColumn(label), BarColumn(), MofNCompleteColumn(),
                  TextColumn("{task.fields[rate]} samples/s"), TimeRemainingColumn()) as bar:
        task = bar.add_task("explain", total=total, completed=completed, rate="-")

        def advance(k: int) -> None:
            nonlocal counted
            counted += k
            rate = counted / max(time.perf_counter() - started, 1e-9)
            bar.update(task, advance=k, rate=f"{rate:,.1f}")

        yield advance
        bar.refresh()
