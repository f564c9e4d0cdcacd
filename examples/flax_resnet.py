"""LRP for a Flax Linen ResNet (the architecture of Flax's examples/imagenet/models.py),
in float32 and in bfloat16. ResNet50 works the same way as ResNet18.

    python examples/flax_resnet.py [--small]
"""

import argparse
import time
from functools import partial
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import jaxlrp
from jaxlrp import composites

ModuleDef = Any


class ResNetBlock(nn.Module):
    filters: int
    conv: ModuleDef
    norm: ModuleDef
    act: Callable
    strides: tuple[int, int] = (1, 1)

    @nn.compact
    def __call__(self, x):
        residual = x
        y = self.conv(self.filters, (3, 3), self.strides)(x)
        y = self.act(self.norm()(y))
        y = self.conv(self.filters, (3, 3))(y)
        y = self.norm(scale_init=nn.initializers.zeros_init())(y)
        if residual.shape != y.shape:
            residual = self.conv(self.filters, (1, 1), self.strides, name="conv_proj")(residual)
            residual = self.norm(name="norm_proj")(residual)
        return self.act(residual + y)


class BottleneckResNetBlock(nn.Module):
    filters: int
    conv: ModuleDef
    norm: ModuleDef
    act: Callable
    strides: tuple[int, int] = (1, 1)

    @nn.compact
    def __call__(self, x):
        residual = x
        y = self.act(self.norm()(self.conv(self.filters, (1, 1))(x)))
        y = self.act(self.norm()(self.conv(self.filters, (3, 3), self.strides)(y)))
        y = self.conv(self.filters * 4, (1, 1))(y)
        y = self.norm(scale_init=nn.initializers.zeros_init())(y)
        if residual.shape != y.shape:
            residual = self.conv(self.filters * 4, (1, 1), self.strides, name="conv_proj")(residual)
            residual = self.norm(name="norm_proj")(residual)
        return self.act(residual + y)


class ResNet(nn.Module):
    stage_sizes: Sequence[int]
    block_cls: ModuleDef
    num_classes: int
    num_filters: int = 64
    dtype: Any = jnp.float32
    act: Callable = nn.relu
    conv: ModuleDef = nn.Conv

    @nn.compact
    def __call__(self, x, train: bool = True):
        conv = partial(self.conv, use_bias=False, dtype=self.dtype)
        norm = partial(
            nn.BatchNorm, use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=self.dtype
        )
        x = conv(self.num_filters, (7, 7), (2, 2), padding=[(3, 3), (3, 3)], name="conv_init")(x)
        x = nn.relu(norm(name="bn_init")(x))
        x = nn.max_pool(x, (3, 3), strides=(2, 2), padding="SAME")
        for i, block_size in enumerate(self.stage_sizes):
            for j in range(block_size):
                strides = (2, 2) if i > 0 and j == 0 else (1, 1)
                x = self.block_cls(
                    self.num_filters * 2**i, strides=strides, conv=conv, norm=norm, act=self.act
                )(x)
        x = jnp.mean(x, axis=(1, 2))
        x = nn.Dense(self.num_classes, dtype=self.dtype)(x)
        return jnp.asarray(x, self.dtype)


ResNet18 = partial(ResNet, stage_sizes=[2, 2, 2, 2], block_cls=ResNetBlock)
ResNet50 = partial(ResNet, stage_sizes=[3, 4, 6, 3], block_cls=BottleneckResNetBlock)


def random_variables(model, x, seed=0):
    """Stand-in for trained weights: He-normal kernels, random BatchNorm scales and statistics."""
    shapes = jax.eval_shape(partial(model.init, train=False), jax.random.key(0), x)
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name, shape = path[-1].key, leaf.shape
        if name == "kernel":
            return rng.normal(0.0, np.sqrt(2.0 / np.prod(shape[:-1])), shape)
        if name in ("scale", "var"):
            return rng.uniform(0.5, 1.5, shape)
        return rng.normal(0.0, 0.1, shape)  # biases, running means

    return jax.tree_util.tree_map_with_path(lambda p, leaf: jnp.asarray(fill(p, leaf), leaf.dtype), shapes)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--small", action="store_true", help="8 filters, 32x32 inputs, batch 2")
    args = parser.parse_args()
    filters, size, batch = (8, 32, 2) if args.small else (64, 224, 4)

    model = ResNet18(num_classes=1000, num_filters=filters)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(batch, size, size, 3)), jnp.float32)
    variables = random_variables(model, x)
    # Trained weights instead: a checkpoint of {"params", "batch_stats"} saved with orbax,
    #   variables = orbax.checkpoint.StandardCheckpointer().restore(path, target=variables)
    # or torchvision's resnet18 state_dict, renamed to these paths (conv kernels OIHW -> HWIO).

    composite = composites.EpsilonPlusFlat()
    print(jaxlrp.rule_table(model, composite, variables, x, train=False))

    explain = jax.jit(jaxlrp.lrp(model, composite, train=False))
    start = time.perf_counter()
    R = explain(variables, x).block_until_ready()
    print(f"explain: {time.perf_counter() - start:.2f} s (with compilation)")
    logits = model.apply(variables, x, train=False)
    print(f"input {x.shape} -> logits {logits.shape}, relevance {R.shape}")
    # Relevance starts at each sample's largest logit; biases and stabilizers absorb a little.
    for i, (logit, total) in enumerate(zip(logits.max(axis=-1)[:4], R.sum(axis=(1, 2, 3)))):
        print(f"sample {i}: logit {logit:.4f}  relevance sum {total:.4f}  ratio {total / logit:.4f}")

    # The same weights run in bfloat16 (parameters stay float32, computation in bfloat16).
    model16 = ResNet18(num_classes=1000, num_filters=filters, dtype=jnp.bfloat16)
    R16 = jax.jit(jaxlrp.lrp(model16, composite, train=False))(variables, x)  # float32, as x
    a, b = R.ravel(), R16.ravel()
    rel_l2 = jnp.linalg.norm(a - b) / jnp.linalg.norm(a)
    pearson = jnp.corrcoef(a, b)[0, 1]
    print(f"bfloat16 vs float32: relative L2 = {rel_l2:.3g}, pearson = {pearson:.4f}")


if __name__ == "__main__":
    main()
