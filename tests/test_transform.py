"""jaxlrp.lrp is a JAX transformation: jit, vmap, grad, sharding, traced hyperparameters."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

import jaxlrp
from jaxlrp import composites, rules

import models

MODEL = models.CNN()
SHAPE = (4, 8, 8, 2)


@pytest.fixture(scope="module")
def setup():
    """float64 input, float32 variables: for the tests marked float64 (finite differences)."""
    return models.init(MODEL, SHAPE, jnp.float64)


def _in(dtype, seed=0):
    """Input and variables in `dtype` (float32: JAX's default configuration)."""
    variables, x = models.init(MODEL, SHAPE, dtype, seed=seed)
    return jax.tree.map(lambda a: a.astype(dtype), variables), x


@pytest.mark.parametrize("name, dtype", models.NAMED_ONCE)
def test_jit_equals_eager(name, dtype):
    variables, x = _in(dtype)
    explain = jaxlrp.lrp(MODEL, models.NAMED[name]())
    relevance = jax.jit(explain)(variables, x)
    assert relevance.dtype == dtype
    np.testing.assert_allclose(relevance, explain(variables, x), **models.tolerance(dtype))


@pytest.mark.parametrize("name, dtype", models.NAMED_ONCE)
def test_vmap_over_batch_equals_batched(name, dtype):
    variables, x = _in(dtype)
    explain = jaxlrp.lrp(MODEL, models.NAMED[name]())
    targets = jnp.array([0, 1, 2, 1])
    per_sample = jax.vmap(lambda xi, ti: explain(variables, xi[None], target=ti[None])[0])(x, targets)
    np.testing.assert_allclose(per_sample, explain(variables, x, target=targets), **models.tolerance(dtype))


@pytest.mark.parametrize("dtype", models.PRECISIONS)
def test_target_forms_agree(dtype):
    variables, x = _in(dtype)
    explain = jaxlrp.output_and_lrp(MODEL, composites.EpsilonPlus())
    out, by_argmax = explain(variables, x)
    classes = jnp.argmax(out, -1)
    _, by_index = explain(variables, x, target=classes)
    _, by_seed = explain(variables, x, target=jax.nn.one_hot(classes, 3, dtype=dtype) * out)
    np.testing.assert_allclose(by_argmax, by_index, **models.tolerance(dtype))
    np.testing.assert_allclose(by_argmax, by_seed, **models.tolerance(dtype))
    _, scalar = explain(variables, x, target=1)
    _, vector = explain(variables, x, target=jnp.ones(4, int))
    np.testing.assert_allclose(scalar, vector, **models.tolerance(dtype))


@pytest.mark.parametrize("dtype", models.PRECISIONS)
def test_output_is_the_models(dtype):
    variables, x = _in(dtype)
    out, _ = jaxlrp.output_and_lrp(MODEL, composites.EpsilonPlus())(variables, x)
    np.testing.assert_array_equal(out, MODEL.apply(variables, x))


def _gamma_composite(gamma):
    return composites.LayerMap({"conv": rules.Gamma(gamma), "dense": rules.Epsilon()})


@pytest.mark.parametrize("dtype", models.PRECISIONS)
def test_vmap_over_gamma_equals_loop(dtype):
    variables, x = _in(dtype)
    gammas = jnp.array([0.0, 0.25, 1.0], dtype)
    batched = jax.vmap(lambda g: jaxlrp.lrp(MODEL, _gamma_composite(g))(variables, x))(gammas)
    for g, r in zip(gammas, batched):
        np.testing.assert_allclose(r, jaxlrp.lrp(MODEL, _gamma_composite(float(g)))(variables, x),
                                   **models.tolerance(dtype))


@pytest.mark.parametrize("dtype", models.PRECISIONS)
def test_new_epsilon_does_not_recompile(dtype):
    variables, x = _in(dtype)
    traces = []

    @jax.jit
    def explain(epsilon, variables, x):
        traces.append(1)
        return jaxlrp.lrp(MODEL, composites.LayerMap({("dense", "conv"): rules.Epsilon(epsilon)}))(variables, x)

    a = explain(0.01, variables, x)
    b = explain(0.5, variables, x)
    assert len(traces) == 1
    assert not np.allclose(a, b)
    eager = jaxlrp.lrp(MODEL, composites.LayerMap({("dense", "conv"): rules.Epsilon(0.5)}))(variables, x)
    np.testing.assert_allclose(b, eager, **models.tolerance(dtype))


@pytest.mark.parametrize("dtype", models.PRECISIONS)
def test_composite_is_a_jit_argument(dtype):
    variables, x = _in(dtype)
    explain = jax.jit(lambda c, v, x: jaxlrp.lrp(MODEL, c)(v, x))
    for c in (composites.EpsilonGammaBox(-3.0, 3.0, gamma=0.1), composites.EpsilonGammaBox(-3.0, 3.0, gamma=0.9)):
        np.testing.assert_allclose(explain(c, variables, x), jaxlrp.lrp(MODEL, c)(variables, x),
                                   **models.tolerance(dtype))


def _finite_difference(f, x, direction, h=1e-6):
    return (f(x + h * direction) - f(x - h * direction)) / (2 * h)


@pytest.mark.float64
def test_grad_wrt_input_matches_finite_difference(setup):
    variables, x = setup
    explain = jaxlrp.lrp(MODEL, composites.EpsilonPlus(epsilon=0.1))

    def loss(x):
        return jnp.sum(explain(variables, x, target=0) ** 2)

    direction = jax.random.normal(jax.random.PRNGKey(5), x.shape, x.dtype)
    g = jax.jit(jax.grad(loss))(x)
    np.testing.assert_allclose(jnp.vdot(g, direction), _finite_difference(loss, x, direction), rtol=1e-5)


@pytest.mark.float64
def test_grad_wrt_epsilon_matches_finite_difference(setup):
    variables, x = setup

    def loss(epsilon):
        composite = composites.LayerMap({("dense", "conv"): rules.Epsilon(epsilon)})
        return jnp.sum(jaxlrp.lrp(MODEL, composite)(variables, x, target=0) ** 2)

    g = jax.grad(loss)(0.3)
    assert g != 0
    np.testing.assert_allclose(g, _finite_difference(loss, 0.3, 1.0), rtol=1e-6)


@pytest.mark.float64
def test_jvp_of_relevance_function(setup):
    variables, x = setup
    explain = jaxlrp.lrp(MODEL, composites.EpsilonPlus(epsilon=0.1))
    direction = jax.random.normal(jax.random.PRNGKey(6), x.shape, x.dtype)
    _, tangent = jax.jvp(lambda x: explain(variables, x, target=0), (x,), (direction,))
    expected = _finite_difference(lambda x: explain(variables, x, target=0), x, direction)
    np.testing.assert_allclose(tangent, expected, rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("dtype", models.PRECISIONS)
def test_inside_an_outer_jit(dtype):
    variables, x = _in(dtype)
    explain = jaxlrp.lrp(MODEL, composites.EpsilonPlusFlat())

    @jax.jit
    def step(variables, x):
        relevance = explain(variables, 2 * x)
        return relevance.sum(), relevance

    total, relevance = step(variables, x)
    eager = explain(variables, 2 * x)
    np.testing.assert_allclose(relevance, eager, **models.tolerance(dtype))
    np.testing.assert_allclose(total, eager.sum(), rtol=models.tolerance(dtype)["rtol"])


@pytest.mark.parametrize("dtype", models.PRECISIONS)
def test_sharded_batch_equals_unsharded(dtype):
    assert jax.device_count() == 8, "conftest asks XLA for 8 CPU devices"
    variables, x = models.init(MODEL, (8, 8, 8, 2), dtype)
    mesh = jax.make_mesh((8,), ("batch",))
    sharded = jax.device_put(x, NamedSharding(mesh, PartitionSpec("batch")))
    explain = jax.jit(jaxlrp.lrp(MODEL, composites.EpsilonPlusFlat()))
    relevance = explain(variables, sharded)
    np.testing.assert_allclose(relevance, explain(variables, x), **models.tolerance(dtype))
    assert len(relevance.sharding.device_set) == 8


def test_nothing_the_user_owns_changes():
    variables, x = _in(jnp.float32)
    before = jax.tree.map(np.array, variables)
    module_before = repr(MODEL)
    jaxlrp.lrp(MODEL, composites.EpsilonPlus())(variables, x)
    jax.tree.map(np.testing.assert_array_equal, variables, before)
    assert repr(MODEL) == module_before


# Bounds on the relative L2 distance of each precision's map from float64's on the same rounded
# weights and input (measured over three seeds: float32 0.9-2.5e-7, float16 4.1-7.3e-4,
# bfloat16 2.7-5.0e-3).
DTYPE_DISTANCE = {jnp.float32: 2e-6, jnp.float16: 3e-3, jnp.bfloat16: 2e-2}


@pytest.mark.float64
@pytest.mark.parametrize("dtype", DTYPE_DISTANCE, ids=lambda d: np.dtype(d).name)
def test_dtypes(dtype):
    variables, x = _in(jnp.float32)
    variables, x = jax.tree.map(lambda p: p.astype(dtype), (variables, x))
    relevance = jaxlrp.lrp(MODEL.clone(), composites.EpsilonPlusFlat())(variables, x)
    assert relevance.dtype == dtype and relevance.shape == x.shape
    wide = jax.tree.map(lambda p: p.astype(jnp.float64), (variables, x))
    reference = np.asarray(jaxlrp.lrp(MODEL.clone(), composites.EpsilonPlusFlat())(*wide))
    distance = np.linalg.norm(np.asarray(relevance, np.float64) - reference) / np.linalg.norm(reference)
    assert distance < DTYPE_DISTANCE[dtype], distance


@pytest.mark.float64
def test_grad_wrt_a_composite_with_alpha_beta(setup):
    """The gradient with respect to every hyperparameter leaf, along a direction that keeps
    α − β = 1 (α and β together, ε and the stabilizers too), equals a finite difference."""
    variables, x = setup
    composite = composites.LayerMap({"conv": rules.AlphaBeta(2.0, 1.0), "dense": rules.Epsilon(0.1)})
    leaves, treedef = jax.tree.flatten(composite)
    direction = {2.0: 1.0, 1.0: 1.0, 0.1: 0.5}  # α, β, ε by value; the stabilizers 1e-6: 0.3

    def loss(leaves):
        c = jax.tree.unflatten(treedef, leaves)
        return jnp.sum(jaxlrp.lrp(MODEL, c)(variables, x, target=0) ** 2)

    steps = [direction.get(v, 0.3) for v in leaves]
    grads = jax.grad(lambda c: loss(jax.tree.leaves(c)))(composite)
    assert isinstance(grads, composites.LayerMap)
    along = sum(g * d for g, d in zip(jax.tree.leaves(grads), steps))
    h = 1e-7
    expected = (loss([v + h * d for v, d in zip(leaves, steps)]) - loss([v - h * d for v, d in zip(leaves, steps)])) / (2 * h)
    assert along != 0
    np.testing.assert_allclose(along, expected, rtol=1e-5)


def test_lrp_fn_negative_argnums():
    def fn(params, x):
        return x @ params

    params = jax.random.normal(jax.random.PRNGKey(0), (4, 3))
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 4))
    composite = composites.LayerMap({"dense": rules.Epsilon()})
    np.testing.assert_allclose(jaxlrp.lrp_fn(fn, composite, argnums=-1)(params, x),
                               jaxlrp.lrp_fn(fn, composite, argnums=1)(params, x))


