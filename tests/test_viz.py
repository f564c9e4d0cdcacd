"""Pictures: colours (red positive, blue negative, white zero, symmetric scale), token HTML."""

import numpy as np

from jaxlrp import viz


def test_colours_and_symmetric_scale():
    rgb = viz.relevance_to_rgb(np.array([[2.0, -1.0, 0.0, -2.0]]))
    np.testing.assert_array_equal(rgb[0, 0], [255, 0, 0])  # the largest |R|, positive: pure red
    np.testing.assert_array_equal(rgb[0, 3], [0, 0, 255])  # the same |R|, negative: pure blue
    np.testing.assert_array_equal(rgb[0, 2], [255, 255, 255])  # zero: white
    np.testing.assert_array_equal(rgb[0, 1], [128, 128, 255])  # half as negative: light blue


def test_all_zero_map_is_white():
    assert (viz.relevance_to_rgb(np.zeros((3, 3))) == 255).all()


def test_text_heatmap_colours_each_token_and_escapes_it():
    page = viz.text_heatmap(["<a>", "cat", "sat"], np.array([1.0, 0.0, -0.5]))
    assert page.startswith("<!DOCTYPE html>") and "<script" not in page
    spans = page.split("<span")[1:]
    assert len(spans) == 3
    assert "rgb(255,0,0)" in spans[0] and "&lt;a&gt;" in spans[0]
    assert "rgb(255,255,255)" in spans[1]
    assert "rgb(128,128,255)" in spans[2] and 'title="-0.5"' in spans[2]


def test_text_heatmap_checks_lengths():
    import pytest

    with pytest.raises(ValueError, match="2 tokens but 3"):
        viz.text_heatmap(["a", "b"], np.zeros(3))
