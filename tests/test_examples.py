"""The scripts in examples/ run with --small, exit 0, and print what they claim.

A module fixture runs all scripts, two at a time (the reference machine has 2 cores); each
test then checks one script's output, parsed from its machine-checkable lines.
"""

import concurrent.futures
import math
import os
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
SCRIPTS = (
    "flax_resnet", "equinox_model", "haiku_model", "nnx_orbax", "sharded_batch", "vit_digits", "nnx_language_model",
    "concepts", "keras_hub_llm",
)
WRITES_FILES = ("vit_digits", "nnx_language_model", "concepts", "keras_hub_llm")  # these get --out in a temporary folder
TIMEOUT_S = 120


def _run(name: str, *args: str) -> subprocess.CompletedProcess:
    # The environment is inherited: conftest.py's XLA_FLAGS gives sharded_batch its 8 devices.
    return subprocess.run(
        [sys.executable, str(ROOT / "examples" / f"{name}.py"), "--small", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("examples")
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=2)
    args = {name: ("--out", str(out / name)) if name in WRITES_FILES else () for name in SCRIPTS}
    futures = {name: pool.submit(_run, name, *args[name]) for name in SCRIPTS}
    yield futures
    pool.shutdown(wait=True, cancel_futures=True)


def _output(runs, name: str) -> str:
    result = runs[name].result()
    assert result.returncode == 0, f"{name} exited {result.returncode}:\n{result.stdout}\n{result.stderr}"
    return result.stdout


def _number(output: str, label: str) -> float:
    match = re.search(re.escape(label) + r"\s*=?\s*([-+0-9.eE]+|nan|inf)", output)
    assert match, f"no {label!r} in:\n{output}"
    return float(match.group(1))


def _ratios(output: str, label: str = "ratio") -> list[float]:
    ratios = [float(r) for r in re.findall(re.escape(label) + r" ([-+0-9.eE]+)", output)]
    assert ratios, f"no {label!r} lines in:\n{output}"
    return ratios


def _row(output: str, path: str) -> str:
    """The rule table's row for the layer at `path`."""
    row = next((line for line in output.splitlines() if re.match(rf"\d+\s+{re.escape(path)}\s", line)), None)
    assert row, f"no rule-table row for {path!r} in:\n{output}"
    return row


def test_flax_resnet(runs):
    out = _output(runs, "flax_resnet")
    assert "Flat(" in _row(out, "conv_init") and "bn_init" in _row(out, "conv_init")
    assert "ZPlus(" in _row(out, "ResNetBlock_2/conv_proj")
    assert "Epsilon(" in _row(out, "Dense_0")
    assert "relevance (2, 32, 32, 3)" in out
    assert all(0.9 < r < 1.1 for r in _ratios(out)), out  # conserved up to stabilizers
    assert _number(out, "relative L2") < 0.25
    assert _number(out, "pearson") > 0.97


def test_equinox_model(runs):
    out = _output(runs, "equinox_model")
    assert "Flat(" in _row(out, "vmap(eqx.nn.Conv)") and ".layers[0].weight" in _row(out, "vmap(eqx.nn.Conv)")
    assert "ZPlus(" in out and "Epsilon(" in out
    assert all(abs(r - 1) < 1e-2 for r in _ratios(out)), out  # zero biases: conserved
    assert _number(out, "max |LRP0 - grad*input|") < 1e-5


def test_haiku_model(runs):
    out = _output(runs, "haiku_model")
    assert "Epsilon(epsilon=0.25)" in _row(out, "mlp/linear_2")
    assert "Epsilon(epsilon=1e-06)" in _row(out, "mlp/linear_0")
    assert "Flat(" in _row(out, "conv2_d")
    plain = _ratios(out, "LayerMap alone: ratio")
    assert all(abs(r - 1) < 1e-2 for r in plain), out
    eps = _ratios(out, "  ratio")
    assert all(0 < e < p for e, p in zip(eps, plain)), out  # epsilon 0.25 absorbs relevance


def test_nnx_orbax(runs):
    out = _output(runs, "nnx_orbax")
    assert _number(out, "accuracy on all digits") > 0.3
    assert "bn" in _row(out, "conv1")  # BatchNorm merged into the first conv
    assert all(0.1 < r < 1.5 for r in _ratios(out)), out
    assert _number(out, "max |restored - original|") < 1e-6


def test_sharded_batch(runs):
    out = _output(runs, "sharded_batch")
    devices = re.search(r"^(\d+) devices", out, re.MULTILINE)
    assert devices, out
    if "device_count=8" in os.environ.get("XLA_FLAGS", ""):  # conftest.py's setting
        assert devices.group(1) == "8"
    assert "sharding P('data'" in out
    assert _number(out, "max |jit - unsharded|") < 1e-5
    assert _number(out, "max |shard_map - unsharded|") < 1e-5


def _written(output: str, suffix: str) -> pathlib.Path:
    """The file a script reports as `wrote PATH`."""
    match = re.search(r"^wrote (\S+" + re.escape(suffix) + r")$", output, re.MULTILINE)
    assert match, f"no 'wrote ...{suffix}' in:\n{output}"
    path = pathlib.Path(match.group(1))
    assert path.is_file() and path.stat().st_size > 0, path
    return path


def test_vit_digits(runs):
    out = _output(runs, "vit_digits")
    assert _number(out, "test accuracy") > 0.5  # ten classes: chance is 0.1
    sweep = next(line for line in out.splitlines() if line.startswith("AttnLRP ABPC by γ:"))
    gamma = float(sweep.split("-> γ = ")[1])
    scores = {float(g): float(v) for g, v in (pair.split(": ") for pair in sweep.split(": ", 1)[1].split("  ->")[0].split("  "))}
    assert list(scores) == [0.0, 0.1, 0.25, 0.5, 1.0] and scores[gamma] == max(scores.values()), sweep
    assert f"Gamma(gamma={gamma}" in _row(out, "patch")  # the positional embedding is merged: no warning
    assert "Bilinear(" in _row(out, "Block_0/MultiHeadDotProductAttention_0")
    assert "Softmax()" in out
    assert "norm" in _row(out, "Block_0/LayerNorm_0")
    assert f"Gamma(gamma={gamma}" in _row(out, "head")
    assert "AttnLRP relevance finite = True" in out and "CPLRP relevance finite = True" in out
    ratios = _ratios(out)
    assert len(ratios) == 8 and all(math.isfinite(r) for r in ratios), out  # 4 digits, 2 composites
    assert _written(out, ".png").read_bytes().startswith(b"\x89PNG")
    assert "UnmergedAffineWarning" not in runs["vit_digits"].result().stderr


def test_nnx_language_model(runs):
    out = _output(runs, "nnx_language_model")
    assert _number(out, "loss") < _number(out, "uniform")  # it learned something
    assert "Softmax()" in out and re.search(r"blocks/0/attn\s+Attention\s+bilinear\s+Bilinear\(", out), out
    assert "norm" in _row(out, "blocks/0/attn_norm")
    assert "Epsilon(" in _row(out, "embed")  # the tied head is a dense layer of the embedding
    length = int(re.search(r"relevance shape \((\d+),\)", out).group(1))
    tokens = re.findall(r"^  (['\"]).+?\1\s+[-+][0-9.]+$", out, re.MULTILINE)  # each character's repr, relevance
    assert len(tokens) == length > 0, out  # one value per prompt character
    assert "finite = True" in out
    attn, cplrp = (_number(out, f"{name}: logit") for name in ("AttnLRP", "CPLRP"))
    assert attn == cplrp  # the same logit
    attn_ratio, cplrp_ratio = (_number(out.split(f"{name}: logit")[1], "ratio") for name in ("AttnLRP", "CPLRP"))
    assert 0.3 < attn_ratio < 1.5, out  # AttnLRP's softmax rule is not conservative
    assert abs(cplrp_ratio - 1) < 1e-3, out  # CP-LRP gives the logit back
    page = _written(out, ".html").read_text(encoding="utf-8")
    assert page.count("<span") == length


def test_concepts(runs):
    out = _output(runs, "concepts")
    shares = [float(s) for s in re.findall(r"concept Conv_1\[\d+\]: relevance [-0-9.]+ \(([-0-9.]+)% of", out)]
    assert len(shares) == 4 and shares == sorted(shares, reverse=True), out  # the top 4, highest first
    assert abs(_number(out, "conditional maps / map:") - 1.0) < 1e-4  # the channels' maps add up to the map
    assert len(re.findall(r"  Conv_1\[\d+\]: digits \[\d+, \d+, \d+, \d+\]", out)) == 4  # 4 references each
    assert _written(out, ".png").read_bytes().startswith(b"\x89PNG")


def test_keras_hub_llm(runs):
    out = _output(runs, "keras_hub_llm")
    assert _number(out, "copy accuracy") >= 0.9, out  # it learned to copy
    for name in ("AttnLRP", "CP-LRP"):  # each copied token's relevance is on the token it copies
        assert _number(out, f"{name}: source token top-1") >= 0.9, out
    written = re.search(r"wrote (\S+) and (\S+)", out)
    assert written and all(pathlib.Path(p).stat().st_size > 0 for p in written.groups()), out
