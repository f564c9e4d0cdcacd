"""Products of two activations: a gate times a signal (LSTM, GRU, squeeze-and-excitation,
Mamba), a gated MLP's branches. A row of kind "product" whose rule splits the relevance
between the operands: `rules.Uniform()` (½ each, AttnLRP's) by default, `rules.SignalTakeAll()`
to give it all to the signal (Arras et al. 2017), `rules.HoldActivated()` to give it all to a
gated MLP's linear branch (CP-LRP's held gate, `composites.HoldGatedMLP`). The row names the
operands that come out of a gate function (`sigmoid(z)` or `1 − sigmoid(z)`: `gates`) and a
gated MLP's activated branch (`activated`)."""

from __future__ import annotations

import dataclasses

import numpy as np

from jaxlrp import _internals
from jaxlrp._analysis import known
from jaxlrp._execute import Run, read, relevance_call
from jaxlrp._layer import Layer
from jaxlrp._ops.base import JOINT, Step, classifier
from jaxlrp._ops.linear_step import RESHAPING, VALUE_PRESERVING
from jaxlrp._program import ELEMENTWISE, Atom, Node, Value
from jaxlrp._table import PRODUCT, LayerInfo


@dataclasses.dataclass(eq=False)
class ProductStep(Step):
    """`a ⊙ b` of two activations; `info.gates` names the operands that are gates."""

    node: Node
    info: LayerInfo

    @property
    def output(self) -> Value:
        return self.node.outputs[0]

    @property
    def gates(self) -> tuple[bool, ...]:
        """One flag per operand: whether it is a gate."""
        return tuple(i in self.info.gates for i in range(len(self.node.inputs)))

    @property
    def activated(self) -> tuple[bool, ...]:
        """One flag per operand: whether it is a gated MLP's activated branch."""
        return tuple(i in self.info.activated for i in range(len(self.node.inputs)))

    def run(self, env: dict, run: Run) -> None:
        node = self.node

        def forward(xs, _):
            return node.bind(*xs)[0]

        def backward(xs, rule, output, relevance):
            layer = Layer(lambda inputs, _: node.bind(*inputs)[0], None, output, gates=self.gates,
                          activated=self.activated)
            return rule(layer, xs, relevance)

        xs = tuple(read(env, a) for a in node.inputs)
        env[self.output] = relevance_call(forward, backward, xs, run.rules[self])


@classifier("mul", order=JOINT)
def _product(planner, node: Node, relevant) -> bool:
    if len(relevant) != 2:
        return False
    path, module = planner.describe(node)
    gates = tuple(i for i, a in enumerate(node.inputs) if _is_gate(planner, a))
    activated = tuple(i for i, a in enumerate(node.inputs) if _is_activated(planner, a))
    info = LayerInfo(path, module, PRODUCT, input_shapes=tuple(tuple(a.shape) for a in node.inputs),
                     output_shape=tuple(node.outputs[0].shape), gates=gates,
                     activated=activated if len(activated) == 1 else ())
    planner.steps[node] = ProductStep(node, info)
    return True


def _is_gate(planner, atom: Atom) -> bool:
    """Comes out of a gate function: `sigmoid(z)` or `1 − sigmoid(z)` (an LSTM's or GRU's
    gates), through reshapes and dtype conversions [Arras2017]."""
    value, _ = planner.through(atom, RESHAPING)
    node = planner.flow.producer.get(value) if isinstance(value, Value) else None
    if node is None:
        return False
    if node.name == "logistic":
        return True
    if node.elementwise and node.name not in ELEMENTWISE:  # a call such as jax.nn.sigmoid's
        body, _ = _internals.call_body(node.params)
        return body is not None and len(body.eqns) == 1 and body.eqns[0].primitive.name == "logistic"
    one = known(node.inputs[0])
    if node.name == "sub" and one is not None and np.all(one == 1):
        return _is_gate(planner, node.inputs[1])
    return False


# Elementwise ops that keep a region affine in its source: what is not one of these makes the
# region a nonlinear activation.
_AFFINE_ELEMENTWISE = frozenset("add sub mul div neg".split()) | VALUE_PRESERVING


def _is_activated(planner, atom: Atom) -> bool:
    """Comes out of an elementwise region with a nonlinear op in it (`silu(z)`, `gelu(z)`),
    through reshapes and dtype conversions: a gated MLP's gate branch."""
    value, _ = planner.through(atom, RESHAPING)
    node = planner.flow.producer.get(value) if isinstance(value, Value) else None
    source = planner.region.get(node)
    if source is None:
        return False
    stack, seen = [node], set()
    while stack:
        member = stack.pop()
        if member in seen:
            continue
        seen.add(member)
        if member.name not in _AFFINE_ELEMENTWISE:
            return True
        stack.extend(planner.flow.producer[a] for a in member.inputs
                     if isinstance(a, Value) and a in planner.flow.producer and planner.region.get(planner.flow.producer[a]) is source)
    return False
