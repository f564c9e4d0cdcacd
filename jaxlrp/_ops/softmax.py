"""Softmax: `s = exp(x − c) / Σ_axes exp(x − c)`, found however its dtypes are written.

`c` is a constant or a `stop_gradient` (of the max), or absent. The sum may be taken in a
wider dtype (`jax.nn.softmax` in bfloat16 converts exp's output to float32, sums, and converts
the sum back). The step's rule sees the output and the axes (AttnLRP Prop. 3.1). Under CP-LRP
(`hold` has "softmax") the softmax's output is a constant where it is used, past reshapes,
dtype conversions and a mask applied afterwards, multiplied in (`keras.layers.Softmax(mask=...)`)
or selected (`jnp.where(mask, s, 0)`, Keras's `MultiHeadAttention` on its einsum path).
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from jaxlrp import _internals
from jaxlrp._execute import Run, cast, evaluate, relevance_call, wide_dtype
from jaxlrp._layer import Layer
from jaxlrp._ops.base import Step, recognizer
from jaxlrp._ops.linear_step import RESHAPING, VALUE_PRESERVING
from jaxlrp._program import Node, Value
from jaxlrp._table import LayerInfo


@dataclasses.dataclass(eq=False)
class SoftmaxStep(Step):
    """`nodes` compute the softmax of `source` over `axes`."""

    nodes: list[Node]
    source: Value
    axes: tuple[int, ...]
    info: LayerInfo

    @property
    def output(self) -> Value:
        return self.nodes[-1].outputs[0]

    def run(self, env: dict, run: Run) -> None:
        internal = {self.source, *(n.outputs[0] for n in self.nodes)}
        extras = list(dict.fromkeys(
            a for n in self.nodes for a in n.inputs if isinstance(a, Value) and a not in internal
        ))

        def forward(xs, others):
            local = dict(zip(extras, others["extras"]))
            local[self.source] = xs[0]
            evaluate(self.nodes, local)
            return local[self.output]

        def backward(xs, others, output, relevance):
            # The input keeps its dtype: the rule reads a mask's fill against that dtype's range.
            output, relevance = cast((output, relevance), wide_dtype(*xs))

            def total(inputs, _):
                return jnp.sum(inputs[0], axis=self.axes, keepdims=True)

            return others["rule"](Layer(total, None, output), xs, relevance)

        others = {"extras": [env[a] for a in extras], "rule": run.rules[self]}
        env[self.output] = relevance_call(forward, backward, (env[self.source],), others)


@recognizer(order=10)
def _recognize(planner) -> None:
    for node in planner.program.nodes:
        found = _softmax_nodes(planner, node)
        if found is None:
            continue
        nodes, source, reduce = found
        if "softmax" in planner.config.hold:  # held where it is used
            value = _as_used(planner, node.outputs[0])
            planner.held.update((user, i) for user in planner.flow.users(value) if user is not None
                                for i, a in enumerate(user.inputs) if a is value)
            continue
        axes = _internals.reduce_axes(reduce.params)
        planner.claim(nodes, lambda nodes=nodes, source=source, axes=axes: _build(planner, nodes, source, axes))


def _softmax_nodes(planner, node: Node):
    """`(nodes, source, the reduce_sum)` when `node` divides an exp by its sum, else None."""
    if node.name != "div" or not all(planner.carries(a) for a in node.inputs):
        return None
    numerator, denominator = node.inputs
    exp = planner.producer_of(numerator, frozenset({"exp"}))
    total, reshapes = planner.through(denominator, RESHAPING)
    reduce = planner.producer_of(total, frozenset({"reduce_sum"}))
    if exp is None or reduce is None:
        return None
    summed, conversions = planner.through(reduce.inputs[0], VALUE_PRESERVING)
    if summed is not numerator:
        return None
    nodes = [exp, *conversions, reduce, *reshapes, node]
    source = exp.inputs[0]
    shift = planner.producer_of(source, frozenset({"sub"}))
    if shift is not None and planner.carries(shift.inputs[0]) and not planner.carries(shift.inputs[1]):
        nodes.insert(0, shift)
        source = shift.inputs[0]
    users = planner.flow.users
    if len(users(numerator)) != 2 or any(len(users(n.outputs[0])) != 1 for n in nodes[:-1] if n is not exp):
        return None
    return nodes, source, reduce


def _as_used(planner, value: Value) -> Value:
    """A softmax's output as its users read it: past reshapes, dtype conversions and a mask
    multiplied in or selected afterwards (`where(mask, s, fill)`), each its single use."""
    while len(users := planner.flow.users(value)) == 1 and (user := users[0]) is not None:
        others = [a for a in user.inputs if a is not value]
        reshaped = user.name in RESHAPING and len(user.inputs) == 1
        mask = (user.name == "mul" and len(others) == 1) or (user.name == "select_n" and len(others) >= 2)
        masked = mask and not any(planner.carries(a) for a in others)
        if not (reshaped or masked):
            break
        value = user.outputs[0]
    return value


def _build(planner, nodes: list[Node], source: Value, axes: tuple[int, ...]) -> None:
    if not planner.carries(nodes[-1].outputs[0]):  # under a stop_gradient: computed as it is
        return
    planner.skipped.update(nodes[:-1])
    path, module = planner.describe(nodes[-1])
    shape = tuple(source.shape)
    info = LayerInfo(path, module, "softmax", input_shapes=(shape,), output_shape=shape)
    planner.steps[nodes[-1]] = SoftmaxStep(nodes, source, axes, info)
