"""Steps of kinds that users register (`jaxlrp.extend.register_step(name, kind)`): a primitive
that is a row of the rule table of its own kind. Its rule sees the primitive's linearisation at
the forward inputs `x₀` as a `jaxlrp.Layer`: `z = J·x + b'` with `J` the Jacobian-vector
product in the relevant operands and `b' = f(x₀) − J·x₀`, so that `z` at `x₀` is the forward
value. For a linear primitive `J` is the primitive itself and `b'` zero (up to rounding). The
layer has no weight operand: a rule that modifies weights (ZPlus, Gamma) treats `J` as a fixed
map with unit weights, as it does a sum."""

from __future__ import annotations

import dataclasses

import jax

from jaxlrp._execute import Run, cast, placed, read, relevance_call, wide_dtype
from jaxlrp._layer import Layer
from jaxlrp._ops.base import LEARNED, Step, UnsupportedOperation, classifier
from jaxlrp._program import Node, Value
from jaxlrp._table import LayerInfo

# primitive name -> the kind of its row. A table: `jaxlrp.extend.register_step` adds to it.
STEP_KINDS: dict[str, str] = {}


@dataclasses.dataclass(eq=False)
class LinearizedStep(Step):
    node: Node
    relevant: tuple[int, ...]
    info: LayerInfo

    @property
    def output(self) -> Value:
        return self.node.outputs[0]

    def run(self, env: dict, run: Run) -> None:
        node, relevant = self.node, self.relevant

        def forward(xs, others):
            return node.bind(*placed(others["args"], relevant, xs))[0]

        def backward(xs, others, output, relevance):
            # Linearised in the model's own dtypes (the primitive's params may fix them), the
            # rule working in float32 or wider.
            dtype = wide_dtype(*xs)

            def at(*inputs):
                return node.bind(*placed(others["args"], relevant, inputs))[0]

            def linear(inputs, _):
                tangents = tuple(t.astype(x.dtype) for t, x in zip(inputs, xs))
                return jax.jvp(at, xs, tangents)[1].astype(dtype)

            wide, output, relevance = cast((xs, output, relevance), dtype)
            layer = Layer(linear, None, output, shift=output - linear(wide, None), signs=(1,) * len(xs))
            return others["rule"](layer, wide, relevance)

        args = [None if i in relevant else read(env, a) for i, a in enumerate(node.inputs)]
        xs = tuple(read(env, node.inputs[i]) for i in relevant)
        env[self.output] = relevance_call(forward, backward, xs, {"args": args, "rule": run.rules[self]})


@classifier(order=LEARNED)
def _registered(planner, node: Node, relevant) -> bool:
    kind = STEP_KINDS.get(node.name)
    if kind is None:
        return False
    if len(node.outputs) != 1:
        raise UnsupportedOperation(
            f"jaxlrp: `{node.name}` in {planner.where(node)} was registered with register_step, which takes "
            f"primitives of one output; this one has {len(node.outputs)}."
        )
    path, module = planner.describe(node)
    info = LayerInfo(path, module, kind, input_shapes=tuple(tuple(node.inputs[i].shape) for i in relevant),
                     output_shape=tuple(node.outputs[0].shape))
    planner.steps[node] = LinearizedStep(node, relevant, info)
    return True
