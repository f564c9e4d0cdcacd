"""Runs a relevance plan: the forward pass unchanged, each LRP step a `jax.custom_vjp`.

The forward values are those of the original program, node by node; each step of the plan
runs itself (`Step.run`, in the module of its operation family) and its backward pass carries
relevance instead of a gradient (`relevance_call`): a linear layer calls its rule, an
elementwise region passes relevance through, a product of two activations asks its rule. Parameters
and the rule's hyperparameters enter each `custom_vjp` as ordinary (traced) arguments with a
zero cotangent, so a new epsilon never recompiles, `vmap` over gammas works, and `jax.grad`
of a function of the relevance reaches them through the backward pass.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Sequence

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxlrp._hooks import condition
from jaxlrp._program import Atom, Const, Node, varying_axes


@dataclasses.dataclass(frozen=True)
class Run:
    """What a step reads when it runs: the resolved rule of each step, and the zeros added at
    each embedding output (whose cotangent is the relevance arriving there), or None."""

    rules: dict
    taps: Any = None


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


def read(env: dict, atom: Atom):
    return atom.value if isinstance(atom, Const) else env[atom]


def evaluate(nodes: Sequence[Node], env: dict) -> None:
    for node in nodes:
        env.update(zip(node.outputs, node.bind(*(read(env, a) for a in node.inputs))))


def run(plan, rules: dict, args: Sequence, taps: Sequence | None = None, hooks: dict | None = None) -> list:
    """Evaluates the plan's program on `args`; `rules` maps each step that takes a rule to it.

    `hooks` maps values to `(mask, tap, store)`: as soon as such a value is computed, it is
    appended to the list `store`, its relevance is conditioned by `mask` (if not None), and
    `tap` (zeros, whose cotangent is the relevance arriving there; or None) is added to it.

    Each checkpointed region of the plan (`_remat`) runs inside `jax.checkpoint`."""
    program = plan.program
    env: dict = dict(zip(program.inputs, args))
    pending = dict(hooks or {})
    _run_nodes(plan, program.nodes, 0, env, Run(rules, taps), pending)
    if pending:
        _apply_hooks(pending, env)
    return [read(env, a) for a in program.outputs]


def _run_nodes(plan, nodes: Sequence[Node], depth: int, env, context: Run, pending: dict) -> None:
    """Runs `nodes` in order; each maximal run of them in one region at nesting `depth` as one
    checkpointed call."""
    i = 0
    while i < len(nodes):
        if pending:
            _apply_hooks(pending, env)
        region = plan.region(nodes[i], depth)
        if region is None:
            _run_node(plan, nodes[i], env, context)
            i += 1
            continue
        end = i + 1
        while end < len(nodes) and plan.region(nodes[end], depth) is region:
            end += 1
        _run_region(plan, nodes[i:end], depth + 1, region, env, context, pending)
        i = end


def _run_node(plan, node: Node, env, context: Run) -> None:
    step = plan.steps.get(node)
    if step is not None:
        step.run(env, context)
    elif node not in plan.skipped:
        evaluate([node], env)


def _run_region(plan, nodes: Sequence[Node], depth: int, region, env, context: Run, pending: dict) -> None:
    """Runs `nodes` as `jax.checkpoint` with `region`'s policy: every value they compute is an
    output (what nothing reads, the compiler drops), read from `env`; the hooks of values they
    compute are applied inside, and what those hooks store comes out as outputs too."""
    produced = {v for node in nodes for v in node.outputs}
    inner = {v: pending.pop(v) for v in list(pending) if v in produced}
    computed: list = []

    def body():
        local = collections.ChainMap({}, env)
        stores = {v: [] for v in inner}
        hooks = {v: (mask, tap, stores[v]) for v, (mask, tap, _) in inner.items()}
        _run_nodes(plan, nodes, depth, local, context, hooks)
        if hooks:
            _apply_hooks(hooks, local)
        computed.extend(local.maps[0])
        return [local.maps[0][v] for v in computed], [stores[v] for v in inner]

    values, stored = jax.checkpoint(body, prevent_cse=region.prevent_cse, policy=region.policy)()
    env.update(zip(computed, values))
    for (_, _, store), kept in zip(inner.values(), stored):
        store.extend(kept)


def _apply_hooks(pending: dict, env: dict) -> None:
    for value in [v for v in pending if v in env]:
        mask, tap, store = pending.pop(value)
        store.append(env[value])
        hooked = env[value] if mask is None else condition(env[value], mask)
        env[value] = hooked if tap is None else hooked + tap


def wide_dtype(*xs) -> np.dtype:
    """The dtype rules compute in: float32, or the inputs' own when wider (float64)."""
    return jnp.promote_types(jnp.float32, jnp.result_type(*xs))


def cast(tree, dtype):
    """Floating-point leaves of `tree` cast to `dtype`; others unchanged."""
    return jax.tree.map(lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a, tree)


def placed(args: Sequence, positions: Sequence[int], xs: Sequence) -> list:
    """`args` with `xs` at `positions` (a step's relevant inputs put back among its others)."""
    args = list(args)
    for i, x in zip(positions, xs):
        args[i] = x
    return args
