"""`explain_dataset`: relevance maps of a whole data set, batch by batch, sharded over devices
and hosts, written to a zarr v3 store that records what produced it, resumable.

The store (see `_store`) holds one array per result of `explain`, in chunks of `batch_size /
mesh.shape["data"]` rows, one chunk per device shard of a batch, so that no two devices (or
hosts) ever write the same chunk; a per-row `status`; per chunk, digests of the input rows and
targets it was computed from; and, in its attributes, the digests of the program, its constants
and the weights. A run on an existing store first compares all of these with its own and refuses
to mix two runs; it then trusts a chunk only if it decodes (each chunk is CRC-32C checksummed)
and its data digests match, and computes the rest. One run writes at a time (`_lease`).

Under `jax.distributed.initialize` the same code runs on every host (JAX's multi-controller
model): each process reads the rows of its own devices' shards, the jitted `explain` runs as
one SPMD program over the global mesh, and each process writes its own shards' chunks.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import SingleDeviceSharding

from jaxlrp import _digest, _store, _warn
from jaxlrp._batches import batch_sharding, pending, replicated, run_batches
from jaxlrp._hooks import Explanation
from jaxlrp._lease import KEY as LEASE_KEY, Lease
from jaxlrp._store import RowStatus

__all__ = ["CorruptChunkWarning", "InvalidRowsWarning", "explain_dataset"]

WHO = "jaxlrp.explain_dataset"
_PER_SAMPLE = ("output", "activations/")  # results without the many-targets axis


class InvalidRowsWarning(UserWarning):
    """Some rows of a data set could not be explained (NaN input, a target out of range, a
    non-finite result); the store's `status` array says which, and their maps are NaN."""


