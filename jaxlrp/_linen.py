"""Tracing for Flax Linen (used by `_bindings.Linen`): `module.apply` with each module call
marked in the name stack.

`nn.intercept_methods` is entered inside the traced function, so it works under any outer
`jit`. Each intercepted method call opens a `jax.named_scope` whose name holds the module's
path and class; every primitive traced inside carries that scope, which is how a
`dot_general` is known to belong to `block2/Conv_0`, an `nn.Conv`.
"""

from __future__ import annotations

import contextlib
import inspect
import urllib.parse
from collections.abc import Mapping

import flax
import flax.linen as nn
import jax

from jaxlrp import _internals, _warn
from jaxlrp._program import Traced

_MARK = "jaxlrp~"
# The class of each mark's key. A mark names its module itself (path and class), not an index
# into one trace's records: a module under `nn.jit` is traced once and its marks are reused
# by every later trace.
_CLASSES: dict[str, type | None] = {}


def mark_scope(path: str, cls: type | None) -> contextlib.AbstractContextManager:
    """A name scope that tags every primitive traced inside with the module `path` of class `cls`."""
    key = f"{id(cls):x}"
    _CLASSES[key] = cls
    return jax.named_scope(f"{_MARK}{urllib.parse.quote(path, safe='')}~{key}")


def describe_marks(root=("", None)):
    """`describe(scope) -> (path, class)` of the innermost marked module in a name stack."""

    def describe(scope: str) -> tuple[str, type | None]:
        marks = [t for t in scope.split("/") if t.startswith(_MARK)]
        if not marks:
            return root
        path, key = marks[-1][len(_MARK):].rsplit("~", 1)
        return urllib.parse.unquote(path), _CLASSES.get(key)

    return describe


def trace(module: nn.Module, variables, x, apply_kwargs: dict, output=None) -> Traced:
    """Traces `module.apply(variables, x, **apply_kwargs)` with its module calls marked (and
    `output` applied to what it returns, when given)."""
    active: list[tuple[object, str, str]] = []  # (root scope, path prefix of its tree, path) per call

    def interceptor(next_fun, args, kwargs, context):
        if context.method_name == "setup":
            return next_fun(*args, **kwargs)
        module = context.module
        root = getattr(module.scope, "root", None)
        prefix = active[-1][1] if active else ""
        if active and root is not active[-1][0]:
            # Another scope tree: a lifted transform's (`nn.jit`, `nn.remat`), whose modules know
            # their whole path, or a module applied inside another's call (a tied head,
            # `Dense.apply({"params": {"kernel": embedding.T}}, h)`), named under the caller.
            prefix = "" if module.path else _join(active[-1][2], module.name or type(module).__name__)
        path = _join(prefix, "/".join(module.path))
        active.append((root, prefix, path))
        try:
            with mark_scope(path, type(module)):
                return next_fun(*args, **kwargs)
        finally:
            active.pop()

    def apply(variables, x):
        with nn.intercept_methods(interceptor):
            out = module.apply(variables, x, **apply_kwargs)
        return out if output is None else output(out)

    try:
        closed = jax.make_jaxpr(apply)(variables, x)
    except (flax.errors.ModifyScopeVariableError, flax.errors.InvalidRngError) as error:
        raise ValueError(_training_mode_message(module, apply_kwargs, error)) from error
    if _has_submodules(variables) and not _marks_a_submodule(closed.jaxpr):
        _warn.warn(
            f"jaxlrp: the submodules of {type(module).__name__} ran without being traced (a cached "
            f"`nn.jit` trace, made when the model was called before jaxlrp traced it), so every layer "
            f"is listed at '<root>' and NameMap patterns on module paths cannot reach them. Call "
            f"jax.clear_caches() before explaining, or explain the model before calling it elsewhere."
        )
    return Traced(closed, jax.tree.leaves(variables), describe_marks(root=("", type(module))))


def _marks_a_submodule(jaxpr) -> bool:
    """Whether some equation, nested calls included, carries the mark of a module below the root."""
    for eqn in jaxpr.eqns:
        if any(t.startswith(_MARK) and not t.startswith(_MARK + "~") for t in _internals.name_stack(eqn).split("/")):
            return True
        body, _ = _internals.call_body(eqn.params)
        if body is not None and _marks_a_submodule(body):
            return True
    return False


def _has_submodules(variables) -> bool:
    """Whether some collection holds the variables of a submodule (a nested dict)."""
    return any(isinstance(v, Mapping) for c in variables.values() if isinstance(c, Mapping) for v in c.values())


def _join(*parts: str) -> str:
    return "/".join(p for p in parts if p)


# Arguments by which Flax models commonly switch between training and inference.
_MODE_ARGUMENTS = {"train": False, "training": False, "is_training": False, "deterministic": True,
                   "use_running_average": True, "eval": True, "inference": True}


def _training_mode_message(module: nn.Module, apply_kwargs: dict, error: Exception) -> str:
    """What to pass so that `module` runs in inference mode."""
    parameters = inspect.signature(type(module).__call__).parameters
    named = [f"{name}={value}" for name, value in _MODE_ARGUMENTS.items() if name in parameters]
    fix = (
        f"pass {' or '.join(named)} to jaxlrp (jaxlrp.lrp(model, composite, {named[0]}))"
        if named
        else "build the model in inference mode (nn.BatchNorm(use_running_average=True), "
        "nn.Dropout(deterministic=True))"
    )
    given = f" with {apply_kwargs}" if apply_kwargs else ""
    return (
        f"jaxlrp: {type(module).__name__}{given} runs in training mode: it updates a variable or "
        f"draws random numbers ({str(error).splitlines()[0]}). LRP explains a model in inference "
        f"mode: {fix}."
    )