def _mesh_and_batch(dtype=jnp.float64):
    variables, x = models.init(MODEL, (16, 8, 8, 2), dtype)
    # Parameters in the input's precision: XLA folds closed-over float32 ones (a BatchNorm's
    # rsqrt) with other rounding than eager execution, 1e-8 apart in the forward pass alone.
    variables = jax.tree.map(lambda a: a.astype(dtype), variables)
    mesh = jax.make_mesh((8,), ("data",))
    return mesh, variables, x, jax.device_put(x, NamedSharding(mesh, PartitionSpec("data")))


@pytest.mark.parametrize("name, dtype", [p for p in models.NAMED_ONCE if p.values[0] != "EpsilonPlus"])
def test_shard_map_equals_unsharded(name, dtype):
    """Every custom_vjp's cotangents have its inputs' types, varying manual axes included,
    with the parameters passed in (replicated) and closed over."""
    mesh, variables, x, sharded = _mesh_and_batch(dtype)
    explain = jaxlrp.lrp(MODEL, models.NAMED[name]())
    expected = explain(variables, x)
    spec = PartitionSpec("data")
    passed = jax.shard_map(lambda v, xb: explain(v, xb), mesh=mesh, in_specs=(PartitionSpec(), spec), out_specs=spec)
    closed = jax.shard_map(lambda xb: explain(variables, xb), mesh=mesh, in_specs=(spec,), out_specs=spec)
    tolerance = dict(rtol=1e-12, atol=1e-15) if dtype == jnp.float64 else models.tolerance(dtype)
    np.testing.assert_allclose(jax.jit(passed)(variables, sharded), expected, **tolerance)
    np.testing.assert_allclose(jax.jit(closed)(sharded), expected, **tolerance)


