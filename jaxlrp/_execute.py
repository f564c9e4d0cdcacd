"""Runs a relevance plan: the forward pass unchanged, each LRP step a `jax.custom_vjp`.

The forward values are those of the original program, node by node. Each step's backward
pass carries relevance instead of a gradient: a linear layer calls its rule, an elementwise
region passes relevance through, a product of two activations splits it evenly. Parameters
and the rule's hyperparameters enter each `custom_vjp` as ordinary (traced) arguments with a
zero cotangent, so a new epsilon never recompiles, `vmap` over gammas works, and `jax.grad`
of a function of the relevance reaches them through the backward pass.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxlrp import _internals
from jaxlrp._hooks import condition
from jaxlrp._layer import Layer, unbroadcast
from jaxlrp._plan import (
    STRUCTURAL,
    VALUE_PRESERVING,
    LinearStep,
    PassStep,
    Plan,
    ProductStep,
    ScanStep,
    SoftmaxStep,
    TapStep,
)
from jaxlrp._program import Atom, Const, Node, Value, varying_axes
from jaxlrp._table import AFFINE_KIND


def _zero_cotangent(x):
    dtype = jnp.result_type(x)
    if jnp.issubdtype(dtype, jnp.inexact):
        return _typed_like(jnp.zeros(jnp.shape(x), dtype), x)
    return np.zeros(jnp.shape(x), jax.dtypes.float0)


def _typed_like(cotangent, primal):
    """`cotangent` with the type of `primal`: its dtype and, inside `jax.shard_map`, its set of
    varying manual axes (summed over the axes it should not vary along, as JAX's own transpose
    of an implicit broadcast does; broadcast along those it should)."""
    want, have = varying_axes(primal), varying_axes(cotangent)
    if have - want:
        cotangent = jax.lax.psum(cotangent, tuple(sorted(have - want)))
    if want - have:
        cotangent = jax.lax.pcast(cotangent, tuple(sorted(want - have)), to="varying")
    return cotangent.astype(jnp.result_type(primal))


def relevance_call(forward: Callable, backward: Callable, relevant: tuple, others, recompute: bool = False) -> jax.Array:
    """`forward(relevant, others)` whose VJP is `backward(relevant, others, output, R)`, the
    relevance of each relevant input (`output` is the forward value, kept from the forward pass,
    or with `recompute` computed again in the backward pass: for maps as cheap as a sum, whose
    output is not worth a buffer held from the forward pass to the backward).

    `others` (parameters, the rule) travel as flat leaves, so that no zero-valued rule is ever
    built (its constructor would reject, say, AlphaBeta(0, 0)).
    """
    leaves, treedef = jax.tree.flatten(others)

    @jax.custom_vjp
    def call(relevant, leaves):
        return forward(relevant, treedef.unflatten(leaves))

    def call_fwd(relevant, leaves):
        output = forward(relevant, treedef.unflatten(leaves))
        return output, (relevant, leaves, None if recompute else output)

    def call_bwd(residuals, relevance):
        relevant, leaves, output = residuals
        if recompute:
            output = forward(relevant, treedef.unflatten(leaves))
        out = backward(relevant, treedef.unflatten(leaves), output, relevance)
        out = tuple(_typed_like(r, x) for r, x in zip(out, relevant))
        return out, [_zero_cotangent(leaf) for leaf in leaves]

    call.defvjp(call_fwd, call_bwd)
    return call(relevant, leaves)


def _read(env: dict, atom: Atom):
    return atom.value if isinstance(atom, Const) else env[atom]


def _evaluate(nodes: Sequence[Node], env: dict) -> None:
    for node in nodes:
        env.update(zip(node.outputs, node.bind(*(_read(env, a) for a in node.inputs))))


def run(plan: Plan, rules: dict, args: Sequence, taps: Sequence | None = None, hooks: dict | None = None) -> list:
    """Evaluates the plan's program on `args`; `rules` maps each LinearStep to its rule.

    `hooks` maps values to `(mask, tap, store)`: as soon as such a value is computed, it is
    appended to the list `store`, its relevance is conditioned by `mask` (if not None), and
    `tap` (zeros, whose cotangent is the relevance arriving there; or None) is added to it."""
    program = plan.program
    env: dict = dict(zip(program.inputs, args))
    pending = dict(hooks or {})
    for node in program.nodes:
        if pending:
            _apply_hooks(pending, env)
        step = plan.steps.get(node)
        if step is None:
            if node not in plan.skipped:
                _evaluate([node], env)
        elif isinstance(step, LinearStep):
            env[step.output] = _run_linear(step, rules[step], env)
        elif isinstance(step, PassStep):
            env[step.output] = _run_pass(step, env)
        elif isinstance(step, SoftmaxStep):
            env[step.output] = _run_softmax(step, rules[step], env)
        elif isinstance(step, ProductStep):
            env[node.outputs[0]] = _run_product(step, rules[step], env)
        elif isinstance(step, TapStep):
            (out,) = node.bind(*(_read(env, a) for a in node.inputs))
            env[node.outputs[0]] = out if taps is None else out + taps[step.index]
        elif isinstance(step, ScanStep):
            env.update(zip(node.outputs, _run_scan(step, rules, env)))
    if pending:
        _apply_hooks(pending, env)
    return [_read(env, a) for a in program.outputs]


def _apply_hooks(pending: dict, env: dict) -> None:
    for value in [v for v in pending if v in env]:
        mask, tap, store = pending.pop(value)
        store.append(env[value])
        hooked = env[value] if mask is None else condition(env[value], mask)
        env[value] = hooked if tap is None else hooked + tap


def _run_linear(step: LinearStep, rule, env: dict) -> jax.Array:
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
            args = [_read(local, a) for a in node.inputs]
            if node is step.weighted and weight is not None:
                args[step.weight] = weight
            (local[node.outputs[0]],) = node.bind(*args, dtype=dtype)
        return local[step.weighted.outputs[0]]

    def forward(xs, others):
        local = dict(zip(params, others["params"]))
        local[step.weighted.outputs[0]] = linear_map(local, xs)
        _evaluate(step.chain, local)
        return local[step.output]

    def backward(xs, others, output, relevance):
        # The rule works in float32 or wider, whatever the model's dtype (bfloat16, float16).
        dtype = _wide_dtype(*xs)
        precise = jnp.promote_types(jnp.result_type(output), dtype) == jnp.result_type(output)
        xs, output, relevance = _cast((xs, output, relevance), dtype)
        local = dict(zip(params, _cast(others["params"], dtype)))

        def linear(inputs, w):
            if step.info.kind == AFFINE_KIND:  # x ↦ a·x + b: its linear part is the identity
                return _structural(step.chain, inputs[0])
            return _structural(step.chain, linear_map(local, inputs, w, dtype))

        return others["rule"](_layer(step, local, linear, output, precise), xs, relevance)

    relevant = tuple(_read(env, a) for a in relevant_atoms)
    others = {"params": [env[a] for a in params], "rule": rule}
    return relevance_call(forward, backward, relevant, others, recompute=step.weight is None)


def _wide_dtype(*xs) -> np.dtype:
    """The dtype rules compute in: float32, or the inputs' own when wider (float64)."""
    return jnp.promote_types(jnp.float32, jnp.result_type(*xs))


