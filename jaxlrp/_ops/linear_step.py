"""A linear layer as a step: its map (`nodes`), then the affine chain it absorbed (`chain`).

The rule sees the layer as a `jaxlrp.Layer`, `z = L(x; W') + b'`: the chain's elementwise
affine ops with constant operands (a bias, a BatchNorm in inference mode, a mean's division)
fold into the merged weight `W'` when they vary along the output features only (zennit's
canonizers), else into an output scale; its reshapes into `L`; dtype conversions count as
nothing. Parameters, statistics and the rule travel as traced arguments of one
`relevance_call`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp

from jaxlrp import _internals
from jaxlrp._analysis import STRUCTURAL
from jaxlrp._execute import Run, cast, evaluate, read, relevance_call, wide_dtype
from jaxlrp._layer import Layer
from jaxlrp._ops.base import Step
from jaxlrp._program import Node, Value
from jaxlrp._table import AFFINE_KIND, LayerInfo

# Ops that keep every value (up to rounding): a layer's chain absorbs them as if absent.
VALUE_PRESERVING = frozenset("convert_element_type copy".split())
RESHAPING = STRUCTURAL | VALUE_PRESERVING


@dataclasses.dataclass(eq=False)
class LinearStep(Step):
    """A weighted or fixed linear layer: its linear map (`nodes`), then its absorbed `chain`.

    `nodes` is usually one node; a patch extraction before a dense map (`nn.ConvLocal`) makes
    two or more, a LayerNorm's centering several. The relevant inputs are those of `nodes[0]`,
    the weight an input of `nodes[-1]`."""

    nodes: list[Node]
    chain: list[Node]
    relevant: tuple[int, ...]  # positions in nodes[0].inputs that carry relevance
    weight: int | None  # position of the parameter operand in nodes[-1].inputs, None for fixed maps
    info: LayerInfo
    nonnegative: bool = False  # every relevant input is >= 0 by construction (a ReLU's output)
    # `nodes` compute an affine map `f` (a Keras LayerNorm's `x·inv + (β − mean·inv)`, its
    # statistics held): its linear part is `f(x) − f(0)`, its shift `f(0)`.
    affine: bool = False

    @property
    def first(self) -> Node:
        return self.nodes[0]

    @property
    def weighted(self) -> Node:
        return self.nodes[-1]

    @property
    def output(self) -> Value:
        return (self.chain[-1] if self.chain else self.weighted).outputs[0]

    def inside(self) -> tuple[Value, ...]:
        return tuple(v for n in (*self.nodes, *self.chain) for v in n.outputs if v is not self.output)

    def run(self, env: dict, run: Run) -> None:
        env[self.output] = _run(self, run.rules[self], env)


def _run(step: LinearStep, rule, env: dict) -> jax.Array:
    first = step.first
    nodes = [*step.nodes, *step.chain]
    relevant_atoms = tuple(first.inputs[i] for i in step.relevant)
    internal = {n.outputs[0] for n in nodes}
    # Every value the layer reads besides its relevant inputs: weight, bias, statistics.
    params: list[Value] = []
    for a in (a for n in nodes for a in n.inputs):
        if isinstance(a, Value) and a not in internal and a not in relevant_atoms and a not in params:
            params.append(a)

    def linear_map(local: dict, xs, weight=None, dtype=None):
        """The layer's linear map of `xs` (its relevant inputs), with `weight` if given."""
        local = {**local, **{first.inputs[i]: x for i, x in zip(step.relevant, xs)}}
        for node in step.nodes:
            args = [read(local, a) for a in node.inputs]
            if node is step.weighted and weight is not None:
                args[step.weight] = weight
            (local[node.outputs[0]],) = node.bind(*args, dtype=dtype)
        return local[step.weighted.outputs[0]]

    def forward(xs, others):
        local = dict(zip(params, others["params"]))
        local[step.weighted.outputs[0]] = linear_map(local, xs)
        evaluate(step.chain, local)
        return local[step.output]

    def backward(xs, others, output, relevance):
        # The rule works in float32 or wider, whatever the model's dtype (bfloat16, float16).
        dtype = wide_dtype(*xs)
        precise = jnp.promote_types(jnp.result_type(output), dtype) == jnp.result_type(output)
        xs, output, relevance = cast((xs, output, relevance), dtype)
        local = dict(zip(params, cast(others["params"], dtype)))

        offset = linear_map(local, [jnp.zeros_like(x) for x in xs], None, dtype) if step.affine else None

        def linear(inputs, w):
            if step.info.kind == AFFINE_KIND:  # x ↦ a·x + b: its linear part is the identity
                shape = step.first.outputs[0].shape  # the shift may broadcast x (`x + b[None]`)
                return _structural(step.chain, jnp.broadcast_to(inputs[0], shape))
            y = linear_map(local, inputs, w, dtype)
            return _structural(step.chain, y if offset is None else y - offset)

        return others["rule"](_layer(step, local, linear, output, precise, offset), xs, relevance)

    relevant = tuple(read(env, a) for a in relevant_atoms)
    others = {"params": [env[a] for a in params], "rule": rule}
    return relevance_call(forward, backward, relevant, others, recompute=step.weight is None)


