"""The demo end to end on a small budget."""

import json

import numpy as np
from PIL import Image

from jaxlrp.__main__ import main


def test_demo_writes_heatmaps_and_summary(tmp_path, capsys):
    main(["demo", "--out", str(tmp_path), "--epochs", "3", "--samples", "3"])
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["test_accuracy"] > 0.8  # three epochs already learn the digits
    methods = {"EpsilonPlusFlat", "EpsilonGammaBox", "EpsilonAlpha2Beta1Flat", "gradient_x_input"}
    assert set(summary["methods"]) == methods
    for name, method in summary["methods"].items():
        assert len(method["relevance_sum"]) == len(method["seed"]) == 3
        if name != "gradient_x_input":  # LRP conserves up to biases and stabilizers
            assert 0.5 < method["mean_sum_over_seed"] < 1.5, (name, method["mean_sum_over_seed"])
    image = np.asarray(Image.open(tmp_path / "heatmaps.png"))
    assert image.ndim == 3 and image.shape[2] == 3
    assert (image[..., 0] > image[..., 2] + 50).any(), "no red (positive relevance) in the grid"
    assert "test accuracy" in capsys.readouterr().out
