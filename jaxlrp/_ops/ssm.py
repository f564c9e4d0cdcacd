"""Selective state-space models (Mamba): the selection parameters held constant (MambaLRP,
Jafari et al., NeurIPS 2024).

A selective SSM computes from its input `u` the parameters of its recurrence, Δ, the
discretised A̅ = exp(Δ·A), B and C, and multiplies them into the signal: `Δ·B·u`, `A̅ ⊙ h`,
`h·C`. MambaLRP holds them constant, so that the recurrence is linear in `u` and in the state
`h`, and relevance flows along the signal only. With `hold` containing "selection", a product
or `dot_general` of two activations holds the operand that only *modulates*: whose every use,
through elementwise and structural ops, is as a factor of such a product, while the other
operand is used otherwise too (in a projection, a sum, the output) or is the recurrence's state
(a scan's carry, in its body); an operand is judged where it was computed, before the
reshapes and broadcasts that bring it to the product. A product whose operands both only modulate, such as the
output gate `y ⊙ silu(z)`, is a "product" row of its own (`Uniform` by default).
"""

from __future__ import annotations

from jaxlrp._analysis import STRUCTURAL
from jaxlrp._ops.base import recognizer
from jaxlrp._program import Node, Value

_FACTORS = frozenset({"mul", "dot_general"})


@recognizer(order=25)
def _hold_selection(planner) -> None:
    if "selection" not in planner.config.hold:
        return
    _hold_factors(planner)
    for node in planner.program.nodes:  # a parameter the scan's body holds is held where it enters
        if node.name == "scan":
            planner.held.update((node, i) for i in _held_in_body(planner, node))


def _held_in_body(planner, scan: Node) -> list[int]:
    """The positions of `scan`'s inputs whose every use in the body is held."""
    body = planner.body_planner(scan)
    _hold_factors(body)
    held = []
    for i, (a, b) in enumerate(zip(scan.inputs, scan.body.inputs)):
        uses = [(user, k) for user in body.flow.users(b) if user is not None for k, x in enumerate(user.inputs) if x is b]
        if planner.carries(a) and uses and all(use in body.held for use in uses):
            held.append(i)
    return held


def _hold_factors(planner) -> None:
    modulates = _Modulation(planner)
    for node in planner.program.nodes:
        if node.name not in _FACTORS or node in planner.absorbed or len(node.inputs) != 2:
            continue
        if not all(planner.carries(a) for a in node.inputs) or any((node, i) in planner.held for i in range(2)):
            continue
        flags = [modulates(planner.through(a, STRUCTURAL)[0]) for a in node.inputs]
        if flags.count(True) == 1:
            planner.held.add((node, flags.index(True)))


class _Modulation:
    """`modulates(value)`: whether every use of `value` is as a factor of a product of two
    activations (through elementwise and structural ops), and it is not the state."""

    def __init__(self, planner):
        self.planner = planner
        self.state = _derived(planner, planner.state)
        self.known: dict[Value, bool] = {}

    def __call__(self, value: Value) -> bool:
        if value in self.state:
            return False
        if value not in self.known:
            self.known[value] = False  # a cycle cannot occur; a value in progress counts as not
            self.known[value] = self._uses_modulate(value)
        return self.known[value]

    def _uses_modulate(self, value: Value) -> bool:
        planner = self.planner

        def modulating(user: Node) -> bool:
            others = [a for a in user.inputs if a is not value]
            if user.name in _FACTORS and len(others) == 1 and planner.carries(others[0]):
                return True
            if user.elementwise or user.name in STRUCTURAL:
                return all(self(v) for v in user.outputs if planner.carries(v))
            return user.name == "scan" and self._modulates_in_body(user, value)

        return planner.every_use(value, modulating)

    def _modulates_in_body(self, scan: Node, value: Value) -> bool:
        body = self.planner.body_planner(scan)
        inner = _Modulation(body)
        return all(inner(b) for a, b in zip(scan.inputs, scan.body.inputs) if a is value)


def _derived(planner, roots) -> set[Value]:
    """The values computed from `roots`."""
    out = set(roots)
    for node in planner.program.nodes:
        if any(isinstance(a, Value) and a in out for a in node.inputs):
            out.update(node.outputs)
    return out
