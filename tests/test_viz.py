"""Pictures: heatmap colours on a symmetric scale, colour maps, grids, curves, PNG files, token HTML."""

import numpy as np
import pytest
from PIL import Image

from jaxlrp import viz

RED, BLUE, WHITE = [255, 0, 0], [0, 0, 255], [255, 255, 255]


def test_heatmap_colours_and_symmetric_scale():
    rgb = viz.heatmap(np.array([[2.0, -1.0, 0.0, -2.0]]))
    assert rgb.dtype == np.uint8 and rgb.shape == (1, 4, 3)
    np.testing.assert_array_equal(rgb[0, 0], RED)  # the largest |R|, positive
    np.testing.assert_array_equal(rgb[0, 3], BLUE)  # the same |R|, negative
    np.testing.assert_array_equal(rgb[0, 2], WHITE)  # zero
    np.testing.assert_array_equal(rgb[0, 1], [128, 128, 255])  # half as negative: light blue


def test_heatmap_scales_each_map_of_a_batch_on_its_own():
    maps = np.zeros((2, 3, 4, 5))
    maps[0, 1, 0, 0], maps[1, 2, 3, 4], maps[1, 2, 0, 0] = 1.0, -10.0, 5.0
    rgb = viz.heatmap(maps)
    assert rgb.shape == (2, 3, 4, 5, 3)
    np.testing.assert_array_equal(rgb[0, 1, 0, 0], RED)
    np.testing.assert_array_equal(rgb[1, 2, 3, 4], BLUE)
    np.testing.assert_array_equal(rgb[1, 2, 0, 0], [255, 128, 128])  # +5 on the ±10 scale
    assert (rgb[0, 0] == 255).all()  # an all-zero map is white


def test_heatmap_level_reduce_and_asymmetric_scale():
    r = np.array([[4.0, 1.0, -1.5, 0.0]])
    np.testing.assert_array_equal(viz.heatmap(r, level=0.25)[0, 1], RED)  # saturates at 0.25·max|R|
    np.testing.assert_array_equal(viz.heatmap(r, level=0.25)[0, 2], [0, 0, 255])
    channels = np.stack([r, -r, r], axis=-1)  # sums to r
    np.testing.assert_array_equal(viz.heatmap(channels, reduce="sum"), viz.heatmap(r))
    gray = viz.heatmap(r, cmap="gray", symmetric=False)
    np.testing.assert_array_equal(gray[0, 0], WHITE)  # the maximum is the top
    np.testing.assert_array_equal(gray[0, 2], [0, 0, 0])  # the minimum the bottom


@pytest.mark.parametrize("cmap", sorted(viz.COLORMAPS))
def test_every_colour_map(cmap):
    rgb = viz.heatmap(np.linspace(-1, 1, 9)[None], cmap=cmap)
    anchors = viz.COLORMAPS[cmap]
    np.testing.assert_array_equal(rgb[0, 0], anchors[0][1])
    np.testing.assert_array_equal(rgb[0, -1], anchors[-1][1])
    centre = [c for p, c in anchors if p == 0.5]
    if centre:  # diverging maps: zero relevance gets the centre colour
        np.testing.assert_array_equal(rgb[0, 4], centre[0])


def test_heatmap_errors_name_what_was_expected():
    with pytest.raises(ValueError, match="unknown colour map 'jet'"):
        viz.heatmap(np.zeros((2, 2)), cmap="jet")
    with pytest.raises(ValueError, match=r"\(\.\.\., H, W\)"):
        viz.heatmap(np.zeros(3))
    with pytest.raises(ValueError, match="reduce"):
        viz.heatmap(np.zeros((2, 2, 3)), reduce="mean")


def test_image_and_overlay():
    digit = np.zeros((4, 4, 1))
    digit[1, 1] = 1.0
    np.testing.assert_array_equal(viz.image(digit)[1, 1], WHITE)
    np.testing.assert_array_equal(viz.image(digit, invert=True)[1, 1], [0, 0, 0])
    relevance = np.zeros((4, 4))
    relevance[2, 2] = 3.0
    picture = viz.overlay(digit, relevance, alpha=1.0)
    np.testing.assert_array_equal(picture[2, 2], RED)  # full relevance: the heat colour
    np.testing.assert_array_equal(picture[1, 1], WHITE)  # no relevance: the image shows
    np.testing.assert_array_equal(picture[0, 0], [0, 0, 0])


