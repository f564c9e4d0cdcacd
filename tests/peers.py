"""Imports of the peer libraries (torch, zennit) for the parity tests.

zennit 0.5.1 imports torchvision at import time, only to name the ResNet blocks that its
torchvision canonizers rewrite. The parity tests use none of those canonizers, so when
torchvision is absent we register the smallest honest stand-in: a `torchvision.models.resnet`
module whose `BasicBlock` and `Bottleneck` are empty `torch.nn.Module` subclasses.

Where torch or zennit is missing the parity tests are skipped, except when the environment
sets JAXLRP_REQUIRE_PEERS=1 (CI does): then the skip becomes a failure.
"""

import importlib.machinery
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


def torchvision_stand_in(torch) -> None:
    """Where torchvision is absent, the smallest honest stand-in for the names the peers read
    at import time: zennit's `models.resnet.BasicBlock`/`Bottleneck` (empty `torch.nn.Module`
    subclasses) and LXT's `models.vision_transformer.nn` (torch's own `nn`). The modules carry
    a `__spec__`, so `importlib.util.find_spec("torchvision")` (transformers asks at import)
    answers rather than raising, and no distribution, so transformers counts torchvision absent."""
    if "torchvision" not in sys.modules and importlib.util.find_spec("torchvision") is not None:
        return  # the real one
    if "torchvision" in sys.modules and not getattr(sys.modules["torchvision"], "jaxlrp_stand_in", False):
        return  # the real one, already imported
    def module(name):
        if name not in sys.modules:
            made = types.ModuleType(name)
            made.__spec__ = importlib.machinery.ModuleSpec(name, None)
            made.jaxlrp_stand_in = True
            sys.modules[name] = made
        return sys.modules[name]

    models = module("torchvision").models = module("torchvision.models")
    resnet = models.resnet = module("torchvision.models.resnet")
    resnet.BasicBlock = getattr(resnet, "BasicBlock", None) or type("BasicBlock", (torch.nn.Module,), {})
    resnet.Bottleneck = getattr(resnet, "Bottleneck", None) or type("Bottleneck", (torch.nn.Module,), {})
    models.vision_transformer = module("torchvision.models.vision_transformer")
    models.vision_transformer.nn = torch.nn


def zennit():
    torchvision_stand_in(require("torch"))
    return require("zennit")


def quantus():
    """Quantus 0.6.0 (installed with --no-deps beside zennit; it imports zennit when present)."""
    zennit()
    return require("quantus")
