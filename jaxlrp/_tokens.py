"""The relevance of integer inputs (token ids, categorical columns), read at the embedding
lookups that their ids index.

An integer input carries no relevance itself: relevance starts at each lookup (a tap), and the
relevance that arrives at a lookup's output, summed over the looked-up features, is the
relevance of the id that selected those rows. Which position of the input an id came from is
found once, when the model is planned, by running the ops between the input and the lookup on
*position codes* (`0 … n−1`, shaped like the input): structural ops move codes as they move
ids (slicing one column per `nn.Embed`, a `vmap`'s batching, reshapes), and elementwise ops
on ids (`ids + 10` for negative indices, `clip`) keep them. So a 2-D or 3-D table, features
anywhere, one lookup per column and lookups under `vmap` are all one rule.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jaxlrp import _internals
from jaxlrp._program import Const, Node, Value

# Ops that move ids without changing which input position each came from.
_MOVES = frozenset(
    "reshape broadcast_in_dim squeeze expand_dims transpose slice concatenate rev pad copy".split()
)


@dataclasses.dataclass(frozen=True)
class TokenRead:
    """Lookup `tap` (its index in the plan's taps) reads the ids of integer input `leaf`; the
    id behind each of its output rows came from input position `codes` (−1: from a constant);
    `features`: the output axes of the looked-up rows, summed."""

    tap: int
    leaf: int
    codes: np.ndarray
    features: tuple[int, ...]


def token_reads(plan, leaves: list, floats: list[int]) -> list[TokenRead]:
    """Where each lookup's ids come from; an error when a lookup's ids come from several inputs
    or positions at once, or when no input carries relevance (an integer input alone that
    reaches no lookup). An integer leaf of a pytree input that reaches no lookup while others
    carry relevance (a padding mask, positions, a graph's indices) is structure (`structure`)."""
    program = plan.program
    first = len(program.inputs) - len(leaves)
    codes = {program.inputs[first + i]: (i, np.arange(np.size(leaf)).reshape(np.shape(leaf)))
             for i, leaf in enumerate(leaves) if i not in floats}
    with jax.ensure_compile_time_eval():
        for node in program.nodes:
            _move_codes(node, codes)
    reads = []
    for tap in plan.taps():
        reads.append(_read(tap.index, tap.node, codes))
    if not floats and not reads:
        i, leaf = next((i, leaf) for i, leaf in enumerate(leaves) if i not in floats)
        raise TypeError(
            f"jaxlrp: an integer input carries no relevance itself; it is explained through the embedding "
            f"lookups its ids index (a gather of float rows from a parameter table), and input {i} (shape "
            f"{tuple(np.shape(leaf))}) reaches none. Pass a floating-point input."
        )
    return reads


def structure(plan, reads: list[TokenRead], leaves: list, floats: list[int]) -> list[int]:
    """The integer (or bool) leaves that no lookup reads: structure (masks, positions, indices),
    whose relevance is zero. One that reaches a matmul or convolution as floats computed from it
    alone, against another operand (a one-hot lookup, `one_hot(ids) @ table`), is an error: its
    relevance would be read nowhere, and its share of the output would go elsewhere."""
    chosen = [i for i in range(len(leaves)) if i not in floats and not any(r.leaf == i for r in reads)]
    program = plan.program
    first = len(program.inputs) - len(leaves)
    for i in chosen:
        pure = {program.inputs[first + i]}  # values computed from this leaf alone (and constants)
        constant: set = set()
        for node in program.nodes:
            values = [a for a in node.inputs if isinstance(a, Value)]
            if all(a in constant for a in values):
                constant.update(node.outputs)
            elif all(a in pure or a in constant for a in values):
                pure.update(node.outputs)
            elif node.name in ("dot_general", "conv_general_dilated") and any(
                a in pure and jnp.issubdtype(a.dtype, jnp.inexact) for a in values
            ):
                raise TypeError(
                    f"jaxlrp: integer input {i} (shape {tuple(np.shape(leaves[i]))}) reaches a "
                    f"{node.name} as floats computed from it alone (a one-hot lookup?). jaxlrp reads the "
                    f"relevance of ids at embedding lookups (a gather from a table: table[ids], nn.Embed, "
                    f"keras.layers.Embedding); look the ids up that way, or pass the one-hot floats as the "
                    f"input to explain."
                )
    return chosen


def token_relevance(reads: list[TokenRead], at_taps: list, leaves: list) -> dict[int, jax.Array]:
    """The relevance of each integer input, shaped like it, from the relevance at the taps."""
    out: dict[int, jax.Array] = {}
    for read in reads:
        r = at_taps[read.tap]
        per_row = r.sum(axis=tuple(a + r.ndim - len(read.codes.shape) - len(read.features) for a in read.features)
                        ) if read.features else r
        # a leading axis of many targets (vmapped seeds) stays in front
        lead = per_row.shape[: per_row.ndim - read.codes.ndim]
        flat = per_row.reshape(*lead, -1)
        size = int(np.size(leaves[read.leaf]))
        valid = read.codes.reshape(-1) >= 0
        wide = jnp.promote_types(r.dtype, jnp.float32)  # summed in float32 at least (bfloat16 models)
        codes = read.codes.reshape(-1)[valid]
        summed = jnp.zeros((*lead, size), wide).at[..., codes].add(flat[..., valid].astype(wide)).astype(r.dtype)
        value = summed.reshape(*lead, *np.shape(leaves[read.leaf]))
        out[read.leaf] = value if read.leaf not in out else out[read.leaf] + value
    return out


def _move_codes(node: Node, codes: dict) -> None:
    """Extends `codes` (value -> (input, position codes)) through `node`, if it reads ids."""
    carried = [(k, codes[a]) for k, a in enumerate(node.inputs) if isinstance(a, Value) and a in codes]
    if not carried or not all(jnp.issubdtype(v.dtype, jnp.integer) for v in node.outputs) or len(node.outputs) != 1:
        return
    leaves = {leaf for _, (leaf, _) in carried}
    if len(leaves) != 1:
        return  # ids combined from several inputs: not one token's id (an error if a lookup reads them)
    (leaf,) = leaves
    shape = tuple(node.outputs[0].shape)
    if node.name in _MOVES:
        args = [codes[a][1] if isinstance(a, Value) and a in codes else np.full(np.shape(_value(a)), -1)
                for a in node.inputs]
        moved = node.bind(*[jnp.asarray(a, jnp.int64 if jax.config.jax_enable_x64 else jnp.int32) for a in args])[0]
        codes[node.outputs[0]] = (leaf, np.asarray(moved))
    elif node.elementwise:
        moved = [np.broadcast_to(c, shape) for _, (_, c) in carried]
        if all(np.array_equal(moved[0], m) for m in moved[1:]):
            codes[node.outputs[0]] = (leaf, moved[0])


def _value(atom):
    """An operand's value where it is a constant; zeros of its shape for a traced one."""
    return atom.value if isinstance(atom, Const) else np.zeros(atom.shape)


def _read(index: int, node: Node, codes: dict) -> TokenRead:
    ids = [a for a in node.inputs[1:] if isinstance(a, Value) and a in codes]
    if node.name == "dynamic_slice":
        if len(ids) != 1:
            raise TypeError("jaxlrp: an embedding lookup (dynamic_slice) whose start depends on several ids.")
        leaf, code = codes[ids[0]]
        return TokenRead(index, leaf, np.reshape(code, ()), tuple(range(len(node.outputs[0].shape))))
    layout = _internals.gather_layout(node.params)
    indices = node.inputs[1]
    if indices not in codes or layout.operand_batching_dims:
        raise TypeError(
            "jaxlrp: an embedding lookup reads ids computed from several integer inputs, or with batched "
            "tables; their relevance cannot be told apart. Explain them as one input."
        )
    leaf, code = codes[indices]
    # Several index components per row (`table[1, ids]`): those from the input must agree.
    from_input = [k for k in range(code.shape[-1]) if (code[..., k] >= 0).any()]
    if not all(np.array_equal(code[..., from_input[0]], code[..., k]) for k in from_input):
        raise TypeError("jaxlrp: an embedding lookup indexes its table by ids from several input positions.")
    return TokenRead(index, leaf, code[..., from_input[0]], tuple(layout.offset_dims))
