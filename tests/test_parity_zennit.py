"""float64 parity with zennit 0.5.1 on twin networks with the same weights (see twins.py)."""

import jax.numpy as jnp
import numpy as np
import pytest

import jaxlrp
from jaxlrp import composites, rules

import peers
import twins

pytestmark = pytest.mark.float64  # parity with zennit in float64

RTOL = 1e-9
TARGETS = np.array([3, 0, 7])

NAMED = ["EpsilonPlus", "EpsilonPlusFlat", "EpsilonAlpha2Beta1", "EpsilonAlpha2Beta1Flat", "EpsilonGammaBox"]

# (jaxlrp rule, zennit rule constructor name, its arguments)
RULES = {
    "Epsilon": (rules.Epsilon(0.25), "Epsilon", dict(epsilon=0.25)),
    "ZPlus": (rules.ZPlus(), "ZPlus", {}),
    "AlphaBeta21": (rules.AlphaBeta(2.0, 1.0), "AlphaBeta", dict(alpha=2.0, beta=1.0)),
    "AlphaBeta10": (rules.AlphaBeta(1.0, 0.0), "AlphaBeta", dict(alpha=1.0, beta=0.0)),
    "Gamma": (rules.Gamma(0.25), "Gamma", dict(gamma=0.25)),
    "ZBox": (rules.ZBox(-3.0, 3.0), "ZBox", dict(low=-3.0, high=3.0)),
    "Flat": (rules.Flat(), "Flat", {}),
    "WSquare": (rules.WSquare(), "WSquare", {}),
    "Norm": (rules.Norm(), "Norm", {}),
}


def _zennit_relevance(torch_model, x, composite):
    torch = peers.require("torch")
    from zennit.attribution import Gradient

    x = torch.tensor(x, requires_grad=True)
    eye = torch.eye(10, dtype=torch.float64)
    with Gradient(torch_model, composite) as attributor:
        out, relevance = attributor(x, lambda out: eye[TARGETS] * out)
    return out.detach().numpy(), relevance.detach().numpy()


def _zennit_composite(case):
    zennit = peers.zennit()
    from zennit.canonizers import SequentialMergeBatchNorm
    from zennit.composites import LayerMapComposite, layer_map_base

    canonizers = [SequentialMergeBatchNorm()]
    if case in NAMED:
        extra = dict(low=-3.0, high=3.0) if case == "EpsilonGammaBox" else {}
        return getattr(zennit.composites, case)(canonizers=canonizers, **extra)
    _, name, kwargs = RULES[case]
    rule = getattr(zennit.rules, name)(**kwargs)
    return LayerMapComposite(layer_map=layer_map_base() + [(zennit.types.Linear, rule)], canonizers=canonizers)


def _jaxlrp_composite(case):
    if case in NAMED:
        extra = dict(low=-3.0, high=3.0) if case == "EpsilonGammaBox" else {}
        return getattr(composites, case)(**extra)
    return composites.LayerMap({("dense", "conv"): RULES[case][0]})


def _assert_close(ours, theirs):
    error = np.abs(np.asarray(ours) - theirs).max() / np.abs(theirs).max()
    assert error <= RTOL, f"relative error {error:.2e}"


# Every rule on every Linen twin; the NNX twins (the same planner behind another binding) under
# the named composites, which use every rule but WSquare and Pass (suite time).
CASES = [(model, "linen", case) for model in ("mlp", "vgg", "resnet") for case in NAMED + list(RULES)]
CASES += [(model, "nnx", case) for model in ("vgg", "resnet") for case in NAMED]


@pytest.mark.parametrize("model, api, case", CASES)
def test_equals_zennit(model, api, case):
    peers.zennit()
    torch_model, flax_model, variables, shape = twins.make(model)
    x = np.random.default_rng(0).normal(size=shape)
    out_ref, relevance_ref = _zennit_relevance(torch_model, x, _zennit_composite(case))
    x_ours = jnp.asarray(twins.to_nhwc(x))
    if api == "linen":
        explain = jaxlrp.output_and_lrp(flax_model, _jaxlrp_composite(case))
        out, relevance = explain(variables, x_ours, target=TARGETS)
    else:
        explain = jaxlrp.output_and_lrp(twins.to_nnx(model, variables), _jaxlrp_composite(case))
        out, relevance = explain(x_ours, target=TARGETS)
    np.testing.assert_allclose(out, out_ref, rtol=1e-12, atol=1e-12)
    _assert_close(relevance, twins.to_nhwc(relevance_ref))


def test_pass_rule_equals_zennit():
    zennit = peers.zennit()
    from zennit.composites import NameMapComposite

    torch_model, flax_model, variables, shape = twins.make("mlp")
    x = np.random.default_rng(1).normal(size=shape)
    theirs = NameMapComposite([
        (["fc1", "fc3"], zennit.rules.Epsilon()),
        (["fc2", "relu1", "relu2"], zennit.rules.Pass()),
    ])
    _, relevance_ref = _zennit_relevance(torch_model, x, theirs)
    ours = composites.NameMap({"fc2": rules.Pass(), "*": rules.Epsilon()})
    relevance = jaxlrp.lrp(flax_model, ours)(variables, jnp.asarray(x), target=TARGETS)
    _assert_close(relevance, relevance_ref)