@pytest.mark.float64
def test_shard_map_with_sharded_targets_and_grad():
    mesh, variables, x, sharded = _mesh_and_batch()
    targets = jnp.arange(16) % 3
    spec = PartitionSpec("data")
    explain = jaxlrp.lrp(MODEL, composites.EpsilonPlus(epsilon=0.1))

    def loss(v, xb, tb):
        return jax.lax.psum(jnp.sum(explain(v, xb, target=tb) ** 2), "data")

    sharded_loss = jax.shard_map(loss, mesh=mesh, in_specs=(PartitionSpec(), spec, spec), out_specs=PartitionSpec())
    targets_sharded = jax.device_put(targets, NamedSharding(mesh, spec))
    grad = jax.jit(jax.grad(sharded_loss, argnums=1))(variables, sharded, targets_sharded)
    expected = jax.grad(lambda xb: jnp.sum(explain(variables, xb, target=targets) ** 2))(x)
    np.testing.assert_allclose(grad, expected, rtol=1e-9, atol=1e-14)


# Each documented check on values, called the way users call jaxlrp: inside jit, vmap, grad and
# shard_map, with the input and target closed over (concrete: the check runs) or passed in
# (traced: the check is skipped, never a crash).
def _gamma_sweep(variables, x, target=None):
    def explain(gamma):
        composite = composites.LayerMap({nn.Conv: rules.Gamma(gamma), nn.Dense: rules.Epsilon()})
        return jaxlrp.lrp(MODEL, composite)(variables, x, target=target)

    return explain


