"""Imports of the peer libraries (torch, zennit) for the parity tests.

zennit 0.5.1 imports torchvision at import time, only to name the ResNet blocks that its
torchvision canonizers rewrite. The parity tests use none of those canonizers, so when
torchvision is absent we register the smallest honest stand-in: a `torchvision.models.resnet`
module whose `BasicBlock` and `Bottleneck` are empty `torch.nn.Module` subclasses.

Where torch or zennit is missing the parity tests are skipped, except when the environment
sets JAXLRP_REQUIRE_PEERS=1 (CI does): then the skip becomes a failure.
"""

import importlib.util
import os
import sys
import types

import pytest


def require(name: str):
    """Imports `name` (dotted names too), or skips (fails under JAXLRP_REQUIRE_PEERS=1) when it
    or a package above it is missing. An import that fails inside an installed package is an
    error, not a skip: it says the peer is broken, not absent."""
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as error:
        parts = name.split(".")
        if error.name not in {".".join(parts[: i + 1]) for i in range(len(parts))}:
            raise
        message = (f"{error.name} is not installed (needed for {name}); run the README's test "
                   "command, which installs every peer library")
        if os.environ.get("JAXLRP_REQUIRE_PEERS") == "1":
            pytest.fail(message)
        pytest.skip(message)


def zennit():
    torch = require("torch")
    if "torchvision" not in sys.modules and importlib.util.find_spec("torchvision") is None:
        resnet = types.ModuleType("torchvision.models.resnet")
        resnet.BasicBlock = type("BasicBlock", (torch.nn.Module,), {})
        resnet.Bottleneck = type("Bottleneck", (torch.nn.Module,), {})
        models = types.ModuleType("torchvision.models")
        models.resnet = resnet
        stand_in = types.ModuleType("torchvision")
        stand_in.models = models
        sys.modules.update({"torchvision": stand_in, "torchvision.models": models, "torchvision.models.resnet": resnet})
    return require("zennit")


def quantus():
    """Quantus 0.6.0 (installed with --no-deps beside zennit; it imports zennit when present)."""
    zennit()
    return require("quantus")
