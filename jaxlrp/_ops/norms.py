"""Normalizations: with its statistics held constant, a norm is linear in its activation.

The statistics (a mean, a variance, 1/σ: `Flow.statistics`) are held, so that LayerNorm,
RMSNorm and GroupNorm, however they are written, become one linear map of kind "norm" with the
ε rule (AttnLRP Prop. 3.4, LXT's `layer_norm_grad_fn`):

* an activation times or over a statistic (LayerNorm's and RMSNorm's 1/σ): the statistic's
  operand is held;
* `x − mean(x)` (a LayerNorm's centering) is one linear map, kind "norm", that takes in the
  scaling by the held 1/σ, the scale and the bias after it. A centering that only feeds the
  variance (`jnp` code that writes `x − mean` twice) is left to the statistics.
"""

from __future__ import annotations

from jaxlrp._ops import linear
from jaxlrp._ops.base import HELD, classifier, recognizer
from jaxlrp._ops.linear_step import RESHAPING, STRUCTURAL, VALUE_PRESERVING
from jaxlrp._program import Node, Value

# What keeps every element once (no broadcast): a mean over a regrouped value is a mean of it.
REGROUPING = frozenset("reshape squeeze expand_dims transpose".split()) | VALUE_PRESERVING


@recognizer(order=20)
def _hold_statistics(planner) -> None:
    """Holds the statistic operand of each product or quotient of an activation by one."""
    stats = planner.flow.statistics
    for node in planner.program.nodes:
        if node.name not in ("mul", "div") or node in planner.absorbed or node in planner.groups:
            continue
        a, b = node.inputs
        if not (planner.carries(a) and planner.carries(b)):
            continue
        if b in stats and a not in stats:
            planner.held.add((node, 1))
        elif node.name == "mul" and a in stats and b not in stats:
            planner.held.add((node, 0))


@classifier("mul", "div", order=HELD)
def _times_held(planner, node: Node, relevant) -> bool:
    """Times or over a held factor: an elementwise linear map, kind "norm" for a held
    normalizer (RMSNorm's 1/σ), "sum" for another held factor (CP-LRP's attention, a selection
    parameter). A quotient is linear in its dividend only."""
    held = [i for i in range(len(node.inputs)) if (node, i) in planner.held]
    if not held or (node.name == "div" and held != [1]):
        return False
    kind = "norm" if all(node.inputs[i] in planner.flow.statistics for i in held) else "sum"
    linear.build(planner, [node], relevant, None, kind)
    return True


@recognizer(order=30)
def _centering(planner) -> None:
    """Claims each `x − mean(x)` with the nodes of its mean as one "norm" layer."""
    for node in planner.program.nodes:
        if node.name != "sub" or node in planner.absorbed or not all(planner.carries(a) for a in node.inputs):
            continue
        if _feeds_statistics_only(planner, node.outputs[0]):
            continue
        nodes = _centering_nodes(planner, node)
        if nodes is not None:
            planner.claim(nodes, lambda nodes=nodes: linear.build(planner, nodes, (0,), None, "norm"))


def _centering_nodes(planner, node: Node) -> list[Node] | None:
    """The nodes of `x − Σx·c` from the sum to the sub, in order; None if `node` is not one."""
    x, mean = node.inputs
    total, walked = planner.through(mean, RESHAPING | linear.SCALING)
    reduce = planner.producer_of(total, frozenset({"reduce_sum"}))
    if reduce is None or any(n.name in linear.SCALING and sum(planner.carries(a) for a in n.inputs) > 1 for n in walked):
        return None
    # Both read the same value, perhaps each through its own dtype conversion (bfloat16), the
    # mean perhaps over a regrouping of it (GroupNorm reshapes into groups).
    root, into_sub = planner.through(x, VALUE_PRESERVING)
    reduced, into_reduce = planner.through(reduce.inputs[0], REGROUPING)
    if root is not reduced:
        return None
    return sorted({*into_reduce, reduce, *walked, *into_sub, node}, key=planner.flow.order.__getitem__)