def _gammas():
    """Eight gammas in the configuration's widest float."""
    return jnp.linspace(0.0, 1.0, 8)


TRANSFORMS = {
    "jit": lambda f: jax.jit(f)(_gammas()[3]),
    "vmap": lambda f: jax.vmap(f)(_gammas()),
    "jit(vmap)": lambda f: jax.jit(jax.vmap(f))(_gammas()),
    "grad": lambda f: jax.grad(lambda g: f(g).sum())(_gammas()[3]),
    "shard_map": lambda f: _shard_map_over_gammas(f, _gammas()),
}


def _shard_map_over_gammas(f, gammas):
    """One gamma per device, everything else closed over: the relevance varies per device."""
    mesh = jax.make_mesh((8,), ("d",))
    spec = PartitionSpec("d")
    sharded = jax.shard_map(lambda g: f(g[0])[None], mesh=mesh, in_specs=spec, out_specs=spec)
    return jax.jit(sharded)(jax.device_put(gammas, NamedSharding(mesh, spec)))


@pytest.mark.float64
@pytest.mark.parametrize("transform", TRANSFORMS)
def test_closed_over_input_and_target_inside_transforms(setup, transform):
    variables, x = setup
    variables = jax.tree.map(lambda a: a.astype(jnp.float64), variables)  # see _mesh_and_batch
    sweep = _gamma_sweep(variables, x, jnp.array([0, 1, 2, 1]))
    result = TRANSFORMS[transform](sweep)
    if transform == "grad":
        expected = _finite_difference(lambda g: sweep(g).sum(), _gammas()[3], 1.0, h=1e-5)
        np.testing.assert_allclose(result, expected, rtol=1e-5)
        return
    expected = sweep(_gammas()[3]) if transform == "jit" else jnp.stack([sweep(g) for g in _gammas()])
    np.testing.assert_allclose(result, expected, rtol=1e-10, atol=1e-14)


