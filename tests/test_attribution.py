"""Baselines: closed forms on linear models, direct loops, the call forms of `jaxlrp.lrp`,
jit/vmap/grad/shard_map, dtypes, and zennit's Integrated Gradients on the twin VGG."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

import peers
import twins
from jaxlrp import attribution

pytestmark = pytest.mark.float64  # closed forms and parity with zennit in float64

SHAPE = (3, 4, 4, 2)


class Linear(nn.Module):
    bias: bool = True

    @nn.compact
    def __call__(self, x):
        return nn.Dense(5, use_bias=self.bias, name="fc")(x.reshape(x.shape[0], -1))


@pytest.fixture(scope="module")
def linear():
    model = Linear()
    x = jax.random.normal(jax.random.key(0), SHAPE, jnp.float64)
    variables = model.init(jax.random.key(1), x)
    variables = jax.tree.map(lambda a: a + 0.1, variables)  # a nonzero bias
    weights = np.asarray(variables["params"]["fc"]["kernel"])  # (32, 5)
    return model, variables, x, weights


def _column(weights, target):
    return weights[:, np.asarray(target)].T.reshape(SHAPE)


def test_gradient_and_gradient_x_input_closed_form(linear):
    model, variables, x, w = linear
    target = jnp.array([0, 3, 4])
    np.testing.assert_allclose(attribution.gradient(model)(variables, x, target=target), _column(w, target), atol=1e-15)
    np.testing.assert_allclose(
        attribution.gradient_x_input(model)(variables, x, target=target), x * _column(w, target), atol=1e-15
    )
    predicted = np.argmax(model.apply(variables, x), axis=-1)  # target=None: the arg-max class
    np.testing.assert_allclose(attribution.gradient(model)(variables, x), _column(w, predicted), atol=1e-15)
    np.testing.assert_allclose(attribution.gradient(model)(variables, x, target=2), _column(w, [2, 2, 2]), atol=1e-15)
    weights = jax.random.normal(jax.random.key(2), (3, 5), jnp.float64)  # a float target weighs the outputs
    np.testing.assert_allclose(
        attribution.gradient(model)(variables, x, target=weights), (np.asarray(weights) @ w.T).reshape(SHAPE), atol=1e-14
    )


@pytest.mark.parametrize("baseline", [0.0, 0.5, "array"])
@pytest.mark.parametrize("n", [1, 7])
def test_integrated_gradients_equals_gradient_times_difference_on_a_linear_model(linear, baseline, n):
    model, variables, x, w = linear
    if baseline == "array":
        baseline = jax.random.uniform(jax.random.key(3), SHAPE[1:], jnp.float64)
    target = jnp.array([1, 1, 4])
    ig = attribution.integrated_gradients(model, baseline=baseline, n=n)(variables, x, target=target)
    np.testing.assert_allclose(ig, _column(w, target) * (x - baseline), atol=1e-14)


def test_smoothgrad_of_a_linear_model_is_its_gradient(linear):
    model, variables, x, w = linear
    sg = attribution.smoothgrad(model, noise_level=0.3, n=5)(variables, x, target=jnp.array([0, 1, 2]), key=jax.random.key(4))
    np.testing.assert_allclose(sg, _column(w, [0, 1, 2]), atol=1e-14)


def _mlp():
    model = twins.MLP()
    x = jax.random.normal(jax.random.key(5), (4, 16), jnp.float64)
    return model, model.init(jax.random.key(10), x), x


def test_smoothgrad_and_integrated_gradients_match_their_formulas_on_an_mlp():
    model, variables, x = _mlp()
    target = jnp.array([0, 3, 9, 2])

    @jax.jit
    def grad_at(z):
        return jax.grad(lambda z: jnp.sum(model.apply(variables, z)[jnp.arange(4), target]))(z)

    key, n = jax.random.key(6), 6
    sigma = 0.2 * (x.max(axis=1, keepdims=True) - x.min(axis=1, keepdims=True))
    noise = jax.random.normal(key, (n, *x.shape), x.dtype) * sigma
    expected = sum(grad_at(x + e) for e in noise) / n
    sg = attribution.smoothgrad(model, noise_level=0.2, n=n)(variables, x, target=target, key=key)
    np.testing.assert_allclose(sg, expected, rtol=1e-12, atol=1e-14)

    expected = x * sum(grad_at(k / 5 * x) for k in range(1, 6)) / 5
    ig = attribution.integrated_gradients(model, n=5)(variables, x, target=target)
    np.testing.assert_allclose(ig, expected, rtol=1e-12, atol=1e-14)
    # Completeness: the sum approaches S(x) - S(0) as the Riemann sum refines.
    fine = attribution.integrated_gradients(model, n=400)(variables, x, target=target).sum(axis=1)
    scores = model.apply(variables, x)[jnp.arange(4), target] - model.apply(variables, 0 * x)[jnp.arange(4), target]
    np.testing.assert_allclose(fine, scores, rtol=2e-2, atol=1e-3)


@pytest.mark.parametrize("window, stride", [((2, 2, 2), None), ((3, 2, 1), (1, 2, 1))])
def test_occlusion_equals_a_direct_loop(window, stride):
    model, variables, x = Linear(bias=True), None, jax.random.normal(jax.random.key(7), SHAPE, jnp.float64)
    variables = model.init(jax.random.key(8), x)
    forward = jax.nn.relu  # a nonlinear score, so that overlapping windows differ

    def fn(params, z):
        return forward(model.apply(params, z))

    target = jnp.array([4, 0, 2])
    fill = -0.5
    result = attribution.occlusion(fn, window, stride, fill=fill, chunk=3)(variables, x, target=target)

    def score(z):
        return np.asarray(fn(variables, z))[np.arange(3), np.asarray(target)]

    stride = stride or window
    total, count = np.zeros(SHAPE), np.zeros(SHAPE[1:])
    for i in range(0, SHAPE[1] - window[0] + 1, stride[0]):
        for j in range(0, SHAPE[2] - window[1] + 1, stride[1]):
            for c in range(0, SHAPE[3] - window[2] + 1, stride[2]):
                block = (slice(i, i + window[0]), slice(j, j + window[1]), slice(c, c + window[2]))
                occluded = np.array(x)
                occluded[(slice(None), *block)] = fill
                total[(slice(None), *block)] += (score(x) - score(occluded))[:, None, None, None]
                count[block] += 1
    expected = np.where(count > 0, total / np.maximum(count, 1), 0.0)
    np.testing.assert_allclose(result, expected, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(
        attribution.occlusion(fn, window, stride, fill=fill)(variables, x, target=target), expected, rtol=1e-12, atol=1e-14
    )


ALL = {
    "gradient": lambda m: attribution.gradient(m),
    "gradient_x_input": lambda m: attribution.gradient_x_input(m),
    "integrated_gradients": lambda m: attribution.integrated_gradients(m, n=4),
    "occlusion": lambda m: attribution.occlusion(m, (2, 2, 3)),
}


@pytest.mark.parametrize("name", ["gradient", "occlusion"])  # one each of the two ways a baseline runs the model
def test_call_forms_linen_nnx_graphdef_function_agree(name):
    peers.zennit()  # the twins are built in torch
    _, model, variables, shape = twins.make("vgg", batch=2)
    x = jnp.asarray(twins.to_nhwc(np.random.default_rng(0).normal(size=shape)))
    expected = ALL[name](model)(variables, x, target=3)
    nnx_model = twins.to_nnx("vgg", variables)
    from flax import nnx

    graphdef, state = nnx.split(nnx_model)
    np.testing.assert_allclose(ALL[name](nnx_model)(x, target=3), expected, rtol=1e-10, atol=1e-13)
    np.testing.assert_allclose(ALL[name](graphdef)(state, x, target=3), expected, rtol=1e-10, atol=1e-13)
    np.testing.assert_allclose(ALL[name](twins.vgg_function)(variables, x, target=3), expected, rtol=1e-10, atol=1e-13)


def test_jit_vmap_grad_and_closed_over_weights():
    model, variables, x = _mlp()
    target = jnp.array([1, 2, 3, 4])
    for name, make in ALL.items():
        explain = attribution.occlusion(model, (2,)) if name == "occlusion" else make(model)
        eager = explain(variables, x, target=target)
        if name == "integrated_gradients":  # arrays passed in and closed over
            np.testing.assert_allclose(jax.jit(explain)(variables, x, target=target), eager, rtol=1e-12, atol=1e-14)
            closed = jax.jit(lambda x, t: explain(variables, x, target=t))
            np.testing.assert_allclose(closed(x, target), eager, rtol=1e-12, atol=1e-14)
        per_sample = jax.jit(jax.vmap(lambda xi, ti: explain(variables, xi[None], target=ti[None])[0]))(x, target)
        np.testing.assert_allclose(per_sample, eager, rtol=1e-12, atol=1e-14)
    sg = attribution.smoothgrad(model, n=3)
    keys = jax.random.split(jax.random.key(0), 2)  # vmap over noise keys
    stacked = jax.jit(jax.vmap(lambda k: sg(variables, x, target=target, key=k)))(keys)
    np.testing.assert_allclose(stacked[1], sg(variables, x, target=target, key=keys[1]), rtol=1e-12)
    # grad through a baseline: of the squared IG map, with respect to the weights.
    ig = attribution.integrated_gradients(model, n=3)
    grads = jax.jit(jax.grad(lambda v: jnp.sum(ig(v, x, target=target) ** 2)))(variables)
    assert all(np.isfinite(g).all() for g in jax.tree.leaves(grads))
    assert any(np.abs(g).max() > 0 for g in jax.tree.leaves(grads))


def test_shard_map_over_the_batch():
    model, variables, _ = _mlp()
    x = jax.random.normal(jax.random.key(9), (16, 16), jnp.float64)
    mesh = jax.make_mesh((8,), ("data",))
    spec = PartitionSpec("data")
    explain = attribution.integrated_gradients(model, n=3)
    sharded = jax.shard_map(lambda v, xb: explain(v, xb), mesh=mesh, in_specs=(PartitionSpec(), spec), out_specs=spec)
    closed = jax.shard_map(lambda xb: explain(variables, xb), mesh=mesh, in_specs=(spec,), out_specs=spec)
    xs = jax.device_put(x, NamedSharding(mesh, spec))
    np.testing.assert_allclose(jax.jit(sharded)(variables, xs), explain(variables, x), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(jax.jit(closed)(xs), explain(variables, x), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_low_precision_follows_float64(dtype):
    model, variables, x = _mlp()
    low = jax.tree.map(lambda a: a.astype(dtype), variables)
    reference = attribution.gradient_x_input(model)(variables, x, target=0)
    result = attribution.gradient_x_input(model)(low, x.astype(dtype), target=0)
    assert result.dtype == dtype
    tolerance = 1e-5 if dtype == jnp.float32 else 5e-2
    error = np.linalg.norm(np.asarray(result, np.float64) - reference) / np.linalg.norm(reference)
    assert error < tolerance, error


def test_errors_name_what_was_expected(linear):
    model, variables, x, _ = linear
    with pytest.raises(ValueError, match=r"target class out of range \[0, 5\)"):
        attribution.gradient(model)(variables, x, target=5)
    with pytest.raises(ValueError, match="class index per sample"):
        attribution.gradient(model)(variables, x, target=jnp.zeros((2,), jnp.int32))
    with pytest.raises(ValueError, match="NaN"):
        attribution.gradient(model)(variables, x.at[0, 0, 0, 0].set(jnp.nan))
    with pytest.raises(ValueError, match="one size per non-batch axis"):
        attribution.occlusion(model, (2, 2))(variables, x)
    with pytest.raises(ValueError, match="must fit"):
        attribution.occlusion(model, (5, 1, 1))(variables, x)
    with pytest.raises(ValueError, match="positive int"):
        attribution.integrated_gradients(model, n=0)
    with pytest.raises(TypeError, match="Flax Linen module"):
        attribution.gradient(3)


def test_integrated_gradients_and_gradient_equal_zennit():
    """zennit's `IntegratedGradients` (right Riemann sum) and `Gradient` on the twin VGG, float64."""
    zennit = peers.zennit()
    import torch
    from zennit.attribution import Gradient, IntegratedGradients

    torch_model, model, variables, shape = twins.make("vgg", batch=2)
    x_torch = torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    x = jnp.asarray(twins.to_nhwc(x_torch.numpy()))
    target = [3, 7]
    seed = torch.nn.functional.one_hot(torch.tensor(target), 10).double()
    del zennit
    with IntegratedGradients(torch_model, n_iter=6) as attributor:
        _, theirs = attributor(x_torch, seed)
    ours = attribution.integrated_gradients(model, n=6)(variables, x, target=jnp.array(target))
    np.testing.assert_allclose(ours, twins.to_nhwc(theirs.numpy()), rtol=1e-10, atol=1e-13)
    with Gradient(torch_model) as attributor:
        _, theirs = attributor(x_torch, seed)
    ours = attribution.gradient(model)(variables, x, target=jnp.array(target))
    np.testing.assert_allclose(ours, twins.to_nhwc(theirs.numpy()), rtol=1e-10, atol=1e-13)
