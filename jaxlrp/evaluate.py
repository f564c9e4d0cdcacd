"""How faithful is a relevance map? Region perturbation (MoRF, LeRF, random), AOPC and ABPC,
the cascading parameter randomisation test, and the choice of rule hyperparameters by
faithfulness, each one compiled call per batch: the perturbation steps, the samples and the
points of a hyperparameter grid are array axes, not Python loops.

Example::

    from jaxlrp import evaluate

    apply = lambda x: model.apply(variables, x)
    relevance = jaxlrp.lrp(model, composites.EpsilonPlusFlat())(variables, x, target=y)
    morf = evaluate.region_perturbation(apply, x, relevance, target=y, patch=(2, 2, 1))
    lerf = evaluate.region_perturbation(apply, x, relevance, target=y, patch=(2, 2, 1), order="lerf")
    print(evaluate.aopc(morf).mean(), evaluate.abpc(morf, lerf).mean())

References: Samek et al. 2017, "Evaluating the visualization of what a deep neural network has
learned" (region perturbation, AOPC); Achtibat et al. 2024, "AttnLRP" (ABPC); Adebayo et al.
2018, "Sanity checks for saliency maps" (the randomisation test).
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable, Mapping, Sequence
from typing import NamedTuple

import flax.nnx as nnx
import jax
import jax.numpy as jnp
import numpy as np

from jaxlrp import _bindings, _checks, _eager
from jaxlrp._transform import explained

__all__ = [
    "Randomization",
    "Sweep",
    "abpc",
    "aopc",
    "randomization_test",
    "region_perturbation",
    "spearman",
    "sweep",
]

ORDERS = ("morf", "lerf", "random")


def region_perturbation(
    fn: Callable[[jax.Array], jax.Array],
    x: jax.Array,
    relevance: jax.Array,
    *,
    target=None,
    patch: Sequence[int],
    steps: int | None = None,
    order: str = "morf",
    baseline=0.0,
    key: jax.Array | None = None,
    chunk: int | None = None,
) -> jax.Array:
    """The target output as regions of the input are replaced, one more per step.

    Regions are the non-overlapping blocks of shape `patch` (one size per non-batch axis of `x`,
    dividing it: `(2, 2, C)` for images, `(1,)` for vectors, which is pixel flipping, `(1, d)`
    for token embeddings), numbered in row-major order. A region's score is the sum of its
    relevance; regions are replaced cumulatively by `baseline` in the `order` `"morf"` (most
    relevant first), `"lerf"` (least relevant first; ties in both by region number) or
    `"random"` (a permutation per sample, from `key`).

    Args:
      fn: maps a batch of inputs to outputs `(batch, classes)` (or `(batch,)` scores).
      x: the inputs, `(batch, ...)`; `relevance` is shaped like it. For `"morf"` and `"lerf"`
        a concrete relevance holding NaN or Inf is an error (it would make both orders the
        region-number order and ABPC 0); a traced one cannot be checked, and the curve of a
        sample whose relevance is not finite is NaN. `"random"` does not read its values.
      target: the class per sample (an int array of shape `(batch,)` or `()`), or `None` for
        the class `fn` predicts for `x`; ignored for `(batch,)` outputs. A concrete class
        outside `[0, classes)` is an error; a traced one gives that sample a NaN curve.
      steps: how many regions to replace, an int (default: all).
      baseline: a value, an array broadcastable to `x`, `"mean"` (each sample's mean) or
        `"uniform"` (noise uniform in each sample's [min, max], drawn once from `key`).
      chunk: how many perturbed copies of the batch go through `fn` in one call (a
        `jax.lax.map` over chunks of steps), an int >= 1; `None`: all `steps` copies as one
        batch of `steps · batch` inputs. `fn` must treat the samples of a batch independently
        (a model in eval mode does).

    Returns:
      `curve` of shape `(batch, steps + 1)`: `curve[:, k]` is the target output after `k`
      regions, `curve[:, 0]` the unperturbed one.

    All steps of all samples are one batched evaluation of `fn` (no Python loop); under
    `jax.jit` the whole curve is one compiled call.
    """
    x, relevance = jnp.asarray(x), jnp.asarray(relevance)
    if relevance.shape != x.shape:
        raise ValueError(
            f"jaxlrp.evaluate.region_perturbation: relevance {relevance.shape} must be shaped like the input {x.shape}."
        )
    grid = _region_grid(x.shape, patch, "region_perturbation")
    regions = int(np.prod(grid))
    if steps is None:
        steps = regions
    if not _is_int(steps) or not 0 <= steps <= regions:
        raise ValueError(f"jaxlrp.evaluate.region_perturbation: steps must lie in [0, {regions}] regions and be an int, got {steps!r}.")
    steps = int(steps)
    if chunk is not None and (not _is_int(chunk) or chunk < 1):
        raise ValueError(f"jaxlrp.evaluate.region_perturbation: chunk must be None or an int >= 1, got {chunk!r}.")
    if order not in ORDERS:
        raise ValueError(f"jaxlrp.evaluate.region_perturbation: order must be one of {ORDERS}, got {order!r}.")
    if order != "random":
        _check_finite(relevance, "region_perturbation", "relevance")
    needs_key = order == "random" or (isinstance(baseline, str) and baseline == "uniform")
    if needs_key and key is None:
        raise ValueError("jaxlrp.evaluate.region_perturbation: a random order or a uniform baseline needs key=.")
    clean = fn(x)
    batch = x.shape[0]
    if clean.ndim == 1:
        target = None  # (batch,) scores: there is no class to pick
    elif target is None:
        target = jnp.argmax(clean.reshape(batch, -1), axis=-1)
    else:
        target = _checked_target(target, batch, int(np.prod(clean.shape[1:])), "region_perturbation")
    targets = None if target is None else jnp.broadcast_to(target, (batch,))
    patch = tuple(patch)
    order_key, fill_key = jax.random.split(key) if key is not None else (None, None)
    rank = _region_rank(_region_scores(relevance, patch), order, order_key)  # (batch, regions)
    fill = _fill(x, baseline, fill_key)

    def outputs(ks):  # (n,) steps -> (n, batch): the n perturbed copies of the batch as one batch
        n = ks.shape[0]
        shape = (n * batch, *x.shape[1:])

        def copies(a):
            return jnp.broadcast_to(a, (n, *x.shape)).reshape(shape)

        removed = _expand((rank[None] < ks[:, None, None]).reshape(n * batch, -1), shape, patch)
        out = fn(jnp.where(removed, copies(fill), copies(x)))
        return _pick(out, None if targets is None else jnp.tile(targets, n)).reshape(n, batch)

    ks = jnp.arange(1, steps + 1)
    if steps == 0:
        rest = jnp.zeros((0, batch), clean.dtype)
    elif chunk is None or chunk >= steps:
        rest = outputs(ks)
    else:  # lax.map over chunks of steps; the last chunk is padded by repeating the last step
        padded = jnp.concatenate([ks, jnp.full((-steps) % chunk, steps)]).reshape(-1, chunk)
        rest = jax.lax.map(outputs, padded).reshape(-1, batch)[:steps]
    curve = jnp.concatenate([_pick(clean, targets)[:, None], rest.T], axis=1)
    if order == "random" or not jnp.issubdtype(curve.dtype, jnp.inexact):
        return curve
    finite = jnp.all(jnp.isfinite(relevance.reshape(batch, -1)), axis=1)  # traced relevance: NaN, not a silent curve
    return jnp.where(finite[:, None], curve, jnp.nan)


def aopc(curve: jax.Array) -> jax.Array:
    """Area over the perturbation curve, per sample (Samek et al. 2017):
    `(1/(L+1)) Σ_{k=0..L} curve[:, 0] − curve[:, k]`. Averaged over samples, it is the paper's
    AOPC; higher is better for a MoRF curve."""
    curve = jnp.asarray(curve)
    if curve.ndim != 2:
        raise ValueError(f"jaxlrp.evaluate.aopc: expected a curve of shape (batch, steps + 1), got {curve.shape}.")
    return jnp.mean(curve[:, :1] - curve, axis=1)


def abpc(morf: jax.Array, lerf: jax.Array) -> jax.Array:
    """Area between the perturbation curves, per sample (AttnLRP, Achtibat et al. 2024):
    `(1/(L+1)) Σ_k lerf[:, k] − morf[:, k]`, which equals `aopc(morf) − aopc(lerf)`. Higher is
    better: removing the most relevant regions should hurt most, the least relevant least."""
    morf, lerf = jnp.asarray(morf), jnp.asarray(lerf)
    if morf.shape != lerf.shape:
        raise ValueError(f"jaxlrp.evaluate.abpc: the MoRF curve {morf.shape} and the LeRF curve {lerf.shape} differ.")
    if morf.ndim != 2:
        raise ValueError(f"jaxlrp.evaluate.abpc: expected curves of shape (batch, steps + 1), got {morf.shape}.")
    return jnp.mean(lerf - morf, axis=1)


def spearman(a: jax.Array, b: jax.Array) -> jax.Array:
    """Spearman's rank correlation per sample between `a` and `b` of shape `(batch, ...)`, ties
    given their average rank (as `scipy.stats.spearmanr`); NaN where a map is constant or holds
    NaN (scipy's `nan_policy="propagate"`; ±Inf rank as the extremes they are)."""
    a, b = jnp.asarray(a), jnp.asarray(b)
    if a.shape != b.shape or a.ndim < 2:
        raise ValueError(f"jaxlrp.evaluate.spearman: expected two maps of one shape (batch, ...), got {a.shape} and {b.shape}.")
    a, b = a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1)
    ra, rb = _ranks(a), _ranks(b)
    ra, rb = ra - ra.mean(axis=1, keepdims=True), rb - rb.mean(axis=1, keepdims=True)
    rho = (ra * rb).sum(axis=1) / jnp.sqrt((ra * ra).sum(axis=1) * (rb * rb).sum(axis=1))
    nan = jnp.any(jnp.isnan(a), axis=1) | jnp.any(jnp.isnan(b), axis=1)
    return jnp.where(nan, jnp.nan, rho)


class Randomization(NamedTuple):
    """The result of `randomization_test`."""

    layers: tuple[str, ...]
    """The randomised layers, from the output down: step `l` randomises `layers[: l + 1]`."""
    correlation: jax.Array
    """`(len(layers), batch)`: Spearman correlation of each step's map with the original."""


def randomization_test(
    explain: Callable[..., jax.Array],
    variables,
    x: jax.Array,
    *,
    target=None,
    key: jax.Array,
    layers: Sequence[str] | None = None,
    randomize: Callable[[jax.Array, str, jax.Array], jax.Array] | None = None,
    absolute: bool = False,
    relevance: jax.Array | None = None,
) -> Randomization:
    """Cascading model parameter randomisation (Adebayo et al. 2018): the layers' parameters are
    randomised from the output down, one more layer per step, and each step's map is compared
    with the original by Spearman's rank correlation, per sample. A method whose maps stay
    similar while the model is destroyed does not explain the model.

    Args:
      explain: `explain(variables, x, target=target)`, e.g. `jaxlrp.lrp(model, composite)` or a
        `jaxlrp.attribution` baseline (for an NNX module, its GraphDef form).
      target: as in `jaxlrp.lrp`, keyword-only.
      layers: the layers' paths in execution order (from the input to the output), e.g.
        `["conv0", "bn0", "fc1"]`; a layer is the group of arrays sharing a path (without the
        collection name and the array's own name). Default: every group, in the order of
        `variables` (Linen: the modules' creation order; an NNX State is sorted by name, so pass
        the order there).
      randomize: `randomize(key, path, array) -> array`, `path` the array's full key path
        (`"params/conv0/kernel"`). Default: a random permutation of the array's entries, which
        keeps its values (scales stay positive) and destroys what was learned. Arrays that are
        not floating point (an NNX RNG key or count) are kept.
      absolute: compare `|R|` instead of `R` (Adebayo et al. report both).
      relevance: the original maps, if already computed (else `explain(variables, x, target=target)`,
        called before the steps, so that `explain` checks the input and the target when they
        are concrete). Concrete original maps holding NaN or Inf are an error.

    All steps run in one compiled call (`jax.lax.map` over the steps). A step whose map holds
    NaN gets a NaN correlation for that sample.
    """
    paths = [_key_path(path) for path, _ in jax.tree_util.tree_flatten_with_path(variables)[0]]
    groups = [_group(path, variables) for path in paths]
    known = _in_mapping_order([g for g in groups if g is not None], paths, groups, variables)
    if layers is None:
        layers = known
    unknown = [name for name in layers if name not in known]
    if unknown:
        raise ValueError(f"jaxlrp.evaluate.randomization_test: unknown layer(s) {unknown}; the layers are {known}.")
    if relevance is None and not _eager.is_traced((variables, x, target)):
        relevance = explain(variables, x, target=target)  # eager: explain's own input and target checks
    if relevance is not None:
        for leaf in jax.tree.leaves(relevance):
            _check_finite(leaf, "randomization_test", "the original relevance")
    top_down = tuple(reversed(list(layers)))
    step_of = tuple(top_down.index(g) if g in top_down else -1 for g in groups)
    correlation = _randomization(
        explain, variables, x, target, key, len(top_down), step_of, tuple(paths), randomize or _permute, absolute, relevance
    )
    return Randomization(top_down, correlation)


@_eager.jit_when_eager
def _randomization(explain, variables, x, target, key, n_layers, step_of, paths, randomize, absolute, relevance):
    leaves, treedef = jax.tree.flatten(variables)
    keys = jax.random.split(key, len(leaves))
    step_of = [s if jnp.issubdtype(leaf.dtype, jnp.floating) else -1 for leaf, s in zip(leaves, step_of)]
    random = [randomize(k, p, leaf) if s >= 0 else leaf for k, p, leaf, s in zip(keys, paths, leaves, step_of)]
    original = explain(variables, x, target=target) if relevance is None else relevance
    transform = jnp.abs if absolute else (lambda r: r)

    def step(l):
        mixed = [jnp.where(l >= s, r, leaf) if s >= 0 else leaf for leaf, r, s in zip(leaves, random, step_of)]
        return spearman(transform(original), transform(explain(jax.tree.unflatten(treedef, mixed), x, target=target)))

    return jax.lax.map(step, jnp.arange(n_layers))


class Sweep(NamedTuple):
    """The result of `sweep`."""

    scores: jax.Array
    """Mean ABPC over the batch at each grid point, shaped `(len(v) for v in grid.values())`."""
    best: dict
    """The grid point with the highest score, `{name: value}`."""
    grid: dict
    """The grid, as given."""


def sweep(
    make_composite: Callable[..., object],
    grid: Mapping[str, Sequence[float]],
    model,
    variables,
    x: jax.Array,
    *,
    target=None,
    points_per_call: int | None = 1,
    output: Callable | None = None,
    **region_perturbation_args,
) -> Sweep:
    """Chooses rule hyperparameters by faithfulness: for each point of the grid (the product of
    the value lists in `grid`), builds `make_composite(**point)`, explains `x` with
    `jaxlrp.lrp`, and scores the maps by their mean ABPC (MoRF and LeRF region perturbation with
    `region_perturbation_args`: `patch=`, `steps=`, `baseline=`, `key=`, `chunk=`). All points
    are explained and scored in one jit-compiled call: the hyperparameters are traced leaves of
    the composite, so the grid costs one compilation, and no Python loop runs over it.
    `points_per_call` points are `vmap`-ed together inside that call (`jax.lax.map`'s
    `batch_size`; `None`: the whole grid in one `vmap`). The default, 1, runs the points one
    after another: on the CPU it was the fastest (8 points of the digits CNN: 396 ms against
    851 ms for one `vmap` and 630 ms for 8 jitted calls) and it holds one point in memory.

    `model`, `variables`: as for `jaxlrp.lrp` (Linen module and variables, NNX GraphDef and
    state, function `fn(params, x)` and params; for an NNX module pass `variables=None`, its
    state is read). `target` and `output` (what is explained of the model's output, also what
    the perturbation curves read) as in `jaxlrp.lrp`, keyword-only.

    The grid must name at least one hyperparameter, each with at least one finite value; a
    target outside `[0, classes)` and an input holding NaN or Inf are errors. A point whose
    maps hold NaN scores NaN and is never the best; if every point scores NaN, that is an error.

    Example::

        result = evaluate.sweep(
            lambda gamma, epsilon: composites.EpsilonGammaBox(low=0., high=1., gamma=gamma, epsilon=epsilon),
            {"gamma": [0.01, 0.1, 0.25, 1.0], "epsilon": [1e-6, 0.01, 0.25]},
            model, variables, x, target=y, patch=(2, 2, 1))
        result.best  # {'gamma': 0.25, 'epsilon': 0.01}
    """
    binding = _bindings.of(model, output=output)
    stateful = isinstance(binding, _bindings.NNXModule)
    if stateful and variables is not None:
        raise ValueError("jaxlrp.evaluate.sweep: for an NNX module pass variables=None (its state is read).")
    others, x = binding.split((x,) if stateful else (variables, x))
    values = _grid_values(grid)
    names = list(grid)
    if points_per_call is not None and (not _is_int(points_per_call) or points_per_call < 1):
        raise ValueError(f"jaxlrp.evaluate.sweep: points_per_call must be None or an int >= 1, got {points_per_call!r}.")
    points = np.array(list(itertools.product(*values))).reshape(-1, len(names))
    x = jnp.asarray(x)
    if jnp.issubdtype(x.dtype, jnp.floating):
        _check_finite(x, "sweep", "the input")
    if target is None:
        target = jnp.argmax(binding.apply(others, x, {}), axis=-1)
    else:
        out = jax.eval_shape(lambda o, x: binding.apply(o, x, {}), others, x)
        classes = int(np.prod(out.shape[1:])) if len(out.shape) > 1 else None
        if classes is not None:
            target = _checked_target(target, x.shape[0], classes, "sweep")
    dtype = jnp.promote_types(x.dtype, jnp.float32) if jnp.issubdtype(x.dtype, jnp.floating) else jnp.float32

    @jax.jit
    def scores(points, others, x, target):
        def score(point):
            composite = make_composite(**dict(zip(names, point)))
            _, relevance = explained(binding, composite)(others, x, target=target)
            forward = functools.partial(binding.apply, others, kwargs={})
            curves = [
                region_perturbation(forward, x, relevance, target=target, order=order, **region_perturbation_args)
                for order in ("morf", "lerf")
            ]
            return abpc(*curves).mean()

        if points_per_call is None:
            return jax.vmap(score)(points)
        return jax.lax.map(score, points, batch_size=points_per_call if points_per_call > 1 else None)

    result = scores(jnp.asarray(points, dtype), others, x, target)
    shaped = result.reshape([len(v) for v in values])
    if bool(jnp.all(jnp.isnan(result))):
        raise ValueError(
            f"jaxlrp.evaluate.sweep: every grid point scored NaN (its maps or curves hold NaN); the grid was {dict(grid)}."
        )
    best = points[int(jnp.nanargmax(result))]
    return Sweep(shaped, {name: float(v) for name, v in zip(names, best)}, dict(grid))


# ---- helpers -------------------------------------------------------------------------------


def _region_grid(shape, patch, caller: str) -> tuple[int, ...]:
    sizes = tuple(shape[1:])
    patch = tuple(patch)
    if len(patch) != len(sizes) or any(p < 1 or s % p for s, p in zip(sizes, patch)):
        raise ValueError(
            f"jaxlrp.evaluate.{caller}: patch {patch} needs one size per non-batch axis of the input "
            f"{tuple(shape)}, each dividing that axis."
        )
    return tuple(s // p for s, p in zip(sizes, patch))


def _blocked(shape, patch) -> tuple[int, ...]:
    """`(batch, g1, p1, g2, p2, ...)`: the input's shape with each axis split into regions."""
    return (shape[0], *(v for s, p in zip(shape[1:], patch) for v in (s // p, p)))


def _region_scores(relevance, patch) -> jax.Array:
    """`(batch, regions)`: the relevance summed over each region, regions in row-major order."""
    blocked = relevance.reshape(_blocked(relevance.shape, patch))
    return blocked.sum(axis=tuple(range(2, blocked.ndim, 2))).reshape(relevance.shape[0], -1)


def _expand(per_region, shape, patch) -> jax.Array:
    """`(batch, regions)` -> `shape`, each region's value over its block."""
    grid = _blocked(shape, patch)
    expanded = per_region.reshape(grid[0], *grid[1::2], *([1] * len(patch)))
    order = (0, *(i for d in range(len(patch)) for i in (1 + d, 1 + len(patch) + d)))
    return jnp.broadcast_to(expanded.transpose(order), grid).reshape(shape)


def _region_rank(scores, order, key) -> jax.Array:
    """`(batch, regions)`: each region's position in the perturbation order."""
    batch, regions = scores.shape
    if order == "random":
        sequence = jax.vmap(lambda k: jax.random.permutation(k, regions))(jax.random.split(key, batch))
    else:
        sequence = jnp.argsort(-scores if order == "morf" else scores, axis=1, stable=True)
    return jnp.argsort(sequence, axis=1)


def _fill(x, baseline, key) -> jax.Array:
    axes = tuple(range(1, x.ndim))
    if isinstance(baseline, str):
        if baseline == "mean":
            return jnp.broadcast_to(jnp.mean(x, axes, keepdims=True), x.shape)
        if baseline == "uniform":
            low, high = jnp.min(x, axes, keepdims=True), jnp.max(x, axes, keepdims=True)
            return jax.random.uniform(key, x.shape, x.dtype, low, high)
        raise ValueError(f"jaxlrp.evaluate: baseline must be a value, an array, 'mean' or 'uniform'; got {baseline!r}.")
    return jnp.broadcast_to(jnp.asarray(baseline, x.dtype), x.shape)


def _pick(out, target) -> jax.Array:
    """The explained output per sample; NaN for a (traced) class outside `[0, classes)`, never
    another class's output (negative indices would wrap around)."""
    if out.ndim == 1:
        return out
    flat = out.reshape(out.shape[0], -1)
    target = jnp.broadcast_to(jnp.asarray(target), out.shape[:1])
    picked = jnp.take_along_axis(flat, jnp.clip(target, 0, flat.shape[1] - 1)[:, None], axis=1)[:, 0]
    if not jnp.issubdtype(picked.dtype, jnp.inexact):
        return picked
    return jnp.where((target >= 0) & (target < flat.shape[1]), picked, jnp.nan)


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _check_finite(value, caller: str, what: str) -> None:
    """An error if `value` is concrete and holds NaN or Inf (a traced value cannot be checked)."""
    value = jnp.asarray(value)
    if not jnp.issubdtype(value.dtype, jnp.inexact) or not _checks.is_concrete(value):
        return
    with jax.ensure_compile_time_eval():
        bad = int(jnp.sum(~jnp.isfinite(value)))
    if bad:
        raise ValueError(
            f"jaxlrp.evaluate.{caller}: {what} holds NaN or Inf ({bad} of {value.size} values); expected finite "
            f"values. Find where they come from (an input with NaN, a rule with epsilon 0) and clean them first."
        )


def _checked_target(target, batch: int, classes: int, caller: str) -> jax.Array:
    """`target` as an int array of shape `()` or `(batch,)`; a concrete class outside `[0, classes)` is an error."""
    target = jnp.asarray(target)
    if not jnp.issubdtype(target.dtype, jnp.integer) or target.shape not in ((), (batch,)):
        raise ValueError(
            f"jaxlrp.evaluate.{caller}: target must be a class index per sample, an int array of shape () or "
            f"({batch},); got {target.dtype}{list(target.shape)}."
        )
    if _checks.is_concrete(target):
        _checks.check_classes(target, classes, f"jaxlrp.evaluate.{caller}")
    return target


def _grid_values(grid) -> list[np.ndarray]:
    """The grid's value lists as float64 vectors; an empty grid, an empty list or a non-finite value is an error."""
    if not isinstance(grid, Mapping) or not grid:
        raise ValueError(
            f"jaxlrp.evaluate.sweep: grid must map at least one hyperparameter name to its values, e.g. "
            f"{{'gamma': [0.1, 0.25]}}; got {grid!r}."
        )
    values = []
    for name, given in grid.items():
        if not isinstance(name, str):
            raise ValueError(f"jaxlrp.evaluate.sweep: the grid's names must be strings (make_composite's keywords), got {name!r}.")
        try:
            v = np.asarray(given, dtype=np.float64).reshape(-1)
        except (TypeError, ValueError):
            raise ValueError(f"jaxlrp.evaluate.sweep: the values of {name!r} must be numbers, got {given!r}.") from None
        if v.size == 0 or not np.all(np.isfinite(v)):
            raise ValueError(f"jaxlrp.evaluate.sweep: {name!r} needs at least one value, all finite; got {given!r}.")
        values.append(v)
    return values


def _ranks(values) -> jax.Array:
    """`(batch, n)` -> ranks 0..n-1 per row, ties given their average rank."""
    sorted_values = jnp.sort(values, axis=1)
    below = jax.vmap(lambda s, v: jnp.searchsorted(s, v, side="left"))(sorted_values, values)
    upto = jax.vmap(lambda s, v: jnp.searchsorted(s, v, side="right"))(sorted_values, values)
    return (below + upto - 1).astype(jnp.promote_types(values.dtype, jnp.float32)) / 2


def _permute(key, path: str, leaf) -> jax.Array:
    del path
    return jax.random.permutation(key, leaf.reshape(-1)).reshape(leaf.shape)


def _key_path(path) -> str:
    names = []
    for entry in path:
        if isinstance(entry, jax.tree_util.DictKey):
            names.append(str(entry.key))
        elif isinstance(entry, jax.tree_util.GetAttrKey):
            if entry.name != "value":  # an NNX Variable's value
                names.append(entry.name)
        elif isinstance(entry, jax.tree_util.SequenceKey):
            names.append(str(entry.idx))
        else:
            names.append(str(entry))
    return "/".join(names)


def _in_mapping_order(names, paths, groups, variables) -> list[str]:
    """The distinct layer names, ordered as their arrays first appear when walking the nested
    mappings of `variables` in their own order (a Linen dict: creation order), not sorted as
    `jax.tree` flattens them."""
    walk = list(_walk(variables))
    first = {}
    for path, group in zip(paths, groups):
        if group is not None:
            position = next((i for i, w in enumerate(walk) if f"{path}/".startswith(w)), len(walk))
            first[group] = min(first.get(group, position), position)
    return sorted(dict.fromkeys(names), key=lambda g: first[g])


def _walk(tree, prefix: str = ""):
    if isinstance(tree, Mapping):
        for k, v in tree.items():
            yield from _walk(v, f"{prefix}{k}/")
    else:
        yield prefix


def _group(path: str, variables) -> str | None:
    """A leaf's layer: its path without the array's name and (for Linen variables) the collection."""
    parts = path.split("/")
    if isinstance(variables, Mapping) and "params" in variables and not isinstance(variables, nnx.State):
        parts = parts[1:]
    return "/".join(parts[:-1]) or None
