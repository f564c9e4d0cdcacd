"""Tracing for Flax NNX (used by `_bindings.NNXModule` and `NNXGraphDef`): a fresh copy of the
model with each module call marked.

NNX has no method interceptor. `nnx.merge(graphdef, state)` builds a new copy of the model
inside the traced function; each module of that copy (never the user's) gets a one-off
subclass whose `__call__` and public methods (such as `Embed.attend`) open a
`jax.named_scope` naming a record of the module's attribute path and class. The copy is put
in eval mode (BatchNorm uses its running averages, dropout is off), so no statistic is
updated and no RNG stream advanced.
"""

from __future__ import annotations

import inspect

import flax.nnx as nnx
import jax

from jaxlrp._linen import describe_marks, mark_scope
from jaxlrp._program import Traced


# nnx.Module's own methods (eval, train, sow, ...) are not model computations.
_NNX_API = frozenset(name for name in dir(nnx.Module) if not name.startswith("_"))


def _marked(method, path: str, cls: type):
    def call(self, *args, **kwargs):
        with mark_scope(path, cls):
            return method(self, *args, **kwargs)

    return call


def _mark(module: nnx.Module, path: str) -> None:
    """Gives `module` (a copy's) a one-off subclass whose public methods and `__call__` mark
    the name stack with its path and class."""
    cls = type(module)
    methods = {
        name: _marked(getattr(cls, name), path, cls)
        for name in dir(cls)
        if (name == "__call__" or not name.startswith("_"))
        and inspect.isfunction(getattr(cls, name, None))
        and name not in _NNX_API
    }
    module.__class__ = type(cls.__name__, (cls,), {**methods, "__module__": cls.__module__})


def trace(graphdef: nnx.GraphDef, state, x, call_kwargs: dict, output=None) -> Traced:
    """Traces the model built from `(graphdef, state)` on `x`, with its module calls marked
    (and `output` applied to what it returns, when given)."""
    def apply(state, x):
        model = nnx.merge(graphdef, state)
        model.eval()
        modules = [(path, node) for path, node in nnx.iter_graph(model) if isinstance(node, nnx.Module)]
        for path, node in modules:
            _mark(node, "/".join(map(str, path)))
        out = model(x, **call_kwargs)
        return out if output is None else output(out)

    closed = jax.make_jaxpr(apply)(state, x)
    return Traced(closed, jax.tree.leaves(state), describe_marks())
