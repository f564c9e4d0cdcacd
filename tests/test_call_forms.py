"""One call form per model family, the same in `lrp`, `output_and_lrp`, `rule_table`, the
baselines, `evaluate.sweep` and `explain_dataset`: Linen module, NNX module (its current state),
NNX GraphDef (state as an argument), plain function (with `argnums`). `target=` and
`conditions=` are keyword-only everywhere; `output=` selects what is explained everywhere."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxlrp
from jaxlrp import attribution, composites, evaluate, rules

COMPOSITE = composites.EpsilonPlus()
BASELINES = {
    "gradient": attribution.gradient,
    "gradient_x_input": attribution.gradient_x_input,
    "integrated_gradients": lambda model, **kw: attribution.integrated_gradients(model, n=3, **kw),
    "occlusion": lambda model, **kw: attribution.occlusion(model, window=(2,), **kw),
}


class Heads(nn.Module):
    """Returns a dict: what is explained is chosen with output=."""

    @nn.compact
    def __call__(self, x, scale=1.0):
        hidden = nn.relu(nn.Dense(6, name="hidden")(x))
        return {"logits": nn.Dense(3, name="out")(hidden) * scale, "hidden": hidden}


class NNXHeads(nnx.Module):
    def __init__(self, rngs):
        self.hidden, self.out = nnx.Linear(4, 6, rngs=rngs), nnx.Linear(6, 3, rngs=rngs)

    def __call__(self, x, scale=1.0):
        hidden = nnx.relu(self.hidden(x))
        return {"logits": self.out(hidden) * scale, "hidden": hidden}


def logits(out):
    return out["logits"]


@pytest.fixture(scope="module")
def setup():
    x = jax.random.normal(jax.random.PRNGKey(0), (3, 4))
    variables = Heads().init(jax.random.PRNGKey(1), x)
    module = NNXHeads(nnx.Rngs(0))
    for name in ("hidden", "out"):
        for leaf in ("kernel", "bias"):
            getattr(getattr(module, name), leaf).set_value(variables["params"][name][leaf])
    graphdef, state = nnx.split(module)

    def fn(params, x, *, scale=1.0):
        return Heads().apply(params, x, scale=scale)

    def fn_at_2(params, unused, x, *, scale=1.0):  # the explained input at position 2, as in Haiku's apply
        del unused
        return Heads().apply(params, x, scale=scale)

    families = {  # name -> (model, the positional arguments of explain, factory keywords)
        "linen": (Heads(), (variables, x), {}),
        "nnx_module": (module, (x,), {}),
        "nnx_graphdef": (graphdef, (state, x), {}),
        "function": (fn, (variables, x), {}),
        "function_argnums_2": (fn_at_2, (variables, None, x), {"argnums": 2}),
    }
    return x, variables, families


FAMILIES = ["linen", "nnx_module", "nnx_graphdef", "function", "function_argnums_2"]


def _reference(setup, target=1):
    x, variables, _ = setup
    return jaxlrp.lrp(Heads(), COMPOSITE, output=logits)(variables, x, target=target)


@pytest.mark.parametrize("family", FAMILIES)
def test_lrp_output_and_lrp_and_rule_table_in_every_call_form(setup, family):
    x, variables, families = setup
    model, args, keywords = families[family]
    expected = _reference(setup)
    explain = jaxlrp.lrp(model, COMPOSITE, output=logits, **keywords)
    np.testing.assert_allclose(explain(*args, target=1), expected, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(jax.jit(explain)(*args, target=1), expected, rtol=1e-5, atol=1e-7)
    out, relevance = jax.jit(jaxlrp.output_and_lrp(model, COMPOSITE, output=logits, **keywords))(*args, target=1)
    np.testing.assert_allclose(out, Heads().apply(variables, x)["logits"], rtol=1e-6)
    np.testing.assert_allclose(relevance, expected, rtol=1e-5, atol=1e-7)
    table = jaxlrp.rule_table(model, COMPOSITE, *args, output=logits, **keywords)
    assert [(info.kind, repr(rule)) for info, rule in zip(table.layers, table.rules)] == [
        ("dense", "Epsilon(epsilon=1e-06)"), ("dense", "Epsilon(epsilon=1e-06)")]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("baseline", list(BASELINES))
def test_baselines_in_every_call_form_with_output(setup, family, baseline):
    x, variables, families = setup
    model, args, keywords = families[family]
    expected = BASELINES[baseline](Heads(), output=logits)(variables, x, target=2)
    explain = BASELINES[baseline](model, output=logits, **keywords)
    np.testing.assert_allclose(explain(*args, target=2), expected, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(jax.jit(explain)(*args, target=2), expected, rtol=1e-5, atol=1e-7)


def test_gradient_baseline_with_output_is_the_gradient_of_the_selection(setup):
    x, variables, _ = setup
    gradient = attribution.gradient(Heads(), output=logits)(variables, x, target=2)
    expected = jax.grad(lambda x: Heads().apply(variables, x)["logits"][:, 2].sum())(x)
    np.testing.assert_allclose(gradient, expected, rtol=1e-6)
    sg = attribution.smoothgrad(Heads(), n=2, output=logits)(variables, x, target=2, key=jax.random.key(0))
    assert sg.shape == x.shape


@pytest.mark.parametrize("family", FAMILIES)
def test_a_positional_target_is_an_error_that_names_target(setup, family):
    _, _, families = setup
    model, args, keywords = families[family]
    calls = {
        "lrp": jaxlrp.lrp(model, COMPOSITE, output=logits, **keywords),
        "output_and_lrp": jaxlrp.output_and_lrp(model, COMPOSITE, output=logits, **keywords),
        "gradient": attribution.gradient(model, output=logits, **keywords),
        "smoothgrad": attribution.smoothgrad(model, n=2, output=logits, **keywords),
    }
    for name, explain in calls.items():
        with pytest.raises(TypeError, match=r"positional argument.*target= and conditions= are keyword-only"):
            explain(*args, 1, key=jax.random.key(0)) if name == "smoothgrad" else explain(*args, 1)
        with pytest.raises(TypeError, match="target="):
            jax.jit(explain)(*args, 1)
    with pytest.raises(TypeError, match="target="):
        jaxlrp.rule_table(model, COMPOSITE, *args, 1, output=logits, **keywords)


def test_lrp_fn_no_longer_passes_a_positional_target_to_the_function():
    """Before, `lrp_fn(fn, c)(p, x, 1)` called `fn(p, x, 1)` without a word."""

    def fn(params, x):
        return x @ params

    params, x = jnp.ones((4, 3)), jnp.ones((2, 4))
    with pytest.raises(TypeError, match=r"fn takes 2 positional argument\(s\) \(params, x\), got 3"):
        jaxlrp.lrp_fn(fn, COMPOSITE)(params, x, 1)
    with pytest.raises(TypeError, match="argnums=2 names an argument that the call does not have"):
        jaxlrp.lrp_fn(lambda *args: args[0] @ args[1], COMPOSITE, argnums=2)(params, x)
    np.testing.assert_allclose(jaxlrp.lrp_fn(fn, COMPOSITE)(params, x, target=1), x * params[:, 1], rtol=1e-6)


def test_rule_table_takes_argnums_as_lrp_fn_does():
    """The table of `lrp_fn(fn, c, argnums=2)` (failed before: rule_table knew only fn(params, x))."""
    rng = np.random.default_rng(0)
    params = {"w": jnp.asarray(rng.normal(size=(4, 5))), "v": jnp.asarray(rng.normal(size=(5, 3)))}
    x = jnp.asarray(rng.normal(size=(2, 4)))

    def apply(params, rng_key, x):  # Haiku's apply signature
        del rng_key
        with jax.named_scope("hidden"):
            h = jax.nn.relu(x @ params["w"])
        return h @ params["v"]

    composite = composites.combine(composites.NameMap({"hidden": rules.Epsilon(0.5)}), COMPOSITE)
    table = jaxlrp.rule_table(apply, composite, params, None, x, argnums=2)
    assert [(info.path, repr(rule)) for info, rule in zip(table.layers, table.rules)] == [
        ("hidden", "Epsilon(epsilon=0.5)"), ("", "Epsilon(epsilon=1e-06)")]
    assert jaxlrp.rule_table(apply, composite, params, None, x, argnums=-1).layers == table.layers
    relevance = jaxlrp.lrp_fn(apply, composite, argnums=2)(params, None, x, target=0)
    np.testing.assert_allclose(jaxlrp.lrp(apply, composite, argnums=2)(params, None, x, target=0), relevance)
    pair = jaxlrp.rule_table(lambda p, a, b: apply(p, None, a + b), COMPOSITE, params, x, x, argnums=(1, 2))
    assert [info.kind for info in pair.layers] == ["sum", "dense", "dense"]  # a + b, then the two layers
    with pytest.raises(TypeError, match="argnums= says which argument of a plain function"):
        jaxlrp.rule_table(Heads(), COMPOSITE, {}, x, argnums=2)


def test_model_keyword_arguments_of_a_function(setup):
    """`lrp(fn, c, scale=2.)` (an error before) and `explain(..., scale=s)` at call time, traced."""
    x, variables, families = setup
    fn = families["function"][0]
    once = _reference(setup)
    twice = jaxlrp.lrp(fn, COMPOSITE, output=logits, scale=2.0)(variables, x, target=1)
    np.testing.assert_allclose(twice, 2 * once, rtol=1e-4, atol=1e-6)  # ε's share aside
    np.testing.assert_allclose(jaxlrp.lrp_fn(fn, COMPOSITE, output=logits, scale=2.0)(variables, x, target=1), twice,
                               rtol=1e-6, atol=1e-7)
    explain = jax.jit(jaxlrp.lrp(fn, COMPOSITE, output=logits))
    np.testing.assert_allclose(explain(variables, x, target=1, scale=jnp.float32(3.0)), 3 * once, rtol=1e-4, atol=1e-6)
    gradient = attribution.gradient(fn, output=logits, scale=2.0)(variables, x, target=1)
    np.testing.assert_allclose(gradient, 2 * attribution.gradient(fn, output=logits)(variables, x, target=1), rtol=1e-6)
    table = jaxlrp.rule_table(fn, COMPOSITE, variables, x, output=logits, scale=2.0)
    assert len(table.layers) == 2


def test_nnx_module_forms_read_the_current_state(setup):
    x, _, families = setup
    module = nnx.clone(families["nnx_module"][0])
    explain = jaxlrp.lrp(module, COMPOSITE, output=logits)
    gradient = attribution.gradient(module, output=logits)
    before, grad_before = explain(x, target=1), gradient(x, target=1)
    module.out.kernel.set_value(2 * module.out.kernel[...])
    module.out.bias.set_value(2 * module.out.bias[...])
    np.testing.assert_allclose(explain(x, target=1), 2 * before, rtol=1e-4, atol=1e-6)  # ε's share aside
    np.testing.assert_allclose(gradient(x, target=1), 2 * grad_before, rtol=1e-6)


def test_errors_of_the_call_forms(setup):
    x, variables, families = setup
    with pytest.raises(TypeError, match="argnums=\\(1, 2\\) names several"):
        attribution.gradient(lambda p, a, b: a + b, argnums=(1, 2))
    with pytest.raises(TypeError, match="a baseline takes none"):
        attribution.gradient(Heads(), output=logits)(variables, x, target=1, conditions={"hidden": jnp.ones(6)})
    with pytest.raises(TypeError, match="output= is a function of the model's output"):
        jaxlrp.lrp(Heads(), COMPOSITE, output="logits")
    with pytest.raises(TypeError, match=r"an NNX module is explained with 1 positional argument\(s\) \(x\), got 2"):
        jaxlrp.lrp(families["nnx_module"][0], COMPOSITE, output=logits)(*families["nnx_graphdef"][1])
    with pytest.raises(TypeError):  # keyword-only in evaluation too
        evaluate.region_perturbation(lambda y: y, x, x, 1, patch=(1,))


def test_sweep_with_output_in_every_family(setup):
    x, variables, families = setup
    grid = {"epsilon": [1e-6, 0.5]}
    args = dict(target=jnp.array([0, 1, 2]), patch=(1,), steps=2)
    make = lambda epsilon: composites.EpsilonPlus(epsilon=epsilon)  # noqa: E731
    expected = evaluate.sweep(make, grid, Heads(), variables, x, output=logits, **args).scores
    for family in ("nnx_module", "nnx_graphdef", "function"):
        model, call, _ = families[family]
        given = None if family == "nnx_module" else call[0]
        scores = evaluate.sweep(make, grid, model, given, x, output=logits, **args).scores
        np.testing.assert_allclose(scores, expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(TypeError):
        evaluate.sweep(make, grid, Heads(), variables, x, jnp.array([0, 1, 2]), output=logits, patch=(1,))


def test_explain_dataset_and_relevance_maximization_with_output(setup, tmp_path):
    pytest.importorskip("tensorstore")
    x, variables, _ = setup
    targets = np.array([0, 1, 2])
    explain = jaxlrp.lrp(Heads(), COMPOSITE, output=logits)
    written = jaxlrp.explain_dataset(explain, variables, np.asarray(x), targets=targets, out=tmp_path / "r",
                                     batch_size=2, progress=False)
    np.testing.assert_allclose(np.asarray(written), explain(variables, x, target=targets), rtol=1e-5, atol=1e-7)
    recording = jaxlrp.lrp(Heads(), COMPOSITE, output=logits, record=("hidden",))
    indices, _ = jaxlrp.concepts.relevance_maximization(recording, variables, np.asarray(x), "hidden",
                                                        targets=targets, k=2, batch_size=2, progress=False)
    assert indices.shape == (6, 2)
    with pytest.raises(TypeError):
        jaxlrp.explain_dataset(explain, variables, np.asarray(x), targets, out=tmp_path / "s", batch_size=2)