def _structural(chain: Sequence[Node], y):
    for node in chain:
        if node.name in STRUCTURAL:
            (y,) = node.bind(y)
    return y


def _layer(step: LinearStep, local: dict, linear: Callable, output, precise: bool, offset=None) -> Layer:
    """Folds the chain's affine ops into `scale` and `shift` (starting from `offset`, an affine
    map's value at zero), structural ops into `linear`; dtype conversions count as nothing."""
    scale, shift = None, offset
    if step.info.kind == AFFINE_KIND:  # the first node is a shift too
        y, folded = step.first.inputs[step.relevant[0]], [*step.nodes, *step.chain]
    else:
        y, folded = step.weighted.outputs[0], step.chain
    for node in folded:
        if node.name in STRUCTURAL:  # applies to the scale and shift too
            scale = None if scale is None else node.bind(jnp.broadcast_to(scale, y.shape))[0]
            shift = None if shift is None else node.bind(jnp.broadcast_to(shift, y.shape))[0]
        elif node.name not in VALUE_PRESERVING:
            scale, shift = _fold(node, y, scale, shift, local)
        y = node.outputs[0]
    weight = None if step.weight is None else read(local, step.weighted.inputs[step.weight])
    if weight is not None and scale is not None:
        folded = _fold_into_weight(step, weight, jnp.asarray(scale))
        if folded is not None:
            weight, scale = folded, None
    signs = (1, -1) if step.first.name == "sub" and len(step.relevant) == 2 else (1,) * len(step.relevant)
    return Layer(linear, weight, output, scale, shift, signs, step.nonnegative, precise)


def _fold_into_weight(step: LinearStep, weight, scale):
    """`W·a` when the scale `a` varies only along the output features, else None."""
    if scale.ndim == 0:
        return weight * scale.astype(weight.dtype)
    out = step.weighted.outputs[0]
    if scale.ndim != len(out.shape) or any(s not in (1, n) for s, n in zip(scale.shape, out.shape)):
        return None
    varying = {i for i, n in enumerate(scale.shape) if n != 1}
    params = step.weighted.params
    layout = _internals.conv_layout(params) if step.weighted.name == "conv_general_dilated" else None
    if layout is not None and step.weight == 1 and layout.batch_group_count == 1:
        output_features, kernel_features = layout.out_spec[1], layout.rhs_spec[0]
        if not varying <= {output_features}:
            return None
        shape = [1] * weight.ndim
        shape[kernel_features] = scale.shape[output_features]
        return weight * scale.reshape(shape).astype(weight.dtype)
    if step.weighted.name == "dot_general" and step.weight == 1:
        (_, contracting), (_, batch) = _internals.dot_layout(params)
        free = [d for d in range(weight.ndim) if d not in contracting and d not in batch]
        if batch or not varying <= set(range(scale.ndim - len(free), scale.ndim)):
            return None
        shape = [1] * weight.ndim
        for d, n in zip(free, scale.shape[scale.ndim - len(free):]):
            shape[d] = n
        return weight * scale.reshape(shape).astype(weight.dtype)
    return None


def _fold(node: Node, y: Value, scale, shift, local: dict):
    """`(scale, shift)` after one affine op `node` applied to `scale·L + shift`."""
    one = 1.0 if scale is None else scale
    zero = 0.0 if shift is None else shift
    if node.name == "neg":
        return -one, -zero
    position = 0 if node.inputs[0] is y else 1
    p = read(local, node.inputs[1 - position])
    if node.name == "add":
        return scale, zero + p
    if node.name == "sub":
        return (scale, zero - p) if position == 0 else (-one, p - zero)
    if node.name == "mul":
        return one * p, None if shift is None else shift * p
    if node.name == "div":
        return one / p, None if shift is None else shift / p
    raise AssertionError(node.name)