def _cast(tree, dtype):
    """Floating-point leaves of `tree` cast to `dtype`; others unchanged."""
    return jax.tree.map(lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a, tree)


def _structural(chain: Sequence[Node], y):
    for node in chain:
        if node.name in STRUCTURAL:
            (y,) = node.bind(y)
    return y


def _layer(step: LinearStep, local: dict, linear: Callable, output, precise: bool) -> Layer:
    """Folds the chain's affine ops into `scale` and `shift`, structural ops into `linear`;
    dtype conversions count as nothing."""
    scale = shift = None
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
    weight = None if step.weight is None else _read(local, step.weighted.inputs[step.weight])
    if weight is not None and scale is not None:
        folded = _fold_into_weight(step, weight, jnp.asarray(scale))
        if folded is not None:
            weight, scale = folded, None
    signs = (1, -1) if step.first.name == "sub" else (1,) * len(step.relevant)
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
    p = _read(local, node.inputs[1 - position])
    if node.name == "add":
        return scale, zero + p
    if node.name == "sub":
        return (scale, zero - p) if position == 0 else (-one, p - zero)
    if node.name == "mul":
        return one * p, None if shift is None else shift * p
    if node.name == "div":
        return one / p, None if shift is None else shift / p
    raise AssertionError(node.name)


def _run_pass(step: PassStep, env: dict) -> jax.Array:
    def forward(xs, extras):
        local = dict(zip(step.extras, extras))
        local[step.source] = xs[0]
        _evaluate(step.nodes, local)
        return local[step.output]

    def backward(xs, extras, output, relevance):
        # An input broadcast implicitly along size-1 axes gets the relevance of its copies.
        return (unbroadcast(relevance, jnp.shape(xs[0])),)

    return relevance_call(forward, backward, (env[step.source],), [env[v] for v in step.extras])


def _run_softmax(step: SoftmaxStep, rule, env: dict) -> jax.Array:
    internal = {step.source, *(n.outputs[0] for n in step.nodes)}
    extras = list(dict.fromkeys(a for n in step.nodes for a in n.inputs if isinstance(a, Value) and a not in internal))

    def forward(xs, others):
        local = dict(zip(extras, others["extras"]))
        local[step.source] = xs[0]
        _evaluate(step.nodes, local)
        return local[step.output]

    def backward(xs, others, output, relevance):
        # The input keeps its dtype: the rule reads a mask's fill against that dtype's range.
        output, relevance = _cast((output, relevance), _wide_dtype(*xs))

        def total(inputs, _):
            return jnp.sum(inputs[0], axis=step.axes, keepdims=True)

        return others["rule"](Layer(total, None, output), xs, relevance)

    others = {"extras": [env[a] for a in extras], "rule": rule}
    return relevance_call(forward, backward, (env[step.source],), others)


def _run_product(step: ProductStep, rule, env: dict) -> jax.Array:
    node = step.node

    def forward(xs, _):
        return node.bind(*xs)[0]

    def backward(xs, rule, output, relevance):
        layer = Layer(lambda inputs, _: node.bind(*inputs)[0], None, output, gates=step.gates)
        return rule(layer, xs, relevance)

    return relevance_call(forward, backward, tuple(_read(env, a) for a in node.inputs), rule)


def _run_scan(step: ScanStep, rules: dict, env: dict) -> list:
    node = step.node
    layout = _internals.scan_layout(node.params)
    n_consts, n_carry = layout.num_consts, layout.num_carry
    args = [_read(env, a) for a in node.inputs]
    consts, init, xs = args[:n_consts], args[n_consts : n_consts + n_carry], args[n_consts + n_carry :]

    def body(carry, x):
        outs = run(step.body, rules, [*consts, *carry, *x])
        return outs[:n_carry], outs[n_carry:]

    carry, ys = lax.scan(
        body, init, xs, length=layout.length, reverse=layout.reverse, unroll=layout.unroll
    )
    return [*carry, *ys]
