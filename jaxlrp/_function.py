"""Tracing for plain JAX functions `fn(*args)` written with jnp / lax / jax.nn (used by
`_bindings.Function`).

Each matmul or convolution with one parameter operand is a layer (kinds "dense", "conv").
Its path is the `jax.named_scope` it was traced in, and its names are those of its weight
in the other arguments' pytree (`['w1']`, Equinox's `.layers[3].weight`, Haiku's
`mlp/~/linear_2`), so `NameMap` patterns can match either. Leaves of the other arguments that
are not arrays (an Equinox model's activation functions, Python numbers) are static: they are
closed over, as `equinox.filter_jit` does.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.tree_util import DictKey, FlattenedIndexKey, GetAttrKey, SequenceKey

from jaxlrp._program import Traced


def trace(fn, position: int | tuple[int, ...], others: tuple, x) -> Traced:
    """Traces `fn(*args)` with `x` at `args[position]` and `others` the remaining arguments; for
    a tuple of positions, `x` is the tuple of the arguments at those positions."""
    keyed, treedef = jax.tree_util.tree_flatten_with_path(others)
    is_array = [isinstance(leaf, (jax.Array, np.ndarray, np.generic)) for _, leaf in keyed]

    def apply(arrays, x):
        given = iter(arrays)
        leaves = [next(given) if array else leaf for (_, leaf), array in zip(keyed, is_array)]
        args = list(treedef.unflatten(leaves))
        if isinstance(position, tuple):
            for p, xi in sorted(zip(position, x)):
                args.insert(p, xi)
        else:
            args.insert(position, x)
        return fn(*args)

    arrays = [leaf for (_, leaf), array in zip(keyed, is_array) if array]
    closed = jax.make_jaxpr(apply)(arrays, x)
    # The first key is the argument's position; it is left out of the names.
    names = [_names(path[1:]) for (path, _), array in zip(keyed, is_array) if array]
    return Traced(closed, arrays, lambda scope: (scope, None), names)


def _key_name(key) -> str:
    if isinstance(key, DictKey):
        return str(key.key)
    if isinstance(key, GetAttrKey):
        return key.name
    if isinstance(key, SequenceKey):
        return str(key.idx)
    if isinstance(key, FlattenedIndexKey):
        return str(key.key)
    return str(key)


def _names(path: tuple) -> tuple[str, ...]:
    """`keystr(path)`, its `/`-joined form, and the same two for the container of the leaf."""
    if not path:
        return ()
    names = [jax.tree_util.keystr(path), "/".join(map(_key_name, path))]
    if len(path) > 1:
        names += [jax.tree_util.keystr(path[:-1]), "/".join(map(_key_name, path[:-1]))]
    return tuple(dict.fromkeys(names))
