"""Checkpointed regions: a remat'd region of the model is a remat'd region of the relevance pass.

`jax.checkpoint` (`nn.remat`, `nnx.remat`, `eqx.filter_checkpoint`, `hk.remat`) trades compute
for memory: the backward pass recomputes a region's values instead of holding them from the
forward pass. The program inlines the region, so that its layers are planned like any others,
and tags each of its nodes with the `Region` it was traced in (`Node.remat`, outermost first).
The relevance pass runs each maximal run of nodes of one region inside `jax.checkpoint` with
the region's policy: the rules' residuals (their inputs and forward values) are recomputed in
the backward pass too, not held.

`lrp(..., remat=...)` adds regions to a model that has none (or to more of it):

* a module path or an fnmatch pattern over module paths (`"Block_*"`, `"layers/*"`), or a
  sequence of them: each module whose path matches is one region, under `jax.checkpoint`'s
  default policy (nothing is held but the region's inputs);
* a dict of such patterns to policies (`{"Block_*": jax.checkpoint_policies.dots_saveable}`).

How nodes are grouped decides only what is held from the forward to the backward pass, never
a value: `jax.checkpoint` computes the same function.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from collections.abc import Callable, Mapping, Sequence
from typing import Any

Policy = Callable[..., bool] | None


@dataclasses.dataclass(frozen=True, eq=False)
class Region:
    """A checkpointed region: `jax.checkpoint`'s `policy` and `prevent_cse`; `path` is the
    module path of a region that `remat=` made ("" for the model's own)."""

    policy: Policy = None
    prevent_cse: bool = True
    path: str = ""


Spec = tuple[tuple[str, Policy], ...]


def spec(remat) -> Spec:
    """`remat=` as `((pattern, policy), ...)`; an error for anything else."""
    if remat is None:
        return ()
    if isinstance(remat, str):
        return ((remat, None),)
    if isinstance(remat, Mapping):
        items = tuple(remat.items())
    elif isinstance(remat, Sequence):
        items = tuple((pattern, None) for pattern in remat)
    else:
        items = None
    if items is None or not all(isinstance(p, str) and (f is None or callable(f)) for p, f in items):
        raise TypeError(
            "jaxlrp: remat= takes module paths or fnmatch patterns (a string or a sequence of them), or a dict "
            f"of them to jax.checkpoint policies (e.g. {{'Block_*': jax.checkpoint_policies.dots_saveable}}); "
            f"got {remat!r}."
        )
    return items


def _prefixes(path: str) -> list[str]:
    parts = path.split("/") if path else []
    return ["/".join(parts[: i + 1]) for i in range(len(parts))]


def block_of(path: str, remat: Spec) -> tuple[str, Policy] | None:
    """`(block path, policy)` of the outermost module on `path` that a pattern of `remat`
    matches; None when none does."""
    for prefix in _prefixes(path):
        for pattern, policy in remat:
            if prefix == pattern or fnmatch.fnmatchcase(prefix, pattern):
                return prefix, policy
    return None


def regions(nodes: Sequence, describe: Callable[[str], tuple[str, Any]], remat: Spec) -> dict:
    """`{node: regions}`, outermost first: those each node was traced in (`Node.remat`) and the
    block of `remat` its module path falls in, nested where it belongs: around the model's own
    regions that lie wholly inside the block, inside those that do not."""
    if not remat:
        return {node: node.remat for node in nodes if node.remat}
    blocks = {node: block_of(describe(node.scope)[0], remat) for node in nodes}
    within: dict[Region, set] = {}  # each model region: the blocks its nodes fall in
    for node in nodes:
        for region in node.remat:
            within.setdefault(region, set()).add(None if blocks[node] is None else blocks[node][0])
    made: dict[str, Region] = {}
    out = {}
    for node in nodes:
        if blocks[node] is None:
            if node.remat:
                out[node] = node.remat
            continue
        path, policy = blocks[node]
        block = made.setdefault(path, Region(policy, True, path))
        inside = next((i for i, r in enumerate(node.remat) if within[r] == {path}), len(node.remat))
        out[node] = (*node.remat[:inside], block, *node.remat[inside:])
    return out


def check(program, describe: Callable[[str], tuple[str, Any]], remat: Spec) -> None:
    """An error for a pattern of `remat` that matches no module of `program` (scan bodies and
    kernels' references included), listing the module paths."""
    if not remat:
        return
    paths: dict[str, None] = {}

    def walk(program):
        for node in program.nodes:
            paths.update(dict.fromkeys(_prefixes(describe(node.scope)[0])))
            if node.body is not None:
                walk(node.body)

    walk(program)
    unmatched = [p for p, _ in remat if not any(q == p or fnmatch.fnmatchcase(q, p) for q in paths)]
    if unmatched:
        raise ValueError(f"jaxlrp: remat= pattern(s) {unmatched} match no module of this model. The module paths: {list(paths)}.")
