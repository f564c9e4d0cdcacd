"""Equal values with Quantus 0.6.0 on the same model, inputs and maps: region perturbation
(MoRF, LeRF) and the cascading model parameter randomisation test."""

import copy
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxlrp
import peers
import twins
from jaxlrp import composites, evaluate

pytestmark = pytest.mark.float64  # equality with Quantus on float64 maps


class SmallCNN(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(4, (3, 3), padding=1)(x))
        return nn.Dense(10)(x.reshape(x.shape[0], -1))


def _jax_as_torch(fn):
    """A torch module that runs the JAX function `fn` on NHWC float64 (Quantus feeds NCHW float32)."""
    import torch

    class Wrapped(torch.nn.Module):
        def forward(self, x):
            nhwc = np.asarray(x.detach().numpy(), np.float64).transpose(0, 2, 3, 1)
            return torch.from_numpy(np.array(fn(jnp.asarray(nhwc))))

    return Wrapped().eval()


@pytest.mark.parametrize("order", ["morf", "lerf"])
def test_region_perturbation_equals_quantus(order):
    quantus = peers.quantus()
    model = SmallCNN()
    # float32-representable inputs: Quantus casts them to float32 on their way into the model.
    x = jax.random.uniform(jax.random.key(0), (4, 8, 8, 1), jnp.float32).astype(jnp.float64)
    variables = model.init(jax.random.key(1), x)
    target = jnp.array([3, 1, 4, 1])
    relevance = jaxlrp.lrp(model, composites.EpsilonPlus())(variables, x, target=target)
    forward = functools.partial(model.apply, variables)
    ours = evaluate.region_perturbation(forward, x, relevance, target=target, patch=(2, 2, 1), order=order, baseline=0.0)

    metric = quantus.RegionPerturbation(
        patch_size=2, order=order, regions_evaluation=16, perturb_baseline=0.0, abs=False, normalise=False,
        disable_warnings=True, display_progressbar=False,
    )
    theirs = metric(
        model=_jax_as_torch(forward), x_batch=np.array(x).transpose(0, 3, 1, 2).copy(), y_batch=np.array(target),
        a_batch=np.array(relevance).transpose(0, 3, 1, 2).copy(), device="cpu", channel_first=True, softmax=False,
    )
    # Quantus records the drop after each region: curve[:, 0] - curve[:, k], k = 1..16.
    np.testing.assert_allclose(np.asarray(theirs), ours[:, :1] - ours[:, 1:], rtol=1e-10, atol=1e-12)


def _vgg_variables(torch_model):
    m = dict(torch_model.named_modules())
    mapping = {}
    for i in range(3):
        mapping[(f"conv{i}",)] = m[f"conv{i}.0"]
        mapping[(f"bn{i}",)] = m[f"conv{i}.1"]
    mapping.update({("fc1",): m["fc1"], ("fc2",): m["fc2"]})
    return twins._to_flax(torch_model, mapping)


def test_randomisation_test_equals_quantus_mprt():
    """Quantus resets each torch layer (`reset_parameters` after `torch.manual_seed(seed + 1)`),
    from the top; we give `randomization_test` the same values through `randomize`."""
    quantus = peers.quantus()
    import torch

    torch_model, model, variables, shape = twins.make("vgg", batch=3)
    x_nchw = np.random.default_rng(0).normal(size=shape)
    x = jnp.asarray(twins.to_nhwc(x_nchw))
    target = np.array([2, 5, 7])
    explain = jaxlrp.lrp(model, composites.EpsilonPlus())

    def explain_func(model, inputs, targets, **kwargs):
        relevance = explain(_vgg_variables(model), jnp.asarray(twins.to_nhwc(inputs)), target=jnp.asarray(targets))
        return np.asarray(relevance).transpose(0, 3, 1, 2)

    seed = 42
    metric = quantus.MPRT(layer_order="top_down", seed=seed, abs=True, normalise=True, disable_warnings=True,
                          display_progressbar=False)
    theirs = metric(
        model=torch_model, x_batch=x_nchw, y_batch=target, a_batch=explain_func(torch_model, x_nchw, target),
        explain_func=explain_func, device="cpu", channel_first=True,
    )

    reset = copy.deepcopy(torch_model)
    for module in reset.modules():
        if hasattr(module, "reset_parameters"):
            torch.manual_seed(seed + 1)
            module.reset_parameters()
    reset_values = {
        "/".join(str(k.key) for k in path): leaf
        for path, leaf in jax.tree_util.tree_flatten_with_path(_vgg_variables(reset.double()))[0]
    }
    ours = evaluate.randomization_test(
        explain, variables, x, target=jnp.asarray(target), key=jax.random.key(0), absolute=True,
        randomize=lambda key, path, leaf: reset_values[path].astype(leaf.dtype),
    )
    assert ours.layers == ("fc2", "fc1", "bn2", "conv2", "bn1", "conv1", "bn0", "conv0")
    assert list(theirs)[1:] == ["fc2", "fc1", "conv2.1", "conv2.0", "conv1.1", "conv1.0", "conv0.1", "conv0.0"]
    np.testing.assert_allclose(np.asarray(list(theirs.values())[1:]), ours.correlation, rtol=1e-9, atol=1e-12)
