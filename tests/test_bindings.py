"""Module paths as the bindings read them: tied heads, `nn.jit`, the root."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxlrp
from jaxlrp import composites, rules


class TiedLM(nn.Module):
    """A head that reuses the embedding, as GPT-2 ties it: `lm_head.apply` on `embedding.T`."""

    tied: bool = True

    def setup(self):
        self.wte = nn.Embed(11, 8)
        self.mid = nn.Dense(8)
        self.lm_head = nn.Dense(11, use_bias=False)

    def __call__(self, ids):
        h = nn.relu(self.mid(self.wte(ids)))
        if self.tied:
            return self.lm_head.apply({"params": {"kernel": self.wte.embedding.T}}, h)[:, -1]
        return self.lm_head(h)[:, -1]


def test_a_tied_head_is_named_under_its_caller():
    """Its path is `lm_head` (before: `<root>`, which no NameMap pattern reached)."""
    ids = jnp.array([[1, 2, 3], [4, 5, 6]])
    variables = TiedLM().init(jax.random.PRNGKey(0), ids)
    composite = composites.combine(composites.NameMap({"lm_head": rules.Epsilon(0.5)}), composites.EpsilonPlus())
    table = jaxlrp.rule_table(TiedLM(), composite, variables, ids)
    assert [(info.path, repr(rule)) for info, rule in zip(table.layers, table.rules)] == [
        ("mid", "Epsilon(epsilon=1e-06)"), ("lm_head", "Epsilon(epsilon=0.5)")]
    untied = {"params": {**variables["params"], "lm_head": {"kernel": variables["params"]["wte"]["embedding"].T}}}
    np.testing.assert_allclose(jaxlrp.lrp(TiedLM(), composite)(variables, ids, target=3),
                               jaxlrp.lrp(TiedLM(tied=False), composite)(untied, ids, target=3), rtol=1e-6)


class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(2, name="head")(nn.relu(nn.Dense(4, name="fc")(x)))


def test_a_module_under_nn_jit_is_explained_on_every_trace():
    """`nn.jit` traces its body once; its marks name their module themselves, so later traces
    read them right (before: IndexError on the second trace)."""
    jitted = nn.jit(type("JittedNet", (Net,), {}))()
    x = jax.random.normal(jax.random.PRNGKey(0), (3, 5))
    variables = jitted.init(jax.random.PRNGKey(1), x)
    composite = composites.EpsilonPlusFlat()
    expected = jaxlrp.lrp(Net(), composite)(variables, x, target=1)
    for scale in (1.0, 2.0):  # a second trace, another input value
        table = jaxlrp.rule_table(jitted, composite, variables, scale * x)
        assert [info.path for info in table.layers] == ["fc", "head"]
        np.testing.assert_allclose(jaxlrp.lrp(jitted, composite)(variables, x, target=1), expected, rtol=1e-6)


def test_a_cached_nn_jit_trace_without_marks_is_announced():
    jitted = nn.jit(type("CachedNet", (Net,), {}))()
    x = jnp.ones((2, 5))
    variables = jitted.init(jax.random.PRNGKey(1), x)
    jitted.apply(variables, x)  # traced by flax before jaxlrp sees it
    with pytest.warns(UserWarning, match="cached `nn.jit` trace"):
        jaxlrp.rule_table(jitted, composites.EpsilonPlus(), variables, x)


def test_the_root_is_named_root():
    """A layer outside every module or scope is at `<root>`, as the table prints it; a NameMap
    pattern `<root>` reaches it."""

    def fn(params, x):
        return jax.nn.relu(x @ params["w"]) @ params["v"]

    params = {"w": jnp.ones((3, 4)), "v": jnp.ones((4, 2))}
    composite = composites.combine(composites.NameMap({"<root>": rules.Epsilon(0.25)}), composites.EpsilonPlus())
    table = jaxlrp.rule_table(fn, composite, params, jnp.ones((1, 3)))
    assert [repr(rule) for rule in table.rules] == ["Epsilon(epsilon=0.25)"] * 2
    assert "<root>" in str(table)


class TwoHeads(nn.Module):
    """Returns a dict, as many models do: what to explain is the user's choice."""

    @nn.compact
    def __call__(self, x):
        h = nn.relu(nn.Dense(6, name="body")(x))
        return {"logits": nn.Dense(3, name="logits")(h), "features": h}


class LogitsOnly(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(3, name="logits")(nn.relu(nn.Dense(6, name="body")(x)))


def test_output_selects_what_is_explained():
    x = jax.random.normal(jax.random.PRNGKey(0), (4, 5))
    variables = TwoHeads().init(jax.random.PRNGKey(1), x)
    composite = composites.EpsilonPlus()
    with pytest.raises(TypeError, match=r"returns 2 arrays\. Choose what is explained with output="):
        jaxlrp.lrp(TwoHeads(), composite)(variables, x)
    select = lambda out: out["logits"]  # noqa: E731
    out, relevance = jax.jit(jaxlrp.output_and_lrp(TwoHeads(), composite, output=select))(variables, x, target=2)
    expected = jaxlrp.lrp(LogitsOnly(), composite)(variables, x, target=2)
    np.testing.assert_allclose(relevance, expected, rtol=1e-6)
    np.testing.assert_allclose(out, TwoHeads().apply(variables, x)["logits"], rtol=1e-6)
    table = jaxlrp.rule_table(TwoHeads(), composite, variables, x, output=select)
    assert [info.path for info in table.layers] == ["body", "logits"]


def test_output_of_a_language_model_at_its_last_position():
    rng = np.random.default_rng(0)
    params = {"embed": jnp.asarray(rng.normal(size=(7, 4))), "w": jnp.asarray(rng.normal(size=(4, 7)))}

    def lm(params, tokens):  # (B, T) ids -> (B, T, V) logits
        return jnp.tanh(params["embed"][tokens]).cumsum(1) @ params["w"]

    tokens = jnp.asarray(rng.integers(0, 7, (2, 5)))
    last = jaxlrp.lrp_fn(lm, composites.EpsilonPlus(), output=lambda logits: logits[:, -1])(params, tokens, target=3)
    expected = jaxlrp.lrp_fn(lambda p, t: lm(p, t)[:, -1], composites.EpsilonPlus())(params, tokens, target=3)
    np.testing.assert_allclose(last, expected, rtol=1e-6)
    assert last.shape == tokens.shape


def test_output_with_an_nnx_module():
    from flax import nnx

    class Heads(nnx.Module):
        def __init__(self, rngs):
            self.body, self.head = nnx.Linear(5, 6, rngs=rngs), nnx.Linear(6, 3, rngs=rngs)

        def __call__(self, x):
            return {"logits": self.head(nnx.relu(self.body(x)))}

    model = Heads(nnx.Rngs(0))
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 5))
    relevance = jaxlrp.lrp(model, composites.EpsilonPlus(), output=lambda out: out["logits"])(x, target=1)
    graphdef, state = nnx.split(model)
    pure = jaxlrp.lrp(graphdef, composites.EpsilonPlus(), output=lambda out: out["logits"])
    np.testing.assert_allclose(jax.jit(pure)(state, x, target=1), relevance, rtol=1e-6)
    function = jaxlrp.lrp_fn(lambda s, x: nnx.merge(graphdef, s)(x)["logits"], composites.EpsilonPlus())
    np.testing.assert_allclose(function(state, x, target=1), relevance, rtol=1e-6)
