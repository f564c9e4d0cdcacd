"""Digests that say what produced a data-set run: of arrays (weights, input rows, targets) and of
the traced program (the model's structure, the composite and every hyperparameter written into
it). SHA-256 throughout; a digest is a hex string, or 32 bytes where it is stored per chunk."""

from __future__ import annotations

import hashlib
import re

import jax
import numpy as np


def of_arrays(*arrays) -> bytes:
    """The digest of NumPy-convertible arrays: their dtypes, shapes and bytes, in order."""
    h = hashlib.sha256()
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(f"{a.dtype.name}{a.shape}".encode())
        h.update(a.view(np.uint8).reshape(-1) if a.size else b"")
    return h.digest()


def of_tree(tree) -> str:
    """The digest of a pytree: its structure, and the values of its array leaves (gathered to
    this process where sharded; a replicated leaf is read from one of its shards); other leaves
    by their `repr`."""
    leaves, treedef = jax.tree.flatten(tree)
    h = hashlib.sha256(str(treedef).encode())
    for leaf in leaves:
        if isinstance(leaf, (jax.Array, np.ndarray, np.generic)):
            h.update(of_arrays(_host_value(leaf)))
        else:
            h.update(without_addresses(repr(leaf)).encode())
    return h.hexdigest()


def of_program(closed_jaxpr) -> tuple[str, str]:
    """`(program, constants)`: the digest of a jaxpr's text (each operation, its parameters and
    literals: the model's structure, the rules and their Python-number hyperparameters) and of its
    constants (arrays closed over: a stateful NNX model's weights, hyperparameters given as arrays)."""
    text = without_addresses(str(closed_jaxpr.jaxpr))
    return hashlib.sha256(text.encode()).hexdigest(), of_tree(list(closed_jaxpr.consts))


def _host_value(leaf) -> np.ndarray:
    if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
        if leaf.is_fully_replicated:
            return np.asarray(leaf.addressable_shards[0].data)
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(leaf, tiled=True))
    return np.asarray(leaf)


def without_addresses(text: str) -> str:
    """`text` without memory addresses (`<function f at 0x7f...>`), which differ between processes."""
    return re.sub(r" at 0x[0-9a-fA-F]+", "", text)
