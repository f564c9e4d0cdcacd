"""Batches of a data set over devices and hosts, shared by `explain_dataset` and
`relevance_maximization`: each batch sharded over the mesh's `"data"` axis, each process reading
only its own devices' rows, the next batch read while the current one computes, a progress bar
with the throughput."""

from __future__ import annotations

import contextlib
import time

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec, SingleDeviceSharding

from jaxlrp import _digest

DATA_AXIS = "data"


def run_batches(compute, args, x, targets, starts, batch_size: int, n: int, sharding, progress: bool, label: str,
                 digest: bool = False):
    """Yields `(start, compute(*args, batch, target), digests)` for each batch start, the result
    dispatched (not waited for) and the next batch read while it computes, each process reading
    only its own devices' rows; with `digest`, `digests` is `{first row: chunk_digests}` of each
    row shard read.
    Advances a progress bar over the samples (on the first process)."""

    def load(start):
        rows, target_rows = {}, {}
        batch = device_batch(x, start, batch_size, n, sharding, rows)
        target = None if targets is None else device_batch(targets, start, batch_size, n, sharding, target_rows)
        digests = {}
        if digest:
            for lo, values in rows.items():
                given = () if targets is None else (target_rows[lo],)
                digests[lo] = (_digest.of_arrays(values), _digest.of_arrays(*given))
        return (batch, target), digests

    completed = n - sum(min(batch_size, n - s) for s in starts)
    with progress_bar(progress and jax.process_index() == 0, n, completed, label) as advance:
        loaded = load(starts[0]) if starts else None
        for i, start in enumerate(starts):
            (batch, target), digests = loaded
            result = compute(*args, batch, target)  # dispatched: runs while the next batch loads
            if i + 1 < len(starts):
                loaded = load(starts[i + 1])
            yield start, result, digests
            advance(min(batch_size, n - start))


def batch_sharding(mesh, batch_size: int):
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


def replicated(variables, sharding):
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


def pending(starts, done: set[int], chunk_rows: int, shards: int, n: int) -> list[int]:
    """The batch starts with a chunk missing; the same list on every process."""
    missing = np.array([
        any(c not in done for c in range(s // chunk_rows, min(s // chunk_rows + shards, -(-n // chunk_rows))))
        for s in starts
    ])
    if jax.process_count() > 1:
        missing = np.asarray(multihost_utils.process_allgather(missing)).any(axis=0)
    return [s for s, m in zip(starts, missing) if m]


def rows_of(source, start: int, stop: int, n: int) -> np.ndarray:
    """`source[start:stop]` as NumPy, padded past `n` by repeating the last row."""
    if stop <= n:
        return np.asarray(source[start:stop])
    last = np.asarray(source[n - 1 : n])
    rows = [np.asarray(source[start:n])] if start < n else []
    return np.concatenate([*rows, np.repeat(last, stop - max(start, n), axis=0)])


def device_batch(source, start: int, batch_size: int, n: int, sharding, read: dict) -> jax.Array:
    """Rows `start : start + batch_size`, each process reading only its own devices' rows; the
    rows read are added to `read` as `{first row: rows below n}`."""
    shape = (batch_size, *source.shape[1:])

    def shard(index):
        rows = index[0]
        lo, hi = start + (rows.start or 0), start + (batch_size if rows.stop is None else rows.stop)
        rows = rows_of(source, lo, hi, n)
        if lo < n:
            read[lo] = rows[: min(hi, n) - lo]
        return rows[(slice(None), *index[1:])]

    return jax.make_array_from_callback(shape, sharding, shard)


@contextlib.contextmanager
def progress_bar(show: bool, total: int, completed: int, label: str = "explaining"):
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
