"""The store a data-set run writes: a zarr v3 group, through tensorstore, that records what
produced it and the state of every row.

Layout of `out`:

* `zarr.json`: the group; its attribute `"jaxlrp"` holds the layout (rows, chunk rows, each
  array's shape and dtype) and the provenance (digests of the program, its constants and the
  weights; a description of `explain`; the versions of jaxlrp and jax).
* one array per result of `explain`: `relevance`, and for `output_and_lrp` `output`, for
  `record=` `layers/<path>` and `activations/<path>`. Rows first, in chunks of `chunk_rows`
  rows, each chunk checksummed (the `crc32c` codec), so that a chunk cut short or changed on
  disk fails to decode instead of reading as other numbers.
* `status`: one `RowStatus` per row, written after the row's chunks are complete: a row is done
  when its status chunk is present and every chunk of it decodes.
* `jaxlrp/input_digest`, `jaxlrp/target_digest`: per chunk, the SHA-256 of the input rows and the
  targets it was computed from, against which a resume checks the data it is given;
  `jaxlrp/output_digest`: of what was written there (every array's rows), so that a chunk file
  replaced by another valid one is found too.
* `jaxlrp.lease`: the writer's lease (see `_lease`).
"""

from __future__ import annotations

import dataclasses
import enum
import json
import os

import numpy as np

from jaxlrp import _digest

__all__ = ["RowStatus", "StoreReport", "verify_dataset"]

SCHEMA = 1
STATUS = "status"
DIGESTS = ("jaxlrp/input_digest", "jaxlrp/target_digest", "jaxlrp/output_digest")
_CODECS = [{"name": "bytes", "configuration": {"endian": "little"}}, {"name": "crc32c"}]
_READ_GROUP = 64  # chunks read at once while verifying


class RowStatus(enum.IntEnum):
    """The state of one row of a data-set store (its `status` array)."""

    UNWRITTEN = 0
    """Not computed yet (the run stopped before it)."""
    EXPLAINED = 1
    """Explained and written."""
    INPUT_NOT_FINITE = 2
    """The input row holds NaN or Inf: its relevance is written as NaN."""
    TARGET_OUT_OF_RANGE = 3
    """The target class lies outside the output's classes: its relevance is written as NaN."""
    RELEVANCE_NOT_FINITE = 4
    """The model or the rules produced NaN or Inf for this row (an overflow, a non-finite weight)."""


def location(out, context, who: str = "jaxlrp.explain_dataset"):
    """`(kvstore, where)`: the key-value store that `out` names (a directory, a tensorstore URL or
    kvstore spec), its path ending in "/", and how messages name it."""
    import tensorstore as ts

    if isinstance(out, ts.KvStore):
        out = out.spec().to_json()
    if isinstance(out, dict):
        spec = out.get("kvstore", out) if out.get("driver") in ("zarr", "zarr3", "n5") else out
        kvstore = ts.KvStore.open(spec, context=context).result()
        where = kvstore.url if hasattr(kvstore, "url") else json.dumps(spec)
    elif isinstance(out, (str, os.PathLike)) and "://" in os.fspath(out):
        kvstore = ts.KvStore.open(os.fspath(out), context=context).result()
        where = os.fspath(out)
    elif isinstance(out, (str, os.PathLike)):
        path = os.path.abspath(os.path.expanduser(os.fspath(out)))
        kvstore = ts.KvStore.open({"driver": "file", "path": path}, context=context).result()
        where = path
    else:
        raise TypeError(
            f"{who}: out is a directory (a str or pathlib.Path), a tensorstore URL ('file:///data/r.zarr', "
            f"'gs://bucket/r.zarr', 'memory://r') or a tensorstore kvstore spec (a dict); got {type(out).__name__}."
        )
    spec = kvstore.spec().to_json()
    if spec.get("driver") == "file" and os.path.isfile(spec["path"].rstrip("/")):
        raise ValueError(f"{who}: out '{where}' is a file; it must name a directory (a zarr store) to write into.")
    if kvstore.path and not kvstore.path.endswith("/"):
        kvstore.path = kvstore.path + "/"
    return kvstore, where


