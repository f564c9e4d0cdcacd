"""`jaxlrp.lrp`: LRP as a function transformation of a Flax model."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxlrp import _linen, rules as _rules
from jaxlrp._execute import run
from jaxlrp._plan import Plan, make_plan
from jaxlrp._program import from_closed_jaxpr
from jaxlrp._table import FIXED, RuleTable
from jaxlrp.composites import Composite

__all__ = ["lrp", "output_and_lrp", "rule_table"]


def lrp(model, composite: Composite, **apply_kwargs) -> Callable[..., jax.Array]:
    """Turns a Flax Linen model into `explain(variables, x, target=None) -> relevance`.

    The relevance has the shape of `x`. `target` says where relevance starts:

    * `None`: each sample's arg-max output, seeded with that output's value;
    * an int, or an int array of shape `output.shape[:-1]`: that class, seeded with its value;
    * a float array of the output's shape: the initial relevance itself.

    `explain` is a pure function: it composes with `jax.jit`, `jax.vmap`, `jax.grad` and
    sharding. `apply_kwargs` go to `model.apply` (e.g. `train=False`). For a model whose input
    is integer token ids, relevance is read at the embedding output and summed over the
    feature axis, one value per token.

    Example::

        explain = jaxlrp.lrp(model, composites.EpsilonPlusFlat())
        relevance = jax.jit(explain)(variables, x, target=3)
    """
    _check_composite(composite)

    def explain(variables, x, target=None):
        return _output_and_relevance(model, composite, variables, x, target, apply_kwargs)[1]

    return explain


def output_and_lrp(model, composite: Composite, **apply_kwargs) -> Callable[..., tuple[jax.Array, jax.Array]]:
    """Like `lrp`, but `explain` returns `(output, relevance)` (as `jax.value_and_grad`)."""
    _check_composite(composite)

    def explain(variables, x, target=None):
        return _output_and_relevance(model, composite, variables, x, target, apply_kwargs)

    return explain


def rule_table(model, composite: Composite, variables, x, **apply_kwargs) -> RuleTable:
    """The rule each layer of `model` gets under `composite`, in execution order.

    `print(jaxlrp.rule_table(model, composite, variables, x))` shows each layer's path, module
    class, kind, rule and the modules merged into it (BatchNorm, a mean's division).
    """
    _check_composite(composite)
    plan = _plan(model, variables, x, apply_kwargs)
    resolved = _resolve(composite, plan)
    steps = plan.linear_steps()
    return RuleTable(tuple(s.info for s in steps), tuple(resolved[s] for s in steps))


def _check_composite(composite) -> None:
    if not isinstance(composite, Composite):
        raise TypeError(
            f"jaxlrp expected a composite (e.g. jaxlrp.composites.EpsilonPlusFlat()), got {composite!r}. "
            "To use one rule for every layer: composites.LayerMap({('dense', 'conv'): rule})."
        )


def _check_input(x) -> None:
    dtype = jnp.result_type(x)
    if not (jnp.issubdtype(dtype, jnp.floating) or jnp.issubdtype(dtype, jnp.integer)):
        raise TypeError(
            f"jaxlrp explains floating-point inputs (or integer token ids for models that start with "
            f"an embedding), got an input of dtype {dtype}."
        )
    if jnp.issubdtype(dtype, jnp.floating) and not isinstance(x, jax.core.Tracer):
        if not np.all(np.isfinite(np.asarray(x))):
            raise ValueError(
                "jaxlrp: the input holds NaN or Inf, which would make the whole relevance map NaN. "
                "Clean the input first (under jit this cannot be checked and NaN propagates)."
            )


def _plan(model, variables, x, apply_kwargs) -> Plan:
    closed, describe = _linen.trace(model, variables, x, apply_kwargs)
    program = from_closed_jaxpr(closed)
    if len(program.outputs) != 1:
        raise TypeError(f"jaxlrp explains models with one output array; this model returns {len(program.outputs)}.")
    n_params = len(program.inputs) - 1
    return make_plan(program, [False] * n_params + [True], describe)


def _resolve(composite: Composite, plan: Plan) -> dict:
    steps = plan.linear_steps()
    chosen = composite.rules([s.info for s in steps])
    resolved = {}
    for step, rule in zip(steps, chosen):
        info = step.info
        if rule is None:
            if info.kind not in FIXED:
                raise ValueError(
                    f"jaxlrp: no rule for layer '{info.path or '<root>'}' ({info.type_name}, kind "
                    f"'{info.kind}'): the composite {composite!r} has none for it. Add one, e.g. "
                    f"composites.combine(composite, composites.LayerMap({{'{info.kind}': rules.Epsilon()}}))."
                )
            rule = _rules.Norm()
        if isinstance(rule, _rules.Pass) and info.input_shapes != (info.output_shape,):
            raise ValueError(
                f"jaxlrp: rules.Pass at layer '{info.path}' needs one input shaped like its output "
                f"{info.output_shape}, got inputs shaped {list(info.input_shapes)}."
            )
        resolved[step] = rule
    return resolved


def _seed(out: jax.Array, target) -> jax.Array:
    """The initial relevance at the output."""
    if target is None:
        return jax.nn.one_hot(jnp.argmax(out, axis=-1), out.shape[-1], dtype=out.dtype) * out
    target = jnp.asarray(target)
    if jnp.issubdtype(target.dtype, jnp.floating):
        if target.shape != out.shape:
            raise ValueError(
                f"jaxlrp: a float target is the initial relevance and must have the output's shape "
                f"{out.shape}, got {target.shape}."
            )
        return target.astype(out.dtype)
    if not jnp.issubdtype(target.dtype, jnp.integer):
        raise TypeError(f"jaxlrp: target must be None, an int (array) or a float array, got dtype {target.dtype}.")
    if target.shape not in ((), out.shape[:-1]):
        raise ValueError(
            f"jaxlrp: an integer target is a class index per sample, shape () or {out.shape[:-1]}, "
            f"got {target.shape}."
        )
    if not isinstance(target, jax.core.Tracer):
        t = np.asarray(target)
        if np.any(t < 0) or np.any(t >= out.shape[-1]):
            raise ValueError(f"jaxlrp: target class out of range [0, {out.shape[-1]}): {t}.")
    return jax.nn.one_hot(target, out.shape[-1], dtype=out.dtype) * out


def _output_and_relevance(model, composite, variables, x, target, apply_kwargs):
    _check_input(x)
    plan = _plan(model, variables, x, apply_kwargs)
    resolved = _resolve(composite, plan)
    params = jax.tree.leaves(variables)
    if jnp.issubdtype(jnp.result_type(x), jnp.floating):

        def forward(x):
            return run(plan, resolved, [*params, x])[0]

        out, pullback = jax.vjp(forward, x)
        (relevance,) = pullback(_seed(out, target))
        return out, relevance
    return _token_relevance(plan, resolved, params, x, target)


def _token_relevance(plan: Plan, resolved, params, x, target):
    """Integer inputs: relevance at the embedding output(s), summed over the feature axis."""
    taps = [t.node.outputs[0] for t in plan.taps()]
    if not taps or any(t.shape[:-1] != x.shape for t in taps):
        raise TypeError(
            "jaxlrp: an integer input carries no relevance itself; it is explained through an "
            f"embedding lookup of shape {x.shape} + (features,), and this model has "
            f"{'none' if not taps else [t.shape for t in taps]}. Pass a floating-point input."
        )

    def forward(zeros):
        return run(plan, resolved, [*params, x], zeros)[0]

    zeros = [jnp.zeros(t.shape, t.dtype) for t in taps]
    out, pullback = jax.vjp(forward, zeros)
    (relevance,) = pullback(_seed(out, target))
    return out, sum(r.sum(axis=-1) for r in relevance)
