"""Binding for Flax Linen: trace `module.apply` with each module call marked in the name stack.

`nn.intercept_methods` is entered inside the traced function, so it works under any outer
`jit`. Each intercepted method call opens a `jax.named_scope` whose name indexes a record of
the module's path and class; every primitive traced inside carries that scope, which is how a
`dot_general` is known to belong to `block2/Conv_0`, an `nn.Conv`.
"""

from __future__ import annotations

import contextlib
import inspect

import flax
import flax.linen as nn
import jax

from jaxlrp._program import Traced

_MARK = "jaxlrp~"


def mark_scope(index: int) -> contextlib.AbstractContextManager:
    """A name scope that tags every primitive traced inside with module record `index`."""
    return jax.named_scope(f"{_MARK}{index}")


def describe_marks(records: list[tuple[str, type]], root=("", None)):
    """`describe(scope) -> (path, class)` of the innermost marked module in a name stack."""

    def describe(scope: str) -> tuple[str, type | None]:
        marks = [t for t in scope.split("/") if t.startswith(_MARK)]
        return records[int(marks[-1][len(_MARK):])] if marks else root

    return describe


def trace(module: nn.Module, variables, x, apply_kwargs: dict) -> Traced:
    """Traces `module.apply(variables, x, **apply_kwargs)` with its module calls marked."""
    records: list[tuple[str, type]] = []

    def interceptor(next_fun, args, kwargs, context):
        if context.method_name == "setup":
            return next_fun(*args, **kwargs)
        records.append(("/".join(context.module.path), type(context.module)))
        with mark_scope(len(records) - 1):
            return next_fun(*args, **kwargs)

    def apply(variables, x):
        with nn.intercept_methods(interceptor):
            return module.apply(variables, x, **apply_kwargs)

    try:
        closed = jax.make_jaxpr(apply)(variables, x)
    except (flax.errors.ModifyScopeVariableError, flax.errors.InvalidRngError) as error:
        raise ValueError(_training_mode_message(module, apply_kwargs, error)) from error
    return Traced(closed, jax.tree.leaves(variables), describe_marks(records, root=("", type(module))))


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
