"""`jaxlrp.lrp`: LRP as a function transformation of a Flax model or a plain JAX function."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp

from jaxlrp import _bindings, _checks, _generation, _hooks, _remat, _tokens, _warn, rules as _rules
from jaxlrp._execute import run
from jaxlrp._hooks import Explanation
from jaxlrp._plan import Plan, make_plan
from jaxlrp._program import Traced, from_closed_jaxpr, varying_axes
from jaxlrp._table import AFFINE_KIND, FIXED, PRODUCT, TRANSFORMER, RuleTable
from jaxlrp.composites import Composite

__all__ = ["lrp", "lrp_fn", "output_and_lrp", "rule_table"]


def lrp(
    model,
    composite: Composite,
    *,
    record: Sequence[str] = (),
    output: Callable | None = None,
    remat=None,
    **model_kwargs,
) -> Callable[..., jax.Array]:
    """Turns a Flax model, a Keras 3 model or a plain JAX function into a function that returns
    a relevance map shaped like its input.

    * Linen module: `explain(variables, x, *, target=None)`.
    * NNX module: `explain(x, *, target=None)`, reading the module's current state at each call.
    * NNX GraphDef (from `graphdef, state = nnx.split(model)`): `explain(state, x, *,
      target=None)`, the pure form: under `jax.jit` the weights are arguments, not constants,
      so one compiled function serves every weight set, and `state` can be sharded.
    * Keras 3 model (JAX backend): `explain(x, *, target=None)`, reading the model's current
      variables at each call (under `jax.jit`, baked in as constants); `model.stateless_call`
      is the pure form, `explain(trainable_values, non_trainable_values, x)` (the values:
      `[v.value for v in model.trainable_variables]`). Paths are Keras layer paths.
    * A plain function `fn(params, x)`: `explain(params, x, *, target=None)`; `argnums=` names
      another explained argument, as in `lrp_fn` (`lrp(fn, c, argnums=2)(params, None, x)`).

    `target` and `conditions` are keyword-only: a positional argument beyond the call form is
    an error, never passed to the model. Other keyword arguments of `explain` go to the model
    at call time (`mask=`, `positions=`): arrays that vary per call and are not explained,
    traced under `jax.jit`. `model_kwargs` go to the model at every call (`model.apply` for
    Linen, the module call for NNX, `fn` itself: `train=False`).

    `output`, a function of what the model returns, selects what is explained: a dict's or a
    dataclass's entry, `lambda logits: logits[:, -1]` for a language model's last position.
    The target then refers to that selection.

    Checkpointing: a region of the model under `jax.checkpoint` (`nn.remat`, `nnx.remat`) is
    checkpointed in the relevance pass too, under the model's policy: the rules' residuals are
    recomputed in the backward pass, not held. `remat=` checkpoints more: a module path or an
    fnmatch pattern over module paths (`remat="Block_*"`: each block is one region, holding
    only its inputs), a sequence of them, or a dict of them to `jax.checkpoint` policies
    (`remat={"Block_*": jax.checkpoint_policies.dots_saveable}`). It changes what is held,
    never a value.

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
    (`jax.jit(lambda eps, v, x: lrp(model, EpsilonPlus(epsilon=eps))(v, x))`). For a model
    whose input is integer token ids, relevance is read at the embedding output and summed over
    the feature axis, one value per token. In a pytree input (a dict of ids and a padding mask),
    an integer or bool leaf that no embedding lookup reads is structure (a mask, positions,
    indices): its relevance is zero; one that reaches a matmul or convolution as floats (a
    one-hot lookup) is an error, as relevance is read at lookups only. NNX models are explained in eval mode, on a copy.

    Example::

        explain = jaxlrp.lrp(model, composites.EpsilonPlusFlat())
        relevance = jax.jit(explain)(variables, x, target=3)
    """
    explain = output_and_lrp(model, composite, record=record, output=output, remat=remat, **model_kwargs)
    return _bindings.result_only(explain)


def output_and_lrp(
    model,
    composite: Composite,
    *,
    record: Sequence[str] = (),
    output: Callable | None = None,
    remat=None,
    **model_kwargs,
) -> Callable[..., tuple[jax.Array, jax.Array]]:
    """Like `lrp`, but `explain` returns `(output, relevance)` (as `jax.value_and_grad`); the
    output is what `output` selects, when given."""
    binding = _bindings.of(model, output=output, **model_kwargs)
    return _bindings.call_form(binding, explained(binding, composite, record, remat))


def lrp_fn(
    fn: Callable,
    composite: Composite,
    argnums: int | Sequence[int] = 1,
    *,
    record: Sequence[str] = (),
    output: Callable | None = None,
    remat=None,
    **fn_kwargs,
) -> Callable[..., jax.Array]:
    """LRP for a plain JAX function, e.g. `fn(params, x)` written with `jnp`, `lax`, `jax.nn`.

    Returns `explain(*args, target=None, conditions=None, **kwargs)`: the relevance of
    `args[argnums]` (for a tuple `argnums`, the tuple of the relevance of each of those
    arguments; any argument may be a pytree of arrays). `target` and `conditions` are
    keyword-only (a positional argument beyond `fn`'s own is an error); other keywords go to
    `fn` at call time, and `fn_kwargs` at every call. Each matmul or
    convolution with one parameter operand is a layer; `LayerMap` keys are its kind
    (`"dense"`, `"conv"`), `first=` means the first in execution order, and `NameMap` patterns
    match the `jax.named_scope` the layer was traced in or its weight's key path in the other
    arguments (`['w1']`, `.layers[3].weight`, `layers/3`, Haiku's `mlp/~/linear_2`). Leaves of
    the other arguments that are not arrays are static, so an Equinox model is passed as it is.
    `output` selects what is explained from what `fn` returns (as in `lrp`), and `remat=`
    checkpoints regions by their `jax.named_scope` paths (as in `lrp`). The rule table of
    the same call is `jaxlrp.rule_table(fn, composite, *args, argnums=argnums)`.

    Example::

        def mlp(params, x):
            with jax.named_scope("hidden"):
                x = jax.nn.relu(x @ params["w1"] + params["b1"])
            return x @ params["w2"] + params["b2"]

        relevance = jaxlrp.lrp_fn(mlp, composites.EpsilonPlus())(params, x)
    """
    binding = _bindings.Function(fn, argnums, output, fn_kwargs)
    return _bindings.result_only(_bindings.call_form(binding, explained(binding, composite, record, remat)))


def explained(binding: _bindings.Binding, composite: Composite, record: Sequence[str] = (), remat=None) -> Callable:
    """`method(others, x, *, target=None, conditions=None, **kwargs) -> (output, relevance)`:
    the relevance pass on the arguments as `binding.split` gives them."""
    _check_composite(composite)
    record = _check_record(record)
    blocks = _remat.spec(remat)

    def method(others, x, *, target=None, conditions=None, **kwargs):
        return _output_and_relevance(binding, others, x, kwargs, composite, target, record, conditions, blocks)

    # remat= changes what is held, not a value: not part of the description (a data-set run's provenance)
    method.jaxlrp_description = f"{type(binding).__name__} under {composite!r}" + (f", record={record}" if record else "")
    return method


def rule_table(
    model, composite: Composite, *args, output: Callable | None = None, remat=None, **model_kwargs
) -> RuleTable:
    """The rule each layer of `model` gets under `composite`, in execution order.

    `args` are the positional arguments of `explain`, in every call form of `lrp`: `(variables,
    x)` for Linen, `(x,)` for an NNX module, `(state, x)` for an NNX GraphDef, `(params, x)`
    for a function `fn(params, x)`, and for `lrp_fn(fn, composite, argnums=2)` the same
    arguments with `argnums=2` (`rule_table(fn, composite, params, None, x, argnums=2)`).
    `output=`, `remat=` (checked against the model; it changes no rule) and model keyword
    arguments are those of `lrp`. `print` the table to see each
    layer's path, module class, kind, rule and the modules merged into it (BatchNorm, a mean's
    division); for a function, the key path of each layer's weight. An affine map that no layer
    absorbed (a BatchNorm that no dense or conv layer feeds) is a row of kind "affine" with
    `rules.Pass()`.
    """
    _check_composite(composite)
    binding = _bindings.of(model, output=output, **model_kwargs)
    others, x = binding.split(args)
    plan = _plan(binding.trace(others, x, {}), composite, len(jax.tree.leaves(x)), _remat.spec(remat))
    resolved = _resolve(composite, plan)
    steps = plan.table_steps()
    return RuleTable(tuple(s.info for s in steps), tuple(resolved[s] for s in steps))


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


def _plan(traced: Traced, composite: Composite, explained: int = 1, remat: _remat.Spec = ()) -> Plan:
    """The plan of a traced model whose last `explained` inputs (the leaves of `x`) are explained,
    with the blocks of `remat` checkpointed."""
    program = from_closed_jaxpr(traced.closed)
    if len(program.outputs) != 1:
        raise TypeError(
            f"jaxlrp explains one output array; this model returns {len(program.outputs)} arrays. Choose what "
            f"is explained with output=, a function of the model's output: e.g. jaxlrp.lrp(model, composite, "
            f"output=lambda out: out['logits'][:, -1]) for a language model's last position."
        )
    n_params = len(program.inputs) - explained
    active = [False] * n_params + [True] * explained
    return make_plan(program, active, traced.describe, traced.names, composite.hold, remat)


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
        _check_held_operand(rule, info)
        if isinstance(rule, _rules.Pass) and info.input_shapes != (info.output_shape,):
            raise ValueError(
                f"jaxlrp: rules.Pass at layer '{info.path}' needs one input shaped like its output "
                f"{info.output_shape}, got inputs shaped {list(info.input_shapes)}."
            )
        resolved[step] = rule
    return resolved


# Rules that hold one operand of a product: the LayerInfo field that names it, and what it is.
_HELD_OPERAND = {
    _rules.SignalTakeAll: ("gates", "gate", "one gate (sigmoid or 1 − sigmoid) and one signal"),
    _rules.HoldActivated: ("activated", "activated", "one activated branch and one linear branch (a gated MLP)"),
}


def _check_held_operand(rule, info) -> None:
    """An error, when the table is resolved, for a rule that holds an operand the row lacks."""
    for cls, (field, noun, needs) in _HELD_OPERAND.items():
        count = len(getattr(info, field))
        if isinstance(rule, cls) and (info.kind != PRODUCT or count != 1):
            found = "not a product" if info.kind != PRODUCT else f"{count} {noun} operands"
            raise ValueError(
                f"jaxlrp: rules.{cls.__name__} at layer '{info.path or '<root>'}' (kind '{info.kind}') needs a "
                f"product of {needs}; found {found}. Give this layer rules.Uniform() (a NameMap on its "
                f"path) or map only those products."
            )


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


def _seed(out: jax.Array, target, batch: int | None = None) -> jax.Array:
    """The initial relevance at the output: the target class's output (a float target: itself)."""
    weights = _checks.output_weights(out, target, batch)
    if target is not None and jnp.issubdtype(jnp.result_type(target), jnp.floating):
        return weights
    return weights * out


def _output_and_relevance(
    binding: _bindings.Binding,
    others: tuple,
    x,
    kwargs: dict,
    composite: Composite,
    target,
    record=(),
    conditions=None,
    remat: _remat.Spec = (),
):
    """`(output, relevance)` of the model that `binding` calls on `(others, x)`; `x` is explained,
    `kwargs` go to the model. With `record`, the relevance is an `Explanation`; `conditions`
    (`{path: mask}`) condition the relevance at module outputs."""
    leaves, treedef = jax.tree.flatten(x)
    for leaf in leaves:
        _checks.check_input(leaf, booleans=len(leaves) > 1)
    # Inside jax.shard_map, the explained input varies along every manual axis that the
    # parameters, the rules' hyperparameters or the target vary along (a sweep, an ensemble,
    # a target per device): so does the relevance, which then needs no sum over devices.
    leaves = [_varying_like(leaf, (others, kwargs, composite, target, conditions)) for leaf in leaves]
    traced = binding.trace(others, treedef.unflatten(leaves), kwargs)
    plan = _plan(traced, composite, len(leaves), remat)
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
    seeds = _many_seeds(out, target)
    if seeds is not None:  # one backward pass per seed, vmapped: relevance gets their leading axis
        lead = seeds.shape[:1]
        (at_floats, at_taps), at_layers = jax.vmap(pullback)(seeds)
    else:
        lead = ()
        (at_floats, at_taps), at_layers = pullback(_seed(out, target, _checks.batch_of(leaves)))
    per_leaf = [None] * len(leaves)
    for i, r in zip(floats, at_floats):
        per_leaf[i] = r
    for i, r in _tokens.token_relevance(reads, at_taps, leaves).items():
        per_leaf[i] = r  # token ids: the relevance at their embeddings, summed over features
    for i in _tokens.structure(plan, reads, leaves, floats):  # a mask, positions, indices: no relevance
        per_leaf[i] = jnp.zeros((*lead, *jnp.shape(leaves[i])), out.dtype)
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


def _many_seeds(out: jax.Array, target) -> jax.Array | None:
    """`(K, *out.shape)` seeds for a target that names K outputs per sample (K classes, or
    explain_generation's K generated tokens), else None."""
    if isinstance(target, _generation.TokenTargets):
        return target.seeds(out)
    if not _many_targets(out, target):
        return None
    if _checks.is_concrete(target):
        _checks.check_classes(target, out.shape[-1])
    return _checks.one_hot(jnp.moveaxis(jnp.asarray(target), -1, 0), out.shape[-1], out.dtype) * out


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