def explain_dataset(
    explain: Callable,
    variables,
    x,
    *,
    targets=None,
    out,
    batch_size: int,
    mesh: jax.sharding.Mesh | None = None,
    progress: bool = True,
    dtype=np.float32,
    overwrite: bool = False,
):
    """Explains every sample of `x` and writes what `explain` returns to a zarr v3 store at `out`.

    Args:
      explain: `explain(variables, x, target=...)` as returned by `jaxlrp.lrp` (Linen, NNX
        GraphDef, plain function) or a `jaxlrp.attribution` baseline; with `variables=None`,
        `explain(x, target=...)` (a stateful NNX module). What it explains of the model's
        output is its own `output=`; the targets refer to that selection. Built with
        `output_and_lrp` or `record=`, each of its results is written as its own array
        (`output`, `relevance`, `layers/<path>`, `activations/<path>`).
      variables: the model's variables (replicated over the mesh unless already sharded).
      x: an array-like with `shape` and row slicing (`x[a:b]`): a NumPy array, a memmap, a zarr
        or tensorstore array. Batches are read as they are needed, the next while the current
        one computes.
      targets: keyword-only; `None` (each sample's arg-max), or an array-like of `len(x)` rows:
        a class per sample, `K` classes per sample (`(N, K)`: maps of shape `(N, K, ...)`), or
        the initial relevance per sample (see `jaxlrp.lrp`).
      out: where the store is: a directory (`"r.zarr"`, `"~/r.zarr"`, a `pathlib.Path`), a
        tensorstore URL (`"file:///data/r.zarr"`, `"gs://bucket/r.zarr"`, `"memory://r"`) or
        kvstore spec (a dict). If it holds a store from a run with the same weights, program,
        targets and data (a run that was stopped), the run goes on where it stopped: chunks
        that decode and whose input digests match are kept, the rest computed. A store from
        another run is refused, with what differs, before any work.
      batch_size: samples per step, a multiple of the mesh's `"data"` axis size. The last batch
        may be short (it is padded to `batch_size`, the padding never written).
      mesh: each batch is sharded over its `"data"` axis (`NamedSharding(mesh, P("data"))`);
        `None`: one device, or all devices of all processes when several processes run.
      progress: show a progress bar with the throughput (on the first process).
      dtype: the floating dtype of the written arrays.
      overwrite: discard what `out` holds (any store, any files) and start over.

    Returns:
      The written relevance (a `tensorstore.TensorStore`; `np.asarray` reads it); for an
      `explain` that returns more (`output_and_lrp`, `record=`), the same structure with a
      `TensorStore` for each array. The store's `status` array (`jaxlrp.RowStatus` per row) says
      which rows are explained; rows that could not be (NaN input, a target out of range, a
      non-finite result) are NaN in every array, counted in an `InvalidRowsWarning`.

    Example::

        explain = jaxlrp.lrp(model, composites.EpsilonPlusFlat())
        relevance = jaxlrp.explain_dataset(explain, variables, images, targets=labels,
                                           out="relevance.zarr", batch_size=256)
    """
    import tensorstore as ts

    dtype = _float_dtype(dtype)
    targets = _as_targets(targets)
    n = int(x.shape[0])
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"{WHO}: batch_size must be a positive int, got {batch_size!r}.")
    if n == 0:
        raise ValueError(f"{WHO}: x has no samples.")
    if targets is not None and int(targets.shape[0]) != n:
        raise ValueError(
            f"{WHO}: targets has {targets.shape[0]} rows, but x has {n} samples; "
            "pass one target per sample, or None for each sample's arg-max."
        )
    sharding, shards = batch_sharding(mesh, batch_size)
    chunk_rows = batch_size // shards
    context = ts.Context()
    kvstore, where = _store.location(out, context)

    args = () if variables is None else (replicated(variables, sharding),)
    traced, shapes, structure, program = _trace(explain, args, x, targets, batch_size, sharding)
    layout = {
        "rows": n,
        "chunk_rows": chunk_rows,
        "arrays": {name: [[n, *shape[1:]], dtype.name] for name, shape in shapes.items()},
        "targets": _targets_kind(targets),
    }
    provenance = {
        "explain": _description(explain),
        **dict(zip(("program", "constants"), program)),
        "weights": _digest.of_tree(variables),
        "jaxlrp": _version("jaxlrp"),
        "jax": jax.__version__,
    }

    lease = Lease(kvstore, where)
    _agree(lease.acquire, "take the store's lease")
    try:
        store = _prepared(kvstore, where, context, layout, provenance, overwrite)
        done = _trusted(store, x, targets, sharding, batch_size)
        starts = pending(range(0, n, batch_size), done, chunk_rows, shards, n)
        compiled = traced.lower().compile() if starts else None  # a finished store compiles nothing
        batches = run_batches(compiled, args, x, targets, starts, batch_size, n, sharding, progress, "explaining",
                               digest=True)
        writer = _Writer(store, done)
        holding = (lambda: None) if jax.process_index() else lease.check
        for start, (named, status), digests in batches:
            _agree(holding, "hold the store's lease")  # a lost lease stops every process before its next batch
            writer.submit(start, named, status, digests)
        _agree(holding, "hold the store's lease")
        writer.finish()
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("jaxlrp.explain_dataset: written")
    finally:
        lease.release()
    if jax.process_index() == 0:
        _warn_invalid(store, where)
    return _rebuilt(structure, store.arrays)


def _agree(step: Callable, label: str) -> None:
    """Runs `step` on process 0 and raises its error on every process."""
    error = None
    if jax.process_index() == 0:
        try:
            step()
        except Exception as e:  # noqa: BLE001 (re-raised below, on every process)
            error = e
    if jax.process_count() > 1:
        failed = multihost_utils.broadcast_one_to_all(np.int32(error is not None))
        if failed and error is None:
            error = RuntimeError(f"{WHO}: process 0 failed to {label}; see its error.")
    if error is not None:
        raise error


def _float_dtype(dtype) -> np.dtype:
    try:
        found = np.dtype(dtype)
    except TypeError:
        found = None
    if found is None or not np.issubdtype(found, np.floating):
        raise TypeError(f"{WHO}: dtype is the floating dtype of the written maps (np.float32, np.float64, "
                        f"jnp.bfloat16); got {dtype!r}.")
    return found


def _as_targets(targets):
    if targets is None or hasattr(targets, "shape"):
        return targets
    return np.asarray(targets)


def _targets_kind(targets) -> str:
    if targets is None:
        return "none (each sample's arg-max)"
    if np.issubdtype(np.dtype(targets.dtype), np.integer):
        return "a class per sample" if targets.ndim == 1 else f"classes per sample of shape {tuple(targets.shape[1:])}"
    return f"initial relevance of shape {tuple(targets.shape[1:])}"


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "unknown"


