"""Twin networks: the same architecture in PyTorch (for zennit) and in Flax Linen, same weights.

Each `make_*` returns `(torch_model, flax_model, variables)`; torch works in NCHW, Flax in NHWC.
BatchNorm uses random statistics, some negative scales and eps = 1e-30: zennit 0.5.1 leaves
eps in place after merging (a 1/sqrt(1 + eps) factor per layer), so a tiny eps keeps the
comparison about the rules (zennit's own canonizer tests do the same).
"""

from collections import OrderedDict

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

BN_EPS = 1e-30


# ---- Flax side -------------------------------------------------------------------------


def _bn(name):
    return nn.BatchNorm(use_running_average=True, epsilon=BN_EPS, name=name)


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(32, name="fc1")(x))
        x = nn.relu(nn.Dense(32, name="fc2")(x))
        return nn.Dense(10, name="fc3")(x)


class VGG(nn.Module):
    width: int = 8

    @nn.compact
    def __call__(self, x):
        w = self.width
        x = nn.relu(_bn("bn0")(nn.Conv(w, (3, 3), padding=1, name="conv0")(x)))
        x = nn.relu(_bn("bn1")(nn.Conv(w, (3, 3), padding=1, name="conv1")(x)))
        x = nn.max_pool(x, (2, 2), (2, 2))
        x = nn.relu(_bn("bn2")(nn.Conv(2 * w, (3, 3), padding=1, name="conv2")(x)))
        x = nn.avg_pool(x, (2, 2), (2, 2))
        x = x.transpose(0, 3, 1, 2).reshape(x.shape[0], -1)  # torch's flatten order
        x = nn.relu(nn.Dense(32, name="fc1")(x))
        return nn.Dense(10, name="fc2")(x)


class Block(nn.Module):
    features: int
    stride: int

    @nn.compact
    def __call__(self, x):
        s = self.stride
        h = nn.relu(_bn("bn1")(nn.Conv(self.features, (3, 3), (s, s), padding=1, name="conv1")(x)))
        h = _bn("bn2")(nn.Conv(self.features, (3, 3), padding=1, name="conv2")(h))
        if s != 1 or x.shape[-1] != self.features:
            x = _bn("sc_bn")(nn.Conv(self.features, (1, 1), (s, s), padding=0, name="sc_conv")(x))
        return nn.relu(h + x)