def test_grid_curves_and_png_files(tmp_path):
    tiles = [[viz.image(np.eye(8)), viz.heatmap(np.eye(8))], [viz.heatmap(-np.eye(8)), viz.image(np.ones((8, 8)))]]
    picture = viz.grid(tiles, column_labels=["input", "LRP"], row_labels=["a", "b"], cell=32)
    assert picture.dtype == np.uint8 and picture.shape[2] == 3
    assert picture.shape[0] > 2 * 32 and picture.shape[1] > 2 * 32
    plot = viz.curves({"MoRF (1.2)": np.linspace(1, 0, 17), "LeRF": np.linspace(1, 0.8, 17)}, title="digits")
    assert plot.shape == (400, 640, 3)
    red = (plot[..., 0] > 200) & (plot[..., 1] < 80) & (plot[..., 2] < 80)
    assert red.sum() > 100  # the first line is drawn in red
    for name, image in (("grid.png", picture), ("curves.png", plot)):
        viz.save_png(tmp_path / name, image)
        np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / name)), image)


def test_text_heatmap_colours_each_token_and_escapes_it():
    page = viz.text_heatmap(["<a>", "cat", "sat"], np.array([1.0, 0.0, -0.5]))
    assert page.startswith("<!DOCTYPE html>") and "<script" not in page
    spans = page.split("<span")[1:]
    assert len(spans) == 3
    assert "rgb(255,0,0)" in spans[0] and "&lt;a&gt;" in spans[0]
    assert "rgb(255,255,255)" in spans[1]
    assert "rgb(128,128,255)" in spans[2] and 'title="-0.5"' in spans[2]


def test_text_heatmap_checks_lengths():
    with pytest.raises(ValueError, match="2 tokens but 3"):
        viz.text_heatmap(["a", "b"], np.zeros(3))


def test_token_matrix_colours_each_row_on_its_own_scale(tmp_path):
    r = np.zeros((2, 4))
    r[0, 1], r[0, 2] = 2.0, -2.0  # row 0: one red cell, one blue
    r[1, 0] = 1e-6  # row 1: tiny, still saturated red on its own scale
    r[1, 3] = np.nan
    cell = 10
    picture = viz.token_matrix(["a", "bb", "<c>", "d"], r, rows=["x", "y"], cell=cell)
    assert picture.dtype == np.uint8 and picture.ndim == 3 and picture.shape[2] == 3
    # the cells sit at the bottom right, before a 4-pixel margin: find them from there
    bottom, right = picture.shape[0] - 4, picture.shape[1] - 4
    top, left = bottom - 2 * cell, right - 4 * cell

    def centre(i, j):
        return tuple(picture[top + i * cell + cell // 2, left + j * cell + cell // 2])

    assert centre(0, 1) == (255, 0, 0) and centre(0, 2) == (0, 0, 255) and centre(0, 0) == (255, 255, 255)
    assert centre(1, 0) == (255, 0, 0) and centre(1, 3) == viz.NAN_COLOUR
    assert (picture[:top, :, 0] < 128).any(), "column labels are drawn above the cells"
    assert (picture[top:, :left, 0] < 128).any(), "row labels are drawn left of the cells"
    viz.save_png(tmp_path / "matrix.png", picture)
    assert Image.open(tmp_path / "matrix.png").size == (picture.shape[1], picture.shape[0])


def test_token_matrix_html_escapes_and_colours():
    r = np.array([[1.0, -1.0, 0.0]])
    page = viz.token_matrix_html(["<b>", "&", "c"], r, rows=["<gen>"])
    assert "&lt;b&gt;" in page and "&amp;" in page and "&lt;gen&gt;" in page and "<b>" not in page
    assert "background:rgb(255,0,0)" in page and "background:rgb(0,0,255)" in page
    assert page.count("<td ") == 3


def test_token_matrix_checks_shapes():
    with pytest.raises(ValueError, match=r"\(K, T\).*matrix\[b\]"):
        viz.token_matrix(["a"], np.zeros((1, 2, 1)))
    with pytest.raises(ValueError, match="2 tokens but the matrix has 3 columns"):
        viz.token_matrix(["a", "b"], np.zeros((1, 3)))
    with pytest.raises(ValueError, match="1 row labels but the matrix has 2 rows"):
        viz.token_matrix_html(["a", "b"], np.zeros((2, 2)), rows=["x"])
