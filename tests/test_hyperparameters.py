"""Rule hyperparameters are checked when concrete (issue 19's bad input): a negative or NaN ε,
stabilizer or γ, and a box with low > high, are errors that name the rule; traced values (a
vmapped grid, a jitted argument) pass through."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlrp import composites, rules


@pytest.mark.parametrize("build", [
    lambda: rules.Epsilon(-0.5), lambda: rules.Epsilon(float("nan")), lambda: rules.ZPlus(-1e-6),
    lambda: rules.Gamma(-0.25), lambda: rules.Gamma(0.25, stabilizer=-1.0), lambda: rules.Flat(-1.0),
    lambda: rules.WSquare(float("inf")), lambda: rules.Norm(-1e-6), lambda: rules.Bilinear(-1e-6),
    lambda: rules.AlphaBeta(2.0, 1.0, stabilizer=-1e-6), lambda: composites.EpsilonPlus(epsilon=-0.1),
], ids=["eps", "eps-nan", "zplus", "gamma", "gamma-stab", "flat", "wsquare", "norm", "bilinear", "alphabeta",
        "composite"])
def test_negative_or_non_finite_hyperparameters_are_errors(build):
    with pytest.raises(ValueError, match=r"needs \w+ >= 0"):
        build()


def test_a_box_needs_low_below_high():
    with pytest.raises(ValueError, match="ZBox needs finite bounds with low <= high"):
        rules.ZBox(1.0, -1.0)
    with pytest.raises(ValueError, match="ZBox needs"):
        rules.ZBox(jnp.array([0.0, 2.0]), jnp.array([1.0, 1.0]))
    rules.ZBox(jnp.zeros(3), jnp.ones(3))  # fine
    rules.ZBox(0.0, 0.0)  # a degenerate box is allowed


def test_zero_and_traced_values_are_accepted():
    rules.Epsilon(0.0), rules.Gamma(0.0), composites.LRP0()
    grid = jax.vmap(lambda g: jax.tree.leaves(rules.Gamma(g))[0])(jnp.array([-1.0, 0.5]))  # traced: unchecked
    np.testing.assert_array_equal(grid, [-1.0, 0.5])
    assert float(jax.jit(lambda e: rules.Epsilon(e).epsilon)(0.1)) == pytest.approx(0.1)
    assert float(jax.grad(lambda e: rules.Epsilon(e).epsilon * 2)(0.1)) == 2.0