class ResNet(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(_bn("bn0")(nn.Conv(8, (3, 3), padding=1, name="conv0")(x)))
        x = Block(8, 1, name="block1")(x)
        x = Block(16, 2, name="block2")(x)
        x = jnp.mean(x, axis=(1, 2))
        return nn.Dense(10, name="fc")(x)


# ---- torch side and weight porting -------------------------------------------------------


def _torch_models(width=8, image=16):
    import torch
    from zennit.layer import Sum

    tnn = torch.nn

    def conv_bn(cin, cout, k=3, stride=1, pad=1):
        return tnn.Sequential(tnn.Conv2d(cin, cout, k, stride, pad), tnn.BatchNorm2d(cout, eps=BN_EPS))

    class TorchBlock(tnn.Module):
        def __init__(self, cin, cout, stride):
            super().__init__()
            self.conv1 = conv_bn(cin, cout, stride=stride)
            self.relu1 = tnn.ReLU()
            self.conv2 = conv_bn(cout, cout)
            self.shortcut = conv_bn(cin, cout, 1, stride, 0) if stride != 1 or cin != cout else None
            self.sum = Sum()
            self.relu2 = tnn.ReLU()

        def forward(self, x):
            h = self.conv2(self.relu1(self.conv1(x)))
            s = x if self.shortcut is None else self.shortcut(x)
            return self.relu2(self.sum(torch.stack([h, s], dim=-1)))

    mlp = tnn.Sequential(OrderedDict(
        fc1=tnn.Linear(16, 32), relu1=tnn.ReLU(), fc2=tnn.Linear(32, 32), relu2=tnn.ReLU(), fc3=tnn.Linear(32, 10)
    ))
    vgg = tnn.Sequential(OrderedDict(
        conv0=conv_bn(3, width), relu0=tnn.ReLU(), conv1=conv_bn(width, width), relu1=tnn.ReLU(),
        pool1=tnn.MaxPool2d(2), conv2=conv_bn(width, 2 * width), relu2=tnn.ReLU(), pool2=tnn.AvgPool2d(2),
        flatten=tnn.Flatten(), fc1=tnn.Linear(2 * width * (image // 4) ** 2, 32), relu3=tnn.ReLU(),
        fc2=tnn.Linear(32, 10),
    ))
    resnet = tnn.Sequential(OrderedDict(
        conv0=conv_bn(3, 8), relu0=tnn.ReLU(), block1=TorchBlock(8, 8, 1), block2=TorchBlock(8, 16, 2),
        pool=tnn.AdaptiveAvgPool2d(1), flatten=tnn.Flatten(), fc=tnn.Linear(16, 10),
    ))
    return {"mlp": mlp, "vgg": vgg, "resnet": resnet}


def _randomize(model, seed):
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                n = module.num_features
                module.weight.copy_(torch.randn(n, generator=generator))  # some negative scales
                module.bias.copy_(0.2 * torch.randn(n, generator=generator))
                module.running_mean.copy_(0.2 * torch.randn(n, generator=generator))
                module.running_var.copy_(0.5 + torch.rand(n, generator=generator))
            elif isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)):
                module.bias.copy_(0.1 * torch.randn(module.bias.shape, generator=generator))
    return model.double().eval()


def _to_flax(torch_model, mapping):
    """`mapping`: flax path (tuple) -> torch submodule. Returns Linen variables."""
    import torch

    params, stats = {}, {}

    def put(tree, path, leaf):
        for key in path[:-1]:
            tree = tree.setdefault(key, {})
        tree[path[-1]] = leaf

    def arr(t):
        return jnp.asarray(t.detach().numpy())

    for path, module in mapping.items():
        if isinstance(module, torch.nn.Conv2d):
            put(params, path, {"kernel": arr(module.weight.permute(2, 3, 1, 0)), "bias": arr(module.bias)})
        elif isinstance(module, torch.nn.Linear):
            put(params, path, {"kernel": arr(module.weight.T), "bias": arr(module.bias)})
        elif isinstance(module, torch.nn.BatchNorm2d):
            put(params, path, {"scale": arr(module.weight), "bias": arr(module.bias)})
            put(stats, path, {"mean": arr(module.running_mean), "var": arr(module.running_var)})
    variables = {"params": params}
    if stats:
        variables["batch_stats"] = stats
    return variables


def make(name: str, seed: int = 0, width: int = 8, image: int = 16, batch: int = 3):
    """(torch_model, flax_model, flax_variables, input shape: NCHW or (batch, features)).

    `width` and `image` size the VGG-like network (the benchmarks use a larger one)."""
    torch_model = _randomize(_torch_models(width, image)[name], seed)
    m = dict(torch_model.named_modules())
    if name == "mlp":
        mapping = {(k,): m[k] for k in ("fc1", "fc2", "fc3")}
        return torch_model, MLP(), _to_flax(torch_model, mapping), (batch, 16)
    if name == "vgg":
        mapping = {}
        for i in range(3):
            mapping[(f"conv{i}",)] = m[f"conv{i}.0"]
            mapping[(f"bn{i}",)] = m[f"conv{i}.1"]
        mapping.update({("fc1",): m["fc1"], ("fc2",): m["fc2"]})
        return torch_model, VGG(width), _to_flax(torch_model, mapping), (batch, 3, image, image)
    mapping = {("conv0",): m["conv0.0"], ("bn0",): m["conv0.1"], ("fc",): m["fc"]}
    for block in ("block1", "block2"):
        for ours, theirs in (("conv1", "conv1"), ("conv2", "conv2"), ("sc", "shortcut")):
            if f"{block}.{theirs}.0" in m:
                conv, bn = (f"{ours}_conv", f"{ours}_bn") if ours == "sc" else (ours, "bn" + ours[-1])
                mapping[(block, conv)] = m[f"{block}.{theirs}.0"]
                mapping[(block, bn)] = m[f"{block}.{theirs}.1"]
    return torch_model, ResNet(), _to_flax(torch_model, mapping), (batch, 3, 16, 16)


def to_nhwc(x: np.ndarray) -> np.ndarray:
    return x.transpose(0, 2, 3, 1) if x.ndim == 4 else x


# ---- NNX twins and a plain-function twin of the Linen models (same weights) ---------------


def _nnx_models():
    from flax import nnx

    def bn(n, rngs):
        return nnx.BatchNorm(n, epsilon=BN_EPS, use_running_average=True, rngs=rngs)

    class NNXVGG(nnx.Module):
        def __init__(self, width, image, rngs):
            w = width
            self.conv0, self.bn0 = nnx.Conv(3, w, (3, 3), padding=1, rngs=rngs), bn(w, rngs)
            self.conv1, self.bn1 = nnx.Conv(w, w, (3, 3), padding=1, rngs=rngs), bn(w, rngs)
            self.conv2, self.bn2 = nnx.Conv(w, 2 * w, (3, 3), padding=1, rngs=rngs), bn(2 * w, rngs)
            self.fc1 = nnx.Linear(2 * w * (image // 4) ** 2, 32, rngs=rngs)
            self.fc2 = nnx.Linear(32, 10, rngs=rngs)

        def __call__(self, x):
            x = nnx.relu(self.bn0(self.conv0(x)))
            x = nnx.relu(self.bn1(self.conv1(x)))
            x = nnx.max_pool(x, (2, 2), (2, 2))
            x = nnx.relu(self.bn2(self.conv2(x)))
            x = nnx.avg_pool(x, (2, 2), (2, 2))
            x = x.transpose(0, 3, 1, 2).reshape(x.shape[0], -1)
            return self.fc2(nnx.relu(self.fc1(x)))

    class NNXBlock(nnx.Module):
        def __init__(self, cin, cout, stride, rngs):
            s = (stride, stride)
            self.conv1, self.bn1 = nnx.Conv(cin, cout, (3, 3), s, padding=1, rngs=rngs), bn(cout, rngs)
            self.conv2, self.bn2 = nnx.Conv(cout, cout, (3, 3), padding=1, rngs=rngs), bn(cout, rngs)
            self.shortcut = stride != 1 or cin != cout
            if self.shortcut:
                self.sc_conv = nnx.Conv(cin, cout, (1, 1), s, padding=0, rngs=rngs)
                self.sc_bn = bn(cout, rngs)

        def __call__(self, x):
            h = nnx.relu(self.bn1(self.conv1(x)))
            h = self.bn2(self.conv2(h))
            if self.shortcut:
                x = self.sc_bn(self.sc_conv(x))
            return nnx.relu(h + x)

    class NNXResNet(nnx.Module):
        def __init__(self, rngs):
            self.conv0, self.bn0 = nnx.Conv(3, 8, (3, 3), padding=1, rngs=rngs), bn(8, rngs)
            self.block1 = NNXBlock(8, 8, 1, rngs)
            self.block2 = NNXBlock(8, 16, 2, rngs)
            self.fc = nnx.Linear(16, 10, rngs=rngs)

        def __call__(self, x):
            x = nnx.relu(self.bn0(self.conv0(x)))
            x = self.block2(self.block1(x))
            return self.fc(jnp.mean(x, axis=(1, 2)))

    return nnx, NNXVGG, NNXResNet


def to_nnx(name: str, variables, width: int = 8, image: int = 16):
    """The NNX twin of Linen model `name`, carrying the Linen `variables`."""
    nnx, NNXVGG, NNXResNet = _nnx_models()
    rngs = nnx.Rngs(0)
    model = NNXVGG(width, image, rngs) if name == "vgg" else NNXResNet(rngs)
    for collection in variables.values():
        for path, leaf in jax.tree_util.tree_flatten_with_path(collection)[0]:
            *modules, leaf_name = [p.key for p in path]
            node = model
            for m in modules:
                node = getattr(node, m)
            getattr(node, leaf_name).set_value(leaf)
    return model


def vgg_function(params, x):
    """The VGG-like twin as a plain function of the Linen variables (jnp / lax only)."""
    from jax import lax

    def conv_bn(x, i):
        with jax.named_scope(f"conv{i}"):
            conv, bn, stats = params["params"][f"conv{i}"], params["params"][f"bn{i}"], params["batch_stats"][f"bn{i}"]
            y = lax.conv_general_dilated(x, conv["kernel"], (1, 1), ((1, 1), (1, 1)),
                                         dimension_numbers=("NHWC", "HWIO", "NHWC")) + conv["bias"]
            y = (y - stats["mean"]) * (bn["scale"] / jnp.sqrt(stats["var"] + BN_EPS)) + bn["bias"]
            return jax.nn.relu(y)

    x = conv_bn(conv_bn(x, 0), 1)
    x = lax.reduce_window(x, -jnp.inf, lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")
    x = conv_bn(x, 2)
    x = lax.reduce_window(x, 0.0, lax.add, (1, 2, 2, 1), (1, 2, 2, 1), "VALID") / 4.0
    x = x.transpose(0, 3, 1, 2).reshape(x.shape[0], -1)
    p = params["params"]
    with jax.named_scope("fc1"):
        x = jax.nn.relu(x @ p["fc1"]["kernel"] + p["fc1"]["bias"])
    with jax.named_scope("fc2"):
        return x @ p["fc2"]["kernel"] + p["fc2"]["bias"]
