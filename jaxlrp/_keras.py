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


def call_kwargs(model, kwargs: dict) -> dict:
    """`kwargs` with `training=False` (inference mode), where the model's `call` takes it:
    `stateless_call` calls `call` directly, without Keras's own check."""
    takes_training = getattr(model, "_call_has_training_arg", True)
    return {"training": False, **kwargs} if takes_training else dict(kwargs)


def trace(model, trainable: list, non_trainable: list, x, kwargs: dict, output=None) -> Traced:
    """Traces `model.stateless_call(trainable, non_trainable, x, training=False)` (and
    `output` applied to what it returns, when given)."""
    kwargs = call_kwargs(model, kwargs)
    variables = (*model.trainable_variables, *model.non_trainable_variables)
    params = (list(trainable), list(non_trainable))
    _check_values(model, params, len(model.trainable_variables), len(model.non_trainable_variables))

    def apply(params, x):
        trainable, non_trainable = params
        out, _ = model.stateless_call(trainable, non_trainable, x, **kwargs)
        return out if output is None else output(out)

    closed = jax.make_jaxpr(apply)(params, x)
    return Traced(closed, jax.tree.leaves(params), describe_layers(model), [_names(v.path) for v in variables])


def _check_values(model, params: tuple, trainable: int, non_trainable: int) -> None:
    """One array per variable, in `stateless_call`'s order: the values, not the variables."""
    import keras

    given = tuple(len(p) for p in params)
    leaves = jax.tree.leaves(params, is_leaf=lambda v: isinstance(v, keras.Variable))
    if given != (trainable, non_trainable) or len(leaves) != trainable + non_trainable:
        raise ValueError(
            f"jaxlrp: the Keras model {model.name!r} has {trainable} trainable and {non_trainable} non-trainable "
            f"variables; got {given[0]} and {given[1]} values. The pure form is explain(trainable, non_trainable, "
            f"x), one array per variable: [v.value for v in model.trainable_variables], likewise the others."
        )
    if any(isinstance(v, keras.Variable) for v in leaves):
        raise TypeError(
            f"jaxlrp: the pure form of the Keras model {model.name!r} takes the variables' values, not the "
            f"variables: [v.value for v in model.trainable_variables] and [v.value for v in "
            f"model.non_trainable_variables]."
        )


def _names(path: str) -> tuple[str, ...]:
    """A variable's path (`block_0/dense/kernel`) and its layer's (`block_0/dense`)."""
    layer = path.rpartition("/")[0]
    return (path, layer) if layer else (path,)