def _feeds_statistics_only(planner, value: Value) -> bool:
    """Whether every use of `value` ends, through elementwise and structural ops, in a
    reduction that is a statistic (the variance's `(x − mean)²`)."""

    def ends_in_statistic(user: Node) -> bool:
        if user.name.startswith("reduce_"):
            return all(v in planner.flow.statistics for v in user.outputs)
        return (user.elementwise or user.name in STRUCTURAL) and all(
            _feeds_statistics_only(planner, v) for v in user.outputs)

    return planner.every_use(value, ends_in_statistic)


# ---- A norm written as `x·inv + (β − mean·inv)` (Keras): affine in x once inv is held ------

_AFFINE_OPS = frozenset({"add", "sub", "mul", "div", "neg", "reduce_sum"}) | RESHAPING
_HELD = "held"  # a walk's verdict for a constant or a held statistic


@recognizer(order=40)
def _affine_norm(planner) -> None:
    """Claims each add or sub of two activations that is, with its statistics held, affine in
    one activation `x` that a mean of it also reads: one "norm" layer."""
    for node in planner.program.nodes:
        if node.name not in ("add", "sub") or node in planner.absorbed or node in planner.groups:
            continue
        if not all(planner.carries(a) for a in node.inputs) or node.outputs[0] in planner.flow.statistics:
            continue  # a variance (`mean(x²) − mean²`) is a statistic, not a norm's output
        found = _affine_in_one(planner, node)
        if found is None:
            continue
        root, nodes, held = found
        nodes = sorted(nodes, key=planner.flow.order.__getitem__)
        planner.held.update(held)
        relevant = tuple(i for i, a in enumerate(nodes[0].inputs) if a is root)
        planner.claim(nodes, lambda nodes=nodes, relevant=relevant: linear.build(
            planner, nodes, relevant, None, "norm", affine=True))


def _affine_in_one(planner, node: Node):
    """`(x, nodes, held operands)` when `node`'s output is affine in one activation `x`, reads
    a statistic and sums `x` (a mean), else None."""
    walk = _Walk(planner)
    if walk.verdict(node.outputs[0], start=True) is None or len(walk.roots) != 1 or not walk.held or not walk.sums:
        return None
    (root,) = walk.roots
    return root, walk.nodes, walk.held


class _Walk:
    """Walks back from a value through affine ops: a constant or a statistic that is not affine
    in an activation is held; a value read elsewhere too (or made by another op) is a root."""

    def __init__(self, planner):
        self.planner = planner
        self.roots: set[Value] = set()
        self.nodes: set[Node] = set()
        self.held: set[tuple[Node, int]] = set()
        self.sums = False
        self.verdicts: dict[Value, str | None] = {}

    def verdict(self, value, start: bool = False) -> str | None:
        """`_HELD`, "affine", or None (not affine: a product of activations); the `start` value
        is walked through whatever reads it."""
        if not self.planner.carries(value):
            return _HELD
        if value in self.verdicts:  # a value read twice in the region (a diamond) is walked once
            return self.verdicts[value]
        self.verdicts[value] = verdict = self._verdict(value, start)
        return verdict

    def _verdict(self, value, start: bool) -> str | None:
        planner = self.planner
        node = planner.flow.producer.get(value)
        shared = not start and len(planner.flow.users(value)) > 1 and value not in planner.flow.statistics
        claimed = node in planner.absorbed or node in planner.groups
        if node is None or shared or node.name not in _AFFINE_OPS or claimed:
            if value in planner.flow.statistics:
                return _HELD
            self.roots.add(value)
            return "affine"
        verdicts = [self.verdict(a) for a in node.inputs]
        if None in verdicts or all(v == _HELD for v in verdicts):
            return None if None in verdicts else _HELD
        if node.name in ("mul", "div") and (verdicts.count("affine") > 1 or (node.name == "div" and verdicts[1] == "affine")):
            return None
        self.nodes.add(node)
        self.sums |= node.name == "reduce_sum"
        self.held.update((node, i) for i, (a, v) in enumerate(zip(node.inputs, verdicts)) if v == _HELD and planner.carries(a))
        return "affine"
