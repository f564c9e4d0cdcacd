"""`jaxlrp.lrp`: LRP as a function transformation of a Flax model or a plain JAX function."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import flax.linen as nn
import flax.nnx as nnx
import jax
import jax.numpy as jnp
import numpy as np

from jaxlrp import _checks, _eager, _function, _hooks, _linen, _nnx, _tokens, _warn, rules as _rules
from jaxlrp._execute import run
from jaxlrp._hooks import Explanation
from jaxlrp._plan import Plan, make_plan
from jaxlrp._program import Traced, from_closed_jaxpr, varying_axes
from jaxlrp._table import AFFINE_KIND, FIXED, PRODUCT, TRANSFORMER, RuleTable
from jaxlrp.composites import Composite

__all__ = ["lrp", "lrp_fn", "output_and_lrp", "rule_table"]


def lrp(
    model, composite: Composite, record: Sequence[str] = (), output: Callable | None = None, **apply_kwargs
) -> Callable[..., jax.Array]:
    """Turns a Flax model into a function that returns a relevance map shaped like its input.

    * Linen module: `explain(variables, x, target=None)`.
    * NNX module: `explain(x, target=None)`, reading the module's current state at each call.
    * NNX GraphDef (from `graphdef, state = nnx.split(model)`): `explain(state, x,
      target=None)`, the pure form: under `jax.jit` the weights are arguments, not constants,
      so one compiled function serves every weight set, and `state` can be sharded.
    * A plain function `fn(params, x)`: `explain(params, x, target=None)` (see `lrp_fn` for
      other signatures).

    Keyword arguments of `explain` beyond `target` go to the model at call time (`mask=`,
    `positions=`): arrays that vary per call and are not explained, traced under `jax.jit`.

    `output`, a function of what the model returns, selects what is explained: a dict's or a
    dataclass's entry, `lambda logits: logits[:, -1]` for a language model's last position.
    The target then refers to that selection.

    `target` says where relevance starts:

    * `None`: each sample's arg-max output, seeded with that output's value;
    * an int, or an int array of shape `output.shape[:-1]`: that class, seeded with its value;
    * an int array of shape `output.shape[:-1] + (K,)`: K classes per sample at once, from one
      forward pass (the backward pass vmapped over the seeds); relevance gets a leading axis K;
    * a float array of the output's shape: the initial relevance itself.

    Concepts (Achtibat et al. 2023, Concept Relevance Propagation):

    * `record=("features/conv3", "block*")`, module paths or fnmatch patterns over them, makes
      `explain` return an `Explanation(input, layers, activations)`: the relevance arriving at
      each recorded module's output and that output, `{path: array}`, shaped like it. A path
      that matches no module is an error listing the paths.
    * `explain(..., conditions={path: mask})` multiplies the relevance arriving at that module's
      output by `mask` (`(C,)` over its features, `(B, C)` per sample, or the output's shape)
      before it flows on; masks are traced, so `jax.vmap` over one-hot masks gives every
      concept's conditional map in one call.

    `explain` is a pure function: it composes with `jax.jit`, `jax.vmap`, `jax.grad` and
    sharding. Under `jax.jit`, the stateful NNX form bakes the weights in as constants: jit the
    GraphDef form (or use `nnx.jit`) to pass them as arguments. To try new hyperparameters
    without recompiling, build the composite inside the jitted function from traced values
    (`jax.jit(lambda eps, v, x: lrp(model, EpsilonPlus(epsilon=eps))(v, x))`).
    `apply_kwargs` go to `model.apply` (Linen) or the module call (NNX). For a model
    whose input is integer token ids, relevance is read at the embedding output and summed over
    the feature axis, one value per token. NNX models are explained in eval mode, on a copy.

    Example::

        explain = jaxlrp.lrp(model, composites.EpsilonPlusFlat())
        relevance = jax.jit(explain)(variables, x, target=3)
    """
    with_output = output_and_lrp(model, composite, record, output, **apply_kwargs)

    @functools.wraps(with_output)
    def explain(*args, **kwargs):
        return with_output(*args, **kwargs)[1]

    return explain


def output_and_lrp(
    model, composite: Composite, record: Sequence[str] = (), output: Callable | None = None, **apply_kwargs
) -> Callable[..., tuple[jax.Array, jax.Array]]:
    """Like `lrp`, but `explain` returns `(output, relevance)` (as `jax.value_and_grad`); the
    output is what `output` selects, when given."""
    _check_composite(composite)
    record = _check_record(record)
    if isinstance(model, nnx.Module):  # its current state, read at each call, is an argument
        pure = output_and_lrp(nnx.graphdef(model), composite, record, output, **apply_kwargs)

        def explain(x, target=None, **call_kwargs):
            return pure(nnx.state(model), x, target, **call_kwargs)

        return explain

    bind = _binding(model, apply_kwargs, output)

    def pure(params, x, target=None, conditions=None, **call_kwargs):
        bound = functools.partial(bind, **call_kwargs)
        return _output_and_relevance(bound, (params, x), composite, target, call_kwargs, record, conditions)

    compiled = _compiled_when_eager(pure)

    def explain(params, x, target=None, **call_kwargs):
        return compiled(1, params, x, target=target, **call_kwargs)

    return explain


def lrp_fn(
    fn: Callable,
    composite: Composite,
    argnums: int | Sequence[int] = 1,
    record: Sequence[str] = (),
    output: Callable | None = None,
) -> Callable[..., jax.Array]:
    """LRP for a plain JAX function, e.g. `fn(params, x)` written with `jnp`, `lax`, `jax.nn`.

    Returns `explain(*args, target=None, conditions=None)`: the relevance of `args[argnums]`
    (for a tuple `argnums`, the tuple of the relevance of each of those arguments; any
    argument may be a pytree of arrays). Each matmul or
    convolution with one parameter operand is a layer; `LayerMap` keys are its kind
    (`"dense"`, `"conv"`), `first=` means the first in execution order, and `NameMap` patterns
    match the `jax.named_scope` the layer was traced in or its weight's key path in the other
    arguments (`['w1']`, `.layers[3].weight`, `layers/3`, Haiku's `mlp/~/linear_2`). Leaves of
    the other arguments that are not arrays are static, so an Equinox model is passed as it is.
    `output` selects what is explained from what `fn` returns (as in `lrp`).

    Example::

        def mlp(params, x):
            with jax.named_scope("hidden"):
                x = jax.nn.relu(x @ params["w1"] + params["b1"])
            return x @ params["w2"] + params["b2"]

        relevance = jaxlrp.lrp_fn(mlp, composites.EpsilonPlus())(params, x)
    """
    _check_composite(composite)
    record = _check_record(record)

    def positions(n: int):
        return tuple(i % n for i in argnums) if isinstance(argnums, Sequence) else argnums % n

    def pure(*args, target=None, conditions=None):
        position = positions(len(args))
        chosen = position if isinstance(position, tuple) else (position,)
        x = tuple(args[i] for i in chosen) if isinstance(position, tuple) else args[position]
        others = tuple(a for i, a in enumerate(args) if i not in chosen)
        bind = functools.partial(_function.trace, _selected(fn, output), position, others)
        return _output_and_relevance(bind, (x,), composite, target, others, record, conditions)

    compiled = _compiled_when_eager(pure)

    def explain(*args, target=None, conditions=None):
        return compiled(positions(len(args)), *args, target=target, conditions=conditions)[1]

    return explain


def _compiled_when_eager(pure: Callable) -> Callable:
    """`call(position, *args, target=None, **kwargs)`: `pure(*args, target=target, **kwargs)`,
    compiled once per call signature when called outside a JAX transformation (see `_eager`),
    with the value checks of the explained input `args[position]` and of the target kept."""
    jitted = _eager.jit_when_eager(pure)

    def call(position, *args, target=None, **kwargs):
        if _eager.is_traced((args, target, kwargs)):
            return pure(*args, target=target, **kwargs)
        chosen = position if isinstance(position, tuple) else (position,)
        for leaf in jax.tree.leaves([args[i] for i in chosen]):  # under jit the check would see a tracer
            _checks.check_input(leaf)
        if target is not None and not isinstance(target, (jax.Array, np.ndarray)):
            target = jnp.asarray(target)  # traced, so that a new class does not recompile
        out, relevance = jitted(*args, target=target, **kwargs)
        if target is not None and jnp.issubdtype(target.dtype, jnp.integer) and _checks.is_concrete(target):
            _checks.check_classes(target, out.shape[-1])
        return out, relevance

    return call


def rule_table(model, composite: Composite, *inputs, output: Callable | None = None, **apply_kwargs) -> RuleTable:
    """The rule each layer of `model` gets under `composite`, in execution order.

    `inputs` are those of `explain` without the target: `(variables, x)` for Linen, `(x,)` for
    an NNX module, `(state, x)` for an NNX GraphDef, `(params, x)` for a function
    `fn(params, x)`. `print` the table to see each layer's path, module class, kind, rule and
    the modules merged into it (BatchNorm, a mean's division); for a function, the key path of
    each layer's weight. An affine map that no layer absorbed (a BatchNorm that no dense or conv
    layer feeds) is a row of kind "affine" with `rules.Pass()`.
    """
    _check_composite(composite)
    plan = _plan(_binding(model, apply_kwargs, output)(*inputs), composite, len(jax.tree.leaves(inputs[-1])))
    resolved = _resolve(composite, plan)
    steps = plan.table_steps()
    return RuleTable(tuple(s.info for s in steps), tuple(resolved[s] for s in steps))


def _binding(model, apply_kwargs: dict, output: Callable | None = None) -> Callable[..., Traced]:
    """`bind(*inputs) -> Traced` for the kind of model; the input explained is the last;
    `output` selects what is explained from what the model returns."""
    if isinstance(model, nnx.Module):

        def bind(x, **call_kwargs):
            graphdef, state = nnx.split(model)
            return _nnx.trace(graphdef, state, x, {**apply_kwargs, **call_kwargs}, output)

    elif isinstance(model, nnx.GraphDef):

        def bind(state, x, **call_kwargs):
            return _nnx.trace(model, state, x, {**apply_kwargs, **call_kwargs}, output)

    elif isinstance(model, nn.Module):

        def bind(variables, x, **call_kwargs):
            return _linen.trace(model, variables, x, {**apply_kwargs, **call_kwargs}, output)

    elif callable(model) and not apply_kwargs:  # a plain function fn(params, x), as lrp_fn(fn, c)

        def bind(params, x, **call_kwargs):
            return _function.trace(_selected(functools.partial(model, **call_kwargs), output), 1, (params,), x)

    else:
        raise TypeError(
            f"jaxlrp explains Flax Linen modules, NNX modules and NNX GraphDefs, and plain functions "
            f"fn(params, x) (jaxlrp.lrp_fn for other signatures); got {type(model).__name__}."
        )
    return bind


def _selected(fn: Callable, output: Callable | None) -> Callable:
    """`fn` whose result goes through `output` (what is explained of it), when given."""
    if output is None:
        return fn

    @functools.wraps(fn)
    def selected(*args, **kwargs):
        return output(fn(*args, **kwargs))

    return selected


def _check_record(record) -> tuple[str, ...]:
    record = (record,) if isinstance(record, str) else tuple(record)
    if not all(isinstance(path, str) for path in record):
        raise TypeError(f"jaxlrp: record= takes module paths or patterns (strings), got {record!r}.")
    return record


def _check_composite(composite) -> None:
    if not isinstance(composite, Composite):
        raise TypeError(
            f"jaxlrp expected a composite (e.g. jaxlrp.composites.EpsilonPlusFlat()), got {composite!r}. "
            "To use one rule for every layer: composites.LayerMap({('dense', 'conv'): rule})."
        )


def _plan(traced: Traced, composite: Composite, explained: int = 1) -> Plan:
    """The plan of a traced model whose last `explained` inputs (the leaves of `x`) are explained."""
    program = from_closed_jaxpr(traced.closed)
    if len(program.outputs) != 1:
        raise TypeError(
            f"jaxlrp explains one output array; this model returns {len(program.outputs)} arrays. Choose what "
            f"is explained with output=, a function of the model's output: e.g. jaxlrp.lrp(model, composite, "
            f"output=lambda out: out['logits'][:, -1]) for a language model's last position."
        )
    n_params = len(program.inputs) - explained
    return make_plan(program, [False] * n_params + [True] * explained, traced.describe, traced.names, composite.hold)


def _warn_unmerged(info) -> None:
    module = f" ({info.type_name})" if info.module is not None else ""
    _warn.warn(
        f"jaxlrp: '{info.path or '<root>'}'{module} shifts its input by a learned value (a BatchNorm, a "
        f"bias, a positional embedding) that no dense or conv layer absorbs; relevance passes through "
        f"it unchanged, the shift's share included (zennit does the same). rule_table shows it as a "
        f"layer of kind 'affine'; a rule for that kind (the transformer composites give it Epsilon) "
        f"lets the shift absorb its share.",
        UnmergedAffineWarning,
    )


class UnmergedAffineWarning(UserWarning):
    """A shift by a learned value (a BatchNorm, a positional embedding) that jaxlrp could not
    merge into a dense or conv layer: relevance passes through it unchanged."""


def _resolve(composite: Composite, plan: Plan) -> dict:
    steps = plan.table_steps()
    infos = [s.info for s in steps]
    unmatched = composite.unmatched(infos)
    if unmatched:
        known = sorted({name for info in infos for name in (info.path or "<root>", *info.names)})
        raise ValueError(
            f"jaxlrp: NameMap pattern(s) {unmatched} match no layer of this model. The layers' "
            f"names: {known}."
        )
    chosen = composite.rules(infos)
    resolved = {}
    for step, rule in zip(steps, chosen):
        info = step.info
        if rule is None:
            if info.kind not in FIXED + TRANSFORMER + (AFFINE_KIND, PRODUCT):
                raise ValueError(
                    f"jaxlrp: no rule for layer '{info.path or '<root>'}' ({info.type_name}, kind "
                    f"'{info.kind}'): the composite {composite!r} has none for it. Add one, e.g. "
                    f"composites.combine(composite, composites.LayerMap({{'{info.kind}': rules.Epsilon()}}))."
                )
            rule = _default_rule(info.kind, composite)
        if info.kind == AFFINE_KIND and isinstance(rule, _rules.Pass):
            _warn_unmerged(info)
        if isinstance(rule, _rules.SignalTakeAll) and (info.kind != PRODUCT or len(info.gates) != 1):
            found = "not a product" if info.kind != PRODUCT else f"{len(info.gates)} gate operands"
            raise ValueError(
                f"jaxlrp: rules.SignalTakeAll at layer '{info.path or '<root>'}' (kind '{info.kind}') needs a "
                f"product of one gate (sigmoid or 1 − sigmoid) and one signal; found {found}. Give this "
                f"layer rules.Uniform() (a NameMap on its path) or map only the gated products."
            )
        if isinstance(rule, _rules.Pass) and info.input_shapes != (info.output_shape,):
            raise ValueError(
                f"jaxlrp: rules.Pass at layer '{info.path}' needs one input shaped like its output "
                f"{info.output_shape}, got inputs shaped {list(info.input_shapes)}."
            )
        resolved[step] = rule
    return resolved


def _default_rule(kind: str, composite: Composite) -> _rules.Rule:
    """What a sum, pooling, normalization, bilinear matmul, softmax or product gets when the
    composite gives it no rule: the ε-type rules take the composite's stabilizer."""
    stabilizer = _rules.DEFAULT_STABILIZER if composite.stabilizer is None else composite.stabilizer
    if kind == "softmax":
        return _rules.Softmax()
    if kind == AFFINE_KIND:
        return _rules.Pass()
    if kind == "bilinear":
        return _rules.Bilinear(stabilizer)
    if kind == PRODUCT:
        return _rules.Uniform()
    return _rules.Norm(stabilizer)


def _seed(out: jax.Array, target) -> jax.Array:
    """The initial relevance at the output: the target class's output (a float target: itself)."""
    weights = _checks.output_weights(out, target)
    if target is not None and jnp.issubdtype(jnp.result_type(target), jnp.floating):
        return weights
    return weights * out


def _output_and_relevance(
    bind: Callable[..., Traced], inputs: tuple, composite: Composite, target, others=(), record=(), conditions=None
):
    """`(output, relevance)` of the model that `bind(*inputs)` traces; `inputs[-1]` is explained
    (`others`: what `bind` closes over). With `record`, the relevance is an `Explanation`;
    `conditions` (`{path: mask}`) condition the relevance at module outputs."""
    leaves, treedef = jax.tree.flatten(inputs[-1])
    for leaf in leaves:
        _checks.check_input(leaf)
    # Inside jax.shard_map, the explained input varies along every manual axis that the
    # parameters, the rules' hyperparameters or the target vary along (a sweep, an ensemble,
    # a target per device): so does the relevance, which then needs no sum over devices.
    leaves = [_varying_like(leaf, (inputs[:-1], others, composite, target, conditions)) for leaf in leaves]
    traced = bind(*inputs[:-1], treedef.unflatten(leaves))
    plan = _plan(traced, composite, len(leaves))
    resolved = _resolve(composite, plan)
    params = traced.params
    recorded, masks = _hook_values(plan, traced.describe, record, conditions or {})
    floats = [i for i, leaf in enumerate(leaves) if jnp.issubdtype(jnp.result_type(leaf), jnp.floating)]
    token_taps = [t.node.outputs[0] for t in plan.taps()]
    reads = _tokens.token_reads(plan, leaves, floats)
    # Taps (zeros whose cotangent is the relevance arriving there) vary, inside jax.shard_map,
    # along the input's manual axes, as the values they are added to do: else their cotangent
    # would be summed over the devices.
    primal = ([leaves[i] for i in floats], [_varying_like(jnp.zeros(t.shape, t.dtype), leaves) for t in token_taps])
    layer_taps = [_varying_like(jnp.zeros(v.shape, v.dtype), leaves) for v in recorded.values()]

    def forward(primal, layer_taps):
        given, tap_zeros = primal
        args = list(leaves)
        for i, leaf in zip(floats, given):
            args[i] = leaf
        stores = {v: [] for v in {*recorded.values(), *masks}}
        taps = dict(zip(recorded.values(), layer_taps))
        hooks = {v: (masks.get(v), taps.get(v), stores[v]) for v in stores}
        out = run(plan, resolved, [*params, *args], tap_zeros or None, hooks)[0]
        return out, [stores[v][0] for v in recorded.values()]

    out, pullback, activations = jax.vjp(forward, primal, layer_taps, has_aux=True)
    if _many_targets(out, target):  # one backward pass per class, vmapped over the seeds
        if _checks.is_concrete(target):
            _checks.check_classes(target, out.shape[-1])
        weights = jax.nn.one_hot(jnp.moveaxis(jnp.asarray(target), -1, 0), out.shape[-1], dtype=out.dtype)
        (at_floats, at_taps), at_layers = jax.vmap(pullback)(weights * out)
    else:
        (at_floats, at_taps), at_layers = pullback(_seed(out, target))
    per_leaf = [None] * len(leaves)
    for i, r in zip(floats, at_floats):
        per_leaf[i] = r
    for i, r in _tokens.token_relevance(reads, at_taps, leaves, floats).items():
        per_leaf[i] = r  # token ids: the relevance at their embeddings, summed over features
    relevance = treedef.unflatten(per_leaf)
    if not record:
        return out, relevance
    return out, Explanation(relevance, dict(zip(recorded, at_layers)), dict(zip(recorded, activations)))


def _hook_values(plan: Plan, describe, record, conditions: dict) -> tuple[dict, dict]:
    """`({path: value} to record, {value: mask} to condition by)`, checked against the model."""
    if not record and not conditions:
        return {}, {}
    outputs = _hooks.module_outputs(plan, describe)
    recorded = _hooks.resolve(tuple(record), outputs, "record=")
    masks = {}
    for pattern, mask in conditions.items():
        for path, value in _hooks.resolve((pattern,), outputs, "conditions=").items():
            masks[value] = _hooks.broadcast_mask(mask, tuple(value.shape), path).astype(value.dtype)
    return recorded, masks


def _many_targets(out: jax.Array, target) -> bool:
    """An integer target of shape `output.shape[:-1] + (K,)`: K classes per sample at once."""
    if target is None:
        return False
    target = jnp.asarray(target)
    return bool(jnp.issubdtype(target.dtype, jnp.integer)) and target.ndim == out.ndim and target.ndim > 0


def _varying_like(x, trees):
    axes = frozenset().union(*(varying_axes(leaf) for leaf in jax.tree.leaves(trees) if isinstance(leaf, jax.Array)))
    missing = tuple(sorted(axes - varying_axes(x)))
    return jax.lax.pcast(x, missing, to="varying") if missing else x
