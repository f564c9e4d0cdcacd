"""Concepts: relevance recorded at hidden layers, conditional relevance, many targets at once,
top concepts; each checked by splitting the model at the recorded layer (Linen, NNX, function)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxlrp
import peers
from jaxlrp import composites, concepts

pytestmark = pytest.mark.float64  # parity with zennit-crp and float64 references

# No first-layer rule, so that the split models get the same rules as the whole.
COMPOSITE = composites.EpsilonPlus(epsilon=0.1)
TARGET = jnp.array([0, 1, 4])


def _close(actual, desired):
    """Float64 agreement, relative to the map's largest value (where a map is near zero, another
    summation order, vmapped or jitted, moves it by rounding only)."""
    desired = np.asarray(desired)
    np.testing.assert_allclose(actual, desired, rtol=1e-12, atol=1e-12 * np.abs(desired).max())


class Lower(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.BatchNorm(use_running_average=True)(nn.Conv(4, (3, 3))(x)))
        return nn.relu(nn.Conv(6, (3, 3))(x))


class Upper(nn.Module):
    @nn.compact
    def __call__(self, x):
        hidden = nn.relu(nn.Dense(8, name="hidden")(x.reshape(x.shape[0], -1)))
        return nn.Dense(5, name="out")(hidden)


class Full(nn.Module):
    def setup(self):
        self.lower, self.upper = Lower(), Upper()

    def __call__(self, x):
        return self.upper(self.lower(x))


@pytest.fixture(scope="module")
def linen():
    x = jax.random.normal(jax.random.key(0), (3, 6, 6, 2), jnp.float64)
    # float64 weights: float32 ones, closed over in jit, let XLA fold the BatchNorm's float32
    # rsqrt differently from an eager call, 1e-7 apart.
    variables = jax.tree.map(lambda a: a.astype(jnp.float64), Full().init(jax.random.key(1), x))
    stats = jax.tree.map(lambda a: a + 0.3, variables["batch_stats"])  # a BatchNorm that does something
    variables = {"params": variables["params"], "batch_stats": stats}
    lower = {"params": variables["params"]["lower"], "batch_stats": stats["lower"]}
    upper = {"params": variables["params"]["upper"]}
    return x, variables, lower, upper


def _check_split(explanation, x, explain_upper, explain_lower, path="lower"):
    """The upper part's input relevance is the recorded one; the lower part seeded with it
    gives the input map."""
    np.testing.assert_allclose(explain_upper(explanation.activations[path], TARGET), explanation.layers[path], rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(explain_lower(x, explanation.layers[path]), explanation.input, rtol=1e-12, atol=1e-14)


def test_recorded_relevance_is_what_arrives_there_linen(linen):
    x, variables, lower, upper = linen
    explain = jaxlrp.lrp(Full(), COMPOSITE, record=("lower", "upper/*"))
    explanation = explain(variables, x, target=TARGET)
    assert isinstance(explanation, jaxlrp.Explanation)
    assert set(explanation.layers) == {"lower", "upper/hidden", "upper/out"}
    assert explanation.layers["lower"].shape == explanation.activations["lower"].shape == (3, 6, 6, 6)
    np.testing.assert_allclose(explanation.input, jaxlrp.lrp(Full(), COMPOSITE)(variables, x, target=TARGET), rtol=1e-13)
    _check_split(
        explanation, x,
        lambda a, t: jaxlrp.lrp(Upper(), COMPOSITE)(upper, a, target=t),
        lambda x, seed: jaxlrp.lrp(Lower(), COMPOSITE)(lower, x, target=seed),
    )
    jitted = jax.jit(explain)(variables, x, target=TARGET)  # a pytree: through jit as it is
    np.testing.assert_allclose(jitted.layers["lower"], explanation.layers["lower"], rtol=1e-13)


def test_recorded_relevance_nnx_and_function(linen):
    x, variables, lower, upper = linen
    expected = jaxlrp.lrp(Full(), COMPOSITE, record=("lower",))(variables, x, target=TARGET)

    def fn(v, x):  # the same model as a plain function, its parts in named scopes
        with jax.named_scope("lower"):
            h = Lower().apply({"params": v["params"]["lower"], "batch_stats": v["batch_stats"]["lower"]}, x)
        with jax.named_scope("upper"):
            return Upper().apply({"params": v["params"]["upper"]}, h)

    got = jaxlrp.lrp_fn(fn, COMPOSITE, record=("lower",))(variables, x, target=TARGET)
    for field in ("input", "layers", "activations"):
        np.testing.assert_allclose(jax.tree.leaves(getattr(got, field)), jax.tree.leaves(getattr(expected, field)), rtol=1e-12)

    class NNXFull(nnx.Module):
        def __init__(self, rngs):
            self.lower = nnx.Sequential(nnx.Conv(2, 6, (3, 3), rngs=rngs), nnx.relu)
            self.upper = nnx.Linear(6 * 36, 5, rngs=rngs)

        def __call__(self, x):
            return self.upper(self.lower(x).reshape(x.shape[0], -1))

    model = NNXFull(nnx.Rngs(0))
    model.lower.layers[0].kernel.set_value(model.lower.layers[0].kernel.get_value().astype(jnp.float64))
    explanation = jaxlrp.lrp(model, COMPOSITE, record=("lower",))(x, target=TARGET)
    graphdef, state = nnx.split(model.upper)

    def upper(state, a):
        return nnx.merge(graphdef, state)(a.reshape(a.shape[0], -1))

    _check_split(
        explanation, x,
        lambda a, t: jaxlrp.lrp(upper, COMPOSITE)(state, a, target=t),
        lambda x, seed: jaxlrp.lrp(model.lower, COMPOSITE)(x, target=seed),
    )


def test_conditions_equal_the_lower_part_seeded_with_the_masked_relevance(linen):
    x, variables, lower, _ = linen
    explain = jaxlrp.lrp(Full(), COMPOSITE, record=("lower",))
    explanation = explain(variables, x, target=TARGET)
    masks = jnp.eye(6, dtype=jnp.float64)
    conditional = jax.jit(jax.vmap(lambda m: explain(variables, x, target=TARGET, conditions={"lower": m}).input))(masks)
    assert conditional.shape == (6, *x.shape)
    # The backward pass is linear in the relevance: all channels' conditions add up to the map.
    _close(conditional.sum(axis=0), explanation.input)
    for channel in (0, 3):
        seeded = jaxlrp.lrp(Lower(), COMPOSITE)(lower, x, target=explanation.layers["lower"] * masks[channel])
        _close(conditional[channel], seeded)
        direct = explain(variables, x, target=TARGET, conditions={"lower": masks[channel]}).input  # the loop
        _close(conditional[channel], direct)
    per_sample = jnp.array([[1.0, 0, 0, 0, 0, 0], [0, 1.0, 0, 0, 0, 0], [0, 0, 1.0, 0, 0, 0]])
    got = explain(variables, x, target=TARGET, conditions={"lower": per_sample}).input
    _close(got, jnp.stack([conditional[i, i] for i in range(3)]))
    # Two layers conditioned at once, the relevance recorded at the lower one before its condition.
    both = explain(variables, x, target=TARGET, conditions={"lower": masks[2], "upper/hidden": jnp.ones(8)})
    _close(both.input, conditional[2])
    _close(both.layers["lower"], explanation.layers["lower"])


def test_many_targets_equal_one_call_per_target(linen):
    x, variables, _, _ = linen
    targets = jnp.array([[0, 1], [2, 3], [4, 0]])
    explain = jaxlrp.lrp(Full(), COMPOSITE, record=("lower",))
    many = explain(variables, x, target=targets)
    assert many.input.shape == (2, *x.shape) and many.layers["lower"].shape == (2, 3, 6, 6, 6)
    for k in range(2):
        one = explain(variables, x, target=targets[:, k])
        _close(many.input[k], one.input)
        _close(many.layers["lower"][k], one.layers["lower"])
    with pytest.raises(ValueError, match="out of range"):
        explain(variables, x, target=jnp.array([[0, 5], [0, 0], [0, 0]]))


def test_many_next_token_candidates():
    class Tiny(nn.Module):
        @nn.compact
        def __call__(self, tokens):
            h = nn.Embed(11, 6)(tokens)
            return nn.Dense(11)(nn.relu(nn.Dense(6)(h.mean(axis=1))))

    tokens = jnp.array([[1, 2, 3, 4], [5, 6, 7, 8]])
    variables = Tiny().init(jax.random.key(0), tokens)
    explain = jaxlrp.lrp(Tiny(), COMPOSITE)
    candidates = jnp.array([[3, 7, 1], [0, 2, 9]])
    many = explain(variables, tokens, target=candidates)
    assert many.shape == (3, 2, 4)
    for k in range(3):
        np.testing.assert_allclose(many[k], explain(variables, tokens, target=candidates[:, k]), rtol=1e-5, atol=1e-7)


def test_top_concepts(linen):
    x, variables, _, _ = linen
    explanation = jaxlrp.lrp(Full(), COMPOSITE, record=("lower",))(variables, x, target=TARGET)
    channels, relevance = concepts.top_concepts(explanation, "lower", k=3)
    per_channel = np.asarray(explanation.layers["lower"]).sum(axis=(1, 2))
    assert channels.shape == relevance.shape == (3, 3)
    for b in range(3):
        order = sorted(range(6), key=lambda c: (-per_channel[b, c], c))[:3]
        assert list(np.asarray(channels[b])) == order
        np.testing.assert_allclose(relevance[b], per_channel[b, order], rtol=1e-12)
    with pytest.raises(ValueError, match="was not recorded"):
        concepts.top_concepts(explanation, "upper", 2)


def test_errors_name_the_paths(linen):
    x, variables, _, _ = linen
    with pytest.raises(ValueError, match=r"record= 'lowr' matches no module output.*'lower/Conv_0'"):
        jaxlrp.lrp(Full(), COMPOSITE, record=("lowr",))(variables, x)
    with pytest.raises(ValueError, match=r"the condition at 'lower' has shape \(5,\).*\(6,\) over its features"):
        jaxlrp.lrp(Full(), COMPOSITE)(variables, x, conditions={"lower": jnp.ones(5)})
    with pytest.raises(ValueError, match="conditions= 'nowhere'"):
        jaxlrp.lrp(Full(), COMPOSITE)(variables, x, conditions={"nowhere": jnp.ones(6)})
    with pytest.raises(TypeError, match="record= takes module paths"):
        jaxlrp.lrp(Full(), COMPOSITE, record=(3,))


class ImageVectorTokens(nn.Module):
    """Three inputs that meet by concatenation: an image, a vector and token ids."""

    @nn.compact
    def __call__(self, inputs):
        image, vector, ids = inputs["image"], inputs["vector"], inputs["ids"]
        seen = nn.relu(nn.Dense(6, use_bias=False)(image.reshape(image.shape[0], -1)))
        read = nn.Embed(7, 3)(ids).reshape(ids.shape[0], -1)
        joined = jnp.concatenate([seen, vector, read], axis=-1)
        return nn.Dense(4, use_bias=False)(nn.relu(nn.Dense(8, use_bias=False)(joined)))


@pytest.fixture(scope="module")
def several():
    x = {
        "image": jax.random.normal(jax.random.key(0), (2, 3, 3, 1), jnp.float64),
        "vector": jax.random.normal(jax.random.key(1), (2, 5), jnp.float64),
        "ids": jnp.array([[1, 2], [3, 6]]),
    }
    variables = jax.tree.map(lambda a: a.astype(jnp.float64), ImageVectorTokens().init(jax.random.key(2), x))
    return x, variables


def test_pytree_inputs_conserve_the_seed_together(several):
    x, variables = several
    target = jnp.array([0, 3])
    relevance = jaxlrp.lrp(ImageVectorTokens(), composites.LRP0())(variables, x, target=target)
    assert jax.tree.map(jnp.shape, relevance) == {"image": (2, 3, 3, 1), "vector": (2, 5), "ids": (2, 2)}
    total = sum(r.reshape(2, -1).sum(axis=1) for r in jax.tree.leaves(relevance))
    seed = ImageVectorTokens().apply(variables, x)[jnp.arange(2), target]
    np.testing.assert_allclose(total, seed, rtol=1e-12)  # LRP-0 without biases conserves
    jitted = jax.jit(jaxlrp.lrp(ImageVectorTokens(), composites.LRP0()))(variables, x, target=target)
    np.testing.assert_allclose(jitted["vector"], relevance["vector"], rtol=1e-12)


def test_each_leaf_equals_explaining_it_with_the_others_held_fixed(several):
    x, variables = several
    composite = composites.EpsilonPlus()
    target = jnp.array([1, 2])
    together = jaxlrp.lrp(ImageVectorTokens(), composite)(variables, x, target=target)

    def fn(params, image, vector, ids):
        return ImageVectorTokens().apply(params, {"image": image, "vector": vector, "ids": ids})

    args = (variables, x["image"], x["vector"], x["ids"])
    for position, name in ((1, "image"), (2, "vector"), (3, "ids")):
        alone = jaxlrp.lrp_fn(fn, composite, argnums=position)(*args, target=target)
        np.testing.assert_allclose(alone, together[name], rtol=1e-12, atol=1e-15)
    image, vector = jaxlrp.lrp_fn(fn, composite, argnums=(1, 2))(*args, target=target)
    np.testing.assert_allclose(image, together["image"], rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(vector, together["vector"], rtol=1e-12, atol=1e-15)


def test_record_with_a_dict_input(several):
    """Module outputs reached from any leaf of the input are recorded (before: only those of
    the last leaf; the image's dense layer "matched no module output"). LRP-0 without biases
    conserves: what arrives at the image's dense layer leaves through the image."""
    x, variables = several
    target = jnp.array([0, 3])
    explanation = jaxlrp.lrp(ImageVectorTokens(), composites.LRP0(), record=("Dense_0", "Dense_1"))(variables, x, target=target)
    seed = ImageVectorTokens().apply(variables, x)[jnp.arange(2), target]
    np.testing.assert_allclose(explanation.layers["Dense_1"].sum(-1), seed, rtol=1e-12)
    np.testing.assert_allclose(explanation.layers["Dense_0"].sum(-1), explanation.input["image"].sum((1, 2, 3)), rtol=1e-10)
    assert explanation.activations["Dense_0"].shape == (2, 6)


@pytest.mark.parametrize("by, reduce, sharded", [("relevance", "sum", False), ("activation", "max", True)])
def test_relevance_maximization_equals_brute_force(linen, by, reduce, sharded):
    _, variables, _, _ = linen
    data = np.array(jax.random.normal(jax.random.key(5), (37, 6, 6, 2), jnp.float64))
    data[20] = data[3]  # equal scores: the lower index comes first
    data[33] = data[3]
    targets = np.arange(37) % 5
    explain = jaxlrp.lrp(Full(), COMPOSITE, record=("lower",))
    mesh = jax.make_mesh((8,), ("data",)) if sharded else None
    indices, scores = concepts.relevance_maximization(
        explain, variables, data, "lower", targets=targets, k=4, batch_size=16 if sharded else 8, mesh=mesh, progress=False,
        by=by, reduce=reduce,
    )
    explanation = explain(variables, jnp.asarray(data), target=jnp.asarray(targets))
    values = np.asarray((explanation.layers if by == "relevance" else explanation.activations)["lower"])
    per_sample = values.sum(axis=(1, 2)) if reduce == "sum" else values.max(axis=(1, 2))  # (37, 6)
    assert indices.shape == scores.shape == (6, 4)
    for channel in range(6):
        expected = sorted(range(37), key=lambda i: (-per_sample[i, channel], i))[:4]
        assert list(np.asarray(indices[channel])) == expected, (channel, indices[channel], expected)
        np.testing.assert_allclose(scores[channel], per_sample[expected, channel], rtol=1e-12)


def test_relevance_maximization_checks_the_recorded_path(linen):
    _, variables, _, _ = linen
    data = np.zeros((4, 6, 6, 2))
    with pytest.raises(ValueError, match=r"'lower' was not recorded.*record=\('lower',\)"):
        concepts.relevance_maximization(jaxlrp.lrp(Full(), COMPOSITE), variables, data, "lower", k=2, batch_size=2, progress=False)
    with pytest.raises(ValueError, match="k must lie in"):
        concepts.relevance_maximization(jaxlrp.lrp(Full(), COMPOSITE, record=("lower",)), variables, data, "lower",
                                        k=5, batch_size=2, progress=False)


def test_conditional_heatmaps_equal_zennit_crp():
    """zennit-crp 0.6.0's `CondAttribution` (installed with --no-deps beside zennit 0.5.1 and
    torch 2.13) on the twin VGG in float64: channel 3 and 7 of conv2 (BatchNorm merged), class 5,
    heatmaps summed over the input channels as CRP returns them."""
    peers.zennit()
    import twins

    peers.require("crp")
    import torch
    from crp.attribution import CondAttribution
    from zennit.canonizers import SequentialMergeBatchNorm
    from zennit.composites import EpsilonPlus

    torch_model, model, variables, shape = twins.make("vgg", batch=2)
    x = torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0), requires_grad=True)
    conditions = [{"conv2.0": [3], "y": [5]}, {"conv2.0": [7], "y": [5]}]
    theirs = CondAttribution(torch_model)(x, conditions, EpsilonPlus(canonizers=[SequentialMergeBatchNorm()])).heatmap
    masks = jax.nn.one_hot(jnp.array([3, 7]), 16, dtype=jnp.float64)  # one concept per sample
    x_ours = jnp.asarray(twins.to_nhwc(x.detach().numpy()))
    ours = jaxlrp.lrp(model, composites.EpsilonPlus())(variables, x_ours, target=jnp.array([5, 5]), conditions={"conv2": masks})
    np.testing.assert_allclose(np.asarray(ours).sum(axis=-1), theirs.detach().numpy(), rtol=1e-10, atol=1e-16)


