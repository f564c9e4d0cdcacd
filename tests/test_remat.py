"""Checkpointing: a remat'd region of the model is a remat'd region of the relevance pass.

Values are checked against the same model without checkpointing (checkpointing never
changes a map); memory by what the relevance pass holds from its forward to its backward
pass (`memory.held_bytes`, read off the trace: XLA:CPU merges a checkpoint's recomputation
with the forward pass, for `jax.grad` too, so its memory analysis cannot show it).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import cnns
import jaxlrp
from jaxlrp import _program, composites, rules
from memory import held_bytes
from models import PRECISIONS, tolerance

pytestmark = pytest.mark.float64

WIDTH, DEPTH = 64, 6


def mlp(params, x, checkpoint=False, policy=None):
    """Blocks of four dense layers with tanh; each block a named scope, under jax.checkpoint
    when `checkpoint`."""
    for i, w in enumerate(params["blocks"]):

        def block(x, w, i=i):
            with jax.named_scope(f"block{i}"):
                for _ in range(4):
                    x = jnp.tanh(x @ w)
                return x

        x = jax.checkpoint(block, policy=policy)(x, w) if checkpoint else block(x, w)
    return x @ params["head"]


def mlp_params(dtype=jnp.float64):
    keys = jax.random.split(jax.random.PRNGKey(0), DEPTH + 1)
    blocks = [jax.random.normal(k, (WIDTH, WIDTH), dtype) / WIDTH**0.5 for k in keys[:-1]]
    return {"blocks": blocks, "head": jax.random.normal(keys[-1], (WIDTH, 3), dtype)}


EPSILON = composites.LayerMap({"dense": rules.Epsilon(0.01)})


def _x(dtype=jnp.float64, batch=32):
    return jax.random.normal(jax.random.PRNGKey(5), (batch, WIDTH), dtype)


def _grad_vjp(fn, params):
    """What `jax.grad` of the first logit holds: the pullback of `x -> fn(params, x)[:, 0]`."""
    return lambda x: jax.vjp(lambda x: fn(params, x)[:, 0].sum(), x)[0]


@pytest.mark.parametrize("dtype", PRECISIONS)
@pytest.mark.parametrize("policy", [None, jax.checkpoint_policies.dots_saveable], ids=["nothing", "dots"])
def test_a_checkpointed_function_equals_the_plain_one(dtype, policy):
    params, x = mlp_params(dtype), _x(dtype)
    plain = jaxlrp.lrp_fn(mlp, EPSILON)(params, x, target=1)
    checkpointed = jaxlrp.lrp_fn(lambda p, x: mlp(p, x, True, policy), EPSILON)
    np.testing.assert_allclose(jax.jit(checkpointed)(params, x, target=1), plain, **tolerance(dtype))
    added = jaxlrp.lrp_fn(mlp, EPSILON, remat={"block*": policy})
    np.testing.assert_allclose(jax.jit(added)(params, x, target=1), plain, **tolerance(dtype))


def test_the_relevance_pass_holds_what_jax_grad_holds_under_the_same_checkpoints():
    params, x = mlp_params(), _x()
    grad_plain = held_bytes(_grad_vjp(mlp, params), x)
    grad_remat = held_bytes(_grad_vjp(lambda p, x: mlp(p, x, True), params), x)
    ours_plain = held_bytes(jaxlrp.lrp_fn(mlp, EPSILON), params, x, target=1)
    ours_model = held_bytes(jaxlrp.lrp_fn(lambda p, x: mlp(p, x, True), EPSILON), params, x, target=1)
    ours_added = held_bytes(jaxlrp.lrp_fn(mlp, EPSILON, remat="block*"), params, x, target=1)
    assert 0 < grad_remat < 0.5 * grad_plain  # the model's checkpoints matter: 4 layers per block
    assert ours_model <= 1.1 * grad_remat, (ours_model, grad_remat)
    assert ours_added <= 1.1 * grad_remat, (ours_added, grad_remat)
    assert ours_model < 0.5 * ours_plain


def test_a_policy_that_saves_dots_holds_them():
    params, x = mlp_params(), _x()
    dots = jax.checkpoint_policies.dots_saveable
    nothing = held_bytes(jaxlrp.lrp_fn(mlp, EPSILON, remat="block*"), params, x, target=1)
    saved = held_bytes(jaxlrp.lrp_fn(mlp, EPSILON, remat={"block*": dots}), params, x, target=1)
    grad_dots = held_bytes(_grad_vjp(lambda p, x: mlp(p, x, True, dots), params), x)
    assert saved > nothing and saved <= 1.1 * grad_dots + 8 * x.nbytes, (saved, nothing, grad_dots)


class Stack(nn.Module):
    """Dense blocks (each two layers and a residual add) under nn.remat, nn.scan of nn.remat, or
    neither."""

    mode: str = "plain"

    @nn.compact
    def __call__(self, x):
        if self.mode == "scan":
            body = nn.scan(nn.remat(Layer), variable_axes={"params": 0}, split_rngs={"params": True}, length=3)
            x, _ = body(name="stack")(x, None)
        else:
            cls = nn.remat(Layer) if self.mode == "remat" else Layer
            for i in range(3):
                x, _ = cls(name=f"layer{i}")(x, None)
        return nn.Dense(3, name="head")(x)


class Layer(nn.Module):
    @nn.compact
    def __call__(self, x, _):
        h = nn.relu(nn.Dense(8, name="inner")(x))
        return nn.relu(x + nn.Dense(8, name="outer")(h)), None


def _stack(mode):
    x = jax.random.normal(jax.random.PRNGKey(1), (4, 8))
    return Stack(mode), Stack(mode).init(jax.random.PRNGKey(2), x), x


def test_linen_remat_and_remat_option_with_record_and_conditions():
    """Recorded and conditioned module outputs inside a checkpointed region: the same values."""
    model, variables, x = _stack("remat")
    plain_model = Stack("plain")
    mask = jnp.arange(8.0) % 2
    kwargs = dict(target=2, conditions={"layer1/inner": mask})
    record = ("layer1", "layer1/inner")
    expected = jaxlrp.lrp(plain_model, composites.EpsilonPlus(), record=record)(variables, x, **kwargs)
    for explain in (jaxlrp.lrp(model, composites.EpsilonPlus(), record=record),
                    jaxlrp.lrp(plain_model, composites.EpsilonPlus(), record=record, remat="layer*")):
        got = jax.jit(explain)(variables, x, **kwargs)
        np.testing.assert_allclose(got.input, expected.input, rtol=1e-12)
        for path in record:
            np.testing.assert_allclose(got.layers[path], expected.layers[path], rtol=1e-12)
            np.testing.assert_allclose(got.activations[path], expected.activations[path], rtol=1e-12)


def test_scan_of_remat_is_checkpointed_inside_the_body():
    model, variables, x = _stack("scan")
    explain = jaxlrp.lrp(model, composites.EpsilonPlus())
    program = _program.from_closed_jaxpr(jax.make_jaxpr(lambda v, x: model.apply(v, x))(variables, x))
    (scan,) = [n for n in program.nodes if n.name == "scan"]
    assert all(n.remat for n in scan.body.nodes)  # the body's nodes carry the remat region
    stacked = variables["params"]["stack"]
    layers = {f"layer{i}": jax.tree.map(lambda a: a[i], stacked) for i in range(3)}
    plain = {"params": {**layers, "head": variables["params"]["head"]}}
    expected = jaxlrp.lrp(Stack("plain"), composites.EpsilonPlus())(plain, x)
    np.testing.assert_allclose(jax.jit(explain)(variables, x), expected, rtol=1e-12)


def test_nested_checkpoints_and_transformations():
    """A checkpoint inside a checkpoint; jit, vmap over a grid of epsilons, grad w.r.t. epsilon."""
    params, x = mlp_params(), _x(batch=4)

    def nested(p, x):
        return jax.checkpoint(lambda p, x: mlp(p, x, True))(p, x)

    def relevance(fn, eps, remat=None):
        c = composites.LayerMap({"dense": rules.Epsilon(eps)})
        return jaxlrp.lrp_fn(fn, c, remat=remat)(params, x, target=0)

    grid = jnp.array([0.01, 0.1, 1.0])
    at, over_grid = relevance(mlp, 0.01), jax.vmap(lambda e: relevance(mlp, e))(grid)
    derivative = jax.grad(lambda e: relevance(mlp, e).sum())(0.1)
    for fn, remat in ((nested, None), (nested, "block*")):
        np.testing.assert_allclose(jax.jit(lambda e: relevance(fn, e, remat))(0.01), at, rtol=1e-10, atol=1e-14)
        np.testing.assert_allclose(jax.vmap(lambda e: relevance(fn, e, remat))(grid), over_grid, rtol=1e-10, atol=1e-14)
        np.testing.assert_allclose(jax.grad(lambda e: relevance(fn, e, remat).sum())(0.1), derivative, rtol=1e-10)


def test_remat3_checkpoints_are_honoured():
    if not hasattr(jax.config, "jax_remat3"):
        pytest.skip("jax_remat3 exists from jax 0.10")
    params, x = mlp_params(), _x()
    jax.config.update("jax_remat3", True)
    try:
        fn = lambda p, x: mlp(p, x, True)  # noqa: E731
        program = _program.from_closed_jaxpr(jax.make_jaxpr(fn)(params, x))
        assert all(n.remat for n in program.nodes if n.name == "tanh")
        ours = held_bytes(jaxlrp.lrp_fn(fn, EPSILON), params, x, target=1)
        got = jaxlrp.lrp_fn(fn, EPSILON)(params, x, target=1)
    finally:
        jax.config.update("jax_remat3", False)
    assert ours <= 1.1 * held_bytes(_grad_vjp(fn, params), x)
    np.testing.assert_allclose(got, jaxlrp.lrp_fn(mlp, EPSILON)(params, x, target=1), rtol=1e-12)


def test_a_checkpointed_resnet_holds_what_jax_grad_holds():
    model, variables = cnns.make("resnet18", 4, dtype=jnp.float64)
    remat = cnns.ResNet(width=4, dtype=jnp.float64, remat=True)
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 16, 16, 3), jnp.float64)
    c = composites.EpsilonGammaBox(-3.0, 3.0)
    expected = jaxlrp.lrp(model, c)(variables, x, target=1)
    np.testing.assert_allclose(jax.jit(jaxlrp.lrp(remat, c))(variables, x, target=1), expected, rtol=1e-10)
    grad = held_bytes(lambda x: jax.vjp(lambda x: remat.apply(variables, x)[:, 1].sum(), x)[0], x)
    plain = held_bytes(lambda x: jax.vjp(lambda x: model.apply(variables, x)[:, 1].sum(), x)[0], x)
    ours = held_bytes(jaxlrp.lrp(remat, c), variables, x, target=1)
    added = held_bytes(jaxlrp.lrp(model, c, remat="stage*"), variables, x, target=1)
    assert grad < plain
    assert ours <= 1.1 * grad and added <= 1.1 * grad, (ours, added, grad)


def test_remat_option_errors():
    params, x = mlp_params(), _x()
    with pytest.raises(ValueError, match=r"remat= pattern\(s\) \['nothing\*'\] match no module.*block0"):
        jaxlrp.lrp_fn(mlp, EPSILON, remat="nothing*")(params, x)
    with pytest.raises(TypeError, match="remat= takes module paths"):
        jaxlrp.lrp_fn(mlp, EPSILON, remat=3)
    with pytest.raises(TypeError, match="remat= takes module paths"):
        jaxlrp.lrp_fn(mlp, EPSILON, remat={"block*": "dots"})


def test_nnx_remat_is_honoured():
    from flax import nnx

    class Block(nnx.Module):
        def __init__(self, rngs):
            self.a, self.b = nnx.Linear(16, 16, rngs=rngs), nnx.Linear(16, 16, rngs=rngs)

        def __call__(self, x):
            return x + self.b(jnp.tanh(self.a(jnp.tanh(x))))

    class Net(nnx.Module):
        def __init__(self, remat, rngs):
            self.blocks = nnx.List([Block(rngs) for _ in range(4)])
            self.head, self.remat = nnx.Linear(16, 3, rngs=rngs), remat

        def __call__(self, x):
            for block in self.blocks:
                x = nnx.remat(lambda block, x: block(x))(block, x) if self.remat else block(x)
            return self.head(x)

    x = jax.random.normal(jax.random.PRNGKey(0), (32, 16), jnp.float64)
    plain, remat = (jaxlrp.lrp(Net(r, nnx.Rngs(0)), composites.EpsilonPlus()) for r in (False, True))
    np.testing.assert_allclose(remat(x, target=1), plain(x, target=1), rtol=1e-12)
    assert held_bytes(remat, x, target=1) < 0.5 * held_bytes(plain, x, target=1)
    table = jaxlrp.rule_table(Net(False, nnx.Rngs(0)), composites.EpsilonPlus(), x, remat="blocks/*")
    assert table == jaxlrp.rule_table(Net(True, nnx.Rngs(0)), composites.EpsilonPlus(), x) and len(table.layers) == 13
    with pytest.raises(ValueError, match="match no module"):
        jaxlrp.rule_table(Net(False, nnx.Rngs(0)), composites.EpsilonPlus(), x, remat="nothing")


def test_save_only_these_names_policy():
    """`checkpoint_name` marks a value that the policy saves; the map is unchanged and the named
    values are what the pass holds beyond the plain checkpoint."""
    from jax.ad_checkpoint import checkpoint_name

    params, x = mlp_params(), _x()

    def named(p, x):
        for i, w in enumerate(p["blocks"]):
            def block(x, w, i=i):
                with jax.named_scope(f"block{i}"):
                    for j in range(4):
                        x = checkpoint_name(jnp.tanh(x @ w), f"h{j}")
                    return x
            x = jax.checkpoint(block, policy=jax.checkpoint_policies.save_only_these_names("h1"))(x, w)
        return x @ p["head"]

    got = jaxlrp.lrp_fn(named, EPSILON)(params, x, target=1)
    np.testing.assert_allclose(got, jaxlrp.lrp_fn(mlp, EPSILON)(params, x, target=1), rtol=1e-12)
    saving = held_bytes(jaxlrp.lrp_fn(named, EPSILON), params, x, target=1)
    nothing = held_bytes(jaxlrp.lrp_fn(lambda p, x: mlp(p, x, True), EPSILON), params, x, target=1)
    assert saving > nothing > 0 and saving <= 1.1 * held_bytes(_grad_vjp(named, params), x)


def test_a_remat_block_encloses_the_models_own_checkpoints_inside_it():
    """remat="block*" around blocks that checkpoint half of themselves: one region per block,
    holding its input only, the model's regions nested inside."""
    params, x = mlp_params(), _x()

    def half(p, x):
        for i, w in enumerate(p["blocks"]):
            with jax.named_scope(f"block{i}"):
                x = jnp.tanh(x @ w)
                x = jax.checkpoint(lambda x, w: jnp.tanh(jnp.tanh(x @ w) @ w))(x, w)
                x = jnp.tanh(x @ w)
        return x @ p["head"]

    explain = jaxlrp.lrp_fn(half, EPSILON, remat="block*")
    np.testing.assert_allclose(explain(params, x, target=1), jaxlrp.lrp_fn(mlp, EPSILON)(params, x, target=1),
                               rtol=1e-12)
    blocks = held_bytes(jaxlrp.lrp_fn(mlp, EPSILON, remat="block*"), params, x, target=1)
    assert 0 < held_bytes(explain, params, x, target=1) <= blocks
