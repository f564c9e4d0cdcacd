"""Tracing for Keras 3 models on the JAX backend (used by `_bindings.Keras` and
`_bindings.KerasStateless`): `model.stateless_call` over the variables' values.

Keras opens a `jax.named_scope` named after each layer it calls, nested as the calls are
(`block_0/attention/query`), so the name stack of every traced primitive already holds its
layer's path. The paths and classes of the model's layers are read once, by walking its layer
tree; a scope is described by the longest of those paths that it starts with. The root model's
own call opens no scope (`stateless_call` runs its `call`), so paths start below it, as Flax's do.

Keras is imported only when a Keras model is given: jaxlrp does not depend on it.
"""

from __future__ import annotations

import sys

import jax

from jaxlrp._program import Traced


def is_keras_model(model) -> bool:
    """Whether `model` is a Keras layer (a model is one); Keras is not imported to find out."""
    keras = sys.modules.get("keras")
    return keras is not None and isinstance(model, keras.Layer)


def is_stateless_call(fn) -> bool:
    """Whether `fn` is `model.stateless_call` of a Keras model (the pure call form)."""
    owner = getattr(fn, "__self__", None)
    return owner is not None and getattr(fn, "__name__", "") == "stateless_call" and is_keras_model(owner)


def check_backend(model) -> None:
    import keras

    if keras.backend.backend() != "jax":
        raise ValueError(
            f"jaxlrp explains Keras models on the JAX backend; {type(model).__name__} runs on "
            f"{keras.backend.backend()!r}. Set KERAS_BACKEND=jax before Keras is imported."
        )
    if not model.built:
        raise ValueError(
            f"jaxlrp: the Keras model {model.name!r} ({type(model).__name__}) is not built, so it has no "
            f"variables yet. Build it first: model.build(input_shape), or call it once on an input."
        )


def variables(model) -> tuple[list, list]:
    """`(trainable, non_trainable)`: the current values of the model's variables, in
    `stateless_call`'s order."""
    return [v.value for v in model.trainable_variables], [v.value for v in model.non_trainable_variables]


def layer_paths(model) -> dict[str, type]:
    """`{path: class}` of every layer below `model`, paths as Keras nests their name scopes."""
    paths: dict[str, type] = {}

    def walk(layer, prefix: str) -> None:
        for child in layer._flatten_layers(include_self=False, recursive=False):
            path = f"{prefix}/{child.name}" if prefix else child.name
            if path not in paths:
                paths[path] = type(child)
                walk(child, path)

    walk(model, "")
    return paths


def describe_layers(model):
    """`describe(scope) -> (path, class)`: the innermost layer of `model` that a name stack is in."""
    paths = layer_paths(model)
    root = ("", type(model))

    def describe(scope: str) -> tuple[str, type | None]:
        parts = [p for p in scope.split("/") if p]
        for end in range(len(parts), 0, -1):
            path = "/".join(parts[:end])
            if path in paths:
                return path, paths[path]
        return root

    return describe


def trace(model, trainable: list, non_trainable: list, x, call_kwargs: dict, output=None) -> Traced:
    """Traces `model.stateless_call(trainable, non_trainable, x, training=False)` (and
    `output` applied to what it returns, when given)."""
    kwargs = {"training": False, **call_kwargs}

    def apply(params, x):
        trainable, non_trainable = params
        out, _ = model.stateless_call(trainable, non_trainable, x, **kwargs)
        return out if output is None else output(out)

    params = (list(trainable), list(non_trainable))
    closed = jax.make_jaxpr(apply)(params, x)
    names = [_names(v.path) for v in (*model.trainable_variables, *model.non_trainable_variables)]
    leaves = jax.tree.leaves(params)
    if len(names) != len(leaves):
        raise ValueError(
            f"jaxlrp: the Keras model {model.name!r} has {len(names)} variables but {len(leaves)} values were "
            f"given (stateless_call(trainable_variables, non_trainable_variables, x) takes one value per variable)."
        )
    return Traced(closed, leaves, describe_layers(model), names)


def _names(path: str) -> tuple[str, ...]:
    """A variable's path (`block_0/dense/kernel`) and its layer's (`block_0/dense`)."""
    layer = path.rpartition("/")[0]
    return (path, layer) if layer else (path,)
