"""Train a Flax NNX CNN on scikit-learn's digits, checkpoint it with orbax, restore it, and
explain the restored model in the pure (GraphDef, State) form under jax.jit.

    python examples/nnx_orbax.py [--small]
"""

import argparse
import pathlib
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx
from sklearn.datasets import load_digits

import jaxlrp
from jaxlrp import composites


class CNN(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.conv1 = nnx.Conv(1, 16, (3, 3), rngs=rngs)
        self.bn = nnx.BatchNorm(16, rngs=rngs)
        self.conv2 = nnx.Conv(16, 32, (3, 3), rngs=rngs)
        self.linear1 = nnx.Linear(32 * 2 * 2, 64, rngs=rngs)
        self.linear2 = nnx.Linear(64, 10, rngs=rngs)

    def __call__(self, x):  # x: (batch, 8, 8, 1)
        x = nnx.max_pool(nnx.relu(self.bn(self.conv1(x))), (2, 2), (2, 2))
        x = nnx.max_pool(nnx.relu(self.conv2(x)), (2, 2), (2, 2))
        x = nnx.relu(self.linear1(x.reshape(x.shape[0], -1)))
        return self.linear2(x)


@nnx.jit
def train_step(model, optimizer, x, y):
    def loss_fn(model):
        return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()

    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--small", action="store_true", help="20 training steps, explain 4 digits")
    args = parser.parse_args()
    steps, n_explain = (20, 4) if args.small else (300, 64)

    digits = load_digits()
    images = (digits.images[..., None] / 16.0).astype(np.float32)  # (1797, 8, 8, 1) in [0, 1]
    labels = digits.target

    model = CNN(nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, optax.adam(3e-3), wrt=nnx.Param)
    rng = np.random.default_rng(0)
    for _ in range(steps):
        batch = rng.choice(len(images), 64)
        loss = train_step(model, optimizer, images[batch], labels[batch])
    model.eval()  # BatchNorm uses its running averages from here on
    logits = nnx.jit(lambda model, x: model(x))(model, images)
    accuracy = (logits.argmax(-1) == labels).mean()
    print(f"trained {steps} steps: loss {loss:.3f}, accuracy on all digits {accuracy:.3f}")

    # Save the state; restore it into an abstract model (shapes only, no weights computed).
    checkpointer = ocp.StandardCheckpointer()
    with tempfile.TemporaryDirectory() as tmp:
        path = pathlib.Path(tmp) / "state"
        checkpointer.save(path, nnx.state(model))
        checkpointer.wait_until_finished()
        abstract_model = nnx.eval_shape(lambda: CNN(nnx.Rngs(0)))
        graphdef, abstract_state = nnx.split(abstract_model)
        state = checkpointer.restore(path, abstract_state)

    # Pure form: the state is an argument, so one compiled function serves every weight set.
    # (The abstract model's BatchNorm is in training mode; jaxlrp explains an eval-mode copy.)
    composite = composites.EpsilonPlusFlat()
    explain = jax.jit(jaxlrp.lrp(graphdef, composite))
    x = images[:n_explain]
    R = explain(state, x)
    print(jaxlrp.rule_table(graphdef, composite, state, x))

    print(f"input {x.shape} -> logits {logits[:n_explain].shape}, relevance {R.shape}")
    for i, (logit, total) in enumerate(zip(logits.max(axis=-1)[:4], R.sum(axis=(1, 2, 3)))):
        print(f"digit {labels[i]}: logit {logit:.4f}  relevance sum {total:.4f}  ratio {total / logit:.4f}")

    R_original = explain(nnx.state(model), x)  # the trained model's own state
    print(f"max |restored - original| = {jnp.abs(R - R_original).max():.3g}")


if __name__ == "__main__":
    main()
