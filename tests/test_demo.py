"""The demo end to end: training, heatmaps, faithfulness of every method, the γ sweep."""

import json

import numpy as np
import pytest
from PIL import Image

from jaxlrp.__main__ import main

LRP = ("EpsilonPlusFlat", "EpsilonGammaBox", "EpsilonAlpha2Beta1Flat")
BASELINES = ("gradient_x_input", "gradient", "smoothgrad", "integrated_gradients")


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    main(["demo", "--out", str(out), "--epochs", "4", "--samples", "3", "--evaluate", "200"])
    return out, json.loads((out / "summary.json").read_text())


def test_demo_writes_heatmaps_faithfulness_and_summary(demo):
    out, summary = demo
    assert summary["test_accuracy"] > 0.9
    assert summary["evaluated_digits"] == 200
    assert set(summary["methods"]) == {*LRP, *BASELINES, "random"}
    for name in LRP:  # LRP conserves up to biases and stabilizers
        assert 0.5 < summary["methods"][name]["mean_sum_over_seed"] < 1.5, name
    sweep = summary["gamma_sweep"]
    assert len(sweep["abpc"]) == len(sweep["gamma"]) and sweep["best"]["gamma"] in sweep["gamma"]
    assert sweep["abpc"][sweep["gamma"].index(sweep["best"]["gamma"])] == max(sweep["abpc"])
    heatmaps = np.asarray(Image.open(out / "heatmaps.png"))
    assert heatmaps.ndim == 3 and heatmaps.shape[2] == 3
    assert (heatmaps[..., 0] > heatmaps[..., 2] + 50).any(), "no red (positive relevance) in the grid"
    curves = np.asarray(Image.open(out / "faithfulness.png"))
    assert curves.shape[1] > curves.shape[0] > 200  # two panels side by side


def test_lrp_is_more_faithful_than_a_random_order_and_the_gradient(demo):
    """Samek et al. 2017's claim, on the demo's digits CNN and 200 test digits, with the paper's
    protocol (regions replaced by uniform noise). With a zero baseline instead, the gradient's
    ABPC exceeds the LRP composites' on this model: the Flat and ZBox rules give relevance to
    background pixels, which are already zero (see the README's faithfulness table)."""
    _, summary = demo
    methods = summary["methods"]
    for name in LRP:
        assert methods[name]["abpc"] > methods["random"]["abpc"] + 1.0, (name, methods[name], methods["random"])
        assert methods[name]["abpc"] > methods["gradient"]["abpc"], (name, methods[name], methods["gradient"])