def _description(explain) -> str:
    described = getattr(explain, "jaxlrp_description", None)
    if described is not None:
        return _digest.without_addresses(described)
    return f"{getattr(explain, '__module__', '?')}.{getattr(explain, '__qualname__', type(explain).__name__)}"


def _trace(explain, args, x, targets, batch_size: int, sharding):
    """`(traced, {name: shape of a batch}, structure of the result, (program, constants) digests)`:
    `explain` on one batch, with each row's `RowStatus`, traced once (`traced.lower().compile()`
    compiles it)."""
    with_output = getattr(explain, "with_output", None)
    spec = _batch_spec(x, batch_size, sharding)
    target_spec = None if targets is None else _batch_spec(targets, batch_size, sharding)
    structure = {}

    def body(*arguments):
        *params, batch, target = arguments
        if with_output is not None:
            output, result = with_output(*params, batch, target=target)
        else:
            output, result = None, explain(*params, batch, target=target)
        named = _named(result)
        structure["result"] = jax.tree.structure(result, is_leaf=lambda leaf: leaf is None)
        structure["kind"] = _kind(result)
        named = _rows_first(named, batch.shape[0], many=named.get("relevance", batch).ndim == batch.ndim + 1)
        if output is None and "output" in named:
            output = named["output"]
        status = _row_status(batch, target, output, named)
        valid = status == RowStatus.EXPLAINED
        named = {k: jnp.where(valid.reshape(-1, *[1] * (v.ndim - 1)), v, jnp.nan) for k, v in named.items()}
        return named, status

    traced = jax.jit(body, out_shardings=sharding).trace(*args, spec, target_spec)
    shapes = {name: tuple(info.shape) for name, info in traced.out_info[0].items()}
    return traced, shapes, structure, _digest.of_program(traced.jaxpr)


def _batch_spec(source, batch_size: int, sharding) -> jax.ShapeDtypeStruct:
    dtype = jax.dtypes.canonicalize_dtype(np.asarray(source[0:1]).dtype)
    return jax.ShapeDtypeStruct((batch_size, *source.shape[1:]), dtype, sharding=sharding)


def _kind(result) -> str:
    if isinstance(result, Explanation):
        return "explanation"
    if isinstance(result, tuple):
        return "output_and"
    return "dict" if isinstance(result, dict) else "array"


def _named(result) -> dict:
    """`{array name: array}` of what `explain` returned."""
    if isinstance(result, tuple) and not isinstance(result, Explanation) and len(result) == 2:
        inner = _named(result[1])
        return {"output": result[0], **inner}
    if isinstance(result, Explanation):
        return {"relevance": result.input, **{f"layers/{p}": v for p, v in result.layers.items()},
                **{f"activations/{p}": v for p, v in result.activations.items()}}
    if isinstance(result, dict) and all(isinstance(k, str) and k not in ("status", "jaxlrp") for k in result):
        return dict(result)
    if isinstance(result, jax.Array):
        return {"relevance": result}
    raise TypeError(
        f"{WHO}: explain returned {type(result).__name__}; it must return an array (jaxlrp.lrp), "
        "(output, relevance) (jaxlrp.output_and_lrp), an Explanation (record=) or a dict of arrays by name."
    )


def _rows_first(named: dict, rows: int, many: bool) -> dict:
    """With many targets (the relevance one rank above the input), the targets' axis `K`, leading
    as `jaxlrp.lrp` returns it, moved behind the rows of every result but the per-sample ones
    (`output`, `activations/...`)."""
    moved = {}
    for name, value in named.items():
        if not isinstance(value, jax.Array) or value.ndim == 0:
            raise TypeError(f"{WHO}: explain's result '{name}' is not an array with a row per sample.")
        if many and not name.startswith(_PER_SAMPLE):
            value = jnp.moveaxis(value, 0, 1)
        if value.shape[0] != rows:
            raise ValueError(f"{WHO}: explain's result '{name}' has shape {value.shape}, not a row per sample "
                             f"of the batch ({rows}).")
        moved[name] = value
    return moved


