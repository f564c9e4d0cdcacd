"""Heatmap colours: red positive, blue negative, white zero, symmetric scale."""

import numpy as np

from jaxlrp import heatmap


def test_colours_and_symmetric_scale():
    rgb = heatmap.relevance_to_rgb(np.array([[2.0, -1.0, 0.0, -2.0]]))
    np.testing.assert_array_equal(rgb[0, 0], [255, 0, 0])  # the largest |R|, positive: pure red
    np.testing.assert_array_equal(rgb[0, 3], [0, 0, 255])  # the same |R|, negative: pure blue
    np.testing.assert_array_equal(rgb[0, 2], [255, 255, 255])  # zero: white
    np.testing.assert_array_equal(rgb[0, 1], [128, 128, 255])  # half as negative: light blue


def test_all_zero_map_is_white():
    assert (heatmap.relevance_to_rgb(np.zeros((3, 3))) == 255).all()
