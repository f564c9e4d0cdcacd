"""Elementwise regions: an elementwise op whose activation operands all derive elementwise
from one *source* joins that source's region; every region value used outside its region
becomes one Pass step from the source (activation functions, scaling by a constant,
`x * sigmoid(x)`), relevance passing unchanged (zennit's default for activations). Operands
broadcast implicitly along size-1 axes (`f32[B,F,1] × f32[1,1,K]`) count as elementwise; such
an input gets the relevance of its copies."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from jaxlrp._analysis import is_float
from jaxlrp._execute import Run, evaluate, relevance_call
from jaxlrp._layer import unbroadcast
from jaxlrp._ops.base import REGION, Step, classifier, finisher
from jaxlrp._program import Node, Value


@dataclasses.dataclass(eq=False)
class PassStep(Step):
    """An elementwise region from `source` to `output`: relevance passes unchanged."""

    source: Value
    nodes: list[Node]
    output: Value
    extras: list[Value]  # other values the region reads (parameters, masks)

    def run(self, env: dict, run: Run) -> None:
        def forward(xs, extras):
            local = dict(zip(self.extras, extras))
            local[self.source] = xs[0]
            evaluate(self.nodes, local)
            return local[self.output]

        def backward(xs, extras, output, relevance):
            return (unbroadcast(relevance, jnp.shape(xs[0])),)

        extras = [env[v] for v in self.extras]
        env[self.output] = relevance_call(forward, backward, (env[self.source],), extras)


@classifier(order=REGION)
def _join_region(planner, node: Node, relevant) -> bool:
    out = node.outputs[0]
    sources = {planner.source.get(node.inputs[i], node.inputs[i]) for i in relevant}
    if not (node.elementwise and len(sources) == 1 and is_float(out)):
        return False
    if not all(_broadcasts_to(node.inputs[i].shape, out.shape) for i in relevant):
        return False
    (source,) = sources
    planner.source[out] = source
    planner.region[node] = source
    return True


@finisher
def _add_pass_steps(planner) -> None:
    for node, source in planner.region.items():
        out = node.outputs[0]
        exposed = any(u is None or planner.region.get(u) is not source for u in planner.flow.users(out))
        if exposed:
            planner.steps[node] = _region_step(planner, source, out)
        else:
            planner.skipped.add(node)


def _region_step(planner, source: Value, output: Value) -> PassStep:
    members: set[Node] = set()
    extras: list[Value] = []
    stack, seen = [output], set()
    while stack:
        v = stack.pop()
        if v in seen or v is source:
            continue
        seen.add(v)
        n = planner.flow.producer.get(v)
        if n is not None and planner.region.get(n) is source:
            members.add(n)
            stack.extend(a for a in n.inputs if isinstance(a, Value))
        elif v not in extras:
            extras.append(v)
    nodes = sorted(members, key=planner.flow.order.__getitem__)
    return PassStep(source, nodes, output, extras)


def _broadcasts_to(shape, out) -> bool:
    """`shape` is `out`, or `out` with some axes of size 1 (numpy-style, same rank)."""
    return len(shape) == len(out) and all(a in (1, b) for a, b in zip(shape, out))
