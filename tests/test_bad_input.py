"""Bad input to `jaxlrp.lrp` and the composites: our errors, or the right numbers, where JAX or
NumPy would fail deep inside or the result would be silently wrong."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxlrp
from jaxlrp import attribution, composites, rules

PARAMS = {"w": jnp.linspace(-1.0, 1.0, 12).reshape(4, 3), "v": jnp.array([0.5, -0.25, 1.0])}
X = jax.random.normal(jax.random.PRNGKey(0), (5, 4))


def score(p, x):
    """One score per sample: shape (B,)."""
    return jax.nn.relu(x @ p["w"]) @ p["v"]


def hidden(p, x):
    return jax.nn.relu(x @ p["w"])


def test_a_score_per_sample_explains_each_samples_own_score():
    explain = jaxlrp.lrp_fn(score, composites.EpsilonPlus())
    relevance = explain(PARAMS, X)
    np.testing.assert_allclose(relevance, explain(PARAMS, X, target=score(PARAMS, X)), rtol=1e-6)  # seeded by itself
    for i in range(5):  # each row is that sample explained alone
        np.testing.assert_allclose(relevance[i], explain(PARAMS, X[i : i + 1])[0], rtol=1e-6, atol=1e-7)
    assert (np.abs(relevance).sum(axis=1) > 0).sum() > 1  # not only the batch's arg-max
    gradient = attribution.gradient(score)(PARAMS, X)
    np.testing.assert_allclose(gradient, jax.vmap(jax.grad(lambda x: score(PARAMS, x[None])[0]))(X), rtol=1e-6)


def test_a_scalar_output_is_explained_as_it_is():
    total = lambda p, x: hidden(p, x).sum()  # noqa: E731
    explain = jaxlrp.lrp_fn(total, composites.EpsilonPlus())
    np.testing.assert_allclose(explain(PARAMS, X), explain(PARAMS, X, target=total(PARAMS, X)), rtol=1e-6)
    np.testing.assert_allclose(explain(PARAMS, X).sum(), total(PARAMS, X), rtol=1e-4)  # no biases: conserved
    with pytest.raises(ValueError, match="returns a scalar, which has no classes"):
        explain(PARAMS, X, target=0)


def test_an_integer_output_is_an_error():
    rounded = lambda p, x: jnp.round(hidden(p, x)).astype(jnp.int32)  # noqa: E731
    for call in (lambda: jaxlrp.lrp_fn(rounded, composites.EpsilonPlus())(PARAMS, X),
                 lambda: jax.jit(jaxlrp.lrp_fn(rounded, composites.EpsilonPlus()))(PARAMS, X),
                 lambda: attribution.gradient(rounded)(PARAMS, X)):
        with pytest.raises(TypeError, match="explains a floating-point output; the model returns int32"):
            call()


@pytest.mark.parametrize("bad", [jnp.nan, jnp.inf])
def test_non_finite_weights_are_an_error_when_concrete(bad):
    params = {**PARAMS, "w": PARAMS["w"].at[1, 2].set(bad)}
    explain = jaxlrp.lrp_fn(hidden, composites.EpsilonPlus())
    with pytest.raises(ValueError, match=r"weights hold NaN or Inf \(\[0\]\['w'\]\)"):
        explain(params, X)
    assert not np.isfinite(jax.jit(explain)(params, X)).all()  # traced: documented, NaN propagates


def test_an_empty_batch_is_an_error_of_ours():
    for composite in (composites.EpsilonAlpha2Beta1(), composites.EpsilonPlus()):
        explain = jaxlrp.lrp_fn(hidden, composite)
        for call in (explain, jax.jit(explain)):
            with pytest.raises(ValueError, match=r"input has no values \(shape \(0, 4\)\)"):
                call(PARAMS, X[:0])


def test_argnums_out_of_range_is_an_error():
    for argnums in (2, 5, -3):
        with pytest.raises(TypeError, match=f"argnums={argnums} names an argument that the call does not have"):
            jaxlrp.lrp_fn(hidden, composites.EpsilonPlus(), argnums=argnums)(PARAMS, X)


def test_composites_check_their_keys_and_values():
    with pytest.raises(TypeError, match=r"first= is a rule .* got 'Flat': write first=rules.Flat\(\)"):
        composites.LayerMap({"dense": rules.Epsilon()}, first="Flat")
    with pytest.raises(TypeError, match="LayerMap takes a mapping"):
        composites.LayerMap([rules.Epsilon()])
    with pytest.raises(TypeError, match="NameMap keys are module paths or fnmatch patterns .* got 3: write '3'"):
        composites.NameMap({3: rules.Epsilon()})
    with pytest.raises(TypeError, match="NameMap values must be jaxlrp.rules.Rule instances, got 'Epsilon'"):
        composites.NameMap({"Dense_0": "Epsilon"})
    grid = jax.vmap(lambda e: composites.NameMap({"*": rules.Epsilon(e)}).mapping["*"].epsilon)(jnp.array([0.1, 0.2]))
    np.testing.assert_allclose(grid, [0.1, 0.2])  # still a pytree under transformations