def _row_status(batch, target, output, named: dict) -> jax.Array:
    """Each row's `RowStatus`: its input finite, its target a class of the output (`output` known)
    or non-negative, every result finite."""
    rows = batch.shape[0]

    def finite(a):
        if not jnp.issubdtype(a.dtype, jnp.inexact):
            return jnp.ones(rows, bool)
        return jnp.all(jnp.isfinite(a.reshape(rows, -1)), axis=1)

    target_ok = jnp.ones(rows, bool)
    if target is not None and jnp.issubdtype(target.dtype, jnp.integer):
        flat = target.reshape(rows, -1)
        target_ok = jnp.all(flat >= 0, axis=1)
        if output is not None:
            target_ok &= jnp.all(flat < output.shape[-1], axis=1)
    elif target is not None:
        target_ok = finite(target)
    result_ok = jnp.ones(rows, bool)
    for value in named.values():
        result_ok &= finite(value)
    status = jnp.where(result_ok, RowStatus.EXPLAINED, RowStatus.RELEVANCE_NOT_FINITE)
    status = jnp.where(target_ok, status, RowStatus.TARGET_OUT_OF_RANGE)
    return jnp.where(finite(batch), status, RowStatus.INPUT_NOT_FINITE).astype(jnp.uint8)


def _rebuilt(structure: dict, arrays: dict):
    """The stores in the structure of `explain`'s result."""
    kind = structure["kind"]
    if kind == "array":
        return arrays["relevance"]
    if kind == "dict":
        return dict(arrays)

    def explanation():
        layers = {k[len("layers/"):]: v for k, v in arrays.items() if k.startswith("layers/")}
        activations = {k[len("activations/"):]: v for k, v in arrays.items() if k.startswith("activations/")}
        return Explanation(arrays["relevance"], layers, activations)

    if kind == "explanation":
        return explanation()
    inner = explanation() if any(k.startswith(("layers/", "activations/")) for k in arrays) else arrays["relevance"]
    return arrays["output"], inner


def _prepared(kvstore, where: str, context, layout: dict, provenance: dict, overwrite: bool):
    """The store at `out`: created if `out` is empty (or `overwrite`), else opened if it was
    written by a run with this layout and provenance, else an error saying what differs."""
    if overwrite:
        _agree(lambda: _clear(kvstore), "clear `out` (overwrite=True)")
    found = _store.read_attributes(kvstore, where, WHO)
    if jax.process_count() > 1:  # every process has read the same state before process 0 creates
        multihost_utils.sync_global_devices("jaxlrp.explain_dataset: read")
    if found is not None:
        differ = _store.differences(found, layout, provenance)
        if differ:
            raise ValueError(
                f"{WHO}: '{where}' holds a store written by another run: " + "; ".join(differ) + ". Resuming "
                "would mix two runs. Choose another `out`, or pass overwrite=True to discard it and start over."
            )
        return _store.open_store(kvstore, where, context, found)
    created = {}
    _agree(lambda: created.update(store=_store.create(kvstore, where, context, layout, provenance)), "create the store")
    if "store" in created:
        return created["store"]
    return _store.open_store(kvstore, where, context, _store.read_attributes(kvstore, where, WHO))


def _clear(kvstore) -> None:
    """Deletes everything under `out` but the lease this run holds."""
    import tensorstore as ts

    kvstore.delete_range(ts.KvStore.KeyRange("", LEASE_KEY)).result()
    kvstore.delete_range(ts.KvStore.KeyRange(LEASE_KEY + "\0", "")).result()


def _trusted(store, x, targets, sharding, batch_size: int) -> set[int]:
    """The chunks a resume keeps: present, decoding, and computed from the same input rows and
    targets (an error before any work if they were not). Each process checks the chunks its own
    devices write; every process returns the same set."""
    present = store.present()
    if jax.process_count() > 1:
        present = set(np.flatnonzero(np.asarray(multihost_utils.process_allgather(
            np.isin(np.arange(store.chunks), sorted(present)))).all(axis=0)).tolist())
    mine = sorted(c for c in present if c % (batch_size // store.chunk_rows) in _own_positions(sharding, batch_size,
                                                                                             store.chunk_rows))
    corrupt = store.corrupt(mine)
    differ = [c for c in mine if c not in corrupt and chunk_digests(x, targets, store.chunk_slice(c)) != store.digests_of(c)]
    flags = np.zeros((2, store.chunks), bool)
    flags[0, list(corrupt)] = True
    flags[1, differ] = True
    if jax.process_count() > 1:
        flags = np.asarray(multihost_utils.process_allgather(flags)).any(axis=0)
    if flags[1].any():
        rows = [store.chunk_slice(int(c)) for c in np.flatnonzero(flags[1])]
        shown = ", ".join(f"{r.start}:{r.stop}" for r in rows[:4]) + (" and more" if len(rows) > 4 else "")
        raise ValueError(
            f"{WHO}: '{store.where}' holds rows computed from other input data or targets than this run's (rows "
            f"{shown}: their digests differ). Resuming would mix two runs. Choose another `out`, or pass "
            "overwrite=True to discard it and start over."
        )
    store.discard(corrupt)
    if flags[0].any() and jax.process_index() == 0:
        why = "; ".join(f"rows {store.chunk_slice(c).start}:{store.chunk_slice(c).stop}: {w}"
                        for c, w in list(corrupt.items())[:3])
        _warn.warn(f"{WHO}: {int(flags[0].sum())} chunk(s) of '{store.where}' do not decode (cut short or changed "
                   f"on disk) and are computed again ({why}).", CorruptChunkWarning)
    return present - set(np.flatnonzero(flags[0]).tolist())


