"""The benchmark CNNs, a VGG-16-like and a ResNet-18-like network with BatchNorm for 32x32x3
images, in Flax Linen and in PyTorch with the same weights.

`width` is the first stage's channel count (64 in the original networks); later stages double
it as in the originals. The PyTorch twins keep each conv and its BatchNorm in one `Sequential`
(so zennit's `SequentialMergeBatchNorm` merges them) and the residual add in zennit's `Sum`
layer (so zennit gives it the Norm rule, as jaxlrp does).
"""

from __future__ import annotations

from collections import OrderedDict

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

VGG16 = (1, 1, "M", 2, 2, "M", 4, 4, 4, "M", 8, 8, 8, "M", 8, 8, 8, "M")  # channels / width
RESNET18 = ((1, 1), (2, 2), (4, 2), (8, 2))  # (channels / width, blocks) per stage; stride 2 after the first
CLASSES = 10


def _bn(dtype, name=None):
    return nn.BatchNorm(use_running_average=True, dtype=dtype, param_dtype=dtype, name=name)


class VGG(nn.Module):
    width: int = 64
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        for i, c in enumerate(VGG16):
            if c == "M":
                x = nn.max_pool(x, (2, 2), (2, 2))
            else:
                x = nn.Conv(c * self.width, (3, 3), padding=1, dtype=self.dtype, param_dtype=self.dtype, name=f"conv{i}")(x)
                x = nn.relu(_bn(self.dtype, f"bn{i}")(x))
        x = x.reshape(x.shape[0], -1)  # 1x1 spatial: the same order as torch's flatten
        x = nn.relu(nn.Dense(8 * self.width, dtype=self.dtype, param_dtype=self.dtype, name="fc1")(x))
        return nn.Dense(CLASSES, dtype=self.dtype, param_dtype=self.dtype, name="fc2")(x)


class Block(nn.Module):
    features: int
    stride: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        conv = lambda f, k, s, name: nn.Conv(  # noqa: E731
            f, (k, k), (s, s), padding=k // 2, use_bias=False, dtype=self.dtype, param_dtype=self.dtype, name=name)
        h = nn.relu(_bn(self.dtype, "bn1")(conv(self.features, 3, self.stride, "conv1")(x)))
        h = _bn(self.dtype, "bn2")(conv(self.features, 3, 1, "conv2")(h))
        if self.stride != 1 or x.shape[-1] != self.features:
            x = _bn(self.dtype, "sc_bn")(conv(self.features, 1, self.stride, "sc_conv")(x))
        return nn.relu(h + x)


class ResNet(nn.Module):
    width: int = 64
    dtype: jnp.dtype = jnp.float32
    remat: bool = False  # each residual block under nn.remat (the same parameters)

    @nn.compact
    def __call__(self, x):
        x = nn.Conv(self.width, (3, 3), padding=1, use_bias=False, dtype=self.dtype, param_dtype=self.dtype,
                    name="conv0")(x)
        x = nn.relu(_bn(self.dtype, "bn0")(x))
        for s, (c, blocks) in enumerate(RESNET18):
            for b in range(blocks):
                stride = 2 if s > 0 and b == 0 else 1
                block = nn.remat(Block) if self.remat else Block
                x = block(c * self.width, stride, self.dtype, name=f"stage{s}_{b}")(x)
        x = jnp.mean(x, axis=(1, 2))
        return nn.Dense(CLASSES, dtype=self.dtype, param_dtype=self.dtype, name="fc")(x)


def make(name: str, width: int, seed: int = 0, dtype=jnp.float32):
    """`(flax_model, variables)`: kernels normal with variance 2/fan-in (He), BatchNorm
    statistics and scales drawn (some scales negative), biases small."""
    model = {"vgg16": VGG, "resnet18": ResNet}[name](width, dtype)
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3), dtype))
    rng = np.random.default_rng(seed)

    def draw(path, s):
        key = str(path[-1])
        if "kernel" in key:
            value = np.sqrt(2 / np.prod(s.shape[:-1])) * rng.standard_normal(s.shape)
        elif "var" in key:
            value = 0.5 + rng.uniform(size=s.shape)
        elif "scale" in key:
            value = 0.5 + 0.5 * rng.standard_normal(s.shape)
        else:  # biases, BatchNorm shifts and means
            value = 0.1 * rng.standard_normal(s.shape)
        return jnp.asarray(value, dtype)

    return model, jax.tree_util.tree_map_with_path(draw, shapes)