@dataclasses.dataclass
class Store:
    """An open store: its arrays by name, the status and digest arrays, and its layout."""

    kvstore: object
    where: str
    context: object
    layout: dict
    provenance: dict
    arrays: dict
    status: object
    digests: tuple

    @property
    def rows(self) -> int:
        return self.layout["rows"]

    @property
    def chunk_rows(self) -> int:
        return self.layout["chunk_rows"]

    @property
    def chunks(self) -> int:
        return -(-self.rows // self.chunk_rows)

    def chunk_slice(self, c: int) -> slice:
        return slice(c * self.chunk_rows, min(self.rows, (c + 1) * self.chunk_rows))

    def listed(self) -> dict[str, set[int]]:
        """`{array name: chunks whose file exists}`, listed once."""
        found: dict[str, set[int]] = {}
        for key in self.kvstore.list().result():
            head, sep, tail = key.decode().rpartition("/c/")
            if sep and tail.split("/")[0].isdigit():
                found.setdefault(head, set()).add(int(tail.split("/")[0]))
        return found

    def present(self, listed: dict | None = None) -> set[int]:
        """The chunks whose status and every array chunk exist."""
        listed = self.listed() if listed is None else listed
        return set.intersection(*(listed.get(name, set()) for name in [*self.arrays, STATUS, *DIGESTS]))

    def corrupt(self, chunks) -> dict[int, str]:
        """`{chunk: why}` for each of `chunks` where some array's chunk does not decode, or what
        the arrays hold is not what was written there (its output digest differs)."""
        bad: dict[int, str] = {}
        chunks = sorted(chunks)
        stores = {**self.arrays, STATUS: self.status, **dict(zip(DIGESTS, self.digests))}
        for i in range(0, len(chunks), _READ_GROUP):
            group = chunks[i : i + _READ_GROUP]
            reads = {(c, name): _chunk_of(store, c, self, name) for c in group for name, store in stores.items()}
            values = {}
            for (c, name), future in reads.items():
                try:
                    values[c, name] = future.result()
                except ValueError as error:  # tensorstore: DATA_LOSS, FAILED_PRECONDITION
                    bad.setdefault(c, f"{name}: {str(error).splitlines()[0][:200]}")
            for c in group:
                if c not in bad and output_digest({n: values[c, n] for n in self.arrays}) != bytes(
                        np.asarray(values[c, DIGESTS[2]]).reshape(-1)):
                    bad[c] = "its arrays do not hold what was written there (the output digest differs)"
        return bad

    def discard(self, chunks) -> None:
        """Deletes these chunks of every array (the status first: they count as not done), so that
        they are written afresh rather than merged into what failed to decode."""
        stores = {STATUS: self.status, **self.arrays, **dict(zip(DIGESTS, self.digests))}
        for name, store in stores.items():
            futures = [self.kvstore.write(f"{name}/c/{c}" + "/0" * (store.rank - 1), None) for c in chunks]
            for future in futures:
                future.result()

    def digests_of(self, c: int) -> tuple[bytes, bytes]:
        """The input and target digests recorded for chunk `c`."""
        return tuple(bytes(np.asarray(d[c].read().result())) for d in self.digests[:2])

    def status_counts(self) -> dict[RowStatus, int]:
        values = np.asarray(self.status.read().result())
        return {s: int(np.count_nonzero(values == s)) for s in RowStatus}


def output_digest(values: dict) -> bytes:
    """The digest of one chunk's rows of every array, by name."""
    return _digest.of_arrays(*(np.asarray(values[name]) for name in sorted(values)))


def _chunk_of(store, c: int, owner: Store, name: str):
    if name in DIGESTS:
        return store[c : c + 1].read()
    return store[owner.chunk_slice(c)].read()


def read_attributes(kvstore, where: str, who: str) -> dict | None:
    """The group's `"jaxlrp"` attribute; `None` if `out` is empty; an error if it holds anything else."""
    found = kvstore.read("zarr.json").result()
    if found.state != "value":
        keys = kvstore.list().result()
        others = [k.decode() for k in keys if k.decode() != "jaxlrp.lease"]
        if not others:
            return None
        old = any(k.endswith(".zarray") or k == ".zarray" for k in others)
        raise ValueError(
            f"{who}: '{where}' holds {len(others)} file(s) (e.g. '{others[0]}') but no jaxlrp store"
            + (" (a zarr v2 array, as jaxlrp 0.1 wrote before stores recorded their provenance)" if old else "")
            + ". Choose another `out`, or pass overwrite=True to replace its contents."
        )
    try:
        attributes = json.loads(found.value)["attributes"]["jaxlrp"]
        attributes["layout"], attributes["provenance"]
    except (ValueError, KeyError, TypeError):
        raise ValueError(
            f"{who}: '{where}' holds a zarr store that jaxlrp did not write (its zarr.json has no 'jaxlrp' "
            "attribute). Choose another `out`, or pass overwrite=True to replace its contents."
        ) from None
    return attributes


def create(kvstore, where: str, context, layout: dict, provenance: dict) -> Store:
    """A store at `kvstore` with this layout and provenance: written into an empty `out`, or
    completed where a creation was cut short (the arrays are opened where they exist)."""
    attributes = {"jaxlrp": {"schema": SCHEMA, "layout": layout, "provenance": provenance}}
    kvstore.write("zarr.json", json.dumps({"zarr_format": 3, "node_type": "group", "attributes": attributes})).result()
    groups = {"jaxlrp"}
    for name in layout["arrays"]:
        parts = name.split("/")[:-1]
        groups |= {"/".join(parts[: i + 1]) for i in range(len(parts))}
    for group in sorted(groups):
        kvstore.write(f"{group}/zarr.json", json.dumps({"zarr_format": 3, "node_type": "group", "attributes": {}})).result()
    return open_store(kvstore, where, context, attributes["jaxlrp"])


def open_store(kvstore, where: str, context, attributes: dict) -> Store:
    return Store(kvstore, where, context, attributes["layout"], attributes["provenance"],
                 *_arrays(kvstore, context, attributes["layout"]))


def _arrays(kvstore, context, layout: dict):
    """The store's arrays, each opened, or created where it is missing."""
    import tensorstore as ts

    rows, chunk_rows = layout["rows"], layout["chunk_rows"]
    chunks = -(-rows // chunk_rows)

    def array(name, shape, dtype, chunk_shape, fill):
        # Every chunk written is stored, even one equal to the fill value (a chunk of invalid rows,
        # all NaN): a chunk file that is missing is one never written.
        spec = {"driver": "zarr3", "metadata": {"codecs": _CODECS}, "store_data_equal_to_fill_value": True}
        return ts.open(spec, kvstore=kvstore / f"{name}/", context=context, open=True, create=True, dtype=dtype,
                       shape=shape, fill_value=fill, chunk_layout=ts.ChunkLayout(chunk_shape=chunk_shape)).result()

    arrays = {
        name: array(name, shape, np.dtype(dtype), [chunk_rows, *shape[1:]], np.nan)
        for name, (shape, dtype) in layout["arrays"].items()
    }
    status = array(STATUS, [rows], np.dtype(np.uint8), [chunk_rows], 0)
    digests = tuple(array(name, [chunks, 32], np.dtype(np.uint8), [1, 32], 0) for name in DIGESTS)
    return arrays, status, digests


def differences(found: dict, layout: dict, provenance: dict) -> list[str]:
    """What differs between a store's attributes and this run's, in words; empty if nothing."""
    had = found["layout"]
    said = []
    for name, (shape, dtype) in layout["arrays"].items():
        old = had["arrays"].get(name)
        if old is None:
            said.append(f"this run writes an array '{name}' that the store lacks")
        elif tuple(old[0]) != tuple(shape) or old[1] != dtype:
            said.append(f"'{name}' holds shape {tuple(old[0])}, dtype {old[1]}, but this run writes shape "
                        f"{tuple(shape)}, dtype {dtype}")
    said += [f"the store holds an array '{name}' that this run does not write" for name in had["arrays"]
             if name not in layout["arrays"]]
    if had["chunk_rows"] != layout["chunk_rows"]:
        said.append(f"the store is in chunks of {had['chunk_rows']} rows, but this run writes chunks of "
                    f"{layout['chunk_rows']} (batch_size / devices)")
    if had.get("targets") != layout.get("targets"):
        said.append(f"its targets were {had.get('targets')}, now {layout.get('targets')}")
    old = found["provenance"]
    words = {"weights": "the weights (variables)", "program": "the program (the model's structure, the composite "
             "or its hyperparameters, output= or record=)", "constants": "the arrays the program closes over (a "
             "stateful model's weights, hyperparameters given as arrays)"}
    for key, value in provenance.items():
        if old.get(key) != value:
            if key in words:
                said.append(f"{words[key]} differ")
            else:
                said.append(f"{key} was {old.get(key)!r}, now {value!r}")
    return said


@dataclasses.dataclass(frozen=True)
class StoreReport:
    """What `verify_dataset` found in a store."""

    rows: int
    """Rows of the store."""
    counts: dict
    """`{RowStatus: rows}`."""
    corrupt: dict
    """`{(start, stop): why}`: row ranges whose chunks do not decode (cut short, changed on disk)."""
    mismatched: tuple
    """Row ranges whose input or targets differ from the `x` and `targets` given to `verify_dataset`."""
    provenance: dict
    """What produced the store: digests, a description of `explain`, the versions."""

    @property
    def complete(self) -> bool:
        """Every row explained (or recorded invalid), every chunk intact, the data matching."""
        return not self.corrupt and not self.mismatched and self.counts.get(RowStatus.UNWRITTEN, 0) == 0

    def __str__(self) -> str:
        counts = ", ".join(f"{s.name.lower()} {n}" for s, n in self.counts.items() if n)
        lines = [f"{self.rows} rows: {counts}", f"corrupt chunks: {len(self.corrupt)}"]
        lines += [f"  rows {a}:{b}: {why}" for (a, b), why in self.corrupt.items()]
        if self.mismatched:
            lines.append(f"rows whose data differ: {list(self.mismatched)}")
        return "\n".join(lines)


def verify_dataset(out, *, x=None, targets=None) -> StoreReport:
    """Checks a store that `jaxlrp.explain_dataset` wrote: every chunk of every array decodes
    (its CRC-32C checksum holds) and holds what was written there (its output digest), no chunk of
  a row marked done is missing, and each row's status is read; with `x` (and `targets`, as given
    to `explain_dataset`), the data of every written chunk is hashed and compared with the digests
    the run recorded. Reads the whole store (and `x`) once; changes nothing.

    Returns:
      A `StoreReport`: row counts per `RowStatus`, the corrupt row ranges, the row ranges whose data
      differ, the provenance; `report.complete` says whether the store is whole and every row
      accounted for.
    """
    import tensorstore as ts

    who = "jaxlrp.verify_dataset"
    context = ts.Context()
    kvstore, where = location(out, context, who)
    attributes = read_attributes(kvstore, where, who)
    if attributes is None:
        raise ValueError(f"{who}: '{where}' holds no store.")
    store = open_store(kvstore, where, context, attributes)
    listed = store.listed()
    present = store.present(listed)
    corrupt = store.corrupt(present)
    for c in listed.get(STATUS, set()) - present:  # marked done, but a chunk is gone
        gone = [name for name in [*store.arrays, *DIGESTS] if c not in listed.get(name, set())]
        corrupt[c] = f"missing: {', '.join(gone)}"
    mismatched = []
    if x is not None:
        from jaxlrp._dataset import chunk_digests

        for c in sorted(present - set(corrupt)):
            if chunk_digests(x, targets, store.chunk_slice(c)) != store.digests_of(c):
                mismatched.append((store.chunk_slice(c).start, store.chunk_slice(c).stop))
    try:
        counts = store.status_counts()
    except ValueError:  # a corrupt status chunk: counted row by row from the readable chunks
        counts = {s: 0 for s in RowStatus}
        for c in range(store.chunks):
            rows = store.chunk_slice(c)
            try:
                values = np.asarray(store.status[rows].read().result())
            except ValueError:
                continue
            for s in RowStatus:
                counts[s] += int(np.count_nonzero(values == s))
    return StoreReport(store.rows, counts, {(store.chunk_slice(c).start, store.chunk_slice(c).stop): why
                                             for c, why in sorted(corrupt.items())},
                       tuple(mismatched), store.provenance)
