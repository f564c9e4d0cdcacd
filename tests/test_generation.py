"""`jaxlrp.explain_generation`: a `(K, T)` relevance matrix per sequence for the K generated
tokens of a causal language model, from one forward pass, equal to K separately seeded calls."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxlrp
from jaxlrp import composites

VOCAB, T = 11, 7


class CausalLM(nn.Module):
    @nn.compact
    def __call__(self, ids):
        x = nn.Embed(VOCAB, 16)(ids)
        mask = nn.make_causal_mask(ids)
        x = x + nn.MultiHeadDotProductAttention(num_heads=2)(nn.LayerNorm()(x), mask=mask)
        x = x + nn.Dense(16)(nn.gelu(nn.Dense(32)(nn.LayerNorm()(x))))
        return nn.Dense(VOCAB)(nn.LayerNorm()(x))


@pytest.fixture(scope="module")
def lm():
    ids = jnp.asarray(np.random.default_rng(0).integers(0, VOCAB, (3, T)), jnp.int32)
    variables = CausalLM().init(jax.random.PRNGKey(0), ids)
    return CausalLM(), variables, ids


def _one_call_per_token(model, variables, ids, positions, composite):
    """The reference: for each generated position p, `lrp` seeded by hand with the logit of
    ids[:, p] at position p - 1."""
    logits = model.apply(variables, ids)
    rows = []
    for p in positions:
        seed = jnp.zeros_like(logits).at[jnp.arange(ids.shape[0]), p - 1, ids[:, p]].set(
            logits[jnp.arange(ids.shape[0]), p - 1, ids[:, p]])
        rows.append(jaxlrp.lrp(model, composite)(variables, ids, target=seed))
    return jnp.stack(rows, axis=1)


@pytest.mark.float64
def test_equals_one_call_per_generated_token():
    """AttnLRP in float64 (CP-LRP: on a keras-hub LM in tests/test_keras_hub.py)."""
    composite = composites.AttnLRP()
    ids = jnp.asarray(np.random.default_rng(0).integers(0, VOCAB, (3, T)), jnp.int32)
    model = CausalLM()
    variables = jax.tree.map(lambda a: a.astype(jnp.float64), model.init(jax.random.PRNGKey(0), ids))
    matrix = jaxlrp.explain_generation(model, composite)(variables, ids, generated=3)
    assert matrix.shape == (3, T - 3, T)
    reference = _one_call_per_token(model, variables, ids, range(3, T), composite)
    np.testing.assert_allclose(matrix, reference, rtol=1e-10, atol=1e-12)


def test_later_tokens_get_nothing_and_the_forms_of_generated_agree(lm):
    model, variables, ids = lm
    explain = jaxlrp.explain_generation(model, composites.AttnLRP())
    matrix = explain(variables, ids, generated=4)
    for k, p in enumerate(range(4, T)):
        assert np.all(np.asarray(matrix[:, k, p:]) == 0), "a causal model: tokens from p on have no say"
        assert np.all(np.abs(np.asarray(matrix[:, k, :p])).sum(-1) > 0)
    np.testing.assert_allclose(explain(variables, ids, generated=jnp.array([4, 5, 6])), matrix, rtol=1e-6, atol=1e-7)
    per_sample = jnp.array([[6, 4], [5, 5], [4, 6]])
    chosen = explain(variables, ids, generated=per_sample)
    for b in range(3):
        for k in range(2):
            np.testing.assert_allclose(chosen[b, k], matrix[b, per_sample[b, k] - 4], rtol=1e-6, atol=1e-7)


def test_under_jit_and_vmap(lm):
    model, variables, ids = lm
    explain = jaxlrp.explain_generation(model, composites.CPLRP())
    eager = explain(variables, ids, generated=5)  # compiled itself: the int positions are static
    traced_positions = jax.jit(explain)(variables, ids, generated=jnp.array([5, 6]))
    np.testing.assert_allclose(traced_positions, eager, rtol=1e-6, atol=1e-7)
    one_by_one = jax.vmap(lambda i: explain(variables, i[None], generated=5)[0])(ids)
    np.testing.assert_allclose(one_by_one, eager, rtol=1e-5, atol=1e-6)


def test_nnx_and_output_selection():
    from flax import nnx

    class DictLM(nnx.Module):
        def __init__(self, rngs):
            self.embed = nnx.Embed(VOCAB, 8, rngs=rngs)
            self.head = nnx.Linear(8, VOCAB, rngs=rngs)

        def __call__(self, ids):
            h = jnp.cumsum(self.embed(ids), axis=1)  # causal: position t sees tokens up to t
            return {"logits": self.head(h), "hidden": h}

    ids = jnp.asarray(np.random.default_rng(1).integers(0, VOCAB, (2, 5)), jnp.int32)
    model = DictLM(nnx.Rngs(0))
    explain = jaxlrp.explain_generation(model, composites.AttnLRP(), output=lambda out: out["logits"])
    matrix = explain(ids, generated=2)
    assert matrix.shape == (2, 3, 5)
    logits = model(ids)["logits"]
    # a linear path: each row sums to the explained logit less the head's bias share
    explained = jnp.stack([logits[jnp.arange(2), p - 1, ids[:, p]] for p in range(2, 5)], axis=1)
    bias = jnp.stack([model.head.bias[...][ids[:, p]] for p in range(2, 5)], axis=1)
    np.testing.assert_allclose(matrix.sum(-1), explained - bias, rtol=1e-4, atol=1e-5)


def test_errors_name_what_is_expected(lm):
    model, variables, ids = lm
    explain = jaxlrp.explain_generation(model, composites.AttnLRP())
    with pytest.raises(ValueError, match=r"\[1, 7\)"):
        explain(variables, ids, generated=0)
    with pytest.raises(ValueError, match=r"\[1, 7\)"):
        explain(variables, ids, generated=jnp.array([2, 7]))
    with pytest.raises(TypeError, match="token ids"):
        explain(variables, ids.astype(jnp.float32), generated=2)
    with pytest.raises(TypeError, match="static_argnames"):
        jax.jit(explain)(variables, ids, generated=2)
    with pytest.raises(ValueError, match=r"explain_generation.*out of range \[0, 11\)"):
        explain(variables, ids.at[0, 5].set(VOCAB + 3), generated=4)  # an id the logits have no class for
    with pytest.raises(TypeError, match="generated= says which tokens"):
        explain(variables, ids, generated=2, target=1)
    with pytest.raises(TypeError, match="tokens=lambda x"):
        jaxlrp.explain_generation(model, composites.AttnLRP())(variables, {"ids": ids}, generated=2)
    pooled = jaxlrp.explain_generation(model, composites.AttnLRP(), output=lambda logits: logits[:, -1])
    with pytest.raises(ValueError, match=r"\(batch, T, vocab\)"):
        pooled(variables, ids, generated=2)
