"""Integer inputs explained through their embedding lookups, however the lookup is written:
a 2-D or 3-D table, one `nn.Embed` per column of a tabular input, a lookup under `vmap`."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxlrp
from jaxlrp import composites

pytestmark = pytest.mark.float64

RNG = np.random.default_rng(0)
COMPOSITE = composites.EpsilonPlus(epsilon=1e-9)


def _head(params, embedded):
    """A dense readout of the flattened embeddings (any number of trailing axes)."""
    flat = embedded.reshape(embedded.shape[0], -1)
    return jax.nn.relu(flat @ params["w"][: flat.shape[1]]) @ params["v"]


def _params(features):
    return {"w": jnp.asarray(RNG.normal(size=(features, 8))), "v": jnp.asarray(RNG.normal(size=(8, 3)))}


def _staged(params, embedded, target):
    """The relevance arriving at the embeddings, explained as a float input."""
    return jaxlrp.lrp_fn(_head, COMPOSITE)(params, embedded, target=target)


def test_one_embed_per_column_of_a_tabular_input():
    tables = [jnp.asarray(RNG.normal(size=(n, 4))) for n in (5, 3, 7)]
    ids = jnp.asarray(np.stack([RNG.integers(0, n, 6) for n in (5, 3, 7)], -1))
    params = {**_params(12), "tables": tables}

    def model(p, ids):
        embedded = jnp.stack([p["tables"][j][ids[:, j]] for j in range(3)], 1)  # (B, columns, 4)
        return _head(p, embedded)

    target = jnp.arange(6) % 3
    relevance = jaxlrp.lrp_fn(model, COMPOSITE)(params, ids, target=target)
    embedded = jnp.stack([tables[j][ids[:, j]] for j in range(3)], 1)
    np.testing.assert_allclose(relevance, _staged(params, embedded, target).sum(-1), rtol=1e-9)

    class Tabular(nn.Module):  # the same, with a Linen nn.Embed per column
        @nn.compact
        def __call__(self, ids):
            embedded = jnp.stack([nn.Embed(n, 4, name=f"column{j}")(ids[:, j]) for j, n in enumerate((5, 3, 7))], 1)
            return nn.Dense(3)(nn.relu(nn.Dense(8)(embedded.reshape(ids.shape[0], -1))))

    variables = Tabular().init(jax.random.PRNGKey(0), ids)
    out, by_column = jaxlrp.output_and_lrp(Tabular(), COMPOSITE)(variables, ids, target=target)
    assert by_column.shape == ids.shape and bool(jnp.all(jnp.isfinite(by_column)))
    assert not np.allclose(by_column[:, 0], by_column[:, 1])


def test_a_three_dimensional_table_and_a_lookup_under_vmap():
    table = jnp.asarray(RNG.normal(size=(9, 2, 3)))  # (vocab, layers, dim)
    tokens = jnp.asarray(RNG.integers(0, 9, (4, 5)))
    params = {**_params(30), "table": table}
    target = jnp.array([0, 1, 2, 0])

    def three_d(p, tokens):
        return _head(p, p["table"][tokens])  # (B, T, layers, dim)

    relevance = jaxlrp.lrp_fn(three_d, COMPOSITE)(params, tokens, target=target)
    np.testing.assert_allclose(relevance, _staged(params, table[tokens], target).sum((-1, -2)), rtol=1e-9)

    def vmapped(p, tokens):  # penzai looks tokens up per sample, under vmap
        embedded = jax.vmap(lambda t: jnp.take(p["table"][:, 0], t, axis=0))(tokens)
        return _head(p, embedded)

    relevance = jaxlrp.lrp_fn(vmapped, COMPOSITE)(params, tokens, target=target)
    np.testing.assert_allclose(relevance, _staged(params, table[:, 0][tokens], target).sum(-1), rtol=1e-9)
    np.testing.assert_allclose(jax.jit(jaxlrp.lrp_fn(vmapped, COMPOSITE))(params, tokens, target=target), relevance,
                               rtol=1e-12)


def test_many_targets_at_once_give_each_token_its_relevance_per_target():
    table = jnp.asarray(RNG.normal(size=(9, 3)))
    tokens = jnp.asarray(RNG.integers(0, 9, (2, 4)))
    params = {**_params(12), "table": table}

    def model(p, tokens):
        return _head(p, p["table"][tokens])

    both = jaxlrp.lrp_fn(model, COMPOSITE)(params, tokens, target=jnp.array([[0, 2], [1, 2]]))
    assert both.shape == (2, 2, 4)
    np.testing.assert_allclose(both[0], jaxlrp.lrp_fn(model, COMPOSITE)(params, tokens, target=jnp.array([0, 1])),
                               rtol=1e-12)


def test_integer_inputs_that_reach_no_lookup_or_several_are_errors():
    table = jnp.asarray(RNG.normal(size=(20, 3)))
    params = {**_params(12), "table": table}
    tokens = jnp.asarray(RNG.integers(0, 4, (2, 4)))
    with pytest.raises(TypeError, match="integer input carries no relevance itself.*reaches none"):
        jaxlrp.lrp_fn(lambda p, t: _head(p, t.astype(jnp.float64)[..., None] * p["table"][0]), COMPOSITE)(params, tokens)
    with pytest.raises(TypeError, match="several"):  # a token id made of two positions' ids
        jaxlrp.lrp_fn(lambda p, t: _head(p, p["table"][t + 4 * t[:, ::-1]]), COMPOSITE)(params, tokens)


def test_a_lookup_with_a_constant_index_component():
    table = jnp.asarray(RNG.normal(size=(2, 9, 3)))  # (layers, vocab, dim): table[1, ids]
    tokens = jnp.asarray(RNG.integers(0, 9, (2, 4)))
    params = {**_params(12), "table": table}
    relevance = jaxlrp.lrp_fn(lambda p, t: _head(p, p["table"][1, t]), COMPOSITE)(params, tokens, target=jnp.array([0, 1]))
    np.testing.assert_allclose(relevance, _staged(params, table[1, tokens], jnp.array([0, 1])).sum(-1), rtol=1e-9)


def test_a_lookup_inside_a_scan_is_an_error_that_says_what_to_do():
    table = jnp.asarray(RNG.normal(size=(9, 3)))
    tokens = jnp.asarray(RNG.integers(0, 9, (2, 4)))
    params = {**_params(3), "table": table}

    def rnn(p, tokens):
        def step(h, ids):
            return jnp.tanh(h + p["table"][ids]), None

        return _head(p, jax.lax.scan(step, jnp.zeros((2, 3)), tokens.T)[0])

    with pytest.raises(jaxlrp.UnsupportedOperation, match="inside a `scan` body.*before the loop"):
        jaxlrp.lrp_fn(rnn, COMPOSITE)(params, tokens)


def test_integer_leaves_that_no_lookup_reads_are_structure():
    """A dict input as keras-hub's language models take it: the ids are looked up, the padding
    mask only selects. The mask's relevance is zero, and the ids' equals the map with the mask
    passed as a constant; many targets keep the leading axis on both."""
    table = jnp.asarray(RNG.normal(size=(9, 3)))
    params = {**_params(12), "table": table}
    ids = jnp.asarray(RNG.integers(0, 9, (2, 4)))
    mask = jnp.asarray([[1, 1, 1, 0], [1, 1, 0, 0]])

    def model(p, x):
        embedded = p["table"][x["ids"]] * x["mask"][..., None]
        return _head(p, embedded)

    relevance = jaxlrp.lrp_fn(model, COMPOSITE)(params, {"ids": ids, "mask": mask}, target=1)
    assert relevance["mask"].shape == mask.shape and not np.any(np.asarray(relevance["mask"]))
    as_bool = jaxlrp.lrp_fn(model, COMPOSITE)(params, {"ids": ids, "mask": mask > 0}, target=1)
    np.testing.assert_allclose(as_bool["ids"], relevance["ids"], rtol=1e-12)
    constant = jaxlrp.lrp_fn(lambda p, t: model(p, {"ids": t, "mask": mask}), COMPOSITE)(params, ids, target=1)
    np.testing.assert_allclose(relevance["ids"], constant, rtol=1e-12)
    assert np.all(np.asarray(relevance["ids"])[mask == 0] == 0) and np.any(np.asarray(relevance["ids"]))
    both = jaxlrp.lrp_fn(model, COMPOSITE)(params, {"ids": ids, "mask": mask}, target=jnp.array([[0, 1], [2, 1]]))
    assert both["ids"].shape == (2, 2, 4) and both["mask"].shape == (2, 2, 4)


def test_an_integer_leaf_looked_up_by_a_one_hot_matmul_is_an_error():
    """Its relevance would be read nowhere (and its share given to the other leaves): an error
    that says how to look ids up, never a silent zero."""
    table = jnp.asarray(RNG.normal(size=(9, 3)))
    params = {**_params(12), "table": table, "segments": jnp.asarray(RNG.normal(size=(2, 3)))}
    ids = jnp.asarray(RNG.integers(0, 9, (2, 4)))
    segments = jnp.asarray(RNG.integers(0, 2, (2, 4)))

    def model(p, x):
        embedded = p["table"][x["ids"]] + jax.nn.one_hot(x["segments"], 2) @ p["segments"]
        return _head(p, embedded)

    with pytest.raises(TypeError, match="integer input 1 .* one-hot lookup.*table\\[ids\\]"):
        jaxlrp.lrp_fn(model, COMPOSITE)(params, {"ids": ids, "segments": segments})
