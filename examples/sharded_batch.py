"""Explain a batch sharded over devices: with jax.jit on sharded inputs, or per shard with
jax.shard_map. On a CPU, XLA_FLAGS below makes 8 devices.

    python examples/sharded_batch.py [--small]
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")  # before importing jax

import argparse

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

import jaxlrp
from jaxlrp import composites


class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.Conv(16, (3, 3))(x)
        x = nn.relu(nn.BatchNorm(use_running_average=True)(x))
        x = nn.max_pool(x, (2, 2), (2, 2))
        x = x + nn.relu(nn.Conv(16, (3, 3))(x))  # a residual add
        x = jnp.mean(x, axis=(1, 2))
        return nn.Dense(10)(x)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--small", action="store_true", help="16x16 images, 2 per device")
    args = parser.parse_args()
    n = jax.device_count()
    size, per_device = (16, 2) if args.small else (64, 16)

    model = Net()
    x = jnp.asarray(np.random.default_rng(0).normal(size=(n * per_device, size, size, 3)), jnp.float32)
    variables = jax.jit(model.init)(jax.random.PRNGKey(0), x[:1])
    explain = jaxlrp.lrp(model, composites.EpsilonPlusFlat())

    mesh = jax.make_mesh((n,), ("data",))
    x_sharded = jax.device_put(x, NamedSharding(mesh, P("data")))  # batch split over devices
    variables = jax.device_put(variables, NamedSharding(mesh, P()))  # weights replicated
    print(f"{n} devices, batch {x.shape}, input sharding {x_sharded.sharding.spec}")

    # (a) jit on sharded inputs: XLA partitions the computation, the output follows the batch.
    R_jit = jax.jit(explain)(variables, x_sharded)
    print(f"(a) jit:       relevance {R_jit.shape}, sharding {R_jit.sharding.spec}")

    # (b) shard_map: each device explains its own slice of the batch. The input must already
    # carry the sharding that in_specs names (jax 0.10 does not reshard it for you).
    per_shard = jax.shard_map(
        lambda v, xb: explain(v, xb), mesh=mesh, in_specs=(P(), P("data")), out_specs=P("data")
    )
    R_map = jax.jit(per_shard)(variables, x_sharded)
    print(f"(b) shard_map: relevance {R_map.shape}, sharding {R_map.sharding.spec}")

    R = jax.jit(explain)(jax.device_get(variables), np.asarray(x))  # unsharded, one device
    print(f"max |jit - unsharded| = {jnp.abs(R_jit - R).max():.3g}")
    print(f"max |shard_map - unsharded| = {jnp.abs(R_map - R).max():.3g}")


if __name__ == "__main__":
    main()