def to_torch(name: str, variables, width: int, double: bool = False):
    """The PyTorch twin (NCHW, eval mode; float32, or float64 with `double`) with the Flax
    variables' weights."""
    import torch
    from zennit.layer import Sum

    tnn = torch.nn
    dtype = torch.float64 if double else torch.float32
    params, stats = variables["params"], variables["batch_stats"]

    def tensor(a):
        return torch.tensor(np.asarray(a, np.float64 if double else np.float32))

    def conv_bn(kernel, bias, bn, bn_stats, stride):
        k = kernel.shape[0]
        conv = tnn.Conv2d(kernel.shape[2], kernel.shape[3], k, stride, k // 2, bias=bias is not None, dtype=dtype)
        norm = tnn.BatchNorm2d(kernel.shape[3], eps=1e-5, dtype=dtype)
        with torch.no_grad():
            conv.weight.copy_(tensor(kernel).permute(3, 2, 0, 1))
            if bias is not None:
                conv.bias.copy_(tensor(bias))
            norm.weight.copy_(tensor(bn["scale"]))
            norm.bias.copy_(tensor(bn["bias"]))
            norm.running_mean.copy_(tensor(bn_stats["mean"]))
            norm.running_var.copy_(tensor(bn_stats["var"]))
        return tnn.Sequential(conv, norm)

    def dense(p):
        layer = tnn.Linear(*p["kernel"].shape, dtype=dtype)
        with torch.no_grad():
            layer.weight.copy_(tensor(p["kernel"]).T)
            layer.bias.copy_(tensor(p["bias"]))
        return layer

    class TorchBlock(tnn.Module):
        def __init__(self, p, s, stride):
            super().__init__()
            self.branch = tnn.Sequential(
                conv_bn(p["conv1"]["kernel"], None, p["bn1"], s["bn1"], stride), tnn.ReLU(),
                conv_bn(p["conv2"]["kernel"], None, p["bn2"], s["bn2"], 1))
            self.shortcut = (conv_bn(p["sc_conv"]["kernel"], None, p["sc_bn"], s["sc_bn"], stride)
                             if "sc_conv" in p else tnn.Identity())
            self.sum = Sum()
            self.relu = tnn.ReLU()

        def forward(self, x):
            return self.relu(self.sum(torch.stack([self.branch(x), self.shortcut(x)], dim=-1)))

    layers = OrderedDict()
    if name == "vgg16":
        for i, c in enumerate(VGG16):
            if c == "M":
                layers[f"pool{i}"] = tnn.MaxPool2d(2)
            else:
                p = params[f"conv{i}"]
                layers[f"conv{i}"] = conv_bn(p["kernel"], p["bias"], params[f"bn{i}"], stats[f"bn{i}"], 1)
                layers[f"relu{i}"] = tnn.ReLU()
        layers.update(flatten=tnn.Flatten(), fc1=dense(params["fc1"]), relu=tnn.ReLU(), fc2=dense(params["fc2"]))
    else:
        layers["conv0"] = conv_bn(params["conv0"]["kernel"], None, params["bn0"], stats["bn0"], 1)
        layers["relu0"] = tnn.ReLU()
        for s, (_, blocks) in enumerate(RESNET18):
            for b in range(blocks):
                key = f"stage{s}_{b}"
                layers[key] = TorchBlock(params[key], stats[key], 2 if s > 0 and b == 0 else 1)
        layers.update(pool=tnn.AdaptiveAvgPool2d(1), flatten=tnn.Flatten(), fc=dense(params["fc"]))
    return tnn.Sequential(layers).eval()
