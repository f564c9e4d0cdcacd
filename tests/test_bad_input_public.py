"""Bad input to the public functions of evaluate, concepts.relevance_maximization and viz: our
own errors naming the function, or results that stay correct (NaN never silently turned into a
number, one NaN pixel never spoiling a picture)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

import jaxlrp
from jaxlrp import composites, concepts, evaluate, rules, viz

CLASSES = 10


def _linear(batch=3, features=8, seed=0):
    """A bias-free linear model with 10 classes, inputs and their exact relevance for class 0."""
    k1, k2 = jax.random.split(jax.random.key(seed))
    w = jax.random.normal(k1, (features, CLASSES))
    x = jax.random.normal(k2, (batch, features))

    def fn(z):
        return z @ w

    return fn, x, x * w[:, 0]


class Tiny(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(6, name="hidden")(x.reshape(x.shape[0], -1)))
        return nn.Dense(4, name="out")(x)


@pytest.fixture(scope="module")
def tiny():
    x = jax.random.normal(jax.random.key(0), (4, 8))
    return Tiny(), Tiny().init(jax.random.key(1), x), x


# ---- evaluate ------------------------------------------------------------------------------


@pytest.mark.parametrize("target", [-1, 10, [0, 3, 10], [0, -2, 1]])
def test_region_perturbation_refuses_a_concrete_target_out_of_range(target):
    fn, x, relevance = _linear()
    with pytest.raises(ValueError, match=r"jaxlrp\.evaluate\.region_perturbation: target class out of range \[0, 10\)"):
        evaluate.region_perturbation(fn, x, relevance, target=jnp.asarray(target), patch=(1,))


def test_region_perturbation_refuses_a_target_of_another_shape_or_dtype():
    fn, x, relevance = _linear()
    for target in (jnp.zeros(2, int), jnp.zeros(3)):
        with pytest.raises(ValueError, match=r"region_perturbation: target must be a class index per sample"):
            evaluate.region_perturbation(fn, x, relevance, target=target, patch=(1,))


def test_region_perturbation_traced_target_out_of_range_gives_nan_not_another_class():
    fn, x, relevance = _linear()
    run = jax.jit(lambda t: evaluate.region_perturbation(fn, x, relevance, target=t, patch=(2,)))
    curve = np.asarray(run(jnp.array([-1, 0, 10])))
    assert np.isnan(curve[0]).all() and np.isnan(curve[2]).all()  # before: class 9, and NaN only for 10
    expected = evaluate.region_perturbation(fn, x, relevance, target=jnp.array([0, 0, 0]), patch=(2,))
    np.testing.assert_allclose(curve[1], expected[1], rtol=1e-6)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_region_perturbation_refuses_concrete_relevance_with_nan(bad):
    fn, x, relevance = _linear()
    relevance = relevance.at[1, 2].set(bad)
    for order in ("morf", "lerf"):
        with pytest.raises(ValueError, match=r"region_perturbation: relevance holds NaN or Inf \(1 of 24 values\)"):
            evaluate.region_perturbation(fn, x, relevance, target=0, patch=(1,), order=order)
    # a random order does not read the relevance's values
    curve = evaluate.region_perturbation(fn, x, relevance, target=0, patch=(1,), order="random", key=jax.random.key(0))
    assert np.isfinite(curve).all()


def test_region_perturbation_traced_nan_relevance_gives_that_sample_nan():
    fn, x, relevance = _linear()
    bad = relevance.at[1, 2].set(jnp.nan)
    run = jax.jit(lambda r, order: evaluate.region_perturbation(fn, x, r, target=0, patch=(1,), order=order), static_argnums=1)
    morf, lerf = np.asarray(run(bad, "morf")), np.asarray(run(bad, "lerf"))
    assert np.isnan(morf[1]).all() and np.isnan(evaluate.abpc(morf, lerf)[1])  # before: MoRF = LeRF, ABPC 0
    np.testing.assert_allclose(morf[[0, 2]], run(relevance, "morf")[jnp.array([0, 2])], rtol=1e-6)


@pytest.mark.parametrize("chunk", [0, -2, 2.5, True])
def test_region_perturbation_refuses_a_bad_chunk(chunk):
    fn, x, relevance = _linear()
    with pytest.raises(ValueError, match=r"jaxlrp\.evaluate\.region_perturbation: chunk must be None or an int >= 1"):
        evaluate.region_perturbation(fn, x, relevance, target=0, patch=(1,), chunk=chunk)


def test_region_perturbation_refuses_non_int_steps():
    fn, x, relevance = _linear()
    with pytest.raises(ValueError, match=r"steps must lie in \[0, 8\] regions and be an int, got 2.5"):
        evaluate.region_perturbation(fn, x, relevance, target=0, patch=(1,), steps=2.5)


def test_spearman_is_nan_where_a_map_holds_nan_and_checks_shapes():
    a = jnp.array([[jnp.nan, 1.0, 2.0, 3.0], [0.0, 1.0, 2.0, 3.0]])
    b = jnp.array([[0.0, 1.0, 2.0, 3.0], [0.0, 1.0, 2.0, 3.0]])
    rho = np.asarray(evaluate.spearman(a, b))
    assert np.isnan(rho[0]) and rho[1] == pytest.approx(1.0)  # before: -0.2 for the NaN map
    with pytest.raises(ValueError, match=r"jaxlrp\.evaluate\.spearman: expected two maps of one shape"):
        evaluate.spearman(a, b[:, :3])


def test_aopc_and_abpc_refuse_curves_without_a_batch_axis():
    with pytest.raises(ValueError, match=r"jaxlrp\.evaluate\.aopc: expected a curve of shape \(batch, steps \+ 1\)"):
        evaluate.aopc(jnp.zeros(5))
    with pytest.raises(ValueError, match=r"jaxlrp\.evaluate\.abpc: expected curves of shape"):
        evaluate.abpc(jnp.zeros(5), jnp.zeros(5))


def test_randomization_test_checks_the_target_and_the_given_relevance(tiny):
    model, variables, x = tiny
    explain = jaxlrp.lrp(model, composites.EpsilonPlus())
    with pytest.raises(ValueError, match=r"target class out of range \[0, 4\)"):
        evaluate.randomization_test(explain, variables, x, target=jnp.array([0, 1, 2, 4]), key=jax.random.key(0))
    relevance = explain(variables, x, target=0).at[0, 0].set(jnp.nan)
    with pytest.raises(ValueError, match=r"randomization_test: the original relevance holds NaN or Inf"):
        evaluate.randomization_test(explain, variables, x, target=0, key=jax.random.key(0), relevance=relevance)


def _gamma(gamma):
    return composites.LayerMap({"dense": rules.Gamma(gamma=gamma)})


@pytest.mark.parametrize("grid, message", [
    ({}, "grid must map at least one hyperparameter"),
    ({"gamma": []}, "'gamma' needs at least one value, all finite"),
    ({"gamma": [0.1, np.nan]}, "'gamma' needs at least one value, all finite"),
])
def test_sweep_refuses_a_bad_grid(tiny, grid, message):
    model, variables, x = tiny
    with pytest.raises(ValueError, match=rf"jaxlrp\.evaluate\.sweep: {message}"):
        evaluate.sweep(_gamma, grid, model, variables, x, target=0, patch=(2,), steps=2)


def test_sweep_refuses_targets_out_of_range_nan_input_and_bad_points_per_call(tiny):
    model, variables, x = tiny
    args = dict(patch=(2,), steps=2)
    with pytest.raises(ValueError, match=r"jaxlrp\.evaluate\.sweep: target class out of range \[0, 4\) for an output of 4 classes: \[-1, 4\]"):
        evaluate.sweep(_gamma, {"gamma": [0.1]}, model, variables, x, target=jnp.array([0, -1, 4, 1]), **args)
    with pytest.raises(ValueError, match=r"jaxlrp\.evaluate\.sweep: the input holds NaN or Inf"):
        evaluate.sweep(_gamma, {"gamma": [0.1]}, model, variables, x.at[0, 0].set(jnp.nan), target=0, **args)
    with pytest.raises(ValueError, match=r"jaxlrp\.evaluate\.sweep: points_per_call must be None or an int >= 1"):
        evaluate.sweep(_gamma, {"gamma": [0.1]}, model, variables, x, target=0, points_per_call=0, **args)


def test_sweep_never_picks_a_point_whose_maps_are_nan(tiny):
    model, variables, x = tiny
    args = dict(patch=(4,), steps=1)

    def make(gamma):  # gamma < 0 gives a NaN stabilizer (traced, so unchecked) and NaN maps
        return composites.LayerMap({"dense": rules.Gamma(gamma=jnp.abs(gamma), stabilizer=jnp.where(gamma < 0, jnp.nan, 1e-6))})

    result = evaluate.sweep(make, {"gamma": [-1.0, 0.25]}, model, variables, x, target=0, **args)
    assert np.isnan(result.scores[0]) and np.isfinite(result.scores[1])  # before: ABPC 0, not NaN
    assert result.best == {"gamma": 0.25}
    with pytest.raises(ValueError, match=r"jaxlrp\.evaluate\.sweep: every grid point scored NaN"):
        evaluate.sweep(make, {"gamma": [-1.0, -2.0]}, model, variables, x, target=0, **args)


# ---- concepts.relevance_maximization -------------------------------------------------------


def test_relevance_maximization_never_ranks_nan_above_numbers(tiny):
    model, variables, _ = tiny
    data = np.array(jax.random.normal(jax.random.key(3), (9, 8)))
    data[0, 0] = np.nan  # sample 0 scores NaN for every channel
    explain = jaxlrp.lrp(model, composites.EpsilonPlus(), record=("hidden",))
    kwargs = dict(targets=np.arange(9) % 4, batch_size=4, progress=False)
    indices, scores = concepts.relevance_maximization(explain, variables, data, "hidden", k=3, **kwargs)
    assert not (np.asarray(indices) == 0).any() and np.isfinite(scores).all()  # before: sample 0 first everywhere
    values = np.asarray(jax.jit(lambda x, t: explain(variables, x, target=t))(data, kwargs["targets"]).layers["hidden"])
    for channel in range(6):
        expected = sorted(range(1, 9), key=lambda i: (-values[i, channel], i))[:3]
        assert list(np.asarray(indices[channel])) == expected
    every, every_score = concepts.relevance_maximization(explain, variables, data, "hidden", k=9, **kwargs)
    assert (np.asarray(every)[:, -1] == 0).all() and np.isnan(every_score[:, -1]).all()  # NaN last, shown as NaN
    assert np.isfinite(every_score[:, :-1]).all() and set(np.asarray(every)[0]) == set(range(9))


def test_relevance_maximization_checks_the_targets_length_before_any_work(tiny):
    model, variables, _ = tiny
    data = np.zeros((6, 8), np.float32)

    def explain(variables, x, target=None):
        raise AssertionError("explain was called")

    for targets in (np.arange(5) % 4, np.arange(7) % 4, 0):
        with pytest.raises(ValueError, match=r"jaxlrp\.concepts\.relevance_maximization: targets needs one entry per sample of data \(6\)"):
            concepts.relevance_maximization(explain, variables, data, "hidden", targets=targets, k=2, batch_size=4, progress=False)


# ---- viz -----------------------------------------------------------------------------------

MAGENTA = list(viz.NAN_COLOUR)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("symmetric", [True, False])
def test_heatmap_scales_by_the_finite_pixels_and_marks_the_others(bad, symmetric):
    r = np.array([[2.0, -1.0, 0.0, 0.5], [1.0, -2.0, 0.25, 0.0]])
    clean = viz.heatmap(r, symmetric=symmetric)
    r[1, 3] = bad
    rgb = viz.heatmap(r, symmetric=symmetric)
    np.testing.assert_array_equal(rgb[1, 3], MAGENTA)  # before: the whole map blanked
    mask = np.ones(r.shape, bool)
    mask[1, 3] = False
    np.testing.assert_array_equal(rgb[mask], clean[mask])


@pytest.mark.parametrize("cmap", sorted(viz.COLORMAPS))
def test_the_nan_colour_is_no_colour_of_a_number(cmap):
    rgb = viz.heatmap(np.append(np.linspace(-1, 1, 2001), np.nan)[None], cmap=cmap)
    np.testing.assert_array_equal(rgb[0, -1], MAGENTA)
    assert not (rgb[0, :-1] == MAGENTA).all(axis=-1).any()


def test_heatmap_a_nan_channel_marks_its_pixel_with_either_reduce():
    r = np.ones((2, 2, 3))
    r[0, 1, 2] = np.nan
    for reduce in ("sum", "absmax"):
        rgb = viz.heatmap(r, reduce=reduce)
        np.testing.assert_array_equal(rgb[0, 1], MAGENTA)
        np.testing.assert_array_equal(rgb[1, 1], [255, 0, 0])


def test_image_and_overlay_keep_the_finite_pixels():
    x = np.linspace(0.0, 1.0, 16).reshape(4, 4)
    clean = viz.image(x)
    x_bad = x.copy()
    x_bad[0, 1] = np.nan
    shown = viz.image(x_bad)
    np.testing.assert_array_equal(shown[0, 1], MAGENTA)  # before: every pixel 0 (NaN cast to uint8)
    np.testing.assert_array_equal(shown[1:], clean[1:])
    relevance = np.zeros((4, 4))
    relevance[2, 2], relevance[3, 0] = 3.0, -1.0
    expected = viz.overlay(x, relevance)
    relevance[1, 1] = np.nan
    picture = viz.overlay(x, relevance)
    np.testing.assert_array_equal(picture[1, 1], MAGENTA)
    mask = np.ones((4, 4), bool)
    mask[1, 1] = False
    np.testing.assert_array_equal(picture[mask], expected[mask])
    np.testing.assert_array_equal(viz.overlay(x_bad, np.where(np.isnan(relevance), 0, relevance))[0, 1], MAGENTA)
    with pytest.raises(ValueError, match=r"jaxlrp\.viz\.overlay: expected relevance of the image's height and width"):
        viz.overlay(x, np.zeros((4, 5)))


def test_save_png_scales_floats_in_0_1_and_refuses_the_rest(tmp_path):
    picture = np.random.default_rng(0).uniform(0, 1, (5, 6, 3))
    picture[0, 0] = [0.0, 1.0, 0.5]
    viz.save_png(tmp_path / "float.png", picture)
    expected = np.round(picture * 255).astype(np.uint8)
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "float.png")), expected)  # before: black
    viz.save_png(tmp_path / "grey.png", picture[..., :1])
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "grey.png")), expected[..., 0])
    viz.save_png(tmp_path / "ints.png", expected.astype(np.int64))
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "ints.png")), expected)
    bad = {
        "outside.png": (picture * 2, r"floats in \[0, 1\].*got values in \[0, 2\]"),
        "nan.png": (np.where(picture > 0.9, np.nan, picture), "holds NaN or Inf"),
        "big.png": (expected.astype(np.int64) + 1, r"integers in 0\.\.255"),
        "batch.png": (np.zeros((2, 5, 6, 3), np.uint8), r"got \(2, 5, 6, 3\); a batch"),
        "channels.png": (np.zeros((5, 6, 2), np.uint8), r"got \(5, 6, 2\)"),
        "batch3.png": (np.zeros((8, 5, 6), np.float32)[..., :5], r"got \(8, 5, 5\)"),
    }
    for name, (array, message) in bad.items():
        with pytest.raises(ValueError, match=rf"jaxlrp\.viz\.save_png: .*{message}"):
            viz.save_png(tmp_path / name, array)
        assert not (tmp_path / name).exists()


def test_grid_reads_float_tiles_and_refuses_nan_tiles():
    tile = np.linspace(0, 1, 64).reshape(8, 8)
    as_uint8 = np.round(tile * 255).astype(np.uint8)
    np.testing.assert_array_equal(viz.grid([[tile]], cell=8), viz.grid([[as_uint8]], cell=8))  # before: black
    np.testing.assert_array_equal(viz.grid([[tile[..., None]]], cell=8), viz.grid([[as_uint8]], cell=8))
    with pytest.raises(ValueError, match=r"jaxlrp\.viz\.grid: the tile in row 0, column 1 holds NaN or Inf"):
        viz.grid([[tile, np.where(tile > 0.5, np.nan, tile)]], cell=8)


def test_curves_leave_out_nan_values():
    plot = viz.curves({"MoRF": np.array([1.0, np.nan, 0.5, 0.25]), "LeRF": np.full(4, np.nan)})
    assert plot.shape == (400, 640, 3)
    red = (plot[..., 0] > 200) & (plot[..., 1] < 80) & (plot[..., 2] < 80)
    assert red.sum() > 100  # the finite segment of the first line is drawn
