"""Hooks on the relevance path at a module's output: recording the relevance that arrives
there (and the output's value) and conditioning it by a mask (Concept Relevance Propagation).

A module's output is the value its operations produce that is read outside it (or returned).
Where that value lies inside a merged layer (a conv whose BatchNorm is merged into it), the
layer's output stands for it: merged LRP sees the two as one layer.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, NamedTuple

import jax
import jax.numpy as jnp

from jaxlrp._program import Value

if TYPE_CHECKING:
    from jaxlrp._plan import Plan


class Explanation(NamedTuple):
    """What `explain` returns when `jaxlrp.lrp(..., record=...)` records hidden layers."""

    input: jax.Array
    """The relevance of the input, shaped like it."""
    layers: dict
    """`{path: relevance}`: the relevance arriving at each recorded module's output (before any
    condition there), shaped like that output."""
    activations: dict
    """`{path: value}`: each recorded module's output."""


def module_outputs(plan: Plan, describe) -> dict[str, Value]:
    """`{module path: output value}` for every module (and container) of the program's top
    level whose output carries relevance, in execution order."""
    program, flow = plan.program, plan.flow
    path_of = {node: describe(node.scope)[0] for node in program.nodes}
    outputs: dict[str, list[Value]] = {}
    for node in program.nodes:
        for path in _ancestors(path_of[node]):
            for v in node.outputs:
                # read outside the module (or returned), and carrying relevance
                outside = any(user is None or not _within(path_of[user], path) for user in flow.users(v))
                if outside and flow.carries(v) and v not in outputs.setdefault(path, []):
                    outputs[path].append(v)
    producer = flow.producer
    merged = _merged_into(plan)
    return {
        path: merged.get(values[-1], values[-1])
        for path, values in outputs.items()
        if len(values) == 1 or all(producer[v] is producer[values[-1]] for v in values)
    }


def resolve(patterns: Sequence[str], outputs: Mapping[str, Value], what: str) -> dict[str, Value]:
    """`{path: value}` for each pattern (a module path or an fnmatch pattern over the paths);
    a pattern that matches no module is an error listing the paths."""
    found: dict[str, Value] = {}
    for pattern in patterns:
        matched = [p for p in outputs if p == pattern or fnmatch.fnmatchcase(p, pattern)]
        if not matched:
            raise ValueError(
                f"jaxlrp: {what} {pattern!r} matches no module output of this model. The module paths: "
                f"{list(outputs)}."
            )
        found.update((p, outputs[p]) for p in matched)
    return found


@jax.custom_vjp
def condition(x: jax.Array, mask: jax.Array) -> jax.Array:
    """`x` itself; its relevance (cotangent) is multiplied by `mask` on its way back."""
    return x


def _condition_fwd(x, mask):
    return x, mask


def _condition_bwd(mask, relevance):
    return (relevance * mask).astype(relevance.dtype), jnp.zeros_like(mask)


condition.defvjp(_condition_fwd, _condition_bwd)


def broadcast_mask(mask, shape: tuple, path: str) -> jax.Array:
    """A condition's mask over the feature axis `(C,)`, per sample `(B, C)`, or of the output's
    full shape, broadcast to `shape`."""
    mask = jnp.asarray(mask)
    if mask.ndim == 2 and len(shape) > 2 and mask.shape == (shape[0], shape[-1]):
        mask = mask.reshape(shape[0], *([1] * (len(shape) - 2)), shape[-1])
    try:
        return jnp.broadcast_to(mask, shape)
    except ValueError:
        raise ValueError(
            f"jaxlrp: the condition at '{path}' has shape {tuple(mask.shape)}; the output there has shape "
            f"{shape}: give a mask of shape ({shape[-1]},) over its features, ({shape[0]}, {shape[-1]}) per "
            f"sample, or {shape}."
        ) from None


def _ancestors(path: str) -> list[str]:
    parts = path.split("/") if path else []
    return ["/".join(parts[: i + 1]) for i in range(len(parts))]


def _within(path: str, module: str) -> bool:
    return path == module or path.startswith(module + "/")


def _merged_into(plan: Plan) -> dict[Value, Value]:
    """Values computed inside a step that stand for its output (a linear layer's output before
    a merged BatchNorm) -> the step's output."""
    return {v: step.output for step in plan.steps.values() for v in step.inside()}