class CorruptChunkWarning(UserWarning):
    """Chunks of a data-set store that did not decode were found on resume and computed again."""


def _own_positions(sharding, batch_size: int, chunk_rows: int) -> set[int]:
    """The row-chunk positions within a batch that this process's devices hold."""
    if isinstance(sharding, SingleDeviceSharding):
        return {0}
    positions = set()
    for index in sharding.addressable_devices_indices_map((batch_size,)).values():
        positions.add((index[0].start or 0) // chunk_rows)
    return positions


def chunk_digests(x, targets, rows: slice) -> tuple[bytes, bytes]:
    """The digests of the input rows and targets of one chunk, as a store records them."""
    given = () if targets is None else (np.asarray(targets[rows]),)
    return _digest.of_arrays(np.asarray(x[rows])), _digest.of_arrays(*given)


class _Writer:
    """Writes each batch's chunks, and a chunk's status only once its arrays and digests are
    written: a status chunk that exists says the chunk is complete."""

    def __init__(self, store, done: set[int]):
        self.store, self.done = store, done
        self.data: list = []  # futures of the previous batch's arrays and digests
        self.statuses: list = []  # (rows, values) of its status, written once `data` is

    def submit(self, start: int, named: dict, status: jax.Array, digests: dict) -> None:
        self._settle()
        store = self.store
        chunks: dict[int, dict] = {}  # first row: {name: rows}, this process's chunks of the batch
        for name, value in {**named, _store.STATUS: status}.items():
            for shard in value.addressable_shards:
                rows = shard.index[0]
                lo = start + (rows.start or 0)
                hi = min(store.rows, start + (value.shape[0] if rows.stop is None else rows.stop))
                if shard.replica_id != 0 or lo >= hi or lo // store.chunk_rows in self.done:
                    continue
                chunks.setdefault(lo, {})[name] = np.asarray(shard.data)[: hi - lo]
        for lo, values in chunks.items():
            c, hi = lo // store.chunk_rows, lo + len(values[_store.STATUS])
            written = {n: values[n].astype(a.dtype.numpy_dtype) for n, a in store.arrays.items()}
            self.data += [store.arrays[n][lo:hi].write(v) for n, v in written.items()]
            for d, digest in zip(store.digests, (*digests[lo], _store.output_digest(written))):
                self.data.append(d[c : c + 1].write(np.frombuffer(digest, np.uint8)[None]))
            self.statuses.append((lo, hi, values[_store.STATUS]))

    def _settle(self) -> None:
        for future in self.data:
            future.result()
        self.data = []
        written = [self.store.status[lo:hi].write(values) for lo, hi, values in self.statuses]
        for future in written:
            future.result()
        self.statuses = []

    def finish(self) -> None:
        self._settle()


def _warn_invalid(store, where: str) -> None:
    counts = store.status_counts()
    invalid = {s: k for s, k in counts.items() if s not in (RowStatus.UNWRITTEN, RowStatus.EXPLAINED) and k}
    if invalid:
        said = ", ".join(f"{k} {s.name.lower().replace('_', ' ')}" for s, k in invalid.items())
        _warn.warn(
            f"{WHO}: {sum(invalid.values())} of {store.rows} rows could not be explained ({said}); their maps in "
            f"'{where}' are NaN. Its 'status' array (jaxlrp.RowStatus per row) says which.",
            InvalidRowsWarning,
        )


