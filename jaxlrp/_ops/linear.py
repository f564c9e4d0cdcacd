"""Linear maps: which nodes form a linear layer, and the chain each layer absorbs.

* a `dot_general` or `conv_general_dilated` with one activation and one learned operand (the
  weight) is a weighted layer ("dense", "conv"); with a constant operand that no parameter
  enters (`jax.image.resize`, `stop_gradient(attention) @ v`) a fixed one ("sum"); a patch
  extraction (a convolution with a constant kernel) that feeds a dense map is one "conv" layer
  with it (`nn.ConvLocal`);
* a primitive of `FIXED_PRIMITIVES` (`reduce_sum`, `cumsum`, `reduce_window_sum`,
  `scatter-add`, `psum` over devices, and what `jaxlrp.extend.register_linear` adds) is a fixed map, linear in its
  activation operands jointly, its other operands (indices) structure;
* an add or sub of a learned shift that no layer absorbed is an affine map (kind "affine");
  of two different activations a fixed map ("sum"); a `dot_general` of two activations
  (Q·Kᵀ, A·V) a "bilinear" one.

A layer absorbs the chain that follows it while each value has a single use: for a weighted
layer (and a norm or affine map), elementwise affine ops with a constant operand (bias,
BatchNorm in inference mode, scaling); for a fixed map, only scaling (a mean's division); and
reshapes and dtype conversions between them. That is how BatchNorm is merged into the layer
that feeds it (in mixed precision too), and a mean becomes one averaging layer.
"""

from __future__ import annotations

import numpy as np

from jaxlrp import _internals
from jaxlrp._analysis import is_float
from jaxlrp._ops.base import JOINT, LEARNED, classifier
from jaxlrp._ops.linear_step import RESHAPING, STRUCTURAL, LinearStep
from jaxlrp._program import Node, Value
from jaxlrp._table import AFFINE_KIND, LayerInfo

WEIGHTED_PRIMITIVES = {"dot_general": "dense", "conv_general_dilated": "conv"}
WEIGHTED_KINDS = frozenset(WEIGHTED_PRIMITIVES.values())
# A table: `jaxlrp.extend.register_linear` adds to it.
FIXED_PRIMITIVES = {"reduce_sum": "sum", "cumsum": "sum", "reduce_window_sum": "avg_pool", "scatter-add": "sum",
                    "psum": "sum", "psum_invariant": "sum"}  # psum: a sum over devices (jax 0.10: psum_invariant)
AFFINE = frozenset("add sub mul div neg".split())
SCALING = frozenset("mul div neg".split())


@classifier(*WEIGHTED_PRIMITIVES, order=LEARNED)
def _weighted(planner, node: Node, relevant) -> bool:
    if len(relevant) != 1:
        return False
    weight = 1 - relevant[0]
    local = _local_conv(planner, node, weight)
    if local is not None:  # nn.ConvLocal: patch extraction, then a dense map per position
        nodes, weight = local
        build(planner, nodes, relevant, weight, "conv")
    elif planner.flow.is_learned(node.inputs[weight]):
        build(planner, [node], relevant, weight, WEIGHTED_PRIMITIVES[node.name])
    else:  # a constant matrix that no parameter enters (jax.image.resize) is a fixed map
        build(planner, [node], relevant, weight, "sum")
    return True


@classifier(order=LEARNED)
def _fixed(planner, node: Node, relevant) -> bool:
    if node.name not in FIXED_PRIMITIVES:
        return False
    build(planner, [node], relevant, None, FIXED_PRIMITIVES[node.name])
    return True


@classifier("add", "sub", order=LEARNED)
def _learned_shift(planner, node: Node, relevant) -> bool:
    """A learned shift that no dense or conv layer absorbed (a BatchNorm after a ReLU or a
    residual add, a positional embedding after a token embedding): an affine map."""
    if len(relevant) != 1 or not any(planner.flow.is_learned(a) for a in node.inputs):
        return False
    build(planner, [node], relevant, None, AFFINE_KIND)
    return True


@classifier("add", "sub", order=JOINT)
def _joint_sum(planner, node: Node, relevant) -> bool:
    if len(relevant) != 2:
        return False
    build(planner, [node], relevant, None, "sum")
    return True


@classifier("dot_general", order=JOINT)
def _bilinear(planner, node: Node, relevant) -> bool:
    if len(relevant) != 2:
        return False
    build(planner, [node], relevant, None, "bilinear")
    return True


