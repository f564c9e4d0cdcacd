"""What each value of a program is to LRP: one frozen `Flow` that the planner, the operation
families and the rules read, so that no part of the engine re-derives it.

* *active*: depends on the explained input, through any path (integer ids included);
* *carrying*: a float value that depends on the input through float values, and so carries
  relevance. A mask made from comparisons of the input, or a `stop_gradient` of it, is a
  constant to LRP. An embedding lookup (a gather of float rows from a parameter table by ids
  that depend on the input) starts relevance;
* *learned*: computed from the parameters (a weight, a bias) and not from the input;
* *statistics*: computed from reductions (sums, maxima) of activations and from constants only,
  where what a reduction yields meets, in one operation, an activation as large as what it
  reduced: a mean, a variance, 1/σ. Rules hold them constant (AttnLRP Prop. 3.4);
* *nonnegative*: ≥ 0 by construction (a ReLU's output, what max-pooling and reshapes make of
  it); rules may skip the negative half of such an input;
* `uses`, `producer`, `order`: the program's graph.

`Flow.needed(held)` is the same flow with only the values whose relevance reaches an output:
what feeds a `stop_gradient` (or a held operand) alone needs no rule.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core

from jaxlrp import _internals
from jaxlrp._program import ELEMENTWISE, Atom, Const, Node, Program, Value

STRUCTURAL = frozenset("reshape broadcast_in_dim squeeze expand_dims transpose".split())
# Reads of a parameter table by integer ids: an embedding lookup starts relevance.
LOOKUPS = frozenset("gather dynamic_slice".split())
# Ops whose output is >= 0 when their float operands are (selections, reshapes, max-pooling).
KEEP_SIGN = frozenset(
    """reshape broadcast_in_dim squeeze expand_dims transpose concatenate stack slice dynamic_slice
    gather pad rev reduce_max reduce_window_max copy convert_element_type""".split()
)
REDUCTIONS = frozenset("reduce_sum reduce_max reduce_min reduce_prod".split())


def is_float(atom: Atom) -> bool:
    dtype = atom.dtype if isinstance(atom, Value) else jnp.result_type(atom.value)
    return jnp.issubdtype(dtype, jnp.floating)


@dataclasses.dataclass(frozen=True, eq=False)
class Flow:
    """The facts of one program, see the module docstring."""

    program: Program
    active: frozenset[Value]
    carrying: frozenset[Value]
    learned: frozenset[Value]
    statistics: frozenset[Value]
    nonnegative: frozenset[Value]
    uses: Mapping[Value, tuple[Node | None, ...]]  # None: a program output
    producer: Mapping[Value, Node]
    order: Mapping[Node, int]

    def is_active(self, atom: Atom) -> bool:
        return isinstance(atom, Value) and atom in self.active

    def carries(self, atom: Atom) -> bool:
        return isinstance(atom, Value) and atom in self.carrying

    def is_learned(self, atom: Atom) -> bool:
        """Computed from the parameters and not from the input (a weight, a bias)."""
        return isinstance(atom, Value) and atom in self.learned and atom not in self.active

    def users(self, value: Value) -> tuple[Node | None, ...]:
        return self.uses.get(value, ())

    def output_carries(self) -> list[bool]:
        return [self.carries(a) for a in self.program.outputs]

    def is_lookup(self, node: Node) -> bool:
        return is_lookup(node, self.is_active)

    def needed(self, held: frozenset[tuple[Node, int]]) -> Flow:
        """This flow, carrying only what reaches an output other than through a
        `stop_gradient` or an operand in `held` (`(node, input position)` pairs)."""
        needed = {a for a in self.program.outputs if isinstance(a, Value)}
        for node in reversed(self.program.nodes):
            if node.name != "stop_gradient" and any(v in needed for v in node.outputs):
                needed.update(a for i, a in enumerate(node.inputs) if isinstance(a, Value) and (node, i) not in held)
        return dataclasses.replace(self, carrying=self.carrying & needed)


def is_lookup(node: Node, is_active) -> bool:
    """A gather of float rows from a parameter table by integer ids that depend on the input."""
    return (
        node.name in LOOKUPS
        and is_float(node.outputs[0])
        and not is_active(node.inputs[0])
        and any(is_active(a) and not is_float(a) for a in node.inputs[1:])
    )


def analyze(program: Program, explained: list[bool], learned_inputs: list[bool] | None = None) -> Flow:
    """The flow of `program` whose inputs flagged `explained` are explained; the others are
    the parameters, unless `learned_inputs` says which are (a scan body's inputs that carry no
    relevance may be computed from the input, as a held selection parameter is)."""
    active = {v for v, a in zip(program.inputs, explained) if a}
    carrying = {v for v in active if is_float(v)}
    learned_flags = [not a for a in explained] if learned_inputs is None else learned_inputs
    learned = {v for v, a in zip(program.inputs, learned_flags) if a}
    for node in program.nodes:
        if any(isinstance(a, Value) and a in learned for a in node.inputs):
            learned.update(node.outputs)
        if node.body is not None:  # scan, a kernel with a reference: what the body carries out
            if any(isinstance(a, Value) and a in active for a in node.inputs):
                active.update(node.outputs)  # computed from the input, carrying or not
            outs = [v for v, c in zip(node.outputs, analyze(node.body, body_flags(node, carrying)).output_carries()) if c]
            carrying.update(outs)
        elif any(isinstance(a, Value) and a in active for a in node.inputs):
            active.update(node.outputs)
            starts = is_lookup(node, lambda a: isinstance(a, Value) and a in active)
            if starts or (node.name != "stop_gradient" and any(isinstance(a, Value) and a in carrying for a in node.inputs)):
                carrying.update(v for v in node.outputs if is_float(v))
    uses: dict[Value, list] = defaultdict(list)
    for node in program.nodes:
        for a in node.inputs:
            if isinstance(a, Value):
                uses[a].append(node)
    for a in program.outputs:
        if isinstance(a, Value):
            uses[a].append(None)
    producer = {v: node for node in program.nodes for v in node.outputs}
    order = {node: i for i, node in enumerate(program.nodes)}
    flow = Flow(program, frozenset(active), frozenset(carrying), frozenset(learned), frozenset(), frozenset(),
                {v: tuple(u) for v, u in uses.items()}, producer, order)
    return dataclasses.replace(flow, statistics=frozenset(_statistics(flow)), nonnegative=frozenset(_nonnegative(program)))


def body_flags(node: Node, carrying) -> list[bool]:
    """Which inputs of `node`'s body carry relevance: those of the node; for a `scan`, the
    carry to a fixed point (a carry that relevance reaches in one step carries it in all)."""
    flags = [isinstance(a, Value) and a in carrying for a in node.inputs]
    if node.name != "scan":
        return flags
    layout = _internals.scan_layout(node.params)
    n_consts, n_carry = layout.num_consts, layout.num_carry
    while True:
        carry_out = analyze(node.body, flags).output_carries()[:n_carry]
        new = [f or (n_consts <= i < n_consts + n_carry and carry_out[i - n_consts]) for i, f in enumerate(flags)]
        if new == flags:
            return flags
        flags = new


def _statistics(flow: Flow) -> set[Value]:
    """See the module docstring. A reduction counts only when what it yields meets an
    activation as large as the values it reduced (it normalizes them): a mean-pooling's output,
    which a LayerNorm may then normalize, is an activation."""
    seeds = _derived_from_reductions(flow)
    confirmed = {
        reduce for node in flow.program.nodes for a in node.inputs if a in seeds
        for reduce in seeds[a]
        if _size(node.outputs[0].shape) == _size(reduce.inputs[0].shape)  # GroupNorm regroups
        and any(flow.carries(b) and reduce not in seeds.get(b, ()) for b in node.inputs)
    }
    return {v for v, reductions in seeds.items() if reductions <= confirmed}


def _derived_from_reductions(flow: Flow) -> dict[Value, frozenset[Node]]:
    """Each value computed from reductions of activations and constants only, with those
    reductions."""
    seeds: dict[Value, frozenset[Node]] = {}
    for node in flow.program.nodes:
        carried = [a for a in node.inputs if flow.carries(a)]
        if not carried:
            continue
        if node.name in REDUCTIONS:
            seeds.update((v, frozenset({node})) for v in node.outputs)
        elif (node.elementwise or node.name in STRUCTURAL or node.name == "stop_gradient") and all(
            a in seeds for a in carried
        ):
            reductions = frozenset().union(*(seeds[a] for a in carried))
            seeds.update((v, reductions) for v in node.outputs)
    return seeds


def _size(shape) -> int:
    return int(np.prod(shape, dtype=np.int64))


def known(atom: Atom):
    """A constant's value when it is known at planning time, else None (a traced array that the
    model closes over, such as a keyword argument passed inside `jit`)."""
    if not isinstance(atom, Const) or isinstance(atom.value, jax.core.Tracer):
        return None
    return np.asarray(atom.value)


def _nonnegative_const(atom: Atom) -> bool:
    value = known(atom)
    return value is not None and bool(np.all(value >= 0))


def _is_relu_jaxpr(jaxpr) -> bool:
    """Whether a call's single output is `max(x, c)` with a constant c >= 0 (nested calls too)."""
    if len(jaxpr.outvars) != 1 or not jaxpr.eqns:
        return False
    last = jaxpr.eqns[-1]
    if last.outvars[0] is not jaxpr.outvars[0]:
        return False
    if last.primitive.name == "max":
        return any(isinstance(v, core.Literal) and np.all(np.asarray(v.val) >= 0) for v in last.invars)
    inner, _ = _internals.call_body(last.params)
    return inner is not None and _is_relu_jaxpr(inner)


def _nonnegative(program: Program) -> set[Value]:
    out: set[Value] = set()
    for node in program.nodes:
        floats = [a for a in node.inputs if is_float(a)]
        if node.name == "max":
            keep = any(_nonnegative_const(a) or a in out for a in node.inputs)
        elif node.elementwise and node.name not in ELEMENTWISE:
            keep = _is_relu_jaxpr(_internals.call_body(node.params)[0])
        elif node.name in KEEP_SIGN:
            keep = bool(floats) and all(a in out or _nonnegative_const(a) for a in floats)
        else:
            keep = False
        if keep:
            out.update(v for v in node.outputs if is_float(v))
    return out