def test_receptive_field_crop():
    maps = np.zeros((3, 6, 7, 2))
    maps[0, 1, 2, 0], maps[0, 3, 5, 1] = 1.0, 0.5  # both above 0.1 of the peak
    maps[0, 5, 6, 0] = 0.05  # below it
    maps[1, 2, 3, 0] = -4.0  # negative relevance does not count
    maps[1, 4, 4, 1] = 2.0
    # maps[2]: nothing positive: the whole image
    boxes = concepts.receptive_field_crop(maps, threshold=0.1)
    np.testing.assert_array_equal(boxes, [[1, 4, 2, 6], [4, 5, 4, 5], [0, 6, 0, 7]])
    np.testing.assert_array_equal(jax.jit(concepts.receptive_field_crop)(maps[..., 0]), [[1, 2, 2, 3], [0, 6, 0, 7], [0, 6, 0, 7]])


def test_conditions_under_grad_and_shard_map(linen):
    """The relevance is linear in a condition's mask, and `jax.grad` reaches it through the
    backward pass; recording and per-sample conditions inside `jax.shard_map` over 8 devices."""
    x, variables, _, _ = linen
    explain = jaxlrp.lrp(Full(), COMPOSITE, record=("lower",))

    def total(mask):
        return explain(variables, x, target=TARGET, conditions={"lower": mask}).input.sum()

    grad = jax.jit(jax.grad(total))(jnp.ones(6))
    _close(grad, jnp.stack([total(m) for m in jnp.eye(6)]))

    from jax.sharding import NamedSharding, PartitionSpec

    mesh = jax.make_mesh((8,), ("data",))
    spec = PartitionSpec("data")
    batch = jnp.concatenate([x] * 3)[:8]
    targets = jnp.arange(8) % 5
    masks = jax.nn.one_hot(jnp.arange(8) % 6, 6, dtype=jnp.float64)  # a concept per sample

    def body(xb, tb, mb):
        return explain(variables, xb, target=tb, conditions={"lower": mb})

    sharded = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(spec, spec, spec), out_specs=spec))
    put = lambda a: jax.device_put(a, NamedSharding(mesh, spec))  # noqa: E731
    got = sharded(put(batch), put(targets), put(masks))
    expected = explain(variables, batch, target=targets, conditions={"lower": masks})
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(expected)):
        _close(a, b)
