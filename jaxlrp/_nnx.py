"""Binding for Flax NNX: trace a fresh copy of the model with each module call marked.

NNX has no method interceptor. `nnx.merge(graphdef, state)` builds a new copy of the model
inside the traced function; each module of that copy (never the user's) gets a one-off
subclass whose `__call__` opens a `jax.named_scope` naming a record of the module's
attribute path and class. The copy is put in eval mode (BatchNorm uses its running averages,
dropout is off), so no statistic is updated and no RNG stream advanced.
"""

from __future__ import annotations

import flax.nnx as nnx
import jax

from jaxlrp._linen import describe_marks, mark_scope


def _mark(module: nnx.Module, index: int) -> None:
    cls = type(module)

    def __call__(self, *args, **kwargs):
        with mark_scope(index):
            return cls.__call__(self, *args, **kwargs)

    module.__class__ = type(cls.__name__, (cls,), {"__call__": __call__, "__module__": cls.__module__})


def trace(graphdef: nnx.GraphDef, state, x, call_kwargs: dict):
    """Returns `(closed_jaxpr of (state, x) -> output, describe(scope) -> (path, class))`."""
    records: list[tuple[str, type]] = []

    def apply(state, x):
        model = nnx.merge(graphdef, state)
        model.eval()
        modules = [(path, node) for path, node in nnx.iter_graph(model) if isinstance(node, nnx.Module)]
        for path, node in modules:
            records.append(("/".join(map(str, path)), type(node)))
            _mark(node, len(records) - 1)
        return model(x, **call_kwargs)

    closed = jax.make_jaxpr(apply)(state, x)
    return closed, describe_marks(records)
