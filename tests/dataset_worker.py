"""One process of the `explain_dataset` tests: explains a fixed data set into a zarr array.

    python dataset_worker.py OUT [--block-at ROW] [--log FILE] [--weights-scale S]
                                 [--process I --processes P --port N]

The data (29 samples, 8x8x2), the model (`models.CNN`, float32) and the composite are fixed, so
every run writes the same array. `--block-at ROW`: reading a batch from row ROW on prints
BLOCKED and hangs, for the test to kill the process there. `--log`: the row ranges read, as
JSON. `--weights-scale`: the weights times S (another run). With `--processes P`, P processes of 2 CPU devices each run under
`jax.distributed.initialize` on localhost; alone, the process has 4 devices. Either way the
mesh spans 4 devices and batches hold 8 samples.
"""

import argparse
import json
import os
import pathlib
import sys
import time

parser = argparse.ArgumentParser()
parser.add_argument("out")
parser.add_argument("--block-at", type=int, default=None)
parser.add_argument("--log", default=None)
parser.add_argument("--process", type=int, default=0)
parser.add_argument("--processes", type=int, default=1)
parser.add_argument("--port", type=int, default=0)
parser.add_argument("--weights-scale", type=float, default=1.0)
args = parser.parse_args()
os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={4 // args.processes}"

import jax  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import models  # noqa: E402

import jaxlrp  # noqa: E402
from jaxlrp import composites  # noqa: E402

if args.processes > 1:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(f"127.0.0.1:{args.port}", args.processes, args.process)

N, BATCH = 29, 8


def dataset():
    """`(model, variables, x, targets)`, the same in every process and in the test."""
    model = models.CNN()
    variables, _ = models.init(model, (1, 8, 8, 2), dtype=np.float32)
    x = np.random.default_rng(7).normal(size=(N, 8, 8, 2)).astype(np.float32)
    return model, variables, x, np.arange(N) % 3


class Source:
    """An array-like over `data` that logs the rows read and can hang at a row."""

    def __init__(self, data):
        self.data, self.shape, self.dtype, self.read = data, data.shape, data.dtype, []

    def __getitem__(self, rows):
        if args.block_at is not None and rows.start >= args.block_at:
            print("BLOCKED", flush=True)
            time.sleep(600)
        self.read.append([rows.start, rows.stop])
        return self.data[rows]


model, variables, x, targets = dataset()
variables = jax.tree.map(lambda a: a * args.weights_scale, variables)
source = Source(x)
mesh = jax.make_mesh((4,), ("data",))
explain = jaxlrp.lrp(model, composites.EpsilonPlusFlat())
jaxlrp.explain_dataset(explain, variables, source, targets=targets, out=args.out, batch_size=BATCH, mesh=mesh, progress=False)
if args.log:
    pathlib.Path(args.log).write_text(json.dumps(source.read))
print("DONE", flush=True)
