"""Faithfulness: region perturbation against known answers, AOPC/ABPC by definition, Spearman
against scipy, the randomisation test and the sweep against Python loops."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

import jaxlrp
from jaxlrp import composites, evaluate, rules

pytestmark = pytest.mark.float64  # known answers and Quantus equality in float64


def _linear_problem(shape=(3, 4, 4, 2), classes=5, seed=0):
    """A bias-free linear model: replacing feature i by 0 lowers the target output by R_i = w_i x_i."""
    k1, k2 = jax.random.split(jax.random.key(seed))
    w = jax.random.normal(k1, (int(np.prod(shape[1:])), classes), jnp.float64)
    x = jax.random.normal(k2, shape, jnp.float64)
    target = jnp.arange(shape[0]) % classes

    def fn(z):
        return z.reshape(z.shape[0], -1) @ w

    relevance = x * w[:, target].T.reshape(shape)
    return fn, x, relevance, target


def _expected_curve(fn, x, target, region_relevance, descending):
    """The target output minus the cumulative relevance of the regions in order."""
    start = np.asarray(fn(x))[np.arange(x.shape[0]), np.asarray(target)]
    ordered = -np.sort(-region_relevance, axis=1) if descending else np.sort(region_relevance, axis=1)
    return start[:, None] - np.concatenate([np.zeros((x.shape[0], 1)), np.cumsum(ordered, axis=1)], axis=1)


@pytest.mark.parametrize("order", ["morf", "lerf"])
def test_pixel_flipping_removes_each_features_relevance(order):
    fn, x, relevance, target = _linear_problem(shape=(4, 10))
    curve = evaluate.region_perturbation(fn, x, relevance, target=target, patch=(1,), order=order)
    assert curve.shape == (4, 11)
    expected = _expected_curve(fn, x, target, np.asarray(relevance), descending=order == "morf")
    np.testing.assert_allclose(curve, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("order", ["morf", "lerf"])
def test_region_perturbation_with_2x2xC_patches(order):
    fn, x, relevance, target = _linear_problem()
    curve = evaluate.region_perturbation(fn, x, relevance, target=target, patch=(2, 2, 2), order=order, steps=3)
    blocks = np.asarray(relevance).reshape(3, 2, 2, 2, 2, 2).sum(axis=(2, 4, 5)).reshape(3, 4)
    expected = _expected_curve(fn, x, target, blocks, descending=order == "morf")[:, :4]
    np.testing.assert_allclose(curve, expected, rtol=1e-12, atol=1e-12)


def test_aopc_and_abpc_follow_their_definitions():
    fn, x, relevance, target = _linear_problem(shape=(3, 12))
    morf = np.asarray(evaluate.region_perturbation(fn, x, relevance, target=target, patch=(2,)))
    lerf = np.asarray(evaluate.region_perturbation(fn, x, relevance, target=target, patch=(2,), order="lerf"))
    steps = morf.shape[1] - 1
    aopc = [sum(morf[b, 0] - morf[b, k] for k in range(steps + 1)) / (steps + 1) for b in range(3)]
    np.testing.assert_allclose(evaluate.aopc(morf), aopc, rtol=1e-12)
    abpc = [sum(lerf[b, k] - morf[b, k] for k in range(steps + 1)) / (steps + 1) for b in range(3)]
    np.testing.assert_allclose(evaluate.abpc(morf, lerf), abpc, rtol=1e-12)
    np.testing.assert_allclose(evaluate.abpc(morf, lerf), evaluate.aopc(morf) - evaluate.aopc(lerf), rtol=1e-12)
    assert (evaluate.abpc(morf, lerf) > 0).all()  # the exact relevance orders best


def test_baselines_mean_value_and_uniform_noise():
    fn, x, relevance, target = _linear_problem(shape=(2, 6))
    rows = np.arange(2)
    for baseline, fill in [(0.5, np.full(x.shape, 0.5)), ("mean", np.broadcast_to(np.asarray(x).mean(1, keepdims=True), x.shape))]:
        curve = evaluate.region_perturbation(fn, x, relevance, target=target, patch=(1,), baseline=baseline)
        np.testing.assert_allclose(curve[:, -1], np.asarray(fn(jnp.asarray(fill)))[rows, np.asarray(target)], rtol=1e-12)
    key = jax.random.key(3)
    curve = evaluate.region_perturbation(fn, x, relevance, target=target, patch=(1,), baseline="uniform", key=key)
    again = evaluate.region_perturbation(fn, x, relevance, target=target, patch=(1,), baseline="uniform", key=key, order="lerf")
    np.testing.assert_allclose(curve[:, -1], again[:, -1], rtol=1e-12)  # the same noise, whatever the order
    assert not np.allclose(curve[:, -1], np.asarray(fn(0 * x))[rows, np.asarray(target)])


def test_random_order_is_a_permutation_per_sample():
    fn, x, relevance, target = _linear_problem(shape=(5, 8))
    curve = evaluate.region_perturbation(fn, x, relevance, target=target, patch=(1,), order="random", key=jax.random.key(0))
    morf = evaluate.region_perturbation(fn, x, relevance, target=target, patch=(1,))
    np.testing.assert_allclose(curve[:, [0, -1]], morf[:, [0, -1]], atol=1e-12)  # all replaced in the end
    drops = -np.diff(np.asarray(curve), axis=1)  # each step removes one feature's relevance
    np.testing.assert_allclose(np.sort(drops, axis=1), np.sort(np.asarray(relevance), axis=1), atol=1e-12)
    assert not np.allclose(curve, morf)


def test_jit_chunks_and_outputs_without_classes():
    fn, x, relevance, target = _linear_problem()
    kwargs = dict(patch=(2, 1, 2), order="morf")
    eager = evaluate.region_perturbation(fn, x, relevance, target=target, **kwargs)
    jitted = jax.jit(lambda x, r, t: evaluate.region_perturbation(fn, x, r, target=t, **kwargs))(x, relevance, target)
    np.testing.assert_allclose(jitted, eager, rtol=1e-12)
    for chunk in (3, 4, 100):  # chunks of steps, the last one padded
        np.testing.assert_allclose(evaluate.region_perturbation(fn, x, relevance, target=target, chunk=chunk, **kwargs), eager, rtol=1e-12)
    assert evaluate.region_perturbation(fn, x, relevance, target=target, steps=0, **kwargs).shape == (3, 1)
    score = lambda z: fn(z)[:, 1]  # noqa: E731 - a (batch,) score
    np.testing.assert_allclose(
        evaluate.region_perturbation(score, x, relevance, **kwargs),
        evaluate.region_perturbation(fn, x, relevance, target=1, **kwargs),
        rtol=1e-12,
    )
    predicted = jnp.argmax(fn(x), axis=-1)  # target=None: the predicted class
    np.testing.assert_allclose(
        evaluate.region_perturbation(fn, x, relevance, **kwargs),
        evaluate.region_perturbation(fn, x, relevance, target=predicted, **kwargs),
        rtol=1e-12,
    )


def test_region_perturbation_errors():
    fn, x, relevance, target = _linear_problem()
    with pytest.raises(ValueError, match="each dividing that axis"):
        evaluate.region_perturbation(fn, x, relevance, target=target, patch=(3, 2, 2))
    with pytest.raises(ValueError, match="one size per non-batch axis"):
        evaluate.region_perturbation(fn, x, relevance, target=target, patch=(2, 2))
    with pytest.raises(ValueError, match=r"steps must lie in \[0, 4\]"):
        evaluate.region_perturbation(fn, x, relevance, target=target, patch=(2, 2, 2), steps=5)
    with pytest.raises(ValueError, match="needs key="):
        evaluate.region_perturbation(fn, x, relevance, target=target, patch=(2, 2, 2), order="random")
    with pytest.raises(ValueError, match="order must be one of"):
        evaluate.region_perturbation(fn, x, relevance, target=target, patch=(2, 2, 2), order="best")
    with pytest.raises(ValueError, match="shaped like the input"):
        evaluate.region_perturbation(fn, x, relevance[:, :2], target=target, patch=(2, 2, 2))
    with pytest.raises(ValueError, match="MoRF curve"):
        evaluate.abpc(jnp.zeros((2, 3)), jnp.zeros((2, 4)))


def test_spearman_equals_scipy_with_ties():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(4, 5, 6))
    b = a + rng.normal(size=a.shape)
    a[:, 0] = 0.0  # ties
    b[:, :, :2] = 1.0
    expected = [scipy.stats.spearmanr(a[i].ravel(), b[i].ravel())[0] for i in range(4)]
    np.testing.assert_allclose(evaluate.spearman(a, b), expected, rtol=1e-12)
    assert np.isnan(evaluate.spearman(np.ones((1, 4)), np.arange(4.0)[None])).all()


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(12, name="hidden2")(x))  # names not in alphabetical order
        x = nn.relu(nn.Dense(12, name="hidden1")(x))
        return nn.Dense(4, name="out")(x)


@pytest.fixture(scope="module")
def mlp():
    model = MLP()
    x = jax.random.normal(jax.random.key(0), (6, 8), jnp.float64)
    return model, model.init(jax.random.key(1), x), x


def test_randomization_test_equals_a_cascading_loop(mlp):
    model, variables, x = mlp
    explain = jaxlrp.lrp(model, composites.EpsilonPlus())
    target = jnp.array([0, 1, 2, 3, 0, 1])

    def randomize(key, path, leaf):  # deterministic, to compare with the loop
        return jnp.roll(leaf, 1, axis=-1) * (2.0 if path.endswith("kernel") else -1.0)

    result = evaluate.randomization_test(explain, variables, x, target=target, key=jax.random.key(0), randomize=randomize)
    assert result.layers == ("out", "hidden1", "hidden2")  # creation order, from the top
    original = np.asarray(explain(variables, x, target=target))
    params = jax.tree.map(np.asarray, variables["params"])
    for step, layer in enumerate(result.layers):
        params = {**params, layer: {k: np.asarray(randomize(None, f"params/{layer}/{k}", v)) for k, v in params[layer].items()}}
        maps = np.asarray(explain({"params": params}, x, target=target))
        expected = [scipy.stats.spearmanr(original[i], maps[i])[0] for i in range(6)]
        np.testing.assert_allclose(result.correlation[step], expected, rtol=1e-10)
    absolute = evaluate.randomization_test(
        explain, variables, x, target=target, key=jax.random.key(0), randomize=randomize, absolute=True, layers=["hidden1", "out"]
    )
    assert absolute.layers == ("out", "hidden1") and absolute.correlation.shape == (2, 6)


def test_randomization_test_destroys_the_map_and_checks_layers(mlp):
    model, variables, x = mlp
    explain = jaxlrp.lrp(model, composites.EpsilonPlus())
    result = evaluate.randomization_test(explain, variables, x, key=jax.random.key(0))  # permutations
    assert result.correlation.shape == (3, 6) and np.isfinite(result.correlation).all()
    assert np.mean(result.correlation[-1]) < 0.9
    with pytest.raises(ValueError, match=r"unknown layer\(s\) \['conv'\]; the layers are \['hidden2', 'hidden1', 'out'\]"):
        evaluate.randomization_test(explain, variables, x, key=jax.random.key(0), layers=["conv"])


def test_sweep_equals_a_python_loop_over_the_grid(mlp):
    model, variables, x = mlp
    target = jnp.array([0, 1, 2, 3, 0, 1])

    def make(gamma, epsilon):
        return composites.LayerMap({"dense": rules.Gamma(gamma=gamma, stabilizer=epsilon)})

    grid = {"gamma": [0.0, 2.0], "epsilon": [1e-6, 0.3]}
    args = dict(patch=(2,), steps=3)
    result = evaluate.sweep(make, grid, model, variables, x, target=target, **args)
    assert result.scores.shape == (2, 2)
    vmapped = evaluate.sweep(make, grid, model, variables, x, target=target, points_per_call=None, **args)
    np.testing.assert_allclose(vmapped.scores, result.scores, rtol=1e-10)
    forward = functools.partial(model.apply, variables)
    for i, gamma in enumerate(grid["gamma"]):
        for j, epsilon in enumerate(grid["epsilon"]):
            relevance = jaxlrp.lrp(model, make(gamma, epsilon))(variables, x, target=target)
            morf = evaluate.region_perturbation(forward, x, relevance, target=target, **args)
            lerf = evaluate.region_perturbation(forward, x, relevance, target=target, order="lerf", **args)
            np.testing.assert_allclose(result.scores[i, j], evaluate.abpc(morf, lerf).mean(), rtol=1e-10)
    i, j = np.unravel_index(np.argmax(result.scores), result.scores.shape)
    assert result.best == {"gamma": grid["gamma"][i], "epsilon": grid["epsilon"][j]}