@pytest.mark.float64
def test_shard_map_with_a_target_per_device():
    mesh, variables, x, _ = _mesh_and_batch()
    explain = jaxlrp.lrp(MODEL, composites.EpsilonPlusFlat())
    spec = PartitionSpec("d")
    mesh = jax.make_mesh((8,), ("d",))
    classes = jnp.arange(8) % 3
    per_device = jax.shard_map(lambda t: explain(variables, x, target=jnp.full(16, t[0]))[None], mesh=mesh,
                               in_specs=spec, out_specs=spec)
    result = jax.jit(per_device)(jax.device_put(classes, NamedSharding(mesh, spec)))
    expected = jnp.stack([explain(variables, x, target=jnp.full(16, c)) for c in classes])
    np.testing.assert_allclose(result, expected, rtol=1e-10, atol=1e-14)


@pytest.mark.float64
def test_shard_map_over_an_ensemble():
    """Each device holds its own parameters; the input is closed over."""
    x = jax.random.normal(jax.random.PRNGKey(0), (4, 8, 8, 2), jnp.float64)
    members = [jax.tree.map(lambda a: a.astype(jnp.float64), models.init(MODEL, x.shape, seed=s)[0]) for s in range(8)]
    stacked = jax.tree.map(lambda *a: jnp.stack(a), *members)
    explain = jaxlrp.lrp(MODEL, composites.EpsilonGammaBox(-3.0, 3.0))
    mesh = jax.make_mesh((8,), ("e",))
    spec = PartitionSpec("e")
    per_member = jax.shard_map(lambda v: explain(jax.tree.map(lambda a: a[0], v), x)[None], mesh=mesh,
                               in_specs=spec, out_specs=spec)
    result = jax.jit(per_member)(jax.device_put(stacked, NamedSharding(mesh, spec)))
    np.testing.assert_allclose(result, jnp.stack([explain(v, x) for v in members]), rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("transform", TRANSFORMS)
def test_checks_on_closed_over_values_run_inside_transforms(transform):
    variables, x = _in(jnp.float32)
    with pytest.raises(ValueError, match="NaN or Inf"):
        TRANSFORMS[transform](_gamma_sweep(variables, x.at[0, 0, 0, 0].set(jnp.nan)))
    with pytest.raises(ValueError, match="out of range"):
        TRANSFORMS[transform](_gamma_sweep(variables, x, jnp.array([0, 1, 2, 3])))
    with pytest.raises(ValueError, match="shape \\(\\) or \\(4,\\)"):
        TRANSFORMS[transform](_gamma_sweep(variables, x, jnp.array([0, 1])))
    alpha, beta = jnp.asarray(3.0), jnp.asarray(1.0)  # concrete arrays, closed over
    with pytest.raises(ValueError, match="AlphaBeta needs"):
        TRANSFORMS[transform](lambda g: jaxlrp.lrp(MODEL, composites.LayerMap(
            {("dense", "conv"): rules.AlphaBeta(alpha, beta)}))(variables, x) * g)


@pytest.mark.parametrize("transform", ["jit(vmap)", "shard_map"])
def test_checks_on_traced_values_are_skipped_inside_transforms(transform):
    variables, x = _in(jnp.float32)
    nan_x = x.at[0, 0, 0, 0].set(jnp.nan)

    def explain(g):  # input and alpha traced: nothing to check, nothing crashes
        composite = composites.LayerMap({("dense", "conv"): rules.AlphaBeta(1.0 + g, g)})
        return jaxlrp.lrp(MODEL, composite)(variables, nan_x * (1 + 0 * g))

    result = TRANSFORMS[transform](explain)
    assert bool(jnp.any(jnp.isnan(result)))  # NaN propagates, as documented


def test_eager_calls_compile_once_per_signature():
    traces = []

    def mlp(params, x):
        traces.append(x.shape)  # runs once per trace
        return jnp.tanh(x @ params["w1"]) @ params["w2"]

    rng = np.random.default_rng(0)
    params = {"w1": jnp.asarray(rng.normal(size=(5, 6))), "w2": jnp.asarray(rng.normal(size=(6, 3)))}
    explain = jaxlrp.lrp_fn(mlp, composites.EpsilonPlus())
    x = jnp.asarray(rng.normal(size=(4, 5)))
    first = explain(params, x)
    assert len(traces) == 1
    explain(params, 2 * x, target=1)  # a target is one more signature than None
    assert len(traces) == 2
    explain(jax.tree.map(lambda w: -w, params), -x, target=2)  # new values, a new class: traced
    assert len(traces) == 2
    explain(params, x, target=jnp.array([0, 1, 2, 0]))  # a new shape compiles again
    explain(params, x[:2])
    assert len(traces) == 4
    np.testing.assert_allclose(first, jax.jit(explain)(params, x), rtol=1e-12)
    with pytest.raises(ValueError, match="out of range"):
        explain(params, x, target=3)
    with pytest.raises(ValueError, match="NaN"):
        explain(params, x.at[0, 0].set(jnp.nan))


def test_eager_cache_keeps_the_most_recent_signatures(monkeypatch):
    from jaxlrp import _eager

    monkeypatch.setattr(_eager, "CACHE_SIZE", 3)
    traces = []

    def fn(params, x):
        traces.append(x.shape)
        return jnp.tanh(x @ params)

    explain = jaxlrp.lrp_fn(fn, composites.EpsilonPlus())
    params = jnp.ones((2, 3))
    for rows in (1, 2, 3, 4):  # four shapes: the first is dropped
        explain(params, jnp.ones((rows, 2)))
    assert explain.cache_size() == 3 and len(traces) == 4
    explain(params, jnp.ones((2, 2)))  # kept: no trace; now the most recent
    explain(params, jnp.ones((5, 2)))  # drops (3, 2), the least recently used
    explain(params, jnp.ones((2, 2)))
    assert len(traces) == 5
    explain(params, jnp.ones((3, 2)))
    assert len(traces) == 6
    explain.clear_cache()
    assert explain.cache_size() == 0
    np.testing.assert_allclose(explain(params, jnp.ones((2, 2))), jax.jit(explain)(params, jnp.ones((2, 2))))
    assert len(traces) == 8 and explain.cache_size() == 1  # traced again, and by jax.jit
    scaled = jaxlrp.lrp_fn(lambda p, x, s: fn(p, x) * s, composites.EpsilonPlus())
    assert scaled(params, jnp.ones((2, 2)), True).dtype == scaled(params, jnp.ones((2, 2)), 1.0).dtype == jnp.float32
    assert scaled.cache_size() == 2  # True and 1.0 are equal, but not one program


def test_eager_nnx_module_reads_the_current_weights():
    from flax import nnx

    model = nnx.Sequential(nnx.Linear(4, 5, rngs=nnx.Rngs(0)), nnx.relu, nnx.Linear(5, 3, rngs=nnx.Rngs(1)))
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 4)))
    explain = jaxlrp.lrp(model, composites.EpsilonPlus())
    before = explain(x, target=0)
    model.layers[0].kernel[...] = 2 * model.layers[0].kernel[...]
    model.layers[0].bias[...] = 2 * model.layers[0].bias[...]
    after = explain(x, target=0)
    np.testing.assert_array_equal(after, jaxlrp.lrp(model, composites.EpsilonPlus())(x, target=0))
    np.testing.assert_allclose(after, 2 * before, rtol=1e-4)  # LRP-ε is homogeneous up to ε