def build(planner, nodes: list[Node], relevant, weight, kind: str, affine: bool = False) -> None:
    """Makes the step of the linear layer `nodes` with the chain it absorbs (`affine`: `nodes`
    compute an affine map, see `LinearStep`)."""
    first, last = nodes[0], nodes[-1]
    if not planner.carries(last.outputs[0]):  # a claimed group whose relevance reaches no output
        return  # (it feeds a stop_gradient alone): computed as it is
    chain = _absorb(planner, last.outputs[0], AFFINE if kind in WEIGHTED_KINDS or kind in ("norm", AFFINE_KIND) else SCALING,
                    past_statistics=kind == "norm")
    *inner, end = members = [*nodes, *chain]
    planner.absorbed.update(members[1:])
    # Computed inside the step. When the linear part computes a value read elsewhere too (a
    # LayerNorm's mean, which its variance reads), the linear part is computed outside too.
    shared = any(u not in members for n in nodes for u in planner.flow.users(n.outputs[0]) if n is not end)
    planner.skipped.update(chain[:-1] if shared else inner)
    path, module = planner.describe(last)
    merged = []
    for n in chain:
        other, _ = planner.describe(n)
        if other != path and other not in merged and n.name not in RESHAPING:
            merged.append(other)
    info = LayerInfo(
        path=path,
        module=module,
        kind=kind,
        merged=tuple(merged),
        input_shapes=tuple(tuple(first.inputs[i].shape) for i in relevant),
        output_shape=tuple(end.outputs[0].shape),
        names=_weight_names(planner, last.inputs[weight]) if kind in WEIGHTED_KINDS else (),
    )
    nonnegative = all(first.inputs[i] in planner.flow.nonnegative for i in relevant)
    planner.steps[end] = LinearStep(nodes, chain, tuple(relevant), weight, info, nonnegative, affine)


def _absorb(planner, value: Value, ops: frozenset, past_statistics: bool = False) -> list[Node]:
    """The single-use chain of `ops` (and reshapes and dtype conversions between them) after a
    linear map, up to its last op that computes something. With `past_statistics` (a norm's
    centering) a use that relevance does not flow through (the variance's) does not count."""
    chain: list[Node] = []
    uses = _relevant_users if past_statistics else (lambda planner, value: list(planner.flow.users(value)))
    while len(users := uses(planner, value)) == 1 and users[0] is not None:
        user = users[0]
        if user.name in RESHAPING and len(user.inputs) == 1:
            if not is_float(user.outputs[0]):
                break
        elif not _absorbable(planner, user, value, ops):
            break
        chain.append(user)
        value = user.outputs[0]
    while chain and chain[-1].name in RESHAPING:
        chain.pop()
    return chain


def _relevant_users(planner, value: Value) -> list:
    """The uses of `value` that relevance flows through: not one whose float outputs carry
    none (a variance of a centered value, whose 1/σ is held; what feeds a stop_gradient)."""
    def relevant(user) -> bool:
        return user is None or any(planner.carries(v) or not is_float(v) for v in user.outputs)

    return [user for user in planner.flow.users(value) if relevant(user)]


def _absorbable(planner, user: Node, value: Value, ops: frozenset) -> bool:
    """`user` applies a constant elementwise op of `ops` to `value` (no broadcast of it)."""
    others = [a for a in user.inputs if a is not value]
    return (
        user.name in ops
        and sum(a is value for a in user.inputs) == 1
        and not any(planner.carries(a) for a in others)
        and all(is_float(a) for a in others)
        and user.outputs[0].shape == value.shape
        and not (user.name == "div" and user.inputs[0] is not value)
    )


def _weight_names(planner, weight) -> tuple[str, ...]:
    """The names of the parameter a weight is read from, through conversions and reshapes."""
    while isinstance(weight, Value) and weight not in planner.names:
        node = planner.flow.producer.get(weight)
        values = [] if node is None else [a for a in node.inputs if isinstance(a, Value)]
        if len(values) != 1 or node.name not in RESHAPING:
            return ()
        weight = values[0]
    return planner.names.get(weight, ())


def _local_conv(planner, node: Node, weight: int) -> tuple[list[Node], int] | None:
    """`([patches, reshapes..., dot], weight position)` when `node` extracts patches (a
    convolution with a constant kernel) that feed, through reshapes only, a dense map with a
    learned weight (`nn.ConvLocal`); else None."""
    if node.name != "conv_general_dilated" or planner.flow.is_learned(node.inputs[weight]) or weight != 1:
        return None
    # A patch extraction (`lax.conv_general_dilated_patches`): one group per input feature,
    # one output feature per input feature and window position. A fixed filter is not one.
    kernel, layout = node.inputs[1].shape, _internals.conv_layout(node.params)
    features = node.inputs[0].shape[layout.lhs_spec[1]]
    window = int(np.prod([kernel[d] for d in layout.rhs_spec[2:]]))
    if layout.feature_group_count != features or kernel[layout.rhs_spec[0]] != features * window:
        return None
    nodes, value = [node], node.outputs[0]
    while len(users := planner.flow.users(value)) == 1 and users[0] is not None:
        user = users[0]
        nodes.append(user)
        if user.name == "dot_general" and sum(a is value for a in user.inputs) == 1:
            other = next(i for i, a in enumerate(user.inputs) if a is not value)
            return (nodes, other) if planner.flow.is_learned(user.inputs[other]) else None
        if user.name not in STRUCTURAL:
            return None
        value = user.outputs[0]
    return None
